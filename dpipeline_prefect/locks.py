"""One run of a pipeline and run key at a time, with Prefect's global concurrency limits.

The lock is a global concurrency limit named ``dpipeline-run:<pipeline>:<run_key>`` with
limit 1, created on the Prefect server when a run first needs it. A run takes its one slot
with a *lease* (``POST /v2/concurrency_limits/increment-with-lease``), renews the lease from a
background thread while it runs, and releases it when it ends. The server grants the slot
atomically, so of two runs started together exactly one gets it; the other waits
(``lock.wait_s``) or stops with :class:`RunLockedError` naming the holder.

What frees the lock of a run that was killed (verified in the Prefect 3.9 source):

* **Lease expiry.** The server refuses leases shorter than 60 s (``ge=60`` on
  ``lease_duration`` in ``server/api/concurrency_limits_v2.py``). Its *repossessor* service
  (``server/services/repossessor.py``, every ``server.services.repossessor.loop_seconds``,
  15 s by default) gives back the slots of expired leases. So a SIGKILLed holder blocks the
  next run for at most ``lease_s`` + 15 s + a waiter's poll - bounded, but a minute at least.
* **Dead holder on this machine: at once.** The holder also writes who it is (flow run, host,
  pid and the pid's start time, its lease id, a heartbeat) into a Prefect Variable. A waiting
  run on the same host that finds that process gone releases the dead lease by its id, so the
  usual "killed, re-run it" needs no minute of waiting.
* **Leases lost by a server restart.** Prefect keeps leases in memory by default
  (``server.concurrency.lease_storage = ...lease_storage.memory``) but the slot count in its
  database: after a restart (and always with the embedded server, which dies with a killed
  run) the slot stays taken with no lease left to expire - a lock that would never open. A
  waiter that finds the holder dead (gone from this host, or no heartbeat for ``lease_s`` +
  45 s) and the slot still taken after releasing the lease resets the limit's active slots.

Known limit: Prefect has no compare-and-set for that reset; two waiters repairing the same dead
holder in the same few milliseconds could both get in. The window needs a dead holder, two
waiters and a lost lease at once; the holder record is re-read right before the reset to keep
it as small as possible.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from .errors import RunLockedError
from .prefect_limits import ensure_limit

__all__ = ["RunLock", "lock_name", "HOLDER_GRACE_S"]

log = logging.getLogger("dpipeline_prefect.locks")

HOST = socket.gethostname()
# A holder on another host is taken for dead when its heartbeat is older than lease_s plus
# this: long enough for the server's repossessor (15 s loop) to have freed an expired lease
# first, so the reset is only the last resort.
HOLDER_GRACE_S = 45.0


def lock_name(pipeline: str, run_key: str) -> str:
    """The global concurrency limit that serialises runs of ``pipeline`` / ``run_key``."""
    return f"dpipeline-run:{pipeline}:{run_key}"


def _variable_name(name: str) -> str:
    # Variable names allow only [a-z0-9_-]; run keys allow more, so the record is keyed by hash.
    return "dpipeline_lock_" + hashlib.sha256(name.encode()).hexdigest()[:32]


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or not ours to see
        return None


def _pid_alive(pid: int, started: float | None) -> bool:
    """The process exists and is the same one (a reused pid has another start time)."""
    now_start = _process_start(pid)
    if now_start is None:
        return False
    return started is None or abs(now_start - started) < 1.0


def _delete_variable(client, name: str) -> None:
    from prefect.exceptions import ObjectNotFound

    try:
        client.delete_variable_by_name(name)
    except ObjectNotFound:
        pass


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


@dataclass
class RunLock:
    """The run lock of one pipeline and run key; use as a context manager.

    Args:
        pipeline: pipeline name.
        run_key: run key.
        wait_s: how long to wait for a held lock; 0 fails at once, None waits for ever.
        lease_s: lease on the Prefect server (>= 60 s, the server's minimum); renewed every
            quarter of it while the run lives.
        poll_s: pause between attempts while waiting.
        flow_run_id: the holder's flow run, shown to whoever finds the lock taken.

    Attributes:
        waited_s: seconds spent waiting for the lock (0.0 when it was free).
        freed: descriptions of dead holders whose lock this run freed.
    """

    pipeline: str
    run_key: str
    wait_s: float | None = 0.0
    lease_s: float = 60.0
    poll_s: float = 1.0
    flow_run_id: str | None = None
    waited_s: float = 0.0
    freed: list[str] = field(default_factory=list)
    _lease_id: UUID | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _record: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return lock_name(self.pipeline, self.run_key)

    @property
    def variable(self) -> str:
        return _variable_name(self.name)

    # -- acquire / release ---------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        """Take the lock, waiting up to ``wait_s``; raise :class:`RunLockedError` if it stays taken."""
        from prefect.client.orchestration import get_client

        t0 = time.monotonic()
        tries = 0
        with get_client(sync_client=True) as client:
            self._ensure_limit(client)
            while True:
                lease_id = self._try_take(client)
                if lease_id is not None:
                    break
                holder = self._read_holder(client)
                reason = self._dead_reason(holder)
                if reason is not None:
                    self._free_dead(client, holder, reason)
                    continue
                waited = time.monotonic() - t0
                if self.wait_s is not None and waited + self.poll_s > self.wait_s:
                    raise RunLockedError(self._locked_message(holder, waited),
                                         pipeline=self.pipeline, run_key=self.run_key,
                                         waited_s=round(waited, 1))
                # A slot released a moment ago can still count as taken on the server for a
                # short while: try again soon at first, then every poll_s.
                time.sleep(min(self.poll_s, 0.05 * 2 ** tries))
                tries += 1
            self.waited_s = round(time.monotonic() - t0, 3)
            self._lease_id = lease_id
            now = time.time()
            self._record = {
                "pipeline": self.pipeline, "run_key": self.run_key, "lease_id": str(lease_id),
                "flow_run_id": self.flow_run_id, "host": HOST, "pid": os.getpid(),
                "pid_start": _process_start(os.getpid()), "acquired": now, "heartbeat": now,
                "lease_s": self.lease_s,
            }
            self._write_holder(client)
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_alive, name=f"dpipeline-lock-{self.run_key}",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Give the lock back (idempotent). A failure here is logged: the lease expires anyway."""
        if self._lease_id is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        from prefect.client.orchestration import get_client

        lease_id, self._lease_id = self._lease_id, None
        try:
            with get_client(sync_client=True) as client:
                # Record first, slot second: once the slot is free a new holder may write its
                # own record, which must not be deleted by us.
                holder = self._read_holder(client)
                if holder and holder.get("lease_id") == str(lease_id):
                    _delete_variable(client, self.variable)
                client.release_concurrency_slots_with_lease(lease_id=lease_id)
        except Exception as exc:  # noqa: BLE001 - best effort; expiry frees it
            log.warning("could not release the run lock %s (%s); it frees itself within %.0f s",
                        self.name, type(exc).__name__, self.lease_s + 15)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- the pieces ----------------------------------------------------------------------------
    def _ensure_limit(self, client) -> None:
        # One slot, active - also repairs a lock someone edited in the UI.
        ensure_limit(client, self.name, 1)

    def _try_take(self, client) -> UUID | None:
        from prefect.client.schemas.objects import ConcurrencyLeaseHolder

        holder = None
        if self.flow_run_id:
            holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(str(self.flow_run_id)))
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[self.name], slots=1, mode="concurrency", lease_duration=self.lease_s, holder=holder)
        except Exception as exc:  # noqa: BLE001 - 423 means taken; anything else propagates
            if _status(exc) == 423:
                return None
            raise
        body = response.json()
        if not body.get("limits"):
            # The limit vanished between creation and now (deleted in the UI): recreate it.
            self._ensure_limit(client)
            return None
        return UUID(body["lease_id"])

    def _read_holder(self, client) -> dict | None:
        var = client.read_variable_by_name(self.variable)
        value = getattr(var, "value", None)
        return value if isinstance(value, dict) else None

    def _write_holder(self, client) -> None:
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        try:
            client.create_variable(VariableCreate(name=self.variable, value=self._record,
                                                  tags=["dpipeline-lock"]))
        except ObjectAlreadyExists:
            client.update_variable(VariableUpdate(name=self.variable, value=self._record))

    def _keep_alive(self) -> None:
        """Renew the lease and the heartbeat every quarter lease until released."""
        from prefect.client.orchestration import get_client

        every = max(1.0, self.lease_s / 4)
        # The client is made only when a renewal is due: a short run releases the lock before
        # the first one, and release() then does not wait for a client to be set up and closed.
        while not self._stop.wait(every):
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(lease_id=self._lease_id, lease_duration=self.lease_s)
                    self._record = {**self._record, "heartbeat": time.time()}
                    from prefect.client.schemas.actions import VariableUpdate

                    client.update_variable(VariableUpdate(name=self.variable, value=self._record))
            except Exception as exc:  # noqa: BLE001 - a server blip; the next beat tries again
                log.warning("run lock %s: lease renewal failed (%s)", self.name, type(exc).__name__)

    def _dead_reason(self, holder: dict | None) -> str | None:
        if not holder:
            return None
        if holder.get("host") == HOST and holder.get("pid") is not None:
            if not _pid_alive(int(holder["pid"]), holder.get("pid_start")):
                return f"its process {holder['pid']} on this host no longer exists"
            return None
        age = time.time() - float(holder.get("heartbeat") or 0)
        limit = float(holder.get("lease_s") or self.lease_s) + HOLDER_GRACE_S
        if age > limit:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _free_dead(self, client, holder: dict, reason: str) -> None:
        """Free the slot of a holder that is gone: its lease, or the count a lost lease left."""
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        lease_id = holder.get("lease_id")
        if lease_id:
            client.release_concurrency_slots_with_lease(lease_id=UUID(lease_id))
        limit = client.read_global_concurrency_limit_by_name(self.name)
        again = self._read_holder(client)
        if again is None or again.get("lease_id") != lease_id:
            return  # someone else already freed it (and may hold it now)
        if limit.active_slots > 0:
            # The lease was gone (server restart, embedded server) but the slot count stayed.
            client.update_global_concurrency_limit(self.name, GlobalConcurrencyLimitUpdate(active_slots=0))
        _delete_variable(client, self.variable)
        what = (f"run lock {self.name}: freed the lock of flow run {holder.get('flow_run_id')} "
                f"(pid {holder.get('pid')} on {holder.get('host')}): {reason}")
        self.freed.append(what)
        log.warning(what)

    def _locked_message(self, holder: dict | None, waited: float) -> str:
        who = "another run"
        if holder:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("acquired") or 0)))
            who = (f"flow run {holder.get('flow_run_id')} (pid {holder.get('pid')} on "
                   f"{holder.get('host')}, since {since})")
        return (f"pipeline {self.pipeline!r} run key {self.run_key!r} is already running: {who} holds "
                f"its run lock; waited {waited:.1f} s. Let that run finish, or set lock.wait_s to wait "
                "for it (null waits as long as it takes)")
