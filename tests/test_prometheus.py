"""``monitoring.prometheus_port``: /metrics is scraped over HTTP while a run goes on Dask worker
processes, and parsed with prometheus_client's own parser."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pandas as pd
import pytest

from dpipeline_prefect.devservices import free_port

from .pipeline_helpers import flights, write_parquet_files


def slow_identity(df: pd.DataFrame) -> pd.DataFrame:
    """Takes 0.25 s per batch, so the run lasts long enough to be scraped mid-way."""
    time.sleep(0.25)
    return df


def _scrape(url: str) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(fams: dict, family: str, sample: str, **labels) -> float:
    return sum(s.value for s in fams.get(family, [])
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.prefect
def test_metrics_are_served_during_the_run_for_all_workers(tmp_path: Path):
    distributed = pytest.importorskip("distributed")
    from dpipeline_prefect.cluster import local_cluster_kwargs
    from dpipeline_prefect.pipeline import Pipeline

    src = tmp_path / "in"
    write_parquet_files(flights(6000), src, files=3, row_group_size=250)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    name = "prom-" + uuid.uuid4().hex[:8]
    scrapes: list[dict] = []
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            try:
                scrapes.append(_scrape(url))
            except OSError:
                pass  # not serving yet / any more
            time.sleep(0.2)

    with distributed.LocalCluster(**local_cluster_kwargs(2, threads_per_worker=1)) as cluster:
        cfg = {
            "name": name,
            "source": {"format": "parquet", "path": str(src)},
            "batching": {"rows": 250},  # 8 batches per shard, 3 shards
            "transforms": ["tests.test_prometheus:slow_identity"],
            "sink": {"format": "parquet", "path": str(tmp_path / "out")},
            "checkpoint": {"path": str(tmp_path / "ckpt")},
            "runner": {"kind": "dask", "address": cluster.scheduler_address},
            # the last shard result may come less than a scrape interval before the run ends
            "monitoring": {"prometheus_port": port, "prometheus_linger_s": 1.0},
        }
        t = threading.Thread(target=scraper, daemon=True)
        t.start()
        try:
            summary = Pipeline(cfg).run(run_key="p1")
        finally:
            stop.set()
            t.join(10)
        workers = set(cluster.scheduler_info["workers"])
    assert summary["status"] == "completed" and summary["rows_in"] == 6000

    fam = "dpipeline_rows_in"
    mid = [f for f in scrapes if 0 < _value(f, fam, "dpipeline_rows_in_total", pipeline=name, run_key="p1") < 6000]
    assert mid, f"no scrape caught the run mid-way ({len(scrapes)} scrapes)"
    # the last scrape while serving (the run's final figures, served 1 s after it ended):
    # every batch of every shard, from both worker processes
    last = max(scrapes, key=lambda f: _value(f, fam, "dpipeline_rows_in_total", pipeline=name))
    assert _value(last, fam, "dpipeline_rows_in_total", pipeline=name, run_key="p1") == 6000
    assert {s.labels["shard"] for s in last[fam]} == {"f00000", "f00001", "f00002"}
    assert _value(last, "dpipeline_batches", "dpipeline_batches_total") == 24
    assert _value(last, "dpipeline_rows_out", "dpipeline_rows_out_total") == 6000
    assert _value(last, "dpipeline_bytes_written", "dpipeline_bytes_written_total") > 0
    h = last["dpipeline_batch_latency_seconds"]
    assert _value(last, "dpipeline_batch_latency_seconds", "dpipeline_batch_latency_seconds_count") == 24
    inf = [s for s in h if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert inf and inf[0].value == 24
    below_quarter = [s.value for s in h if s.name.endswith("_bucket") and float(s.labels["le"]) < 0.2]
    assert max(below_quarter) == 0  # every batch slept 0.25 s
    p95 = _value(last, "dpipeline_batch_latency_quantile_seconds", "dpipeline_batch_latency_quantile_seconds",
                 quantile="0.95")
    assert 0.2 < p95 < 5
    rss = {s.labels["worker"]: s.value for s in last["dpipeline_worker_rss_bytes"]}
    assert set(rss) == workers and all(v > 10e6 for v in rss.values())
    assert {s.labels["worker"] for s in last["dpipeline_worker_cpu_percent"]} == workers
    assert _value(last, "dpipeline_rows_per_second", "dpipeline_rows_per_second") > 0
    assert _value(last, "dpipeline_shards", "dpipeline_shards", state="total") == 3
    assert _value(last, "dpipeline_error_rate", "dpipeline_error_rate") == 0
    assert [s.labels["resource"] for s in last["dpipeline_breaker_open"]] == ["sink"]
    assert _value(last, "dpipeline_breaker_open", "dpipeline_breaker_open") == 0
    # the server is gone with the run
    with pytest.raises(OSError):
        _scrape(url)
