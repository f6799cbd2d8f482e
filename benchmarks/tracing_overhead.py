"""What tracing costs: per call of the span helpers, off and on, and per shard batch.

    PYTHONPATH=. .venv/bin/python benchmarks/tracing_overhead.py

Off = no SDK provider (the default: no OTEL_EXPORTER_OTLP_ENDPOINT): ``tracing.span`` returns
one shared no-op context manager. On = an SDK provider with a batching processor and an
exporter that drops spans (what an OTLP export costs in this process, without the network).
A batch makes 4 spans (batch, sink write, checkpoint save; shard and run are per shard/run),
so "per batch" below is the cost of those at each batch.
"""

from __future__ import annotations

import time


def _per_call(fn, n: int = 200_000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e9


def _batch_cycle() -> None:
    from dpipeline_prefect import tracing

    for _ in tracing.traced_batches(range(1)):
        with tracing.span("dpipeline.sink.write", {"dpipeline.batch.seq": 0}):
            pass


def main() -> None:
    from dpipeline_prefect import tracing

    def span_call():
        with tracing.span("dpipeline.sink.write", {"dpipeline.batch.seq": 1}):
            pass

    off_span = _per_call(span_call)
    off_batch = _per_call(_batch_cycle, 100_000)

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    trace.set_tracer_provider(provider)
    tracing.refresh()
    on_span = _per_call(span_call, 50_000)
    on_batch = _per_call(_batch_cycle, 20_000)
    provider.shutdown()
    print(f"tracing off: {off_span:,.0f} ns per span() block, {off_batch:,.0f} ns per traced batch")
    print(f"tracing on:  {on_span:,.0f} ns per span() block, {on_batch:,.0f} ns per traced batch "
          "(batch + sink write spans, BatchSpanProcessor, exporter dropping spans)")


if __name__ == "__main__":
    main()
