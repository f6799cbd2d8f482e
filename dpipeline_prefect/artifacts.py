"""Prefect artifacts of a run, on its flow run page (``prefect.artifacts``).

* ``dpipeline-<pipeline>-progress`` - a progress artifact created when the shards start and
  updated as they finish (at most once a second, and at the end);
* ``dpipeline-<pipeline>-shards`` - at the end, a table with one row per shard: rows in / out,
  rows/s, p95 batch latency, retries, dead-lettered rows, status;
* ``dpipeline-<pipeline>-summary`` - at the end, markdown with the run's totals, where its
  dead-lettered rows are, where its metrics are kept and the ``dpipeline report`` command
  that draws them.

Keys are stable per pipeline (Prefect keeps every version and shows the latest under the key,
each version linked to its flow run). Keys allow lowercase letters, digits and dashes only:
``_`` in a pipeline name becomes ``-``. Nothing in them comes from storage options.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["artifact_key", "ProgressArtifact", "shard_table", "summary_markdown", "publish_final"]

log = logging.getLogger("dpipeline_prefect.artifacts")


def artifact_key(pipeline: str, what: str) -> str:
    """``dpipeline-<pipeline>-<what>`` in the form Prefect accepts as an artifact key."""
    return f"dpipeline-{pipeline}-{what}".lower().replace("_", "-")


class ProgressArtifact:
    """The run's progress artifact (percent of shards done), throttled to ``every_s``."""

    def __init__(self, pipeline: str, run_key: str, every_s: float = 1.0) -> None:
        self.pipeline = pipeline
        self.run_key = run_key
        self.every_s = every_s
        self.id: Any = None
        self._last = 0.0
        self._pending: float | None = None

    def start(self, done: int, total: int) -> None:
        try:
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(
                _percent(done, total), key=artifact_key(self.pipeline, "progress"),
                description=f"{self.pipeline} / {self.run_key}: shards done")
            self._last = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - artifacts must not fail a run
            log.warning("could not create the progress artifact (%s: %s)", type(exc).__name__, exc)

    def update(self, done: int, total: int, force: bool = False) -> None:
        if self.id is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.id, _percent(done, total))
            self._last = now
        except Exception as exc:  # noqa: BLE001
            log.warning("could not update the progress artifact (%s: %s)", type(exc).__name__, exc)


def _percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 1) if total else 100.0


def shard_table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per shard of a saved run record (``RunMetrics.to_dict()``)."""
    rows = []
    for s in record["shards"]:
        dur = s.get("duration_s") or 0.0
        rows.append({
            "shard": s["label"], "status": s["status"], "rows_in": s["rows_in"], "rows_out": s["rows_out"],
            "rows_per_s": round(s["rows_in"] / dur, 1) if dur else 0.0,
            "p95_batch_latency_s": round(s.get("latency_p95_s", 0.0), 4),
            "retries": s["retries"], "rows_dead_letter": s.get("rows_dead_total", s["rows_dead"]),
            "batches": s["batches"],
        })
    return rows


def summary_markdown(summary: dict[str, Any], record: dict[str, Any], *, pipeline_file: str | None,
                     metrics_path: str | None, dead_letter_where: str | None, error: str | None = None) -> str:
    """The run's markdown summary (totals, dead letters, report)."""
    t = record["totals"]
    status = summary.get("status", record.get("status"))
    lines = [f"# {record['pipeline']} / {record['run_key']}: {status}", ""]
    if error:
        lines += [f"**Error:** {error}", ""]
    lines += ["| figure | value |", "| --- | ---: |"]
    figures = [
        ("rows in (this run)", t["rows_in"]), ("rows out (this run)", t["rows_out"]),
        ("rows dead-lettered (run key)", summary.get("rows_dead_letter", t["rows_dead"])),
        ("shards", f"{t['shards_done']} done of {t['shards_total']}"
                   + (f", {t['shards_failed']} failed" if t["shards_failed"] else "")),
        ("shards skipped (already done)", summary.get("shards_skipped", 0)),
        ("batches", t["batches"]), ("retries", t["retries"]), ("error rate", t["error_rate"]),
        ("bytes read", summary.get("bytes_read", t["bytes_read"])), ("bytes written", t["bytes_written"]),
        ("duration s", summary.get("duration_s", "")), ("rows/s", summary.get("rows_per_s", t["rows_per_s"])),
        ("batch latency p50 / p95 / p99 s",
         f"{t['latency_p50_s']:.4f} / {t['latency_p95_s']:.4f} / {t['latency_p99_s']:.4f}"),
        ("breaker openings", summary.get("breaker_openings", 0)),
    ]
    lines += [f"| {k} | {v:,} |" if isinstance(v, int) else f"| {k} | {v} |" for k, v in figures]
    lines.append("")
    dead = summary.get("rows_dead_letter", t["rows_dead"])
    if dead_letter_where and dead:
        per = [(s["label"], s.get("rows_dead_total", s["rows_dead"])) for s in record["shards"]]
        per = [(label, n) for label, n in per if n]
        lines += ["## Dead letters", "", f"{dead:,} row(s) in `{dead_letter_where}`"
                  + (": " + ", ".join(f"{label} {n:,}" for label, n in per) if per else ""), "",
                  f"Inspect with `dpipeline dlq ls {pipeline_file or 'PIPELINE.yaml'} --run-key {record['run_key']}`.", ""]
    lines += ["## Report", ""]
    if metrics_path:
        lines.append(f"Metrics of this run: `{metrics_path}`.")
    lines.append(f"HTML report (throughput over time, batch latency histogram, rows per shard): "
                 f"`dpipeline report {pipeline_file or 'PIPELINE.yaml'} --run-key {record['run_key']} -o report.html`")
    return "\n".join(lines) + "\n"


def publish_final(pipeline: str, run_key: str, table: list[dict[str, Any]], markdown: str) -> None:
    """Create the shard table and the markdown summary artifacts on the current flow run."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(table, key=artifact_key(pipeline, "shards"),
                              description=f"{pipeline} / {run_key}: one row per shard")
        create_markdown_artifact(markdown, key=artifact_key(pipeline, "summary"),
                                 description=f"{pipeline} / {run_key}: run summary")
    except Exception as exc:  # noqa: BLE001 - artifacts must not fail a run
        log.warning("could not create the run's artifacts (%s: %s)", type(exc).__name__, exc)
