"""Fixtures and helpers of the chaos suite: real data, a slow transform, run control, figures.

Each chaos test compares the final output with the pandas reference row for row and records
its figures (runs, kills or outages, rows expected / found, duplicates, rows lost, batches redone)
as one JSON line in the file named by ``DPIPELINE_CHAOS_RECORD`` (when set), from which
``tests/chaos/report.py`` writes RELIABILITY.md. Without the variable nothing is recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..pipeline_helpers import assert_exactly_once, flights, read_output, reference, write_parquet_files, write_yaml

ROWS = 40_000
BATCH = 2000

# A transform module written next to each pipeline YAML (the pipeline's folder is importable in
# the run and in its Dask workers). It sleeps a little per batch so shards last long enough to
# be hit mid-way, and appends one line per batch it starts to a log, which counts batches that
# were transformed more than once (redone after a kill).
SLOW_TRANSFORM = '''
import os, time
from dpipeline_prefect.examples.flights import clean

def slow_clean(df):
    # logged before the work, so a batch cut short by a kill counts as redone when rerun
    log = os.environ.get("CHAOS_BATCH_LOG")
    if log and len(df):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{int(df['row_id'].min())}:{len(df)}\\n".encode())
        finally:
            os.close(fd)
    time.sleep(float(os.environ.get("CHAOS_SLEEP_S", "0.3")))
    return clean(df)
'''


@pytest.fixture(scope="session")
def chaos_data(tmp_path_factory):
    """40k real flights rows in 4 Parquet files (row groups of one batch), and the reference."""
    df = flights(ROWS)
    folder = tmp_path_factory.mktemp("chaos") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=BATCH)
    return folder, reference(df)


class Chaos:
    """One chaos case's pipeline folder, run helpers and figures."""

    def __init__(self, tmp_path: Path, src: Path, case: str) -> None:
        self.dir = tmp_path
        self.src = src
        self.case = case
        self.batch_log = tmp_path / "batches.log"
        (tmp_path / "chaos_slow.py").write_text(SLOW_TRANSFORM)
        self.env = {"CHAOS_BATCH_LOG": str(self.batch_log)}
        self.figures: dict = {"case": case, "runs": 0}

    def pipeline(self, name: str, **over) -> Path:
        """Write the pipeline YAML (local checkpoints and sink unless overridden)."""
        cfg = {
            "name": name,
            "source": {"format": "parquet", "path": str(self.src)},
            "sharding": {"strategy": "hash", "key": "carrier", "shards": 4},
            "batching": {"rows": BATCH},
            "transforms": ["chaos_slow:slow_clean"],
            "sink": {"format": "parquet", "path": str(self.dir / "out" / "{run_key}")},
            "checkpoint": {"path": str(self.dir / "ckpt")},
            "runner": {"kind": "dask", "workers": 2},
        }
        cfg.update(over)
        return write_yaml(self.dir / f"{name}.yaml", cfg)

    def start(self, yaml_path: Path, run_key: str, env: dict | None = None,
              summary: Path | None = None) -> subprocess.Popen:
        """Start ``dpipeline run`` in its own session (so a group kill hits only this run)."""
        args = [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(yaml_path), "--run-key", run_key]
        if summary is not None:
            args += ["--summary-json", str(summary)]
        self.figures["runs"] += 1
        return subprocess.Popen(
            args, env={**os.environ, **self.env, **(env or {})}, cwd=self.dir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def batches_logged(self) -> list[str]:
        return self.batch_log.read_text().split() if self.batch_log.exists() else []

    def wait_batches(self, proc: subprocess.Popen, n: int, timeout: float = 120) -> bool:
        """Wait until at least n batch lines are logged (False if the run ended first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.batches_logged()) >= n:
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} batches after {timeout} s")

    def batches_redone(self) -> int:
        lines = self.batches_logged()
        return len(lines) - len(set(lines))

    def check(self, out: str, want, storage_options: dict | None = None, redone_before: int = 0,
              **extra) -> None:
        """Record the figures of the final output, then assert it is exactly the reference.

        Args:
            out: The sink folder of the run.
            want: The pandas reference.
            storage_options: Of the sink, if remote.
            redone_before: Batches redone in earlier rounds (other batch logs).
            **extra: More figures to record.
        """
        got = read_output(out, storage_options)
        ids = got["row_id"]
        self.figures.update(
            rows_expected=int(len(want)), rows_found=int(len(got)),
            duplicates=int(ids.duplicated().sum()),
            rows_lost=int(len(set(want["row_id"]) - set(ids))),
            batches_redone=self.batches_redone() + redone_before, **extra)
        record(self.figures)
        assert_exactly_once(out, want, storage_options)


def record(figures: dict) -> None:
    """Append one JSON line of figures to $DPIPELINE_CHAOS_RECORD (if set)."""
    path = os.environ.get("DPIPELINE_CHAOS_RECORD")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({**figures, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (the run and its Dask workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def chaos(request, tmp_path, chaos_data):
    """A :class:`Chaos` for this test, named after it; kills whatever run it left behind."""
    c = Chaos(tmp_path, chaos_data[0], request.node.name)
    c.want = chaos_data[1]
    procs: list[subprocess.Popen] = []
    orig = c.start

    def start(*a, **k):
        p = orig(*a, **k)
        procs.append(p)
        return p

    c.start = start
    yield c
    for p in procs:
        if p.poll() is None:
            kill_group(p)
            p.wait()
