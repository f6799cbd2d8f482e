"""SIGKILL the `dpipeline run` process (and its Dask workers) at many moments; re-run; compare.

Kill points are named crash points (``faults.py``): the whole process group gets SIGKILL at
that instant, exactly as ``kill -9`` would do it, but at a moment we choose. A second test
kills from outside at random times.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid

import pytest

from .pipeline_helpers import assert_exactly_once, flights, load_summary, reference, run_cli, write_parquet_files, write_yaml

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = flights(60_000)
    folder = tmp_path_factory.mktemp("kill") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=2500)
    return folder, df


def _pipeline(tmp_path, src, strategy: dict, runner: str = "dask") -> tuple:
    cfg = {
        "name": "kill-" + uuid.uuid4().hex[:6],
        "source": {"path": str(src)},
        "sharding": strategy,
        "batching": {"rows": 3000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"path": str(tmp_path / "out" / "{run_key}"), "partition_by": ["origin"]},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": runner, "workers": 2},
    }
    return write_yaml(tmp_path / "p.yaml", cfg), tmp_path / "out" / "k"


def _crash(p, point: str) -> None:
    r = run_cli("run", str(p), "--run-key", "k", env={"DPIPELINE_CRASHPOINT": point})
    assert r.returncode == -signal.SIGKILL, (
        f"expected the run to be killed at {point}, got exit {r.returncode}\n{r.stdout}\n{r.stderr}")


def test_sigkill_at_every_stage_then_resume_gives_exact_output(tmp_path, data):
    src, df = data
    p, out = _pipeline(tmp_path, src, {"strategy": "hash", "key": "carrier", "shards": 4})
    # one run killed at each stage, each resuming the previous one's state
    for point in ("planned", "shuffle", "before_write:3", "after_checkpoint", "after_write:2"):
        _crash(p, point)
    r = run_cli("run", str(p), "--run-key", "k", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = load_summary(tmp_path / "s.json")
    assert s["status"] == "completed"
    assert s["batches_reprocessed"] >= 1  # the after_write kill left a written, unrecorded batch
    assert s["shards_skipped"] >= 1  # the after_checkpoint kill let at least one shard finish
    assert_exactly_once(str(out), reference(df))
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]


def test_sigkill_while_finalizing_then_resume(tmp_path, data):
    src, df = data
    p, out = _pipeline(tmp_path, src, {"strategy": "files"}, runner="threads")
    _crash(p, "finalize")
    r = run_cli("run", str(p), "--run-key", "k", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = load_summary(tmp_path / "s.json")
    assert s["status"] == "completed" and s["shards_skipped"] == s["shards_total"] == 4
    assert_exactly_once(str(out), reference(df))


def test_sigkill_at_random_moments(tmp_path, data):
    """Kill from outside after a random delay, three times, then let it finish."""
    src, df = data
    p, out = _pipeline(tmp_path, src, {"strategy": "time", "key": "time_hour", "every": "1D"})
    rng = random.Random(20261129)
    killed = 0
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(p), "--run-key", "k"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(4.0, 12.0))
        if proc.poll() is None:
            import os

            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
    assert killed >= 1
    r = run_cli("run", str(p), "--run-key", "k", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert load_summary(tmp_path / "s.json")["status"] in ("completed", "already_complete")
    assert_exactly_once(str(out), reference(df))
