"""The keyed-sharding stage: read every input file once and regroup its rows by shard.

One map task per input file ("split") streams the file, assigns each row its shard code
(``sharding.Sharder``) and appends the rows to one staged file per shard:
``<work>/shuffle/<shard_id>/split-<i>.arrow``. The staged files are Arrow IPC streams
(LZ4-compressed): an internal format, cheaper to write and read than Parquet, and streamed
batch by batch so memory stays bounded.

A shard then reads only its own staged files, in split order, which gives it a deterministic
row stream to checkpoint offsets into. The input is read once in total, not once per shard.

A map task is idempotent: its outputs have deterministic names, each is published atomically
when complete (temp name + rename on disk; a single multipart upload completed on close on S3),
and the task's completion is recorded in the checkpoint store only after all its outputs are
closed. A map task killed half-way is simply run again.

At rest: with an ``encryption`` section (``crypto.py``) every staged file is sealed with
AES-256-GCM, bound to its pipeline, run key, shard and file name (:class:`StageSeal`). The
IPC stream is then built in memory (never in a plaintext temporary file), sealed and published
atomically on close; a reader authenticates the whole file before yielding a row, so a
modified, truncated or misplaced staged file (another shard, split, run or pipeline) is refused
with :class:`~dpipeline_prefect.crypto.DecryptionError` instead of feeding wrong rows. The cost
is memory: a map task holds its split's staged rows (LZ4-compressed) until it closes them, and a
shard holds one decrypted staged file at a time. Without encryption nothing changes.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .crypto import Cipher, aad, cipher_for, is_encrypted
from .errors import EncryptionError
from .faults import crashpoint
from .sharding import Sharder
from .sources import InputFile, read_batches, skip_leading_rows
from .storage import Storage, translate_errors

if TYPE_CHECKING:
    from .config import PipelineConfig

__all__ = ["MapResult", "StageSeal", "run_map", "stage_seal", "staged_path", "read_staged"]

_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


@dataclass
class MapResult:
    split: int
    rows_in: int = 0
    bytes_read: int = 0
    outputs: dict[str, int] = field(default_factory=dict)  # shard_id -> rows
    sizes: dict[str, int] = field(default_factory=dict)  # shard_id -> staged bytes
    labels: dict[str, str] = field(default_factory=dict)  # shard_id -> label


def staged_path(work: Storage, shard_id: str, split: int) -> str:
    return work.path("shuffle", shard_id, f"split-{split:05d}.arrow")


@dataclass(frozen=True)
class StageSeal:
    """How staged files of one run are sealed: the pipeline's cipher and what each file binds to."""

    cipher: Cipher
    pipeline: str
    run_key: str

    def aad(self, path: str) -> bytes:
        """Associated data of the staged file at ``path`` (``.../shuffle/<shard>/<file>``)."""
        parts = path.replace("\\", "/").rstrip("/").split("/")
        return aad(what="shuffle", pipeline=self.pipeline, run_key=self.run_key,
                   shard=parts[-2], file=parts[-1])

    def seal(self, path: str, data: bytes) -> bytes:
        return self.cipher.encrypt(data, self.aad(path))

    def open(self, path: str, blob: bytes, url: str) -> bytes:
        if not is_encrypted(blob):
            raise EncryptionError(
                f"staged shuffle file {url} is not encrypted although this pipeline encrypts "
                "its staged rows: refused", path=url)
        return self.cipher.decrypt(blob, self.aad(path), url)


def stage_seal(cfg: "PipelineConfig", run_key: str) -> StageSeal | None:
    """The :class:`StageSeal` of a run, or None when the pipeline has no ``encryption`` section."""
    cipher = cipher_for(cfg.encryption)
    return None if cipher is None else StageSeal(cipher, cfg.name, run_key)


class _StagedWriter:
    def __init__(self, work: Storage, path: str, schema: pa.Schema, seal: StageSeal | None = None) -> None:
        self.work = work
        self.path = path
        self.seal = seal
        if seal is not None:  # plaintext only in memory; sealed and published in close()
            self.tmp = None
            self.f = pa.BufferOutputStream()
        elif work.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
            self.f = open(self.tmp, "wb")
        else:
            self.tmp = None
            self.f = work.fs.open(path, "wb")
        self.writer = pa.ipc.new_stream(self.f, schema, options=_IPC_OPTIONS)
        self.rows = 0
        self.size = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()
        if self.seal is not None:
            blob = self.seal.seal(self.path, self.f.getvalue().to_pybytes())
            self.work.write_bytes(self.path, blob)  # atomic: temp + rename, or one PUT
            self.size = len(blob)
            return
        self.size = self.f.tell()
        self.f.close()
        if self.tmp:
            os.replace(self.tmp, self.path)


def run_map(
    split: int,
    file: InputFile,
    source: Storage,
    fmt: str,
    schema: pa.Schema,
    sharder: Sharder,
    work: Storage,
    chunk_rows: int = 131_072,
    seal: StageSeal | None = None,
) -> MapResult:
    """Regroup one input file by shard into staged files; return per-shard row counts.

    With ``seal`` (encryption on) each staged file is sealed before it is published.
    """
    res = MapResult(split)
    writers: dict[int, _StagedWriter] = {}
    try:
        with translate_errors(file.path):
            for batch in read_batches(source, file, fmt, schema, chunk_rows=chunk_rows):
                codes = sharder.assign(batch)
                res.rows_in += batch.num_rows
                table = pa.Table.from_batches([batch])
                order = np.argsort(codes, kind="stable")
                sorted_codes = codes[order]
                table = table.take(pa.array(order))
                uniq, starts = np.unique(sorted_codes, return_index=True)
                ends = list(starts[1:]) + [len(sorted_codes)]
                for code, lo, hi in zip(uniq, starts, ends):
                    code = int(code)
                    w = writers.get(code)
                    if w is None:
                        sid = sharder.shard_id(code)
                        w = writers[code] = _StagedWriter(
                            work, staged_path(work, sid, split), schema, seal)
                        res.labels[sid] = sharder.label(code)
                    w.write(table.slice(int(lo), int(hi - lo)))
            for i, (code, w) in enumerate(writers.items()):
                if i == len(writers) // 2:
                    crashpoint("shuffle")
                w.close()
                res.outputs[sharder.shard_id(code)] = w.rows
                res.sizes[sharder.shard_id(code)] = w.size
    except BaseException:
        for w in writers.values():
            try:
                w.writer.close()
                w.f.close()
                if w.tmp and os.path.exists(w.tmp):
                    os.remove(w.tmp)
            except Exception:  # noqa: BLE001 - best effort on the failure path
                pass
        raise
    res.bytes_read = file.size
    return res


def read_staged(work: Storage, path: str, skip_rows: int = 0, seal: StageSeal | None = None):
    """Stream a staged file's record batches, skipping the first ``skip_rows`` rows.

    With ``seal`` the file is read whole and authenticated first (:class:`StageSeal`).
    """
    if seal is not None:
        blob = work.read_bytes(path)
        with translate_errors(path):
            data = seal.open(path, blob, work.unstrip(path))
            yield from skip_leading_rows(pa.ipc.open_stream(pa.BufferReader(data)), skip_rows)
        return
    with translate_errors(path), work.fs.open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid:
            f.seek(0)
            if is_encrypted(f.read(4)):
                raise EncryptionError(
                    f"staged shuffle file {work.unstrip(path)} is encrypted but this pipeline has "
                    "no encryption section: configure encryption.key_env or "
                    "encryption.key_secret_block", path=work.unstrip(path)) from None
            raise
        yield from skip_leading_rows(reader, skip_rows)
