"""Conformance suite for the checkpoint store, run against local disk, memory:// and S3.

The ``storage_url`` fixture (tests/conftest.py) yields ``(url, storage_options)`` with a unique
prefix per test; its S3 variant talks to a real SeaweedFS server. Faults are injected only where
a real backend cannot produce them on demand (a storage whose PUT fails, a store whose save
blocks), by small subclasses that otherwise do the real thing.
"""

from __future__ import annotations

import logging
import posixpath
import random
import threading
import time

import pytest

from dpipeline_prefect import checkpoint as ck
from dpipeline_prefect.checkpoint import (
    AsyncCheckpointWriter,
    CheckpointStore,
    decode,
    encode,
    gc,
    list_runs,
)
from dpipeline_prefect.errors import (
    CheckpointCorruptError,
    CheckpointError,
    ConfigError,
    StorageUnavailableError,
)
from dpipeline_prefect.storage import Storage, atomic_write

SHARD_DOC = {
    "batch": 42,
    "rows_in": 123456,
    "rows_out": 120001,
    "input": {"file": "s3://raw/flights/part-0007.parquet", "row_group": 3, "offset": 65536},
    "outputs": [f"out/shard=s0007/batch-{i:06d}.parquet" for i in range(40, 43)],
    "fingerprint": "9f2c1e0b6a7d4c3e8b1a2f9d0c4e7b6a5d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a",
    "done": False,
}


@pytest.fixture
def storage(storage_url) -> Storage:
    url, options = storage_url
    return Storage(url, options)


def _files(storage: Storage, prefix: str | None = None) -> dict[str, bytes]:
    """Every checkpoint object under ``prefix`` (default: the root) with its bytes."""
    root = prefix or storage.root
    try:
        storage.fs.invalidate_cache()
    except Exception:  # noqa: BLE001
        pass
    return {
        p: storage.read_bytes(p)
        for p in storage.find(root)
        if posixpath.basename(p).endswith(".ckpt")
    }


def _gens(storage: Storage, key_dir: str) -> list[int]:
    return sorted(
        int(posixpath.basename(p)[:10])
        for p in storage.find(key_dir)
        if posixpath.basename(p).endswith(".ckpt")
    )


# --------------------------------------------------------------------------- encoding (pure)


def test_encode_decode_round_trip_and_framing():
    data = encode(SHARD_DOC)
    assert data[:4] == b"DPCK" and data[4] == ck.FORMAT_VERSION
    assert decode(data, "x") == SHARD_DOC
    assert len(data) < len(repr(SHARD_DOC))  # compressed


@pytest.mark.parametrize("cut", [0, 3, 10, 37, -1, -5])
def test_decode_truncated_names_path(cut):
    data = encode(SHARD_DOC)
    with pytest.raises(CheckpointCorruptError) as info:
        decode(data[:cut], "s3://b/ck/0000000003.ckpt")
    assert info.value.path == "s3://b/ck/0000000003.ckpt"
    assert "s3://b/ck/0000000003.ckpt" in str(info.value)


def test_decode_any_single_bit_flip_is_refused():
    data = encode(SHARD_DOC)
    rng = random.Random(7)
    positions = list(range(len(data)))
    for pos in positions[:40] + rng.sample(positions, 40):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CheckpointCorruptError):
            decode(bytes(flipped), "p")


def test_decode_refuses_valid_checksum_on_non_object_payload():
    import hashlib

    import zstandard

    payload = zstandard.ZstdCompressor().compress(b"[1,2,3]")
    data = b"DPCK\x01" + hashlib.sha256(payload).digest() + payload
    with pytest.raises(CheckpointCorruptError, match="not an object"):
        decode(data, "p")
    with pytest.raises(CheckpointCorruptError, match="version"):
        decode(b"DPCK\x09" + data[5:], "p")


def test_encode_refuses_what_json_cannot_round_trip():
    from datetime import datetime

    with pytest.raises(CheckpointError, match="JSON"):
        encode({"when": datetime(2026, 1, 1)})
    with pytest.raises(CheckpointError):
        encode([1, 2])  # type: ignore[arg-type]


def test_names_must_be_path_safe(tmp_path):
    st = Storage(str(tmp_path))
    for bad in ["", "a/b", "..", ".hidden", "a b", "-x"]:
        with pytest.raises(ConfigError):
            CheckpointStore(st, "p", bad)
    with pytest.raises(ConfigError):
        CheckpointStore(st, "p", "r").save_shard("x/../y", {})


# --------------------------------------------------------------------------- conformance


def test_round_trip(storage):
    store = CheckpointStore(storage, "flights", "run-1")
    assert not store.exists()
    assert store.load_manifest() is None
    assert store.load_shards() == {}
    assert store.load_shard("s0001") is None

    assert store.save_manifest({"status": "running", "shards": ["s0001", "s0002"]}) == 1
    assert store.save_shard("s0001", SHARD_DOC) == 1
    assert store.save_shard("s0002", {"batch": 0, "done": True}) == 1
    assert store.save_shard("s0001", {**SHARD_DOC, "batch": 43}) == 2

    fresh = CheckpointStore(storage, "flights", "run-1")  # nothing cached
    assert fresh.exists()
    assert fresh.load_manifest() == {"status": "running", "shards": ["s0001", "s0002"]}
    assert fresh.load_shards() == {
        "s0001": {**SHARD_DOC, "batch": 43},
        "s0002": {"batch": 0, "done": True},
    }
    assert fresh.load_shard("s0002") == {"batch": 0, "done": True}
    # another run key of the same pipeline sees nothing
    assert CheckpointStore(storage, "flights", "run-2").load_shards() == {}

    fresh.delete_run()
    assert not fresh.exists()
    assert CheckpointStore(storage, "flights", "run-1").load_manifest() is None
    # saving after a delete starts over cleanly
    assert fresh.save_shard("s0001", {"batch": 1}) == 1


def test_previous_generation_kept_older_deleted(storage):
    store = CheckpointStore(storage, "p", "r")
    for i in range(1, 7):
        assert store.save_shard("s1", {"i": i}) == i
        assert store.save_manifest({"i": i}) == i
        expect = [i - 1, i] if i > 1 else [1]
        assert _gens(storage, store._key_dir("s1")) == expect
        assert _gens(storage, store._key_dir(None)) == expect
    # a new store continues the numbering from what it finds
    other = CheckpointStore(storage, "p", "r")
    assert other.save_shard("s1", {"i": 7}) == 7
    assert _gens(storage, store._key_dir("s1")) == [6, 7]


def test_each_save_writes_only_the_changed_shard_and_never_lists(storage, monkeypatch):
    store = CheckpointStore(storage, "p", "r")
    for s in ("s1", "s2", "s3"):
        store.save_shard(s, {"shard": s, "batch": 0})
        store.save_shard(s, {"shard": s, "batch": 1})
    before = _files(storage)

    writes: list[str] = []
    listings: list[str] = []
    real_write, real_find = ck.atomic_write, ck._find_detail
    monkeypatch.setattr(ck, "atomic_write", lambda st, p, d: (writes.append(p), real_write(st, p, d)))
    monkeypatch.setattr(ck, "_find_detail", lambda st, p: (listings.append(p), real_find(st, p))[1])

    resumed = CheckpointStore(storage, "p", "r")
    assert set(resumed.load_shards()) == {"s1", "s2", "s3"}
    assert len(listings) == 1  # one listing for all shards
    listings.clear()
    resumed.save_shard("s2", {"shard": "s2", "batch": 2})
    resumed.save_shard("s2", {"shard": "s2", "batch": 3})
    resumed.save_shard("s4", {"shard": "s4", "batch": 0})  # new shard: known absent, no listing
    assert listings == []
    assert [posixpath.relpath(w, resumed.prefix) for w in writes] == [
        "shards/s2/0000000003.ckpt",
        "shards/s2/0000000004.ckpt",
        "shards/s4/0000000001.ckpt",
    ]

    after = _files(storage)
    changed = {p for p in after if before.get(p) != after[p]}
    removed = set(before) - set(after)
    assert {posixpath.relpath(p, resumed.prefix) for p in changed} == {
        "shards/s2/0000000003.ckpt",
        "shards/s2/0000000004.ckpt",
        "shards/s4/0000000001.ckpt",
    }
    assert {posixpath.relpath(p, resumed.prefix) for p in removed} == {
        "shards/s2/0000000001.ckpt",
        "shards/s2/0000000002.ckpt",
    }


def _corrupt_truncate(storage, path, data, other):
    atomic_write(storage, path, data[: len(data) // 2])


def _corrupt_bitflip(storage, path, data, other):
    b = bytearray(data)
    b[-3] ^= 0x10
    atomic_write(storage, path, bytes(b))


def _corrupt_other_run(storage, path, data, other):
    # a perfectly valid object of the same shard and generation, but of another run
    atomic_write(storage, path, storage.read_bytes(other["run"]))


def _corrupt_other_pipeline(storage, path, data, other):
    atomic_write(storage, path, storage.read_bytes(other["pipeline"]))


def _corrupt_other_shard(storage, path, data, other):
    atomic_write(storage, path, storage.read_bytes(other["shard"]))


_CORRUPTIONS = {
    "truncated": _corrupt_truncate,
    "bitflip": _corrupt_bitflip,
    "other-run": _corrupt_other_run,
    "other-pipeline": _corrupt_other_pipeline,
    "other-shard": _corrupt_other_shard,
}


@pytest.mark.parametrize(
    ("kind", "corrupt"),
    [
        pytest.param(kind, fn, id=f"{kind}-{name}")
        for kind in ("shard", "manifest")
        for name, fn in _CORRUPTIONS.items()
        if not (kind == "manifest" and name == "other-shard")  # a manifest has no shard
    ],
)
def test_corrupt_latest_falls_back_to_previous(storage, caplog, corrupt, kind):
    def save(store, shard, doc):
        return store.save_manifest(doc) if kind == "manifest" else store.save_shard(shard, doc)

    def load(store, shard):
        if kind == "manifest":
            return store.load_manifest()
        return store.load_shards().get(shard)

    store = CheckpointStore(storage, "p", "r")
    save(store, "s1", {"v": 1})
    save(store, "s1", {"v": 2})
    # valid objects elsewhere with the same generation number, to be swapped in
    other_run = CheckpointStore(storage, "p", "r-other")
    other_pipe = CheckpointStore(storage, "p-other", "r")
    for s in (other_run, other_pipe):
        save(s, "s1", {"v": "x"})
        save(s, "s1", {"v": "x"})
    store.save_shard("s9", {"v": "x"})
    store.save_shard("s9", {"v": "x"})
    other = {
        "run": other_run._path(None if kind == "manifest" else "s1", 2),
        "pipeline": other_pipe._path(None if kind == "manifest" else "s1", 2),
        "shard": store._path("s9", 2),
    }
    shard = None if kind == "manifest" else "s1"
    latest = store._path(shard, 2)
    corrupt(storage, latest, storage.read_bytes(latest), other)

    fresh = CheckpointStore(storage, "p", "r")
    with caplog.at_level(logging.WARNING, logger="dpipeline_prefect.checkpoint"):
        assert load(fresh, "s1") == {"v": 1}
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpipeline_prefect.checkpoint"]
    assert any(latest in w for w in warnings), warnings

    # the next save moves past the corrupt generation and keeps the valid one as previous
    assert save(fresh, "s1", {"v": 3}) == 3
    assert _gens(storage, fresh._key_dir(shard)) == [1, 3]
    assert load(CheckpointStore(storage, "p", "r"), "s1") == {"v": 3}


def test_every_generation_corrupt_raises_naming_path(storage):
    store = CheckpointStore(storage, "p", "r")
    store.save_shard("s1", {"v": 1})
    store.save_shard("s1", {"v": 2})
    for g in (1, 2):
        atomic_write(storage, store._path("s1", g), b"DPCK\x01garbage")
    fresh = CheckpointStore(storage, "p", "r")
    with pytest.raises(CheckpointCorruptError) as info:
        fresh.load_shards()
    assert "s1" in str(info.value) and "0000000002.ckpt" in info.value.path
    with pytest.raises(CheckpointCorruptError):
        fresh.load_shard("s1")


def _make_run(storage, run_key, status, shards=2, done=1, extra_gens=0):
    store = CheckpointStore(storage, "p", run_key)
    for i in range(shards):
        for b in range(1 + extra_gens):
            store.save_shard(f"s{i}", {"batch": b, "done": i < done})
    if status is not None:
        store.save_manifest({"status": status})
    return store


def test_list_runs(storage):
    _make_run(storage, "old", "completed", shards=3, done=3)
    _make_run(storage, "mid", "running", shards=4, done=1)
    bare = _make_run(storage, "bare", None, shards=1, done=0)
    broken = _make_run(storage, "broken", "running", shards=1)
    atomic_write(storage, broken._path(None, 1), b"junk")

    runs = list_runs(storage, "p")
    by_key = {r.run_key: r for r in runs}
    assert set(by_key) == {"old", "mid", "bare", "broken"}
    assert (by_key["old"].status, by_key["old"].shards, by_key["old"].shards_done) == (
        "completed", 3, 3)
    assert (by_key["mid"].status, by_key["mid"].shards, by_key["mid"].shards_done) == (
        "running", 4, 1)
    assert by_key["bare"].status == "unknown"
    assert by_key["broken"].status == "corrupt"
    run_prefix = bare.prefix
    assert by_key["bare"].bytes == sum(len(b) for b in _files(storage, run_prefix).values())
    assert runs[0].run_key == "broken"  # most recently updated first
    assert by_key["mid"].updated > by_key["old"].updated
    assert list_runs(storage, "nothing-here") == []


def test_gc(storage, storage_url):
    _make_run(storage, "c1", "completed")
    _make_run(storage, "c10", "completed")  # "c1" is a key prefix of "c10": must not matter
    _make_run(storage, "c2", "completed")
    _make_run(storage, "c3", "completed")
    running = _make_run(storage, "c", "running")
    _make_run(storage, "failed", "failed")
    _make_run(storage, "nomanifest", None)
    # leftovers: older generations that saves could not delete (the storage refused deletes)
    url, options = storage_url
    no_delete = CheckpointStore(_FaultyStorage(url, options, fail_deletes=True), "p", "c")
    for b in (1, 2, 3):
        no_delete.save_shard("s0", {"batch": b, "done": True})
    assert _gens(storage, running._key_dir("s0")) == [1, 2, 3, 4]

    dry = gc(storage, "p", keep=2, dry_run=True)
    assert sorted(dry.runs_deleted) == ["c1", "c10"]
    assert dry.generations_deleted == 2
    assert _gens(storage, running._key_dir("s0")) == [1, 2, 3, 4]

    expect_freed = sum(
        len(b) for p, b in _files(storage).items()
        if p.startswith((storage.path("p", "c1") + "/", storage.path("p", "c10") + "/"))
        or p in (running._path("s0", 1), running._path("s0", 2))
    )
    report = gc(storage, "p", keep=2)
    assert sorted(report.runs_deleted) == ["c1", "c10"]
    assert report.generations_deleted == 2
    assert report.bytes_freed == dry.bytes_freed == expect_freed
    remaining = {r.run_key for r in list_runs(storage, "p")}
    assert remaining == {"c2", "c3", "c", "failed", "nomanifest"}
    assert _gens(storage, running._key_dir("s0")) == [3, 4]
    # the running run still loads, and its writer carries on
    assert CheckpointStore(storage, "p", "c").load_shard("s0") is not None
    assert running.save_shard("s1", {"batch": 9}) == 2

    report = gc(storage, "p", keep=0)
    assert sorted(report.runs_deleted) == ["c2", "c3"]
    assert {r.run_key for r in list_runs(storage, "p")} == {"c", "failed", "nomanifest"}
    with pytest.raises(ConfigError):
        gc(storage, "p", keep=-1)


def test_delete_run_leaves_runs_sharing_a_key_prefix(storage):
    a = _make_run(storage, "r1", "running")
    b = _make_run(storage, "r10", "running")
    a.delete_run()
    assert not a.exists() and b.exists()
    assert CheckpointStore(storage, "p", "r10").load_shards().keys() == {"s0", "s1"}


def test_concurrent_readers_never_see_a_partial_object(storage):
    """Writers replace a ~200 kB document over and over; readers must always get a whole one."""
    writer_store = CheckpointStore(storage, "p", "r")
    blob = random.Random(1).randbytes(100_000).hex()  # incompressible: every write is ~200 kB
    writer_store.save_shard("s1", {"n": 0, "blob": blob})
    writer_store.save_manifest({"n": 0, "blob": blob})
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def write():
        n = 0
        while not stop.is_set():
            n += 1
            writer_store.save_shard("s1", {"n": n, "blob": blob})
            writer_store.save_manifest({"n": n, "blob": blob})

    def read():
        last = -1
        while not stop.is_set():
            try:
                store = CheckpointStore(storage, "p", "r")
                for doc in (store.load_shard("s1"), store.load_manifest()):
                    assert doc is not None and doc["blob"] == blob
                shard_n = store.load_shards()["s1"]["n"]
                assert shard_n >= last  # never goes backwards
                last = shard_n
                seen.append(shard_n)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(seen) > 5 and len(set(seen)) > 1  # readers really overlapped with writes


# --------------------------------------------------------------------------- async writer


class _GatedStore(CheckpointStore):
    """A real store whose saves can be held at a gate, and which records save order/overlap."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.saved: list[tuple[str, int]] = []
        self.active: set[str] = set()
        self.overlaps = 0
        self._mu = threading.Lock()

    def save_shard(self, shard_id, doc):
        with self._mu:
            if shard_id in self.active:
                self.overlaps += 1
            self.active.add(shard_id)
        self.entered.set()
        self.gate.wait()
        time.sleep(random.random() * 0.003)
        try:
            return super().save_shard(shard_id, doc)
        finally:
            with self._mu:
                self.active.discard(shard_id)
                self.saved.append((shard_id, doc["seq"]))


def test_async_writer_coalesces_pending_docs(storage):
    store = _GatedStore(storage, "p", "r")
    store.gate.clear()
    with AsyncCheckpointWriter(store) as writer:
        writer.submit("s1", {"seq": 1})
        assert store.entered.wait(5)  # seq 1 is being saved, held at the gate
        writer.submit("s1", {"seq": 2})
        writer.submit("s1", {"seq": 3})
        doc = {"seq": 4}
        writer.submit("s1", doc)
        doc["seq"] = 99  # mutating after submit must not change what gets written
        writer.submit("s2", {"seq": 5})
        store.gate.set()
        writer.flush(timeout=30)
        assert store.saved == [("s1", 1), ("s1", 4), ("s2", 5)]
        assert (writer.saves, writer.coalesced) == (3, 2)
    assert CheckpointStore(storage, "p", "r").load_shards() == {"s1": {"seq": 4}, "s2": {"seq": 5}}


@pytest.mark.parametrize("threads", [1, 3])
def test_async_writer_orders_saves_per_shard(storage, threads):
    store = _GatedStore(storage, "p", "r")
    last: dict[str, int] = {}
    with AsyncCheckpointWriter(store, threads=threads) as writer:
        for seq in range(1, 121):
            shard = f"s{random.Random(seq).randrange(4)}"
            writer.submit(shard, {"seq": seq})
            last[shard] = seq
            time.sleep(0.0005)  # let submissions interleave with saves in flight
            if seq % 40 == 0:
                writer.flush(timeout=60)
                # durable at flush: a fresh reader sees exactly the newest submitted docs
                loaded = CheckpointStore(storage, "p", "r").load_shards()
                assert {s: d["seq"] for s, d in loaded.items()} == last
    assert store.overlaps == 0
    for shard in last:
        order = [seq for s, seq in store.saved if s == shard]
        assert order == sorted(order) and order[-1] == last[shard]


class _FaultyFS:
    """Delegates to a real filesystem; PUTs of paths containing ``bad`` fail like a dead S3."""

    def __init__(self, fs):
        self._fs = fs

    def pipe_file(self, path, *a, **kw):
        if "/bad/" in path:
            raise ConnectionError("Could not connect to the endpoint URL")
        if "file" in self._fs.protocol:
            self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
        return self._fs.pipe_file(path, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._fs, name)


class _FaultyStorage(Storage):
    def __init__(self, url, options=None, fail_deletes=False):
        super().__init__(url, options)
        self.fs = _FaultyFS(self.fs)
        self.is_local = False  # go through fs.pipe_file on every backend
        self.fail_deletes = fail_deletes

    def rm_many(self, paths):
        if self.fail_deletes:
            raise StorageUnavailableError("delete refused", path=paths[0])
        return super().rm_many(paths)


def test_async_writer_propagates_first_error(storage_url):
    url, options = storage_url
    store = CheckpointStore(_FaultyStorage(url, options), "p", "r")
    writer = AsyncCheckpointWriter(store)
    writer.submit("good", {"seq": 1})
    writer.submit("bad", {"seq": 2})
    writer.submit("good2", {"seq": 3})
    with pytest.raises(StorageUnavailableError) as info:
        writer.flush(timeout=30)
    assert "bad" in str(info.value)
    if options.get("secret"):
        assert options["secret"] not in str(info.value)
    with pytest.raises(StorageUnavailableError):
        writer.submit("good", {"seq": 4})  # the data path stops instead of running ahead
    with pytest.raises(StorageUnavailableError):
        writer.close()
    # everything else that was submitted still got written
    loaded = CheckpointStore(Storage(url, options), "p", "r").load_shards()
    assert loaded == {"good": {"seq": 1}, "good2": {"seq": 3}}


def test_store_saves_surface_storage_errors(storage_url):
    url, options = storage_url
    store = CheckpointStore(_FaultyStorage(url, options), "p", "r")
    with pytest.raises(StorageUnavailableError) as info:
        store.save_shard("bad", {"x": 1})
    assert info.value.transient
    # nothing was written, and the next good save starts at generation 1
    assert store.load_shard("bad") is None


def test_prune_every_batches_deletes_and_prune_leaves_latest_and_previous(storage):
    store = CheckpointStore(storage, "p", "r", prune_every=4)
    counts = []
    for i in range(1, 12):
        store.save_shard("s1", {"i": i})
        counts.append(len(_gens(storage, store._key_dir("s1"))))
    # superseded generations pile up to prune_every, then go in one delete; never unbounded
    assert max(counts) <= 5 and min(counts[4:]) < max(counts)
    store.prune("s1")
    assert _gens(storage, store._key_dir("s1")) == [10, 11]
    assert CheckpointStore(storage, "p", "r").load_shard("s1") == {"i": 11}
