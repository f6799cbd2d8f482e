"""Per-shard progress objects (checkpoints) on any fsspec URL: local disk, memory:// or S3.

What a caller may rely on:

* **Atomic.** Every checkpoint object is written whole through :func:`storage.atomic_write`
  (a PUT of a new key on S3, write-then-``os.replace`` on disk). Objects are never rewritten in
  place: each save writes a *new generation* under a new name, so no reader ever sees half of
  one, and a crash mid-save leaves the previous generation untouched.
* **Checksummed and compressed.** :func:`encode` frames a document as
  ``b"DPCK" + version byte + sha256(payload) + payload`` where payload is zstd-compressed JSON.
  Truncated, bit-flipped or foreign bytes raise :class:`CheckpointCorruptError` naming the path.
* **Self-describing.** Each stored object wraps the caller's document in an envelope carrying
  ``pipeline``, ``run_key``, ``kind`` (``"manifest"`` / ``"shard"``), ``shard``, ``generation``
  and ``saved_at``. On load the envelope must match the key that was asked for, so an object
  copied in from another run, pipeline, shard or generation is refused like a corrupt one.
  The caller's document is kept under its own key (not merged into the envelope) so that no
  field name of the caller can collide with ours.
* **Optionally encrypted.** With a :class:`crypto.Cipher` the framed object is sealed with
  AES-256-GCM whose associated data is the object's pipeline, run key, kind, shard and
  generation: a flipped bit or an object swapped in from elsewhere fails authentication, and is
  treated like a corrupt generation (fallback below). With a cipher, a plaintext object is
  refused too (it could have been planted); without one, an encrypted object stops the load
  with an :class:`EncryptionError` saying to configure the key.
* **Fallback.** The latest and the previous generation are kept. If the latest is corrupt the
  load falls back to the next older one and logs a warning naming the path; only when every
  generation is corrupt does it raise.
* **Small writes.** ``save_shard`` writes one object for one shard (plus one delete, by name, of
  the generation before the previous one). The store remembers which generations exist per key,
  so saves never list; the first save of a key the store has not seen lists that key once.
* **A missing object means "no checkpoint"**, never an error. Storage failures come out as the
  package's storage errors (``storage.translate_errors``), with no credentials in the text.

Layout under the checkpoint root::

    {root}/{pipeline}/{run_key}/manifest/{generation:010d}.ckpt
    {root}/{pipeline}/{run_key}/shards/{shard_id}/{generation:010d}.ckpt

:class:`AsyncCheckpointWriter` takes shard saves off the data path: a background thread writes
the newest submitted document per shard, in submission order per shard, and ``flush()`` blocks
until everything submitted is durable. Exactly-once output depends on that contract (see the
class docstring).

Why by hand: fsspec gives atomic PUTs but no generations, checksums, fallback or per-key
bookkeeping, and Prefect's result persistence is per task run, not per batch inside a task.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import zstandard

from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    DPipelineError,
    EncryptionError,
    StorageUnavailableError,
)
from .crypto import Cipher, DecryptionError, aad, is_encrypted
from .storage import Storage, atomic_write, translate_errors

try:  # orjson ships with prefect; the stdlib is the fallback, not a second code path to test
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None
    import json as _json

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "encode",
    "decode",
    "CheckpointStore",
    "AsyncCheckpointWriter",
    "RunInfo",
    "GcReport",
    "list_runs",
    "gc",
]

logger = logging.getLogger("dpipeline_prefect.checkpoint")

MAGIC = b"DPCK"
FORMAT_VERSION = 1
_HEADER_LEN = len(MAGIC) + 1 + 32  # magic, version byte, sha256 digest
_ZSTD_LEVEL = 3  # documents are a few hundred bytes: higher levels buy nothing measurable
_MAX_DOC_BYTES = 64 * 1024 * 1024  # guard against decompressing something absurd

_GEN_RE = re.compile(r"^(\d{10})\.ckpt$")
# Names become path segments on every backend: no "/", no leading "." (temp files of
# atomic_write start with "."), no whitespace.
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:=+@-]{0,199}$")

# Concurrent reads when loading many shards: S3 round trips cost ~13 ms each, so a small pool
# turns N sequential GETs into ~N/16 round trips. Local disk gains little but loses nothing.
_READ_THREADS = 16

# Temporary files left by a crash in atomic_write on local disk are removed by gc after this.
_STALE_TMP_SECONDS = 3600.0

# Listing again when every listed generation vanished before it could be read (a writer saving
# faster than we read). Beyond this the key is too busy to read consistently.
_MAX_RELISTS = 20


# --------------------------------------------------------------------------- encoding


def _default(obj: Any) -> Any:
    # numpy / pyarrow scalars (row counts, offsets) are common in progress docs
    item = getattr(obj, "item", None)
    if callable(item) and hasattr(obj, "dtype"):
        return item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _dumps(doc: dict[str, Any]) -> bytes:
    if _orjson is not None:
        # PASSTHROUGH_DATETIME: refuse datetimes rather than silently turning them into strings,
        # so what load returns always equals what save was given.
        return _orjson.dumps(doc, default=_default, option=_orjson.OPT_PASSTHROUGH_DATETIME)
    return _json.dumps(doc, default=_default, separators=(",", ":")).encode()  # pragma: no cover


def _loads(data: bytes) -> Any:
    if _orjson is not None:
        return _orjson.loads(data)
    return _json.loads(data)  # pragma: no cover


def encode(doc: dict[str, Any]) -> bytes:
    """Serialize ``doc`` as a framed, checksummed, zstd-compressed checkpoint object.

    Args:
        doc: A JSON-compatible mapping (str keys; str, int, float, bool, None, list, dict values;
            numpy scalars are converted to Python numbers).

    Returns:
        ``MAGIC + version byte + sha256(payload) + payload``.

    Raises:
        CheckpointError: ``doc`` is not a dict or holds a value JSON cannot represent.
    """
    if not isinstance(doc, dict):
        raise CheckpointError(f"a checkpoint document must be a dict, not {type(doc).__name__}")
    try:
        raw = _dumps(doc)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint document is not JSON-serializable: {exc}") from None
    payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw)
    return MAGIC + bytes([FORMAT_VERSION]) + hashlib.sha256(payload).digest() + payload


def decode(data: bytes, path: str = "<bytes>") -> dict[str, Any]:
    """Verify and decode bytes produced by :func:`encode`.

    Args:
        data: The stored object.
        path: Named in the error message.

    Returns:
        The document.

    Raises:
        CheckpointCorruptError: wrong magic or version, short read, checksum mismatch, or a
            payload that is not a zstd-compressed JSON object. ``err.path`` is ``path``.
    """

    def bad(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"checkpoint {path} is corrupt: {why}", path=path)

    data = bytes(data)
    if len(data) < _HEADER_LEN:
        raise bad(f"{len(data)} bytes, shorter than the {_HEADER_LEN}-byte header (truncated?)")
    if data[: len(MAGIC)] != MAGIC:
        raise bad("not a checkpoint object (bad magic)")
    version = data[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise bad(f"format version {version}, this library reads version {FORMAT_VERSION}")
    digest = data[len(MAGIC) + 1 : _HEADER_LEN]
    payload = data[_HEADER_LEN:]
    if hashlib.sha256(payload).digest() != digest:
        raise bad("sha256 checksum mismatch (truncated or modified)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=_MAX_DOC_BYTES)
        doc = _loads(raw)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is corruption
        raise bad(f"payload does not decode ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise bad(f"payload is a JSON {type(doc).__name__}, not an object")
    return doc


# --------------------------------------------------------------------------- helpers


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value) or value in (".", ".."):
        raise ConfigError(
            f"{what} {value!r} cannot be used in a checkpoint path: use 1-200 characters from "
            "letters, digits and _ . : = + @ -, not starting with '.' or '-'",
            field=what,
        )
    return value


def _gen_name(gen: int) -> str:
    return f"{gen:010d}.ckpt"


def _raise_translated(exc: BaseException, path: str) -> None:
    """Re-raise ``exc`` through translate_errors so it comes out as one of our errors."""
    with translate_errors(path):
        raise exc


def _find_local(prefix: str) -> dict[str, dict[str, Any]]:
    """Recursive listing of a local directory that keeps entries deleted while it runs.

    fsspec's local ``ls(detail=True)`` stats every entry and silently drops those that vanish
    between readdir and stat. With a writer saving quickly, both listed generations of a key can
    vanish in that window and the key would look empty ("no checkpoint"). Names come from one
    readdir per directory, which always holds at least one complete generation (rename of the
    new one happens before the delete of the old one); a vanished entry is kept with size 0 and
    reads of it fall back / re-list like on S3.
    """
    out: dict[str, dict[str, Any]] = {}
    stack = [prefix]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            path = posixpath.join(d, e.name)
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(path)
                    continue
                st = e.stat(follow_symlinks=False)
                info = {"type": "file", "size": st.st_size, "mtime": st.st_mtime}
            except FileNotFoundError:
                info = {"type": "file", "size": 0, "mtime": time.time()}
            out[path] = info
    return out


def _find_detail(storage: Storage, prefix: str) -> dict[str, dict[str, Any]]:
    """One recursive listing of ``prefix``: {path: info}. Missing prefix -> {}."""
    if storage.is_local:
        with translate_errors(prefix):
            return _find_local(prefix)
    with translate_errors(prefix):
        # s3fs caches listings; another process may have written since we last looked
        try:
            storage.fs.invalidate_cache(prefix)
        except Exception:  # noqa: BLE001 - a cache that cannot be invalidated is not an error
            pass
        try:
            out = storage.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
    return {p: info for p, info in out.items() if info.get("type", "file") != "directory"}


@dataclass
class _KeyListing:
    """Generations found for one key (manifest or one shard) and their sizes."""

    gens: list[int] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


@dataclass
class _RunListing:
    manifest: _KeyListing = field(default_factory=_KeyListing)
    shards: dict[str, _KeyListing] = field(default_factory=dict)
    tmp_files: list[tuple[str, float]] = field(default_factory=list)  # (path, mtime)

    @property
    def bytes(self) -> int:
        return self.manifest.bytes + sum(s.bytes for s in self.shards.values())


def _mtime(info: dict[str, Any]) -> float:
    for k in ("mtime", "created", "LastModified"):
        v = info.get(k)
        if isinstance(v, datetime):
            return v.timestamp()
        if isinstance(v, (int, float)):
            return float(v)
    return time.time()


def _delete_prefix(storage: Storage, prefix: str) -> None:
    """Delete everything under ``prefix/`` and nothing else.

    Lists and deletes exact paths instead of ``rm(prefix, recursive=True)``: on an object store
    a recursive delete expands by key prefix, and run key ``r1`` must never take ``r10`` with it.
    """
    start = prefix.rstrip("/") + "/"
    paths = [p for p in _find_detail(storage, prefix) if p.startswith(start)]
    storage.rm_many(paths)
    if storage.is_local:  # directories and temp files are real on disk
        storage.rm(prefix, recursive=True)
    with translate_errors(prefix):
        try:
            storage.fs.invalidate_cache(prefix)
        except Exception:  # noqa: BLE001
            pass


def _parse_run_listing(entries: dict[str, dict[str, Any]], base: str) -> dict[str, _RunListing]:
    """Group a listing under ``base`` (a pipeline prefix) by run key, key and generation."""
    runs: dict[str, _RunListing] = {}
    start = base.rstrip("/") + "/"
    for path, info in entries.items():
        if not path.startswith(start):
            continue
        parts = path[len(start) :].split("/")
        if len(parts) < 3:
            continue
        run = runs.setdefault(parts[0], _RunListing())
        name = parts[-1]
        m = _GEN_RE.match(name)
        if m is None:
            if name.startswith(".") and name.endswith(".tmp"):
                run.tmp_files.append((path, _mtime(info)))
            continue
        size = int(info.get("size") or 0)
        if len(parts) == 3 and parts[1] == "manifest":
            key = run.manifest
        elif len(parts) == 4 and parts[1] == "shards":
            key = run.shards.setdefault(parts[2], _KeyListing())
        else:
            continue
        key.gens.append(int(m.group(1)))
        key.sizes[key.gens[-1]] = size
    for run in runs.values():
        run.manifest.gens.sort()
        for s in run.shards.values():
            s.gens.sort()
    return runs


def _map_concurrently(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` on a small thread pool; the first exception propagates."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------- the store


@dataclass
class _KeyState:
    """What the store knows exists on storage for one key, so saves need no listing."""

    known: list[int]  # generations believed to exist, ascending
    valid: int | None  # the generation that is current (kept as "previous" on the next save)


@dataclass(frozen=True)
class _Loaded:
    doc: dict[str, Any]
    generation: int
    saved_at: float | None


class CheckpointStore:
    """Checkpoints of one run (``pipeline`` + ``run_key``) under a :class:`Storage` root.

    One store instance may be used from several threads at once as long as no two threads save
    the *same* key concurrently (:class:`AsyncCheckpointWriter` guarantees that). Different
    processes may save *different* shards of one run at the same time.

    Args:
        storage: The checkpoint root (``Storage(url, storage_options)``).
        pipeline: Pipeline name, used as a path segment.
        run_key: Run key, used as a path segment.

    Raises:
        ConfigError: ``pipeline`` or ``run_key`` is not usable as a path segment.

    Example:
        >>> store = CheckpointStore(Storage("memory://ck"), "flights", "2026-11-29")
        >>> store.save_shard("s0001", {"batch": 3, "done": False})
        1
        >>> store.load_shards()["s0001"]["batch"]
        3
    """

    def __init__(self, storage: Storage, pipeline: str, run_key: str, prune_every: int = 1,
                 cipher: Cipher | None = None) -> None:
        """
        Args:
            storage: where the checkpoints live.
            pipeline: the pipeline's name.
            run_key: the run's key.
            prune_every: delete superseded generations once this many have piled up (in one
                request). 1 deletes after every save; a shard saving after every batch uses
                more, halving its requests on object stores, and calls :meth:`prune` when done.
                Latest and previous generations are kept whatever the value.
            cipher: encrypt every object written and require every object read to be
                encrypted with it (``crypto.cipher_for(cfg.encryption)``); None: plaintext.
        """
        self.cipher = cipher
        self.prune_every = max(1, int(prune_every))
        self.storage = storage
        self.pipeline = _check_name(pipeline, "pipeline")
        self.run_key = _check_name(run_key, "run_key")
        self.prefix = storage.path(pipeline, run_key)
        self._lock = threading.Lock()
        self._state: dict[str | None, _KeyState] = {}  # None = manifest, else shard id
        self._shards_listed = False  # True once the whole shards/ prefix was listed

    # -- paths

    def _key_dir(self, shard: str | None) -> str:
        if shard is None:
            return posixpath.join(self.prefix, "manifest")
        return posixpath.join(self.prefix, "shards", shard)

    def _path(self, shard: str | None, gen: int) -> str:
        return posixpath.join(self._key_dir(shard), _gen_name(gen))

    # -- public API

    def save_manifest(self, doc: dict[str, Any]) -> int:
        """Write a new generation of the run's manifest.

        Args:
            doc: The manifest document; ``list_runs`` and ``gc`` read its ``"status"``
                (``"completed"`` marks a finished run).

        Returns:
            The generation written.
        """
        return self._save(None, doc)

    def load_manifest(self) -> dict[str, Any] | None:
        """The latest valid manifest, or None when the run has none.

        Raises:
            CheckpointCorruptError: manifest generations exist but every one is corrupt.
        """
        listing = self._list_key(None)
        loaded = self._load_key(None, listing.gens)
        return loaded.doc if loaded else None

    def save_shard(self, shard_id: str, doc: dict[str, Any]) -> int:
        """Write a new generation of one shard's document; nothing else is written.

        Args:
            shard_id: The shard, used as a path segment.
            doc: The shard's progress; ``list_runs`` counts it done when ``doc["done"]`` is true.

        Returns:
            The generation written.
        """
        return self._save(_check_name(shard_id, "shard_id"), doc)

    def prune(self, shard_id: str) -> None:
        """Delete every generation of ``shard_id`` but the latest and the previous one."""
        st = self._state_for(_check_name(shard_id, "shard_id"))
        if st.valid is None:
            return
        previous = max((g for g in st.known if g < st.valid), default=None)
        doomed = [g for g in st.known if g not in (st.valid, previous)]
        if doomed:
            self.storage.rm_many([self._path(shard_id, g) for g in doomed])
            with self._lock:
                self._state[shard_id] = _KeyState(
                    known=sorted(g for g in st.known if g not in doomed), valid=st.valid)

    def load_shard(self, shard_id: str) -> dict[str, Any] | None:
        """The latest valid document of one shard, or None when it has none.

        Raises:
            CheckpointCorruptError: generations exist but every one is corrupt.
        """
        shard_id = _check_name(shard_id, "shard_id")
        loaded = self._load_key(shard_id, self._list_key(shard_id).gens)
        return loaded.doc if loaded else None

    def load_shards(self) -> dict[str, dict[str, Any]]:
        """The latest valid document of every shard of the run: one listing, concurrent reads.

        Raises:
            CheckpointCorruptError: some shard has generations but every one is corrupt.
        """
        return {k: v.doc for k, v in self._load_all_shards().items()}

    def exists(self) -> bool:
        """True when the run has any checkpoint object (manifest or shard)."""
        runs = _parse_run_listing(
            _find_detail(self.storage, self.prefix), self.storage.path(self.pipeline)
        )
        run = runs.get(self.run_key)
        return bool(run and (run.manifest.gens or any(s.gens for s in run.shards.values())))

    def delete_run(self) -> None:
        """Remove every object of this run key (manifest, shards, leftovers)."""
        _delete_prefix(self.storage, self.prefix)
        with self._lock:
            self._state.clear()
            self._state[None] = _KeyState(known=[], valid=None)
            self._shards_listed = True  # nothing left: new keys start at generation 1

    def generation(self, shard_id: str | None = None) -> int | None:
        """The current generation the store knows for the manifest (None) or a shard."""
        with self._lock:
            st = self._state.get(shard_id)
            return st.valid if st else None

    # -- internals

    def _list_key(self, shard: str | None) -> _KeyListing:
        d = self._key_dir(shard)
        out = _KeyListing()
        for path, info in _find_detail(self.storage, d).items():
            if posixpath.dirname(path) != d:
                continue
            m = _GEN_RE.match(posixpath.basename(path))
            if m:
                out.gens.append(int(m.group(1)))
                out.sizes[out.gens[-1]] = int(info.get("size") or 0)
        out.gens.sort()
        return out

    def _aad(self, shard: str | None, gen: int) -> bytes:
        """What an encrypted generation is bound to: exactly the key it was saved under."""
        return aad(what="checkpoint", pipeline=self.pipeline, run_key=self.run_key,
                   kind="manifest" if shard is None else "shard", shard=shard, generation=gen)

    def _unseal(self, data: bytes, shard: str | None, gen: int, url: str) -> bytes:
        """The framed plaintext of a stored generation, checking encryption matches the config."""
        if is_encrypted(data):
            if self.cipher is None:
                raise EncryptionError(
                    f"checkpoint {url} is encrypted but this pipeline has no encryption section: "
                    "configure encryption.key_env or encryption.key_secret_block with its key",
                    path=url,
                )
            try:
                return self.cipher.decrypt(data, self._aad(shard, gen), url)
            except DecryptionError as exc:
                raise CheckpointCorruptError(f"checkpoint {exc}", path=url) from None
        if self.cipher is not None:
            raise CheckpointCorruptError(
                f"checkpoint {url} is not encrypted although this pipeline encrypts its checkpoints: "
                "refused (it may have been written before encryption was turned on, or planted); "
                "run with --restart to start this run key over",
                path=url,
            )
        return data

    def _read(self, shard: str | None, gen: int) -> _Loaded:
        """Read and verify one generation. FileNotFoundError passes through."""
        path = self._path(shard, gen)
        data = self.storage.read_bytes(path)
        data = self._unseal(data, shard, gen, self.storage.unstrip(path))
        env = decode(data, self.storage.unstrip(path))
        expect = {
            "pipeline": self.pipeline,
            "run_key": self.run_key,
            "kind": "manifest" if shard is None else "shard",
            "shard": shard,
            "generation": gen,
        }
        wrong = {k: env.get(k) for k, v in expect.items() if env.get(k) != v}
        if wrong:
            got = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise CheckpointCorruptError(
                f"checkpoint {self.storage.unstrip(path)} is corrupt: it belongs elsewhere "
                f"({got}; expected {', '.join(f'{k}={expect[k]!r}' for k in wrong)})",
                path=self.storage.unstrip(path),
            )
        if not isinstance(env.get("doc"), dict):
            raise CheckpointCorruptError(
                f"checkpoint {self.storage.unstrip(path)} is corrupt: no document in it",
                path=self.storage.unstrip(path),
            )
        saved_at = env.get("saved_at")
        return _Loaded(env["doc"], gen, saved_at if isinstance(saved_at, (int, float)) else None)

    def _load_key(self, shard: str | None, gens: list[int], *, relists: int = 0) -> _Loaded | None:
        """Latest valid generation among ``gens``, falling back to older ones."""
        corrupt: list[CheckpointCorruptError] = []
        missing = 0
        for gen in sorted(gens, reverse=True):
            try:
                loaded = self._read(shard, gen)
            except FileNotFoundError:
                missing += 1  # deleted since the listing (a concurrent save moved on)
                continue
            except CheckpointCorruptError as exc:
                logger.warning("%s; falling back to the previous generation", exc)
                corrupt.append(exc)
                continue
            with self._lock:
                # keep every listed generation in `known` so the next save deletes leftovers too
                self._state[shard] = _KeyState(known=sorted(set(gens)), valid=gen)
            return loaded
        if missing:
            # Generations we listed vanished: a writer saved twice between our listing and our
            # reads, so newer ones exist. List again; "no checkpoint" would be a lie and could
            # restart the shard.
            if relists < _MAX_RELISTS:
                return self._load_key(shard, self._list_key(shard).gens, relists=relists + 1)
        if missing and not corrupt:
            path = self.storage.unstrip(self._key_dir(shard))
            raise StorageUnavailableError(
                f"{path}: checkpoint generations kept disappearing while being read "
                f"({_MAX_RELISTS} listings); is another writer saving this key? Retry later",
                path=path,
            )
        if corrupt:
            where = "manifest" if shard is None else f"shard {shard!r}"
            raise CheckpointCorruptError(
                f"every checkpoint generation of {where} of run {self.run_key!r} of pipeline "
                f"{self.pipeline!r} is corrupt: {'; '.join(str(e) for e in corrupt)}",
                path=corrupt[0].details.get("path"),
            )
        with self._lock:
            self._state[shard] = _KeyState(known=[], valid=None)
        return None

    def _load_all_shards(self, run: _RunListing | None = None) -> dict[str, _Loaded]:
        if run is None:
            base = posixpath.join(self.prefix, "shards")
            runs = _parse_run_listing(
                _find_detail(self.storage, base), self.storage.path(self.pipeline)
            )
            run = runs.get(self.run_key, _RunListing())
        items = sorted((s, k.gens) for s, k in run.shards.items() if k.gens)
        results = _map_concurrently(lambda it: (it[0], self._load_key(it[0], it[1])), items)
        with self._lock:
            self._shards_listed = True
        return {s: loaded for s, loaded in results if loaded is not None}

    def _state_for(self, shard: str | None) -> _KeyState:
        with self._lock:
            st = self._state.get(shard)
            if st is None and shard is not None and self._shards_listed:
                st = self._state[shard] = _KeyState(known=[], valid=None)
        if st is None:
            # first save of a key this store has not loaded: one listing, then never again
            gens = self._list_key(shard).gens
            st = _KeyState(known=gens, valid=gens[-1] if gens else None)
            with self._lock:
                self._state[shard] = st
        return st

    def _save(self, shard: str | None, doc: dict[str, Any]) -> int:
        if not isinstance(doc, dict):
            raise CheckpointError(f"a checkpoint document must be a dict, not {type(doc).__name__}")
        st = self._state_for(shard)
        gen = (st.known[-1] if st.known else 0) + 1
        envelope = {
            "pipeline": self.pipeline,
            "run_key": self.run_key,
            "kind": "manifest" if shard is None else "shard",
            "shard": shard,
            "generation": gen,
            "saved_at": time.time(),
            "doc": doc,
        }
        data = encode(envelope)
        if self.cipher is not None:
            data = self.cipher.encrypt(data, self._aad(shard, gen))
        atomic_write(self.storage, self._path(shard, gen), data)
        # The new generation is durable. Keep it and the one it replaces; everything else the
        # store knows of (normally just gen-2, plus any corrupt or leftover generation seen at
        # load) is deleted by name. A failed delete is housekeeping, not a failed save.
        doomed = [g for g in st.known if g != st.valid]
        if len(doomed) >= self.prune_every:
            try:
                self.storage.rm_many([self._path(shard, g) for g in doomed])
                doomed = []
            except (DPipelineError, OSError) as exc:
                logger.warning("could not delete old checkpoint generations %s: %s", doomed, exc)
        keep = sorted({*doomed, *([st.valid] if st.valid is not None else []), gen})
        with self._lock:
            self._state[shard] = _KeyState(known=keep, valid=gen)
        return gen


# --------------------------------------------------------------------------- CLI helpers


@dataclass(frozen=True)
class RunInfo:
    """One run of a pipeline as seen in its checkpoints (for ``dpipeline runs``)."""

    run_key: str
    status: str  # the manifest's "status"; "unknown" without a manifest; "corrupt" if unreadable
    shards: int
    shards_done: int
    updated: datetime | None  # latest saved_at of the documents read (UTC)
    bytes: int  # total size of the run's checkpoint objects


@dataclass
class GcReport:
    """What :func:`gc` removed (or would remove, with ``dry_run``)."""

    runs_deleted: list[str] = field(default_factory=list)
    runs_kept: list[str] = field(default_factory=list)
    generations_deleted: int = 0
    temp_files_deleted: int = 0
    bytes_freed: int = 0


def _scan(storage: Storage, pipeline: str) -> dict[str, _RunListing]:
    base = storage.path(_check_name(pipeline, "pipeline"))
    return _parse_run_listing(_find_detail(storage, base), base)


def _summaries(
    storage: Storage, pipeline: str, runs: dict[str, _RunListing], with_shards: bool,
    cipher: Cipher | None = None,
) -> list[tuple[RunInfo, float]]:
    """Read each run's manifest (and, with ``with_shards``, every shard) on one thread pool.

    Returns ``(RunInfo, updated timestamp)`` per run, in ``runs`` order. Reads of all runs go
    through one pool rather than one pool per run, so a run with many shards costs about
    shards / pool-size round trips on S3, not one round trip per shard.
    """
    stores = {k: CheckpointStore(storage, pipeline, k, cipher=cipher) for k in runs}
    jobs: list[tuple[str, str | None, list[int]]] = []
    for run_key, run in runs.items():
        jobs.append((run_key, None, run.manifest.gens))
        if with_shards:
            jobs += [(run_key, sh, k.gens) for sh, k in sorted(run.shards.items()) if k.gens]

    def read(job: tuple[str, str | None, list[int]]) -> _Loaded | CheckpointCorruptError | None:
        run_key, shard, gens = job
        try:
            return stores[run_key]._load_key(shard, gens)
        except CheckpointCorruptError as exc:
            return exc

    results = _map_concurrently(read, jobs)
    status = {k: "unknown" for k in runs}
    done = dict.fromkeys(runs, 0)
    stamps: dict[str, list[float]] = {k: [] for k in runs}
    for (run_key, shard, _), res in zip(jobs, results):
        if isinstance(res, CheckpointCorruptError):
            if shard is None:
                status[run_key] = "corrupt"
            continue  # a corrupt shard is simply not counted as done
        if res is None:
            continue
        stamps[run_key].append(res.saved_at or 0.0)
        if shard is None:
            status[run_key] = str(res.doc.get("status", "unknown"))
        else:
            done[run_key] += bool(res.doc.get("done"))
    out = []
    for run_key, run in runs.items():
        updated = max(stamps[run_key], default=0.0)
        info = RunInfo(
            run_key=run_key,
            status=status[run_key],
            shards=sum(1 for k in run.shards.values() if k.gens),
            shards_done=done[run_key],
            updated=datetime.fromtimestamp(updated, timezone.utc) if updated else None,
            bytes=run.bytes,
        )
        out.append((info, updated))
    return out


def list_runs(storage: Storage, pipeline: str, cipher: Cipher | None = None) -> list[RunInfo]:
    """Every run of ``pipeline`` under the checkpoint root, most recently updated first.

    One recursive listing, then concurrent reads of each run's manifest and shard documents.
    A run whose manifest is unreadable is listed with status ``"corrupt"`` rather than failing
    the whole listing.
    """
    infos = _summaries(storage, pipeline, _scan(storage, pipeline), with_shards=True, cipher=cipher)
    return [i for i, _ in sorted(infos, key=lambda t: t[1], reverse=True)]


def gc(storage: Storage, pipeline: str, keep: int, *, dry_run: bool = False,
       cipher: Cipher | None = None) -> GcReport:
    """Delete checkpoint objects no resume can need.

    * Whole runs whose manifest status is ``"completed"``, except the ``keep`` most recently
      updated ones. Runs with any other status (running, failed, no or corrupt manifest) are
      never deleted: they may still be resumed.
    * In the runs that remain, every generation older than the latest two of each key.
    * Temporary files of interrupted local writes older than an hour.

    A writer saving concurrently is safe: gc only deletes generations it listed that are older
    than two newer ones, which a writer no longer reads.

    Args:
        storage: The checkpoint root.
        pipeline: Pipeline name.
        keep: How many completed runs to keep (>= 0).
        dry_run: Report what would be deleted without deleting.
        cipher: The pipeline's cipher when its checkpoints are encrypted (manifests are read).
    """
    if keep < 0:
        raise ConfigError(f"keep must be >= 0, got {keep}", field="keep")
    runs = _scan(storage, pipeline)
    summaries = _summaries(storage, pipeline, runs, with_shards=False, cipher=cipher)
    report = GcReport()
    completed = sorted(
        ((info, ts) for info, ts in summaries if info.status == "completed"),
        key=lambda t: t[1],
        reverse=True,
    )
    doomed_runs = {info.run_key for info, _ in completed[keep:]}
    doomed_paths: list[str] = []
    now = time.time()
    for run_key, run in sorted(runs.items()):
        prefix = storage.path(pipeline, run_key)
        if run_key in doomed_runs:
            report.runs_deleted.append(run_key)
            report.bytes_freed += run.bytes
            if not dry_run:
                _delete_prefix(storage, prefix)
            continue
        report.runs_kept.append(run_key)
        keys: Iterable[tuple[str, _KeyListing]] = [
            (posixpath.join(prefix, "manifest"), run.manifest),
            *((posixpath.join(prefix, "shards", s), k) for s, k in run.shards.items()),
        ]
        for key_dir, listing in keys:
            old = listing.gens[:-2]
            if old:
                report.bytes_freed += sum(listing.sizes[g] for g in old)
                report.generations_deleted += len(old)
                doomed_paths += [posixpath.join(key_dir, _gen_name(g)) for g in old]
        for path, mtime in run.tmp_files:
            if now - mtime > _STALE_TMP_SECONDS:
                report.temp_files_deleted += 1
                doomed_paths.append(path)
    if doomed_paths and not dry_run:
        storage.rm_many(doomed_paths)
    return report


# --------------------------------------------------------------------------- async writer


class AsyncCheckpointWriter:
    """Save shard documents on background threads, newest-only, in order per shard.

    Contract (exactly-once output depends on it):

    * ``submit(shard_id, doc)`` returns at once. If an earlier document of the same shard is
      still waiting, it is replaced: only the newest needs writing, because each document
      covers everything before it.
    * Saves of one shard happen in submission order and never overlap; different shards may be
      saved concurrently when ``threads > 1``.
    * ``flush()`` blocks until every document submitted before the call is durable, and raises
      the first error a save hit. The caller submits document N only after the output N covers
      is written, and flushes before declaring the shard done. A lost (failed or not yet
      written) document only makes a resume redo batches whose outputs have deterministic
      names, so it never duplicates output.
    * After a save failed the writer is failed: the error is raised again by ``submit``,
      ``flush`` and ``close`` so the data path stops instead of running ahead of its
      checkpoints. Other pending documents are still written.

    Args:
        store: Where to save.
        threads: Background threads (1 keeps every save strictly sequential).

    Example:
        >>> with AsyncCheckpointWriter(store) as writer:
        ...     writer.submit("s0001", {"batch": 1})
        ...     writer.flush()
    """

    def __init__(self, store: CheckpointStore, threads: int = 1) -> None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}", field="threads")
        self.store = store
        self._cond = threading.Condition()
        self._pending: dict[str, tuple[int, dict[str, Any]]] = {}  # insertion order = FIFO
        self._in_flight: set[str] = set()
        self._seq = 0  # submissions so far
        self._error: BaseException | None = None
        self._closed = False
        self.saves = 0  # documents written
        self.coalesced = 0  # documents replaced before they were written
        self._threads = [
            threading.Thread(target=self._run, name=f"dpipeline-ckpt-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, shard_id: str, doc: dict[str, Any]) -> None:
        """Queue ``doc`` as the newest progress of ``shard_id``; returns without waiting.

        Raises:
            DPipelineError: an earlier save failed (the first such error), or the writer is
                closed.
        """
        _check_name(shard_id, "shard_id")
        # Snapshot now: the caller may mutate its dict after submit, and a document must never
        # claim progress the caller had not reached when it submitted. This also reports a
        # non-serializable document here, on the caller's thread.
        try:
            doc = _loads(_dumps(doc))
        except TypeError as exc:
            raise CheckpointError(f"checkpoint document is not JSON-serializable: {exc}") from None
        with self._cond:
            self._raise_if_failed()
            if self._closed:
                raise CheckpointError("AsyncCheckpointWriter is closed")
            self._seq += 1
            if shard_id in self._pending:
                self.coalesced += 1
                del self._pending[shard_id]  # re-insert: its turn comes after older shards
            self._pending[shard_id] = (self._seq, doc)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything submitted so far is durably written.

        Raises:
            DPipelineError: the first error any save hit.
            TimeoutError: ``timeout`` seconds passed first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._pending or self._in_flight) and self._error is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("checkpoint writer did not drain in time")
                self._cond.wait(remaining)
            self._raise_if_failed()

    def close(self) -> None:
        """Write what is pending, stop the threads, and raise the first save error if any."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        with self._cond:
            self._raise_if_failed()

    def __enter__(self) -> AsyncCheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the caller's exception with ours
            self.close()
        except Exception as err:  # noqa: BLE001
            logger.warning("checkpoint writer failed while unwinding: %s", err)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _next(self) -> tuple[str, dict[str, Any]] | None:
        """Under the lock: the oldest pending shard that is not being saved, or None to stop."""
        while True:
            for shard_id in self._pending:
                if shard_id not in self._in_flight:
                    _, doc = self._pending.pop(shard_id)
                    self._in_flight.add(shard_id)
                    return shard_id, doc
            if self._closed and not self._pending:
                return None
            self._cond.wait()

    def _run(self) -> None:
        while True:
            with self._cond:
                item = self._next()
            if item is None:
                return
            shard_id, doc = item
            try:
                self.store.save_shard(shard_id, doc)
            except BaseException as exc:  # noqa: BLE001 - handed to flush()/submit()
                with self._cond:
                    if self._error is None:
                        self._error = exc
                        logger.warning("checkpoint save of shard %r failed: %s", shard_id, exc)
            else:
                with self._cond:
                    self.saves += 1
            finally:
                with self._cond:
                    self._in_flight.discard(shard_id)
                    self._cond.notify_all()
