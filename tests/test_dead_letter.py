"""Dead-letter queue: poison rows in real flights data are isolated, kept, limited and replayed.

The poison transform lives in a module written next to the pipeline file (importable in Dask
workers the way a user's transforms are). It raises for the row ids listed in
``poison_ids.json`` beside it, read on every call, so rewriting that file "fixes" the transform
for a replay without changing the pipeline definition.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dpipeline_prefect.checkpoint import CheckpointStore
from dpipeline_prefect.dead_letter import (
    META_COLUMNS,
    DeadLetterLimitError,
    DeadLetterStore,
    bisect,
    dead_letter_url,
    is_row_error,
    read_queue,
)
from dpipeline_prefect.config import parse_config
from dpipeline_prefect.errors import ConfigError, StorageUnavailableError, TerminalError, TransformError
from dpipeline_prefect.pipeline import Pipeline
from dpipeline_prefect.storage import Storage
from dpipeline_prefect.transforms import apply_transforms

from .pipeline_helpers import (
    assert_exactly_once,
    flights,
    load_summary,
    reference,
    run_cli,
    write_parquet_files,
    write_yaml,
)

POISON_MODULE = '''
import json
from pathlib import Path

from dpipeline_prefect.examples.flights import clean

_FILE = Path(__file__).with_name("poison_ids.json")


def _bad():
    try:
        return set(json.loads(_FILE.read_text()))
    except FileNotFoundError:
        return set()


def poison_clean(df):
    """clean(), but raises for the poisoned row ids (a transform bug on some records)."""
    bad = _bad()
    if bad:
        hit = df["row_id"].isin(bad)
        if hit.any():
            raise ValueError(f"poison row_id {int(df.loc[hit, 'row_id'].iloc[0])}")
    return clean(df)


def sink_poison_clean(df):
    """clean() plus a column the sink cannot encode for the poisoned row ids."""
    out = clean(df)
    bad = _bad()
    return out.assign(extra=[object() if r in bad else 1 for r in out["row_id"]])


def batch_coupled(df):
    """Fails when two marked rows are in one call: not row-independent."""
    bad = _bad()
    if df["row_id"].isin(bad).sum() >= 2:
        raise ValueError("two marked rows together")
    return clean(df)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40k real flights rows in 4 Parquet files (one shard each with the files strategy)."""
    df = flights(40_000)
    folder = tmp_path_factory.mktemp("dlq") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=3000)
    return folder, df


def _setup(tmp_path: Path, src: Path, poison: list[int], transform: str = "poison_clean",
           runner: str = "threads", dead_letter: dict | None = None, **over) -> tuple[dict, Path, str]:
    mod = "poison_" + uuid.uuid4().hex[:8]  # unique: the threads runner imports it in this process
    (tmp_path / f"{mod}.py").write_text(POISON_MODULE)
    set_poison(tmp_path, poison)
    cfg = {
        "name": "dlq-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "sharding": {"strategy": "files"},
        "batching": {"rows": 4000},
        "transforms": [f"{mod}:{transform}"],
        "sink": {"format": "parquet", "path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": runner, "workers": 2},
    }
    if dead_letter is not None:
        cfg["dead_letter"] = dead_letter
    cfg.update(over)
    p = write_yaml(tmp_path / "p.yaml", cfg)
    return cfg, p, mod


def set_poison(folder: Path, ids) -> None:
    (folder / "poison_ids.json").write_text(json.dumps(sorted(int(i) for i in ids)))


def _poison_ids(df: pd.DataFrame, fraction: float, seed: int, survivors_only: bool = False) -> list[int]:
    ids = df["row_id"]
    if survivors_only:  # rows that clean() keeps (so the sink sees them)
        ids = reference(df)["row_id"]
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids.to_numpy(), size=int(len(df) * fraction), replace=False).tolist())


def _queue(cfg: dict, run_key: str) -> pd.DataFrame:
    return read_queue(parse_config(cfg), run_key)


# -- unit: bisection and classification (no services) ------------------------------------------


def _row_fn(bad: set[int]):
    def fn(df):
        hit = df["x"].isin(bad)
        if hit.any():
            raise ValueError("bad")
        return df.assign(y=df["x"] * 2)

    return [("t:fn", fn)]


@pytest.mark.parametrize("n,bad", [(1000, {0}), (1000, {999}), (1000, {3, 500, 501, 998}), (1, {0}),
                                   (4096, set(range(0, 4096, 100)))])
def test_bisect_finds_exactly_the_bad_rows_in_order_with_log_cost(n, bad):
    df = pd.DataFrame({"x": np.arange(n)})
    calls = []
    transforms = _row_fn(bad)

    def probe(part):
        calls.append(len(part))
        return apply_transforms(part, transforms)

    res = bisect(df, probe)
    assert sorted(p for p, _ in res.dead) == sorted(bad)
    assert all(isinstance(e, TransformError) and isinstance(e.__cause__, ValueError) for _, e in res.dead)
    want = df[~df["x"].isin(bad)].assign(y=lambda d: d["x"] * 2)
    if len(want):
        pd.testing.assert_frame_equal(pd.concat(res.outputs), want)  # same rows, order, index
    else:
        assert not res.outputs
    k = len(bad)
    assert res.calls == len(calls)
    assert res.calls <= 1 + 2 * k * max(1, int(np.ceil(np.log2(n)))), res.calls


def test_bisect_stops_at_the_budget():
    df = pd.DataFrame({"x": np.arange(1000)})
    from dpipeline_prefect import dead_letter

    with pytest.raises(dead_letter._OverBudget):
        bisect(df, lambda p: apply_transforms(p, _row_fn(set(range(1000)))), budget=10)


def test_is_row_error_classification():
    def wrapped(cause):
        try:
            try:
                raise cause
            except Exception as c:
                raise TransformError("transform 't' failed", transform="t") from c
        except TransformError as e:
            return e

    assert is_row_error(wrapped(ValueError("x")))
    assert is_row_error(wrapped(KeyError("x")))
    assert is_row_error(TerminalError("transformed output cannot be written: x"))
    assert not is_row_error(wrapped(ConnectionError("x")))
    assert not is_row_error(wrapped(MemoryError()))
    assert not is_row_error(wrapped(StorageUnavailableError("s3 down")))
    assert not is_row_error(TransformError("transform 't' returned list, expected a pandas DataFrame"))
    assert not is_row_error(ConfigError("sink.partition_by column 'x' is not in the output"))
    assert not is_row_error(StorageUnavailableError("down"))
    assert not is_row_error(ValueError("raw"))


def test_dead_letter_url_defaults_beside_the_checkpoints():
    base = {"name": "p1", "source": {"path": "x"}, "sink": {"path": "y"},
            "checkpoint": {"path": "s3://ckpt/a/", "storage_options": {"key": "${K}"}}}
    url, opts = dead_letter_url(parse_config({**base, "dead_letter": {}}), "r1")
    assert url == "s3://ckpt/a/p1.dead_letter/r1" and opts == {"key": "${K}"}
    url, opts = dead_letter_url(parse_config({**base, "dead_letter": {"path": "/dl/{run_key}/x"}}), "r1")
    assert url == "/dl/r1/x" and opts == {}
    url, _ = dead_letter_url(parse_config({**base, "dead_letter": {"path": "/dl"}}), "r1")
    assert url == "/dl/p1/r1"
    with pytest.raises(ConfigError):
        parse_config({**base, "dead_letter": {"max_fraction": 2}})


# -- end to end on the real Prefect server ------------------------------------------------------


@pytest.mark.prefect
def test_poison_rows_go_to_the_queue_and_replay_completes_the_output(tmp_path, data):
    src, df = data
    poison = _poison_ids(df, 0.01, seed=1)
    cfg, p, _ = _setup(tmp_path, src, poison, dead_letter={"max_fraction": 0.05})
    out = str(tmp_path / "out" / "r1")
    summary = Pipeline.from_yaml(p).run(run_key="r1")
    assert summary["status"] == "completed"
    assert summary["rows_dead_letter"] == len(poison) == 400
    assert summary["rows_in"] == len(df)

    # every other row is in the output, exactly once, with the values pandas computes
    rest = df[~df["row_id"].isin(poison)]
    assert_exactly_once(out, reference(rest))

    # exactly the poison rows are queued, once, with their original values and their errors
    q = _queue(cfg, "r1")
    assert q["row_id"].is_unique and set(q["row_id"]) == set(poison)
    assert list(q.columns[: len(META_COLUMNS)]) == META_COLUMNS
    assert set(q["_dlq_error_type"]) == {"ValueError"}
    assert q.apply(lambda r: f"poison row_id {r['row_id']}" in r["_dlq_error"], axis=1).all()
    assert set(q["_dlq_stage"]) == {"transform"} and set(q["_dlq_attempt"]) == {1}
    orig = df.set_index("row_id").loc[q["row_id"]].reset_index()
    pd.testing.assert_frame_equal(q[df.columns].reset_index(drop=True), orig[df.columns],
                                  check_dtype=False)
    # shard, batch and row position say where each row was: file i is shard f0000i, 10k rows each
    first_id = {f"f{i:05d}": i * 10_000 for i in range(4)}
    assert (q["row_id"] == q["_dlq_shard"].map(first_id) + q["_dlq_row"]).all()
    assert (q["_dlq_batch"] == q["_dlq_row"] // 4000).all()
    # the checkpoints carry the cumulative count per shard
    docs = CheckpointStore(Storage(cfg["checkpoint"]["path"]), cfg["name"], "r1").load_shards()
    assert sum(d.get("rows_dead_letter", 0) for d in docs.values()) == len(poison)

    r = run_cli("dlq", "ls", str(p), "--run-key", "r1")
    assert r.returncode == 0, r.stderr
    assert "400 row(s)" in r.stdout and "ValueError" in r.stdout and "f00003" in r.stdout
    r = run_cli("dlq", "show", str(p), "--run-key", "r1", "--limit", "3", "--json")
    assert r.returncode == 0, r.stderr
    shown = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(shown) == 3 and all(s["row_id"] in set(poison) for s in shown)

    # replay with the transform still broken: nothing moves, the rows stay queued
    r = run_cli("dlq", "replay", str(p), "--run-key", "r1", "--summary-json", str(tmp_path / "r0.json"))
    assert r.returncode == 0, r.stderr
    r0 = load_summary(tmp_path / "r0.json")
    assert r0["rows_out"] == 0 and r0["rows_still_dead"] == len(poison) and r0["files_replayed"] == 0
    assert set(_queue(cfg, "r1")["row_id"]) == set(poison)

    # half fixed: that half reaches the sink, the other half stays queued (attempt 2)
    still = poison[::2]
    set_poison(tmp_path, still)
    r = run_cli("dlq", "replay", str(p), "--run-key", "r1", "--summary-json", str(tmp_path / "r1.json"))
    assert r.returncode == 0, r.stderr
    r1 = load_summary(tmp_path / "r1.json")
    assert r1["rows_still_dead"] == len(still) and r1["rows_replayed"] == len(poison)
    q = _queue(cfg, "r1")
    assert set(q["row_id"]) == set(still) and q["row_id"].is_unique and set(q["_dlq_attempt"]) == {2}
    assert_exactly_once(out, reference(df[~df["row_id"].isin(still)]))

    # fully fixed: the output equals the full reference; the queue is empty
    set_poison(tmp_path, [])
    r = run_cli("dlq", "replay", str(p), "--run-key", "r1", "--summary-json", str(tmp_path / "r2.json"))
    assert r.returncode == 0, r.stderr
    r2 = load_summary(tmp_path / "r2.json")
    assert r2["rows_still_dead"] == 0 and r2["rows_replayed"] == len(still)
    assert_exactly_once(out, reference(df))
    assert len(_queue(cfg, "r1")) == 0
    files_before = sorted(Path(out).rglob("*.parquet"))

    # a second replay adds nothing
    r = run_cli("dlq", "replay", str(p), "--run-key", "r1", "--summary-json", str(tmp_path / "r3.json"))
    assert r.returncode == 0, r.stderr
    r3 = load_summary(tmp_path / "r3.json")
    assert r3["files"] == 0 and r3["rows_out"] == 0
    assert sorted(Path(out).rglob("*.parquet")) == files_before
    assert_exactly_once(out, reference(df))

    # --restart discards the run's dead letters with its output
    set_poison(tmp_path, poison)
    summary = Pipeline.from_yaml(p).run(run_key="r1", restart=True)
    assert summary["rows_dead_letter"] == len(poison)
    q = _queue(cfg, "r1")
    assert set(q["row_id"]) == set(poison) and set(q["_dlq_attempt"]) == {1}
    assert_exactly_once(out, reference(rest))


@pytest.mark.prefect
@pytest.mark.slow
def test_sigkill_between_write_and_checkpoint_keeps_dead_rows_exactly_once(tmp_path, data):
    src, df = data
    poison = _poison_ids(df, 0.01, seed=2)
    cfg, p, _ = _setup(tmp_path, src, poison, runner="dask", dead_letter={"max_fraction": 0.05})
    r = run_cli("run", str(p), "--run-key", "k", env={"DPIPELINE_CRASHPOINT": "after_write:2"})
    assert r.returncode == -signal.SIGKILL, f"not killed: {r.returncode}\n{r.stderr}"
    # the killed run left dead-letter files for batches whose checkpoint never landed
    written = DeadLetterStore(parse_config(cfg), "k").files()
    assert written
    r = run_cli("run", str(p), "--run-key", "k", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = load_summary(tmp_path / "s.json")
    assert s["status"] == "completed" and s["rows_dead_letter"] == len(poison)
    assert s["batches_reprocessed"] >= 1
    q = _queue(cfg, "k")
    assert q["row_id"].is_unique and set(q["row_id"]) == set(poison)
    assert_exactly_once(str(tmp_path / "out" / "k"), reference(df[~df["row_id"].isin(poison)]))


@pytest.mark.prefect
def test_past_max_fraction_the_shard_fails_naming_shard_and_fraction(tmp_path, data):
    src, df = data
    # 3% poison in the second file only; the limit is 1%
    part = df.iloc[10_000:20_000]
    poison = _poison_ids(part, 0.03, seed=3)
    cfg, p, _ = _setup(tmp_path, src, poison, dead_letter={"max_fraction": 0.01})
    with pytest.raises(DeadLetterLimitError) as e:
        Pipeline.from_yaml(p).run(run_key="m")
    msg = str(e.value)
    assert "part-001.parquet" in msg and "max_fraction 0.01" in msg and "%" in msg
    assert "poison row_id" in msg
    assert e.value.fraction > 0.01
    # the other shards completed; the failing one committed no more than the limit
    q = _queue(cfg, "m")
    assert len(q) <= 100 and set(q.get("row_id", [])) <= set(poison)
    # raising the limit lets a re-run finish it, with every poison row queued once
    cfg["dead_letter"] = {"max_fraction": 0.05}
    write_yaml(p, cfg)
    summary = Pipeline.from_yaml(p).run(run_key="m")
    assert summary["status"] == "completed" and summary["rows_dead_letter"] == len(poison)
    assert set(_queue(cfg, "m")["row_id"]) == set(poison)
    assert_exactly_once(str(tmp_path / "out" / "m"), reference(df[~df["row_id"].isin(poison)]))


@pytest.mark.prefect
def test_without_a_dead_letter_section_a_poison_row_fails_the_shard(tmp_path, data):
    src, df = data
    cfg, p, mod = _setup(tmp_path, src, [12_345])
    with pytest.raises(TransformError) as e:
        Pipeline.from_yaml(p).run(run_key="n")
    assert "poison row_id 12345" in str(e.value) and f"{mod}:poison_clean" in str(e.value)
    assert not (tmp_path / "ckpt" / f"{cfg['name']}.dead_letter").exists()


@pytest.mark.prefect
def test_rows_the_sink_rejects_are_isolated_with_partitioned_output(tmp_path, data):
    src, df = data
    poison = _poison_ids(df, 0.002, seed=4, survivors_only=True)
    cfg, p, _ = _setup(tmp_path, src, poison, transform="sink_poison_clean",
                       dead_letter={"max_fraction": 0.05})
    cfg["sink"]["partition_by"] = ["origin"]
    write_yaml(p, cfg)
    summary = Pipeline.from_yaml(p).run(run_key="s")
    assert summary["rows_dead_letter"] == len(poison)
    q = _queue(cfg, "s")
    assert set(q["row_id"]) == set(poison) and set(q["_dlq_stage"]) == {"sink"}
    assert q["_dlq_error"].str.contains("cannot be written").all()
    out = str(tmp_path / "out" / "s")
    assert_exactly_once(out, reference(df[~df["row_id"].isin(poison)]))
    # fixed: replay writes the rest into the same partitions
    set_poison(tmp_path, [])
    r = run_cli("dlq", "replay", str(p), "--run-key", "s")
    assert r.returncode == 0, r.stderr
    assert_exactly_once(out, reference(df))


@pytest.mark.prefect
def test_a_transform_that_is_not_row_independent_is_not_split(tmp_path, data):
    """Two marked rows fail only together: no single row fails, so the original error stands."""
    src, df = data
    cfg, p, _ = _setup(tmp_path, src, [5, 3000], transform="batch_coupled",
                       dead_letter={"max_fraction": 0.05})
    with pytest.raises(TransformError) as e:
        Pipeline.from_yaml(p).run(run_key="c")
    assert "two marked rows together" in str(e.value)
    assert len(_queue(cfg, "c")) == 0


@pytest.mark.prefect
@pytest.mark.slow
def test_resume_drops_dead_letters_of_batches_past_the_checkpoint(tmp_path, data):
    """Killed after a batch with dead rows was written, then the transform is fixed: the
    uncommitted batch is redone clean, and its stale dead-letter file must not survive."""
    src, df = data
    poison = _poison_ids(df, 0.01, seed=5)
    cfg, p, _ = _setup(tmp_path, src, poison, runner="threads", dead_letter={"max_fraction": 0.05})
    r = run_cli("run", str(p), "--run-key", "k", env={"DPIPELINE_CRASHPOINT": "after_write:3"})
    assert r.returncode == -signal.SIGKILL, f"not killed: {r.returncode}\n{r.stderr}"
    before = {(sh, s) for _, sh, s, _ in DeadLetterStore(parse_config(cfg), "k").files()}
    set_poison(tmp_path, [])
    r = run_cli("run", str(p), "--run-key", "k", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = load_summary(tmp_path / "s.json")
    q = _queue(cfg, "k")
    after = {(sh, s) for _, sh, s, _ in DeadLetterStore(parse_config(cfg), "k").files()}
    assert after < before  # the batch written but not checkpointed lost its dead-letter file
    assert s["rows_dead_letter"] == len(q) > 0 and q["row_id"].is_unique
    # every input row is either in the output or in the queue, never both
    got = assert_exactly_once(str(tmp_path / "out" / "k"), reference(df[~df["row_id"].isin(q["row_id"])]))
    assert not set(got["row_id"]) & set(q["row_id"])


@pytest.mark.s3
@pytest.mark.prefect
def test_dead_letters_and_replay_on_s3(tmp_path, data, s3):
    """Checkpoints, dead letters (default folder beside them) and sink on SeaweedFS."""
    from dpipeline_prefect.dead_letter import replay

    src, df = data
    poison = _poison_ids(df, 0.01, seed=6)
    prefix = uuid.uuid4().hex
    opts = s3.storage_options()
    cfg, p, _ = _setup(tmp_path, src, poison, dead_letter={"max_fraction": 0.05},
                       sink={"format": "parquet", "path": f"s3://out/{prefix}/", "storage_options": opts},
                       checkpoint={"path": f"s3://ckpt/{prefix}/", "storage_options": opts})
    summary = Pipeline(cfg, base_dir=str(tmp_path)).run(run_key="s3")
    assert summary["rows_dead_letter"] == len(poison)
    url, _ = dead_letter_url(parse_config(cfg), "s3")
    assert url == f"s3://ckpt/{prefix}/{cfg['name']}.dead_letter/s3"
    q = _queue(cfg, "s3")
    assert q["row_id"].is_unique and set(q["row_id"]) == set(poison)
    assert_exactly_once(f"s3://out/{prefix}/", reference(df[~df["row_id"].isin(poison)]), opts)
    set_poison(tmp_path, [])
    rep = replay(parse_config(cfg), "s3")
    assert rep.rows_still_dead == 0 and rep.rows_replayed == len(poison)
    assert_exactly_once(f"s3://out/{prefix}/", reference(df), opts)
    assert replay(parse_config(cfg), "s3").rows_out == 0
    assert_exactly_once(f"s3://out/{prefix}/", reference(df), opts)
