"""Concurrency and rate limits for the sink and for named resources, held on the Prefect server.

Configured as::

    limits:
      sink:    {concurrency: 2, rate_per_s: 5}   # every sink write
      geo-api: {rate_per_s: 20}                  # calls wrapped with limited("geo-api")

Each configured resource gets up to two Prefect global concurrency limits:

* ``dpipeline-limit:<pipeline>:<resource>`` - ``concurrency`` slots, taken with a lease for
  the duration of one call and given back after it (Prefect's increment-with-lease and release
  endpoints, as ``prefect.concurrency.sync.concurrency`` uses them; see :class:`_SlotClient`
  for why not that function itself);
* ``dpipeline-rate:<pipeline>:<resource>`` - one slot that decays at ``rate_per_s`` per second,
  taken and never given back (``prefect.concurrency.sync.rate_limit``), so calls start at least
  ``1 / rate_per_s`` apart.

**Names are per pipeline and resource, not per run key.** The point of a limit is to protect
the resource, and two runs of the pipeline with different run keys (a backfill beside the
daily run) hit the same resource; so every run of the pipeline, in every Dask worker
process, draws from the same slots. Two pipelines with different names do not share them.

**Created at run start.** :func:`ensure_limits` (called by the flow before any shard starts)
creates the limits that are missing and updates those whose configured value changed (the
last run started wins if two runs of one pipeline are configured differently). A limit that
is deleted from the configuration is no longer used, but its server object is left alone,
since another run may still be using it; delete it with ``prefect gcl delete NAME``. A
limit deleted on the server during a run is recreated by the next call that misses it.

**Where the slot is taken.** For the sink, around each write *attempt*, inside the per-batch
retry and outside the circuit breaker (``shard.py``): a retry waits for its slot again, time
spent waiting for a slot never counts as a slow call of the resource, and a call that an open
breaker refuses takes no slot at all. Within the slot, the concurrency slot is taken first and
the rate token second, so the moments calls *start* are what is spaced, not the moments
tokens were handed out (tokens taken while waiting for a concurrency slot would bunch).

**What it costs.** Nothing when a resource has no limit: no API call, not even a lookup on
the server. With a limit: a concurrency slot is two API calls (acquire with a lease, release;
a call held longer than half a lease also gets renewals), a rate token one or more (the server
answers 423 with a Retry-After while the previous token has not decayed). Measured per slot
taken without waiting, in ``tests/test_limits.py``.

**Granularity of rate limits (Prefect 3.9, measured here).** The server decays
``floor(rate * seconds since the limit's last update)`` slots, and *every* update - a refused
attempt included - restarts that clock, so with several callers waiting the achieved rate is
below the configured one (measured with 4 callers in 2 processes: 72% of 5/s, 57% of 20/s),
never above it: calls start at least ``1 / rate_per_s`` apart, within the client's timing.
The limit has a single slot on purpose: with ``rate_per_s`` slots, a full bucket lets that many
calls through at once and a 1 s window can hold almost twice the rate (measured: 8 at 5/s).

Errors: waiting for a slot is not bounded (a limit means "wait your turn"); a Prefect server
that cannot be reached raises :class:`LimitUnavailableError`, a transient error, so the write's
retry waits and tries again; anything else the server refuses is a :class:`LimitError`.

Users limit their own calls with the running pipeline's configuration::

    from dpipeline_prefect.limits import limited

    @limited("geo-api")
    def lookup(batch): ...

    with limited("geo-api"):
        ...

Outside a run, or for a resource without a configured limit, ``limited`` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import LimitConfig, PipelineConfig
from .errors import TerminalError, TransientError
from .prefect_limits import Outcome, ensure_limit

__all__ = [
    "SINK",
    "LEASE_S",
    "LimitError",
    "LimitUnavailableError",
    "LimitStats",
    "RunLimits",
    "concurrency_limit_name",
    "rate_limit_name",
    "ensure_limits",
    "run_limits",
    "use_limits",
    "current_limits",
    "limited",
]

log = logging.getLogger("dpipeline_prefect.limits")

T = TypeVar("T")

SINK = "sink"
# Lease of a concurrency slot: Prefect renews it while the call runs; a killed holder's slot
# is given back by the server's repossessor within this (60 s is the server's minimum).
LEASE_S = 60.0


class LimitError(TerminalError):
    """The Prefect server refused a limit for a reason retrying cannot fix (``resource``)."""


class LimitUnavailableError(TransientError):
    """The Prefect server holding a limit could not be reached (``resource``)."""


def concurrency_limit_name(pipeline: str, resource: str) -> str:
    """The global concurrency limit capping calls of ``resource`` at once (all runs of ``pipeline``)."""
    return f"dpipeline-limit:{pipeline}:{resource}"


def rate_limit_name(pipeline: str, resource: str) -> str:
    """The decaying global concurrency limit spacing calls of ``resource`` (all runs of ``pipeline``)."""
    return f"dpipeline-rate:{pipeline}:{resource}"


def _server_limits(pipeline: str, resource: str, spec: LimitConfig) -> list[tuple[str, int, float]]:
    """``(name, limit, slot_decay_per_second)`` of the server objects behind one resource."""
    out = []
    if spec.concurrency is not None:
        out.append((concurrency_limit_name(pipeline, resource), spec.concurrency, 0.0))
    if spec.rate_per_s is not None:
        out.append((rate_limit_name(pipeline, resource), 1, float(spec.rate_per_s)))
    return out


def ensure_limits(cfg: PipelineConfig, resources: list[str] | None = None) -> dict[str, Outcome]:
    """Create the configured limits missing on the server; update those whose value changed.

    Args:
        cfg: the pipeline; its ``limits`` section says what to create.
        resources: only these resources (default: all configured).

    Returns:
        Limit name -> ``created`` / ``updated`` / ``unchanged``. Empty, with no API call,
        when nothing is configured.
    """
    todo = [(r, s) for r, s in cfg.limits.items() if resources is None or r in resources]
    if not todo:
        return {}
    from prefect import get_client

    done: dict[str, Outcome] = {}
    try:
        with get_client(sync_client=True) as client:
            for resource, spec in todo:
                for name, limit, decay in _server_limits(cfg.name, resource, spec):
                    done[name] = ensure_limit(client, name, limit, slot_decay_per_second=decay)
    except Exception as exc:  # noqa: BLE001 - classified: unreachable is transient
        raise _translate(exc, resources[0] if resources else "limits", "creating the limits") from exc
    for name, what in done.items():
        if what != "unchanged":
            log.info("concurrency limit %s %s", name, what)
    return done


@dataclass
class LimitStats:
    """What one resource's limits cost: slots taken and seconds spent getting them."""

    slots: int = 0
    wait_s: float = 0.0


def _transient_cause(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the server could not be reached or failed."""
    import httpx

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, httpx.HTTPStatusError) and (
                exc.response.status_code >= 500 or exc.response.status_code == 429):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _translate(exc: BaseException, resource: str, doing: str) -> Exception:
    if isinstance(exc, (TransientError, TerminalError)):
        return exc
    if _transient_cause(exc):
        return LimitUnavailableError(
            f"limit of {resource!r}: Prefect server unreachable while {doing} "
            f"({type(exc).__name__}: {exc})", resource=resource)
    return LimitError(f"limit of {resource!r}: {doing} failed ({type(exc).__name__}: {exc})",
                      resource=resource)


def _missing(exc: BaseException) -> bool:
    return "must be created before acquiring" in str(exc)


class RunLimits:
    """The limits of one pipeline as seen by one shard: takes slots, counts what they cost.

    Args:
        cfg: the pipeline (its name and ``limits`` section).
    """

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.pipeline = cfg.name
        self.specs: dict[str, LimitConfig] = dict(cfg.limits)
        self.stats: dict[str, LimitStats] = {}
        self._lock = threading.Lock()
        self._unknown_logged: set[str] = set()

    def configured(self, resource: str) -> bool:
        """True when ``resource`` has a limit (a call of it then takes a slot)."""
        return resource in self.specs

    @contextlib.contextmanager
    def slot(self, resource: str) -> Iterator[None]:
        """Hold ``resource``'s concurrency slot and rate token for the block.

        Without a configured limit this yields at once and calls nothing.
        """
        spec = self.specs.get(resource)
        if spec is None:
            if resource != SINK and resource not in self._unknown_logged:
                self._unknown_logged.add(resource)
                log.info("limits: %r has no configured limit in pipeline %r; its calls are not "
                         "limited", resource, self.pipeline)
            yield
            return
        t0 = time.perf_counter()
        held = self._acquire(resource, spec)
        waited = time.perf_counter() - t0
        with self._lock:
            st = self.stats.setdefault(resource, LimitStats())
            st.slots += 1
            st.wait_s += waited
        try:
            yield
        finally:
            if held is not None:
                try:
                    held.__exit__(None, None, None)
                except Exception as exc:  # noqa: BLE001 - the lease gives the slot back anyway
                    log.warning("limit of %r: could not release a slot (%s: %s); the server frees it "
                                "within %.0f s", resource, type(exc).__name__, exc, LEASE_S)

    def _acquire(self, resource: str, spec: LimitConfig) -> Any:
        """Take the concurrency slot (returned, to be exited), then the rate token."""
        held = None
        try:
            if spec.concurrency is not None:
                held = self._with_recreate(resource, lambda: _enter_concurrency(
                    concurrency_limit_name(self.pipeline, resource)))
            if spec.rate_per_s is not None:
                self._with_recreate(resource, lambda: _take_rate(rate_limit_name(self.pipeline, resource)))
        except BaseException:
            if held is not None:
                with contextlib.suppress(Exception):
                    held.__exit__(None, None, None)
            raise
        return held

    def _with_recreate(self, resource: str, take: Callable[[], T]) -> T:
        """``take()``; if the limit was deleted on the server meanwhile, recreate it once."""
        try:
            return take()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not _missing(exc):
                raise _translate(exc, resource, "taking a slot") from exc
        log.warning("limit of %r was missing on the Prefect server; recreating it", resource)
        ensure_limits(self.cfg, [resource])
        try:
            return take()
        except Exception as exc:  # noqa: BLE001
            raise _translate(exc, resource, "taking a slot") from exc

    def report(self) -> dict[str, dict[str, float | int]]:
        """Resource -> ``{"slots": n, "wait_s": s}`` for the resources that took slots."""
        with self._lock:
            return {r: {"slots": s.slots, "wait_s": round(s.wait_s, 3)} for r, s in sorted(self.stats.items())}


class _Missing(Exception):
    """The limit does not exist on the server (deleted during the run)."""

    def __str__(self) -> str:
        return f"limit {self.args[0]!r} must be created before acquiring slots"


class _SlotClient:
    """Concurrency slots of this process: one long-lived Prefect client and one lease keeper.

    Why not ``prefect.concurrency.sync.concurrency``: it is the same two API calls (acquire
    with a lease, release) plus a lease-renewal thread started per slot, which opens its own
    client and renews at once, and whose start-up the release waits for. Measured on this
    machine: 64 ms per slot against 8 ms here. The server objects, endpoints and lease
    semantics are Prefect's; what differs is that one thread per process renews the leases of
    slots held longer than half a lease (a write that lasts minutes keeps its slot), instead
    of one thread per slot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None
        self._url: str | None = None
        self._leases: dict[Any, float] = {}  # lease id -> last (re)newed, monotonic
        self._keeper: threading.Thread | None = None

    def client(self) -> Any:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        with self._lock:
            if self._client is None or url != self._url:
                client = get_client(sync_client=True)
                client.__enter__()
                self._client, self._url = client, url
            return self._client

    def acquire(self, name: str) -> Any:
        """Take one slot of ``name``, waiting as the server's Retry-After says; the lease id."""
        import httpx
        from uuid import UUID

        client = self.client()
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    names=[name], slots=1, mode="concurrency", lease_duration=LEASE_S)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                # Taken: the server says when to come back (average slot occupancy, with
                # jitter, at most 30 s).
                time.sleep(min(30.0, float(exc.response.headers.get("Retry-After") or 1.0)))
                continue
            body = response.json()
            if not body.get("limits"):
                raise _Missing(name)
            lease = UUID(body["lease_id"])
            with self._lock:
                self._leases[lease] = time.monotonic()
                if self._keeper is None:
                    self._keeper = threading.Thread(target=self._keep, name="dpipeline-limit-leases",
                                                    daemon=True)
                    self._keeper.start()
            return lease

    def release(self, lease: Any) -> None:
        with self._lock:
            self._leases.pop(lease, None)
        self.client().release_concurrency_slots_with_lease(lease_id=lease)

    def _keep(self) -> None:
        """Renew leases held for half a lease or more; stop when none has been held for a while."""
        idle = 0.0
        every = LEASE_S / 4
        while True:
            time.sleep(every)
            now = time.monotonic()
            with self._lock:
                due = [lease for lease, t in self._leases.items() if now - t >= LEASE_S / 2]
                idle = 0.0 if self._leases else idle + every
                if idle >= LEASE_S:
                    self._keeper = None  # under the lock: acquire() starts a new one if needed
                    return
            for lease in due:
                try:
                    self.client().renew_concurrency_lease(lease_id=lease, lease_duration=LEASE_S)
                    with self._lock:
                        if lease in self._leases:
                            self._leases[lease] = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - a blip: the next round tries again
                    log.warning("could not renew a limit slot's lease (%s: %s)", type(exc).__name__, exc)


_slots = _SlotClient()


class _Held:
    """A concurrency slot held by this thread; ``__exit__`` gives it back."""

    def __init__(self, lease: Any) -> None:
        self.lease = lease

    def __exit__(self, *exc: Any) -> None:
        _slots.release(self.lease)


def _enter_concurrency(name: str) -> _Held:
    return _Held(_slots.acquire(name))


def _take_rate(name: str) -> None:
    from prefect.concurrency.sync import rate_limit

    rate_limit(name, occupy=1, strict=True)


# -- the running shard's limits, for limited() -------------------------------------------------
_current: contextvars.ContextVar[RunLimits | None] = contextvars.ContextVar("dpipeline_limits", default=None)


def run_limits(cfg: PipelineConfig) -> RunLimits:
    """A fresh :class:`RunLimits` for one shard of ``cfg`` (its stats are that shard's)."""
    return RunLimits(cfg)


def current_limits() -> RunLimits | None:
    """The running shard's limits (set by the shard), or None outside a run."""
    return _current.get()


@contextlib.contextmanager
def use_limits(limits: RunLimits) -> Iterator[RunLimits]:
    """Make ``limits`` the current ones for the block (a shard does this around its loop)."""
    token = _current.set(limits)
    try:
        yield limits
    finally:
        _current.reset(token)


class limited:  # noqa: N801 - reads as a decorator / context manager
    """Hold a slot of the running pipeline's limit of ``resource`` around a call.

    ``@limited("geo-api")`` on a function, or ``with limited("geo-api"):`` around a block,
    inside a transform. The pipeline's ``limits.geo-api`` section says what the slot is; the
    limits are looked up at call time, so the same decorated function is limited inside a
    shard and does nothing outside a run (or when the resource has no limit configured).
    Time spent waiting is counted in the run summary (``limits.<resource>.wait_s``).
    """

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self._held = threading.local()

    def __enter__(self) -> None:
        lims = current_limits()
        cm = lims.slot(self.resource) if lims is not None else contextlib.nullcontext()
        cm.__enter__()
        stack = getattr(self._held, "stack", None)
        if stack is None:
            stack = self._held.stack = []
        stack.append(cm)

    def __exit__(self, *exc: Any) -> bool | None:
        return self._held.stack.pop().__exit__(*exc)

    def __call__(self, fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            with limited(self.resource):
                return fn(*args, **kwargs)

        return wrapper
