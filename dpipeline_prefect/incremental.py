"""The high-water mark of an incremental pipeline: which input was already consumed.

Two kinds of mark (``stream.incremental``): the consumed *files* (below), or, for Parquet
sources, an *event time*: each run reads the rows whose event time is in ``(mark, hi]``, where
``hi`` is the largest event time in the source when the run planned (frozen in the state, so a
redone increment reads the same rows), from every file with row groups skipped by their
statistics (:func:`max_event_time_after`, :func:`read_event_range`). Rows that arrive later
with an event time at or before the mark are never read in that mode.

Each stream run reads only the files of the source folder / prefix / glob that earlier runs did
not consume. The mark is a mapping ``path -> [size, mtime]`` kept inside the stream state
document (``stream.py``), so it is committed atomically together with the window state: a file
counts as consumed exactly when the state that includes its rows is committed.

Rules:

* **Identity is the path.** Input files are treated as immutable (as Spark's and Flink's file
  sources do): a known path whose size or mtime changed is *not* read again (that would count
  its earlier rows twice); it is reported (``files_modified``) and logged.
* **Bounded.** With ``stream.max_file_age`` set, files whose mtime is older than the newest
  consumed mtime minus that age are forgotten, and files that old are ignored when they
  appear (``files_too_old``). Without it the mark grows by one small entry per input file.
* **Order.** New files are read in path order, so a re-run of an interrupted increment (whose
  file list is frozen in the state before anything is written) reads the same rows in the
  same order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .config import SourceConfig, parse_duration
from .errors import SourceError
from .sources import EXTENSIONS, list_files
from .storage import Storage, translate_errors

__all__ = ["NewInput", "find_new_files", "mark_consumed", "read_files", "max_event_time_after",
           "read_event_range"]

log = logging.getLogger("dpipeline_prefect.incremental")


@dataclass
class NewInput:
    """What a run found under the source: new files (path, size, mtime) and what it skipped."""

    files: list[dict[str, Any]] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    too_old: int = 0


def _mtime(info: dict[str, Any]) -> float:
    for k in ("mtime", "LastModified", "last_modified", "created"):
        v = info.get(k)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return 0.0


def find_new_files(cfg: SourceConfig, consumed: dict[str, list], max_file_age: str | None = None,
                   storage: Storage | None = None) -> NewInput:
    """The source files not in ``consumed``, in path order, with their size and mtime.

    A source folder that does not exist yet, or holds no file, has no new input (the first
    files may simply not have arrived); a missing single file is an error.
    """
    storage = storage or Storage(cfg.path, cfg.storage_options)
    try:
        storage.fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - s3fs caches listings; a stale one would hide new files
        pass
    try:
        paths = list_files(storage, cfg.format)
    except SourceError:
        if storage.root.lower().endswith(tuple(e for exts in EXTENSIONS.values() for e in exts)):
            raise
        return NewInput()
    floor = None
    if max_file_age is not None and consumed:
        newest = max(float(v[1]) for v in consumed.values())
        floor = newest - parse_duration(max_file_age, "stream.max_file_age").total_seconds()
    out = NewInput()
    for p in paths:
        with translate_errors(p):
            info = storage.fs.info(p)
        size, mtime = int(info.get("size") or 0), _mtime(info)
        seen = consumed.get(p)
        if seen is not None:
            if int(seen[0]) != size or float(seen[1]) != mtime:
                out.modified.append(p)
            continue
        if floor is not None and mtime < floor:
            out.too_old += 1
            continue
        out.files.append({"path": p, "size": size, "mtime": mtime})
    if out.modified:
        log.warning("%d consumed input file(s) changed since they were read and are not read again "
                    "(input files are treated as immutable), e.g. %s", len(out.modified),
                    storage.unstrip(out.modified[0]))
    return out


def mark_consumed(consumed: dict[str, list], files: list[dict[str, Any]],
                  max_file_age: str | None = None) -> dict[str, list]:
    """``consumed`` plus ``files``, minus entries older than ``max_file_age`` (see module doc)."""
    out = dict(consumed)
    for f in files:
        out[f["path"]] = [int(f["size"]), float(f["mtime"])]
    if max_file_age is not None and out:
        newest = max(float(v[1]) for v in out.values())
        floor = newest - parse_duration(max_file_age, "stream.max_file_age").total_seconds()
        out = {p: v for p, v in out.items() if float(v[1]) >= floor}
    return out


def read_files(cfg: SourceConfig, files: list[dict[str, Any]], storage: Storage | None = None) -> pd.DataFrame:
    """Read ``files`` (in order) into one DataFrame; an unreadable file is named in the error."""
    storage = storage or Storage(cfg.path, cfg.storage_options)
    tables: list[pa.Table] = []
    for f in files:
        path = f["path"]
        with translate_errors(path), storage.fs.open(path, "rb", **({} if cfg.format == "parquet" else {"compression": "infer"})) as fh:
            try:
                if cfg.format == "parquet":
                    t = pq.read_table(fh)
                elif cfg.format == "csv":
                    t = pacsv.read_csv(fh)
                else:
                    t = pajson.read_json(fh)
            except (pa.ArrowInvalid, OSError) as e:
                raise SourceError(f"{storage.unstrip(path)}: cannot be read as {cfg.format}: {e}",
                                  path=storage.unstrip(path)) from None
        tables.append(t)
    frames = [t.to_pandas() for t in tables if t.num_rows]
    if not frames:
        return pd.DataFrame()
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _dataset(cfg: SourceConfig, column: str, storage: Storage):
    """A pyarrow dataset over the source's files and the event-time field, or None if empty."""
    import pyarrow.dataset as pads

    try:
        storage.fs.invalidate_cache()
    except Exception:  # noqa: BLE001
        pass
    try:
        paths = list_files(storage, cfg.format)
    except SourceError:
        return None, None
    if not paths:
        return None, None
    with translate_errors(storage.url):
        ds = pads.dataset(paths, filesystem=storage.fs, format="parquet")
    idx = ds.schema.get_field_index(column)
    if idx < 0:
        raise SourceError(f"stream.event_time: column {column!r} is not in the source "
                          f"{storage.url}; columns are: {', '.join(ds.schema.names)}", path=storage.url)
    f = ds.schema.field(idx)
    if not pa.types.is_timestamp(f.type):
        raise SourceError(f"stream.event_time: column {column!r} is {f.type} in {storage.url}; "
                          "incremental: event_time needs a timestamp column", path=storage.url)
    return ds, f


def _bound(f: pa.Field, ns: int) -> pa.Scalar:
    tz = f.type.tz
    ts = pd.Timestamp(ns, tz="UTC")
    return pa.scalar(ts if tz else ts.tz_localize(None), type=pa.timestamp("ns", tz)).cast(f.type)


def max_event_time_after(cfg: SourceConfig, column: str, after_ns: int | None,
                         storage: Storage | None = None) -> int | None:
    """The largest event time (ns, UTC) among source rows past ``after_ns``; None if none."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    storage = storage or Storage(cfg.path, cfg.storage_options)
    ds, f = _dataset(cfg, column, storage)
    if ds is None:
        return None
    flt = pads.field(column) > _bound(f, after_ns) if after_ns is not None else None
    with translate_errors(storage.url):
        col = ds.to_table(columns=[column], filter=flt).column(column)
    if len(col) == 0 or col.null_count == len(col):
        return None
    mx = pc.max(col).as_py()
    return int(pd.Timestamp(mx).tz_localize("UTC").value if pd.Timestamp(mx).tzinfo is None
               else pd.Timestamp(mx).value)


def read_event_range(cfg: SourceConfig, column: str, lo_ns: int | None, hi_ns: int,
                     storage: Storage | None = None) -> pd.DataFrame:
    """Source rows with ``lo_ns < event time <= hi_ns`` (all files, in path order)."""
    import pyarrow.dataset as pads

    storage = storage or Storage(cfg.path, cfg.storage_options)
    ds, f = _dataset(cfg, column, storage)
    if ds is None:
        return pd.DataFrame()
    flt = pads.field(column) <= _bound(f, hi_ns)
    if lo_ns is not None:
        flt = flt & (pads.field(column) > _bound(f, lo_ns))
    with translate_errors(storage.url):
        return ds.to_table(filter=flt).to_pandas()
