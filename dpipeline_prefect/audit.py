"""The audit trail: who asked for each destructive or state-changing action, as Prefect events.

Every such action (``run --restart``, ``checkpoints gc``, ``dlq replay``, ``alerts install`` /
``remove``, ``backfill``, ``loglevel``) runs inside :func:`audited`, which emits two Prefect events named
``dpipeline.audit.<action>`` on resource ``dpipeline.pipeline.<name>`` (the resource
``degrade.py``'s breaker events use):

* when the action is **attempted** (``payload.outcome == "attempted"``), before it touches
  anything, so an action whose process is killed half-way is still on record;
* when it **ends** (``"ok"`` or ``"failed"`` with the error's type and message), with the
  same ``audit_id`` and what the action reported (files removed, rows replayed...).

Each names **who**: the OS user (``getpass.getuser()`` and the uid), the host and process,
and the Prefect client (its version, the server's version, the API URL without credentials
or query, and the flow run id when the action runs inside a flow run, which Prefect also
adds as a related resource); **what**: the action, the pipeline, the run key and the details.
Nothing in an audit event comes from storage options, and :func:`scrub` drops anything
whose key looks like a secret and the user/password part of URLs, so no key, password or
webhook URL reaches the server.

Events are Prefect's own mechanism, so the trail is kept (and pruned, by
``PREFECT_EVENTS_RETENTION_PERIOD``) by the server, is visible in the UI's event feed, and
automations can react to it. :func:`read_audit` lists them back through the server's
``/events/filter`` API (``dpipeline audit PIPELINE.yaml``). Prefect delivers events
asynchronously (a background worker, drained at process exit): an event can take a moment
to become visible after the action returns.

Events are sent with ``events.emit`` (the run's events' helper). An event that cannot be
emitted never stops the action: it is logged as a warning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import logging
import os
import re
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ACTIONS",
    "EVENT_PREFIX",
    "Audit",
    "audited",
    "record",
    "who",
    "scrub",
    "safe_url",
    "read_audit",
    "parse_since",
]

log = logging.getLogger("dpipeline_prefect.audit")

EVENT_PREFIX = "dpipeline.audit."
#: The actions that are audited (the suffix of the event name).
ACTIONS = ("restart", "checkpoints-gc", "dlq-replay", "alerts-install", "alerts-remove", "backfill", "loglevel")

_SECRET_KEY = re.compile(r"(secret|password|passwd|token|key|credential|auth|webhook|signature)", re.I)
_server_version: dict[str, str] = {}


def safe_url(url: str) -> str:
    """``url`` without its user/password part, query and fragment (where credentials hide)."""
    try:
        p = urlsplit(str(url))
    except ValueError:
        return "<unparsable url>"
    if not p.scheme or not p.netloc:
        return str(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


def scrub(value: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` with secret-looking keys dropped and URLs made safe.

    A key is dropped when its name contains secret, password, token, key, credential, auth,
    webhook or signature (``run_key`` and ``keep`` are kept: they are the audit's subject).
    """
    if _depth > 6:
        return "..."
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            k = str(k)
            if _SECRET_KEY.search(k) and k not in ("run_key", "keep"):
                continue
            out[k] = scrub(v, _depth + 1)
        return out
    if isinstance(value, (list, tuple, set)):
        return [scrub(v, _depth + 1) for v in value]
    if isinstance(value, str):
        return safe_url(value) if "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0] else value
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (a container without passwd entry)
        return f"uid:{os.getuid()}"


def _flow_run_id() -> str | None:
    try:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        return str(ctx.flow_run.id) if ctx and ctx.flow_run else None
    except Exception:  # noqa: BLE001
        return None


def who() -> dict[str, Any]:
    """The actor: OS user, uid, host, pid, and the Prefect client (versions, API URL, flow run)."""
    import prefect
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value() or ""
    actor: dict[str, Any] = {
        "user": _os_user(),
        "uid": os.getuid(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "prefect_client_version": prefect.__version__,
        "prefect_api": safe_url(api_url) if api_url else "ephemeral",
    }
    server = _server_version.get(api_url)
    if server is None and api_url:
        try:
            from prefect import get_client

            with get_client(sync_client=True) as client:
                server = str(client.api_version())
        except Exception as exc:  # noqa: BLE001 - recorded as unknown, the action goes on
            log.debug("could not read the Prefect server version (%s)", type(exc).__name__)
            server = "unknown"
        _server_version[api_url] = server
    actor["prefect_server_version"] = server or "unknown"
    flow_run_id = _flow_run_id()
    if flow_run_id:
        actor["flow_run_id"] = flow_run_id
    return actor


def record(action: str, pipeline: str, run_key: str | None, details: dict[str, Any] | None = None,
           *, outcome: str = "ok", audit_id: str | None = None) -> Any:
    """Emit one audit event ``dpipeline.audit.<action>``; returns the event (or None).

    Args:
        action: what was done (one of :data:`ACTIONS`, or another short name).
        pipeline: the pipeline's name (the event's resource is ``dpipeline.pipeline.<name>``).
        run_key: the run key acted on, or None for pipeline-wide actions.
        details: what the action touched or reported; passed through :func:`scrub`.
        outcome: ``attempted``, ``ok`` or ``failed``.
        audit_id: ties an action's "attempted" and final events together.
    """
    payload = {
        "action": action,
        "outcome": outcome,
        "audit_id": audit_id or str(uuid.uuid4()),
        "pipeline": pipeline,
        "run_key": run_key,
        "who": who(),
        "details": scrub(details or {}),
    }
    from .events import emit

    # The shared helper (events.py): resource dpipeline.pipeline.<name>, the flow run as a
    # related resource when there is one; best effort (a failure is logged, not raised).
    return emit(f"{EVENT_PREFIX}{action}", pipeline, run_key or "", payload,
                labels={"dpipeline.audit.action": action, "dpipeline.audit.outcome": outcome,
                        "dpipeline.audit.user": payload["who"]["user"]})


@dataclass
class Audit:
    """The open audit record of one action: add what it did to ``details`` before it ends."""

    action: str
    pipeline: str
    run_key: str | None
    details: dict[str, Any] = field(default_factory=dict)
    audit_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@contextlib.contextmanager
def audited(action: str, pipeline: str, run_key: str | None, details: dict[str, Any] | None = None) -> Iterator[Audit]:
    """Record ``action`` as attempted now and, when the block ends, as ok or failed.

    Example:
        >>> with audited("checkpoints-gc", cfg.name, None, {"keep": 2}) as a:
        ...     a.details["report"] = gc(...)
    """
    a = Audit(action, pipeline, run_key, dict(details or {}))
    record(action, pipeline, run_key, a.details, outcome="attempted", audit_id=a.audit_id)
    try:
        yield a
    except BaseException as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        record(action, pipeline, run_key, {**a.details, "error": type(exc).__name__, "message": msg},
               outcome="failed", audit_id=a.audit_id)
        raise
    record(action, pipeline, run_key, a.details, outcome="ok", audit_id=a.audit_id)


_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_since(text: str) -> dt.datetime:
    """``7d``, ``12h``, ``30m``, ``2w``, ``45s`` or an ISO time -> an aware UTC datetime."""
    from .errors import ConfigError

    m = _SINCE.match(text or "")
    now = dt.datetime.now(dt.timezone.utc)
    if m:
        n, unit = float(m.group(1)), m.group(2)
        secs = n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
        return now - dt.timedelta(seconds=secs)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: expected a duration such as 7d, 12h, 30m or an ISO time",
                          field="since") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def read_audit(pipeline: str, since: dt.datetime, limit: int = 1000) -> list[dict[str, Any]]:
    """The audit trail of ``pipeline`` since ``since``, oldest first, one entry per action.

    The "attempted" and final events of an action are merged (by ``audit_id``): ``outcome``
    is ``ok``/``failed``, or ``attempted`` when no final event arrived (the process died, or
    the event is still on its way).
    """
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    flt = EventFilter(
        event=EventNameFilter(prefix=[EVENT_PREFIX]),
        resource=EventResourceFilter(id=[f"dpipeline.pipeline.{pipeline}"]),
        occurred=EventOccurredFilter(since=since, until=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)),
    )
    events = []
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=flt, limit=50)  # the server's maximum page
        events.extend(page.events)
        while page.next_page and len(events) < limit:
            page = client.read_events_page(page.next_page)
            events.extend(page.events)
    by_id: dict[str, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e.occurred):
        p = dict(e.payload or {})
        aid = p.get("audit_id") or str(e.id)
        entry = by_id.get(aid)
        if entry is None:
            entry = by_id[aid] = {
                "at": e.occurred.isoformat(), "action": p.get("action", e.event[len(EVENT_PREFIX):]),
                "outcome": p.get("outcome"), "pipeline": p.get("pipeline", pipeline),
                "run_key": p.get("run_key"), "who": p.get("who", {}), "details": p.get("details", {}),
                "audit_id": aid, "event_ids": [],
            }
        if p.get("outcome") != "attempted":
            entry.update(outcome=p.get("outcome"), details=p.get("details", {}), ended=e.occurred.isoformat())
        entry["event_ids"].append(str(e.id))
    return list(by_id.values())
