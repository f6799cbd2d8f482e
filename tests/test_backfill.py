"""`dpipeline backfill`: one run per run key in a date range, skipping keys already complete.

Both paths are tested end to end on the session's real Prefect server: runs in the backfill
process (one Dask cluster of worker processes for all keys), and runs created through a
deployment that a `flow.serve(...)` process executes, the way a work pool's worker would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from dpipeline_prefect.backfill import backfill, parse_every, parse_when, run_keys
from dpipeline_prefect.errors import ConfigError

from .pipeline_helpers import assert_exactly_once, flights, reference, run_cli, write_parquet_files, write_yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = flights(20_000)
    folder = tmp_path_factory.mktemp("backfill") / "in"
    write_parquet_files(df, folder, files=2, row_group_size=2500)
    return folder, df


def _pipeline(tmp_path: Path, src: Path, runner: dict) -> Path:
    cfg = {
        "name": "bf-" + uuid.uuid4().hex[:6],
        "source": {"path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 5000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": runner,
    }
    return write_yaml(tmp_path / "p.yaml", cfg)


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(f): f.stat().st_mtime_ns for f in folder.rglob("*.parquet")}


# ------------------------------------------------------------------------------ key ranges


def test_run_keys_match_the_scheduled_flows_format():
    d = parse_when("2026-11-01", "--from")
    assert d == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert run_keys(d, parse_when("2026-11-03", "--to"), parse_every("1D")) == [
        "2026-11-01", "2026-11-02", "2026-11-03"]
    # the same format as flows/pipeline_flow.py gives a run scheduled at midnight
    assert datetime(2026, 11, 2, tzinfo=timezone.utc).strftime("%Y-%m-%d") == "2026-11-02"
    assert run_keys(d, parse_when("2026-11-15", "--to"), parse_every("1W")) == [
        "2026-11-01", "2026-11-08", "2026-11-15"]
    assert run_keys(d, parse_when("2026-11-01T12:00", "--to"), parse_every("6H")) == [
        "2026-11-01T00:00", "2026-11-01T06:00", "2026-11-01T12:00"]
    assert parse_every("30min") == parse_every("30M") == timedelta(minutes=30)
    # a deployment's run_key_format
    assert run_keys(d, parse_when("2026-11-02", "--to"), parse_every("1D"), "%Y%m%d") == [
        "20261101", "20261102"]
    # a time zone in the bounds is converted to UTC
    assert run_keys(parse_when("2026-11-01T01:00+01:00", "--from"),
                    parse_when("2026-11-02T00:00Z", "--to"), parse_every("1D")) == [
        "2026-11-01", "2026-11-02"]


@pytest.mark.parametrize("call, field, text", [
    (lambda: parse_every("1X"), "every", "'1X' is not an interval"),
    (lambda: parse_every("0D"), "every", "'0D' is not an interval"),
    (lambda: parse_when("Nov 1", "--from"), "from", "--from 'Nov 1' is not a date"),
    (lambda: run_keys(datetime(2026, 11, 2), datetime(2026, 11, 1), timedelta(days=1)), "to",
     "is before --from"),
    (lambda: run_keys(datetime(2020, 1, 1), datetime(2026, 1, 1), timedelta(minutes=1)), "every",
     "run keys (more than 10,000)"),
    (lambda: run_keys(datetime(2026, 11, 1), datetime(2026, 11, 2), timedelta(hours=6), "%Y-%m-%d"),
     "run_key_format", "gives several points of the range the same key"),
    (lambda: run_keys(datetime(2026, 11, 1), datetime(2026, 11, 2), timedelta(days=1), "%Y/%m/%d"),
     "run_key", "is not allowed"),
])
def test_bad_ranges_are_one_clear_error(call, field, text):
    with pytest.raises(ConfigError) as info:
        call()
    assert info.value.field == field and text in str(info.value)


def test_cli_bad_range_exits_non_zero_with_one_line(tmp_path, data):
    p = _pipeline(tmp_path, data[0], {"kind": "threads"})
    r = run_cli("backfill", str(p), "--from", "2026-11-03", "--to", "2026-11-01")
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and "is before --from" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ in process


@pytest.mark.prefect
@pytest.mark.slow
def test_local_backfill_skips_the_completed_key_and_writes_each_key_once(tmp_path, data):
    src, df = data
    p = _pipeline(tmp_path, src, {"kind": "dask", "workers": 2})
    out = tmp_path / "out"
    r = run_cli("run", str(p), "--run-key", "2026-11-02")
    assert r.returncode == 0, r.stderr
    before = _mtimes(out / "2026-11-02")
    assert before

    r = run_cli("backfill", str(p), "--from", "2026-11-01", "--to", "2026-11-03", "--every", "1D",
                "--summary-json", str(tmp_path / "bf.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    items = {i["run_key"]: i for i in json.loads((tmp_path / "bf.json").read_text())}
    assert list(items) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert items["2026-11-02"]["action"] == "skipped"
    assert items["2026-11-02"]["status"] == "already_complete"
    want = reference(df)
    for k in ("2026-11-01", "2026-11-03"):
        assert items[k]["action"] == "ran" and items[k]["status"] == "completed", items[k]
        assert items[k]["rows_out"] == len(want)
    for k in items:
        assert_exactly_once(str(out / k), want)
    assert _mtimes(out / "2026-11-02") == before  # the skipped key was not rewritten
    assert "2026-11-02" in r.stdout and "skipped" in r.stdout  # the table

    # each key was its own flow run on the server, tagged like any run of this pipeline
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from dpipeline_prefect.alerts import pipeline_tag
    from dpipeline_prefect.config import load_config

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[pipeline_tag(load_config(p).name)])))
    assert sorted(fr.parameters["run_key"] for fr in runs) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert {str(fr.id) for fr in runs} >= {items[k]["flow_run"] for k in ("2026-11-01", "2026-11-03")}

    # every key complete now: a second backfill runs nothing
    again = backfill(p, "2026-11-01", "2026-11-03", "1D")
    assert [(i.action, i.status) for i in again] == [("skipped", "already_complete")] * 3


@pytest.mark.prefect
def test_failing_keys_are_listed_and_the_backfill_exits_non_zero(tmp_path):
    (tmp_path / "bad").mkdir()
    bad = _pipeline(tmp_path / "bad", tmp_path / "no-such-folder", {"kind": "threads"})
    r = run_cli("backfill", str(bad), "--from", "2026-11-01", "--to", "2026-11-02",
                "--summary-json", str(tmp_path / "bad.json"))
    assert r.returncode == 1, r.stdout + r.stderr
    items = json.loads((tmp_path / "bad.json").read_text())
    assert [(i["run_key"], i["status"]) for i in items] == [
        ("2026-11-01", "failed"), ("2026-11-02", "failed")]  # the first failure did not stop it
    assert all("no-such-folder" in i["error"] for i in items), items
    assert "2 failed" in r.stdout


# ------------------------------------------------------------------------------ deployment

_SERVE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from flows.pipeline_flow import run_pipeline_flow

    if __name__ == "__main__":
        run_pipeline_flow.serve(name=sys.argv[2], limit=2, print_starting_message=False,
                                parameters={"run_key_format": "%Y%m%d"})
    """
)


@pytest.fixture
def served_deployment(tmp_path, prefect_server):
    """``run-pipeline`` (flows/pipeline_flow.py) deployed by ``flow.serve`` in its own process (a long-lived runner
    that polls the server and runs each flow run in a subprocess); stopped after the test."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = "backfill-" + uuid.uuid4().hex[:6]
    script = tmp_path / "serve.py"
    script.write_text(_SERVE)
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}  # default 10 s
    proc = subprocess.Popen([sys.executable, str(script), str(REPO), name], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name(f"run-pipeline/{name}")
                    break
                except ObjectNotFound:
                    assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                    assert time.monotonic() < deadline, "the served deployment did not appear"
                    time.sleep(0.5)
        yield f"run-pipeline/{name}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.mark.prefect
@pytest.mark.slow
def test_backfill_through_a_deployment(tmp_path, data, served_deployment):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    src, df = data
    p = _pipeline(tmp_path, src, {"kind": "threads", "workers": 2})
    out = tmp_path / "out"
    r = run_cli("run", str(p), "--run-key", "20261101")  # pre-complete the first key
    assert r.returncode == 0, r.stderr

    r = run_cli("backfill", str(p), "--from", "2026-11-01", "--to", "2026-11-03",
                "--deployment", served_deployment, "--summary-json", str(tmp_path / "bf.json"))
    assert r.returncode == 0, r.stdout + r.stderr + (tmp_path / "serve.log").read_text()
    items = {i["run_key"]: i for i in json.loads((tmp_path / "bf.json").read_text())}
    # keys in the deployment's run_key_format, the one its scheduled runs use
    assert list(items) == ["20261101", "20261102", "20261103"]
    assert items["20261101"]["action"] == "skipped"
    ran = [items["20261102"], items["20261103"]]
    assert [(i["action"], i["status"]) for i in ran] == [("ran", "completed")] * 2, ran
    want = reference(df)
    for k in items:
        assert_exactly_once(str(out / k), want)

    # the runs are the deployment's flow runs, each with its run key as a parameter
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(served_deployment)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=["backfill"])))
    mine = [fr for fr in runs if fr.deployment_id == dep.id]
    assert sorted(fr.parameters["run_key"] for fr in mine) == ["20261102", "20261103"]
    assert {str(fr.id) for fr in mine} == {i["flow_run"] for i in ran}
    assert all(fr.state.is_completed() for fr in mine)
    assert all(fr.parameters["pipeline_path"] == str(p.resolve()) for fr in mine)


@pytest.mark.prefect
def test_a_deployment_of_another_pipeline_or_without_run_key_is_refused(tmp_path, data, prefect_server):
    from prefect import flow

    from flows.pipeline_flow import run_pipeline_flow

    src, _ = data
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mine = _pipeline(tmp_path / "a", src, {"kind": "threads"})
    other = _pipeline(tmp_path / "b", src, {"kind": "threads"})
    name = "other-" + uuid.uuid4().hex[:6]
    run_pipeline_flow.to_deployment(name=name, parameters={"pipeline_path": str(other)}).apply()
    with pytest.raises(ConfigError) as info:
        backfill(mine, "2026-11-01", "2026-11-02", "1D", deployment=f"run-pipeline/{name}")
    assert info.value.field == "deployment"
    assert f"runs pipeline {yaml.safe_load(other.read_text())['name']!r}" in str(info.value)

    @flow(name="no-run-key")
    def no_run_key(pipeline_path: str) -> None: ...

    no_run_key.to_deployment(name=name).apply()
    with pytest.raises(ConfigError, match="takes no run_key parameter"):
        backfill(mine, "2026-11-01", "2026-11-02", "1D", deployment=f"no-run-key/{name}")
    with pytest.raises(ConfigError, match="no such deployment"):
        backfill(mine, "2026-11-01", "2026-11-02", "1D", deployment=f"run-pipeline/nope-{name}")
