"""A ready-to-deploy flow: run a pipeline, given a pipeline file or a pipeline block, under a run key.

Deploy it with `prefect deploy --all` (see prefect.yaml) or deployments/deploy.py, or call it
from your own flow. The run key defaults to the scheduled start time formatted with
``run_key_format`` (default: the date), so a daily scheduled run is resumable and
idempotent: re-running the same day's run resumes it, or does nothing if it completed.

The parameters are typed and described below; the Prefect UI shows them as a form.
Credentials never appear among them: a pipeline names storage blocks (``block: NAME``) or
``${VAR}`` references, resolved where the storage is opened.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from dpipeline_prefect.errors import ConfigError
from dpipeline_prefect.pipeline import Pipeline, run_pipeline


def derive_run_key(run_key: str | None, run_key_format: str = "%Y-%m-%d") -> str:
    """``run_key`` if given, else the flow run's scheduled start time in ``run_key_format``.

    A scheduled run gets the time it was scheduled for (not the time it happened to start),
    so a late or retried run of a day still works on that day's run key.
    """
    if run_key:
        return run_key
    scheduled = flow_run.scheduled_start_time
    if scheduled is None:
        return "default"
    return scheduled.strftime(run_key_format)


def load_pipeline(pipeline_path: str | None = None, pipeline_block: str | None = None) -> Pipeline:
    """The pipeline from a YAML file or from a ``dpipeline-pipeline`` block (exactly one)."""
    if bool(pipeline_path) == bool(pipeline_block):
        raise ConfigError(
            "give exactly one of pipeline_path (a pipeline YAML file) and pipeline_block "
            "(the name of a dpipeline-pipeline block)",
            field="pipeline_path" if pipeline_path else "pipeline_block",
        )
    if pipeline_path:
        return Pipeline.from_yaml(pipeline_path)
    from dpipeline_prefect.blocks import load_pipeline_block

    return load_pipeline_block(pipeline_block).pipeline()


@flow(name="run-pipeline", log_prints=True, validate_parameters=True)
def run_pipeline_flow(
    pipeline_path: str | None = None,
    pipeline_block: str | None = None,
    run_key: str | None = None,
    run_key_format: str = "%Y-%m-%d",
    restart: bool = False,
) -> dict:
    """Run (or resume) a pipeline defined in a YAML file or in a pipeline block.

    Args:
        pipeline_path: Path of the pipeline YAML file, as seen by the worker (relative to the
            project folder). Give this or pipeline_block.
        pipeline_block: Name of a dpipeline-pipeline block holding the pipeline definition.
            Give this or pipeline_path.
        run_key: Identifies the run (its checkpoints and output). Empty: the scheduled start
            time formatted with run_key_format, so each scheduled run has its own key and a
            re-run of it resumes.
        run_key_format: strftime format that turns the scheduled start time into the run key
            when run_key is empty (default: the date, one run key per day).
        restart: Discard this run key's checkpoints and output first.
    """
    pipeline = load_pipeline(pipeline_path, pipeline_block)
    key = derive_run_key(run_key, run_key_format)
    summary = run_pipeline(pipeline, run_key=key, restart=restart)
    print(f"{summary['pipeline']}/{summary['run_key']}: {summary['status']}, "
          f"{summary['rows_out']} rows out")
    return summary


# The name this flow had before pipeline blocks existed.
run_pipeline_file = run_pipeline_flow


if __name__ == "__main__":
    import sys

    run_pipeline_flow(pipeline_path=sys.argv[1], run_key=(sys.argv[2] if len(sys.argv) > 2 else None))
