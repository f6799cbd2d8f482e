"""One shard's loop: read -> batch -> transform -> write -> checkpoint, resumable at any point.

The order of the steps is what makes the output exactly-once:

1. On start, the shard's checkpoint says how far it got (``next_seq``, ``offset``). If it is
   resuming, output files of this shard at or past ``next_seq`` are removed first: they came
   from batches whose checkpoint never landed (``batches_reprocessed`` counts them).
2. The input is read from ``offset`` on, cut into batches, and each batch is transformed and
   written under its deterministic name (``sinks.py``).
3. Only after a batch's output is published does its checkpoint (``next_seq + 1``,
   ``offset + rows``) go to the asynchronous writer, which saves newest-first and never
   reorders a shard's saves. The writer is flushed before the shard is marked done.

A crash anywhere re-runs at most the batches after the last saved checkpoint; they rewrite
the same names.

With a ``dead_letter`` section, rows a transform or the sink rejects are isolated and written
to the dead-letter store under ``part-<id>-<seq>`` before step 3, removed past the checkpoint
in step 1, and counted in the checkpoint's cumulative ``rows_dead_letter`` (``dead_letter.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from . import loglevel, tracing
from .batching import batches
from .breaker import BreakerOpenError, State, use_registry
from .checkpoint import AsyncCheckpointWriter, CheckpointStore
from .config import PipelineConfig
from .crypto import cipher_for
from .dead_letter import DeadLetters, is_row_error
from .degrade import SINK, SlotStats, degraded_slot, run_registry
from .errors import TerminalError
from .faults import crashpoint
from .limits import run_limits, use_limits
from .logs import configure as configure_logs, log_context, set_batch
from .metrics import ShardMetrics
from .progress import report
from .retry import RetryPolicy, call_with_retry
from .shuffle import read_staged, stage_seal
from .sinks import Sink
from .sources import InputFile, read_batches, schema_from_b64
from .storage import Storage, cached_storage
from .transforms import apply_transforms, load_transforms, skipped_transforms

__all__ = ["ShardSpec", "ShardResult", "RunContext", "process_shard"]

log = logging.getLogger("dpipeline_prefect.shard")


@dataclass
class ShardSpec:
    """What one shard reads: source files (``files`` strategy) or staged shuffle files."""

    id: str
    label: str
    staged: bool
    inputs: list[dict]  # InputFile.to_dict()
    rows: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardSpec":
        return cls(**d)


@dataclass
class RunContext:
    """Everything a shard task needs, small and picklable (no open clients inside)."""

    cfg: PipelineConfig
    run_key: str
    schema_b64: str
    work_url: str
    trace: dict[str, str] | None = None  # W3C traceparent of the run span (tracing.py)


@dataclass
class ShardResult:
    shard: str
    label: str
    skipped: bool = False
    rows_in: int = 0  # cumulative over all runs of this run key
    rows_out: int = 0
    rows_dead_letter: int = 0  # cumulative, like rows_in (dead_letter.py)
    batches: int = 0
    rows_in_now: int = 0  # read by this attempt
    batches_reprocessed: int = 0
    retries: int = 0  # transient failures retried by this attempt (sink writes, the task itself)
    bytes_read: int = 0
    bytes_written: int = 0
    duration_s: float = 0.0
    breaker_rejections: int = 0  # sink write attempts refused by an open breaker (then retried)
    degraded_slot_waits: int = 0  # batches written under the degraded-writers limit (degrade.py)
    degraded_slot_wait_s: float = 0.0
    transforms_skipped: dict[str, int] = field(default_factory=dict)  # optional transform -> batches
    limits: dict[str, dict] = field(default_factory=dict)  # resource -> {slots, wait_s} (limits.py)
    extra: dict[str, Any] = field(default_factory=dict)


def _storages(ctx: RunContext) -> tuple[Storage, Storage, Storage]:
    cfg = ctx.cfg
    source = cached_storage(cfg.source.path, cfg.source.storage_options, "source")
    ckpt = cached_storage(cfg.checkpoint.path, cfg.checkpoint.storage_options, "checkpoint")
    work = cached_storage(ctx.work_url, cfg.checkpoint.storage_options, "checkpoint")
    return source, ckpt, work


def _stream(ctx: RunContext, spec: ShardSpec, source: Storage, work: Storage, schema: pa.Schema, skip: int, counters: dict):
    """The shard's deterministic row stream, from row ``skip`` on."""
    fmt = ctx.cfg.source.format
    seal = stage_seal(ctx.cfg, ctx.run_key) if spec.staged else None
    for d in spec.inputs:
        f = InputFile.from_dict(d)
        if f.rows is not None and skip >= f.rows:
            skip -= f.rows
            continue
        counters["bytes_read"] += f.size
        it = read_staged(work, f.path, skip, seal) if spec.staged else read_batches(source, f, fmt, schema, skip)
        skip = 0
        yield from it


def _count_retry(res: ShardResult, spec: ShardSpec, attempt: int, exc: BaseException, delay: float) -> None:
    res.retries += 1
    if isinstance(exc, BreakerOpenError):
        res.breaker_rejections += 1
    log.warning("shard %s: sink write attempt %d failed (%s); retrying in %.2f s",
                spec.label, attempt, exc, delay)


def process_shard(ctx: RunContext, spec: ShardSpec) -> ShardResult:
    """Run one shard to completion (or resume it); return its figures.

    Its log lines carry the pipeline, run key, shard and batch (``logs.py``). Traced as
    ``dpipeline.shard``, a child of the run's span (``ctx.trace``) in whatever process it runs,
    with a span per batch (``tracing.py``)."""
    configure_logs(ctx.cfg.monitoring.log_format)
    tracing.configure()  # once per process: a worker started without our preload
    try:
        with log_context(pipeline=ctx.cfg.name, run_key=ctx.run_key, shard=spec.label), \
                tracing.span("dpipeline.shard", {"dpipeline.pipeline": ctx.cfg.name, "dpipeline.run_key": ctx.run_key,
                                                 "dpipeline.shard": spec.id, "dpipeline.shard.label": spec.label,
                                                 "process.pid": os.getpid()},
                             parent=ctx.trace, link_current=True) as sp:
            res = _process_shard(ctx, spec)
            if not res.skipped:
                log.info("shard %s done: %d row(s) in, %d batch(es), %d retried, %.2f s", spec.label,
                         res.rows_in_now, res.batches, res.retries, res.duration_s)
            if sp is not None:
                sp.set_attributes({"dpipeline.rows_in": res.rows_in_now, "dpipeline.batches": res.batches,
                                   "dpipeline.skipped": res.skipped})
            return res
    finally:
        tracing.flush()


def _process_shard(ctx: RunContext, spec: ShardSpec) -> ShardResult:
    t0 = time.perf_counter()
    cfg = ctx.cfg
    loglevel.poll(cfg)  # the live log level (loglevel.py), then again at batch boundaries
    source, ckpt_storage, work = _storages(ctx)
    # Batch saves delete superseded generations 16 at a time (one request), and prune() at the
    # end leaves the usual latest + previous: on S3 that halves the requests per batch.
    store = CheckpointStore(ckpt_storage, cfg.name, ctx.run_key, prune_every=16,
                            cipher=cipher_for(cfg.encryption))
    state = store.load_shard(spec.id) or {}
    res = ShardResult(spec.id, spec.label)
    if state.get("done"):
        res.skipped = True
        res.rows_in, res.rows_out, res.batches = state["rows_in"], state["rows_out"], state["next_seq"]
        res.rows_dead_letter = int(state.get("rows_dead_letter", 0))
        return res

    sink = Sink(cfg.sink, ctx.run_key)
    next_seq = int(state.get("next_seq", 0))
    offset = int(state.get("offset", 0))
    rows_in = int(state.get("rows_in", 0))
    rows_out = int(state.get("rows_out", 0))
    bytes_written = int(state.get("bytes_written", 0))
    rows_dead = int(state.get("rows_dead_letter", 0))
    if state:
        # Resuming: output written past the last saved checkpoint is redone from scratch.
        res.batches_reprocessed = sink.remove_uncommitted(spec.id, next_seq)

    schema = schema_from_b64(ctx.schema_b64)
    transforms = load_transforms(cfg.transforms)
    dlq = None
    if cfg.dead_letter is not None:
        dlq = DeadLetters(cfg, ctx.run_key, spec.id, spec.label, schema, spec.rows, rows_dead)
        if state:  # dead rows of batches past the checkpoint are redone, like their output
            dlq.store.remove_uncommitted(spec.id, next_seq)
    counters = {"bytes_read": 0}
    # With tracing on, each checkpoint save is a span from submit to durable (tracing.py).
    saves = tracing.checkpoint_spans(store)
    writer = AsyncCheckpointWriter(saves)

    def checkpoint(doc: dict) -> None:
        if saves is not store:
            saves.submitted(spec.id, doc)
        writer.submit(spec.id, doc)

    # A fresh shard records that it started before it publishes any output (a resumed attempt
    # then knows to clean up past its checkpoint). The save runs in the background while the
    # first batch is read, and is waited for before that batch produces output.
    started_pending = not state
    if started_pending:
        checkpoint({"done": False, "next_seq": 0, "offset": 0, "rows_in": 0,
                    "rows_out": 0, "bytes_written": 0})
    retry_policy = RetryPolicy.from_config(cfg.retry)
    # The sink's breaker is shared by every shard of the run (degrade.py); it sits inside the
    # retry, so each attempt is recorded and an open breaker fails fast with a transient
    # error that the retry waits out with backoff. The registry is also the one user code
    # reaches with breaker.circuit(name) while this shard runs.
    registry = run_registry(cfg, ctx.run_key)
    brk = registry.get(SINK) if cfg.breaker.enabled else None
    guard = brk.call if brk is not None else (lambda fn, *args: fn(*args))
    # Concurrency / rate limits (limits.py): a slot per write attempt, inside the retry and
    # outside the breaker, so waiting for a slot is never a slow call and a call the breaker
    # refuses takes no slot. Without a sink limit the write path is unchanged: no API call.
    lims = run_limits(cfg)
    if lims.configured(SINK):
        breaker_call = guard

        def guard(fn, *args):
            if brk is not None and brk.state is State.OPEN:
                return breaker_call(fn, *args)  # refused at once: no slot for a call not made
            with lims.slot(SINK):
                return breaker_call(fn, *args)
    slots = SlotStats()
    scopes = contextlib.ExitStack()
    scopes.enter_context(use_registry(registry))  # breaker.circuit(name) in transforms
    scopes.enter_context(use_limits(lims))  # limits.limited(name) in transforms
    # Per-batch figures (metrics.py): a few additions per batch, RSS/CPU sampled once a second.
    sm = ShardMetrics(spec.id, spec.label) if cfg.monitoring.metrics else None
    try:
        stream = _stream(ctx, spec, source, work, schema, offset, counters)
        raw = batches(stream, cfg.batching.rows, cfg.batching.max_bytes, schema, offset)
        traced = tracing.traced_batches(raw, {"dpipeline.shard": spec.id, "dpipeline.first_seq": next_seq})
        if traced is not raw:
            scopes.callback(traced.close)  # ends the open batch span if the loop stops early
        for batch in traced:
            n_rows, row0, offset = batch.num_rows, batch.offset, batch.offset + batch.num_rows
            # Hand the Arrow buffers over to pandas and drop every other reference, so a
            # batch is held once (not as Arrow + pandas + output at the same time).
            set_batch(next_seq)
            table, batch = batch.table, None
            df = table.to_pandas(split_blocks=True, self_destruct=True)
            del table
            if started_pending:
                writer.flush()
                started_pending = False
            where = f"shard {spec.label} batch {next_seq}"
            n_dead = 0
            if dlq is None:
                out = apply_transforms(df, transforms, where=where)
                del df
            else:
                # Rows a transform rejects are isolated by bisection and written to the
                # dead-letter store before the checkpoint; the input is kept until the sink
                # accepted the rest, in case the sink rejects rows too.
                def apply(part, where=where):
                    return apply_transforms(part, transforms, where=where)

                out, dead = dlq.transform(df, apply)
                n_dead = dlq.commit(df, dead, next_seq, row0)
            for name in skipped_transforms(out):
                res.transforms_skipped[name] = res.transforms_skipped.get(name, 0) + 1
            crashpoint("before_write")
            # A transient sink failure retries this batch only (same names, atomic writes),
            # not the shard from its start.
            try:
                with tracing.span("dpipeline.sink.write", {"dpipeline.batch.seq": next_seq}), \
                        degraded_slot(brk, cfg.name, ctx.run_key, slots) as slot:
                    w = call_with_retry(lambda: guard(sink.write_batch, spec.id, next_seq, out), retry_policy,
                                        on_retry=lambda attempt, exc, delay: (
                                            _count_retry(res, spec, attempt, exc, delay), slot.on_retry(exc)))
            except TerminalError as e:
                if dlq is None or not is_row_error(e):
                    raise
                # Some partition files of this batch may be published: remove them, isolate
                # the rows the sink refuses, write the batch again under the same names.
                sink.remove_uncommitted(spec.id, next_seq)
                out, dead = dlq.sink_rejected(e, df, dead, apply, sink)
                n_dead = dlq.commit(df, dead, next_seq, row0)
                with tracing.span("dpipeline.sink.write", {"dpipeline.batch.seq": next_seq}), \
                        degraded_slot(brk, cfg.name, ctx.run_key, slots) as slot:
                    w = call_with_retry(lambda: guard(sink.write_batch, spec.id, next_seq, out), retry_policy,
                                        on_retry=lambda attempt, exc, delay: (
                                            _count_retry(res, spec, attempt, exc, delay), slot.on_retry(exc)))
            del out
            if dlq is not None:
                del df
                dlq.rows += n_dead
                rows_dead += n_dead
            crashpoint("after_write")
            next_seq += 1
            rows_in += n_rows
            rows_out += w.rows
            bytes_written += w.bytes
            res.rows_in_now += n_rows
            res.bytes_written += w.bytes
            if sm is None:
                report(f"{cfg.name}/{ctx.run_key}", spec.id, n_rows)
            else:
                report(f"{cfg.name}/{ctx.run_key}", spec.id, n_rows, label=spec.label, dead_total=rows_dead,
                       retries=res.retries, **sm.batch(next_seq - 1, n_rows, w.rows, n_dead, w.bytes),
                       **({"breaker": {SINK: brk.state.value}} if brk is not None else {}))
            log.debug("batch %d done: %d row(s) in, %d out, %d bytes written", next_seq - 1,
                      n_rows, w.rows, w.bytes)
            loglevel.poll(cfg)
            if cfg.checkpoint.per_batch:
                checkpoint(
                    {"done": False, "next_seq": next_seq, "offset": offset, "rows_in": rows_in,
                     "rows_out": rows_out, "bytes_written": bytes_written, "rows_dead_letter": rows_dead},
                )
        if dlq is not None:
            dlq.finish(rows_in)
        # The final document goes through the writer too: if the last batch's save is still
        # pending it is replaced, so a shard ends with one write, not two in a row.
        checkpoint(
            {"done": True, "next_seq": next_seq, "offset": offset, "rows_in": rows_in,
             "rows_out": rows_out, "bytes_written": bytes_written, "rows_dead_letter": rows_dead},
        )
        writer.flush()
        crashpoint("after_checkpoint")
    finally:
        scopes.close()
        try:
            writer.close()
        finally:
            if saves is not store:
                saves.close()
    store.prune(spec.id)
    res.rows_in, res.rows_out, res.batches = rows_in, rows_out, next_seq
    res.rows_dead_letter = rows_dead
    res.bytes_read = counters["bytes_read"]
    res.degraded_slot_waits, res.degraded_slot_wait_s = slots.waits, round(slots.wait_s, 3)
    res.limits = lims.report()
    res.duration_s = time.perf_counter() - t0
    if sm is not None:
        res.extra["metrics"] = sm.summary()
    return res
