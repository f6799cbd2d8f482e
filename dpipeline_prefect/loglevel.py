"""The live log level: change how much a run logs while it is in progress, without restarting.

The level of the pipeline's loggers (``dpipeline_prefect`` and below: shards, checkpoints,
breakers, dead letters...) is kept in the **Prefect Variable**
``dpipeline-log-level-<pipeline>`` (a Prefect mechanism every process of a run already
reaches: the flow process, local or remote Dask workers; visible and editable in the UI).

* ``dpipeline loglevel PIPELINE.yaml DEBUG`` (or :func:`set_level`) writes it; ``reset``
  deletes it, and the run goes back to ``logging.level`` from the file (or the level the
  process had before the first change, INFO as ``logs.py`` sets it). The change is audited (``audit.py``, action ``loglevel``).
* Every process of a run reads it at batch boundaries, at most once per ``logging.poll_s``
  seconds (:func:`poll`; one small API call, on the shard's own thread: no thread, no
  signal handler), and sets its ``dpipeline_prefect`` logger's level. So the new level is
  in force everywhere within ``poll_s`` plus one batch.
* Where the lines go: ``logs.py`` attaches Prefect's API log handler to the
  ``dpipeline_prefect`` logger in the flow process and in each worker that runs a shard, so
  they land in the run's logs (the UI's log page), from Dask workers too, and as JSON lines
  with ``monitoring.log_format: json``. Its handlers have no level of their own: the
  logger's level set here decides.

A variable that cannot be read (the server briefly unreachable) keeps the current level:
logging never fails or slows a batch beyond that one call.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["LEVELS", "LOGGER", "variable_name", "parse_level", "set_level", "get_level", "poll", "apply"]

log = logging.getLogger("dpipeline_prefect.loglevel")

LOGGER = "dpipeline_prefect"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_VARIABLE_PREFIX = "dpipeline-log-level-"


def variable_name(pipeline: str) -> str:
    """The Prefect Variable holding ``pipeline``'s live log level."""
    return f"{_VARIABLE_PREFIX}{pipeline}"


def parse_level(level: str) -> str:
    """``level`` as one of :data:`LEVELS` (any case), or a ConfigError naming the choices."""
    from .errors import ConfigError

    up = str(level).strip().upper()
    if up not in LEVELS:
        raise ConfigError(f"log level {level!r}: expected one of {', '.join(LEVELS)} (or reset)", field="level")
    return up


def set_level(pipeline: str, level: str | None) -> None:
    """Set ``pipeline``'s live log level (``None``: delete it, back to the file's level)."""
    from prefect.variables import Variable

    name = variable_name(pipeline)
    if level is None:
        Variable.unset(name)
    else:
        Variable.set(name, parse_level(level), overwrite=True)


def get_level(pipeline: str) -> str | None:
    """The live log level stored for ``pipeline`` (None when none is set)."""
    from prefect.variables import Variable

    value = Variable.get(variable_name(pipeline), default=None)
    return parse_level(value) if value else None


def apply(level: str | None) -> bool:
    """Set the ``dpipeline_prefect`` logger to ``level`` (None: leave it); True if it changed."""
    if not level:
        return False
    lg = logging.getLogger(LOGGER)
    new = logging.getLevelName(level)
    if lg.level == new:
        return False
    lg.setLevel(new)
    log.info("log level of %s is now %s", LOGGER, level)
    return True


class _Poller:
    def __init__(self, pipeline: str, poll_s: float, default: str | None) -> None:
        self.pipeline = pipeline
        self.poll_s = poll_s
        # Without a live level: the file's level, else the level the process had at first.
        self.default = default or logging.getLevelName(logging.getLogger(LOGGER).getEffectiveLevel())
        self.next_at = 0.0  # the first poll reads at once
        self.lock = threading.Lock()
        self.reads = 0


_pollers: dict[tuple[str, float, Any], _Poller] = {}
_pollers_lock = threading.Lock()


def poll(cfg: Any) -> None:
    """At a batch boundary: read the live level if ``cfg.logging.poll_s`` has passed, apply it.

    One poller per pipeline per process, shared by the shards running in it; a thread that
    finds another one reading goes on at once.
    """
    lc = cfg.logging
    key = (cfg.name, lc.poll_s, lc.level)
    p = _pollers.get(key)
    if p is None:
        with _pollers_lock:
            p = _pollers.setdefault(key, _Poller(cfg.name, lc.poll_s, lc.level))
    now = time.monotonic()
    if now < p.next_at or not p.lock.acquire(blocking=False):
        return
    try:
        p.next_at = now + p.poll_s
        try:
            level = get_level(p.pipeline)
            p.reads += 1
        except Exception as exc:  # noqa: BLE001 - keep the current level
            log.debug("could not read %s (%s: %s)", variable_name(p.pipeline), type(exc).__name__, exc)
            return
        apply(level or p.default)
    finally:
        p.lock.release()
