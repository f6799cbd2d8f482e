"""The flow side of monitoring: one :class:`RunMonitor` per run turns what the run does into
Prefect events (``events.py``), artifacts (``artifacts.py``), the run's metrics record
(``metrics.py``) and, if configured, a Prometheus endpoint (``prometheus.py``).

``flows.py`` calls it at the few moments that matter (run started, a shard's task ended, run
completed or failed); the workers' per-batch figures reach it through a progress hook
(``progress.py``). It keeps the flow glue free of monitoring detail. Everything here is best
effort: monitoring never fails a run.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from . import artifacts, events, metrics, progress
from .config import PipelineConfig

__all__ = ["RunMonitor"]

log = logging.getLogger("dpipeline_prefect.monitor")


class RunMonitor:
    """Events of one run of ``cfg`` under ``run_key`` (made in the flow process)."""

    def __init__(self, cfg: PipelineConfig, run_key: str, flow_run_id: str | None) -> None:
        self.cfg = cfg
        self.run_key = run_key
        self.flow_run_id = flow_run_id
        self._lock = threading.Lock()
        self._dead: dict[str, int] = {}  # shard id -> its dead-lettered rows (cumulative)
        self._threshold_sent = False
        self._dead_letter_where: str | None = None
        self.enabled = cfg.monitoring.metrics
        self.metrics = metrics.RunMetrics(cfg.name, run_key, flow_run_id)
        self.metrics_path: str | None = None
        self.progress = artifacts.ProgressArtifact(cfg.name, run_key)
        self.server: Any = None
        self._run_id = f"{cfg.name}/{run_key}"
        self._hooked = False

    # -- life cycle ---------------------------------------------------------------------------
    def open(self) -> "RunMonitor":
        """Start listening to the workers' batch reports (and serving /metrics if configured)."""
        progress.hooks.append(self._on_progress)
        self._hooked = True
        port = self.cfg.monitoring.prometheus_port
        if port is not None:
            from .prometheus import MetricsServer

            try:
                self.server = MetricsServer(self.metrics, port, self.cfg.monitoring.prometheus_addr)
                log.warning("run %s/%s: Prometheus metrics at %s", self.cfg.name, self.run_key, self.server.url)
            except OSError as exc:
                log.warning("run %s/%s: cannot serve Prometheus metrics on port %s (%s)",
                            self.cfg.name, self.run_key, port, exc)
        return self

    def close(self) -> None:
        """Stop listening and serving."""
        if self._hooked:
            self._hooked = False
            try:
                progress.hooks.remove(self._on_progress)
            except ValueError:
                pass
        if self.server is not None:
            linger = self.cfg.monitoring.prometheus_linger_s
            if linger:
                import time

                time.sleep(linger)  # the shard results are merged: these are the final figures
            self.server.stop()
            self.server = None

    def _on_progress(self, event: str, payload: dict[str, Any]) -> None:
        if event != "batch" or payload.get("run") != self._run_id:
            return
        self.metrics.on_batch(payload)
        if "dead_total" in payload:
            self.dead_rows(payload["shard"], int(payload["dead_total"]))
    # -- events -------------------------------------------------------------------------------
    def emit(self, event: str, payload: dict[str, Any], labels: dict[str, str] | None = None) -> None:
        """Emit ``event`` about this run (pipeline resource, flow run related)."""
        events.emit(event, self.cfg.name, self.run_key, {"run_key": self.run_key, **payload},
                    flow_run_id=self.flow_run_id, labels=labels)

    @property
    def dead_letter_where(self) -> str | None:
        """Where this run's dead-lettered rows go (URL without credentials), if isolation is on."""
        if self.cfg.dead_letter is None:
            return None
        if self._dead_letter_where is None:
            from .dead_letter import dead_letter_url

            self._dead_letter_where = events.safe_url(dead_letter_url(self.cfg, self.run_key)[0])
        return self._dead_letter_where

    def started(self, *, shards_total: int, shards_done: int, rows_total: int, rows_done: int,
                restart: bool) -> None:
        """The run has its plan and is about to run its shards."""
        self.metrics.shards_total = shards_total
        self.metrics.shards_skipped = shards_done
        self.metrics.rows_total = rows_total
        if self.enabled:
            self.progress.start(shards_done, shards_total)
        self.emit(events.RUN_STARTED, {"shards_total": shards_total, "shards_done": shards_done,
                                       "rows_total": rows_total, "rows_done": rows_done,
                                       "restart": restart})

    def dead_rows(self, shard: str, rows: int) -> None:
        """Shard ``shard`` has dead-lettered ``rows`` rows so far (cumulative over attempts).

        Emits the threshold event once, when the run's total first reaches
        ``monitoring.dead_letter_alert_rows``.
        """
        threshold = self.cfg.monitoring.dead_letter_alert_rows
        with self._lock:
            self._dead[shard] = max(self._dead.get(shard, 0), int(rows))
            total = sum(self._dead.values())
            fire = threshold is not None and not self._threshold_sent and total >= threshold
            if fire:
                self._threshold_sent = True
        if fire:
            log.warning("run %s/%s: %d row(s) dead-lettered, alert threshold %d reached",
                        self.cfg.name, self.run_key, total, threshold)
            self.emit(events.DEAD_LETTER_THRESHOLD, {"rows": total, "threshold": threshold,
                                                     "where": self.dead_letter_where})

    def shard_completed(self, r: Any) -> None:
        """A shard task returned its :class:`~dpipeline_prefect.shard.ShardResult` ``r``."""
        self.metrics.on_shard(r)
        if self.enabled:
            t = self.metrics.totals()
            self.progress.update(t["shards_done"], t["shards_total"])
        rate = round(r.rows_in_now / r.duration_s, 1) if r.duration_s else 0.0
        payload = {"shard": r.shard, "label": r.label, "rows_in": r.rows_in, "rows_out": r.rows_out,
                   "rows_dead_letter": r.rows_dead_letter, "batches": r.batches,
                   "rows_in_now": r.rows_in_now, "rows_per_s": rate, "retries": r.retries,
                   "bytes_read": r.bytes_read, "bytes_written": r.bytes_written,
                   "duration_s": round(r.duration_s, 3), "batches_reprocessed": r.batches_reprocessed}
        payload.update(_latency_fields(r))
        labels = {"dpipeline.shard": r.label}
        self.emit(events.SHARD_COMPLETED, payload, labels)
        if r.rows_dead_letter:
            self.emit(events.ROWS_DEAD_LETTERED, {"shard": r.shard, "label": r.label,
                                                  "rows": r.rows_dead_letter, "where": self.dead_letter_where},
                      labels)
        self.dead_rows(r.shard, r.rows_dead_letter)

    def skipped(self, results: list[Any]) -> None:
        """Shards found complete in the checkpoints (done by an earlier run of the run key)."""
        for r in results:
            self.metrics.on_shard(r)
            self.dead_rows(r.shard, r.rows_dead_letter)

    def shard_failed(self, shard: str, label: str, exc: BaseException) -> None:
        """A shard task failed for good (Prefect's retries spent)."""
        self.metrics.on_shard_failed(shard, label, _message(exc))
        self.emit(events.SHARD_FAILED, {"shard": shard, "label": label, "error_type": type(exc).__name__,
                                        "error": _message(exc)}, {"dpipeline.shard": label})

    def completed(self, summary: dict[str, Any]) -> None:
        """The run completed (or found itself already complete); ``summary`` is its summary.

        Saves the metrics record (its path goes into ``summary["metrics_path"]``) and creates
        the final artifacts before the events."""
        self._finish(summary.get("status", "completed"), summary, None)
        keys = ("status", "rows_in", "rows_out", "rows_dead_letter", "shards_total", "shards_skipped",
                "batches_reprocessed", "retries", "bytes_read", "bytes_written", "duration_s",
                "rows_per_s", "breaker_openings", "breaker_closings", "breaker_rejections")
        payload = {k: summary.get(k) for k in keys if k in summary}
        if summary.get("rows_dead_letter"):
            payload["dead_letter_where"] = self.dead_letter_where
        if summary.get("degraded"):
            self.emit(events.DEGRADED, {
                "breaker_openings": summary.get("breaker_openings", 0),
                "breaker_closings": summary.get("breaker_closings", 0),
                "breaker_rejections": summary.get("breaker_rejections", 0),
                "degraded_slot_waits": summary.get("degraded_slot_waits", 0),
                "transforms_skipped": summary.get("transforms_skipped", {}),
                "transitions": summary["degraded"][:50],
            })
        self.emit(events.RUN_COMPLETED, payload)

    def failed(self, exc: BaseException, duration_s: float) -> None:
        """The run failed with ``exc``."""
        self._finish("failed", {"status": "failed", "duration_s": round(duration_s, 3)}, _message(exc))
        self.emit(events.RUN_FAILED, {"error_type": type(exc).__name__, "error": _message(exc),
                                      "duration_s": round(duration_s, 3)})


    def _finish(self, status: str, summary: dict[str, Any], error: str | None) -> None:
        import time

        self.close()
        if not self.enabled or status == "already_complete":
            return
        try:
            self.metrics.status = status
            self.metrics.ended = time.time()
            if self.metrics.shards:  # a run that failed before its shards has nothing to keep
                self.metrics_path = metrics.save(self.cfg, self.metrics)
            if self.metrics_path:
                summary["metrics_path"] = events.safe_url(self.metrics_path)
            record = self.metrics.to_dict()
            t = record["totals"]
            self.progress.update(t["shards_done"], t["shards_total"], force=True)
            md = artifacts.summary_markdown(summary, record, pipeline_file=None,
                                            metrics_path=summary.get("metrics_path"),
                                            dead_letter_where=self.dead_letter_where, error=error)
            artifacts.publish_final(self.cfg.name, self.run_key, artifacts.shard_table(record), md)
        except Exception as exc:  # noqa: BLE001 - monitoring must not fail a run
            log.warning("run %s/%s: could not record its metrics (%s: %s)", self.cfg.name, self.run_key,
                        type(exc).__name__, exc)


def _latency_fields(r: Any) -> dict[str, Any]:
    m = (getattr(r, "extra", None) or {}).get("metrics") or {}
    return {k: m[k] for k in ("latency_p50_s", "latency_p95_s", "latency_p99_s") if k in m}


def _message(exc: BaseException, limit: int = 2000) -> str:
    """The error's message (dpipeline errors never carry storage options), cut to ``limit``."""
    msg = str(exc).strip() or type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
