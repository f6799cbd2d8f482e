"""A ready-to-deploy flow: run a pipeline file under a run key.

Deploy it with `prefect deploy --all` (see prefect.yaml) or call it from your own flow. The
run key defaults to the scheduled start time's date, so a daily scheduled run is resumable
and idempotent: re-running the same day's run resumes it or does nothing.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from dpipeline_prefect.pipeline import Pipeline


@flow(name="run-pipeline-file", log_prints=True)
def run_pipeline_file(pipeline_path: str, run_key: str | None = None, restart: bool = False) -> dict:
    """Run (or resume) the pipeline defined in ``pipeline_path``.

    Args:
        pipeline_path: path of the pipeline YAML file, as seen by the worker.
        run_key: identifies the run; default: the scheduled date (YYYY-MM-DD).
        restart: discard this run key's checkpoints and output first.
    """
    if run_key is None:
        scheduled = flow_run.scheduled_start_time
        run_key = scheduled.strftime("%Y-%m-%d") if scheduled else "default"
    from dpipeline_prefect.pipeline import run_pipeline

    summary = run_pipeline(Pipeline.from_yaml(pipeline_path), run_key=run_key, restart=restart)
    print(f"{summary['pipeline']}/{summary['run_key']}: {summary['status']}, "
          f"{summary['rows_out']} rows out")
    return summary


if __name__ == "__main__":
    import sys

    run_pipeline_file(sys.argv[1], *(sys.argv[2:3]))
