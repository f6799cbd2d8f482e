"""dpipeline-prefect: sharded, checkpointed, exactly-once pipelines on Prefect 3 and Dask."""

from .config import PipelineConfig, load_config
from .errors import DPipelineError, TerminalError, TransientError

__all__ = ["PipelineConfig", "load_config", "DPipelineError", "TerminalError", "TransientError"]
__version__ = "0.1.0"
