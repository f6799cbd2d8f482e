"""Batching: cut a stream of Arrow record batches into pipeline batches.

A pipeline batch is the unit that is transformed, written and checkpointed once. It holds at
most ``rows`` rows and never more than ``max_bytes`` of Arrow memory: when rows are wide, the
batch is cut earlier, at the row count whose slice measures within the limit. Chunks are
sliced zero-copy; a batch is a list of slices, handed over as one
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
            want = min(rows - n, chunk.num_rows)
            fit = _rows_that_fit(chunk, want, max_bytes - size)
            if fit == 0:
                if n == 0:
                    fit = 1  # a single row larger than max_bytes still has to move
                else:
                    yield flush()
                    continue
            piece = chunk if fit == chunk.num_rows else chunk.slice(0, fit)
            pending.append(piece)
            n += fit
            size += piece.nbytes
            chunk = chunk.slice(fit)
            if n >= rows or size >= max_bytes or fit < want:  # fit < want: next row is too big
                yield flush()
    if n:
        yield flush()


def _rows_that_fit(chunk: pa.RecordBatch, want: int, room: int) -> int:
    """The most leading rows of ``chunk`` (at most ``want``) whose Arrow bytes fit in ``room``.

    Measured on the slice itself, not estimated from the chunk's average row: rows of one
    chunk can differ in width by orders of magnitude (a few wide strings), and an average
    lets a batch of wide rows overshoot max_bytes many times over. A prefix's size only grows
    with its length, so a binary search over slice sizes finds the cut.
    """
    if room <= 0:
        return 0
    if chunk.slice(0, want).nbytes <= room:
        return want
    lo, hi = 0, want - 1  # lo fits (0 rows always do); the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chunk.slice(0, mid).nbytes <= room:
            lo = mid
        else:
            hi = mid - 1
    return lo
