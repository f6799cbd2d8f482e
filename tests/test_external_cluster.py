"""Shards on an existing Dask cluster (``runner.address``) started by the ``dask`` commands.

The scheduler and each worker are separate processes started as a user would start them
(``dask scheduler``; ``dask worker ADDRESS --preload dpipeline_prefect._preload`` with
PREFECT_API_URL and PYTHONPATH in the environment; see docs/operations.md). Each is in its own
session, so a test can SIGKILL one worker's process group (nanny and worker process), as
``kill -9`` or a lost machine would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import distributed
import pytest

from dpipeline_prefect.devservices import free_port

from .pipeline_helpers import (
    assert_exactly_once,
    flights,
    load_summary,
    reference,
    run_cli,
    write_parquet_files,
    write_yaml,
)

pytestmark = [pytest.mark.prefect]

DASK = str(Path(sys.executable).parent / "dask")


class DaskProcesses:
    """A ``dask scheduler`` process and ``dask worker`` processes, each in its own session."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}
        self.address = ""

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.folder, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()

    def start_scheduler(self) -> str:
        port = free_port()
        self._spawn("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--dashboard-address", "127.0.0.1:0"], dict(os.environ))
        self.address = f"tcp://127.0.0.1:{port}"
        return self.address

    def start_worker(self, name: str, env: dict[str, str | None] | None = None,
                     preload: str = "dpipeline_prefect._preload") -> subprocess.Popen:
        """The documented way: one worker process, the library preloaded, the flow's
        PREFECT_API_URL and PYTHONPATH inherited (``env`` overrides; None removes a variable)."""
        full = dict(os.environ)
        # the workers run in a scratch folder: the user's code (here the tests' transforms)
        # must be importable there, as docs/operations.md tells users to arrange
        here = str(Path(__file__).resolve().parent.parent)
        full["PYTHONPATH"] = os.pathsep.join(p for p in (here, full.get("PYTHONPATH")) if p)
        for k, v in (env or {}).items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        return self._spawn(name, [DASK, "worker", self.address, "--name", name, "--nworkers", "1",
                                  "--nthreads", "1", "--no-dashboard", "--preload", preload,
                                  "--local-directory", str(self.folder / f"{name}-space")], full)

    def wait_for(self, client: distributed.Client, names: set[str], timeout: float = 120) -> dict[str, str]:
        """Wait until the scheduler has exactly the workers ``names``; return name -> address."""
        deadline = time.monotonic() + timeout
        while True:
            info = client.scheduler_info(n_workers=-1)["workers"]
            by_name = {str(i["name"]): addr for addr, i in info.items()}
            if set(by_name) == names:
                return by_name
            for n in names:
                p = self.procs[n]
                assert p.poll() is None, f"dask worker {n} exited {p.returncode}:\n{self.log(n)}"
            assert time.monotonic() < deadline, f"workers {sorted(names)} not up: have {sorted(by_name)}"
            time.sleep(0.3)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for name in [n for n in self.procs if n != "scheduler"] + ["scheduler"]:
            if name in self.procs:
                self.kill(name, signal.SIGTERM)


@pytest.fixture
def dask_procs(tmp_path, prefect_server):
    procs = DaskProcesses(tmp_path)
    procs.start_scheduler()
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = flights(40_000)
    folder = tmp_path_factory.mktemp("external") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=2000)
    return folder, df


def _pipeline(tmp_path: Path, src: Path, address: str, transform: str) -> Path:
    cfg = {
        "name": "ext-" + uuid.uuid4().hex[:6],
        "source": {"path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 2000},
        "transforms": [transform],
        "sink": {"path": str(tmp_path / "out")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "dask", "address": address},
    }
    return write_yaml(tmp_path / "p.yaml", cfg)


def _markers(folder: Path) -> dict[int, int]:
    """Batches started per worker process id (see tests/slow_transforms.py)."""
    counts: dict[int, int] = {}
    for f in folder.iterdir():
        pid = int(f.name.split("-")[0])
        counts[pid] = counts.get(pid, 0) + 1
    return counts


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_gives_the_exact_output(tmp_path, data, dask_procs):
    src, df = data
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {"DPIPELINE_TEST_MARKERS": str(markers), "DPIPELINE_TEST_PAUSE_S": "0.4"}
    for name in ("w1", "w2"):
        dask_procs.start_worker(name, env=env)
    with distributed.Client(dask_procs.address, set_as_default=False) as client:
        names = dask_procs.wait_for(client, {"w1", "w2"})
        pids = client.run(os.getpid)  # worker address -> pid of its worker process
    pid = {n: pids[a] for n, a in names.items()}

    p = _pipeline(tmp_path, src, dask_procs.address, "tests.slow_transforms:slow_clean")
    run = subprocess.Popen(
        [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(p), "--run-key", "k",
         "--summary-json", str(tmp_path / "s.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # wait until both workers are inside shards and w1 has checkpointed part of its shard
        deadline = time.monotonic() + 180
        while True:
            seen = _markers(markers)
            if seen.get(pid["w1"], 0) >= 2 and seen.get(pid["w2"], 0) >= 1:
                break
            assert run.poll() is None, f"the run ended before the kill: {run.communicate()}"
            assert time.monotonic() < deadline, f"shards did not start on both workers: {seen}"
            time.sleep(0.1)
        assert run.poll() is None
        dask_procs.kill("w1")  # SIGKILL the nanny and its worker process
        w1_batches = _markers(markers).get(pid["w1"], 0)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    assert run.returncode == 0, stdout + stderr
    s = load_summary(tmp_path / "s.json")
    assert s["status"] == "completed" and s["shards_total"] == 4
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    after = _markers(markers)
    assert after.get(pid["w1"], 0) == w1_batches  # w1 really died mid-run...
    # ...and w2 did the rest: every batch ran at least once, some of w1's shard again
    assert after[pid["w2"]] + w1_batches >= 20


def test_misconfigured_workers_are_refused_naming_each_worker_and_what_is_missing(
        tmp_path, data, dask_procs, prefect_server):
    src, _ = data
    other = "http://127.0.0.1:9/api"
    dask_procs.start_worker("good")
    dask_procs.start_worker("other-url", env={"PREFECT_API_URL": other})
    dask_procs.start_worker("no-url", env={"PREFECT_API_URL": None})
    # A worker whose Python lacks the library: the venv has it installed, so hide it the
    # way a missing package fails (ImportError) before the worker's preload runs.
    dask_procs.start_worker("no-library", preload="import sys; sys.modules['dpipeline_prefect'] = None")
    with distributed.Client(dask_procs.address, set_as_default=False) as client:
        names = dask_procs.wait_for(client, {"good", "other-url", "no-url", "no-library"})

    p = _pipeline(tmp_path, src, dask_procs.address, "dpipeline_prefect.examples.flights:clean")
    r = run_cli("run", str(p), "--run-key", "k")
    assert r.returncode == 1, r.stdout + r.stderr
    msg = r.stderr
    assert msg.lstrip().startswith("error:"), msg  # the check runs before the run starts
    assert f"Dask workers at {dask_procs.address} cannot run this flow's tasks" in msg
    lines = {n: [ln for ln in msg.splitlines() if names[n] in ln] for n in names}
    assert lines["good"] == []  # the healthy worker is not blamed
    assert any(f"PREFECT_API_URL={other}" in ln and prefect_server.api_url in ln
               for ln in lines["other-url"]), msg
    assert any("PREFECT_API_URL=(unset)" in ln and prefect_server.api_url in ln
               for ln in lines["no-url"]), msg
    assert any("cannot import dpipeline_prefect" in ln for ln in lines["no-library"]), msg
    assert "Traceback" not in msg
    # checked before anything was planned or written
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("*manifest*"))
