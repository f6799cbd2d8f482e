"""Metrics collection: histogram accuracy and merging, shard records, the saved run record."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest

from dpipeline_prefect.config import parse_config
from dpipeline_prefect.metrics import BOUNDS, LatencyHistogram, RunMetrics, ShardMetrics, load_runs, save


def test_histogram_percentiles_are_within_one_bucket_of_numpy():
    rng = np.random.default_rng(7)
    values = rng.lognormal(mean=-3.0, sigma=1.2, size=20_000)  # ~50 ms median, long tail
    h = LatencyHistogram()
    for v in values:
        h.observe(float(v))
    assert h.count == len(values) and h.sum == pytest.approx(values.sum())
    for q in (0.5, 0.95, 0.99):
        want = float(np.quantile(values, q))
        assert h.quantile(q) == pytest.approx(want, rel=0.10), q  # buckets are 19% wide
    assert h.quantile(1.0) <= values.max()


def test_histograms_merge_like_one_histogram_and_round_trip():
    rng = np.random.default_rng(1)
    a_vals, b_vals = rng.exponential(0.1, 3000), rng.exponential(2.0, 1000)
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for v in a_vals:
        a.observe(float(v))
        both.observe(float(v))
    for v in b_vals:
        b.observe(float(v))
        both.observe(float(v))
    merged = LatencyHistogram.from_dict(a.to_dict()).merge(LatencyHistogram.from_dict(b.to_dict()))
    assert merged.counts == both.counts and merged.count == 4000
    assert merged.percentiles() == both.percentiles()
    # cumulative counts at a subset of the bounds are exact
    bounds = [BOUNDS[i] for i in range(0, len(BOUNDS), 4)]
    cum = merged.cumulative(bounds)
    allv = np.concatenate([a_vals, b_vals])
    for bound, c in zip(bounds, cum):
        assert c == int((allv <= bound).sum()), bound


def test_empty_histogram():
    h = LatencyHistogram()
    assert h.quantile(0.5) == 0.0 and h.percentiles()["latency_p99_s"] == 0.0


@dataclass
class _Result:  # the fields of shard.ShardResult that RunMetrics reads
    shard: str
    label: str
    skipped: bool = False
    rows_in: int = 0
    rows_out: int = 0
    rows_dead_letter: int = 0
    batches: int = 0
    rows_in_now: int = 0
    retries: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    extra: dict = field(default_factory=dict)


def test_run_metrics_merge_live_reports_then_take_the_shard_record(tmp_path):
    run = RunMetrics("p", "k", "fr-1")
    run.shards_total = 2
    sm = ShardMetrics("s0", "a")
    for seq in range(3):
        fig = sm.batch(seq, 100, 99, 1, 1000)
        run.on_batch({"run": "p/k", "shard": "s0", "rows": 100, "label": "a", "retries": seq, **fig})
    t = run.totals()
    assert (t["rows_in"], t["rows_out"], t["rows_dead"], t["batches"], t["retries"]) == (300, 297, 3, 3, 2)
    assert t["shards_done"] == 0 and fig["rss"] > 0 and fig["worker"]
    # the shard's result replaces the live figures (no double counting)
    res = _Result("s0", "a", rows_in=300, rows_out=297, rows_dead_letter=3, batches=3, rows_in_now=300,
                  retries=2, bytes_read=5000, bytes_written=3000, duration_s=1.5,
                  extra={"metrics": sm.summary()})
    run.on_shard(res)
    run.on_batch({"run": "p/k", "shard": "s0", "rows": 100, **sm.batch(9, 100, 100, 0, 1)})  # late: ignored
    t = run.totals()
    assert (t["rows_in"], t["rows_out"], t["rows_dead"], t["batches"], t["retries"]) == (300, 297, 3, 3, 2)
    assert t["shards_done"] == 1 and run.hist.count == 3
    run.on_batch({"run": "p/k", "shard": "s1", "rows": 50, **ShardMetrics("s1", "b").batch(0, 50, 50, 0, 10)})
    run.on_shard_failed("s1", "b", "boom")
    t = run.totals()
    assert t["shards_failed"] == 1 and t["rows_in"] == 350
    cfg = parse_config({"name": "m-" + uuid.uuid4().hex[:6], "source": {"path": "x"}, "sink": {"path": "y"},
                        "checkpoint": {"path": str(tmp_path / "ckpt")}})
    run.status, run.ended = "failed", run.started + 2
    path = save(cfg, run)
    assert path and path.startswith(str(tmp_path / "ckpt" / cfg.name / "k" / "metrics"))
    [rec] = load_runs(cfg, "k")
    assert rec["status"] == "failed" and rec["flow_run_id"] == "fr-1"
    by = {s["shard"]: s for s in rec["shards"]}
    assert len(by["s0"]["records"]) == 3 and by["s1"]["status"] == "failed" and len(by["s1"]["records"]) == 1
    assert by["s0"]["records"][0][1:] == [0, 100, 99, 1, 1000, by["s0"]["records"][0][-1]]
    assert rec["fields"] == ["t", "seq", "rows_in", "rows_out", "rows_dead", "bytes_written", "latency_s"]
