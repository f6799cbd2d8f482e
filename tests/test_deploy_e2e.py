"""End to end, the way a user deploys: a Prefect server on PostgreSQL, a process work pool,
``prefect deploy --all`` with the project's prefect.yaml, a worker started with
``prefect worker start``, a run triggered as the UI does (``prefect deployment run``) and
waited for until Completed, its output checked row for row; then a deployment made with
deployments/deploy.py on a short interval schedule, whose first scheduled run completes with
a run key derived from its scheduled time.

One server, one worker, tiny data; both checks share them (module-scoped fixtures).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dpipeline_prefect.devservices import PrefectServer

from .pipeline_helpers import assert_exactly_once, flights, reference, write_parquet_files, write_yaml

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
POOL = "dpipeline-process"


def _pg(sql: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(database="postgres", timeout=10, **PG)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """A Prefect server on a fresh PostgreSQL database (dropped afterwards)."""
    try:
        import asyncpg  # noqa: F401

        db = f"dpipeline_e2e_{uuid.uuid4().hex[:10]}"
        _pg(f'CREATE DATABASE "{db}"')
    except (OSError, ImportError) as e:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not available: {e}")
    srv = PrefectServer(
        tmp_path_factory.mktemp("pg-prefect"),
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:5432/{db}",
        ui=False,
        # the scheduler looks for due schedules every 2 s instead of every 60 s
        extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"},
        startup_timeout=180,
    )
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        _pg(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _env(srv: PrefectServer, cwd: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": srv.api_url, "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_CLI_PROMPT": "false"}
    if cwd is not None:
        # as a shell sets it: prefect.yaml's "{{ $PWD }}" reads this variable, not the cwd
        env["PWD"] = str(cwd)
    # the flow runs import the library from here, as the coordinator's venv or this checkout has it
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def _prefect(srv: PrefectServer, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "prefect")
    r = subprocess.run([exe, *args], cwd=cwd, env=_env(srv, cwd), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def project(pg_server, tmp_path_factory):
    """A copy of the project deployed with `prefect deploy --all`, and a worker running it."""
    proj = tmp_path_factory.mktemp("project")
    for name in ("flows", "deployments"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "prefect.yaml", proj / "prefect.yaml")
    _prefect(pg_server, "work-pool", "create", POOL, "--type", "process", cwd=proj)
    # deployments/deploy.py makes the same deployments as prefect.yaml: deploy with the code
    # first, then with prefect.yaml (which the tests use), and compare what the server holds
    r = subprocess.run([sys.executable, "deployments/deploy.py", "all"], cwd=proj,
                       env=_env(pg_server, proj), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    PROJECT_DEPLOYMENTS["code"] = _deployments(pg_server)
    r = _prefect(pg_server, "--no-prompt", "deploy", "--all", cwd=proj)
    assert "flights-clean-daily" in r.stdout
    PROJECT_DEPLOYMENTS["yaml"] = _deployments(pg_server)
    # schedules of deployments the tests do not use must not start runs meanwhile
    with _client(pg_server) as client:
        for d in client.read_deployments():
            if d.name != "flights-clean-daily" and d.schedules:
                client.pause_deployment(d.id)
    log = open(proj / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", POOL,
         "--name", "e2e-worker"],
        cwd=proj, env=_env(pg_server, proj), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        yield proj
    finally:
        try:
            os.killpg(worker.pid, signal.SIGINT)
            worker.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(worker.pid, signal.SIGKILL)  # flow-run processes the worker started
        except ProcessLookupError:
            pass
        log.close()


PROJECT_DEPLOYMENTS: dict[str, dict] = {}


def _deployments(srv: PrefectServer) -> dict[str, dict]:
    """What matters of every deployment on the server, by flow/deployment name."""
    out = {}
    with _client(srv) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        for d in client.read_deployments():
            out[f"{flows[d.flow_id]}/{d.name}"] = {
                "entrypoint": d.entrypoint, "parameters": d.parameters, "tags": sorted(d.tags),
                "work_pool": d.work_pool_name, "pull_steps": d.pull_steps,
                "limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
                "collision": d.concurrency_options.collision_strategy if d.concurrency_options else None,
                # an interval's anchor is the moment of deployment: not compared
                "schedules": sorted((s.schedule.model_dump_json(exclude={"anchor_date"}), s.active)
                                    for s in d.schedules),
            }
    return out


def _client(srv: PrefectServer):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=srv.api_url)


def _tiny_pipeline(tmp: Path, name: str, rows: int, runner: dict) -> tuple[Path, Path]:
    df = flights(rows)
    write_parquet_files(df, tmp / "src", files=2, row_group_size=300)
    cfg = {"name": name, "source": {"path": str(tmp / "src")},
           "transforms": ["dpipeline_prefect.examples.flights:clean"],
           "sharding": {"strategy": "files"}, "batching": {"rows": 400},
           "sink": {"path": str(tmp / "out" / "{run_key}")},
           "checkpoint": {"path": str(tmp / "ckpt")}, "runner": runner}
    return write_yaml(tmp / f"{name}.yaml", cfg), tmp / "out"


@pytest.fixture(scope="module")
def launched(pg_server, project, tmp_path_factory):
    """Start the three checks' work at once (they then overlap on the worker): a UI-style run
    of the daily deployment (`prefect deployment run --watch`, still waiting), a run of the
    run_deployment flow, and an interval deployment made with deployments/deploy.py."""
    tmp = tmp_path_factory.mktemp("e2e-data")
    exe = str(Path(sys.executable).parent / "prefect")
    cases = {}
    for name, rows in (("manual", 1500), ("via", 900), ("interval", 1200)):
        (tmp / name).mkdir()
        cases[name] = _tiny_pipeline(tmp / name, f"e2e-{name}", rows, {"kind": "threads", "workers": 2})
        cases[name] += (rows,)
    watch = ("--watch", "--watch-interval", "1", "--watch-timeout", "400")
    procs = {
        "manual": [exe, "deployment", "run", "run-pipeline/flights-clean-daily",
                   "--param", f'pipeline_path="{cases["manual"][0]}"', "--param", 'run_key="manual-1"', *watch],
        "via": [exe, "deployment", "run", "pipeline-via-deployment/flights-clean-via-deployment",
                "--param", f'pipeline_path="{cases["via"][0]}"', "--param", 'run_key="via-1"', *watch],
        "interval": [sys.executable, "deployments/deploy.py", "pipeline", "e2e-interval",
                     "--path", str(cases["interval"][0]), "--interval", "5",
                     "--run-key-format", INTERVAL_FORMAT],
    }
    started = {k: subprocess.Popen(cmd, cwd=project, env=_env(pg_server, project), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
               for k, cmd in procs.items()}
    yield {k: (started[k], *cases[k]) for k in procs}
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


INTERVAL_FORMAT = "%Y%m%dT%H%M%S"


def _finished(proc: subprocess.Popen, project: Path, timeout: float = 420) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{proc.args}:\n{out}\nworker:\n" + (project / "worker.log").read_text()[-3000:]
    return out


def _run_id(out: str) -> str:
    m = re.search(r"UUID\('([0-9a-f-]{36})'\)|\b([0-9a-f]{8}-[0-9a-f-]{27})\b", out)
    assert m, out
    return m.group(1) or m.group(2)


def test_deployments_as_code_match_prefect_yaml(project):
    code, yaml_ = PROJECT_DEPLOYMENTS["code"], PROJECT_DEPLOYMENTS["yaml"]
    assert sorted(yaml_) == sorted(code)
    assert {"pipeline-via-deployment/flights-clean-via-deployment", "run-pipeline/flights-clean-daily",
            "run-pipeline/flights-clean-from-block"} <= set(yaml_)
    for name in yaml_:
        assert yaml_[name] == code[name], name
    assert yaml_["run-pipeline/flights-clean-daily"]["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}]


def test_prefect_deploy_all_and_a_run_triggered_like_the_ui(pg_server, project, launched):
    with _client(pg_server) as client:
        dep = client.read_deployment_by_name("run-pipeline/flights-clean-daily")
    schema = dep.parameter_openapi_schema["properties"]
    # what prefect.yaml asked for: a cron schedule, one run at a time, the process pool, a form
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"] and dep.schedules[0].active
    assert dep.global_concurrency_limit.limit == 1 and dep.work_pool_name == POOL
    assert dep.concurrency_options.collision_strategy == "ENQUEUE"
    assert dep.parameters["pipeline_path"] == "examples/flights/pipeline.yaml"
    for p in ("pipeline_path", "pipeline_block", "run_key", "run_key_format", "restart"):
        assert schema[p].get("description"), p
    assert schema["restart"]["type"] == "boolean"

    proc, _path, out, rows = launched["manual"]
    run_id = _run_id(_finished(proc, project))
    with _client(pg_server) as client:
        run = client.read_flow_run(run_id)
    assert run.state.is_completed(), run.state
    assert run.deployment_id == dep.id and run.work_pool_name == POOL
    assert_exactly_once(str(out / "manual-1"), reference(flights(rows)))


def test_a_user_flow_runs_a_pipeline_deployment_with_run_deployment(pg_server, project, launched):
    """flows/run_deployment_flow.py, deployed by prefect.yaml: its run triggers the pipeline
    deployment, waits for it, and the pipeline's run is linked to it as its child."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    proc, _path, out, rows = launched["via"]
    parent_id = _run_id(_finished(proc, project))
    with _client(pg_server) as client:
        parent = client.read_flow_run(parent_id)
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        pipeline_dep = client.read_deployment_by_name("run-pipeline/flights-clean-daily")
    assert parent.state.is_completed(), parent.state
    deployed = [c for c in children if c.deployment_id == pipeline_dep.id]
    assert len(deployed) == 1 and deployed[0].state.is_completed()
    assert deployed[0].parameters["run_key"] == "via-1"
    assert_exactly_once(str(out / "via-1"), reference(flights(rows)))


def test_interval_schedule_produces_a_scheduled_run_that_completes(pg_server, project, launched):
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    proc, _path, out, rows = launched["interval"]
    _finished(proc, project, timeout=120)
    deadline = time.time() + 300
    done = None
    with _client(pg_server) as client:
        dep = client.read_deployment_by_name("run-pipeline/e2e-interval")
        assert dep.global_concurrency_limit.limit == 1
        assert dep.schedules[0].schedule.interval.total_seconds() == 5
        dep_filter = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        while time.time() < deadline and done is None:
            runs = client.read_flow_runs(deployment_filter=dep_filter)
            failed = [f for f in runs if f.state and f.state.is_final() and not f.state.is_completed()]
            assert not failed, (failed[0].state, (project / "worker.log").read_text()[-3000:])
            done = next((f for f in runs if f.auto_scheduled and f.state and f.state.is_completed()), None)
            time.sleep(1)
        # stop the schedule and drop the runs it queued, so nothing runs while the fixtures stop
        client.pause_deployment(dep.id)
        for f in client.read_flow_runs(
                deployment_filter=dep_filter,
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))):
            client.delete_flow_run(f.id)
    assert done is not None, (project / "worker.log").read_text()[-3000:]
    key = done.expected_start_time.strftime(INTERVAL_FORMAT)
    assert done.parameters.get("run_key") is None  # the key came from the scheduled time
    assert_exactly_once(str(out / key), reference(flights(rows)))
