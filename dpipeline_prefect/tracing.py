"""OpenTelemetry tracing: a span per run, shard and batch, with the sink write and the
checkpoint save as children of their batch.

The tree of one run::

    <Prefect flow run span>            (Prefect's own, when its run telemetry is on)
      dpipeline.run                     pipeline, run key, flow run id
        dpipeline.shard                 one per shard run by this attempt (any process)
          dpipeline.batch               one per batch: read + transform + write
            dpipeline.sink.write        the batch's output (retries included)
            dpipeline.checkpoint.save   from submit to durable (the writer is asynchronous)

* **Joined to Prefect's spans.** Prefect 3 starts a span for every flow and task run with the
  global tracer provider (``prefect/telemetry/run_telemetry.py``) and makes it current while
  the run's code executes, so ``dpipeline.run`` is a child of the flow run's span. Shards run
  in Dask worker processes: the run span's W3C ``traceparent`` travels in the shard task's
  argument (:class:`~dpipeline_prefect.shard.RunContext` ``.trace``) and the shard span is
  its child; Prefect's task-run span current in the worker is attached as a *link*, so the
  tree stays run > shard while each shard still points at its Prefect task run.
* **Exported with the standard settings.** :func:`configure` installs an SDK tracer
  provider with a batching OTLP exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; the exporter itself reads the other
  ``OTEL_EXPORTER_OTLP_*`` variables (headers, certificate, timeout, compression),
  ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES`` name the service (default
  ``dpipeline``), and ``OTEL_SDK_DISABLED=true`` turns it all off. Protocol
  ``http/protobuf`` (the default); ``grpc`` when its exporter package is installed. A
  provider the application installed itself is used as it is. It runs in the flow process
  before the flow starts (``Pipeline.run``), in Dask workers when they start
  (``_preload.py``) and at each shard (for workers started elsewhere).
* **Zero cost when off.** With no SDK provider, :func:`span` returns one shared no-op
  context manager and :func:`traced_batches` / :func:`checkpoint_spans` return their input:
  one ``isinstance`` check per call, no span objects (``benchmarks/tracing_overhead.py``).

Span attributes hold names, counts and ids, never storage options: no secrets in traces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, Status, StatusCode

__all__ = [
    "TRACER_NAME",
    "configure",
    "enabled",
    "refresh",
    "span",
    "carrier",
    "traced_batches",
    "checkpoint_spans",
    "flush",
]

log = logging.getLogger("dpipeline_prefect.tracing")

TRACER_NAME = "dpipeline_prefect"
_NULL = contextlib.nullcontext()
_lock = threading.Lock()
_configured = False
_ours: Any = None  # the provider configure() installed (flushed at shard ends)
_tracers: dict[int, trace.Tracer] = {}


_on = False  # an SDK provider was seen: OpenTelemetry never replaces the global provider
_checked_at = float("-inf")
_RECHECK_S = 1.0


def enabled() -> bool:
    """True when an SDK (recording) tracer provider is installed in this process.

    Looking the provider up costs a few microseconds (OpenTelemetry reads the environment
    each time while none is set), so a negative answer is reused for a second: spans start
    at most a second after an application installs its provider.
    """
    global _on, _checked_at
    if _on:
        return True
    now = time.monotonic()
    if now - _checked_at < _RECHECK_S:
        return False
    _checked_at = now
    _on = not isinstance(trace.get_tracer_provider(), (ProxyTracerProvider, NoOpTracerProvider))
    return _on


def refresh() -> bool:
    """Look the global provider up again now (after a test replaced it); returns :func:`enabled`."""
    global _on, _checked_at
    _on, _checked_at = False, float("-inf")
    return enabled()


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def configure() -> bool:
    """Install the OTLP exporter from the standard environment, once per process.

    Returns:
        Whether tracing is on in this process (also True when the application had already
        installed its own SDK provider, which is then used unchanged).
    """
    global _configured, _ours
    if _configured:
        return enabled()
    with _lock:
        if _configured:
            return enabled()
        _configured = True
        if _truthy("OTEL_SDK_DISABLED") or refresh():
            return enabled()
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            return False
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            log.warning("tracing is off: OTLP %s export needs %s (pip install opentelemetry-sdk "
                        "opentelemetry-exporter-otlp-proto-%s)", protocol, exc.name,
                        "grpc" if protocol == "grpc" else "http")
            return False
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "dpipeline"}
        provider = TracerProvider(resource=Resource.create(attrs))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _ours = provider
        refresh()
        log.debug("tracing: OTLP %s export configured", protocol)
        return enabled()


def _tracer() -> trace.Tracer:
    provider = trace.get_tracer_provider()
    t = _tracers.get(id(provider))
    if t is None:
        from . import __version__ as version

        t = _tracers[id(provider)] = provider.get_tracer(TRACER_NAME, version)
    return t


def _parent(trace_carrier: dict[str, str] | None):
    return propagate.extract(trace_carrier) if trace_carrier else None


def span(name: str, attributes: dict[str, Any] | None = None, *, parent: dict[str, str] | None = None,
         link_current: bool = False):
    """A context manager for a span made current inside the block (the shared no-op when off).

    Args:
        name: the span name.
        attributes: span attributes (names, counts; never secrets).
        parent: a W3C carrier (:func:`carrier`) to be the parent instead of the current span,
            e.g. the run span's, passed to a shard in another process.
        link_current: with ``parent``, also link the span current here (Prefect's task run).
    """
    if not enabled():
        return _NULL
    links = None
    if link_current and parent:
        cur = trace.get_current_span().get_span_context()
        if cur.is_valid:
            links = [Link(cur, {"dpipeline.link": "prefect.task_run"})]
    return _tracer().start_as_current_span(name, context=_parent(parent), attributes=_clean(attributes),
                                           links=links)


def _clean(attributes: dict[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


def carrier() -> dict[str, str] | None:
    """The current span as a W3C ``traceparent`` carrier (None when off or no span)."""
    if not enabled() or not trace.get_current_span().get_span_context().is_valid:
        return None
    c: dict[str, str] = {}
    propagate.inject(c)
    return c or None


def traced_batches(batches: Iterable[Any], attributes: dict[str, Any] | None = None) -> Iterable[Any]:
    """Yield ``batches`` with a ``dpipeline.batch`` span current around each one's processing.

    A batch's span starts before it is read (reading is part of the batch) and ends when the
    loop asks for the next one or stops. When tracing is off ``batches`` is returned as is.
    """
    if not enabled():
        return batches
    return _traced_batches(iter(batches), dict(attributes or {}))


def _traced_batches(it: Iterator[Any], attributes: dict[str, Any]) -> Iterator[Any]:
    tracer = _tracer()
    seq = int(attributes.pop("dpipeline.first_seq", 0))
    while True:
        t0 = time.time_ns()
        try:
            item = next(it)
        except StopIteration:
            return
        sp = tracer.start_span("dpipeline.batch", start_time=t0,
                               attributes={**attributes, "dpipeline.batch.seq": seq,
                                           "dpipeline.batch.rows": int(getattr(item, "num_rows", 0) or 0)})
        token = otel_context.attach(trace.set_span_in_context(sp))
        try:
            yield item
        except GeneratorExit:
            # The loop stopped early (an error in the batch, recorded by the shard span).
            sp.set_status(Status(StatusCode.ERROR, "batch did not complete"))
            raise
        finally:
            otel_context.detach(token)
            sp.end()
        seq += 1


class _CheckpointSpans:
    """A ``CheckpointStore`` stand-in for the async writer that times each submitted save.

    :meth:`submitted` starts ``dpipeline.checkpoint.save`` under the current (batch) span;
    the writer thread's ``save_shard`` ends it when the document is durable. A document the
    writer coalesced away (a newer one replaced it) ends with ``coalesced=true`` when the
    newer one lands. Everything else is delegated to the real store.
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._open: dict[str, list[tuple[tuple[int, bool], Any]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def submitted(self, shard_id: str, doc: dict[str, Any]) -> None:
        sp = _tracer().start_span("dpipeline.checkpoint.save", attributes={
            "dpipeline.shard": shard_id, "dpipeline.checkpoint.next_seq": int(doc.get("next_seq", 0)),
            "dpipeline.checkpoint.done": bool(doc.get("done"))})
        with self._lock:
            self._open.setdefault(shard_id, []).append(((int(doc.get("next_seq", 0)), bool(doc.get("done"))), sp))

    def save_shard(self, shard_id: str, doc: dict[str, Any]) -> Any:
        key = (int(doc.get("next_seq", 0)), bool(doc.get("done")))
        err: BaseException | None = None
        try:
            return self._store.save_shard(shard_id, doc)
        except BaseException as exc:
            err = exc
            raise
        finally:
            with self._lock:
                spans = self._open.get(shard_id, [])
                done = [(k, s) for k, s in spans if k <= key]
                self._open[shard_id] = [(k, s) for k, s in spans if k > key]
            for k, s in done:
                if k != key:
                    s.set_attribute("dpipeline.checkpoint.coalesced", True)
                elif err is not None:
                    s.record_exception(err)
                    s.set_status(Status(StatusCode.ERROR, type(err).__name__))
                s.end()

    def close(self) -> None:
        """End the spans of documents never saved (the shard failed first)."""
        with self._lock:
            left = [s for spans in self._open.values() for _, s in spans]
            self._open.clear()
        for s in left:
            s.set_attribute("dpipeline.checkpoint.unsaved", True)
            s.end()


def checkpoint_spans(store: Any) -> Any:
    """Wrap ``store`` for an ``AsyncCheckpointWriter`` so its saves are spans (``store`` when off).

    Call ``wrapped.submitted(shard_id, doc)`` right before ``writer.submit(shard_id, doc)``
    and ``wrapped.close()`` after the writer is closed.
    """
    return _CheckpointSpans(store) if enabled() else store


def flush(timeout_s: float = 5.0) -> None:
    """Export the finished spans now, if :func:`configure` installed the exporter here.

    Called at the end of each shard: a Dask worker process may be stopped without running
    its exit hooks.
    """
    if _ours is not None:
        try:
            _ours.force_flush(int(timeout_s * 1000))
        except Exception as exc:  # noqa: BLE001 - tracing never fails the data path
            log.debug("tracing flush failed: %s", exc)
