"""Live progress from shards to whoever watches the run (the CLI's progress bar).

A shard reports each committed batch with :func:`report`. Inside a Dask worker the report
travels as a Dask worker event (``Worker.log_event``; the flow subscribes to the topic on its
client), so nothing extra runs beside the scheduler and nothing is sent per row. In the flow
process (thread runner) it goes straight to the registered hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TOPIC", "hooks", "emit", "report", "subscribe"]

TOPIC = "dpipeline-progress"

# Callables(event: str, payload: dict) registered by the CLI.
hooks: list[Callable[[str, dict], None]] = []


def emit(event: str, payload: dict) -> None:
    for hook in list(hooks):
        try:
            hook(event, payload)
        except Exception:  # noqa: BLE001 - a broken progress bar must not fail a run
            pass


def report(run: str, shard: str, rows: int, **figures: Any) -> None:
    """Report ``rows`` more input rows committed by ``shard`` of ``run``.

    ``figures`` are the batch's metrics (``metrics.ShardMetrics.batch``), carried to the flow
    process in the same message.
    """
    payload = {"run": run, "shard": shard, "rows": rows, **figures}
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        emit("batch", payload)
        return
    try:
        worker.log_event(TOPIC, payload)
    except Exception:  # noqa: BLE001 - progress is best effort
        pass


def subscribe(task_runner: Any, run: str) -> Callable[[], None]:
    """Forward this run's worker events to the hooks; return a function that unsubscribes."""
    if not hooks or not isinstance(getattr(type(task_runner), "client", None), property):
        return lambda: None
    try:
        # prefect-dask creates its client (and cluster) on first use: subscribing happens
        # before the first submit, so make it now.
        client = task_runner.client
    except Exception:  # noqa: BLE001 - progress is best effort; submit will report the error
        return lambda: None

    def handler(event: Any) -> None:
        _, msg = event
        if isinstance(msg, dict) and msg.get("run") == run:
            emit("batch", msg)

    try:
        client.subscribe_topic(TOPIC, handler)
    except Exception:  # noqa: BLE001
        return lambda: None

    def stop() -> None:
        try:
            client.unsubscribe_topic(TOPIC)
        except Exception:  # noqa: BLE001
            pass

    return stop
