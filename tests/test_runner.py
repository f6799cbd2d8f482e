"""FastDaskTaskRunner against a real Prefect server and real Dask worker processes.

What must hold: every task is still a real Prefect task run (name, state, retries, logs,
tags, flow run it belongs to), results and exceptions come back, ``wait_for`` and Prefect's
future helpers work, the context is serialized once per flow run and hydrated once per
worker, and an existing cluster whose workers are set up differently is refused with a
clear error. The embedded-server case runs in a subprocess with its own environment.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import distributed
import pytest
from prefect import flow, get_run_logger, tags, task
from prefect.futures import as_completed, wait
from prefect.runtime import flow_run as runtime_flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from dpipeline_prefect import runner as runner_mod
from dpipeline_prefect.config import RunnerConfig
from dpipeline_prefect.errors import ConfigError
from dpipeline_prefect.runner import (
    FastDaskTaskRunner,
    check_workers,
    make_task_runner,
    worker_cache_stats,
)

# ----------------------------------------------------------------------------- helpers


def _poll(fn, timeout: float = 30.0, interval: float = 0.5):
    """Call ``fn`` until it returns something truthy (the server ingests events async)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _task_runs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def _cluster(**kwargs) -> distributed.LocalCluster:
    opts = dict(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": ":0"},  # keep off the fixed port 8787
        silence_logs=logging.WARNING,
    )
    opts.update(kwargs)
    return distributed.LocalCluster(**opts)


@pytest.fixture(scope="module")
def cluster(prefect_server):
    """One LocalCluster of 2 worker processes shared by this module's tests (by address)."""
    with _cluster() as c:
        yield c


@pytest.fixture
def fast(cluster):
    return FastDaskTaskRunner(address=cluster.scheduler_address)


# ------------------------------------------------------------------------------- tasks


@task(task_run_name="square-{x}")
def square(x: int) -> int:
    return x * x


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def whoami() -> dict:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return {
        "pid": os.getpid(),
        "runtime_flow_run_id": str(runtime_flow_run.id),
        "task_flow_run_id": str(ctx.task_run.flow_run_id),
    }


@task(retries=1, retry_delay_seconds=0)
def always_fails(marker: str, attempts_file: str) -> None:
    with open(attempts_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise ValueError(f"boom {marker}")


@task
def log_something(marker: str) -> str:
    # WARNING: the test session sets PREFECT_LOGGING_LEVEL=WARNING
    get_run_logger().warning("marker %s", marker)
    return marker


@task
def write_file(path: str) -> None:
    time.sleep(0.5)
    Path(path).write_text("written")


@task
def read_file(path: str) -> str:
    return Path(path).read_text() if os.path.exists(path) else "missing"


@task
async def async_double(x: int) -> int:
    return 2 * x


# ----------------------------------------------------------------------- no server needed


def test_make_task_runner_threads():
    r = make_task_runner(RunnerConfig(kind="threads", workers=3))
    assert isinstance(r, ThreadPoolTaskRunner)
    assert r._max_workers == 3
    default = make_task_runner(RunnerConfig(kind="threads"))
    assert default._max_workers == (os.cpu_count() or 1)


def test_make_task_runner_dask_local_and_address():
    r = make_task_runner(RunnerConfig(kind="dask", workers=3, threads_per_worker=2))
    assert type(r) is FastDaskTaskRunner
    assert r.address is None
    assert r.resolved_cluster_class is distributed.LocalCluster
    assert r.cluster_kwargs == {
        "n_workers": 3,
        "threads_per_worker": 2,
        "processes": True,
        "dashboard_address": None,
        "scheduler_kwargs": {"dashboard_address": ":0"},
        "silence_logs": logging.WARNING,
        "preload": ["dpipeline_prefect._preload"],
    }
    default = make_task_runner(RunnerConfig(kind="dask"))
    assert default.cluster_kwargs["n_workers"] == (os.cpu_count() or 1)

    remote = make_task_runner(RunnerConfig(kind="dask", address="tcp://10.0.0.1:8786"))
    assert type(remote) is FastDaskTaskRunner
    assert remote.address == "tcp://10.0.0.1:8786"
    assert remote.cluster_kwargs == {}
    # a cluster started early by the pipeline overrides the configured address
    early = make_task_runner(RunnerConfig(kind="dask"), address="tcp://127.0.0.1:1234")
    assert early.address == "tcp://127.0.0.1:1234" and early.cluster_kwargs == {}
    assert early.check_workers is False and early.duplicate().check_workers is False
    assert remote.check_workers is True and remote.duplicate().check_workers is True


def test_runner_pickles_and_duplicates():
    r = FastDaskTaskRunner(cluster_kwargs={"n_workers": 1})
    clone = pickle.loads(pickle.dumps(r))  # it travels to workers inside the Flow
    assert type(clone) is FastDaskTaskRunner and clone == r
    dup = r.duplicate()
    assert type(dup) is FastDaskTaskRunner and dup == r and dup is not r


# -------------------------------------------------------------------- against the server


@pytest.mark.prefect
def test_results_names_states_on_local_process_cluster(prefect_server):
    """Default path: a temporary LocalCluster of processes built from RunnerConfig."""

    @flow(task_runner=make_task_runner(RunnerConfig(kind="dask", workers=2)))
    def squares(n: int):
        futures = square.map(range(n))
        return str(runtime_flow_run.id), [f.result() for f in futures], os.getpid()

    flow_run_id, results, flow_pid = squares(8)
    assert results == [x * x for x in range(8)]

    def all_completed():
        runs = _task_runs(flow_run_id)
        return runs if len(runs) == 8 and all(r.state_name == "Completed" for r in runs) else None

    runs = _poll(all_completed)
    assert runs, f"8 Completed task runs expected on the server, got {_task_runs(flow_run_id)}"
    assert sorted(r.name for r in runs) == sorted(f"square-{x}" for x in range(8))


@pytest.mark.prefect
def test_tasks_run_in_worker_processes_and_future_helpers(fast, tmp_path):
    path = str(tmp_path / "gate.txt")

    @flow(task_runner=fast)
    def pipeline():
        w = write_file.submit(path)
        r = read_file.submit(path, wait_for=[w])  # must run after w finished
        s = square.submit(4)
        total = add.submit(s, 1)  # a future as a parameter
        ids = [whoami.submit() for _ in range(4)]
        doubled = async_double.submit(21)  # async tasks run through run_task_async
        done = list(as_completed([r, total, doubled, *ids]))
        wait(ids)
        pids = [f.result()["pid"] for f in ids]
        return r.result(), total.result(), doubled.result(), len(done), pids

    text, total, doubled, n_done, pids = pipeline()
    assert text == "written"
    assert total == 17
    assert doubled == 42
    assert n_done == 7
    assert os.getpid() not in pids  # ran in Dask worker processes, not in the flow process


@pytest.mark.prefect
def test_error_propagates_and_retries_apply(fast, tmp_path):
    marker = uuid.uuid4().hex
    attempts = tmp_path / "attempts.txt"

    @flow(task_runner=fast)
    def failing():
        fut = always_fails.submit(marker, str(attempts))
        try:
            fut.result()
        except ValueError as exc:
            return str(runtime_flow_run.id), str(exc), fut.state.name, str(fut.task_run_id)
        return str(runtime_flow_run.id), None, fut.state.name, str(fut.task_run_id)

    flow_run_id, message, state_name, task_run_id = failing()
    assert message == f"boom {marker}"
    assert state_name == "Failed"
    assert len(attempts.read_text().splitlines()) == 2  # retries=1: ran twice

    def failed_twice():
        runs = [r for r in _task_runs(flow_run_id) if str(r.id) == task_run_id]
        return runs if runs and runs[0].state_name == "Failed" and runs[0].run_count == 2 else None

    runs = _poll(failed_twice)
    assert runs, f"server did not record a Failed run with run_count 2: {_task_runs(flow_run_id)}"


@pytest.mark.prefect
def test_task_logs_reach_the_server(fast):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    marker = uuid.uuid4().hex

    @flow(task_runner=fast)
    def logs():
        fut = log_something.submit(marker)
        return str(runtime_flow_run.id), fut.result(), str(fut.task_run_id)

    flow_run_id, returned, task_run_id = logs()
    assert returned == marker

    def find():
        with get_client(sync_client=True) as client:
            found = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)]))
            )
        return [lg for lg in found if marker in lg.message]

    # the worker's log handler ships batches every couple of seconds
    hits = _poll(find, timeout=40)
    assert hits, "the task's log line never reached the server"
    assert str(hits[0].task_run_id) == task_run_id


@pytest.mark.prefect
def test_second_flow_run_gets_its_own_context(fast, monkeypatch):
    serializations = []
    real = runner_mod._serialize_shared

    def counting(sources):
        serializations.append(sources[1].id)  # the flow run it was made for
        return real(sources)

    monkeypatch.setattr(runner_mod, "_serialize_shared", counting)

    @flow(task_runner=fast)
    def twice():
        futures = [whoami.submit() for _ in range(6)]
        return str(runtime_flow_run.id), [f.result() for f in futures]

    first_id, first = twice()
    second_id, second = twice()
    assert first_id != second_id
    for expected, results in ((first_id, first), (second_id, second)):
        assert {r["runtime_flow_run_id"] for r in results} == {expected}
        assert {r["task_flow_run_id"] for r in results} == {expected}
    # serialized once per flow run, not once per task
    assert [str(i) for i in serializations] == [first_id, second_id]

    for flow_run_id in (first_id, second_id):
        runs = _poll(lambda: len(_task_runs(flow_run_id)) == 6)
        assert runs, f"flow run {flow_run_id} does not own its 6 task runs"


@pytest.mark.prefect
def test_shared_context_follows_the_current_context():
    """One runner instance across flow runs and settings changes never serves a stale context.

    (The flow engine duplicates the runner per flow run, so this is the cache's own guard.)
    """
    import cloudpickle
    from prefect.settings import PREFECT_TASK_DEFAULT_RETRIES, temporary_settings

    r = FastDaskTaskRunner(cluster_kwargs={"n_workers": 1})

    @flow
    def probe():
        first = r._shared_context()
        again = r._shared_context()
        with temporary_settings({PREFECT_TASK_DEFAULT_RETRIES: 7}):
            changed = r._shared_context()
        return str(runtime_flow_run.id), first, again, changed

    def flow_run_id_in(shared):
        return str(cloudpickle.loads(shared.flow.data)["flow_run_context"]["flow_run"]["id"])

    id1, first, again, changed = probe()
    id2, second, _, _ = probe()
    assert again is first  # cached within a flow run
    assert flow_run_id_in(first) == id1
    assert changed.settings.digest != first.settings.digest  # settings changed: re-serialized
    settings = cloudpickle.loads(changed.settings.data)["settings"]
    assert settings["tasks"]["default_retries"] == 7
    assert second is not first and flow_run_id_in(second) == id2


@pytest.mark.prefect
def test_tags_are_per_task(fast):
    tag = f"shard-{uuid.uuid4().hex[:8]}"

    @flow(task_runner=fast)
    def tagged():
        with tags(tag):
            a = square.submit(2)
        b = square.submit(3)
        ids = str(a.task_run_id), str(b.task_run_id)
        return str(runtime_flow_run.id), *ids, a.result(), b.result()

    flow_run_id, a_id, b_id, a, b = tagged()
    assert (a, b) == (4, 9)
    def both():
        runs = {str(r.id): r for r in _task_runs(flow_run_id)}
        return runs if len(runs) == 2 else None

    runs = _poll(both)
    assert runs, "the two task runs did not reach the server"
    assert tag in runs[a_id].tags
    assert tag not in runs[b_id].tags


@pytest.mark.prefect
def test_workers_hydrate_settings_once(cluster, fast):
    client = distributed.Client(cluster.scheduler_address, set_as_default=False)
    try:
        before = client.run(worker_cache_stats)

        @flow(task_runner=fast)
        def many():
            return [f.result() for f in square.map(range(20))]

        assert many() == [x * x for x in range(20)]
        after = client.run(worker_cache_stats)
    finally:
        client.close()
    delta = {
        k: sum(after[w][k] - before[w][k] for w in after)
        for k in ("tasks", "settings_hydrations", "flow_hydrations")
    }
    assert delta["tasks"] == 20
    # workers that ran tasks for an earlier test already hold these settings hydrated
    assert delta["settings_hydrations"] <= len(after)
    assert delta["flow_hydrations"] <= len(after)  # once per worker for this flow run


# ------------------------------------------------------------- existing-cluster start-up check


@pytest.mark.prefect
def test_existing_cluster_with_misconfigured_workers_is_refused(prefect_server):
    bad_url = "http://127.0.0.1:9/api"
    with _cluster(n_workers=1) as c:
        good = set(c.scheduler_info["workers"])
        # add two misconfigured workers to the same scheduler
        c.worker_spec["bad-url"] = {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "env": {"PREFECT_API_URL": bad_url},
                "dashboard": False,
                "silence_logs": logging.WARNING,
            },
        }
        c.worker_spec["no-package"] = {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "preload": ["import sys; sys.modules['dpipeline_prefect'] = None"],
                "dashboard": False,
                "silence_logs": logging.WARNING,
            },
        }
        c.sync(c._correct_state)
        with distributed.Client(c.scheduler_address, set_as_default=False) as client:
            client.wait_for_workers(3, timeout=60)
            with pytest.raises(ConfigError) as info:
                check_workers(client)
            names = {w: i["name"] for w, i in client.scheduler_info()["workers"].items()}

        message = str(info.value)
        by_name = {v: k for k, v in names.items()}
        assert by_name["bad-url"] in message and f"PREFECT_API_URL={bad_url}" in message
        assert prefect_server.api_url in message  # what the flow uses
        assert by_name["no-package"] in message and "cannot import dpipeline_prefect" in message
        assert not any(w in message for w in good)  # the healthy worker is not blamed
        assert info.value.field == "runner.address"

        # through the runner, the flow fails with the same error before any task runs
        @flow(task_runner=FastDaskTaskRunner(address=c.scheduler_address))
        def doomed():
            return square.submit(2).result()

        with pytest.raises(ConfigError, match="cannot run this flow's tasks"):
            doomed()


@pytest.mark.prefect
def test_existing_cluster_with_matching_workers_passes(cluster):
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        check_workers(client)  # no exception


# ------------------------------------------------------------------ embedded (ephemeral) server

_EPHEMERAL_SCRIPT = textwrap.dedent(
    """
    import json, logging, os, sys
    from prefect import flow, task
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings
    from dpipeline_prefect.runner import FastDaskTaskRunner

    @task(task_run_name="where-{i}")
    def where(i):
        server_mod = sys.modules.get("prefect.server.api.server")
        own = bool(server_mod and server_mod.SubprocessASGIServer._instances)
        url = str(get_current_settings().api.url)
        return {"pid": os.getpid(), "api_url": url, "own_server": own}

    if __name__ == "__main__":
        runner = FastDaskTaskRunner(cluster_kwargs=dict(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"}, silence_logs=logging.WARNING))

        @flow(task_runner=runner)
        def f():
            return str(flow_run.id), [x.result() for x in where.map(range(4))]

        flow_run_id, results = f()
        from prefect.server.api.server import SubprocessASGIServer
        server = SubprocessASGIServer._instances[None]
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        import time, uuid
        for _ in range(60):
            with get_client(sync_client=True) as c:
                runs = c.read_task_runs(flow_run_filter=FlowRunFilter(
                    id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
            if len([r for r in runs if r.state_name == "Completed"]) == 4:
                break
            time.sleep(0.5)
        print("RESULT " + json.dumps({
            "server_url": server.api_url, "flow_pid": os.getpid(), "results": results,
            "task_runs": sorted((r.name, r.state_name) for r in runs)}))
    """
)


@pytest.mark.slow
def test_ephemeral_server_url_reaches_workers(tmp_path):
    """No PREFECT_API_URL: workers must report to the flow's ephemeral server, not their own."""
    script = tmp_path / "ephemeral_flow.py"
    script.write_text(_EPHEMERAL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["server_url"].startswith("http://127.0.0.1:")
    assert {r["api_url"] for r in out["results"]} == {out["server_url"]}
    assert out["flow_pid"] not in {r["pid"] for r in out["results"]}
    assert out["task_runs"] == [[f"where-{i}", "Completed"] for i in range(4)]
    # workers did not start ephemeral servers of their own
    assert not any(r["own_server"] for r in out["results"])
    assert "database is locked" not in proc.stderr
