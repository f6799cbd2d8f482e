"""Live log level: raised to DEBUG while a run is in progress, debug lines start, without a restart.

A slow run (a transform that sleeps per batch) runs with the real CLI and two Dask worker
processes. Once some batches are written, the level is set to DEBUG through the Prefect
Variable; after the run, the run's logs on the Prefect server hold per-batch debug lines
from the workers, all logged after the change and none before it, although batches ran
before it.
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from dpipeline_prefect.loglevel import LOGGER, apply, get_level, parse_level, set_level, variable_name

from .pipeline_helpers import flights, load_summary, run_cli, write_parquet_files, write_yaml

SLOW = '''
import time

from dpipeline_prefect.examples.flights import clean


def slow_clean(df):
    time.sleep(0.25)
    return clean(df)
'''


def test_parse_and_apply():
    from dpipeline_prefect.errors import ConfigError

    assert parse_level("debug") == "DEBUG"
    with pytest.raises(ConfigError, match="DEBUG, INFO"):
        parse_level("loud")
    import logging

    lg = logging.getLogger(LOGGER)
    old = lg.level
    try:
        assert apply("ERROR") and lg.level == logging.ERROR
        assert not apply("ERROR") and not apply(None)
    finally:
        lg.setLevel(old)


def _logs(flow_run_id: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    out, offset = [], 0
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    limit=200, offset=offset, sort=LogSort.TIMESTAMP_ASC)
            out.extend(page)
            if len(page) < 200:
                return out
            offset += 200


@pytest.mark.prefect
@pytest.mark.slow
def test_level_raised_mid_run_emits_debug_lines_only_after(tmp_path: Path):
    src = tmp_path / "in"
    write_parquet_files(flights(12_000), src, files=2, row_group_size=500)
    mod = "slow_" + uuid.uuid4().hex[:8]
    (tmp_path / f"{mod}.py").write_text(SLOW)
    name = "loglevel-" + uuid.uuid4().hex[:8]
    p = write_yaml(tmp_path / "p.yaml", {
        "name": name,
        "source": {"format": "parquet", "path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 500},  # 12 batches per shard, 0.25 s each
        "transforms": [f"{mod}:slow_clean"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "dask", "workers": 2},
        "logging": {"poll_s": 0.5},
    })
    set_level(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(p), "--run-key", "r",
         "--summary-json", str(tmp_path / "s.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out = tmp_path / "out" / "r"
        deadline = time.time() + 240
        while len(list(out.rglob("*.parquet"))) < 4:  # batches are being written
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the run wrote nothing in time"
            time.sleep(0.1)
        written_before = len(list(out.rglob("*.parquet")))
        changed_at = dt.datetime.now(dt.timezone.utc)
        set_level(name, "DEBUG")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert written_before < 24, "the run finished before the change: nothing to compare"
    s = load_summary(tmp_path / "s.json")
    assert get_level(name) == "DEBUG"

    deadline = time.time() + 30
    while True:  # worker logs reach the server asynchronously
        logs = _logs(s["flow_run_id"])
        debug = [lg for lg in logs if lg.level == 10 and lg.name.startswith(LOGGER)]
        batch_lines = [lg for lg in debug if re.search(r"batch \d+ done:", lg.message)]
        if len(batch_lines) >= 24 - written_before - 4 or time.time() > deadline:
            break
        time.sleep(1)
    assert batch_lines, [(lg.name, lg.level, lg.message) for lg in logs]
    assert all(lg.timestamp >= changed_at for lg in debug), [
        (lg.timestamp, lg.message) for lg in debug if lg.timestamp < changed_at]
    assert all(lg.task_run_id for lg in batch_lines)  # logged in the shard tasks (workers)
    seqs = {int(re.search(r"batch (\d+) done:", lg.message).group(1)) for lg in batch_lines}
    assert min(seqs) > 0  # the first batches ran before the change, silently

    # the CLI sets and resets it (audited), and refuses a bad level naming the choices
    r = run_cli("loglevel", str(p), "info")
    assert r.returncode == 0, r.stderr
    assert variable_name(name) in r.stdout and get_level(name) == "INFO"
    r = run_cli("loglevel", str(p), "reset")
    assert r.returncode == 0, r.stderr
    assert get_level(name) is None
    r = run_cli("loglevel", str(p), "loud")
    assert r.returncode == 1 and "DEBUG, INFO" in r.stderr
