"""Dead-letter queue: isolate the rows a transform or the sink rejects, keep them, replay them.

Why: one malformed record must not stop a whole shard, and it must not vanish either. When a
batch fails with a *terminal, row-level* error (a transform raised, or the sink could not
encode the transformed rows), the batch is bisected: each failing slice is split in halves
until single rows remain, so k bad rows among n cost O(k log n) transform calls and the good
rows produce exactly what they would have produced in the whole batch. Failing rows go to
the dead-letter store with their original columns plus ``_dlq_*`` columns (error type,
message, stage, shard, batch, row, attempt, time); the others go on to the sink.

**Assumption: transforms are row-independent** (each output row depends only on its input
row, as ``examples.flights.clean`` does). A transform that aggregates, deduplicates or
otherwise looks across rows gives different results on slices; do not enable dead letters
for such pipelines. If a batch fails as a whole but no single row fails alone, the transform
is not row-local: the original error is raised, nothing is diverted.

Exactly-once, as for the sink (``sinks.py``):

* Dead rows of batch ``seq`` of shard ``id`` are written as ``part-<id>-<seq:06d>.parquet``
  under the run's dead-letter folder *before* the batch's checkpoint advances; a redone batch
  overwrites the same name, and a resumed shard first deletes its dead-letter files at or past
  its committed ``next_seq`` (:meth:`DeadLetterStore.remove_uncommitted`). The shard's
  checkpoint document carries the cumulative ``rows_dead_letter``.
* Replay (:func:`replay`) takes only files of committed batches. Round ``r`` of file
  (id, seq) writes its good rows to the sink as shard ``<id>r<r:03d>`` batch ``seq`` (a name
  ``sinks._NAME_RE`` recognises, so ``--restart`` clears it, and never a real shard id, so a
  shard's own cleanup leaves it alone), writes rows that still fail to
  ``part-<id>-<seq>-r<r:03d>.parquet``, and only then records the round in
  ``_replay/<id>-<seq>.json`` (one atomic write). A crash before that record redoes the same
  round under the same names; after it, the round is never redone. Replaying again adds
  nothing: a file whose rows all fail again is left as it is.

At rest: with an ``encryption`` section every dead-letter file is AES-256-GCM encrypted
(``crypto.py``), bound to its pipeline, run key and file name, and a plaintext file where an
encrypted one belongs is refused. ``dead_letter.keep_columns`` / ``hash_columns`` store only
chosen columns, or the sha256 of chosen columns, instead of whole rows; such a queue is marked
redacted in each file's metadata and cannot be replayed (its rows are incomplete).

Limit: past ``dead_letter.max_fraction`` of a shard's rows the shard fails with
:class:`DeadLetterLimitError` naming the shard and the fraction, before anything of the
offending batch is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import DeadLetterConfig, PipelineConfig, validate_run_key
from .errors import (
    CheckpointError,
    ConfigError,
    DPipelineError,
    EncryptionError,
    SourceError,
    StorageError,
    TerminalError,
    TransformError,
)
from .crypto import aad, cipher_for, is_encrypted
from .storage import Storage, join

__all__ = [
    "META_COLUMNS",
    "DeadLetterLimitError",
    "DeadLetterStore",
    "DeadLetters",
    "QueueEntry",
    "ReplayReport",
    "bisect",
    "dead_letter_url",
    "is_row_error",
    "replay",
]

log = logging.getLogger("dpipeline_prefect.dead_letter")

META_COLUMNS = [
    "_dlq_error_type", "_dlq_error", "_dlq_stage", "_dlq_shard", "_dlq_batch", "_dlq_row",
    "_dlq_attempt", "_dlq_time",
]
_FILE_RE = re.compile(r"^part-(?P<shard>[A-Za-z0-9]+)-(?P<seq>\d{6,})(?:-r(?P<round>\d{3,}))?\.parquet$")
_STATE_DIR = "_replay"
_SHARD_ID_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")


def _check_shard_id(shard: str) -> str:
    """Shard ids become file names: letters and digits only (what the pipeline generates)."""
    if not isinstance(shard, str) or not _SHARD_ID_RE.fullmatch(shard):
        raise ConfigError(f"shard id {shard!r} cannot be used in a file name: use 1-64 letters "
                          "and digits", field="shard_id")
    return shard
_MAX_MESSAGE = 2000  # an error message per row; a traceback-sized one would bloat the file


class DeadLetterLimitError(TerminalError):
    """A shard rejected more than ``dead_letter.max_fraction`` of its rows (``shard``, ``fraction``)."""


# --------------------------------------------------------------------------- where and what


def dead_letter_url(cfg: PipelineConfig, run_key: str) -> tuple[str, dict[str, Any]]:
    """The run's dead-letter folder and its storage options.

    The default sits beside the run's checkpoints (``<checkpoint>/<pipeline>.dead_letter/<run_key>``):
    storage the run already writes to, with its credentials, scoped per run key. It is a
    sibling of the pipeline's checkpoint folder rather than inside it because ``checkpoints
    gc`` deletes whole completed runs there, and unreplayed dead rows are data, not progress.
    A ``.`` cannot occur in a pipeline name, so the folder never collides with one.
    """
    dl = cfg.dead_letter
    if dl is None:
        raise ConfigError("this pipeline has no dead_letter section", field="dead_letter")
    validate_run_key(run_key)  # a path segment: never '..', '/', NUL or absurdly long
    if dl.path is None:
        opts = dl.storage_options if dl.storage_options is not None else cfg.checkpoint.storage_options
        return join(cfg.checkpoint.path, f"{cfg.name}.dead_letter", run_key), dict(opts)
    url = dl.path.replace("{run_key}", run_key) if "{run_key}" in dl.path else join(dl.path, cfg.name, run_key)
    return url, dict(dl.storage_options or {})


def is_row_error(exc: BaseException) -> bool:
    """True when ``exc`` may be caused by the rows of the batch (so bisection can isolate them).

    Row-level: a user transform raised an ordinary exception (``TransformError`` with a
    cause), or the sink could not encode the transformed rows (a plain ``TerminalError``).
    Not row-level: transient errors (retried elsewhere), configuration, storage, checkpoint
    and source errors, a transform that returned a non-DataFrame, memory exhaustion.
    """
    if not isinstance(exc, TerminalError):
        return False
    if isinstance(exc, TransformError):
        cause = exc.__cause__
        if cause is None or isinstance(cause, (MemoryError, ConnectionError, TimeoutError)):
            return False
        if isinstance(cause, DPipelineError):
            return not cause.transient and not isinstance(
                cause, (ConfigError, StorageError, CheckpointError, SourceError))
        return True
    return type(exc) is TerminalError  # sinks.Sink._table: "transformed output cannot be written"


def _error_type(exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, TransformError) and exc.__cause__ is not None else exc
    return type(cause).__name__


# --------------------------------------------------------------------------- bisection


class _OverBudget(Exception):
    pass


@dataclass
class BisectResult:
    """Outputs of the good slices (in row order), failing row positions with their errors."""

    outputs: list[pd.DataFrame] = field(default_factory=list)
    dead: list[tuple[int, BaseException]] = field(default_factory=list)
    calls: int = 0


def bisect(df: pd.DataFrame, probe: Callable[[pd.DataFrame], pd.DataFrame],
           first_error: BaseException | None = None, budget: int | None = None) -> BisectResult:
    """Split ``df`` recursively until every failing row is alone; O(k log n) probe calls.

    Args:
        df: The batch.
        probe: Runs a slice (transforms, optionally a sink encoding check); raises on failure.
        first_error: The error the whole batch already raised (saves one call), or None.
        budget: Stop with ``_OverBudget`` once more than this many rows failed.

    Returns:
        The good slices' outputs in row order and the failing rows' positions in ``df``.
        Errors that are not row-level (:func:`is_row_error`) propagate unchanged.
    """
    res = BisectResult()

    def go(lo: int, hi: int, err: BaseException | None) -> None:
        if err is None:
            res.calls += 1
            try:
                res.outputs.append(probe(df.iloc[lo:hi]))
                return
            except Exception as e:  # noqa: BLE001 - classified right below
                if not is_row_error(e):
                    raise
                err = e
        if hi - lo == 1:
            res.dead.append((lo, err))
            if budget is not None and len(res.dead) > budget:
                raise _OverBudget()
            return
        mid = (lo + hi) // 2
        go(lo, mid, None)
        go(mid, hi, None)

    if len(df):
        go(0, len(df), first_error)
    return res


def _concat(outputs: list[pd.DataFrame]) -> pd.DataFrame:
    if not outputs:
        return pd.DataFrame()
    return outputs[0] if len(outputs) == 1 else pd.concat(outputs)


def _sink_check(sink, out: pd.DataFrame) -> pd.DataFrame:
    """What the sink does to a frame before publishing it, minus the publishing."""
    from .sinks import Sink

    parts = [c for c in sink.cfg.partition_by if c in out.columns]
    Sink._table(out.drop(columns=parts) if parts else out)
    return out


# --------------------------------------------------------------------------- the store


@dataclass
class QueueEntry:
    """The current dead-letter file of one batch (after any replay rounds)."""

    shard: str
    seq: int
    round: int
    path: str
    state: dict[str, Any] = field(default_factory=dict)


class DeadLetterStore:
    """The dead-letter folder of one run: batch files, replay records, listing and cleanup."""

    def __init__(self, cfg: PipelineConfig, run_key: str) -> None:
        url, opts = dead_letter_url(cfg, run_key)
        self.cfg = cfg
        self.run_key = run_key
        self.storage = Storage(url, opts, role="dead_letter")
        self.cipher = cipher_for(cfg.encryption)

    def _aad(self, path: str) -> bytes:
        return aad(what="dead_letter", pipeline=self.cfg.name, run_key=self.run_key,
                   file=path.rsplit("/", 1)[-1])

    @staticmethod
    def file_name(shard: str, seq: int, round: int = 0) -> str:
        _check_shard_id(shard)
        return f"part-{shard}-{seq:06d}" + (f"-r{round:03d}" if round else "") + ".parquet"

    def write(self, shard: str, seq: int, table: pa.Table, round: int = 0) -> str:
        """Publish one batch's dead rows atomically under their deterministic name."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        path = self.storage.path(self.file_name(shard, seq, round))
        data = buf.getvalue()
        if self.cipher is not None:
            data = self.cipher.encrypt(data, self._aad(path))
        self.storage.write_bytes(path, data)
        return path

    def files(self) -> list[tuple[str, str, int, int]]:
        """(path, shard, seq, round) of every dead-letter file, sorted."""
        try:  # s3fs caches listings; Dask workers or another process may have written since
            self.storage.fs.invalidate_cache(self.storage.root)
        except Exception:  # noqa: BLE001 - a cache that cannot be invalidated is not an error
            pass
        out = []
        for p in self.storage.find(self.storage.root):
            m = _FILE_RE.match(p.rsplit("/", 1)[-1])
            if m:
                out.append((p, m.group("shard"), int(m.group("seq")), int(m.group("round") or 0)))
        return sorted(out, key=lambda t: (t[1], t[2], t[3]))

    def remove_uncommitted(self, shard: str, next_seq: int) -> int:
        """Delete round-0 files of ``shard`` with seq >= ``next_seq`` (a resumed shard redoes them)."""
        doomed = [p for p, sh, s, r in self.files() if sh == shard and s >= next_seq and r == 0]
        self.storage.rm_many(doomed)
        return len(doomed)

    def clear(self) -> int:
        """Remove every file and replay record of this run (``--restart``)."""
        files = self.storage.find(self.storage.root)
        self.storage.rm_many(files)
        if self.storage.is_local:
            self.storage.rm(self.storage.root, recursive=True)
        return len(files)

    def _state_path(self, shard: str, seq: int) -> str:
        return self.storage.path(_STATE_DIR, f"{shard}-{seq:06d}.json")

    def load_state(self, shard: str, seq: int) -> dict[str, Any]:
        try:
            return json.loads(self.storage.read_bytes(self._state_path(shard, seq)))
        except FileNotFoundError:
            return {}

    def save_state(self, shard: str, seq: int, doc: dict[str, Any]) -> None:
        self.storage.write_bytes(self._state_path(shard, seq), json.dumps(doc, sort_keys=True).encode())

    def queue(self) -> tuple[list[QueueEntry], list[str]]:
        """The current file of every batch with dead rows, and superseded files (garbage).

        A batch's replay record names its current round; without one it is round 0. A record
        with ``current: null`` means every row of that batch was replayed.
        """
        by_batch: dict[tuple[str, int], dict[int, str]] = {}
        for p, sh, s, r in self.files():
            by_batch.setdefault((sh, s), {})[r] = p
        states: dict[tuple[str, int], dict] = {}
        for p in self.storage.find(self.storage.path(_STATE_DIR)):
            m = re.match(r"^([A-Za-z0-9]+)-(\d{6,})\.json$", p.rsplit("/", 1)[-1])
            if m:
                states[(m.group(1), int(m.group(2)))] = json.loads(self.storage.read_bytes(p))
        entries, garbage = [], []
        for key in sorted(set(by_batch) | set(states)):
            files = by_batch.get(key, {})
            st = states.get(key, {})
            rnd = int(st.get("round", 0))
            for r, p in files.items():
                if r != rnd or (st and st.get("current") is None):
                    garbage.append(p)
            if st and st.get("current") is None:
                continue
            if rnd in files:
                entries.append(QueueEntry(key[0], key[1], rnd, files[rnd], st))
        return entries, garbage

    def read(self, path: str) -> pa.Table:
        """One dead-letter file as a table (decrypted and authenticated when encryption is on)."""
        data = self.storage.read_bytes(path)
        url = self.storage.unstrip(path)
        if is_encrypted(data):
            if self.cipher is None:
                raise EncryptionError(
                    f"dead-letter file {url} is encrypted but this pipeline has no encryption "
                    "section: configure encryption.key_env or encryption.key_secret_block",
                    path=url,
                )
            data = self.cipher.decrypt(data, self._aad(path), url)
        elif self.cipher is not None:
            raise EncryptionError(
                f"dead-letter file {url} is not encrypted although this pipeline encrypts its "
                "dead letters: refused", path=url)
        return pq.read_table(io.BytesIO(data))


# --------------------------------------------------------------------------- the data path


def _dead_table(df: pd.DataFrame, dead: list[tuple[int, BaseException, str]], schema: pa.Schema,
                shard: str, seq: int, row_offset: int, attempt: int) -> pa.Table:
    """Original columns (with the source schema) plus the ``_dlq_*`` columns."""
    dead = sorted(dead, key=lambda t: t[0])
    pos = [p for p, _, _ in dead]
    rows = df.iloc[pos][schema.names]
    table = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
    now = pd.Timestamp.now(tz="UTC")
    meta = {
        "_dlq_error_type": pa.array([_error_type(e) for _, e, _ in dead], pa.string()),
        "_dlq_error": pa.array([str(e)[:_MAX_MESSAGE] for _, e, _ in dead], pa.string()),
        "_dlq_stage": pa.array([s for _, _, s in dead], pa.string()),
        "_dlq_shard": pa.array([shard] * len(dead), pa.string()),
        "_dlq_batch": pa.array([seq] * len(dead), pa.int64()),
        "_dlq_row": pa.array([row_offset + p for p in pos], pa.int64()),
        "_dlq_attempt": pa.array([attempt] * len(dead), pa.int64()),
        "_dlq_time": pa.array([now] * len(dead), pa.timestamp("us", tz="UTC")),
    }
    for name, arr in meta.items():
        if name in table.column_names:
            raise ConfigError(f"source column {name!r} clashes with a dead-letter column", field="dead_letter")
        table = table.append_column(name, arr)
    return table


_REDACTED_KEY = b"dpipeline.redacted"


def _sha256_column(col: pa.ChunkedArray) -> pa.Array:
    """Hex sha256 of each value's text form (nulls stay null)."""
    out = []
    for v in col.to_pylist():
        out.append(None if v is None else hashlib.sha256(str(v).encode()).hexdigest())
    return pa.array(out, pa.string())


def redact_table(table: pa.Table, dl: DeadLetterConfig) -> pa.Table:
    """Apply ``dead_letter.keep_columns`` / ``hash_columns`` to a dead-letter table.

    Source columns not kept are dropped; hashed columns hold ``sha256(str(value))`` in hex.
    ``_dlq_*`` columns always stay. The file is marked redacted in its schema metadata, so
    replay refuses it. Raises ConfigError naming a configured column the source lacks.
    """
    if not dl.redacts:
        return table
    names = [n for n in table.column_names if n not in META_COLUMNS]
    for field_name, cols in (("keep_columns", dl.keep_columns or []), ("hash_columns", dl.hash_columns)):
        for c in cols:
            if c not in names:
                raise ConfigError(
                    f"dead_letter.{field_name}: column {c!r} is not a source column "
                    f"(columns: {', '.join(names)})", field=f"dead_letter.{field_name}", key=c)
    keep = set(dl.keep_columns) if dl.keep_columns is not None else set(names)
    keep |= set(dl.hash_columns)
    drop = [n for n in names if n not in keep]
    table = table.drop_columns(drop) if drop else table
    for c in dl.hash_columns:
        i = table.schema.get_field_index(c)
        table = table.set_column(i, c, _sha256_column(table.column(c)))
    meta = dict(table.schema.metadata or {})
    meta[_REDACTED_KEY] = json.dumps(
        {"keep_columns": dl.keep_columns, "hash_columns": dl.hash_columns}).encode()
    return table.replace_schema_metadata(meta)


def is_redacted(table: pa.Table) -> bool:
    """True when a dead-letter table was stored with columns dropped or hashed."""
    return _REDACTED_KEY in (table.schema.metadata or {})


class DeadLetters:
    """The dead-letter side of one shard's loop (``shard.py``): isolate, limit, write, resume.

    Args:
        cfg: The pipeline (must have a ``dead_letter`` section).
        run_key: The run.
        shard: Shard id (file names) and ``label`` (messages).
        schema: The source schema: dead rows are stored with it, exactly as read.
        shard_rows: The shard's input rows when known (the limit is then checked on every
            batch); None checks it when the shard ends.
        rows_dead_letter: Dead rows already committed by earlier attempts of this shard.
        attempt: Written into ``_dlq_attempt`` (1 for a run, 1 + round for a replay).
    """

    def __init__(self, cfg: PipelineConfig, run_key: str, shard: str, label: str, schema: pa.Schema,
                 shard_rows: int | None, rows_dead_letter: int = 0, attempt: int = 1,
                 store: DeadLetterStore | None = None) -> None:
        self.store = store or DeadLetterStore(cfg, run_key)
        self.shard, self.label, self.schema = shard, label, schema
        self.max_fraction = cfg.dead_letter.max_fraction
        self.shard_rows = shard_rows
        self.rows = rows_dead_letter  # committed so far (cumulative)
        self.attempt = attempt
        self.calls = 0  # probe calls spent isolating (for the figures)
        self.first_error: str | None = None

    @property
    def limit(self) -> int | None:
        return None if self.shard_rows is None else math.floor(self.max_fraction * self.shard_rows)

    def _budget(self) -> int | None:
        return None if self.limit is None else max(0, self.limit - self.rows)

    def _over(self, dead: int, rows: int, err: BaseException | str, at_least: bool = False) -> DeadLetterLimitError:
        frac = dead / rows if rows else 1.0
        return DeadLetterLimitError(
            f"shard {self.label} rejected {'at least ' if at_least else ''}{dead:,} of its {rows:,} "
            f"rows ({frac:.2%}), more than "
            f"dead_letter.max_fraction {self.max_fraction:.4g} allows: the shard stops instead of "
            f"draining into the dead-letter queue; first error: {err}",
            shard=self.label, fraction=round(frac, 6),
        )

    def _bisect(self, df, probe, first_error):
        try:
            res = bisect(df, probe, first_error, self._budget())
        except _OverBudget:
            # stopped early: bisecting the rest would only cost time
            raise self._over(self.rows + (self._budget() or 0) + 1, self.shard_rows or len(df),
                             first_error or "(see the dead-letter store)", at_least=True) from None
        self.calls += res.calls
        return res

    def transform(self, df: pd.DataFrame, apply: Callable[[pd.DataFrame], pd.DataFrame]
                  ) -> tuple[pd.DataFrame, list[tuple[int, BaseException, str]]]:
        """``apply(df)``, or on a row-level failure the good rows' output and the dead rows."""
        try:
            return apply(df), []
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_row_error(e):
                raise
            first = e
        res = self._bisect(df, apply, first)
        if not res.dead:
            # Every slice works, the whole does not: the transform is not row-independent.
            raise first
        if self.first_error is None:
            self.first_error = str(first)
        return _concat(res.outputs), [(p, e, "transform") for p, e in res.dead]

    def sink_rejected(self, err: BaseException, df: pd.DataFrame, dead: list,
                      apply: Callable[[pd.DataFrame], pd.DataFrame], sink
                      ) -> tuple[pd.DataFrame, list[tuple[int, BaseException, str]]]:
        """The sink refused the batch's output: find the rows it refuses among the living ones.

        Rows already dead in the transform stay dead; the rest are bisected through the
        transforms plus the sink's encoding step.
        """
        gone = {p for p, _, _ in dead}
        keep = [i for i in range(len(df)) if i not in gone]
        living = df.iloc[keep]
        res = self._bisect(living, lambda part: _sink_check(sink, apply(part)), None)
        if not res.dead:
            raise err
        if self.first_error is None:
            self.first_error = str(err)
        return _concat(res.outputs), dead + [(keep[p], e, "sink") for p, e in res.dead]

    def commit(self, df: pd.DataFrame, dead: list, seq: int, row_offset: int) -> int:
        """Check the limit, then write batch ``seq``'s dead rows (before its checkpoint).

        Writing the same batch again (the sink rejected rows after the transform did)
        replaces the file. The caller adds the returned count to :attr:`rows` once the batch's
        output is published.
        """
        if not dead:
            return 0
        total = self.rows + len(dead)
        if self.limit is not None and total > self.limit:
            raise self._over(total, self.shard_rows, dead[0][1])
        table = _dead_table(df, dead, self.schema, self.shard, seq, row_offset, self.attempt)
        table = redact_table(table, self.store.cfg.dead_letter)
        self.store.write(self.shard, seq, table)
        log.info("shard %s batch %d: %d row(s) to the dead-letter store", self.label, seq, len(dead))
        return len(dead)

    def finish(self, rows_in: int) -> None:
        """At the end of a shard of unknown size: the limit against the rows it read."""
        if self.shard_rows is None and rows_in and self.rows / rows_in > self.max_fraction:
            raise self._over(self.rows, rows_in, self.first_error or "(see the dead-letter store)")


# --------------------------------------------------------------------------- replay


@dataclass
class ReplayReport:
    """What one ``dlq replay`` did."""

    files: int = 0  # queue entries looked at
    files_replayed: int = 0  # entries that moved rows to the sink this time
    files_pending: int = 0  # entries of batches whose checkpoint has not landed (not replayed)
    rows_replayed: int = 0  # dead rows that went through the transforms this time
    rows_out: int = 0  # rows the sink received
    rows_still_dead: int = 0  # rows that failed again and stay in the queue
    garbage_removed: int = 0
    calls: int = 0
    duration_s: float = 0.0
    errors: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "errors"}
        d["errors"] = dict(self.errors)
        return d


def replay(cfg: PipelineConfig, run_key: str) -> ReplayReport:
    """Run the queued rows of committed batches through the current transforms into the sink.

    Exactly once (see the module docstring): each round of a batch's file is recorded after its
    output is published, so a crash redoes the same round under the same names and a finished
    round is never redone. Rows that fail again stay in the queue (in a new round's file).
    """
    if cfg.stream is not None:
        raise ConfigError(
            "dlq replay does not apply to a stream pipeline: its queue holds late events, which "
            "belong to windows already emitted (use stream.late: update to re-emit windows)",
            field="stream.late")
    from .checkpoint import CheckpointStore
    from .sinks import Sink
    from .sources import schema_from_b64
    from .transforms import apply_transforms, load_transforms

    t0 = time.perf_counter()
    rep = ReplayReport()
    store = DeadLetterStore(cfg, run_key)
    ckpt = CheckpointStore(Storage(cfg.checkpoint.path, cfg.checkpoint.storage_options), cfg.name, run_key,
                           cipher=cipher_for(cfg.encryption))
    manifest = ckpt.load_manifest()
    if manifest is None:
        raise CheckpointError(f"run key {run_key!r} of {cfg.name} has no checkpoints: nothing to replay")
    schema = schema_from_b64(manifest["schema"])
    docs = ckpt.load_shards()
    entries, garbage = store.queue()
    store.storage.rm_many(garbage)  # superseded rounds whose cleanup a crash interrupted
    rep.garbage_removed = len(garbage)
    if not entries:
        rep.duration_s = time.perf_counter() - t0
        return rep
    transforms = load_transforms(cfg.transforms)
    sink = Sink(cfg.sink, run_key)
    existing: dict[tuple[str, int], list[str]] = {}
    for p, sh, s in sink.output_files():  # one listing: leftovers of rounds a crash cut short
        existing.setdefault((sh, s), []).append(p)
    for e in entries:
        rep.files += 1
        committed = int((docs.get(e.shard) or {}).get("next_seq", 0))
        if e.seq >= committed:
            rep.files_pending += 1
            continue
        rnd = e.round + 1
        rid = f"{e.shard}r{rnd:03d}"
        table = store.read(e.path)
        if is_redacted(table):
            raise ConfigError(
                f"dead-letter file {store.storage.unstrip(e.path)} was stored with "
                "dead_letter.keep_columns / hash_columns: its rows are incomplete and cannot be "
                "replayed", field="dead_letter", path=store.storage.unstrip(e.path))
        meta = table.select([c for c in META_COLUMNS if c in table.column_names]).to_pandas()
        rows = table.select(schema.names).replace_schema_metadata(schema.metadata)
        df = rows.to_pandas()
        where = f"replay of shard {e.shard} batch {e.seq}"

        def apply(part: pd.DataFrame) -> pd.DataFrame:
            return apply_transforms(part, transforms, where=where)

        dl = DeadLetters(cfg, run_key, e.shard, e.shard, schema, None, attempt=rnd + 1, store=store)
        dl.max_fraction = 1.0  # a replay never fails on the limit: failures stay queued
        out, dead = dl.transform(df, apply) if len(df) else (pd.DataFrame(), [])
        try:
            _sink_check(sink, out)
        except Exception as err:  # noqa: BLE001
            if not is_row_error(err):
                raise
            out, dead = dl.sink_rejected(err, df, dead, apply, sink)
        rep.rows_replayed += len(df)
        rep.calls += dl.calls + 1
        if len(dead) == len(df):
            rep.rows_still_dead += len(dead)
            rep.errors.update(_error_type(x) for _, x, _ in dead)
            continue  # nothing would change: the file stays as it is, no new round
        stale = existing.get((rid, e.seq), [])
        sink.storage.rm_many(stale)
        if dead:
            tbl = _dead_table(df, dead, schema, e.shard, e.seq, 0, rnd + 1)
            # keep each row's position in its shard stream from the first failure
            tbl = tbl.set_column(tbl.schema.get_field_index("_dlq_row"), "_dlq_row",
                                 pa.array(meta["_dlq_row"].iloc[sorted(p for p, _, _ in dead)].to_numpy(), pa.int64()))
            store.write(e.shard, e.seq, redact_table(tbl, cfg.dead_letter), round=rnd)
        w = sink.write_batch(rid, e.seq, out)
        state = {
            "round": rnd,
            "current": DeadLetterStore.file_name(e.shard, e.seq, rnd) if dead else None,
            "rows_replayed": int(e.state.get("rows_replayed", 0)) + w.rows,
            "rows_in_replayed": int(e.state.get("rows_in_replayed", 0)) + len(df) - len(dead),
            "time": time.time(),
        }
        store.save_state(e.shard, e.seq, state)  # the commit point of this round
        store.storage.rm(e.path)
        rep.files_replayed += 1
        rep.rows_out += w.rows
        rep.rows_still_dead += len(dead)
        rep.errors.update(_error_type(x) for _, x, _ in dead)
    rep.duration_s = time.perf_counter() - t0
    return rep


def summarize(cfg: PipelineConfig, run_key: str) -> list[dict[str, Any]]:
    """One row per queued file: shard, batch, round, rows and error types (for ``dlq ls``)."""
    store = DeadLetterStore(cfg, run_key)
    entries, _ = store.queue()
    out = []
    for e in entries:
        t = store.read(e.path).select(["_dlq_error_type", "_dlq_stage"]).to_pandas()
        out.append({
            "file": e.path.rsplit("/", 1)[-1], "shard": e.shard, "batch": e.seq, "round": e.round,
            "rows": len(t), "errors": dict(Counter(t["_dlq_error_type"])),
            "stages": sorted(set(t["_dlq_stage"])), "path": store.storage.unstrip(e.path),
        })
    return out


def read_queue(cfg: PipelineConfig, run_key: str, limit: int | None = None,
               shard: str | None = None) -> pd.DataFrame:
    """The queued rows, ``_dlq_*`` columns first (for ``dlq show``)."""
    store = DeadLetterStore(cfg, run_key)
    entries, _ = store.queue()
    frames, n = [], 0
    for e in entries:
        if shard and e.shard != shard:
            continue
        df = store.read(e.path).to_pandas()
        frames.append(df)
        n += len(df)
        if limit is not None and n >= limit:
            break
    if not frames:
        return pd.DataFrame(columns=META_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    df = df[[c for c in META_COLUMNS if c in df.columns] + [c for c in df.columns if c not in META_COLUMNS]]
    return df.head(limit) if limit is not None else df
