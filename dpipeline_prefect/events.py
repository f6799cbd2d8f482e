"""Prefect events of a pipeline run: one :func:`emit` helper and the event names.

Every dpipeline event has the pipeline as its resource::

    prefect.resource.id    dpipeline.pipeline.<name>
    prefect.resource.name  <name>
    dpipeline.run_key      <run key>
    (+ labels of the event, e.g. dpipeline.shard or dpipeline.breaker)

and the flow run as a related resource (``prefect.flow-run.<id>``, role ``flow-run``), so
the events show on the flow run's page in the UI and automations can match them by
pipeline (resource), run key (label) or flow run (related). Prefect itself adds the
run-context resources (task run, flow, tags) where the event is emitted inside a run.

The events, each with its figures in the payload, at most a few per shard and never one
per row or batch:

* ``dpipeline.run.started`` / ``completed`` / ``failed`` - from the flow;
* ``dpipeline.shard.completed`` / ``failed`` - from the flow as each shard's task ends;
* ``dpipeline.rows.dead_lettered`` - per shard that dead-lettered rows (rows, where);
* ``dpipeline.rows.dead_letter_threshold`` - once per run, when its dead-lettered rows reach
  ``monitoring.dead_letter_alert_rows``;
* ``dpipeline.breaker.opened`` / ``closed`` - from the worker whose breaker changed state;
* ``dpipeline.degraded`` - once at the end of a run that ran degraded.

Payloads hold counts, durations, shard labels, paths without credentials and error
messages (which never carry storage options). Sending is asynchronous and best effort:
an event that cannot be sent is logged, never raised, so monitoring cannot fail a run.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = [
    "RUN_STARTED",
    "RUN_COMPLETED",
    "RUN_FAILED",
    "SHARD_COMPLETED",
    "SHARD_FAILED",
    "ROWS_DEAD_LETTERED",
    "DEAD_LETTER_THRESHOLD",
    "BREAKER_OPENED",
    "BREAKER_CLOSED",
    "DEGRADED",
    "ALL_EVENTS",
    "resource_id",
    "pipeline_resource",
    "current_flow_run_id",
    "safe_url",
    "emit",
]

log = logging.getLogger("dpipeline_prefect.events")

RUN_STARTED = "dpipeline.run.started"
RUN_COMPLETED = "dpipeline.run.completed"
RUN_FAILED = "dpipeline.run.failed"
SHARD_COMPLETED = "dpipeline.shard.completed"
SHARD_FAILED = "dpipeline.shard.failed"
ROWS_DEAD_LETTERED = "dpipeline.rows.dead_lettered"
DEAD_LETTER_THRESHOLD = "dpipeline.rows.dead_letter_threshold"
BREAKER_OPENED = "dpipeline.breaker.opened"
BREAKER_CLOSED = "dpipeline.breaker.closed"
DEGRADED = "dpipeline.degraded"
ALL_EVENTS = (RUN_STARTED, RUN_COMPLETED, RUN_FAILED, SHARD_COMPLETED, SHARD_FAILED,
              ROWS_DEAD_LETTERED, DEAD_LETTER_THRESHOLD, BREAKER_OPENED, BREAKER_CLOSED, DEGRADED)

_USERINFO_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def resource_id(pipeline: str) -> str:
    """``dpipeline.pipeline.<name>``: the resource id of every event of ``pipeline``."""
    return f"dpipeline.pipeline.{pipeline}"


def pipeline_resource(pipeline: str, run_key: str, labels: dict[str, str] | None = None) -> dict[str, str]:
    """The event resource of ``pipeline``'s run ``run_key`` (extra ``labels`` added)."""
    res = {"prefect.resource.id": resource_id(pipeline), "prefect.resource.name": pipeline,
           "dpipeline.run_key": run_key}
    res.update({k: str(v) for k, v in (labels or {}).items()})
    return res


def current_flow_run_id() -> str | None:
    """The id of the flow run this code runs in (in the flow or in one of its task runs)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        fctx = FlowRunContext.get()
        if fctx is not None and fctx.flow_run is not None:
            return str(fctx.flow_run.id)
        tctx = TaskRunContext.get()
        if tctx is not None and tctx.task_run.flow_run_id is not None:
            return str(tctx.task_run.flow_run_id)
    except Exception:  # noqa: BLE001 - outside a run
        pass
    return None


def safe_url(url: str) -> str:
    """``url`` without a ``user:password@`` part (the only place a URL can carry a secret)."""
    return _USERINFO_RE.sub(r"\1", str(url))


def emit(event: str, pipeline: str, run_key: str, payload: dict[str, Any] | None = None, *,
         flow_run_id: str | None = None, labels: dict[str, str] | None = None) -> Any:
    """Emit the Prefect event ``event`` about run ``run_key`` of ``pipeline``.

    Args:
        event: one of the names above (``dpipeline.*``).
        pipeline, run_key: the resource (``dpipeline.pipeline.<pipeline>``, label
            ``dpipeline.run_key``).
        payload: the figures (JSON-serializable; no secrets).
        flow_run_id: the related flow run; default: the flow run of the current run context.
        labels: extra resource labels such as ``{"dpipeline.shard": "f00003"}``.

    Returns:
        The :class:`prefect.events.Event` handed to Prefect's event worker, or None when it
        could not be emitted (logged as a warning).
    """
    try:
        from prefect.events import emit_event

        fr = flow_run_id or current_flow_run_id()
        related = ([{"prefect.resource.id": f"prefect.flow-run.{fr}", "prefect.resource.role": "flow-run"}]
                   if fr else None)
        return emit_event(event=event, resource=pipeline_resource(pipeline, run_key, labels),
                          related=related, payload=dict(payload or {}))
    except Exception as exc:  # noqa: BLE001 - an event that cannot be sent must not fail a run
        log.warning("could not emit Prefect event %s (%s: %s)", event, type(exc).__name__, exc)
        return None
