"""The deployments of prefect.yaml as Python code, plus one-off deployments of any pipeline.

    python deployments/deploy.py all [--pool dpipeline-process]
    python deployments/deploy.py pipeline NAME (--path FILE | --block NAME)
        [--cron "0 3 * * *" | --interval SECONDS] [--run-key-format FMT] [--pool P]

Both use ``flow.from_source(<this project folder>, entrypoint).deploy(...)``: the flow code
stays in this folder and a process worker on a machine with the project at the same path runs
it (the pull step sets the working directory, as prefect.yaml's does). The work pool must
exist: ``prefect work-pool create dpipeline-process --type process``. Every pipeline
deployment allows one run at a time (``concurrency_limit`` 1, later runs wait their turn).
The server is the one PREFECT_API_URL (or the active profile) points at.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FLOW = "flows/pipeline_flow.py:run_pipeline_flow"
VIA_DEPLOYMENT_FLOW = "flows/run_deployment_flow.py:pipeline_via_deployment"
POOL = "dpipeline-process"


def one_at_a_time() -> ConcurrencyLimitConfig:
    """One run at a time per pipeline deployment; a run arriving meanwhile waits (ENQUEUE)."""
    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


def deploy_pipeline(name: str, *, path: str | None = None, block: str | None = None,
                    cron: str | None = None, interval: float | None = None,
                    run_key_format: str = "%Y-%m-%d", pool: str = POOL, description: str | None = None,
                    tags: list[str] | None = None) -> Any:
    """Deploy the ``run-pipeline`` flow for one pipeline (a file or a pipeline block).

    Returns the deployment id. ``cron`` (in UTC) or ``interval`` (seconds) adds a schedule;
    scheduled runs take their run key from the scheduled time in ``run_key_format``.
    """
    if bool(path) == bool(block):
        raise SystemExit("give exactly one of --path and --block")
    parameters: dict[str, Any] = {"run_key_format": run_key_format}
    parameters["pipeline_path" if path else "pipeline_block"] = path or block
    source_flow = flow.from_source(source=str(ROOT), entrypoint=PIPELINE_FLOW)
    schedule: dict[str, Any] = {}
    if cron:
        from prefect.schedules import Cron

        schedule["schedules"] = [Cron(cron, timezone="UTC")]
    elif interval:
        schedule["interval"] = interval
    return source_flow.deploy(
        name=name,
        work_pool_name=pool,
        parameters=parameters,
        concurrency_limit=one_at_a_time(),
        description=description,
        tags=tags or ["dpipeline"],
        build=False,
        push=False,
        print_next_steps=False,
        **schedule,
    )


def deploy_all(pool: str = POOL) -> list[Any]:
    """The deployments of prefect.yaml, the same names, parameters, schedules and limits."""
    ids = [
        deploy_pipeline(
            "flights-clean-daily", path="examples/flights/pipeline.yaml", cron="0 3 * * *",
            pool=pool, tags=["dpipeline", "flights-clean"],
            description="The example flights pipeline once a day at 03:00 UTC; the run key is "
            "the scheduled date, so a re-run of a day resumes that day's run.",
        ),
        deploy_pipeline(
            "flights-clean-from-block", block="flights-clean", pool=pool,
            tags=["dpipeline", "flights-clean"],
            description="The flights pipeline kept in the dpipeline-pipeline block flights-clean.",
        ),
    ]
    ids.append(deploy_pipeline(
        "flights-stream-every-5-min", path="examples/stream/pipeline.yaml", interval=300,
        run_key_format="%Y-%m-%dT%H%M", pool=pool, tags=["dpipeline", "flights-stream"],
        description="The incremental flights pipeline every 5 minutes: each run processes only "
        "the files that arrived since the last one.",
    ))
    via = flow.from_source(source=str(ROOT), entrypoint=VIA_DEPLOYMENT_FLOW)
    ids.append(via.deploy(
        name="flights-clean-via-deployment", work_pool_name=pool, build=False, push=False,
        parameters={"deployment": "run-pipeline/flights-clean-daily"}, tags=["dpipeline", "example"],
        description="Composition example: triggers run-pipeline/flights-clean-daily with "
        "run_deployment and waits for it.",
        print_next_steps=False,
    ))
    return ids


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and create or update the deployments; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all", help="the deployments of prefect.yaml")
    a.add_argument("--pool", default=POOL)
    p = sub.add_parser("pipeline", help="deploy one pipeline (file or block)")
    p.add_argument("name")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--path", help="pipeline YAML file (relative to the project folder)")
    src.add_argument("--block", help="name of a dpipeline-pipeline block")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", help='cron schedule in UTC, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=float, help="schedule every N seconds")
    p.add_argument("--run-key-format", default="%Y-%m-%d",
                   help="strftime format of the scheduled time that makes the run key")
    p.add_argument("--pool", default=POOL)
    args = parser.parse_args(argv)
    if args.command == "all":
        for dep_id in deploy_all(args.pool):
            print(f"deployed {dep_id}")
    else:
        dep_id = deploy_pipeline(args.name, path=args.path, block=args.block, cron=args.cron,
                                 interval=args.interval, run_key_format=args.run_key_format,
                                 pool=args.pool)
        print(f"deployed run-pipeline/{args.name} ({dep_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
