"""Input that tries to escape: run keys, shard ids and partition values never leave their folder.

Run keys and shard ids are rejected with one clear error when they hold ``..``, ``/``, NUL,
a newline or too many characters; partition values are percent-encoded (and too long ones
refused), and every file written is checked to sit under the sink folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from dpipeline_prefect.checkpoint import CheckpointStore
from dpipeline_prefect.config import SinkConfig, parse_config, validate_run_key
from dpipeline_prefect.dead_letter import DeadLetterStore, dead_letter_url
from dpipeline_prefect.errors import ConfigError, TerminalError
from dpipeline_prefect.sinks import Sink
from dpipeline_prefect.storage import Storage

from .pipeline_helpers import flights, run_cli, write_parquet_files, write_yaml

BAD_KEYS = ["../escape", "..", "a/../../escape", "a/b", "/abs", "a\x00b", "a\nb", ".hidden",
            "x" * 129, "a\\..\\b", "", " lead"]
BAD_SHARDS = ["../escape", "..", "a/b", "a\x00b", "", "x" * 65, "f0001-000001", "a.b"]


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_run_keys_are_refused_everywhere_they_become_paths(tmp_path, key):
    cfg = parse_config({"name": "p", "source": {"path": "x"},
                        "sink": {"path": str(tmp_path / "out" / "{run_key}")},
                        "checkpoint": {"path": str(tmp_path / "ckpt")},
                        "dead_letter": {}})
    with pytest.raises(ConfigError, match="run key .* is not allowed"):
        validate_run_key(key)
    with pytest.raises(ConfigError, match="run key .* is not allowed"):
        Sink(cfg.sink, key)
    with pytest.raises(ConfigError, match="run key .* is not allowed"):
        dead_letter_url(cfg, key)
    if len(key) <= 200 and key.isalnum():
        pass  # the checkpoint store's own limit is 200 characters (run keys stop at 128 before it)
    else:
        with pytest.raises(ConfigError, match="run_key"):
            CheckpointStore(Storage(str(tmp_path / "ckpt")), "p", key).save_manifest({"x": 1})
    with pytest.raises(ConfigError, match="run_key"):
        CheckpointStore(Storage(str(tmp_path / "ckpt")), "p", "y" * 201)
    assert _all_files(tmp_path) == set()


def test_good_run_keys_still_work(tmp_path):
    for key in ("2026-11-29", "r1", "a.b", "date=2026-11-29", "x" * 128, "a:b+c"):
        assert validate_run_key(key) == key
        assert Sink(SinkConfig(path=str(tmp_path / "{run_key}")), key).storage.root.endswith(key)


@pytest.mark.parametrize("shard", BAD_SHARDS)
def test_bad_shard_ids_are_refused_before_anything_is_written(tmp_path, shard):
    cfg = parse_config({"name": "p", "source": {"path": "x"}, "sink": {"path": str(tmp_path / "out")},
                        "checkpoint": {"path": str(tmp_path / "ckpt")}, "dead_letter": {}})
    df = pd.DataFrame({"a": [1, 2]})
    with pytest.raises(ConfigError, match="shard id"):
        Sink(cfg.sink, "r").write_batch(shard, 0, df)
    with pytest.raises(ConfigError, match="shard id"):
        DeadLetterStore.file_name(shard, 0)
    if shard in ("", "..") or "/" in shard or "\x00" in shard or shard.startswith("."):
        # the checkpoint store allows '.', '-' inside and 200 characters, never these
        with pytest.raises(ConfigError, match="shard_id"):
            CheckpointStore(Storage(str(tmp_path / "ckpt")), "p", "r").save_shard(shard, {"n": 1})
    assert _all_files(tmp_path) == set()


NASTY = ["../../escape", "..", ".", "a/b", "/abs", "x\x00y", "%2F..%2F", "a\\..\\b", "", "Zürich é",
         "col=x/y=z", "~"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_partition_values_are_encoded_and_stay_inside_the_sink(tmp_path, where):
    root = str(tmp_path / "out") if where == "local" else f"memory://pe-{os.getpid()}/out"
    sink = Sink(SinkConfig(path=root, partition_by=["tag"]), "r")
    df = pd.DataFrame({"row_id": range(len(NASTY) * 3), "tag": NASTY * 3})
    res = sink.write_batch("f00001", 0, df)
    assert res.files == len(NASTY) and res.rows == len(df)
    files = sink.storage.find(sink.storage.root)
    assert len(files) == len(NASTY)
    for f in files:
        rel = f[len(sink.storage.root) + 1:]
        segs = rel.split("/")
        # exactly "tag=<encoded>/part-...": one folder level, nothing that climbs or is absolute
        assert len(segs) == 2 and segs[0].startswith("tag=") and segs[1] == "part-f00001-000000.parquet", f
        assert ".." not in segs and "\x00" not in rel
    if where == "local":
        assert _all_files(tmp_path) == {Path(f) for f in files}
    # hive partitioning decodes the folder names back to exactly the values written
    fs = sink.storage.fs
    t = ds.dataset(sink.storage.root, filesystem=fs, format="parquet", partitioning="hive").to_table()
    got = t.to_pandas().sort_values("row_id")
    assert [str(v) for v in got["tag"]] == [str(v) for v in df["tag"]]


def test_a_partition_value_too_long_for_a_path_segment_is_refused(tmp_path):
    sink = Sink(SinkConfig(path=str(tmp_path / "out"), partition_by=["tag"]), "r")
    df = pd.DataFrame({"row_id": [1, 2], "tag": ["ok", "../" * 100]})
    with pytest.raises(TerminalError, match="column 'tag' has a value whose folder name would be 504 bytes"):
        sink.write_batch("f00001", 0, df)
    assert _all_files(tmp_path) == set()


@pytest.mark.prefect
def test_cli_refuses_an_escaping_run_key_and_writes_nothing(tmp_path):
    src = tmp_path / "in"
    write_parquet_files(flights(200), src, files=1)
    p = write_yaml(tmp_path / "p.yaml", {
        "name": "escape",
        "source": {"path": str(src)},
        "sink": {"path": str(tmp_path / "w" / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "w" / "ckpt")},
        "dead_letter": {},
        "runner": {"kind": "threads"},
    })
    for args in (["run", str(p), "--run-key", "../../../escaped"],
                 ["dlq", "ls", str(p), "--run-key", "../../escaped"],
                 ["dlq", "replay", str(p), "--run-key", "../../escaped"]):
        r = run_cli(*args, timeout=120)
        assert r.returncode != 0, (args, r.stdout)
        assert "run key '../" in r.stderr and "is not allowed" in r.stderr, r.stderr
    assert not list(tmp_path.rglob("*escaped*"))
    assert not (tmp_path / "w").exists() or _all_files(tmp_path / "w") == set()
