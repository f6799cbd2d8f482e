"""Circuit breaker: stop calling a resource that is failing, try it again later.

A pybreaker-style state machine, written here because what a sharded run needs is not in
pybreaker (not installed here) or Prefect: rates over a sliding *time* window (failures and
slow calls, as in resilience4j) and one state shared by every shard of a run across Dask
worker processes.

States (:class:`State`):

* ``closed`` - calls go through. Each call is recorded in the window of the last
  ``window_s`` seconds; once the window holds ``min_calls`` calls, the breaker opens when
  the failed fraction reaches ``failure_rate`` or the slow fraction (calls of ``slow_call_s``
  or longer) reaches ``slow_call_rate``.
* ``open`` - calls fail fast with :class:`BreakerOpenError`, a :class:`TransientError`, so
  the retry around the call waits with backoff instead of hammering the resource.
* ``half_open`` - after ``open_s``, up to ``half_open_calls`` trial calls go through at a
  time; that many successes close the breaker, one failure (or slow call) opens it again.

Only failures that say something about the resource count (by default transient errors, as
classified by :func:`retry.is_transient`); a terminal error such as a schema mismatch is
passed on and neither counts for nor against the resource.

Why a time window: the breaker wraps one call per batch, and batch rates differ by orders of
magnitude between pipelines; a count window would span milliseconds in one and minutes in
another. A time window gives one bound for "how fast does it notice", and the sharing below
is bounded in the same unit.

Sharing across processes: each process keeps its own window (so counting never needs the
network), while the open/closed state is a tiny JSON object in a :class:`SharedState` (for a
run: ``<checkpoint.path>/<pipeline>/<run_key>/breaker/<resource>.json``, written atomically).
A breaker reads it at most every ``sync_s`` seconds (``sync_s <= window_s``), and only when
it is called, so once one process opens the breaker the others stop calling within
``sync_s``. It writes it only on its own transitions. Writes are last-writer-wins: two
processes closing and opening at the same moment end in one of the two states, and the next
calls settle it. The state store is the checkpoint storage because every runner (threads,
a local cluster, an external Dask cluster) already reaches it, with no new service.

The clock is injectable (wall time: shared state is compared across processes), and
listeners (:class:`BreakerListener`) hear every transition, so Prefect events, logs and the
degradation logic (``degrade.py``) live outside this module, which imports nothing from
Prefect or Dask.

Users wrap their own calls with a named breaker of the running pipeline::

    from dpipeline_prefect.breaker import circuit

    @circuit("geo-api")
    def lookup(batch): ...

    with circuit("geo-api").calling():
        ...
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, TypeVar

from .errors import TransientError
from .retry import is_transient

__all__ = [
    "State",
    "BreakerPolicy",
    "BreakerOpenError",
    "BreakerListener",
    "SharedState",
    "MemorySharedState",
    "StorageSharedState",
    "CircuitBreaker",
    "BreakerRegistry",
    "circuit",
    "current_registry",
    "use_registry",
]

log = logging.getLogger("dpipeline_prefect.breaker")

T = TypeVar("T")

_HISTORY = 50  # transitions kept in the shared object (the run summary reads them)
_WINDOW_CAP = 100_000  # calls kept in a window at most, whatever window_s is


class State(str, Enum):
    """A breaker's state; the value is what logs, events and the shared object say."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a breaker opens and how it recovers; the defaults match ``BreakerConfig``."""

    failure_rate: float = 0.5
    slow_call_rate: float = 1.0
    slow_call_s: float = 60.0
    window_s: float = 10.0
    min_calls: int = 10
    open_s: float = 5.0
    half_open_calls: int = 2
    sync_s: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> "BreakerPolicy":
        """Build from a ``BreakerConfig`` (or anything with the same attributes)."""
        return cls(cfg.failure_rate, cfg.slow_call_rate, cfg.slow_call_s, cfg.window_s,
                   cfg.min_calls, cfg.open_s, cfg.half_open_calls, cfg.sync_s)


class BreakerOpenError(TransientError):
    """The breaker of ``resource`` is open: the call was not made.

    Transient on purpose: a retry around the call waits and tries again, and by then the
    breaker may let a trial call through. ``retry_after_s`` says when it will.
    """


class BreakerListener(Protocol):
    """Hears every state change of a breaker (pybreaker's ``CircuitBreakerListener``)."""

    def state_change(self, breaker: "CircuitBreaker", old: State, new: State, info: dict[str, Any]) -> None:
        """Called after the change, outside the breaker's lock.

        ``info`` holds ``remote`` (True when the change was adopted from the shared state,
        i.e. another process made it), ``reason`` and, for an opening, the window's figures.
        """


class SharedState(Protocol):
    """Where a breaker's state is shared between processes."""

    def read(self) -> dict[str, Any] | None:
        """The shared document, or None when there is none yet."""

    def write(self, doc: dict[str, Any]) -> None:
        """Replace the shared document atomically."""


class MemorySharedState:
    """A :class:`SharedState` inside one process (tests; breakers without a run)."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] | None = None
        self.reads = 0
        self.writes = 0

    def read(self) -> dict[str, Any] | None:
        self.reads += 1
        return json.loads(json.dumps(self.doc)) if self.doc is not None else None

    def write(self, doc: dict[str, Any]) -> None:
        self.writes += 1
        self.doc = json.loads(json.dumps(doc))


class StorageSharedState:
    """A :class:`SharedState` as one JSON object on any fsspec storage (atomic writes).

    Args:
        storage: a ``storage.Storage``.
        path: the object's path in that storage.
    """

    def __init__(self, storage: Any, path: str) -> None:
        self.storage = storage
        self.path = path

    def read(self) -> dict[str, Any] | None:
        try:
            data = self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(data)
        except ValueError:
            return None  # written atomically, so only a foreign file can be unreadable
        return doc if isinstance(doc, dict) else None

    def write(self, doc: dict[str, Any]) -> None:
        self.storage.write_bytes(self.path, json.dumps(doc, sort_keys=True).encode())


class CircuitBreaker:
    """One named resource's breaker in this process, optionally sharing its state.

    Thread-safe: shards running as threads of one worker share it.

    Args:
        name: the resource (``sink`` or a user's name); appears in errors, logs and events.
        policy: thresholds and timings.
        shared: where the state is shared with other processes; None keeps it local.
        listeners: told of every transition.
        clock: wall-clock seconds (``time.time``); tests pass a fake.
        is_failure: which exceptions count against the resource (default: transient ones).
        owner: a label for the shared object's history (default: host:pid).
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        *,
        shared: SharedState | None = None,
        listeners: tuple[BreakerListener, ...] | list[BreakerListener] = (),
        clock: Callable[[], float] = time.time,
        is_failure: Callable[[BaseException], bool] = is_transient,
        owner: str | None = None,
    ) -> None:
        self.name = name
        self.policy = policy or BreakerPolicy()
        self.shared = shared
        self.listeners = list(listeners)
        self.clock = clock
        self.is_failure = is_failure
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}"
        self._lock = threading.RLock()
        self._state = State.CLOSED
        self._window: deque[tuple[float, bool, bool]] = deque()  # (time, failed, slow)
        self._failed = 0
        self._slow = 0
        self._opened_at = 0.0
        self._open_until = 0.0
        self._trials = 0  # half-open calls in flight
        self._trial_ok = 0
        self._seen = 0.0  # changed_at of the last shared document adopted or written
        self._synced_at = float("-inf")
        self._sync_failed = False
        # figures for the run summary
        self.calls = 0
        self.rejected = 0
        self.openings = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        """The current state (an open breaker past ``open_s`` reads as half-open)."""
        with self._lock:
            self._advance(self.clock())
            return self._state

    def snapshot(self) -> dict[str, Any]:
        """The state and window figures, for logs and tests."""
        with self._lock:
            now = self.clock()
            self._advance(now)
            self._prune(now)
            return {"resource": self.name, "state": self._state.value, "calls": len(self._window),
                    "failed": self._failed, "slow": self._slow,
                    "retry_after_s": max(0.0, self._open_until - now) if self._state is State.OPEN else 0.0}

    def _advance(self, now: float) -> None:
        if self._state is State.OPEN and now >= self._open_until:
            self._state = State.HALF_OPEN
            self._trials = self._trial_ok = 0
            log.info("breaker %s: half-open, letting up to %d trial call(s) through",
                     self.name, self.policy.half_open_calls)

    def _prune(self, now: float) -> None:
        w, horizon = self._window, now - self.policy.window_s
        while w and (w[0][0] <= horizon or len(w) > _WINDOW_CAP):
            _, failed, slow = w.popleft()
            self._failed -= failed
            self._slow -= slow

    def _reset_window(self) -> None:
        self._window.clear()
        self._failed = self._slow = 0

    # -- calls -------------------------------------------------------------------------------
    def before_call(self) -> float:
        """Admit one call or raise :class:`BreakerOpenError`; returns the call's start time.

        Pair with :meth:`on_success` / :meth:`on_failure` / :meth:`on_ignored` (``call`` and
        ``calling`` do it for you).
        """
        events: list[tuple[State, State, dict]] = []
        with self._lock:
            now = self.clock()
            if self.shared is not None and now - self._synced_at >= self.policy.sync_s:
                self._sync(now, events)
            self._advance(now)
            state = self._state
            admitted = state is State.CLOSED or (
                state is State.HALF_OPEN and self._trials < self.policy.half_open_calls)
            if admitted:
                self.calls += 1
                if state is State.HALF_OPEN:
                    self._trials += 1
            else:
                self.rejected += 1
                wait = max(0.0, self._open_until - now) if state is State.OPEN else self.policy.sync_s
        self._notify(events)
        if not admitted:
            raise BreakerOpenError(
                f"circuit breaker {self.name!r} is {state.value}: call not made, "
                f"retry in {wait:.1f} s", resource=self.name, retry_after_s=round(wait, 3))
        return now

    def on_success(self, started: float) -> None:
        """Record a call admitted at ``started`` that returned."""
        self._record(started, failed=False)

    def on_failure(self, started: float, exc: BaseException) -> None:
        """Record a call admitted at ``started`` that raised ``exc``."""
        if self.is_failure(exc):
            self._record(started, failed=True, error=exc)
        else:
            self.on_ignored(started)

    def on_ignored(self, started: float) -> None:
        """A call that says nothing about the resource (e.g. a terminal error): free its trial slot."""
        with self._lock:
            if self._state is State.HALF_OPEN and self._trials > 0:
                self._trials -= 1

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` through the breaker."""
        started = self.before_call()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, Exception):
                self.on_failure(started, exc)
            else:  # KeyboardInterrupt, cancellation: nothing learnt about the resource
                self.on_ignored(started)
            raise
        self.on_success(started)
        return result

    @contextlib.contextmanager
    def calling(self) -> Iterator[None]:
        """``with breaker.calling(): ...`` - the block is one call through the breaker."""
        started = self.before_call()
        try:
            yield
        except Exception as exc:
            self.on_failure(started, exc)
            raise
        except BaseException:
            self.on_ignored(started)
            raise
        self.on_success(started)

    def __call__(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Use the breaker as a decorator: every call of ``fn`` goes through it."""
        import functools

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return self.call(fn, *args, **kwargs)

        return wrapper

    def _record(self, started: float, failed: bool, error: BaseException | None = None) -> None:
        events: list[tuple[State, State, dict]] = []
        with self._lock:
            now = self.clock()
            slow = now - started >= self.policy.slow_call_s
            if self._state is State.HALF_OPEN:
                self._trials = max(0, self._trials - 1)
                if failed or slow:
                    why = f"trial call {'failed' if failed else 'was slow'}"
                    if error is not None:
                        why += f" ({type(error).__name__})"
                    self._open(now, why, {}, events)
                else:
                    self._trial_ok += 1
                    if self._trial_ok >= self.policy.half_open_calls:
                        self._close(now, f"{self._trial_ok} trial call(s) succeeded", events)
            elif self._state is State.CLOSED:
                self._window.append((now, failed, slow))
                self._failed += failed
                self._slow += slow
                self._prune(now)
                n = len(self._window)
                if n >= self.policy.min_calls:
                    fr, sr = self._failed / n, self._slow / n
                    if fr >= self.policy.failure_rate or sr >= self.policy.slow_call_rate:
                        what = (f"failure rate {fr:.0%}" if fr >= self.policy.failure_rate
                                else f"slow-call rate {sr:.0%}")
                        figures = {"calls": n, "failed": self._failed, "slow": self._slow,
                                   "failure_rate": round(fr, 4), "slow_call_rate": round(sr, 4)}
                        self._open(now, f"{what} over the last {n} call(s) in {self.policy.window_s:g} s",
                                   figures, events)
            # OPEN: a call admitted before another thread opened the breaker; nothing to learn
        self._notify(events)

    # -- transitions (called with the lock held) ----------------------------------------------
    def _open(self, now: float, reason: str, figures: dict, events: list) -> None:
        old = self._state
        self._state = State.OPEN
        self._opened_at = now
        self._open_until = now + self.policy.open_s
        self._trials = self._trial_ok = 0
        self._reset_window()
        self.openings += 1
        info = {"remote": False, "reason": reason, "open_s": self.policy.open_s, **figures}
        self._publish(now, "open", reason)
        events.append((old, State.OPEN, info))

    def _close(self, now: float, reason: str, events: list) -> None:
        old = self._state
        self._state = State.CLOSED
        self._reset_window()
        self._trials = self._trial_ok = 0
        info = {"remote": False, "reason": reason}
        if self.shared is not None:
            doc = self._read_shared()
            if doc is not None and doc.get("state") == "closed" and float(doc.get("changed_at", 0)) >= self._opened_at:
                # Another process closed it after this opening: adopt that quietly, so one
                # recovery is announced once.
                self._seen = max(self._seen, float(doc["changed_at"]))
                info["remote"] = True
                events.append((old, State.CLOSED, info))
                return
        self._publish(now, "closed", reason)
        events.append((old, State.CLOSED, info))

    def _publish(self, now: float, state: str, reason: str) -> None:
        if self.shared is None:
            return
        doc = self._read_shared() or {}
        history = list(doc.get("history") or [])
        history.append({"state": state, "at": now, "reason": reason, "by": self.owner})
        new = {
            "resource": self.name,
            "state": state,
            "changed_at": now,
            "open_until": self._open_until if state == "open" else None,
            "openings": int(doc.get("openings", 0)) + (state == "open"),
            "history": history[-_HISTORY:],
        }
        try:
            self.shared.write(new)
        except Exception as exc:  # noqa: BLE001 - sharing is best effort; this process still obeys
            log.warning("breaker %s: could not share its state (%s: %s)", self.name, type(exc).__name__, exc)
            return
        self._seen = now
        self._synced_at = now

    def _read_shared(self) -> dict[str, Any] | None:
        try:
            doc = self.shared.read() if self.shared is not None else None
        except Exception as exc:  # noqa: BLE001 - an unreachable store must not fail the call
            if not self._sync_failed:
                log.warning("breaker %s: cannot read the shared state (%s: %s); using this "
                            "process's view", self.name, type(exc).__name__, exc)
            self._sync_failed = True
            return None
        self._sync_failed = False
        return doc

    def _sync(self, now: float, events: list) -> None:
        """Adopt a newer shared state written by another process."""
        self._synced_at = now
        doc = self._read_shared()
        if not doc:
            return
        changed = float(doc.get("changed_at") or 0.0)
        if changed <= self._seen:
            return
        self._seen = changed
        state = doc.get("state")
        old = self._state
        if state == "open":
            until = float(doc.get("open_until") or changed + self.policy.open_s)
            if old is State.OPEN and until <= self._open_until:
                return
            self._state = State.OPEN
            self._opened_at, self._open_until = changed, until
            self._trials = self._trial_ok = 0
            self._reset_window()
            events.append((old, State.OPEN, {"remote": True, "reason": "opened by another process",
                                             "open_s": max(0.0, until - now)}))
        elif state == "closed" and old is not State.CLOSED:
            self._state = State.CLOSED
            self._reset_window()
            self._trials = self._trial_ok = 0
            events.append((old, State.CLOSED, {"remote": True, "reason": "closed by another process"}))

    def _notify(self, events: list[tuple[State, State, dict]]) -> None:
        for old, new, info in events:
            if new is State.OPEN and not info["remote"]:
                log.warning("breaker %s: opened (%s); failing fast for %.1f s",
                            self.name, info["reason"], self.policy.open_s)
            else:
                log.info("breaker %s: %s -> %s (%s)", self.name, old.value, new.value, info["reason"])
            for listener in list(self.listeners):
                try:
                    listener.state_change(self, old, new, info)
                except Exception as exc:  # noqa: BLE001 - a broken listener must not fail a call
                    log.warning("breaker %s: listener %r failed: %s", self.name, listener, exc)


class BreakerRegistry:
    """The named breakers of one run in this process, made on first use.

    Args:
        make: builds the breaker for a name (``degrade.py`` gives it the run's shared store
            and listeners).
    """

    def __init__(self, make: Callable[[str], CircuitBreaker] | None = None) -> None:
        self._make = make or (lambda name: CircuitBreaker(name))
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> CircuitBreaker:
        """The breaker of resource ``name`` (created on first use)."""
        with self._lock:
            b = self._breakers.get(name)
            if b is None:
                b = self._breakers[name] = self._make(name)
            return b

    def breakers(self) -> list[CircuitBreaker]:
        with self._lock:
            return list(self._breakers.values())


_default_registry = BreakerRegistry()
_current: contextvars.ContextVar[BreakerRegistry | None] = contextvars.ContextVar(
    "dpipeline_breakers", default=None)


def current_registry() -> BreakerRegistry:
    """The running shard's registry (shared across the run), or a process-local one outside a run."""
    return _current.get() or _default_registry


@contextlib.contextmanager
def use_registry(registry: BreakerRegistry) -> Iterator[BreakerRegistry]:
    """Make ``registry`` the current one in this thread for the block (a shard does this)."""
    token = _current.set(registry)
    try:
        yield registry
    finally:
        _current.reset(token)


class circuit:  # noqa: N801 - reads as a decorator
    """A user's handle on a named breaker of the running pipeline.

    ``@circuit("geo-api")`` on a function, or ``with circuit("geo-api").calling():`` around a
    block. The breaker is looked up at call time, so the same decorated function shares the
    run's state inside a shard (all workers of the run) and falls back to a process-local
    breaker outside one.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def breaker(self) -> CircuitBreaker:
        return current_registry().get(self.name)

    def __call__(self, fn: Callable[..., T]) -> Callable[..., T]:
        import functools

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return self.breaker.call(fn, *args, **kwargs)

        return wrapper

    def calling(self) -> contextlib.AbstractContextManager[None]:
        return self.breaker.calling()
