"""Create or update a Prefect global concurrency limit: the one helper every user of them shares.

Three parts of the package keep objects of this kind on the Prefect server: the run lock
(``locks.py``: one slot per pipeline and run key), the degraded-writers limit
(``degrade.py``: fewer shards writing while a breaker is open) and the user's concurrency and
rate limits (``limits.py``). All three need the same thing - "make this limit exist, active,
with these values" - including the race of two processes creating it at the same moment, so
it is written once, here.

It takes an open client (``get_client(sync_client=True)``) so a caller that sets several
limits, or does more with the client, opens one connection. It never deactivates a limit:
Prefect 3.9 does not decrement an *inactive* limit when a holder releases its slot, so a
slot given back while inactive would stay counted until its lease expired (see
``degrade.py``).
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["ensure_limit", "Outcome"]

Outcome = Literal["created", "updated", "unchanged", "missing"]


def ensure_limit(client: Any, name: str, limit: int, *, slot_decay_per_second: float = 0.0,
                 create: bool = True) -> Outcome:
    """Make the global concurrency limit ``name`` exist, active, with these values.

    One read, plus one create or update only when something differs, so calling it on every
    run start costs one API call when nothing changed.

    Args:
        client: a synchronous Prefect client.
        name: the limit's name.
        limit: its number of slots.
        slot_decay_per_second: slots given back per second without a release (> 0 makes it
            usable by ``prefect.concurrency.sync.rate_limit``); 0 for a plain concurrency limit.
        create: False leaves a missing limit missing (updates only).

    Returns:
        What was done: ``created``, ``updated``, ``unchanged``, or ``missing`` (absent and
        ``create`` was False).
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    try:
        current = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        if not create:
            return "missing"
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(
                name=name, limit=limit, active=True, slot_decay_per_second=slot_decay_per_second))
            return "created"
        except ObjectAlreadyExists:
            # Another process created it at the same moment, perhaps with other values.
            current = client.read_global_concurrency_limit_by_name(name)
    changes: dict[str, Any] = {}
    if current.limit != limit:
        changes["limit"] = limit
    if not current.active:
        changes["active"] = True
    if abs(float(current.slot_decay_per_second or 0.0) - slot_decay_per_second) > 1e-9:
        changes["slot_decay_per_second"] = slot_decay_per_second
    if not changes:
        return "unchanged"
    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(**changes))
    return "updated"
