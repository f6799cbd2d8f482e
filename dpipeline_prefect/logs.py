"""dpipeline's log lines: in the Prefect run's logs, with pipeline, run key, shard and batch.

* **Context.** :func:`log_context` sets ``pipeline``, ``run_key``, ``shard`` and ``batch`` for
  the code it wraps (a ``contextvars`` variable: each shard's thread has its own), and every
  record of a ``dpipeline_prefect.*`` logger carries them as attributes (``record.pipeline``
  ...), as does :func:`run_logger`'s adapter over Prefect's run logger in the flow.
* **Prefect.** :func:`configure` attaches a subclass of Prefect's own ``APILogHandler`` to the
  ``dpipeline_prefect`` logger (what ``PREFECT_LOGGING_EXTRA_LOGGERS`` would do, but also in
  Dask worker processes and without a restart), so module log lines made inside a flow or
  task run land in that run's logs in the UI, prefixed ``[pipeline/run_key shard S batch N]``.
  Outside a run it sends nothing (no "missing flow run" warning).
* **JSON.** ``monitoring.log_format: json`` adds a stderr handler writing one JSON object per
  line (``ts``, ``level``, ``logger``, ``message``, ``pipeline``, ``run_key``, ``shard``,
  ``batch``, ``flow_run_id``, ``task_run_id``, ``exc`` when there is one) for log shippers,
  in the flow process and in every worker that runs a shard; it covers the module loggers
  and the run logger lines of :func:`run_logger`.

Nothing here logs storage options; messages are the callers', which never include them.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["log_context", "set_batch", "current", "run_logger", "configure", "JsonFormatter", "FIELDS"]

FIELDS = ("pipeline", "run_key", "shard", "batch")
ROOT = "dpipeline_prefect"
_ctx: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("dpipeline_log_context", default={})
_lock = threading.Lock()
_configured: dict[str, Any] = {"api": None, "json": None}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (pipeline, run_key, shard, batch) to every dpipeline record inside."""
    token = _ctx.set({**_ctx.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _ctx.reset(token)


def set_batch(seq: int | None) -> None:
    """The batch the current shard works on (cheap: one dict copy per batch)."""
    _ctx.set({**_ctx.get(), "batch": seq})


def current() -> dict[str, Any]:
    """The current log context."""
    return dict(_ctx.get())


def _prefix(fields: dict[str, Any]) -> str:
    if not fields.get("pipeline"):
        return ""
    p = f"[{fields['pipeline']}/{fields.get('run_key', '')}"
    if fields.get("shard") is not None:
        p += f" shard {fields['shard']}"
    if fields.get("batch") is not None:
        p += f" batch {fields['batch']}"
    return p + "] "


class _ContextFilter(logging.Filter):
    """Sets record.pipeline/run_key/shard/batch from the context (unless given in ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _ctx.get()
        for k in FIELDS:
            if getattr(record, k, None) is None:
                setattr(record, k, ctx.get(k))
        return True


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        fields = {k: getattr(record, k, None) for k in FIELDS}
        return msg if getattr(record, "dp_prefixed", False) else _prefix(fields) + msg


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the dpipeline fields and the Prefect run ids."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name,
            "message": getattr(record, "dp_message", None) or record.getMessage(),
        }
        ctx = _ctx.get()
        for k in FIELDS:
            v = getattr(record, k, None)
            doc[k] = v if v is not None else ctx.get(k)
        doc["flow_run_id"], doc["task_run_id"] = _run_ids(record)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _run_ids(record: logging.LogRecord) -> tuple[str | None, str | None]:
    fr, tr = getattr(record, "flow_run_id", None), getattr(record, "task_run_id", None)
    if fr is None:
        try:
            from prefect.context import FlowRunContext, TaskRunContext

            t = TaskRunContext.get()
            if t is not None:
                fr, tr = t.task_run.flow_run_id, t.task_run.id
            else:
                f = FlowRunContext.get()
                fr = f.flow_run.id if f is not None and f.flow_run is not None else None
        except Exception:  # noqa: BLE001
            pass
    return (str(fr) if fr else None), (str(tr) if tr else None)


def _api_handler() -> logging.Handler:
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class RunAPIHandler(APILogHandler):
        """Prefect's API log handler, silent outside a flow or task run."""

        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "flow_run_id", None) is None and FlowRunContext.get() is None \
                    and TaskRunContext.get() is None:
                return
            super().emit(record)

    # No level of its own: the ``dpipeline_prefect`` logger's level decides (INFO unless the
    # live log level, loglevel.py, changes it while a run is in progress).
    h = RunAPIHandler(level=logging.NOTSET)
    h.setFormatter(_PrefixFormatter("%(message)s"))
    return h


class _OnlyDpipeline(logging.Filter):
    """On Prefect's run loggers, pass only the lines of :func:`run_logger`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "pipeline", None) is not None


def configure(log_format: str = "text") -> None:
    """Route dpipeline's log records to the Prefect run (and, for ``json``, JSON on stderr).

    Idempotent per process; call it where a run starts (flow) and where a shard starts
    (worker). ``text`` after ``json`` removes the JSON handler again.
    """
    root = logging.getLogger(ROOT)
    with _lock:
        if _configured["api"] is None:
            if root.level == logging.NOTSET or root.level > logging.INFO:
                root.setLevel(logging.INFO)
            try:
                h = _api_handler()
                h.addFilter(_ContextFilter())
                root.addHandler(h)
                _configured["api"] = h
            except Exception:  # noqa: BLE001 - without Prefect the lines still reach the console
                _configured["api"] = False
        want_json = log_format == "json"
        if want_json and _configured["json"] is None:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(JsonFormatter())  # no level of its own, like the API handler
            h.addFilter(_ContextFilter())
            root.addHandler(h)
            rl = logging.StreamHandler(sys.stderr)
            rl.setFormatter(JsonFormatter())
            rl.setLevel(logging.INFO)
            rl.addFilter(_OnlyDpipeline())
            for name in ("prefect.flow_runs", "prefect.task_runs"):
                logging.getLogger(name).addHandler(rl)
            _configured["json"] = (h, rl)
        elif not want_json and _configured["json"]:
            h, rl = _configured["json"]
            root.removeHandler(h)
            for name in ("prefect.flow_runs", "prefect.task_runs"):
                logging.getLogger(name).removeHandler(rl)
            _configured["json"] = None


class RunLogger(logging.LoggerAdapter):
    """A logger adapter adding the dpipeline fields to the record and a prefix to the message."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = {**_ctx.get(), **{k: v for k, v in (self.extra or {}).items() if v is not None}}
        extra = dict(kwargs.get("extra") or {})
        for k in FIELDS:
            extra.setdefault(k, fields.get(k))
        extra["dp_prefixed"] = True
        extra["dp_message"] = str(msg)
        kwargs["extra"] = extra
        return _prefix(fields) + str(msg), kwargs


def run_logger(pipeline: str, run_key: str, shard: str | None = None) -> RunLogger:
    """Prefect's run logger (or the ``dpipeline_prefect.flows`` logger outside a run), with
    the dpipeline fields on every record and ``[pipeline/run_key shard S]`` before each message."""
    try:
        from prefect import get_run_logger

        base: Any = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run
        base = logging.getLogger(f"{ROOT}.flows")
    return RunLogger(base, {"pipeline": pipeline, "run_key": run_key, "shard": shard})
