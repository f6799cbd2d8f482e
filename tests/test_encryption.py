"""Encryption at rest: checkpoints and dead letters sealed with AES-GCM, tamper refused, DLQ redaction.

Unit tests drive :class:`CheckpointStore` directly on local disk (tampering is a file
operation). The end-to-end tests run a real pipeline (Dask worker processes read the key from
their environment) with rows a transform rejects, then look at the raw bytes of every
checkpoint and dead-letter object.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpipeline_prefect.checkpoint import CheckpointStore, gc, list_runs
from dpipeline_prefect.config import ShardingConfig, parse_config
from dpipeline_prefect.crypto import ENC_MAGIC, Cipher, aad, cipher_for, new_key, parse_key
from dpipeline_prefect.dead_letter import DeadLetterStore, read_queue
from dpipeline_prefect.errors import CheckpointCorruptError, ConfigError, EncryptionError
from dpipeline_prefect.pipeline import Pipeline
from dpipeline_prefect.sharding import Sharder
from dpipeline_prefect.shuffle import StageSeal, read_staged, run_map, staged_path
from dpipeline_prefect.sources import plan_source
from dpipeline_prefect.storage import Storage

from .pipeline_helpers import assert_exactly_once, flights, reference, run_cli, write_parquet_files, write_yaml
from .test_dead_letter import POISON_MODULE, set_poison

KEY = new_key()
OTHER_KEY = new_key()
SECRET_MARK = "SENSITIVE-"  # prefix of the values of the "ssn" column the test adds


def _store(root: Path, run: str = "r1", pipeline: str = "p", key: str | None = KEY) -> CheckpointStore:
    cipher = Cipher(parse_key(key, "test")) if key else None
    return CheckpointStore(Storage(str(root)), pipeline, run, cipher=cipher)


def _gen_path(root: Path, pipeline: str, run: str, shard: str, gen: int) -> Path:
    return root / pipeline / run / "shards" / shard / f"{gen:010d}.ckpt"


# -- the cipher and the config --------------------------------------------------------------------


def test_key_formats_and_errors_never_show_the_key(monkeypatch):
    raw = bytes(range(32))
    assert parse_key(raw.hex(), "x") == raw
    assert parse_key(base64.b64encode(raw).decode(), "x") == raw
    assert parse_key(base64.urlsafe_b64encode(raw).decode().rstrip("="), "x") == raw
    bad = "c2hvcnQta2V5LXNob3J0LWtleQ=="  # 18 bytes
    with pytest.raises(ConfigError) as ei:
        parse_key(bad, "environment variable K")
    assert "environment variable K" in str(ei.value) and bad not in str(ei.value)

    cfg = parse_config({"name": "p", "source": {"path": "x"}, "sink": {"path": "y"},
                        "encryption": {"key_env": "DPL_TEST_KEY"}})
    monkeypatch.delenv("DPL_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="DPL_TEST_KEY is not set"):
        cipher_for(cfg.encryption)
    monkeypatch.setenv("DPL_TEST_KEY", KEY)
    c = cipher_for(cfg.encryption)
    assert KEY not in repr(c) and c.key_id == Cipher(parse_key(KEY, "k")).key_id
    for enc in ({}, {"key_env": "A", "key_secret_block": "b"}):
        with pytest.raises(ConfigError, match="exactly one of encryption.key_env"):
            parse_config({"name": "p", "source": {"path": "x"}, "sink": {"path": "y"}, "encryption": enc})


def test_ciphertext_is_bound_to_its_associated_data():
    c = Cipher(parse_key(KEY, "k"))
    blob = c.encrypt(b"payload", aad(run_key="a"))
    assert blob.startswith(ENC_MAGIC) and b"payload" not in blob
    assert c.decrypt(blob, aad(run_key="a"), "p") == b"payload"
    with pytest.raises(EncryptionError, match="authentication failed"):
        c.decrypt(blob, aad(run_key="b"), "p")
    with pytest.raises(EncryptionError, match="wrong key"):
        Cipher(parse_key(OTHER_KEY, "k")).decrypt(blob, aad(run_key="a"), "p")


# -- checkpoints --------------------------------------------------------------------------------


def test_encrypted_checkpoints_round_trip_and_hold_no_plaintext(tmp_path):
    st = _store(tmp_path)
    st.save_manifest({"status": "running", "note": "manifest-plaintext-marker"})
    st.save_shard("s1", {"next_seq": 3, "note": "shard-plaintext-marker"})
    assert _store(tmp_path).load_manifest()["note"] == "manifest-plaintext-marker"
    assert _store(tmp_path).load_shards() == {"s1": {"next_seq": 3, "note": "shard-plaintext-marker"}}
    files = [p for p in tmp_path.rglob("*.ckpt")]
    assert len(files) == 2
    for f in files:
        raw = f.read_bytes()
        assert raw.startswith(ENC_MAGIC)
        # the document is compressed before sealing; these are the words a plaintext object holds
        for word in (b"marker", b"running", b"next_seq", b"pipeline", b"r1"):
            assert word not in raw, (f, word)
    # CLI helpers take the cipher too
    runs = list_runs(Storage(str(tmp_path)), "p", cipher=Cipher(parse_key(KEY, "k")))
    assert [(r.run_key, r.status, r.shards) for r in runs] == [("r1", "running", 1)]
    assert gc(Storage(str(tmp_path)), "p", keep=0, cipher=Cipher(parse_key(KEY, "k"))).runs_kept == ["r1"]


def test_a_flipped_bit_falls_back_to_the_previous_generation_then_refuses(tmp_path, caplog):
    st = _store(tmp_path)
    st.save_shard("s1", {"next_seq": 1})
    st.save_shard("s1", {"next_seq": 2})
    latest = _gen_path(tmp_path, "p", "r1", "s1", 2)
    raw = bytearray(latest.read_bytes())
    raw[-20] ^= 0x01  # one bit, inside the ciphertext
    latest.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="dpipeline_prefect.checkpoint"):
        assert _store(tmp_path).load_shard("s1") == {"next_seq": 1}
    assert "authentication failed" in caplog.text and "0000000002.ckpt" in caplog.text
    previous = _gen_path(tmp_path, "p", "r1", "s1", 1)
    raw = bytearray(previous.read_bytes())
    raw[len(raw) // 2] ^= 0x80
    previous.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError, match="every checkpoint generation of shard 's1'"):
        _store(tmp_path).load_shard("s1")


@pytest.mark.parametrize("origin", ["other_run", "other_pipeline", "other_shard", "other_generation"])
def test_a_checkpoint_swapped_in_from_elsewhere_is_refused(tmp_path, origin):
    """Same key everywhere: only the associated data tells the objects apart."""
    victim = _store(tmp_path, run="r1", pipeline="p")
    victim.save_shard("s1", {"next_seq": 5})
    target = _gen_path(tmp_path, "p", "r1", "s1", 1)
    if origin == "other_run":
        _store(tmp_path, run="r2").save_shard("s1", {"next_seq": 99})
        src = _gen_path(tmp_path, "p", "r2", "s1", 1)
    elif origin == "other_pipeline":
        _store(tmp_path, pipeline="q").save_shard("s1", {"next_seq": 99})
        src = _gen_path(tmp_path, "q", "r1", "s1", 1)
    elif origin == "other_shard":
        victim.save_shard("s2", {"next_seq": 99})
        src = _gen_path(tmp_path, "p", "r1", "s2", 1)
    else:  # an old generation renamed as the newest (a rollback)
        victim.save_shard("s1", {"next_seq": 6})
        victim.save_shard("s1", {"next_seq": 7})
        target = _gen_path(tmp_path, "p", "r1", "s1", 3)
        src = _gen_path(tmp_path, "p", "r1", "s1", 2)
    shutil.copyfile(src, target)
    if origin == "other_generation":
        # gen 3 now holds gen 2's bytes: refused, the load falls back to gen 2 itself (honest)
        assert _store(tmp_path).load_shard("s1") == {"next_seq": 6}
    else:
        with pytest.raises(CheckpointCorruptError, match="authentication failed"):
            _store(tmp_path).load_shard("s1")


def test_encryption_must_match_the_configuration(tmp_path):
    _store(tmp_path, key=None).save_shard("s1", {"next_seq": 1})  # plaintext
    with pytest.raises(CheckpointCorruptError, match="is not encrypted although"):
        _store(tmp_path).load_shard("s1")
    _store(tmp_path, run="r2").save_shard("s1", {"next_seq": 1})  # encrypted
    with pytest.raises(EncryptionError, match="has no encryption section"):
        _store(tmp_path, run="r2", key=None).load_shard("s1")
    with pytest.raises(CheckpointCorruptError, match="wrong key"):
        _store(tmp_path, run="r2", key=OTHER_KEY).load_shard("s1")


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory):
    """20k flights rows in 2 files with a sensitive string column ``ssn``."""
    df = flights(20_000)
    df["ssn"] = [f"{SECRET_MARK}{i:08d}" for i in df["row_id"]]
    folder = tmp_path_factory.mktemp("enc") / "in"
    write_parquet_files(df, folder, files=2, row_group_size=2500)
    return folder, df


def _pipeline(tmp_path: Path, src: Path, poison: list[int], runner: str, **over) -> tuple[dict, Path]:
    mod = "poison_" + uuid.uuid4().hex[:8]
    (tmp_path / f"{mod}.py").write_text(POISON_MODULE)
    set_poison(tmp_path, poison)
    cfg = {
        "name": "enc-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": 2500},
        "transforms": [f"{mod}:poison_clean"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": runner, "workers": 2},
        "dead_letter": {"max_fraction": 0.05},
        **over,
    }
    return cfg, write_yaml(tmp_path / "p.yaml", cfg)


@pytest.mark.prefect
@pytest.mark.slow
def test_encrypted_run_on_dask_workers_keeps_no_plaintext_rows(tmp_path, sensitive, monkeypatch):
    src, df = sensitive
    poison = df["row_id"].iloc[::200].tolist()  # 100 rows, in both files
    cfg, p = _pipeline(tmp_path, src, poison, "dask", encryption={"key_env": "DPL_ENC_KEY"})
    monkeypatch.setenv("DPL_ENC_KEY", KEY)
    summary = Pipeline.from_yaml(p).run(run_key="r1")
    assert summary["status"] == "completed" and summary["rows_dead_letter"] == len(poison)
    assert_exactly_once(str(tmp_path / "out" / "r1"), reference(df[~df["row_id"].isin(poison)]))

    cipher = Cipher(parse_key(KEY, "k"))
    objects = [f for f in (tmp_path / "ckpt").rglob("*") if f.is_file()]
    dlq_files = [f for f in objects if f.suffix == ".parquet"]
    ckpts = [f for f in objects if f.suffix == ".ckpt"]
    assert len(dlq_files) >= 2 and len(ckpts) >= 3
    secrets = [f"{SECRET_MARK}{i:08d}".encode() for i in poison]
    for f in objects:
        raw = f.read_bytes()
        # no object beside the sink holds a sensitive value (run metrics and breaker state are
        # plaintext JSON of figures; checkpoints and dead letters are sealed)
        assert SECRET_MARK.encode() not in raw, f
        if f in dlq_files or f in ckpts:
            assert raw.startswith(ENC_MAGIC) and b"PAR1" not in raw[:4], f
    # the rows are there, sealed: decrypting with the key (bound to the file name) finds them
    found = set()
    pipeline_aad = {"what": "dead_letter", "pipeline": cfg["name"], "run_key": "r1"}
    for f in dlq_files:
        t = pq.read_table(io.BytesIO(cipher.decrypt(f.read_bytes(), aad(**pipeline_aad, file=f.name), str(f))))
        found |= {s.encode() for s in t.column("ssn").to_pylist()}
    assert found == set(secrets)

    # the CLI reads the encrypted queue with the key, and refuses clearly without it
    r = run_cli("dlq", "ls", str(p), "--run-key", "r1", env={"DPL_ENC_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert f"{len(poison)} row(s)" in r.stdout
    r = run_cli("checkpoints", "ls", str(p), env={"DPL_ENC_KEY": OTHER_KEY})
    # the listing shows the run as corrupt (as for any unreadable manifest) and says why
    assert "corrupt" in r.stdout and "wrong key" in r.stderr, (r.stdout, r.stderr)
    assert KEY not in r.stdout + r.stderr and OTHER_KEY not in r.stdout + r.stderr
    # replay, fixed transform: the queued rows reach the sink
    set_poison(tmp_path, [])
    r = run_cli("dlq", "replay", str(p), "--run-key", "r1", env={"DPL_ENC_KEY": KEY})
    assert r.returncode == 0, r.stderr
    assert_exactly_once(str(tmp_path / "out" / "r1"), reference(df))
    # resuming the completed run with the key works; with another key it is refused, naming it
    assert Pipeline.from_yaml(p).run(run_key="r1")["shards_skipped"] == 2
    monkeypatch.setenv("DPL_ENC_KEY", OTHER_KEY)
    with pytest.raises(CheckpointCorruptError, match="wrong key"):
        Pipeline.from_yaml(p).run(run_key="r1")


@pytest.mark.prefect
def test_dead_letters_keep_only_chosen_columns_or_their_hash(tmp_path, sensitive):
    src, df = sensitive
    poison = df["row_id"].iloc[::400].tolist()
    cfg, p = _pipeline(tmp_path, src, poison, "threads",
                       dead_letter={"max_fraction": 0.05, "keep_columns": ["row_id", "carrier"],
                                    "hash_columns": ["ssn"]})
    summary = Pipeline.from_yaml(p).run(run_key="r1")
    assert summary["rows_dead_letter"] == len(poison)
    q = read_queue(parse_config(cfg), "r1").sort_values("row_id").reset_index(drop=True)
    data_cols = [c for c in q.columns if not c.startswith("_dlq_")]
    assert sorted(data_cols) == ["carrier", "row_id", "ssn"]
    want = df.set_index("row_id").loc[q["row_id"]]
    assert list(q["ssn"]) == [hashlib.sha256(s.encode()).hexdigest() for s in want["ssn"]]
    assert list(q["carrier"]) == list(want["carrier"])
    # nothing of the dropped or hashed values is stored: not in the decoded files, not in the bytes
    store = DeadLetterStore(parse_config(cfg), "r1")
    for path, *_ in store.files():
        t = store.read(path)
        assert "tailnum" not in t.column_names
        assert SECRET_MARK not in json.dumps(t.to_pylist(), default=str)
        assert SECRET_MARK.encode() not in store.storage.read_bytes(path)
    # a redacted queue cannot be replayed: one clear error, nothing written to the sink
    before = sorted((tmp_path / "out" / "r1").rglob("*.parquet"))
    set_poison(tmp_path, [])
    r = run_cli("dlq", "replay", str(p), "--run-key", "r1")
    assert r.returncode != 0
    assert "keep_columns / hash_columns" in r.stderr and "cannot be replayed" in r.stderr
    assert sorted((tmp_path / "out" / "r1").rglob("*.parquet")) == before

    bad = {**cfg, "dead_letter": {"hash_columns": ["no_such_col"]}, "name": cfg["name"] + "b",
           "sink": {"path": str(tmp_path / "out2")}}
    set_poison(tmp_path, poison)
    with pytest.raises(ConfigError, match="'no_such_col' is not a source column"):
        Pipeline(parse_config(bad)).run(run_key="r1")


def test_dlq_with_plain_pandas_default_is_unchanged(tmp_path):
    """No encryption section, no redaction: a dead-letter file is plain Parquet (as before)."""
    cfg = parse_config({"name": "p", "source": {"path": "x"}, "sink": {"path": str(tmp_path / "o")},
                        "checkpoint": {"path": str(tmp_path / "c")}, "dead_letter": {}})
    store = DeadLetterStore(cfg, "r")
    import pyarrow as pa

    path = store.write("f00001", 0, pa.table({"a": [1]}))
    assert store.storage.read_bytes(path)[:4] == b"PAR1"
    assert store.read(path).to_pydict() == {"a": [1]}


@pytest.mark.prefect
def test_key_from_a_prefect_secret_block(prefect_server):
    from prefect.blocks.system import Secret

    from dpipeline_prefect.config import EncryptionConfig

    name = "dpl-key-" + uuid.uuid4().hex[:8]
    Secret(value=KEY).save(name, overwrite=True)
    c = cipher_for(EncryptionConfig(key_secret_block=name))
    assert c.key_id == Cipher(parse_key(KEY, "k")).key_id and KEY not in repr(c)
    with pytest.raises(ConfigError, match="no Secret block named 'dpl-missing-"):
        cipher_for(EncryptionConfig(key_secret_block="dpl-missing-" + uuid.uuid4().hex[:8]))


def test_stream_state_and_late_rows_are_encrypted_too(tmp_path, monkeypatch):
    """The stream state holds rows of open windows; its checkpoint and late-row files are sealed."""
    from dpipeline_prefect.stream import run_increment

    from .test_stream import make_slices, stream_cfg, write_slice

    monkeypatch.setenv("DPL_STREAM_KEY", KEY)
    slices = make_slices(n_rows=6000, n_slices=6, late_share=0.1)
    cfg = parse_config({**stream_cfg(tmp_path), "encryption": {"key_env": "DPL_STREAM_KEY"}})
    sums = []
    for i, s in enumerate(slices):
        write_slice(tmp_path / "in", i, s)
        sums.append(run_increment(cfg))  # each increment reads the previous, encrypted, state
    assert sum(s["rows_in"] for s in sums) == sum(len(s) for s in slices)
    assert sum(s["rows_late"] for s in sums) > 0
    stored = [f for f in (tmp_path / "ckpt").rglob("*") if f.is_file() and f.suffix in (".ckpt", ".parquet")]
    assert any(f.suffix == ".ckpt" for f in stored) and any(f.name.startswith("part-late-") for f in stored)
    for f in stored:
        assert f.read_bytes().startswith(ENC_MAGIC), f
    monkeypatch.setenv("DPL_STREAM_KEY", OTHER_KEY)
    write_slice(tmp_path / "in", len(slices), slices[-1].iloc[:10])
    with pytest.raises(CheckpointCorruptError, match="wrong key"):
        run_increment(cfg)


# -- staged rows of keyed sharding -----------------------------------------------------------------


def _seal(run: str = "r1", pipeline: str = "p", key: str = KEY) -> StageSeal:
    return StageSeal(Cipher(parse_key(key, "test")), pipeline, run)


def _staged(work: Path, sensitive, seal: StageSeal | None) -> tuple[dict, Storage, pa.Schema]:
    """Run the map step of a 3-shard hash sharding over the first sensitive input file."""
    src, _ = sensitive
    plan = plan_source(parse_config({"name": "p", "source": {"path": str(src)},
                                     "sink": {"path": str(work / "o")}}).source)
    storage = Storage(str(work))
    res = run_map(0, plan.files[0], Storage(str(src)), "parquet", plan.schema,
                  Sharder(ShardingConfig(strategy="hash", key="carrier", shards=3)), storage, seal=seal)
    return res.outputs, storage, plan.schema


def _read(storage: Storage, path: str, seal: StageSeal | None, skip: int = 0) -> pa.Table:
    return pa.Table.from_batches(list(read_staged(storage, path, skip, seal)))


def test_staged_files_are_sealed_and_bound_to_their_shard(tmp_path, sensitive):
    outputs, work, _ = _staged(tmp_path / "enc", sensitive, _seal())
    plain_out, plain, _ = _staged(tmp_path / "plain", sensitive, None)
    assert outputs == plain_out and len(outputs) == 3
    sids = sorted(outputs)
    for sid in sids:
        path = staged_path(work, sid, 0)
        raw = Path(path).read_bytes()
        assert raw.startswith(ENC_MAGIC) and SECRET_MARK.encode() not in raw
        # same rows as the plaintext staged file; skipping works on the decrypted stream
        want = _read(plain, staged_path(plain, sid, 0), None)
        assert Path(staged_path(plain, sid, 0)).read_bytes()[:4] == b"\xff\xff\xff\xff"  # IPC, as before
        assert _read(work, path, _seal()).equals(want)
        assert _read(work, path, _seal(), skip=7).equals(want.slice(7))
    assert not [f for f in (tmp_path / "enc").rglob("*.tmp")]

    a, b = (Path(staged_path(work, s, 0)) for s in sids[:2])
    # a staged file swapped in from another shard (same key, pipeline and run): refused
    shutil.copyfile(b, a)
    with pytest.raises(EncryptionError, match="authentication failed") as e:
        _read(work, str(a), _seal())
    assert str(a) in str(e.value) and KEY not in str(e.value)
    # another run key, another pipeline, another key: refused
    with pytest.raises(EncryptionError, match="authentication failed"):
        _read(work, str(b), _seal(run="r2"))
    with pytest.raises(EncryptionError, match="authentication failed"):
        _read(work, str(b), _seal(pipeline="q"))
    with pytest.raises(EncryptionError, match="wrong key"):
        _read(work, str(b), _seal(key=OTHER_KEY))
    # a flipped bit or a truncated file: refused before any row is yielded
    raw = bytearray(b.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    b.write_bytes(bytes(raw))
    with pytest.raises(EncryptionError, match="authentication failed"):
        next(read_staged(work, str(b), 0, _seal()))
    b.write_bytes(bytes(raw[:-100]))
    with pytest.raises(EncryptionError, match="authentication failed"):
        next(read_staged(work, str(b), 0, _seal()))
    # the configuration must match the stored files, both ways
    c = staged_path(work, sids[2], 0)
    with pytest.raises(EncryptionError, match="is encrypted but this pipeline has no encryption"):
        next(read_staged(work, c, 0, None))
    with pytest.raises(EncryptionError, match="is not encrypted although"):
        next(read_staged(plain, staged_path(plain, sids[0], 0), 0, _seal()))


@pytest.mark.prefect
@pytest.mark.slow
def test_keyed_run_killed_in_the_shuffle_keeps_no_plaintext_rows_then_resumes(tmp_path, sensitive):
    src, df = sensitive
    cfg, p = _pipeline(tmp_path, src, [], "threads", encryption={"key_env": "DPL_ENC_KEY"},
                       sharding={"strategy": "hash", "key": "carrier", "shards": 4})
    env = {"DPL_ENC_KEY": KEY}
    r = run_cli("run", str(p), "--run-key", "k", env={**env, "DPIPELINE_CRASHPOINT": "shuffle"})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
    objects = [f for f in (tmp_path / "ckpt").rglob("*") if f.is_file()]
    staged = [f for f in objects if f.suffix == ".arrow"]
    assert staged, objects  # the kill left staged files behind (half of a map task's shards)
    for f in objects:
        raw = f.read_bytes()
        assert SECRET_MARK.encode() not in raw, f
        if f in staged:
            assert raw.startswith(ENC_MAGIC), f
    assert not (tmp_path / "out" / "k").exists() or not list((tmp_path / "out" / "k").rglob("*.parquet"))
    # resume, killed again before the first batch write: every split is staged and recorded now
    r = run_cli("run", str(p), "--run-key", "k", env={**env, "DPIPELINE_CRASHPOINT": "before_write"})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)
    shuffle = next((tmp_path / "ckpt").rglob("shuffle"))
    a, b = sorted(shuffle.glob("*/split-00000.arrow"))[:2]
    original = a.read_bytes()
    # one shard's staged file swapped in from another shard: the resume refuses it, naming it
    shutil.copyfile(b, a)
    r = run_cli("run", str(p), "--run-key", "k", env=env)
    assert r.returncode != 0
    assert "authentication failed" in r.stderr and f"{a.parent.name}/{a.name}" in r.stderr, r.stderr
    a.write_bytes(original)
    r = run_cli("run", str(p), "--run-key", "k", env=env)
    assert r.returncode == 0, r.stderr
    assert KEY not in r.stdout + r.stderr
    assert_exactly_once(str(tmp_path / "out" / "k"), reference(df))


@pytest.mark.s3
def test_staged_files_on_s3_are_sealed(s3, tmp_path, sensitive):
    src, _ = sensitive
    plan = plan_source(parse_config({"name": "p", "source": {"path": str(src)},
                                     "sink": {"path": str(tmp_path / "o")}}).source)
    work = Storage(f"s3://ckpt/{uuid.uuid4().hex}/work", s3.storage_options())
    res = run_map(1, plan.files[1], Storage(str(src)), "parquet", plan.schema,
                  Sharder(ShardingConfig(strategy="hash", key="carrier", shards=2)), work, seal=_seal())
    a, b = (staged_path(work, sid, 1) for sid in sorted(res.outputs))
    for path, sid in ((a, sorted(res.outputs)[0]), (b, sorted(res.outputs)[1])):
        raw = work.read_bytes(path)
        assert raw.startswith(ENC_MAGIC) and SECRET_MARK.encode() not in raw
        assert res.sizes[sid] == len(raw)
        assert _read(work, path, _seal()).num_rows == res.outputs[sid]
    work.write_bytes(a, work.read_bytes(b))
    with pytest.raises(EncryptionError, match="authentication failed"):
        _read(work, a, _seal())
