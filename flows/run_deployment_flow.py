"""Composition through a deployment: a user's flow that triggers a deployed pipeline with
``run_deployment`` and waits for it.

Unlike calling a pipeline as a subflow (flows/compose_two_pipelines.py), the pipeline then
runs where its deployment's work pool runs it (another machine, another container), under
the deployment's concurrency limit; this flow only waits. The triggered run is linked to
this one as its child in the Prefect UI.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.deployments import run_deployment

from dpipeline_prefect.errors import DPipelineError


@flow(name="pipeline-via-deployment")
def pipeline_via_deployment(
    deployment: str = "run-pipeline/flights-clean-daily",
    run_key: str | None = None,
    pipeline_path: str | None = None,
    timeout_s: float | None = 3600,
) -> dict:
    """Run the pipeline deployment ``deployment`` once and wait until it finishes.

    Args:
        deployment: Deployment to trigger, as FLOW_NAME/DEPLOYMENT_NAME.
        run_key: Run key handed to the deployment (empty: the deployment derives it from the
            scheduled start time).
        pipeline_path: Override of the deployment's pipeline_path parameter (empty: keep it).
        timeout_s: Seconds to wait for the run to finish (empty: wait as long as it takes).
    """
    parameters: dict = {}
    if run_key:
        parameters["run_key"] = run_key
    if pipeline_path:
        parameters["pipeline_path"] = pipeline_path
    run = run_deployment(deployment, parameters=parameters, timeout=timeout_s)
    state = run.state
    get_run_logger().info("deployment %s run %s finished: %s", deployment, run.name,
                          state.name if state else "unknown")
    if state is None or not state.is_completed():
        raise DPipelineError(
            f"deployment {deployment} run {run.name} ({run.id}) ended "
            f"{state.name if state else 'without a state'}",
            flow_run_id=str(run.id),
        )
    return {"deployment": deployment, "flow_run_id": str(run.id), "flow_run_name": run.name,
            "state": state.name}
