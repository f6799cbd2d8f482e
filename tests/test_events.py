"""Prefect events of a run, read back from the real Prefect server.

A run with a few rows a transform rejects (dead-letter isolation on) and a low alert threshold
must leave on the server: run.started, one shard.completed per shard, rows.dead_lettered for
each shard that dead-lettered rows, exactly one rows.dead_letter_threshold, run.completed; all
on resource ``dpipeline.pipeline.<name>`` with the run key label and the flow run related. A
run whose transform fails leaves shard.failed and run.failed naming the error.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from dpipeline_prefect import events
from dpipeline_prefect.config import parse_config
from dpipeline_prefect.errors import ConfigError
from dpipeline_prefect.pipeline import Pipeline

from .pipeline_helpers import flights, write_parquet_files

POISON = {5, 1234, 1999, 3333}  # shards: rows 0-1999 (3 rows), 2000-3999 (1 row)


def reject_some(df: pd.DataFrame) -> pd.DataFrame:
    """Raises for the POISON row ids (a transform bug on a few records)."""
    hit = df["row_id"].isin(POISON)
    if hit.any():
        raise ValueError(f"cannot handle row_id {int(df.loc[hit, 'row_id'].iloc[0])}")
    return df


def always_fails(df: pd.DataFrame) -> pd.DataFrame:
    raise ValueError("this transform is broken")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("events") / "in"
    write_parquet_files(flights(4000), folder, files=2, row_group_size=500)
    return folder


def read_events(pipeline: str, until, timeout: float = 30.0) -> list:
    """The pipeline's events once ``until(events)`` holds (events arrive asynchronously)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventResourceFilter

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(
                resource=EventResourceFilter(id=[events.resource_id(pipeline)])), limit=50)
        got = list(page.events)
        if until(got) or time.time() > deadline:
            return got
        time.sleep(0.5)


def _names(evs: list) -> list[str]:
    return [e.event for e in evs]


def _cfg(tmp_path: Path, src: Path, **over) -> dict:
    cfg = {
        "name": "ev-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 500},
        "transforms": ["tests.test_events:reject_some"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
        "dead_letter": {},
        "monitoring": {"dead_letter_alert_rows": 3},
    }
    cfg.update(over)
    return cfg


def test_monitoring_section_is_validated():
    base = {"name": "m", "source": {"path": "x"}, "sink": {"path": "y"}}
    assert parse_config(base).monitoring.log_format == "text"
    m = parse_config({**base, "monitoring": {"prometheus_port": 9464, "log_format": "json",
                                             "dead_letter_alert_rows": 10}}).monitoring
    assert (m.prometheus_port, m.log_format, m.dead_letter_alert_rows) == (9464, "json", 10)
    with pytest.raises(ConfigError, match="monitoring.log_format"):
        parse_config({**base, "monitoring": {"log_format": "xml"}})
    with pytest.raises(ConfigError, match="monitoring.dead_letter_alert_rows"):
        parse_config({**base, "monitoring": {"dead_letter_alert_rows": 0}})
    with pytest.raises(ConfigError, match="allowed here: metrics, prometheus_port"):
        parse_config({**base, "monitoring": {"prometheus": 1}})
    # monitoring knobs do not invalidate checkpoints
    assert parse_config(base).fingerprints() == parse_config({**base, "monitoring": {"metrics": False}}).fingerprints()


def test_safe_url_drops_credentials():
    assert events.safe_url("s3://AKIA:s3cr3t@bucket/x") == "s3://bucket/x"
    assert events.safe_url("https://user:pw@host:1/p?q=1") == "https://host:1/p?q=1"
    assert events.safe_url("/local/path") == "/local/path"


@pytest.mark.prefect
def test_run_events_reach_the_server_with_figures_and_the_flow_run(tmp_path, src):
    cfg = _cfg(tmp_path, src)
    summary = Pipeline(cfg).run(run_key="k1")
    assert summary["status"] == "completed" and summary["rows_dead_letter"] == len(POISON)

    def complete(evs):
        n = _names(evs)
        return events.RUN_COMPLETED in n and n.count(events.SHARD_COMPLETED) == 2 \
            and n.count(events.ROWS_DEAD_LETTERED) == 2 and events.DEAD_LETTER_THRESHOLD in n

    evs = read_events(cfg["name"], complete)
    names = _names(evs)
    assert names.count(events.RUN_STARTED) == 1
    assert names.count(events.RUN_COMPLETED) == 1
    assert names.count(events.SHARD_COMPLETED) == 2
    assert names.count(events.ROWS_DEAD_LETTERED) == 2
    assert names.count(events.DEAD_LETTER_THRESHOLD) == 1  # once per run, not once per shard
    assert events.RUN_FAILED not in names
    for e in evs:
        assert e.resource.id == f"dpipeline.pipeline.{cfg['name']}"
        assert e.resource["prefect.resource.name"] == cfg["name"]
        assert e.resource["dpipeline.run_key"] == "k1"
        flow_runs = [r for r in e.related if r.role == "flow-run"]
        assert [r.id for r in flow_runs] == [f"prefect.flow-run.{summary['flow_run_id']}"], e.event
    by = {n: [e for e in evs if e.event == n] for n in set(names)}
    started = by[events.RUN_STARTED][0].payload
    assert started["shards_total"] == 2 and started["rows_total"] == 4000 and started["restart"] is False
    done = by[events.RUN_COMPLETED][0].payload
    assert done["rows_in"] == 4000 and done["rows_out"] == 4000 - len(POISON)
    assert done["rows_dead_letter"] == len(POISON) and done["status"] == "completed"
    assert done["dead_letter_where"] == str(tmp_path / "ckpt" / f"{cfg['name']}.dead_letter" / "k1")
    shards = sorted((e.payload for e in by[events.SHARD_COMPLETED]), key=lambda p: p["shard"])
    assert [p["rows_in"] for p in shards] == [2000, 2000]
    assert [p["rows_dead_letter"] for p in shards] == [3, 1]
    assert all(p["rows_per_s"] > 0 and p["batches"] == 4 for p in shards)
    assert {e.resource["dpipeline.shard"] for e in by[events.SHARD_COMPLETED]} == {"part-000.parquet",
                                                                                    "part-001.parquet"}
    dead = sorted((e.payload for e in by[events.ROWS_DEAD_LETTERED]), key=lambda p: p["shard"])
    assert [p["rows"] for p in dead] == [3, 1]
    assert all(p["where"] == done["dead_letter_where"] for p in dead)
    thr = by[events.DEAD_LETTER_THRESHOLD][0].payload
    assert thr["threshold"] == 3 and thr["rows"] >= 3

    # a re-run of the completed run key: started + completed (already complete), no new threshold
    again = Pipeline(cfg).run(run_key="k1")
    assert again["status"] == "already_complete"
    evs = read_events(cfg["name"], lambda evs: _names(evs).count(events.RUN_COMPLETED) == 2)
    statuses = sorted(e.payload["status"] for e in evs if e.event == events.RUN_COMPLETED)
    assert statuses == ["already_complete", "completed"]


@pytest.mark.prefect
def test_a_failed_run_emits_shard_failed_and_run_failed(tmp_path, src):
    cfg = _cfg(tmp_path, src, transforms=["tests.test_events:always_fails"], dead_letter=None,
               retry={"max_attempts": 1})
    with pytest.raises(Exception, match="this transform is broken"):
        Pipeline(cfg).run(run_key="bad")
    evs = read_events(cfg["name"], lambda evs: events.RUN_FAILED in _names(evs)
                      and _names(evs).count(events.SHARD_FAILED) == 2)
    names = _names(evs)
    assert names.count(events.RUN_FAILED) == 1 and names.count(events.SHARD_FAILED) == 2
    assert events.RUN_COMPLETED not in names
    failed = next(e for e in evs if e.event == events.RUN_FAILED)
    assert failed.payload["error_type"] == "TransformError"
    assert "this transform is broken" in failed.payload["error"]
    assert any(r.role == "flow-run" for r in failed.related)
    sf = [e.payload for e in evs if e.event == events.SHARD_FAILED]
    assert all("this transform is broken" in p["error"] for p in sf)
