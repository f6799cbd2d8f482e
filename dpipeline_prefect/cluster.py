"""The local Dask cluster a run starts when no ``runner.address`` is given.

Kept apart from ``runner.py`` (which imports Prefect) so that the cluster can be started
*before* Prefect is imported in the flow process: worker processes then start and import
what a shard needs (``_preload.py``: Prefect's task engine, pandas, pyarrow, fsspec, this
package) while the flow process imports Prefect and creates the flow run, instead of after.
On a 2-core machine that hides most of a second of the fixed cost of a run.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

__all__ = ["local_cluster_kwargs", "EarlyCluster", "spawn_error"]


def local_cluster_kwargs(workers: int | None, threads_per_worker: int = 1, preload: bool = True) -> dict[str, Any]:
    """``distributed.LocalCluster`` arguments for a cluster of worker processes."""
    kwargs: dict[str, Any] = {
        "n_workers": workers or os.cpu_count() or 1,
        "threads_per_worker": threads_per_worker,
        "processes": True,
        "dashboard_address": None,
        # No dashboard, but the scheduler still serves /health and /metrics over HTTP on
        # 8787 unless told otherwise: a random port lets several clusters coexist.
        "scheduler_kwargs": {"dashboard_address": ":0"},
        "silence_logs": logging.WARNING,
    }
    if preload:
        kwargs["preload"] = ["dpipeline_prefect._preload"]
    return kwargs


def spawn_error():
    """The clear error for a LocalCluster whose worker processes could not start.

    Workers are started with multiprocessing's spawn: they re-import the main module, which
    fails for code from stdin or runs a script again without a main guard. Dask only says
    "Nanny failed to start".
    """
    from .errors import ConfigError

    return ConfigError(
        "the local Dask cluster could not start its worker processes. Run the pipeline from a "
        "script whose entry code sits under `if __name__ == \"__main__\":` (not from stdin), use "
        "the `dpipeline` command, or set runner.kind: threads",
        field="runner",
    )


class EarlyCluster:
    """Start a ``LocalCluster`` in a background thread now; ``address()`` waits for it.

    Use as a context manager around the run: the cluster is closed on exit.
    """

    def __init__(self, workers: int | None, threads_per_worker: int = 1) -> None:
        self._kwargs = local_cluster_kwargs(workers, threads_per_worker)
        self._cluster = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="dpipeline-cluster-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            import distributed

            self._cluster = distributed.LocalCluster(**self._kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised in address()
            self._error = exc

    def address(self) -> str:
        self._thread.join()
        if self._error is not None:
            if "Nanny failed to start" in str(self._error):
                raise spawn_error() from None
            raise self._error
        return self._cluster.scheduler_address

    def close(self) -> None:
        self._thread.join()
        if self._cluster is not None:
            self._cluster.close()

    def __enter__(self) -> "EarlyCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
