"""Artifacts and logs of a run, read back from the real Prefect server; no secret anywhere.

The run keeps its checkpoints (and so its metrics record) and its output on the real S3
(SeaweedFS) with the credentials given as ``${VAR}`` storage options; the test then reads every
event, artifact and log line of the flow run, and the metrics record, and looks for the key
and the secret in them.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from dpipeline_prefect import events
from dpipeline_prefect.artifacts import artifact_key
from dpipeline_prefect.metrics import load_runs
from dpipeline_prefect.pipeline import Pipeline

from .pipeline_helpers import flights, run_cli, write_parquet_files, write_yaml
from .test_events import POISON, read_events


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifacts") / "in"
    write_parquet_files(flights(4000), folder, files=2, row_group_size=500)
    return folder


def _s3_cfg(s3, src: Path, name: str) -> dict:
    opts = {"key": "${OBS_TEST_S3_KEY}", "secret": "${OBS_TEST_S3_SECRET}",
            "client_kwargs": {"endpoint_url": s3.endpoint_url}}
    return {
        "name": name,
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": 500},
        "transforms": ["tests.test_events:reject_some"],
        "sink": {"format": "parquet", "path": f"s3://out/{name}/{{run_key}}/", "storage_options": opts},
        "checkpoint": {"path": f"s3://ckpt/{name}/", "storage_options": opts},
        "runner": {"kind": "threads", "workers": 2},
        "dead_letter": {},
    }


def _read_artifacts(flow_run_id: str, until, timeout: float = 30.0) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))
        if until(arts) or time.time() > deadline:
            return arts
        time.sleep(0.5)


def _read_logs(flow_run_id: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])))


@pytest.mark.prefect
@pytest.mark.s3
def test_artifacts_logs_and_events_have_the_figures_and_no_secret(tmp_path, src, s3, monkeypatch):
    creds = s3.storage_options()
    monkeypatch.setenv("OBS_TEST_S3_KEY", creds["key"])
    monkeypatch.setenv("OBS_TEST_S3_SECRET", creds["secret"])
    secrets = [creds["key"], creds["secret"]]
    name = "art-" + uuid.uuid4().hex[:8]
    cfg = _s3_cfg(s3, src, name)
    summary = Pipeline(cfg).run(run_key="r1")
    assert summary["status"] == "completed" and summary["rows_dead_letter"] == len(POISON)
    fr = summary["flow_run_id"]
    assert summary["metrics_path"].startswith(f"s3://ckpt/{name}/{name}/r1/metrics/")

    keys = {artifact_key(name, w) for w in ("progress", "shards", "summary")}
    arts = _read_artifacts(fr, lambda a: {x.key for x in a} >= keys)
    by = {a.key: a for a in arts}
    assert set(by) >= keys, [a.key for a in arts]
    assert by[artifact_key(name, "progress")].type == "progress"
    assert float(by[artifact_key(name, "progress")].data) == 100.0
    table = by[artifact_key(name, "shards")]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and len(rows) == 2
    rows = sorted(rows, key=lambda r: r["shard"])
    assert [r["shard"] for r in rows] == ["part-000.parquet", "part-001.parquet"]
    assert [r["rows_in"] for r in rows] == [2000, 2000]
    assert [r["rows_dead_letter"] for r in rows] == [3, 1]
    assert all(r["rows_per_s"] > 0 and r["p95_batch_latency_s"] > 0 and r["retries"] == 0 for r in rows)
    md = by[artifact_key(name, "summary")]
    assert md.type == "markdown"
    assert f"# {name} / r1: completed" in md.data
    assert "| rows in (this run) | 4,000 |" in md.data
    assert f"4 row(s) in `s3://ckpt/{name}/{name}.dead_letter/r1`" in md.data
    assert "part-000.parquet 3" in md.data
    assert f"dpipeline report PIPELINE.yaml --run-key r1" in md.data

    # the metrics record in the checkpoint storage
    [rec] = load_runs(Pipeline(cfg).config, "r1")
    assert rec["flow_run_id"] == fr and rec["status"] == "completed"
    assert sum(len(s["records"]) for s in rec["shards"]) == 8 and rec["totals"]["rows_in"] == 4000

    # log lines of the run (flow and shard tasks) carry pipeline, run key, shard
    logs = _read_logs(fr)
    msgs = [entry.message for entry in logs]
    # (the tests run Prefect's loggers at WARNING: the run logger's INFO lines are not sent)
    shard_lines = [m for m in msgs if m.startswith(f"[{name}/r1 shard part-00")]
    assert len([m for m in shard_lines if " done: 2000 row(s) in" in m]) == 2, msgs
    assert any(m.startswith(f"[{name}/r1 shard part-000.parquet batch 0] ") and "dead-letter" in m
               for m in shard_lines), msgs

    evs = read_events(name, lambda e: events.RUN_COMPLETED in [x.event for x in e])
    texts = ([json.dumps(e.model_dump(mode="json")) for e in evs]
             + [a.model_dump_json() for a in arts] + msgs + [json.dumps(rec), json.dumps(summary, default=str)])
    for secret in secrets:
        leaks = [t[:200] for t in texts if secret in t]
        assert not leaks, f"secret found in {leaks}"
    # the flow run's parameters hold the ${VAR} references only
    from prefect import get_client

    with get_client(sync_client=True) as client:
        params = json.dumps(client.read_flow_run(uuid.UUID(fr)).parameters, default=str)
    assert "${OBS_TEST_S3_KEY}" in params and not any(s in params for s in secrets)
