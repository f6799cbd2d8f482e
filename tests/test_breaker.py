"""Circuit breaker and degradation.

* The state machine (breaker.py) on a fake clock, no server: failure-rate and slow-call
  opening, the sliding window, half-open trials, closing, listeners, shared state.
* Shared state across two Dask worker processes (a real LocalCluster): once one opens the
  breaker, the other stops calling within ``sync_s``.
* End to end on the real Prefect server with a sink that fails 30% of its writes with
  transient errors (a ``flaky://`` filesystem, registered in the test's own Dask workers by
  preloading this module): the run completes with exact output, the breaker opens and closes,
  retries are counted, the events are on the server.
* Optional transforms: skipped when they raise or time out, and recorded; a non-optional one
  still fails the run.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import time
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from dpipeline_prefect.breaker import (
    BreakerOpenError,
    BreakerPolicy,
    BreakerRegistry,
    CircuitBreaker,
    MemorySharedState,
    State,
    StorageSharedState,
    circuit,
    use_registry,
)
from dpipeline_prefect.errors import StorageUnavailableError, TerminalError, TransientError, TransformError
from dpipeline_prefect.storage import Storage

CLEAN = "dpipeline_prefect.examples.flights:clean"


# --- fault injection: a local filesystem that fails a fraction of output writes -------------
_writes = itertools.count()


class FlakyFileSystem(LocalFileSystem):
    """``flaky:///path``: local disk whose ``pipe_file`` of ``part-*`` files fails with EBUSY
    (what s3fs raises for S3 SlowDown / 503) for ``DPIPELINE_TEST_FLAKY_RATE`` of the writes.

    Deterministic, in bursts as real outages come: in each process, writes 0-2 of every 10
    fail (for the default 0.3), so the breaker opens for sure and the test cannot pass or
    fail by luck. Every injected failure appends a line to ``DPIPELINE_TEST_FLAKY_LOG`` (if
    set), so the test knows how many there were across worker processes.
    """

    protocol = ("flaky",)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        rate = float(os.environ.get("DPIPELINE_TEST_FLAKY_RATE", "0.3"))
        if os.path.basename(path).startswith("part-") and next(_writes) % 10 < round(rate * 10):
            log = os.environ.get("DPIPELINE_TEST_FLAKY_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} {path}\n")
            raise OSError(errno.EBUSY, "SlowDown (injected by the test)", path)
        return super().pipe_file(path, value, mode=mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


def dask_setup(worker):  # noqa: ARG001 - Dask preload hook: importing this module is the setup
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


# --- the state machine on a fake clock ------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str, dict]] = []

    def state_change(self, breaker, old, new, info) -> None:
        self.changes.append((old.value, new.value, info))


def _fail():
    raise StorageUnavailableError("503 (test)")


def _calls(b: CircuitBreaker, clock: Clock, outcomes: str, step: float = 0.1) -> list[str]:
    """Make one call per character: 'f' fails (transient), 's' succeeds; returns what happened."""
    seen = []
    for o in outcomes:
        try:
            b.call(_fail if o == "f" else (lambda: None))
            seen.append("ok")
        except BreakerOpenError:
            seen.append("rejected")
        except StorageUnavailableError:
            seen.append("failed")
        clock.advance(step)
    return seen


POLICY = BreakerPolicy(failure_rate=0.5, slow_call_rate=0.5, slow_call_s=2.0, window_s=10.0,
                       min_calls=4, open_s=5.0, half_open_calls=2, sync_s=1.0)


def test_opens_on_failure_rate_only_with_enough_calls_and_fails_fast():
    clock, rec = Clock(), Recorder()
    b = CircuitBreaker("sink", POLICY, clock=clock, listeners=[rec])
    assert _calls(b, clock, "fff") == ["failed"] * 3
    assert b.state is State.CLOSED  # 3 calls < min_calls
    assert _calls(b, clock, "s") == ["ok"]  # 3 of 4 failed: 75% >= 50%
    assert b.state is State.OPEN
    assert [(o, n) for o, n, _ in rec.changes] == [("closed", "open")]
    info = rec.changes[0][2]
    assert info["calls"] == 4 and info["failed"] == 3 and info["failure_rate"] == 0.75
    assert not info["remote"]
    called = []
    with pytest.raises(BreakerOpenError) as e:
        b.call(lambda: called.append(1))
    assert not called
    assert isinstance(e.value, TransientError) and e.value.transient
    assert e.value.resource == "sink" and 4.0 < e.value.retry_after_s <= 5.0
    assert b.rejected == 1


def test_below_threshold_stays_closed_and_old_calls_leave_the_window():
    clock = Clock()
    b = CircuitBreaker("sink", POLICY, clock=clock)
    assert _calls(b, clock, "fsss") == ["failed", "ok", "ok", "ok"]  # 25% < 50%
    assert b.state is State.CLOSED
    # the failures below are spread so that the window (10 s) never holds half failures
    clock.advance(10.0)  # the first four calls leave the window
    assert _calls(b, clock, "ffs", step=0.1) == ["failed", "failed", "ok"]
    assert b.state is State.CLOSED  # 3 calls in the window: fewer than min_calls
    _calls(b, clock, "f")
    assert b.state is State.OPEN  # now 3 of 4 within 10 s


def test_terminal_errors_do_not_count_against_the_resource():
    clock = Clock()
    b = CircuitBreaker("sink", POLICY, clock=clock)

    def bad_rows():
        raise TerminalError("schema mismatch")

    for _ in range(6):
        with pytest.raises(TerminalError):
            b.call(bad_rows)
    assert b.state is State.CLOSED and b.snapshot()["calls"] == 0


def test_opens_on_slow_call_rate():
    clock, rec = Clock(), Recorder()
    b = CircuitBreaker("geo-api", POLICY, clock=clock, listeners=[rec])

    def slow():
        clock.advance(2.5)  # slower than slow_call_s, and it succeeds
        return "ok"

    assert [b.call(slow) for _ in range(2)] == ["ok", "ok"]
    _calls(b, clock, "ss")
    assert b.state is State.OPEN  # 2 of 4 slow: 50%
    assert rec.changes[-1][2]["slow_call_rate"] == 0.5 and rec.changes[-1][2]["failed"] == 0


def test_half_open_trials_close_it_and_a_failed_trial_reopens():
    clock, rec = Clock(), Recorder()
    b = CircuitBreaker("sink", POLICY, clock=clock, listeners=[rec])
    _calls(b, clock, "ffff")
    assert b.state is State.OPEN
    clock.advance(5.0)
    assert b.state is State.HALF_OPEN
    # two trial calls may be in flight at once, a third is refused
    t1, t2 = b.before_call(), b.before_call()
    with pytest.raises(BreakerOpenError):
        b.before_call()
    b.on_failure(t1, StorageUnavailableError("still down"))
    assert b.state is State.OPEN  # one failed trial reopens
    b.on_success(t2)  # a straggler admitted before the reopening changes nothing
    assert b.state is State.OPEN
    clock.advance(5.0)
    assert _calls(b, clock, "s") == ["ok"]
    assert b.state is State.HALF_OPEN  # 1 of 2 trials
    assert _calls(b, clock, "s") == ["ok"]
    assert b.state is State.CLOSED
    assert [(o, n) for o, n, _ in rec.changes] == [
        ("closed", "open"), ("half_open", "open"), ("half_open", "closed")]
    assert b.openings == 2
    # closed again: a fresh window, so one old failure does not reopen it
    assert _calls(b, clock, "fsss") == ["failed", "ok", "ok", "ok"] and b.state is State.CLOSED


def test_slow_trial_reopens_and_ignored_trial_frees_its_slot():
    clock = Clock()
    b = CircuitBreaker("sink", POLICY, clock=clock)
    _calls(b, clock, "ffff")
    clock.advance(5.0)
    t = b.before_call()
    b.on_ignored(t)  # a terminal error during a trial: says nothing, frees the slot
    t1, t2 = b.before_call(), b.before_call()
    clock.advance(3.0)
    b.on_success(t1)  # slow
    assert b.state is State.OPEN


def test_decorator_context_manager_and_registry():
    clock = Clock()
    reg = BreakerRegistry(lambda name: CircuitBreaker(name, POLICY, clock=clock))

    @circuit("geo-api")
    def lookup(x):
        if x < 0:
            raise ConnectionError("refused")
        return x * 2

    with use_registry(reg):
        assert lookup(2) == 4
        for _ in range(3):  # 3 of 4 calls failed: open
            with pytest.raises(ConnectionError):
                lookup(-1)
        with pytest.raises(BreakerOpenError):
            lookup(2)
        with pytest.raises(BreakerOpenError):
            with circuit("geo-api").calling():
                pass
        assert reg.get("geo-api").state is State.OPEN
        assert reg.get("other").state is State.CLOSED
    # outside the run's registry, the name maps to a process-local breaker
    assert circuit("geo-api").breaker is not reg.get("geo-api")
    b = CircuitBreaker("x", POLICY, clock=clock)
    wrapped = b(lambda: "y")
    assert wrapped() == "y" and b.calls == 1


def test_shared_state_between_two_breakers():
    """Two processes, modelled as two breakers over one shared object and one clock."""
    clock, shared = Clock(), MemorySharedState()
    rec_a, rec_b = Recorder(), Recorder()
    a = CircuitBreaker("sink", POLICY, clock=clock, shared=shared, listeners=[rec_a], owner="a")
    b = CircuitBreaker("sink", POLICY, clock=clock, shared=shared, listeners=[rec_b], owner="b")
    assert _calls(b, clock, "s", step=0.0) == ["ok"]  # b has synced at t0
    _calls(a, clock, "ffff", step=0.1)
    assert a.state is State.OPEN and shared.doc["state"] == "open" and shared.doc["openings"] == 1
    # b read the shared state 0.4 s ago: it keeps calling until sync_s has passed, no longer
    assert _calls(b, clock, "s", step=0.0) == ["ok"]
    clock.advance(0.61)  # b's last read is now sync_s old (plus float slack)
    assert _calls(b, clock, "s", step=0.0) == ["rejected"]
    assert rec_b.changes[-1][1] == "open" and rec_b.changes[-1][2]["remote"]
    reads = shared.reads
    for _ in range(20):  # calls within sync_s do not read the shared state again
        _calls(b, clock, "s", step=0.01)
    assert shared.reads == reads
    # both half-open after open_s; a closes first and publishes; b's own recovery is quiet
    clock.advance(5.0)
    _calls(a, clock, "ss", step=0.0)
    assert a.state is State.CLOSED and shared.doc["state"] == "closed"
    _calls(b, clock, "ss", step=0.0)
    assert b.state is State.CLOSED
    assert [(o, n, i["remote"]) for o, n, i in rec_a.changes] == [("closed", "open", False), ("half_open", "closed", False)]
    assert rec_b.changes[-1][2]["remote"]  # adopted, so only a emits "closed"
    assert [h["state"] for h in shared.doc["history"]] == ["open", "closed"]
    assert [h["by"] for h in shared.doc["history"]] == ["a", "a"]


def test_unreachable_shared_state_does_not_fail_calls():
    class Down:
        def read(self):
            raise StorageUnavailableError("down")

        def write(self, doc):
            raise StorageUnavailableError("down")

    clock = Clock()
    b = CircuitBreaker("sink", POLICY, clock=clock, shared=Down())
    assert _calls(b, clock, "ssff") == ["ok", "ok", "failed", "failed"]
    assert b.state is State.OPEN  # this process still obeys its own view


def test_storage_shared_state_round_trip(tmp_path):
    st = StorageSharedState(Storage(str(tmp_path)), str(tmp_path / "breaker" / "sink.json"))
    assert st.read() is None
    st.write({"state": "open", "changed_at": 1.0})
    assert st.read() == {"state": "open", "changed_at": 1.0}
    assert not [p for p in os.listdir(tmp_path / "breaker") if p.endswith(".tmp")]


# --- two worker processes -------------------------------------------------------------------
SHARED_POLICY = BreakerPolicy(failure_rate=0.5, min_calls=4, window_s=2.0, open_s=30.0,
                              half_open_calls=1, sync_s=0.2)


def _shared_breaker(folder: str) -> CircuitBreaker:
    return CircuitBreaker("sink", SHARED_POLICY,
                          shared=StorageSharedState(Storage(folder), f"{folder}/sink.json"))


def _open_it(folder: str) -> dict:
    """Worker A: fail until the breaker opens; when did it?"""
    b = _shared_breaker(folder)
    while b.state is State.CLOSED:
        try:
            b.call(_fail)
        except (StorageUnavailableError, BreakerOpenError):
            pass
    doc = json.loads(Path(folder, "sink.json").read_text())
    return {"pid": os.getpid(), "opened_at": doc["changed_at"]}


def _keep_calling(folder: str, started: str, seconds: float) -> dict:
    """Worker B: call a healthy resource every 10 ms until the breaker refuses."""
    b = _shared_breaker(folder)
    Path(started).write_text("1")
    calls, end = 0, time.time() + seconds
    while time.time() < end:
        try:
            b.call(lambda: None)
            calls += 1
        except BreakerOpenError:
            return {"pid": os.getpid(), "rejected_at": time.time(), "calls": calls}
        time.sleep(0.01)
    return {"pid": os.getpid(), "rejected_at": None, "calls": calls}


def test_state_is_shared_across_dask_worker_processes(tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"}) as cluster, \
            distributed.Client(cluster) as client:
        w_a, w_b = sorted(client.scheduler_info()["workers"])
        folder, started = str(tmp_path / "breaker"), str(tmp_path / "b-started")
        fb = client.submit(_keep_calling, folder, started, 20.0, workers=[w_b], pure=False)
        t0 = time.time()
        while not os.path.exists(started):
            assert time.time() - t0 < 30, "worker B did not start"
            time.sleep(0.02)
        time.sleep(0.3)  # B is calling happily
        fa = client.submit(_open_it, folder, workers=[w_a], pure=False)
        a, b = fa.result(timeout=60), fb.result(timeout=60)
    assert a["pid"] != b["pid"]
    assert b["calls"] > 10
    assert b["rejected_at"] is not None, "worker B never saw the breaker open"
    lag = b["rejected_at"] - a["opened_at"]
    # within one sync interval (0.2 s), plus one call's sleep and scheduling noise
    assert 0 <= lag < SHARED_POLICY.sync_s + 0.3, lag


# --- optional transforms --------------------------------------------------------------------
BATCH = 2500


def sometimes_fails(df: pd.DataFrame) -> pd.DataFrame:
    """A no-op that raises on every third batch (batches are aligned to BATCH rows)."""
    if (int(df["row_id"].iloc[0]) // BATCH) % 3 == 0:
        raise RuntimeError("enrichment service said no")
    df["row_id"] = df["row_id"] + 0  # a mutation: must not leak into the batch when skipped
    return df


def sometimes_slow(df: pd.DataFrame) -> pd.DataFrame:
    """A no-op that hangs on one batch."""
    if int(df["row_id"].iloc[0]) // BATCH == 5:
        time.sleep(3.0)
    return df


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """40k real flights rows in 4 files of 10k, row groups of BATCH rows."""
    from .pipeline_helpers import flights, write_parquet_files

    df = flights(40_000)
    folder = tmp_path_factory.mktemp("aligned") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=BATCH)
    return folder, df


def _cfg(tmp_path: Path, src: Path, **over) -> dict:
    cfg = {
        "name": "b-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": BATCH},
        "transforms": [CLEAN],
        "sink": {"format": "parquet", "path": str(tmp_path / "out")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
        "lock": {"enabled": False},
    }
    cfg.update(over)
    return cfg


@pytest.mark.prefect
def test_optional_transforms_are_skipped_and_recorded(tmp_path, aligned):
    from dpipeline_prefect.pipeline import Pipeline

    from .pipeline_helpers import assert_exactly_once, reference

    src, df = aligned
    fails = "tests.test_breaker:sometimes_fails"
    slow = "tests.test_breaker:sometimes_slow"
    cfg = _cfg(tmp_path, src, transforms=[
        {"function": fails, "optional": True},
        {"function": slow, "optional": True, "timeout_s": 0.5},
        CLEAN,
    ])
    summary = Pipeline(cfg).run(run_key="opt")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    n_batches = len(df) // BATCH
    want_fails = {b for b in range(n_batches) if b % 3 == 0}
    assert summary["transforms_skipped"] == {fails: len(want_fails), slow: 1}
    kinds = {e["event"] for e in summary["degraded"]}
    assert kinds == {"transform_skipped"}
    # each output file says which transforms its batch skipped (files of 10k rows: 4 batches)
    seen = {}
    for f in sorted((tmp_path / "out").glob("part-*.parquet")):
        shard, seq = f.stem.split("-")[1], int(f.stem.split("-")[2])
        b = int(shard[1:]) * 4 + seq
        attrs = json.loads(pq.read_schema(f).metadata[b"pandas"]).get("attributes", {})
        seen[b] = attrs.get("dpipeline", {}).get("skipped_transforms", [])
    assert len(seen) == n_batches
    for b, skipped in seen.items():
        assert skipped == [t for t, hit in ((fails, b in want_fails), (slow, b == 5)) if hit], b
    assert pd.read_parquet(tmp_path / "out" / "part-f00000-000000.parquet").attrs["dpipeline"] == {
        "skipped_transforms": [fails]}


@pytest.mark.prefect
def test_a_non_optional_transform_still_fails_the_run(tmp_path, aligned):
    from dpipeline_prefect.pipeline import Pipeline

    src, _ = aligned
    cfg = _cfg(tmp_path, src, transforms=["tests.test_breaker:sometimes_fails", CLEAN])
    with pytest.raises(TransformError, match="enrichment service said no"):
        Pipeline(cfg).run(run_key="strict")


# --- end to end: a sink failing 30% of its writes ------------------------------------------
def _read_breaker_events(pipeline: str, timeout: float = 30.0, opened: int = 1) -> list:
    """The run's breaker events, once the server has both kinds and ``opened`` openings
    (Prefect delivers events asynchronously: the last ones can land after the run returns)."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    names = ["dpipeline.breaker.opened", "dpipeline.breaker.closed"]
    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(
                event=EventNameFilter(name=names),
                resource=EventResourceFilter(id=[f"dpipeline.pipeline.{pipeline}"])), limit=50)
        events = list(page.events)
        kinds = {e.event for e in events}
        n_opened = sum(e.event == names[0] for e in events)
        if (set(names) <= kinds and n_opened >= opened) or time.time() > deadline:
            return events
        time.sleep(0.5)


@pytest.mark.prefect
def test_flaky_sink_run_completes_exactly_once_with_breaker_cycles(tmp_path, aligned, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from dpipeline_prefect.cluster import local_cluster_kwargs
    from dpipeline_prefect.degrade import limit_name
    from dpipeline_prefect.pipeline import Pipeline

    from .pipeline_helpers import assert_exactly_once, reference

    src, df = aligned
    flaky_log = tmp_path / "injected.log"
    monkeypatch.setenv("DPIPELINE_TEST_FLAKY_RATE", "0.3")
    monkeypatch.setenv("DPIPELINE_TEST_FLAKY_LOG", str(flaky_log))
    kwargs = local_cluster_kwargs(2, threads_per_worker=2)
    kwargs["preload"] = [*kwargs["preload"], "tests.test_breaker"]
    out = tmp_path / "out"
    with distributed.LocalCluster(**kwargs) as cluster:
        cfg = _cfg(
            tmp_path, src,
            batching={"rows": 1000},  # 40 batches: 40 writes, about 12 of them failing
            sink={"format": "parquet", "path": f"flaky://{out}"},
            runner={"kind": "dask", "address": cluster.scheduler_address},
            retry={"max_attempts": 20, "base_delay_s": 0.05, "max_delay_s": 0.4, "jitter": 0.2},
            breaker={"failure_rate": 0.35, "min_calls": 4, "window_s": 1.0, "open_s": 0.3,
                     "half_open_calls": 1, "sync_s": 0.1, "degraded_concurrency": 1},
        )
        t0 = time.monotonic()
        summary = Pipeline(cfg).run(run_key="flaky")
        took = time.monotonic() - t0
        events = _read_breaker_events(cfg["name"], opened=summary["breaker_openings"])
    assert summary["status"] == "completed"
    assert took < 120, f"degradation must slow the run, not stall it: {took:.0f} s"
    assert_exactly_once(str(out), reference(df))
    injected = len(flaky_log.read_text().splitlines())
    assert injected > 0
    # every injected failure was retried (and so were the attempts an open breaker refused)
    assert summary["retries"] >= injected + summary["breaker_rejections"] > injected
    assert summary["breaker_openings"] >= 1 and summary["breaker_closings"] >= 1
    assert summary["degraded_slot_waits"] >= 1
    opened = [e for e in summary["degraded"] if e["event"] == "breaker_opened"]
    assert opened and all(e["resource"] == "sink" for e in opened)
    assert "failure rate" in opened[0]["reason"]
    # the events are on the server, one per transition made (adopted ones are not re-emitted)
    by_kind = {k: [e for e in events if e.event == k] for k in ("dpipeline.breaker.opened", "dpipeline.breaker.closed")}
    assert by_kind["dpipeline.breaker.opened"] and by_kind["dpipeline.breaker.closed"]
    assert len(by_kind["dpipeline.breaker.opened"]) == summary["breaker_openings"]
    # the server does not promise an order: the first opening (by failure rate) may come back
    # after a re-opening by a failed half-open trial, whose payload has no failure_rate
    assert all(e.resource["dpipeline.run_key"] == "flaky" and e.resource["dpipeline.breaker"] == "sink"
               for e in by_kind["dpipeline.breaker.opened"])
    by_rate = [e for e in by_kind["dpipeline.breaker.opened"] if "failure_rate" in e.payload]
    assert by_rate and max(e.payload["failure_rate"] for e in by_rate) >= 0.35
    # the degraded-writers limit was removed with the run
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client, pytest.raises(ObjectNotFound):
        client.read_global_concurrency_limit_by_name(limit_name(cfg["name"], "flaky", "sink"))


# --- fewer writers while degraded (Prefect global concurrency limit) ------------------------
@pytest.mark.prefect
def test_degraded_slots_serialize_writers_and_never_leak():
    import threading

    from prefect import get_client

    from dpipeline_prefect import degrade

    pipeline, run_key = "slots-" + uuid.uuid4().hex[:8], "k"
    clock = Clock()
    b = CircuitBreaker("sink", POLICY, clock=clock)
    closed_stats = degrade.SlotStats()
    with degrade.degraded_slot(b, pipeline, run_key, closed_stats):
        pass
    assert closed_stats.waits == 0  # closed: no slot, no API call
    _calls(b, clock, "ffff")
    assert b.state is State.OPEN
    name = degrade.limit_name(pipeline, run_key, "sink")
    degrade._set_limit(name, 1)  # what the opening process does

    spans: list[tuple[float, float]] = []
    stats = degrade.SlotStats()

    def writer() -> None:
        for _ in range(2):
            with degrade.degraded_slot(b, pipeline, run_key, stats):
                t1 = time.monotonic()
                time.sleep(0.2)
                spans.append((t1, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert stats.waits == 6 and len(spans) == 6
    spans.sort()
    assert all(a[1] <= b_[0] for a, b_ in zip(spans, spans[1:])), spans  # one writer at a time

    # a slot taken while degraded and given back after the breaker closed is not leaked
    with degrade.degraded_slot(b, pipeline, run_key, stats):
        degrade._set_limit(name, degrade.RESTORED_LIMIT)  # closed meanwhile
    degrade._set_limit(name, 1)  # opened again
    t0 = time.monotonic()
    with degrade.degraded_slot(b, pipeline, run_key, stats):
        pass
    assert time.monotonic() - t0 < 5.0
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0
        client.delete_global_concurrency_limit_by_name(name)
