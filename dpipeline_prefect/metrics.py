"""Run metrics: collected cheaply per batch in the shard, merged per run in the flow, kept.

Three parts:

* :class:`LatencyHistogram` - fixed log-spaced buckets (factor 2^(1/4), about 19% apart, from
  100 us to ~28 h), so histograms of any shards and workers merge by adding counts, and
  p50 / p95 / p99 are read with at most one bucket's (~9%) relative error.
* :class:`ShardMetrics` - lives in the shard loop (worker side). Per batch it does a few
  additions and one bucket lookup; the worker's RSS and CPU (psutil) are sampled at most once
  per ``sample_s``, never per row. Each batch's figures go to the flow with the progress
  report that already exists (``progress.report``: a Dask worker event, or a direct call
  with the threads runner); the shard's whole record comes back in its result.
* :class:`RunMetrics` - lives in the flow process. It merges the batch figures of all
  workers as they arrive (what Prometheus serves while the run goes, ``prometheus.py``),
  takes each finished shard's own record as the authoritative one, and :func:`save` writes the
  run's record beside its checkpoints::

      <checkpoint.path>/<pipeline>/<run_key>/metrics/<started>-<flow run id>.json

  one file per flow run of the run key (a resumed run adds one), read back by
  :func:`load_runs` for ``dpipeline report``.

Rows are counted as in the run summary: ``rows_in`` read from the source, ``rows_out``
written to the sink, ``rows_dead`` dead-lettered. A batch's latency is the wall time from the
end of the previous batch (or the shard's start) to its output being published: reading,
transforming and writing it (the checkpoint save is asynchronous and not in it).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any

__all__ = [
    "BOUNDS",
    "LatencyHistogram",
    "ShardMetrics",
    "RunMetrics",
    "metrics_storage",
    "save",
    "load_runs",
]

log = logging.getLogger("dpipeline_prefect.metrics")

_FACTOR = 2 ** 0.25
# upper bounds of the buckets, seconds: 1e-4 * 2^(i/4) for i = 0..119 (1e-4 s .. ~28 h)
BOUNDS: tuple[float, ...] = tuple(1e-4 * _FACTOR ** i for i in range(120))
RECORD_FIELDS = ("t", "seq", "rows_in", "rows_out", "rows_dead", "bytes_written", "latency_s")


class LatencyHistogram:
    """Counts of observations per fixed bucket; mergeable, with p50/p95/p99."""

    __slots__ = ("counts", "count", "sum", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)  # the last bucket is "above the last bound"
        self.count = 0
        self.sum = 0.0
        self.max = 0.0

    def observe(self, v: float) -> None:
        """Add one observation (seconds)."""
        self.counts[bisect.bisect_left(BOUNDS, v)] += 1
        self.count += 1
        self.sum += v
        if v > self.max:
            self.max = v

    def merge(self, other: "LatencyHistogram") -> "LatencyHistogram":
        """Add ``other``'s observations to this one; returns self."""
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.count += other.count
        self.sum += other.sum
        self.max = max(self.max, other.max)
        return self

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1): the geometric middle of the bucket it falls in, capped
        at the largest observation. 0.0 without observations."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                if i >= len(BOUNDS):
                    return self.max
                lo = BOUNDS[i - 1] if i else 0.0
                mid = math.sqrt(lo * BOUNDS[i]) if lo else BOUNDS[i] / 2
                return min(mid, self.max)
        return self.max

    def cumulative(self, bounds: list[float]) -> list[int]:
        """Observations <= each of ``bounds`` (which must be a subset of :data:`BOUNDS`)."""
        out, seen, j = [], 0, 0
        for b in bounds:
            while j < len(BOUNDS) and BOUNDS[j] <= b * (1 + 1e-9):
                seen += self.counts[j]
                j += 1
            out.append(seen)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A small JSON form (only non-empty buckets)."""
        return {"buckets": {str(i): c for i, c in enumerate(self.counts) if c}, "count": self.count,
                "sum": self.sum, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LatencyHistogram":
        h = cls()
        for i, c in ((d or {}).get("buckets") or {}).items():
            h.counts[int(i)] += int(c)
        h.count = int((d or {}).get("count", sum(h.counts)))
        h.sum = float((d or {}).get("sum", 0.0))
        h.max = float((d or {}).get("max", 0.0))
        return h

    def percentiles(self) -> dict[str, float]:
        """``latency_p50_s``, ``latency_p95_s``, ``latency_p99_s`` rounded to microseconds."""
        return {f"latency_p{q}_s": round(self.quantile(q / 100), 6) for q in (50, 95, 99)}


def worker_name() -> str:
    """``host:pid`` of this process (the label of its RSS/CPU figures)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _ProcessSampler:
    """RSS and CPU of this process, read at most once per ``sample_s`` (one per process)."""

    def __init__(self, sample_s: float) -> None:
        self.sample_s = sample_s
        self.next = 0.0
        self.rss = 0
        self.cpu = 0.0
        self._proc: Any = None
        self._lock = threading.Lock()

    def sample(self, now: float) -> tuple[int, float]:
        if now >= self.next and self._lock.acquire(blocking=False):
            try:
                if self._proc is None:
                    import psutil

                    self._proc = psutil.Process()
                    self._proc.cpu_percent(None)  # starts the CPU measuring interval
                self.rss = int(self._proc.memory_info().rss)
                self.cpu = float(self._proc.cpu_percent(None))
            except Exception:  # noqa: BLE001 - a missing figure must not fail a shard
                pass
            finally:
                self.next = now + self.sample_s
                self._lock.release()
        return self.rss, self.cpu


_sampler = _ProcessSampler(1.0)


class ShardMetrics:
    """Figures of one shard attempt, recorded batch by batch (worker side)."""

    def __init__(self, shard: str, label: str) -> None:
        self.shard = shard
        self.label = label
        self.started = time.time()
        self._last = time.perf_counter()
        self.hist = LatencyHistogram()
        self.records: list[list[float]] = []  # RECORD_FIELDS per batch
        self.rows_in = self.rows_out = self.rows_dead = self.bytes_written = 0
        self.rss_max = 0

    def batch(self, seq: int, rows_in: int, rows_out: int, rows_dead: int, bytes_written: int) -> dict[str, Any]:
        """Record batch ``seq`` (just published); returns its figures for the progress report."""
        now = time.perf_counter()
        latency, self._last = now - self._last, now
        t = time.time()
        self.hist.observe(latency)
        self.records.append([round(t, 3), seq, rows_in, rows_out, rows_dead, bytes_written, round(latency, 6)])
        self.rows_in += rows_in
        self.rows_out += rows_out
        self.rows_dead += rows_dead
        self.bytes_written += bytes_written
        rss, cpu = _sampler.sample(now)
        if rss > self.rss_max:
            self.rss_max = rss
        return {"t": t, "seq": seq, "rows_out": rows_out, "dead": rows_dead, "bytes": bytes_written,
                "lat": latency, "worker": worker_name(), "rss": rss, "cpu": cpu}

    def summary(self) -> dict[str, Any]:
        """The shard attempt's record: totals, percentiles, histogram and the batch records."""
        return {"shard": self.shard, "label": self.label, "started": self.started, "ended": time.time(),
                "worker": worker_name(), "rss_max": self.rss_max, **self.hist.percentiles(),
                "hist": self.hist.to_dict(), "fields": list(RECORD_FIELDS), "records": list(self.records)}


class RunMetrics:
    """The run's figures in the flow process, merged from all workers' batch reports."""

    def __init__(self, pipeline: str, run_key: str, flow_run_id: str | None) -> None:
        self.pipeline = pipeline
        self.run_key = run_key
        self.flow_run_id = flow_run_id
        self.started = time.time()
        self.ended: float | None = None
        self.status = "running"
        self.lock = threading.Lock()
        self.hist = LatencyHistogram()
        self.shards: dict[str, dict[str, Any]] = {}  # shard id -> live figures and, when done, result
        self.workers: dict[str, dict[str, float]] = {}  # host:pid -> {rss, cpu, t}
        self.live_records: dict[str, list[list[float]]] = {}  # shard -> records (until its result)
        self.breakers: dict[str, str] = {}  # resource -> state, as last reported
        self.shards_total = 0
        self.shards_skipped = 0
        self.rows_total = 0
        self.batches = 0
        self.bytes_read = 0

    def _shard(self, shard: str, label: str | None = None) -> dict[str, Any]:
        s = self.shards.get(shard)
        if s is None:
            s = self.shards[shard] = {"shard": shard, "label": label or shard, "status": "running",
                                      "rows_in": 0, "rows_out": 0, "rows_dead": 0, "bytes_written": 0,
                                      "batches": 0, "retries": 0, "hist": LatencyHistogram()}
        elif label:
            s["label"] = label
        return s

    def on_batch(self, p: dict[str, Any]) -> None:
        """One batch's figures from a worker (``progress.report`` payload)."""
        if "lat" not in p:
            return
        with self.lock:
            s = self._shard(p["shard"], p.get("label"))
            if s["status"] != "running":
                return  # a late report of a shard whose result is in
            s["rows_in"] += int(p.get("rows", 0))
            s["rows_out"] += int(p.get("rows_out", 0))
            s["rows_dead"] += int(p.get("dead", 0))
            s["bytes_written"] += int(p.get("bytes", 0))
            s["batches"] += 1
            s["retries"] = max(s["retries"], int(p.get("retries", 0)))
            s["hist"].observe(float(p["lat"]))
            self.hist.observe(float(p["lat"]))
            self.batches += 1
            self.live_records.setdefault(p["shard"], []).append(
                [round(float(p.get("t", time.time())), 3), p.get("seq", 0), int(p.get("rows", 0)),
                 int(p.get("rows_out", 0)), int(p.get("dead", 0)), int(p.get("bytes", 0)),
                 round(float(p["lat"]), 6)])
            if p.get("worker"):
                self.workers[p["worker"]] = {"rss": float(p.get("rss", 0)), "cpu": float(p.get("cpu", 0.0)),
                                             "t": time.time()}
            if p.get("breaker"):
                self.breakers.update(p["breaker"])

    def on_shard(self, result: Any) -> None:
        """A shard's task returned: its own record replaces what the batch reports said."""
        m = (getattr(result, "extra", None) or {}).get("metrics") or {}
        with self.lock:
            s = self._shard(result.shard, result.label)
            if s["status"] == "running":
                self.hist.counts = [a - b for a, b in zip(self.hist.counts, s["hist"].counts)]
                self.hist.count -= s["hist"].count
                self.hist.sum -= s["hist"].sum
                self.batches -= s["batches"]
            h = LatencyHistogram.from_dict(m.get("hist")) if m else LatencyHistogram()
            records = m.get("records") or ([] if result.skipped else self.live_records.get(result.shard, []))
            s.update(status="skipped" if result.skipped else "completed", hist=h, records=records,
                     rows_in=result.rows_in_now, rows_out=sum(int(r[3]) for r in records) if m else s["rows_out"],
                     rows_dead=sum(int(r[4]) for r in records) if m else s["rows_dead"],
                     bytes_written=result.bytes_written, batches=len(records),
                     retries=result.retries, duration_s=round(result.duration_s, 3),
                     rows_in_total=result.rows_in, rows_out_total=result.rows_out,
                     rows_dead_total=result.rows_dead_letter, batches_total=result.batches,
                     worker=m.get("worker"), rss_max=m.get("rss_max", 0))
            self.live_records.pop(result.shard, None)
            self.hist.merge(h)
            self.batches += len(records)
            self.bytes_read += result.bytes_read

    def on_shard_failed(self, shard: str, label: str, error: str) -> None:
        with self.lock:
            s = self._shard(shard, label)
            s.update(status="failed", error=error, records=self.live_records.pop(shard, []))

    # -- read ----------------------------------------------------------------------------------
    def totals(self) -> dict[str, Any]:
        """Run totals (this flow run's work) for Prometheus and artifacts."""
        with self.lock:
            shards = list(self.shards.values())
            rows_in = sum(s["rows_in"] for s in shards)
            elapsed = max(1e-9, (self.ended or time.time()) - self.started)
            retries = sum(s["retries"] for s in shards)
            attempts = self.batches + retries
            return {
                "rows_in": rows_in, "rows_out": sum(s["rows_out"] for s in shards),
                "rows_dead": sum(s["rows_dead"] for s in shards),
                "bytes_written": sum(s["bytes_written"] for s in shards), "bytes_read": self.bytes_read,
                "batches": self.batches, "retries": retries,
                "error_rate": round(retries / attempts, 6) if attempts else 0.0,
                "rows_per_s": round(rows_in / elapsed, 1),
                "shards_total": self.shards_total,
                "shards_done": sum(s["status"] in ("completed", "skipped") for s in shards),
                "shards_failed": sum(s["status"] == "failed" for s in shards),
                **self.hist.percentiles(),
            }

    def to_dict(self) -> dict[str, Any]:
        """The run's record as saved (JSON)."""
        with self.lock:
            shards = []
            for s in sorted(self.shards.values(), key=lambda s: s["shard"]):
                d = {k: v for k, v in s.items() if k not in ("hist", "records")}
                d.update(s["hist"].percentiles(), hist=s["hist"].to_dict(),
                         records=s.get("records", self.live_records.get(s["shard"], [])))
                shards.append(d)
            workers = {k: dict(v) for k, v in self.workers.items()}
            hist = LatencyHistogram().merge(self.hist)
        return {"version": 1, "pipeline": self.pipeline, "run_key": self.run_key,
                "flow_run_id": self.flow_run_id, "started": self.started, "ended": self.ended,
                "status": self.status, "totals": self.totals(), "hist": hist.to_dict(),
                "fields": list(RECORD_FIELDS), "shards": shards, "workers": workers,
                "breakers": dict(self.breakers)}


def metrics_storage(cfg: Any, run_key: str) -> Any:
    """The folder of a run key's metrics records (beside its checkpoints)."""
    from .storage import Storage, join

    return Storage(join(cfg.checkpoint.path, cfg.name, run_key, "metrics"), cfg.checkpoint.storage_options)


def save(cfg: Any, run: RunMetrics) -> str | None:
    """Write ``run``'s record; returns its path (None if it could not be written: logged)."""
    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime(run.started)) + f"-{run.flow_run_id or 'local'}.json"
    try:
        st = metrics_storage(cfg, run.run_key)
        path = st.path(name)
        st.write_bytes(path, json.dumps(run.to_dict(), separators=(",", ":")).encode())
        return st.unstrip(path) if not st.is_local else path
    except Exception as exc:  # noqa: BLE001 - metrics must not fail a run
        log.warning("could not save the run's metrics (%s: %s)", type(exc).__name__, exc)
        return None


def load_runs(cfg: Any, run_key: str) -> list[dict[str, Any]]:
    """Every saved record of ``run_key`` (one per flow run), oldest first."""
    st = metrics_storage(cfg, run_key)
    paths = sorted(p for p in st.ls(st.root) if p.endswith(".json"))
    return [json.loads(st.read_bytes(p)) for p in paths]
