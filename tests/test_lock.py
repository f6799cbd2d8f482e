"""The run lock: one run of a pipeline and run key at a time, on the real Prefect server.

Covers: a second holder is refused with a message naming the pipeline, run key and the wait;
a waiter gets the lock when it is released; a holder killed with SIGKILL is freed at once on
the same host, and within the lease (Prefect's repossessor) when it looks like another host's;
a slot whose lease the server lost (restart) is repaired; two concurrent ``dpipeline run``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from dpipeline_prefect.errors import RunLockedError
from dpipeline_prefect.locks import RunLock, lock_name

from .pipeline_helpers import assert_exactly_once, flights, load_summary, reference, run_cli, write_parquet_files, write_yaml

pytestmark = pytest.mark.prefect


def _limit(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def _holder(lock: RunLock) -> dict | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        v = client.read_variable_by_name(lock.variable)
    return v.value if v else None


def _set_holder(lock: RunLock, value: dict) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import VariableUpdate

    with get_client(sync_client=True) as client:
        client.update_variable(VariableUpdate(name=lock.variable, value=value))


def _pipeline() -> str:
    return "lk-" + uuid.uuid4().hex[:8]


def test_second_holder_is_refused_then_waits_for_the_release():
    p = _pipeline()
    first = RunLock(p, "2026-11-29", wait_s=0).acquire()
    try:
        lim = _limit(lock_name(p, "2026-11-29"))
        assert lim.limit == 1 and lim.active_slots == 1
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as e:
            RunLock(p, "2026-11-29", wait_s=0).acquire()
        assert time.monotonic() - t0 < 5
        msg = str(e.value)
        assert repr(p) in msg and "'2026-11-29'" in msg and "already running" in msg
        # wait_s=0: one attempt, no waiting (the figure is the attempt's own time, ~0.0-0.2 s)
        assert re.search(r"waited 0\.\d s", msg), msg
        assert f"pid {os.getpid()}" in msg and "lock.wait_s" in msg
        # another run key of the same pipeline is a different lock
        with RunLock(p, "other", wait_s=0):
            pass
        threading.Timer(2.0, first.release).start()
        second = RunLock(p, "2026-11-29", wait_s=30, poll_s=0.5).acquire()
        assert 1.5 <= second.waited_s <= 10, second.waited_s
        assert _holder(second)["lease_id"] == str(second._lease_id)
        second.release()
    finally:
        first.release()
    assert _limit(lock_name(p, "2026-11-29")).active_slots == 0
    assert _holder(first) is None


_HOLD_AND_DIE = textwrap.dedent("""
    import os, signal, sys
    from dpipeline_prefect.locks import RunLock
    lock = RunLock(sys.argv[1], sys.argv[2], wait_s=0).acquire()
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def _hold_and_die(pipeline: str, key: str) -> None:
    r = subprocess.run([sys.executable, "-c", _HOLD_AND_DIE, pipeline, key], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == -signal.SIGKILL and "held" in r.stdout, r.stderr


def test_holder_killed_on_this_host_is_freed_at_once():
    p = _pipeline()
    _hold_and_die(p, "k")
    assert _limit(lock_name(p, "k")).active_slots == 1  # the dead process still holds it
    t0 = time.monotonic()
    with RunLock(p, "k", wait_s=0) as lock:
        assert lock.freed and "no longer exists" in lock.freed[0]
    assert time.monotonic() - t0 < 5


def test_lost_lease_is_repaired():
    """After a server restart (in-memory lease storage) the slot count stays but no lease does."""
    from prefect.client.orchestration import get_client

    p = _pipeline()
    _hold_and_die(p, "k")
    lock = RunLock(p, "k")
    holder = _holder(lock)
    with get_client(sync_client=True) as client:
        # what a restart leaves: the lease is gone, the slot stays counted
        client.release_concurrency_slots_with_lease(lease_id=holder["lease_id"])
        client.increment_concurrency_slots(names=[lock.name], slots=1, mode="concurrency")
    assert _limit(lock.name).active_slots == 1
    with RunLock(p, "k", wait_s=0) as again:
        assert again.freed
        assert _limit(lock.name).active_slots == 1
    assert _limit(lock.name).active_slots == 0


@pytest.mark.slow
def test_holder_killed_on_another_host_is_freed_within_the_lease():
    """The bound when the dead holder cannot be checked locally: Prefect's lease expiry.

    The killed holder's record is made to name another host, so only the server's lease
    (60 s, its minimum) and its repossessor (15 s loop) can free the slot.
    """
    p = _pipeline()
    t_kill = time.monotonic()
    _hold_and_die(p, "k")
    lock = RunLock(p, "k")
    _set_holder(lock, {**_holder(lock), "host": "some-other-machine"})
    with pytest.raises(RunLockedError):
        RunLock(p, "k", wait_s=0).acquire()
    with RunLock(p, "k", wait_s=150, poll_s=1.0) as again:
        freed_after = time.monotonic() - t_kill
        assert not again.freed  # the server freed it, not our repair
    print(f"lock of a SIGKILLed holder on another host freed after {freed_after:.1f} s")
    assert 50 <= freed_after <= 60 + 15 + 10, freed_after


# -- two `dpipeline run` of one pipeline and run key ---------------------------------------------

GATED_TRANSFORM = textwrap.dedent("""
    import os, time
    from dpipeline_prefect.examples.flights import clean

    GATE = {gate!r}

    def gated_clean(df):
        # holds the run (and its lock) until the test opens the gate
        deadline = time.monotonic() + 120
        while not os.path.exists(GATE) and time.monotonic() < deadline:
            time.sleep(0.05)
        return clean(df)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = flights(20_000)
    folder = tmp_path_factory.mktemp("lock") / "in"
    write_parquet_files(df, folder, files=2, row_group_size=2000)
    return folder, df


def _yamls(tmp_path, src):
    mod = "gatedt_" + uuid.uuid4().hex[:8]
    gate = tmp_path / "gate"
    (tmp_path / f"{mod}.py").write_text(GATED_TRANSFORM.format(gate=str(gate)))
    base = {
        "name": _pipeline(),
        "source": {"path": str(src)},
        "batching": {"rows": 2000},
        "transforms": [f"{mod}:gated_clean"],
        "sink": {"path": str(tmp_path / "out" / "{run_key}")},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
    }
    quick = write_yaml(tmp_path / "nowait.yaml", {**base, "lock": {"wait_s": 0}})
    patient = write_yaml(tmp_path / "wait.yaml", {**base, "lock": {"wait_s": 240, "poll_s": 0.5}})
    return base["name"], quick, patient, gate


def _wait_held(name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _limit(name).active_slots == 1:
                return
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{name} was never taken")


def test_two_concurrent_cli_runs_one_runs_the_other_waits_or_stops(tmp_path, data):
    src, df = data
    name, quick, patient, gate = _yamls(tmp_path, src)
    first = subprocess.Popen(
        [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(quick), "--run-key", "k",
         "--summary-json", str(tmp_path / "a.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_held(lock_name(name, "k"))
        # a second run that does not wait stops at once with the clear message
        r = run_cli("run", str(quick), "--run-key", "k", timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "already running" in r.stderr and f"'{name}'" in r.stderr and "'k'" in r.stderr
        assert "waited" in r.stderr and "Traceback" not in r.stderr
        # a run that waits gets the lock when the first one is done, and finds nothing to do
        third = subprocess.Popen(
            [sys.executable, "-m", "dpipeline_prefect.cli", "run", str(patient), "--run-key", "k",
             "--summary-json", str(tmp_path / "c.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(12)  # time for it to start and queue on the lock
        assert third.poll() is None, third.communicate()
        gate.touch()
        out, err = first.communicate(timeout=240)
        out3, err3 = third.communicate(timeout=240)
        assert third.returncode == 0, err3
    finally:
        gate.touch()
        for proc in (first, locals().get("third")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert first.returncode == 0, err
    a, c = load_summary(tmp_path / "a.json"), load_summary(tmp_path / "c.json")
    assert a["status"] == "completed" and c["status"] == "already_complete"
    assert c["lock_waited_s"] > 0.5
    print(f"the waiting run waited {c['lock_waited_s']:.1f} s for the lock")
    assert_exactly_once(str(tmp_path / "out" / "k"), reference(df))
    assert _limit(lock_name(name, "k")).active_slots == 0


def test_run_sigkilled_holding_the_lock_does_not_block_the_next(tmp_path, data):
    src, df = data
    name, quick, _, gate = _yamls(tmp_path, src)
    gate.touch()
    r = run_cli("run", str(quick), "--run-key", "k", env={"DPIPELINE_CRASHPOINT": "after_write:3"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _limit(lock_name(name, "k")).active_slots == 1  # killed while holding it
    t0 = time.monotonic()
    r = run_cli("run", str(quick), "--run-key", "k", "--summary-json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    s = load_summary(tmp_path / "s.json")
    assert s["status"] == "completed" and s["batches_reprocessed"] >= 1
    assert s["lock_waited_s"] < 5 and time.monotonic() - t0 < 120
    assert_exactly_once(str(tmp_path / "out" / "k"), reference(df))
