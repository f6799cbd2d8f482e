"""Batching: cut a stream of Arrow record batches into pipeline batches.

A pipeline batch is the unit that is transformed, written and checkpointed once. It holds at
most ``rows`` rows and never more than ``max_bytes`` of Arrow memory: when rows are wide, the
batch is cut earlier, at the row count that fits (estimated from the incoming chunk's bytes
per row). Chunks are sliced zero-copy; a batch is a list of slices, handed over as one
``pyarrow.Table`` without concatenating buffers.

The cut points depend only on the input and on (rows, max_bytes), so a re-run over the same
input from the same offset reproduces the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

__all__ = ["Batch", "batches"]


@dataclass
class Batch:
    """One pipeline batch: ``table`` covers rows [offset, offset + num_rows) of the shard stream."""

    table: pa.Table
    offset: int

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @property
    def nbytes(self) -> int:
        return self.table.nbytes


def batches(
    chunks: Iterable[pa.RecordBatch],
    rows: int,
    max_bytes: int,
    schema: pa.Schema,
    start_offset: int = 0,
) -> Iterator[Batch]:
    """Group ``chunks`` into :class:`Batch` objects of at most ``rows`` rows and ``max_bytes`` bytes.

    Args:
        chunks: record batches in stream order (already past ``start_offset``).
        rows: the most rows a batch may hold.
        max_bytes: the most Arrow bytes a batch may hold (one row is always allowed).
        schema: the schema every chunk has.
        start_offset: stream offset of the first row of ``chunks``.
    """
    pending: list[pa.RecordBatch] = []
    n = 0
    size = 0
    offset = start_offset

    def flush() -> Batch:
        nonlocal pending, n, size, offset
        b = Batch(pa.Table.from_batches(pending, schema=schema), offset)
        offset += n
        pending, n, size = [], 0, 0
        return b

    for chunk in chunks:
        while chunk.num_rows:
            per_row = max(1, chunk.nbytes // max(1, chunk.num_rows))
            room_rows = rows - n
            room_bytes = max_bytes - size
            fit = min(room_rows, room_bytes // per_row)
            if fit <= 0:
                if n == 0:
                    fit = 1  # a single row larger than max_bytes still has to move
                else:
                    yield flush()
                    continue
            piece = chunk if fit >= chunk.num_rows else chunk.slice(0, fit)
            pending.append(piece)
            n += piece.num_rows
            size += piece.num_rows * per_row
            chunk = chunk.slice(piece.num_rows) if piece is not chunk else chunk.slice(chunk.num_rows)
            if n >= rows or size >= max_bytes:
                yield flush()
    if n:
        yield flush()
