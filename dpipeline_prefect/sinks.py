"""Sinks: write each batch once, under a deterministic name, atomically.

Exactly-once output rests on three properties of this module:

1. **Deterministic names.** Batch ``seq`` of shard ``id`` is always written as
   ``[col=value/...]part-<id>-<seq:06d>.<ext>``. A batch redone after a crash overwrites the
   same names, so it can never appear twice.
2. **Atomic publication.** Each file is encoded in memory and published in one step
   (``storage.atomic_write``: one PUT on object stores, temp file + ``os.replace`` on disk).
   Readers (pandas, pyarrow, DuckDB's ``**/*.parquet``) never see half a file: temp files start
   with ``.`` and end in ``.tmp``.
3. **Cleanup past the checkpoint.** When a shard resumes, files of that shard with a sequence
   number at or past its committed one are removed (:meth:`Sink.remove_uncommitted`) before any
   batch is redone, so a redone batch with different partition values leaves nothing stale.

Partition values are percent-encoded in directory names (pyarrow's hive partitioning decodes
them), so a value containing ``/`` or ``..`` can never escape the sink folder.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from urllib.parse import quote

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .config import SinkConfig, validate_run_key
from .errors import ConfigError, TerminalError
from .storage import Storage, translate_errors

__all__ = ["Sink", "WriteResult", "MARKER"]

MARKER = "_dpipeline.json"
_NAME_RE = re.compile(r"^part-(?P<shard>[A-Za-z0-9]+)-(?P<seq>\d{6,})\.(?:parquet|csv|jsonl)$")
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_SHARD_ID_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")
# A partition folder name ("col=value", percent-encoded) must fit one path segment everywhere:
# local file systems allow 255 bytes per name, and S3 keys 1024 in all.
_MAX_SEGMENT = 255


@dataclass
class WriteResult:
    files: int = 0
    rows: int = 0
    bytes: int = 0


class Sink:
    """The output location of one run (``path`` with ``{run_key}`` resolved)."""

    def __init__(self, cfg: SinkConfig, run_key: str, storage: Storage | None = None) -> None:
        self.cfg = cfg
        self.run_key = validate_run_key(run_key)  # it may become a path segment ({run_key})
        self.storage = storage or Storage(cfg.resolved_path(run_key), cfg.storage_options, role="sink")
        self.ext = cfg.format

    # -- writing -----------------------------------------------------------------------------
    def file_name(self, shard_id: str, seq: int) -> str:
        if not isinstance(shard_id, str) or not _SHARD_ID_RE.fullmatch(shard_id):
            # generated ids are letters and digits; anything else (a '/', '..', NUL) is refused
            # rather than allowed to become part of a path
            raise ConfigError(f"shard id {shard_id!r} cannot be used in an output file name: use "
                              "1-64 letters and digits", field="shard_id")
        return f"part-{shard_id}-{seq:06d}.{self.ext}"

    def _encode(self, table: pa.Table) -> bytes:
        buf = io.BytesIO()
        if self.ext == "parquet":
            pq.write_table(table, buf, compression="snappy")
        elif self.ext == "csv":
            pacsv.write_csv(table, buf)
        else:
            df = table.to_pandas()
            buf.write(df.to_json(orient="records", lines=True, date_format="iso").encode())
        return buf.getvalue()

    def write_batch(self, shard_id: str, seq: int, df: pd.DataFrame) -> WriteResult:
        """Write one batch's output; idempotent for the same (shard_id, seq, df)."""
        name = self.file_name(shard_id, seq)
        res = WriteResult()
        if not len(df):
            return res
        parts = self.cfg.partition_by
        if parts:
            missing = [c for c in parts if c not in df.columns]
            if missing:
                raise ConfigError(
                    f"sink.partition_by column {missing[0]!r} is not in the transformed output; "
                    f"columns are: {', '.join(map(str, df.columns))}",
                    field="sink.partition_by",
                )
            # Distinct values can share a folder name (e.g. 1 and "1" in an object column):
            # gather groups by folder, or the second write would replace the first file.
            by_dir: dict[str, list[pd.DataFrame]] = {}
            for values, part in df.groupby(parts, dropna=False, sort=True, observed=True):
                values = values if isinstance(values, tuple) else (values,)
                segs = [f"{quote(str(c), safe='')}={_encode_value(v)}" for c, v in zip(parts, values)]
                for c, seg in zip(parts, segs):
                    if len(seg.encode()) > _MAX_SEGMENT:
                        raise TerminalError(
                            f"sink.partition_by column {c!r} has a value whose folder name would be "
                            f"{len(seg.encode())} bytes (percent-encoded); at most {_MAX_SEGMENT} fit "
                            "one path segment: partition by a shorter column", field="sink.partition_by")
                dirs = "/".join(segs)
                by_dir.setdefault(dirs, []).append(part)
            for dirs, frames in by_dir.items():
                part = frames[0] if len(frames) == 1 else pd.concat(frames)
                table = self._table(part.drop(columns=parts))
                data = self._encode(table)
                self.storage.write_bytes(self.storage.path(dirs, name), data)
                res.files += 1
                res.rows += table.num_rows
                res.bytes += len(data)
        else:
            table = self._table(df)
            data = self._encode(table)
            self.storage.write_bytes(self.storage.path(name), data)
            res.files, res.rows, res.bytes = 1, table.num_rows, len(data)
        return res

    @staticmethod
    def _table(df: pd.DataFrame) -> pa.Table:
        try:
            return pa.Table.from_pandas(df, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise TerminalError(f"transformed output cannot be written: {e}") from None

    # -- listing and cleanup -----------------------------------------------------------------
    def output_files(self) -> list[tuple[str, str, int]]:
        """(path, shard_id, seq) of every output file of ours under the sink."""
        out = []
        for p in self.storage.find(self.storage.root):
            m = _NAME_RE.match(p.rsplit("/", 1)[-1])
            if m:
                out.append((p, m.group("shard"), int(m.group("seq"))))
        return out

    def remove_uncommitted(self, shard_id: str, next_seq: int) -> int:
        """Delete files of ``shard_id`` with seq >= ``next_seq``; return how many batches had output."""
        doomed = [(p, s) for p, sh, s in self.output_files() if sh == shard_id and s >= next_seq]
        self.storage.rm_many([p for p, _ in doomed])
        return len({s for _, s in doomed})

    def remove_temporaries(self) -> int:
        """Remove temp files left by writes that a crash interrupted."""
        tmp = [p for p in self.storage.find(self.storage.root) if p.rsplit("/", 1)[-1].startswith(".") and p.endswith(".tmp")]
        self.storage.rm_many(tmp)
        return len(tmp)

    def clear(self) -> int:
        """Remove all our output files and the marker (used by ``--restart``)."""
        files = [p for p, _, _ in self.output_files()]
        marker = self.storage.path(MARKER)
        self.storage.rm_many(files)
        self.storage.rm(marker)
        self.remove_temporaries()
        return len(files)

    # -- ownership marker --------------------------------------------------------------------
    def read_marker(self) -> dict | None:
        p = self.storage.path(MARKER)
        try:
            return json.loads(self.storage.read_bytes(p))
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def claim(self, pipeline: str) -> None:
        """Make sure this sink belongs to (pipeline, run key), and mark it so.

        Refuses a sink folder that already holds output of another pipeline or run key: two
        runs writing into one folder would mix their rows.
        """
        marker = self.read_marker()
        mine = {"pipeline": pipeline, "run_key": self.run_key}
        if marker is not None:
            if {k: marker.get(k) for k in mine} != mine:
                raise TerminalError(
                    f"sink {self.storage.url} already holds output of pipeline "
                    f"{marker.get('pipeline')!r} run key {marker.get('run_key')!r}; use a sink path "
                    "with {run_key} in it, another folder, or --restart to replace that output",
                    path=self.storage.url,
                )
            return
        # Any visible file counts, not only our part-* names: readers of the folder would mix
        # someone else's data.parquet with this run's rows. Hidden files (_SUCCESS, .tmp) are
        # skipped by readers and do no harm.
        root = self.storage.root.rstrip("/")
        existing = [
            p for p in self.storage.find(root)
            if not any(s.startswith(("_", ".")) for s in p[len(root) + 1 :].split("/"))
        ]
        if existing:
            ours = all(_NAME_RE.match(p.rsplit("/", 1)[-1]) for p in existing)
            raise TerminalError(
                f"sink {self.storage.url} already holds {len(existing)} file(s) of an unknown "
                f"run (e.g. {existing[0].rsplit('/', 1)[-1]}); "
                + ("empty it or use --restart" if ours else "empty it or choose another folder"),
                path=self.storage.url,
            )
        self.storage.write_bytes(self.storage.path(MARKER), json.dumps(mine).encode())


def _encode_value(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)) or v is pd.NA or v is pd.NaT:
        return _HIVE_NULL
    # "" stays an empty segment ("col="), as pyarrow's own writer does; pyarrow and DuckDB
    # read it back as "". Mapping it to the null folder made "" and None rows overwrite
    # each other's file.
    return quote(str(v), safe="")
