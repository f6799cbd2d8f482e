"""Crash points for fault-injection tests: SIGKILL the whole run at a named moment.

Set ``DPIPELINE_CRASHPOINT=name[:n]`` and the n-th time (default 1st) a process reaches
``crashpoint(name)`` it kills its whole process group with SIGKILL: the ``dpipeline run``
process, its Dask workers and anything else it started, exactly like ``kill -9`` of the job.
Tests start the run in a new session so only that run dies. Unset (always, in production),
a crash point costs one dictionary lookup.

Named points: ``planned`` (manifest saved, nothing written), ``shuffle`` (a map task wrote
part of its staged files), ``before_write`` (a batch transformed, not yet written),
``after_write`` (a batch published, its checkpoint not yet saved), ``after_checkpoint``
(checkpoint saved), ``finalize`` (all shards done, run not yet marked complete).
Stream increments (``stream.py``): ``stream_planned`` (the increment's file list saved in the
state, nothing read), ``stream_before_write`` (windows computed, nothing written),
``stream_after_write`` (emitted windows and late rows published, state not committed),
``stream_after_commit`` (state committed).
"""

from __future__ import annotations

import os
import signal

__all__ = ["crashpoint"]

_SPEC = os.environ.get("DPIPELINE_CRASHPOINT", "")
_NAME, _, _N = _SPEC.partition(":")
_TARGET = int(_N) if _N.isdigit() else 1
_hits = 0


def crashpoint(name: str) -> None:
    """Kill the run here if the environment asks for it (tests only)."""
    global _hits
    if not _SPEC or name != _NAME:
        return
    _hits += 1
    if _hits >= _TARGET:
        try:
            os.killpg(os.getpgid(0), signal.SIGKILL)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
