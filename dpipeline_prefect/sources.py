"""Sources: find the input files, fix one schema for them, stream them as Arrow record batches.

A source is read as a *deterministic row stream*: files in sorted path order, rows in file
order. Checkpoints record progress as a row offset into a shard's stream, so a resumed shard
can skip exactly the rows it has already committed (whole Parquet row groups are skipped
from metadata, without reading them).

The schema is fixed once, at planning: Parquet files must agree with the first file (a
mismatch names both files and the column); CSV and JSON-lines are inferred from the first
block of the first file and every file is then parsed with that explicit schema, so batches
from different files and shards always have the same column types.
"""

from __future__ import annotations

import base64
import io
import posixpath
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from .config import SourceConfig
from .errors import SchemaMismatchError, SourceError
from .storage import Storage, missing_source, translate_errors

__all__ = [
    "InputFile",
    "SourcePlan",
    "plan_source",
    "read_batches",
    "schema_to_b64",
    "schema_from_b64",
    "skip_leading_rows",
    "EXTENSIONS",
]

EXTENSIONS = {
    "parquet": (".parquet", ".pq", ".parq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz"),
}
_GLOB_CHARS = "*?["
_READ_CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class InputFile:
    """One input file: its path in the filesystem's own form, size and (Parquet) row counts."""

    path: str
    size: int
    rows: int | None = None
    row_group_rows: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"path": self.path, "size": self.size, "rows": self.rows, "rg": list(self.row_group_rows)}

    @classmethod
    def from_dict(cls, d: dict) -> "InputFile":
        return cls(d["path"], d["size"], d.get("rows"), tuple(d.get("rg") or ()))


@dataclass
class SourcePlan:
    files: list[InputFile]
    schema: pa.Schema
    bytes_total: int = field(default=0)


def schema_to_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def schema_from_b64(data: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data)))


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _glob_base(pattern: str) -> str:
    """The leading path segments of ``pattern`` that hold no glob character."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _GLOB_CHARS):
            return "/".join(parts[:i])
    return pattern


def list_files(storage: Storage, fmt: str) -> list[str]:
    """Every input file under the source URL: a file, a folder (recursive) or a glob."""
    fs, root = storage.fs, storage.root
    exts = EXTENSIONS[fmt]
    with translate_errors(storage.url, op="list", role=getattr(storage, "role", None)):
        if any(c in root for c in _GLOB_CHARS):
            # Hidden parts are judged below the pattern's fixed prefix, so '**' does not pick
            # up _staging/ or .cache/ folders, while a pattern that names one still works.
            base = _glob_base(root)
            found = [
                p for p in fs.glob(root)
                if not _hidden(p[len(base):] if p.startswith(base) else posixpath.basename(p))
            ]
            found = [p for p in found if fs.isfile(p)]
            if not found:
                raise missing_source(storage.url)
            return sorted(found)
        if fs.isfile(root):
            return [root]
        if not fs.isdir(root):
            raise missing_source(storage.url)
        found = []
        for p in fs.find(root):
            rel = p[len(root.rstrip("/")) + 1 :]
            if _hidden(rel):
                continue
            if p.lower().endswith(exts):
                found.append(p)
        return sorted(found)


def _parquet_meta(storage: Storage, path: str) -> tuple[InputFile, pa.Schema]:
    with translate_errors(path, op="read", role=getattr(storage, "role", None)):
        size = storage.fs.size(path)
        with storage.fs.open(path, "rb") as f:
            try:
                md = pq.ParquetFile(f).metadata
            except PermissionError:
                raise  # access denied is about credentials, not the file: translated above
            except (pa.ArrowInvalid, OSError) as e:
                raise SourceError(
                    f"{storage.unstrip(path)}: not a readable Parquet file ({e})", path=path
                ) from None
            schema = md.schema.to_arrow_schema()
    rg = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
    return InputFile(path, int(size), int(md.num_rows), rg), schema


def _compare(first: pa.Schema, first_path: str, other: pa.Schema, other_path: str, storage: Storage) -> None:
    a, b = storage.unstrip(first_path), storage.unstrip(other_path)
    for f in first:
        idx = other.get_field_index(f.name)
        if idx < 0:
            raise SchemaMismatchError(
                f"schema mismatch: column {f.name!r} is in {a} but missing from {b}",
                column=f.name, path=first_path, other_path=other_path,
            )
        t = other.field(idx).type
        if t != f.type and not (pa.types.is_null(t) or pa.types.is_null(f.type)):
            raise SchemaMismatchError(
                f"schema mismatch: column {f.name!r} is {f.type} in {a} but {t} in {b}",
                column=f.name, path=first_path, other_path=other_path,
            )
    for f in other:
        if first.get_field_index(f.name) < 0:
            raise SchemaMismatchError(
                f"schema mismatch: column {f.name!r} is in {b} but missing from {a}",
                column=f.name, path=first_path, other_path=other_path,
            )


def _infer_text_schema(storage: Storage, path: str, fmt: str) -> pa.Schema:
    with translate_errors(path, op="read", role=getattr(storage, "role", None)), storage.fs.open(path, "rb", compression="infer") as f:
        head = f.read(1 << 20)
    # Cut at the last full line so the sample never ends mid-row.
    cut = head.rfind(b"\n")
    sample = head[: cut + 1] if cut > 0 else head
    if fmt == "csv":
        try:
            table = pacsv.read_csv(io.BytesIO(sample))
        except pa.ArrowInvalid as e:
            raise SourceError(f"{storage.unstrip(path)}: not readable as CSV ({e})", path=path) from None
    else:
        try:
            table = pajson.read_json(io.BytesIO(sample))
        except pa.ArrowInvalid as e:
            raise SourceError(f"{storage.unstrip(path)}: not readable as JSON lines ({e})", path=path) from None
    # A column that is null in the whole sample would stay null-typed: read it as text.
    fields = [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
    return pa.schema(fields)


def _text_header(storage: Storage, path: str, fmt: str) -> list[str]:
    with translate_errors(path, op="read", role=getattr(storage, "role", None)), storage.fs.open(path, "rb", compression="infer") as f:
        line = f.readline()
    if fmt == "csv":
        return [c.strip().strip('"') for c in line.decode("utf-8", "replace").rstrip("\r\n").split(",")]
    import json

    try:
        first = json.loads(line or b"{}")
    except ValueError:
        first = None
    if not isinstance(first, dict):
        raise SourceError(f"{storage.unstrip(path)}: first line is not a JSON object", path=path)
    return list(first.keys())


def plan_source(cfg: SourceConfig, storage: Storage | None = None) -> SourcePlan:
    """List the input, read its metadata once, and check that every file has the same schema."""
    storage = storage or Storage(cfg.path, cfg.storage_options, role="source")
    paths = list_files(storage, cfg.format)
    if not paths:
        return SourcePlan([], pa.schema([]), 0)
    if cfg.format == "parquet":
        with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
            metas = list(pool.map(lambda p: _parquet_meta(storage, p), paths))
        files = [m[0] for m in metas]
        first_schema = metas[0][1]
        for (f, s) in metas[1:]:
            _compare(first_schema, files[0].path, s, f.path, storage)
        schema = first_schema.remove_metadata()
    else:
        schema = _infer_text_schema(storage, paths[0], cfg.format)
        with ThreadPoolExecutor(max_workers=min(16, len(paths))) as pool:
            sizes = list(pool.map(storage.size, paths))
            headers = list(pool.map(lambda p: _text_header(storage, p, cfg.format), paths))
        files = [InputFile(p, s) for p, s in zip(paths, sizes)]
        first = headers[0]
        for p, h in zip(paths[1:], headers[1:]):
            if cfg.format == "csv" and h != first:
                missing = [c for c in first if c not in h] or [c for c in h if c not in first]
                col = missing[0] if missing else first[0]
                raise SchemaMismatchError(
                    f"schema mismatch: CSV header of {storage.unstrip(p)} differs from "
                    f"{storage.unstrip(paths[0])} at column {col!r}",
                    column=col, path=paths[0], other_path=p,
                )
            if cfg.format == "jsonl":
                # A key may be absent from a line (null), but a key the planned schema does
                # not have makes the reader fail later with an unnamed "unexpected field".
                extra = [c for c in h if schema.get_field_index(c) < 0]
                if extra:
                    raise SchemaMismatchError(
                        f"schema mismatch: column {extra[0]!r} is in {storage.unstrip(p)} but "
                        f"missing from {storage.unstrip(paths[0])}",
                        column=extra[0], path=paths[0], other_path=p,
                    )
    return SourcePlan(files, schema, sum(f.size for f in files))


def read_batches(
    storage: Storage,
    file: InputFile,
    fmt: str,
    schema: pa.Schema,
    skip_rows: int = 0,
    chunk_rows: int = _READ_CHUNK_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Stream ``file`` as record batches of at most ``chunk_rows`` rows, skipping the first
    ``skip_rows`` rows. Memory stays bounded by one chunk (one row group for Parquet)."""
    path = file.path
    if fmt == "parquet":
        rg_rows = file.row_group_rows
        first_rg = 0
        while first_rg < len(rg_rows) and skip_rows >= rg_rows[first_rg]:
            skip_rows -= rg_rows[first_rg]
            first_rg += 1
        if rg_rows and first_rg >= len(rg_rows):
            return
        with translate_errors(path, op="read", role=getattr(storage, "role", None)), storage.fs.open(path, "rb") as f:
            # pre_buffer coalesces reads: worth it on object stores, only memory on local disk
            pf = pq.ParquetFile(f, pre_buffer=not storage.is_local)
            groups = list(range(first_rg, pf.metadata.num_row_groups))
            chunks = pf.iter_batches(batch_size=chunk_rows, row_groups=groups, use_threads=False)
            for b in skip_leading_rows(chunks, skip_rows):
                if b.schema != schema:
                    b = _conform(b, schema, storage, path)
                yield b
        return
    with translate_errors(path, op="read", role=getattr(storage, "role", None)), storage.fs.open(path, "rb", compression="infer") as f:
        try:
            if fmt == "csv":
                reader = pacsv.open_csv(
                    f,
                    read_options=pacsv.ReadOptions(block_size=4 << 20, use_threads=False),
                    convert_options=pacsv.ConvertOptions(column_types=schema),
                )
            else:
                reader = pajson.open_json(
                    f,
                    read_options=pajson.ReadOptions(block_size=4 << 20, use_threads=False),
                    parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"),
                )
            pieces = (b.slice(off, chunk_rows) for b in reader for off in range(0, b.num_rows, chunk_rows))
            for piece in skip_leading_rows(pieces, skip_rows):
                if piece.schema != schema:
                    piece = _conform(piece, schema, storage, path)
                yield piece
        except pa.ArrowInvalid as e:
            raise SourceError(f"{storage.unstrip(path)}: cannot be parsed as {fmt}: {e}", path=path) from None


def skip_leading_rows(batches: Iterable[pa.RecordBatch], skip_rows: int) -> Iterator[pa.RecordBatch]:
    """``batches`` without their first ``skip_rows`` rows (whole batches dropped, one sliced)."""
    for b in batches:
        if skip_rows:
            if b.num_rows <= skip_rows:
                skip_rows -= b.num_rows
                continue
            b = b.slice(skip_rows)
            skip_rows = 0
        yield b


def _conform(batch: pa.RecordBatch, schema: pa.Schema, storage: Storage, path: str) -> pa.RecordBatch:
    """Reorder / cast a batch to the planned schema; a column that cannot be cast is named."""
    cols = []
    for f in schema:
        idx = batch.schema.get_field_index(f.name)
        if idx < 0:
            raise SchemaMismatchError(
                f"{storage.unstrip(path)}: column {f.name!r} is missing", column=f.name, path=path
            )
        col = batch.column(idx)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise SchemaMismatchError(
                    f"{storage.unstrip(path)}: column {f.name!r} is {col.type}, expected {f.type}",
                    column=f.name, path=path,
                ) from None
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=schema)
