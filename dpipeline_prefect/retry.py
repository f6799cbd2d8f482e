"""Retry policy: which errors are worth another attempt, and how long to wait before it.

Two layers use the same :class:`RetryPolicy` (from the pipeline's ``retry`` section):

* **Inside a shard**, :func:`call_with_retry` wraps each sink write, so a flaky sink costs one
  batch rewrite (same deterministic file names) instead of a shard restarted from its start.
* **Around a whole task**, :func:`prefect_task_options` gives Prefect's own task options
  (``retries``, ``retry_delay_seconds``, ``retry_jitter_factor``, ``retry_condition_fn``) for
  ``shard_task.with_options(...)``: when the in-shard retries are used up, or the failure was
  elsewhere (reading, checkpointing), Prefect re-runs the task and it resumes from its
  checkpoint.

Only *transient* errors are retried (:func:`is_transient`): our :class:`TransientError` kinds
(storage unreachable, S3 5xx / SlowDown, timeouts), raw network errors that escaped
translation, and a lost Dask worker. Terminal errors (bad config, schema mismatch, permission
denied, a bug in a transform) are re-raised at once: retrying them only delays the message.

tenacity is not installed in this environment (Prefect 3.9 does not depend on it), so the loop
is written here; it is short, and its sleep and random source are injectable so tests never
wait. This module is pure: it imports nothing from Prefect.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import DPipelineError

__all__ = [
    "RetryPolicy",
    "backoff_schedule",
    "jittered",
    "is_transient",
    "call_with_retry",
    "prefect_task_options",
    "retry_condition",
]

T = TypeVar("T")

# Errors of Dask's own machinery that mean "the process running this went away", matched by
# name so this module does not import distributed.
_LOST_WORKER_NAMES = {"KilledWorker", "CommClosedError", "WorkerLostError", "FutureCancelledError"}


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and delays; the defaults match ``RetryConfig``.

    Attributes:
        max_attempts: attempts in all, the first included (1 = no retry).
        base_delay_s: delay before the first retry.
        max_delay_s: cap on every delay, jitter included.
        multiplier: growth factor between consecutive delays.
        jitter: each delay varies randomly by up to this fraction (0 = exact schedule).
    """

    max_attempts: int = 4
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("delays must satisfy 0 <= base_delay_s <= max_delay_s")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("multiplier must be >= 1 and jitter within [0, 1]")

    @classmethod
    def from_config(cls, cfg: Any) -> "RetryPolicy":
        """Build from a ``RetryConfig`` (or anything with the same attributes)."""
        return cls(cfg.max_attempts, cfg.base_delay_s, cfg.max_delay_s, cfg.multiplier, cfg.jitter)


def backoff_schedule(policy: RetryPolicy) -> list[float]:
    """The delay before each retry, without jitter: ``base * multiplier**i`` capped at max.

    Its length is ``max_attempts - 1`` (one delay per retry).
    """
    return [min(policy.max_delay_s, policy.base_delay_s * policy.multiplier**i)
            for i in range(policy.max_attempts - 1)]


def jittered(delay: float, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """``delay`` varied uniformly by +-``jitter`` of itself, never above ``max_delay_s``.

    Jitter spreads the retries of many shards that failed together (a sink outage), so they
    do not all hit the recovering resource in the same instant.
    """
    if delay <= 0 or policy.jitter <= 0:
        return max(0.0, delay)
    r = (rng or random).uniform(-policy.jitter, policy.jitter)
    return min(policy.max_delay_s, delay * (1.0 + r))


def is_transient(exc: BaseException) -> bool:
    """True when the same call may succeed if tried again later.

    Our errors carry their kind (``transient``). Raw ``ConnectionError`` / ``TimeoutError``
    (a network failure that no storage call translated) and a lost Dask worker are transient
    too. Everything else - including a plain ``Exception`` from user code - is terminal.
    """
    if isinstance(exc, DPipelineError):
        return bool(exc.transient)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__name__ in _LOST_WORKER_NAMES


# How long one call may wait in total on open circuit breakers before giving up (and
# leaving it to the task-level retry, which resumes from the checkpoint).
BREAKER_WAIT_BUDGET_S = 300.0


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn()``; on a transient error wait and call it again, up to ``max_attempts``.

    Args:
        fn: the operation; it must be safe to repeat (sink writes are: same names, atomic).
        policy: attempts and delays.
        sleep: how to wait (tests pass a recorder so they never wait).
        on_retry: called as ``on_retry(attempt, error, delay)`` before each wait, where
            ``attempt`` is the number of the attempt that just failed (1-based).
        rng: random source for the jitter.

    Returns:
        What ``fn`` returned on its first successful attempt.

    An error carrying ``retry_after_s`` (an open circuit breaker's refusal: the call was not
    made) uses up no attempt: the call waits that long and tries again, for at most
    ``BREAKER_WAIT_BUDGET_S`` in all.

    Raises:
        The first terminal error at once, or the last transient error once the attempts are
        used up (then a Prefect task retry, if configured, takes over).
    """
    schedule = backoff_schedule(policy)
    attempt = 1
    waited_on_breaker = 0.0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless transient
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None and is_transient(exc) and waited_on_breaker < BREAKER_WAIT_BUDGET_S:
                # An open circuit breaker refused the call: nothing was tried, so no attempt
                # is used up. Wait until it lets calls through again (with jitter, so shards
                # do not all come back at once), within an overall budget.
                delay = jittered(max(float(retry_after), policy.base_delay_s / 10), policy, rng)
                waited_on_breaker += delay
                if on_retry is not None:
                    on_retry(attempt, exc, delay)
                sleep(delay)
                continue
            if attempt >= policy.max_attempts or not is_transient(exc):
                raise
            delay = jittered(schedule[attempt - 1], policy, rng)
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
            attempt += 1


def retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry the task only if it failed with a transient error."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the task's own failure, classified
        return is_transient(exc)
    return False


def prefect_task_options(policy: RetryPolicy) -> dict[str, Any]:
    """Keyword arguments for ``task.with_options(...)`` implementing ``policy`` the Prefect way.

    Prefect's jitter (``retry_jitter_factor``) can lengthen a delay by up to ``jitter`` times
    itself, so the schedule handed to Prefect is capped at ``max_delay_s / (1 + jitter)``:
    no delay Prefect draws exceeds ``max_delay_s``.
    """
    cap = policy.max_delay_s / (1.0 + policy.jitter)
    delays = [round(min(d, cap), 3) for d in backoff_schedule(policy)]
    return {
        "retries": policy.max_attempts - 1,
        "retry_delay_seconds": delays or 0,
        "retry_jitter_factor": policy.jitter or None,
        "retry_condition_fn": retry_condition,
    }
