"""Degradation: what a run does while a resource is failing. The Prefect side of ``breaker.py``.

* **One breaker state per run.** :func:`run_registry` gives every shard in a process the same
  breakers for its run, sharing their state through ``<checkpoint.path>/<pipeline>/<run_key>/
  breaker/<resource>.json`` (see ``breaker.py`` for why the checkpoint storage: it is the one
  store every runner reaches, a local cluster or an external one, with no new service; and it
  is read at most once per ``breaker.sync_s`` per process, never per row).
* **Events.** A transition made in this process is logged and emitted as a Prefect event,
  ``dpipeline.breaker.opened`` / ``dpipeline.breaker.closed`` on resource
  ``dpipeline.pipeline.<name>``, with the run key, the resource and the window's figures,
  and the run's flow run as related resource (``events.emit``).
  Transitions adopted from another process are logged only, so one opening is one event.
  Nothing in them comes from storage options: no secrets.
* **Fewer shards at once.** While a breaker is open or half-open, a shard takes a slot of the
  Prefect global concurrency limit ``dpipeline-degraded-<pipeline>-<run_key>-<resource>``
  before it writes a batch (retries included). The process that opens the breaker sets that
  limit to ``breaker.degraded_concurrency`` and the one that closes it raises it back to
  :data:`RESTORED_LIMIT`, so the number of shards writing at once shrinks to that limit and
  recovers when the resource does. A global concurrency limit because it is the
  cross-process semaphore that already exists (atomic on the server, leases so a killed
  holder cannot keep a slot for more than a minute); it costs two API calls per batch, and
  only while degraded: a closed breaker skips it entirely. The limit is raised, never
  deactivated: Prefect 3.9 does not decrement an *inactive* limit on release, so a slot taken
  while active and given back after deactivation would stay counted until its lease expired
  (measured here: five minutes of every shard waiting).
* **The summary.** :func:`run_report` reads the shared objects once at the end of a run and
  turns the transitions made during it into the run summary's ``degraded`` list.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import events
from .breaker import BreakerOpenError, BreakerPolicy, BreakerRegistry, CircuitBreaker, State, StorageSharedState
from .config import PipelineConfig
from .prefect_limits import ensure_limit
from .storage import Storage, cached_storage, join

__all__ = [
    "SINK",
    "EVENT_OPENED",
    "EVENT_CLOSED",
    "run_registry",
    "breaker_storage",
    "limit_name",
    "SlotStats",
    "DegradedSlot",
    "degraded_slot",
    "run_report",
    "cleanup",
]

log = logging.getLogger("dpipeline_prefect.degrade")

SINK = "sink"
EVENT_OPENED = events.BREAKER_OPENED
EVENT_CLOSED = events.BREAKER_CLOSED
RESTORED_LIMIT = 1_000_000  # "no limit" while closed; holders still release into it correctly
_LEASE_S = 60.0  # the server's minimum: a killed holder's slot is freed after this

_registries: dict[tuple, BreakerRegistry] = {}
_registries_lock = threading.Lock()


def breaker_storage(cfg: PipelineConfig, run_key: str) -> Storage:
    """The folder of this run's shared breaker objects (beside its checkpoints)."""
    return cached_storage(join(cfg.checkpoint.path, cfg.name, run_key, "breaker"),
                          cfg.checkpoint.storage_options)


def limit_name(pipeline: str, run_key: str, resource: str) -> str:
    """The Prefect global concurrency limit that caps writers while ``resource`` is degraded."""
    return f"dpipeline-degraded-{pipeline}-{run_key}-{resource}"


class _PrefectListener:
    """Logs are the breaker's; this adds the Prefect event and the concurrency limit."""

    def __init__(self, pipeline: str, run_key: str, degraded_concurrency: int) -> None:
        self.pipeline = pipeline
        self.run_key = run_key
        self.degraded_concurrency = degraded_concurrency

    def state_change(self, breaker: CircuitBreaker, old: State, new: State, info: dict[str, Any]) -> None:
        if info.get("remote") or new is State.HALF_OPEN:
            return
        _emit(self.pipeline, self.run_key, breaker.name, new, info)
        name = limit_name(self.pipeline, self.run_key, breaker.name)
        _set_limit(name, self.degraded_concurrency if new is State.OPEN else RESTORED_LIMIT)


def _emit(pipeline: str, run_key: str, resource: str, new: State, info: dict[str, Any]) -> None:
    """The breaker event, through :func:`events.emit` (so it carries the related flow run)."""
    payload = {k: v for k, v in info.items() if k != "remote"}
    events.emit(EVENT_OPENED if new is State.OPEN else EVENT_CLOSED, pipeline, run_key,
                {"resource": resource, "run_key": run_key, "state": new.value,
                 "host": os.uname().nodename, "pid": os.getpid(), **payload},
                labels={"dpipeline.breaker": resource})


def _set_limit(name: str, limit: int) -> None:
    """Create or update the degraded-writers limit; best effort (logged when it fails)."""
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            # Lifting a limit that was never created (a breaker that closed in a process
            # whose opening set nothing) creates nothing.
            ensure_limit(client, name, limit, create=limit != RESTORED_LIMIT)
        log.info("concurrency limit %s: %s", name,
                 "lifted" if limit == RESTORED_LIMIT else f"{limit} writer(s) at once")
    except Exception as exc:  # noqa: BLE001 - degradation is best effort; the breaker still holds
        log.warning("could not set concurrency limit %s to %d (%s: %s)", name, limit, type(exc).__name__, exc)


def run_registry(cfg: PipelineConfig, run_key: str) -> BreakerRegistry:
    """The breakers of run ``(cfg.name, run_key)`` in this process (made once, then reused)."""
    b = cfg.breaker
    policy = BreakerPolicy.from_config(b)
    key = (cfg.name, run_key, cfg.checkpoint.path, policy, b.degraded_concurrency)
    with _registries_lock:
        reg = _registries.get(key)
        if reg is None:
            storage = breaker_storage(cfg, run_key)
            listener = _PrefectListener(cfg.name, run_key, b.degraded_concurrency)

            def make(name: str) -> CircuitBreaker:
                return CircuitBreaker(name, policy, listeners=[listener],
                                      shared=StorageSharedState(storage, storage.path(f"{name}.json")))

            reg = _registries[key] = BreakerRegistry(make)
        return reg


@dataclass
class SlotStats:
    """What degraded-mode slots cost one shard."""

    waits: int = 0
    wait_s: float = 0.0


class DegradedSlot:
    """Holds a slot of the degraded-writers limit while one batch is written (retries included).

    The slot is taken when the block starts if the breaker is not closed, or at the first
    retry that an open breaker refused (:meth:`on_retry`): a shard that finds the resource
    failing then queues for one of ``degraded_concurrency`` slots instead of retrying on its
    own, so only that many shards keep trying. A closed (or absent) breaker costs one state
    read and no API call. If the slot cannot be had within ``timeout_s`` (or Prefect cannot
    be reached) the write goes on without it: the breaker and the retry's backoff still
    protect the resource, and a run never deadlocks on its own degradation.
    """

    def __init__(self, breaker: CircuitBreaker | None, pipeline: str, run_key: str,
                 stats: SlotStats | None = None, timeout_s: float = 60.0) -> None:
        self.breaker = breaker
        self.name = limit_name(pipeline, run_key, breaker.name) if breaker is not None else ""
        self.stats = stats
        self.timeout_s = timeout_s
        self._cm: Any = None

    def __enter__(self) -> "DegradedSlot":
        if self.breaker is not None and self.breaker.state is not State.CLOSED:
            self._acquire()
        return self

    def on_retry(self, exc: BaseException) -> None:
        """Call before each retry's wait: an open breaker's refusal makes this shard queue."""
        if self._cm is None and self.breaker is not None and isinstance(exc, BreakerOpenError):
            self._acquire()

    def _acquire(self) -> None:
        from prefect.concurrency.sync import concurrency

        t0 = time.perf_counter()
        try:
            cm = concurrency(self.name, occupy=1, timeout_seconds=self.timeout_s, strict=False,
                             lease_duration=_LEASE_S)
            cm.__enter__()
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            log.warning("no slot of %s (%s: %s); writing without it", self.name, type(exc).__name__, exc)
            return
        self._cm = cm
        if self.stats is not None:
            self.stats.waits += 1
            self.stats.wait_s += time.perf_counter() - t0

    def __exit__(self, *exc: Any) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            try:
                cm.__exit__(None, None, None)
            except Exception as e:  # noqa: BLE001 - the lease frees the slot within _LEASE_S
                log.warning("could not release a slot of %s (%s: %s)", self.name, type(e).__name__, e)


def degraded_slot(breaker: CircuitBreaker | None, pipeline: str, run_key: str,
                  stats: SlotStats | None = None, timeout_s: float = 60.0) -> DegradedSlot:
    """A :class:`DegradedSlot` for one batch write: ``with degraded_slot(...) as slot:``."""
    return DegradedSlot(breaker, pipeline, run_key, stats, timeout_s)


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


def run_report(cfg: PipelineConfig, run_key: str, since: float) -> dict[str, Any]:
    """Breaker transitions of this run since ``since`` (wall time), read from the shared objects.

    Returns:
        ``breaker_openings``, ``breaker_closings``, ``breaker_state`` (resource -> state at
        the end) and ``degraded`` (one entry per transition, oldest first).
    """
    storage = breaker_storage(cfg, run_key)
    out: dict[str, Any] = {"breaker_openings": 0, "breaker_closings": 0, "breaker_state": {}, "degraded": []}
    try:
        paths = [p for p in storage.ls(storage.root) if p.endswith(".json")]
    except Exception as exc:  # noqa: BLE001 - the summary must not fail a finished run
        log.warning("cannot list breaker states (%s: %s)", type(exc).__name__, exc)
        return out
    for p in paths:
        resource = p.rsplit("/", 1)[-1][: -len(".json")]
        try:
            doc = StorageSharedState(storage, p).read() or {}
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read breaker state of %s (%s: %s)", resource, type(exc).__name__, exc)
            continue
        out["breaker_state"][resource] = doc.get("state", "closed")
        for h in doc.get("history") or []:
            if float(h.get("at", 0)) < since:
                continue
            opened = h.get("state") == "open"
            out["breaker_openings" if opened else "breaker_closings"] += 1
            out["degraded"].append({
                "at": _iso(float(h["at"])), "resource": resource,
                "event": "breaker_opened" if opened else "breaker_closed",
                "reason": h.get("reason", ""),
                "concurrency": (f"at most {cfg.breaker.degraded_concurrency} shard(s) writing"
                                if opened else "restored"),
            })
    out["degraded"].sort(key=lambda e: e["at"])
    return out


def cleanup(cfg: PipelineConfig, run_key: str, resources: list[str]) -> None:
    """Delete the degraded-writers limits of a finished run (one API call per resource)."""
    if not resources:
        return
    try:
        from prefect import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            for r in resources:
                with contextlib.suppress(ObjectNotFound):
                    client.delete_global_concurrency_limit_by_name(limit_name(cfg.name, run_key, r))
    except Exception as exc:  # noqa: BLE001 - a finished run's leftover limit holds nobody back
        log.warning("could not delete degraded-writers limits (%s: %s)", type(exc).__name__, exc)
