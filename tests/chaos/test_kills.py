"""Chaos cases 1 and 2: SIGKILL of the whole run at many moments, and of one Dask worker.

1. ``dpipeline run`` (process group: the run and its Dask workers) gets SIGKILL at no fewer
   than 10 moments drawn from a seeded RNG, alternating between a kill from outside after a
   random delay and a named crash point (``DPIPELINE_CRASHPOINT``) reached a random number of
   times; after each kill the run is started again, until it completes. Should a run complete
   before all kills are spent, a fresh run key starts another round. Every round's output must
   equal the pandas reference row for row.
2. One Dask worker process is killed (SIGKILL) while it runs a shard: the run must finish by
   itself (exit 0) with the exact output; the lost shard is rerun by a task retry.
"""

from __future__ import annotations

import random
import signal
import time
import uuid

import psutil
import pytest

from .conftest import kill_group

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

KILLS = 10
CRASHPOINTS = [("planned", 1, 1), ("shuffle", 1, 3), ("before_write", 1, 4),
               ("after_write", 1, 4), ("after_checkpoint", 1, 4)]


def test_sigkill_at_ten_random_moments_then_resume(chaos):
    rng = random.Random(20261129)
    chaos.env["CHAOS_SLEEP_S"] = "0.5"
    p = chaos.pipeline("chaos-kill-" + uuid.uuid4().hex[:6])
    kills, rounds, plan, redone = 0, 0, [], 0
    while kills < KILLS:
        rounds += 1
        key = f"r{rounds}"
        # one batch log per round: a new run key transforms every batch once more
        chaos.batch_log = chaos.dir / f"batches-{key}.log"
        chaos.env["CHAOS_BATCH_LOG"] = str(chaos.batch_log)
        for _attempt in range(KILLS + 5):
            if kills < KILLS and rng.random() < 0.5:
                name, lo, hi = rng.choice(CRASHPOINTS)
                spec = f"{name}:{rng.randint(lo, hi)}"
                proc = chaos.start(p, key, env={"DPIPELINE_CRASHPOINT": spec})
                proc.communicate(timeout=300)
                what = spec
            else:
                delay = rng.uniform(2.0, 14.0) if kills < KILLS else None
                proc = chaos.start(p, key)
                what = "run"
                if delay is not None:
                    try:
                        proc.communicate(timeout=delay)
                    except Exception:  # noqa: BLE001 - TimeoutExpired: still running, kill it
                        kill_group(proc)
                        proc.communicate()
                    what = f"external after {delay:.1f} s"
                else:
                    proc.communicate(timeout=300)
            if proc.returncode == -signal.SIGKILL:
                kills += 1
                plan.append(what)
                continue
            assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stderr}"
            break
        else:
            raise AssertionError("the run never completed")
        if kills < KILLS:  # round done early: check it and start another run key
            from ..pipeline_helpers import assert_exactly_once

            assert_exactly_once(str(chaos.dir / "out" / key), chaos.want)
            redone += chaos.batches_redone()
    print("kills:", plan)
    for r in range(1, rounds):
        from ..pipeline_helpers import assert_exactly_once

        assert_exactly_once(str(chaos.dir / "out" / f"r{r}"), chaos.want)
    chaos.check(str(chaos.dir / "out" / f"r{rounds}"), chaos.want, redone_before=redone,
                kills=kills, rounds=rounds)
    print("batches transformed again after a kill:", chaos.figures["batches_redone"])


def _workers(proc) -> list[psutil.Process]:
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        try:
            if any("spawn_main" in part for part in k.cmdline()):
                out.append(k)
        except psutil.Error:
            pass
    return out


def test_killing_a_dask_worker_mid_shard_the_run_completes_by_itself(chaos):
    chaos.env["CHAOS_SLEEP_S"] = "0.6"
    p = chaos.pipeline("chaos-worker-" + uuid.uuid4().hex[:6], sharding={"strategy": "files"})
    proc = chaos.start(p, "k", summary=chaos.dir / "s.json")
    assert chaos.wait_batches(proc, 3), proc.communicate()
    workers = _workers(proc)
    assert workers, "no Dask worker process found"
    victim = workers[0]
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    from ..pipeline_helpers import load_summary

    s = load_summary(chaos.dir / "s.json")
    print(f"batches transformed twice: {chaos.batches_redone()}; worker {victim.pid} killed; run finished {time.monotonic() - t0:.1f} s later; "
          f"retries={s.get('retries')} batches_reprocessed={s['batches_reprocessed']}")
    chaos.check(str(chaos.dir / "out" / "k"), chaos.want, kills=1, retries=s.get("retries"),
                batches_reprocessed=s["batches_reprocessed"])
