"""dpipeline-prefect: sharded, checkpointed, exactly-once pipelines on Prefect 3 and Dask.

    from dpipeline_prefect import Pipeline
    summary = Pipeline.from_yaml("pipeline.yaml").run(run_key="2026-11-29")
"""

from typing import Any

from .config import PipelineConfig, load_config
from .errors import DPipelineError, TerminalError, TransientError
from .pipeline import Pipeline, run_pipeline

__all__ = [
    "Pipeline",
    "run_pipeline",
    "sharded_pipeline",
    "PipelineConfig",
    "load_config",
    "DPipelineError",
    "TerminalError",
    "TransientError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The flow object imports Prefect; keep `import dpipeline_prefect` cheap until it is needed.
    if name == "sharded_pipeline":
        from .flows import sharded_pipeline

        return sharded_pipeline
    raise AttributeError(name)
