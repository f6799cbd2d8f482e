"""``/metrics`` for Prometheus while a run goes (``monitoring.prometheus_port``).

The flow process serves the figures of every worker: the workers send each batch's figures
to the flow with the progress report that already exists (a Dask worker event, see
``progress.py``), :class:`~dpipeline_prefect.metrics.RunMetrics` merges them, and the
collector here turns a snapshot of it into Prometheus metrics at each scrape (nothing is
computed between scrapes). The server is ``prometheus_client``'s own, on its own registry,
started when the run starts and stopped when it ends.

Metrics (labels ``pipeline``, ``run_key``, plus ``shard``, ``worker`` or ``resource``)::

    dpipeline_rows_in_total / rows_out_total / rows_dead_letter_total   {shard}  counters
    dpipeline_bytes_written_total {shard}, dpipeline_bytes_read_total           counters
    dpipeline_batches_total {shard}, dpipeline_retries_total {shard}            counters
    dpipeline_batch_latency_seconds                                             histogram
    dpipeline_batch_latency_quantile_seconds {quantile=0.5|0.95|0.99}           gauge
    dpipeline_rows_per_second, dpipeline_error_rate                             gauges
    dpipeline_shards {state=total|done|failed}                                  gauge
    dpipeline_breaker_open {resource}                                           gauge (1 open)
    dpipeline_worker_rss_bytes / worker_cpu_percent {worker}                    gauges
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .metrics import BOUNDS, RunMetrics

__all__ = ["RunCollector", "MetricsServer"]

log = logging.getLogger("dpipeline_prefect.prometheus")

# every 4th fixed bound (powers of two from 0.4 ms to ~7 min): exact cumulative counts
_PROM_BOUNDS = [b for i, b in enumerate(BOUNDS) if i % 4 == 0 and 2e-4 < b < 600]


class RunCollector:
    """A prometheus_client collector reading one :class:`RunMetrics` at each scrape."""

    def __init__(self, run: RunMetrics) -> None:
        self.run = run

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        run = self.run
        base = [run.pipeline, run.run_key]
        tot = run.totals()
        with run.lock:
            shards = [(s["shard"], dict(s), s["hist"]) for s in run.shards.values()]
            workers = dict(run.workers)
            breakers = dict(run.breakers)
            counts = run.hist.cumulative(_PROM_BOUNDS)
            count, total = run.hist.count, run.hist.sum

        def counter(name: str, doc: str, key: str) -> Any:
            m = CounterMetricFamily(f"dpipeline_{name}", doc, labels=["pipeline", "run_key", "shard"])
            for sid, s, _ in shards:
                m.add_metric([*base, sid], float(s[key]))
            return m

        yield counter("rows_in", "Rows read from the input by this run.", "rows_in")
        yield counter("rows_out", "Rows written to the sink by this run.", "rows_out")
        yield counter("rows_dead_letter", "Rows dead-lettered by this run.", "rows_dead")
        yield counter("bytes_written", "Bytes written to the sink by this run.", "bytes_written")
        yield counter("batches", "Batches published by this run.", "batches")
        yield counter("retries", "Transient failures retried (sink writes and shard tasks).", "retries")
        br = CounterMetricFamily("dpipeline_bytes_read", "Bytes read by finished shards.", labels=["pipeline", "run_key"])
        br.add_metric(base, float(tot["bytes_read"]))
        yield br
        h = HistogramMetricFamily("dpipeline_batch_latency_seconds",
                                  "Wall time per batch: read, transform, write.", labels=["pipeline", "run_key"])
        h.add_metric(base, [(repr(b), float(c)) for b, c in zip(_PROM_BOUNDS, counts)] + [("+Inf", float(count))],
                     sum_value=total)
        yield h
        q = GaugeMetricFamily("dpipeline_batch_latency_quantile_seconds", "Batch latency percentiles.",
                              labels=["pipeline", "run_key", "quantile"])
        for p in (50, 95, 99):
            q.add_metric([*base, str(p / 100)], tot[f"latency_p{p}_s"])
        yield q
        for name, doc, key in (("rows_per_second", "Input rows per second of this run so far.", "rows_per_s"),
                               ("error_rate", "Fraction of sink write attempts that failed.", "error_rate")):
            g = GaugeMetricFamily(f"dpipeline_{name}", doc, labels=["pipeline", "run_key"])
            g.add_metric(base, float(tot[key]))
            yield g
        g = GaugeMetricFamily("dpipeline_shards", "Shards of the run by state.", labels=["pipeline", "run_key", "state"])
        for state, key in (("total", "shards_total"), ("done", "shards_done"), ("failed", "shards_failed")):
            g.add_metric([*base, state], float(tot[key]))
        yield g
        g = GaugeMetricFamily("dpipeline_breaker_open", "1 while the resource's breaker is open, 0.5 half-open.",
                              labels=["pipeline", "run_key", "resource"])
        for resource, state in breakers.items():
            g.add_metric([*base, resource], {"open": 1.0, "half_open": 0.5}.get(state, 0.0))
        yield g
        rss = GaugeMetricFamily("dpipeline_worker_rss_bytes", "Resident memory of each worker process.",
                                labels=["pipeline", "run_key", "worker"])
        cpu = GaugeMetricFamily("dpipeline_worker_cpu_percent", "CPU use of each worker process (100 = one core).",
                                labels=["pipeline", "run_key", "worker"])
        for w, v in workers.items():
            rss.add_metric([*base, w], v["rss"])
            cpu.add_metric([*base, w], v["cpu"])
        yield rss
        yield cpu


class MetricsServer:
    """Serves one run's metrics at ``http://addr:port/metrics`` until :meth:`stop`."""

    def __init__(self, run: RunMetrics, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RunCollector(run))
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._server.server_address[1])
        self.addr = addr
        self.url = f"http://{addr}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port."""
        try:
            self._server.shutdown()
            self._server.server_close()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not stop the metrics server (%s: %s)", type(exc).__name__, exc)
