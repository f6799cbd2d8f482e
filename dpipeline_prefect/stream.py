"""Incremental, event-time processing: one run = one increment of a windowed aggregation.

A pipeline with a ``stream:`` section is run again and again (a deployment on an interval
schedule). Each run:

1. **plans** the increment: the source files not consumed yet (``incremental.py``), or with
   ``incremental: event_time`` the event-time range ``(mark, max event time in the source now]``,
   frozen in the state as ``pending`` (sequence number ``seq`` + files or range) *before*
   anything is written;
2. reads them, applies the transforms, and splits off **late** events: for tumbling / sliding
   windows an (event, window) pair is late when that window was already emitted (its end is at
   or before the watermark committed by the previous run); for session windows an event is late
   when its time is before that watermark (it could join a session already emitted);
3. **merges** the on-time events into the open windows' partial state (``windows.py``);
4. computes the **watermark** = max event time seen - ``watermark_delay`` and **emits** every
   window whose end is at or before it, once;
5. handles late events by ``stream.late``: ``dead_letter`` writes them (with ``_dlq_*``
   columns) to the pipeline's dead-letter store, ``drop_with_count`` only counts them, ``update``
   merges them into the emitted window's kept state and emits the window again with
   ``_version`` + 1 (consumers take, per window and key, the row with the highest ``_version``);
6. writes the emitted windows to the sink as ``part-w-<seq>`` (one file per run, or per
   partition) and the late rows as dead-letter ``part-late-<seq>``, then
7. **commits**: one atomic save of the state document holding the consumed-file mark, the open
   windows' partials (and, for ``update``, the emitted windows kept for ``update_ttl``), the
   watermark, the cumulative counters and no ``pending``.

Exactly once: the output of increment ``seq`` always has the same names and, since its input
is frozen in ``pending``, the same content. A run killed before the commit leaves ``pending``
in the state; the next run deletes whatever the interrupted one published for ``seq`` and
redoes that same increment, so every window is emitted once with the same values. A run killed
after the commit has nothing to redo. State is bounded: emitted windows' partials are dropped
at the commit (``update`` keeps them ``update_ttl`` past the watermark).

State layout (one checkpoint object, generational, checksummed, zstd-compressed by
``checkpoint.py``): run key ``_stream`` (a name no ``--run-key`` can take), shard ``state``.
Partials are Arrow IPC (zstd) inside the document, one row per (window start, window end,
group key). The sink's ownership marker and the dead-letter folder use the run key ``stream``
(``dpipeline dlq ls pipeline.yaml --run-key stream``).

This module is Prefect-free: ``flows.py`` runs :func:`run_increment` as one task, and tests can
call it directly.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from . import checkpoint
from .checkpoint import CheckpointStore
from .config import DeadLetterConfig, PipelineConfig, StreamConfig, parse_duration
from .errors import ConfigError, PipelineChangedError, TerminalError
from .faults import crashpoint
from .incremental import find_new_files, mark_consumed, max_event_time_after, read_event_range, read_files
from .sinks import Sink
from .storage import Storage
from .transforms import apply_transforms, load_transforms
from .windows import WE, WS, Aggregations, WindowSpec, assign_windows, finalize, merge_partials, partials, sessionize

__all__ = ["run_increment", "StreamState", "advance", "STATE_RUN_KEY", "STREAM_RUN_KEY", "OUTPUT_SHARD",
           "LATE_SHARD", "state_store"]

log = logging.getLogger("dpipeline_prefect.stream")

STATE_RUN_KEY = "_stream"  # checkpoint run key of the state ("_" cannot start a --run-key)
STATE_ID = "state"
STREAM_RUN_KEY = "stream"  # run key of the sink marker and of the dead-letter folder
OUTPUT_SHARD = "w"  # sink files part-w-<seq>
LATE_SHARD = "late"  # dead-letter files part-late-<seq>
_NS_MIN = np.iinfo(np.int64).min


# --------------------------------------------------------------------------- state


def _frame_to_b64(df: pd.DataFrame) -> str:
    table = pa.Table.from_pandas(df, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode()


def _frame_from_b64(data: str | None) -> pd.DataFrame:
    if not data:
        return pd.DataFrame()
    return pa.ipc.open_stream(pa.py_buffer(base64.b64decode(data))).read_all().to_pandas()


@dataclass
class StreamState:
    """Everything an increment needs from the previous ones (see the module docstring)."""

    seq: int = 0  # increments committed
    consumed: dict[str, list] = field(default_factory=dict)  # path -> [size, mtime]
    max_event_ns: int | None = None
    watermark_ns: int | None = None
    event_mark_ns: int | None = None  # incremental: event_time - rows up to this were read
    open: pd.DataFrame = field(default_factory=pd.DataFrame)  # partials of windows not emitted
    emitted: pd.DataFrame = field(default_factory=pd.DataFrame)  # late: update - kept emitted partials
    totals: dict[str, int] = field(default_factory=dict)
    pending: dict[str, Any] | None = None  # {"seq": n, "files": [...]} planned, not committed
    fingerprints: dict[str, str] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "consumed": self.consumed, "max_event_ns": self.max_event_ns,
            "watermark_ns": self.watermark_ns, "event_mark_ns": self.event_mark_ns, "open": _frame_to_b64(self.open) if len(self.open.columns) else None,
            "emitted": _frame_to_b64(self.emitted) if len(self.emitted.columns) else None,
            "open_windows": int(len(self.open)), "emitted_kept": int(len(self.emitted)),
            "totals": self.totals, "pending": self.pending, "fingerprints": self.fingerprints,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "StreamState":
        return cls(
            seq=int(doc.get("seq", 0)), consumed=dict(doc.get("consumed") or {}),
            max_event_ns=doc.get("max_event_ns"), watermark_ns=doc.get("watermark_ns"),
            event_mark_ns=doc.get("event_mark_ns"),
            open=_frame_from_b64(doc.get("open")), emitted=_frame_from_b64(doc.get("emitted")),
            totals=dict(doc.get("totals") or {}), pending=doc.get("pending"),
            fingerprints=dict(doc.get("fingerprints") or {}),
        )


def state_store(cfg: PipelineConfig) -> CheckpointStore:
    """The checkpoint store holding ``cfg``'s stream state (keyed by pipeline).

    Encrypted like every checkpoint when the pipeline has an ``encryption`` section (the state
    holds rows of open windows).
    """
    from .crypto import cipher_for

    return CheckpointStore(Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options, role="checkpoint"),
                           cfg.name, STATE_RUN_KEY, cipher=cipher_for(cfg.encryption))


# --------------------------------------------------------------------------- one step


@dataclass
class Step:
    """What one increment computed (nothing written yet)."""

    output: pd.DataFrame  # emitted windows (finalized), re-emissions included
    late: pd.DataFrame  # late rows for the dead-letter store (with _late_* reason columns)
    state: StreamState  # the state to commit
    counts: dict[str, int]


def _event_ns(df: pd.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    """int64 ns since the epoch (UTC) and a validity mask; naive timestamps are taken as UTC."""
    s = df[col]
    try:
        if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
            raise TypeError
        ts = pd.to_datetime(s, utc=True)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"stream.event_time: column {col!r} ({s.dtype}) cannot be read as timestamps"
            + (f": {e}" if str(e) else ""), field="stream.event_time") from None
    valid = ts.notna().to_numpy()
    ns = ts.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
    return ns, valid


def _check_columns(df: pd.DataFrame, sc: StreamConfig) -> None:
    cols = set(map(str, df.columns))
    for fieldname, names in (("stream.event_time", [sc.event_time]), ("stream.key", sc.key),
                             ("stream.aggregations", list(sc.aggregations))):
        for c in names:
            if c not in cols:
                where = fieldname if fieldname != "stream.aggregations" else f"stream.aggregations.{c}"
                raise ConfigError(
                    f"{where}: column {c!r} is not in the input (after transforms); columns are: "
                    f"{', '.join(map(str, df.columns))}", field=where)


def _fmt_ns(ns: int | None) -> str | None:
    return None if ns is None else pd.Timestamp(ns, tz="UTC").isoformat()


def advance(state: StreamState, df: pd.DataFrame, sc: StreamConfig, seq: int) -> Step:
    """Fold one increment's rows into ``state``: late split, window merge, watermark, emission.

    Pure: reads nothing, writes nothing. ``seq`` is the increment's sequence number (written
    as ``_run`` in the output).
    """
    spec = WindowSpec.from_config(sc.window)
    aggs = Aggregations(sc.aggregations)
    keys = list(sc.key)
    delay = int(parse_duration(sc.watermark_delay, "stream.watermark_delay").value)
    ttl = int(parse_duration(sc.update_ttl, "stream.update_ttl").value)
    update = sc.late == "update"
    extra = {"_version": "max"} if update else None
    counts = {"rows_in": int(len(df)), "rows_late": 0, "late_assignments": 0, "rows_no_event_time": 0,
              "late_expired": 0, "windows_emitted": 0, "windows_reemitted": 0}
    w_prev = state.watermark_ns
    open_ = state.open if len(state.open.columns) else merge_partials(pd.DataFrame(columns=[WS, WE, *keys, *aggs.partial_columns]), keys, aggs)
    kept = state.emitted
    late_parts: list[pd.DataFrame] = []
    max_ns = state.max_event_ns

    if len(df):
        _check_columns(df, sc)
        ns, valid = _event_ns(df, sc.event_time)
        if not valid.all():
            counts["rows_no_event_time"] = int((~valid).sum())
            bad = df[~valid].copy()
            bad["_late_reason"] = f"no value in event time column {sc.event_time!r}"
            bad["_late_window_start"] = pd.NaT
            late_parts.append(bad)
        dfv = df[valid].reset_index(drop=True)
        tv = ns[valid]
        if len(tv):
            max_ns = int(tv.max()) if max_ns is None else max(max_ns, int(tv.max()))
        if spec.kind == "session":
            late = (tv < w_prev) if w_prev is not None else np.zeros(len(tv), bool)
            on = ~late
            rp = aggs.row_partials(dfv)
            ev = pd.DataFrame({WS: tv[on], WE: tv[on] + spec.gap,
                               **{k: dfv[k].to_numpy()[on] for k in keys},
                               **{n: a[on] for n, a in rp.items()}})
            merged = sessionize(pd.concat([x for x in (open_, ev) if len(x)], ignore_index=True)
                                if len(open_) or len(ev) else ev, keys, aggs, spec.gap)
            if late.any():
                lr = dfv[late].copy()
                lr["_late_reason"] = ("event time is before the watermark "
                                      f"{_fmt_ns(w_prev)}: sessions it could join may be emitted")
                lr["_late_window_start"] = pd.NaT
                late_parts.append(lr)
                counts["rows_late"] = counts["late_assignments"] = int(late.sum())
        else:
            row, ws, we = assign_windows(tv, spec)
            lp = (we <= w_prev) if w_prev is not None else np.zeros(len(row), bool)
            new = partials(dfv, row[~lp], ws[~lp], we[~lp], keys, aggs)
            merged = merge_partials(pd.concat([x for x in (open_, new) if len(x)], ignore_index=True)
                                    if len(open_) or len(new) else new, keys, aggs)
            if lp.any():
                counts["late_assignments"] = int(lp.sum())
                late_rows = np.unique(row[lp])
                counts["rows_late"] = int(len(late_rows))
                if update:
                    lpart = partials(dfv, row[lp], ws[lp], we[lp], keys, aggs)
                    expired = lpart[WE].to_numpy() <= w_prev - ttl
                    if expired.any():
                        counts["late_expired"] = int(expired.sum())
                        lpart = lpart[~expired]
                    kept, touched = _update_kept(kept, lpart, keys, aggs)
                    counts["windows_reemitted"] = int(len(touched))
                else:
                    first_late = pd.Series(ws[lp]).groupby(row[lp]).min()
                    lr = dfv.iloc[late_rows].copy()
                    lr["_late_reason"] = (f"window already emitted (watermark {_fmt_ns(w_prev)}); "
                                          + pd.Series(np.bincount(row[lp])[late_rows]).astype(str).to_numpy()
                                          + " window(s)")
                    lr["_late_window_start"] = pd.to_datetime(first_late.loc[late_rows].to_numpy(), utc=True)
                    late_parts.append(lr)
    else:
        merged = open_
        touched = pd.DataFrame()

    w_new = None if max_ns is None else max_ns - delay
    if w_new is not None and len(merged):
        done = merged[WE].to_numpy() <= w_new
    else:
        done = np.zeros(len(merged), bool)
    to_emit = merged[done]
    still_open = merged[~done].reset_index(drop=True)
    counts["windows_emitted"] = int(len(to_emit))

    out = finalize(to_emit, keys, aggs)
    out["_version"] = np.ones(len(out), np.int64)
    outs = [out]
    if update:
        if counts["windows_reemitted"]:
            re = finalize(touched, keys, aggs)
            re["_version"] = touched["_version"].to_numpy(np.int64)
            outs.append(re)
        first = to_emit.assign(_version=np.ones(len(to_emit), np.int64))
        kept = pd.concat([x for x in (kept, first) if len(x)], ignore_index=True) if len(kept) or len(first) else first
        if w_new is not None and len(kept):
            kept = kept[kept[WE].to_numpy() > w_new - ttl].reset_index(drop=True)
    output = pd.concat([o for o in outs if len(o)], ignore_index=True) if any(len(o) for o in outs) else out
    output = output.sort_values(["window_start", "window_end", *keys, "_version"], kind="stable").reset_index(drop=True)
    output["_run"] = np.full(len(output), seq, np.int64)

    late_df = pd.concat(late_parts, ignore_index=True) if late_parts else pd.DataFrame()
    totals = dict(state.totals)
    for k, v in counts.items():
        totals[k] = int(totals.get(k, 0)) + int(v)
    new_state = StreamState(
        seq=seq, consumed=state.consumed, max_event_ns=max_ns, event_mark_ns=state.event_mark_ns,
        watermark_ns=w_new if w_new is None or w_prev is None else max(w_prev, w_new),
        open=still_open, emitted=kept if update else pd.DataFrame(), totals=totals, pending=None,
        fingerprints=state.fingerprints,
    )
    counts["windows_open"] = int(len(still_open))
    return Step(output, late_df, new_state, counts)


def _update_kept(kept: pd.DataFrame, late: pd.DataFrame, keys: list[str],
                 aggs: Aggregations) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge late partials into the kept emitted windows; bump their ``_version``.

    A (window, key) never emitted before (its window closed without events of that key) is
    emitted now as version 1. Returns the new kept frame and the touched rows.
    """
    idx = [WS, WE, *keys]
    late = merge_partials(late, keys, aggs).assign(_touched=1)
    if len(kept):
        both = pd.concat([kept.assign(_touched=0), late.assign(_version=0)], ignore_index=True)
    else:
        both = late.assign(_version=0)
    merged = merge_partials(both, keys, aggs, extra={"_version": "max", "_touched": "max"})
    hit = merged["_touched"].to_numpy() == 1
    merged.loc[hit, "_version"] = merged.loc[hit, "_version"].to_numpy() + 1
    merged["_version"] = merged["_version"].astype(np.int64)
    merged = merged.drop(columns="_touched")
    del idx
    return merged, merged[hit].reset_index(drop=True)


# --------------------------------------------------------------------------- one run


def _late_table(late: pd.DataFrame, seq: int) -> pa.Table:
    """Late rows in the dead-letter layout: their columns plus ``_dlq_*`` (see dead_letter.py)."""
    now = pd.Timestamp.now(tz="UTC")
    df = late.drop(columns=["_late_reason", "_late_window_start"]).copy()
    n = len(df)
    df["_dlq_error_type"] = np.where(late["_late_reason"].str.startswith("no value"), "MissingEventTime", "LateEvent")
    df["_dlq_error"] = late["_late_reason"].to_numpy()
    df["_dlq_stage"] = "stream"
    df["_dlq_shard"] = LATE_SHARD
    df["_dlq_batch"] = np.full(n, seq, np.int64)
    df["_dlq_row"] = np.arange(n, dtype=np.int64)
    df["_dlq_attempt"] = np.zeros(n, np.int64)
    df["_dlq_time"] = now
    df["_dlq_window_start"] = late["_late_window_start"].to_numpy()
    return pa.Table.from_pandas(df, preserve_index=False)


def _dead_letters(cfg: PipelineConfig):
    from .dead_letter import DeadLetterStore

    dl_cfg = cfg if cfg.dead_letter is not None else cfg.model_copy(update={"dead_letter": DeadLetterConfig()})
    return DeadLetterStore(dl_cfg, STREAM_RUN_KEY)


def run_increment(cfg: PipelineConfig, run_key: str = "default", restart: bool = False) -> dict[str, Any]:
    """Run one increment of the stream pipeline ``cfg`` (plan, read, window, emit, commit).

    Args:
        cfg: a pipeline with a ``stream`` section.
        run_key: a label for this run in the summary; state and output belong to the pipeline.
        restart: discard the stream state, the output and the late-event queue first.

    Returns:
        The run summary (``status`` is ``completed`` or ``no_new_input``).

    Raises:
        ConfigError: ``cfg`` has no stream section, or a configured column is missing.
        PipelineChangedError: the definition changed since the state was written.
    """
    if cfg.stream is None:
        raise ConfigError(f"pipeline {cfg.name!r} has no stream section", field="stream")
    sc = cfg.stream
    t0 = time.perf_counter()
    store = state_store(cfg)
    sink = Sink(cfg.sink, STREAM_RUN_KEY)
    dlq = _dead_letters(cfg) if sc.late == "dead_letter" else None
    fingerprints = cfg.fingerprints()
    summary: dict[str, Any] = {
        "pipeline": cfg.name, "run_key": run_key, "mode": "stream", "status": "running", "seq": None,
        "files_new": 0, "files_modified": 0, "files_too_old": 0, "resumed": False, "batches_reprocessed": 0,
        "rows_in": 0, "rows_out": 0, "rows_late": 0, "late_rule": sc.late, "rows_dead_letter": 0,
        "rows_late_dropped": 0, "rows_no_event_time": 0, "late_expired": 0, "windows_emitted": 0,
        "windows_reemitted": 0, "windows_open": 0, "watermark": None, "max_event_time": None,
        "state_bytes": 0, "bytes_written": 0, "sink": sink.storage.url,
    }
    if restart:
        marker = sink.read_marker()
        if marker and marker.get("pipeline") != cfg.name:
            raise TerminalError(
                f"--restart refused: sink {sink.storage.url} holds output of another pipeline "
                f"({marker.get('pipeline')!r})", path=sink.storage.url)
        from .audit import audited  # Prefect events: who discarded the state (audit.py)

        with audited("restart", cfg.name, STREAM_RUN_KEY, {"sink": sink.storage.url, "stream": True,
                                                           "checkpoint": cfg.checkpoint.path}) as rec:
            store.delete_run()
            removed = sink.clear()
            rec.details["output_files_removed"] = removed
            if dlq is not None:
                dlq.clear()
                rec.details["dead_letters_cleared"] = True
        log.info("restart: removed the stream state of %s and %d output file(s)", cfg.name, removed)

    doc = store.load_shard(STATE_ID)
    state = StreamState.from_doc(doc) if doc is not None else StreamState(fingerprints=fingerprints)
    changed = sorted(k for k in set(state.fingerprints) | set(fingerprints)
                     if state.fingerprints.get(k) != fingerprints.get(k))
    if changed and state.seq == 0:
        # nothing committed yet (e.g. the first increment failed on a missing column and the
        # definition was fixed): the new definition simply takes over; its output is redone
        state.fingerprints = fingerprints
    elif changed:
        raise PipelineChangedError(
            f"pipeline {cfg.name!r} changed since its stream state was written ({', '.join(changed)} "
            "differ); run with --restart to discard the state and output and start over",
            changed=changed)

    if state.pending:
        seq = int(state.pending["seq"])
        files = list(state.pending["files"])
        pending = dict(state.pending)
        summary["resumed"] = True
        # the interrupted attempt may have published part of this increment: remove it first
        summary["batches_reprocessed"] = sink.remove_uncommitted(OUTPUT_SHARD, seq)
        if dlq is not None:
            dlq.remove_uncommitted(LATE_SHARD, seq)
        log.info("resuming increment %d of %s (%d file(s)) after an interrupted run", seq, cfg.name, len(files))
    else:
        if sc.incremental == "event_time":
            # rows past the committed mark, up to the source's max event time now (frozen below)
            hi = max_event_time_after(cfg.source, sc.event_time, state.event_mark_ns)
            found = None
        else:
            found = find_new_files(cfg.source, state.consumed, sc.max_file_age)
            summary["files_modified"], summary["files_too_old"] = len(found.modified), found.too_old
        if (found is None and hi is None) or (found is not None and not found.files):
            summary.update(status="no_new_input", seq=state.seq, watermark=_fmt_ns(state.watermark_ns),
                           max_event_time=_fmt_ns(state.max_event_ns), windows_open=int(len(state.open)),
                           duration_s=round(time.perf_counter() - t0, 3))
            return summary
        load_transforms(cfg.transforms)  # fail now, before anything is written, if one is missing
        sink.claim(cfg.name)
        seq = state.seq + 1
        files = found.files if found is not None else []
        pending = {"seq": seq, "files": files}
        if found is None:
            pending.update(lo=state.event_mark_ns, hi=hi)
        state.pending = pending
        store.save_shard(STATE_ID, state.to_doc())
        crashpoint("stream_planned")

    if "hi" in pending:
        df = read_event_range(cfg.source, sc.event_time, pending.get("lo"), int(pending["hi"]))
    else:
        df = read_files(cfg.source, files)
    transforms = load_transforms(cfg.transforms)
    if transforms and len(df):
        df = apply_transforms(df, transforms, where=f"stream increment {seq}")
    step = advance(state, df, sc, seq)
    crashpoint("stream_before_write")

    late_rows = int(len(step.late))
    if late_rows and dlq is not None:
        dlq.write(LATE_SHARD, seq, _late_table(step.late, seq))
    written = sink.write_batch(OUTPUT_SHARD, seq, step.output)
    crashpoint("stream_after_write")

    new_state = step.state
    new_state.consumed = mark_consumed(state.consumed, files, sc.max_file_age)
    if "hi" in pending:
        new_state.event_mark_ns = int(pending["hi"])
    new_state.fingerprints = fingerprints
    new_doc = new_state.to_doc()
    store.save_shard(STATE_ID, new_doc)
    crashpoint("stream_after_commit")

    c = step.counts
    summary.update(
        status="completed", seq=seq, files_new=len(files), rows_in=c["rows_in"], rows_out=int(len(step.output)),
        rows_late=c["rows_late"], late_assignments=c["late_assignments"],
        rows_dead_letter=late_rows if dlq is not None else 0,
        rows_late_dropped=(c["rows_late"] + c["rows_no_event_time"]) if sc.late == "drop_with_count" else
        (c["rows_no_event_time"] if sc.late == "update" else 0),
        rows_no_event_time=c["rows_no_event_time"], late_expired=c["late_expired"],
        windows_emitted=c["windows_emitted"], windows_reemitted=c["windows_reemitted"],
        windows_open=c["windows_open"], windows_kept=int(len(new_state.emitted)),
        watermark=_fmt_ns(new_state.watermark_ns), max_event_time=_fmt_ns(new_state.max_event_ns),
        event_mark=_fmt_ns(new_state.event_mark_ns),
        state_bytes=len(checkpoint.encode(new_doc)), bytes_written=written.bytes,
        totals=new_state.totals, duration_s=round(time.perf_counter() - t0, 3),
    )
    log.info("stream %s increment %d: %d row(s) in, %d window(s) emitted, %d re-emitted, %d late, "
             "watermark %s", cfg.name, seq, c["rows_in"], c["windows_emitted"], c["windows_reemitted"],
             c["rows_late"], summary["watermark"])
    return summary
