"""Chaos cases 3, 4 and 7: an S3 outage, a Prefect server restart, a corrupt latest checkpoint.

3. The run's checkpoints and sink live on a private SeaweedFS server, stopped for 12 s in the
   middle of the run and started again (same data, same ports). Configuration that rides it
   out: ``retry: {max_attempts: 8, base_delay_s: 1, max_delay_s: 8}`` (the backoff of a shard
   task then spans 1+2+4+8+8+8+8 = 39 s, more than the outage plus the server's start-up).
4. A private Prefect server (its own home and port; the session's server is not touched) is
   stopped and started again while the run reports to it: the run completes, or fails and
   completes on re-run.
7. A run is killed after some checkpoints were saved; the latest generation of one shard's
   checkpoint is truncated (and, in a second case, bit-flipped) on disk; the re-run detects it,
   falls back to the previous generation and still writes the exact output.

Every case compares the output with the pandas reference row for row.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from dpipeline_prefect.devservices import PrefectServer

from ..pipeline_helpers import load_summary

OUTAGE_S = 12.0


@pytest.mark.prefect
@pytest.mark.slow
def test_s3_outage_mid_run_with_checkpoints_and_sink_on_it(chaos, seaweedfs_factory):
    srv = seaweedfs_factory(buckets=("out", "ckpt"))
    so = srv.storage_options()
    chaos.env.update(CHAOS_S3_KEY=srv.key, CHAOS_S3_SECRET=srv.secret, CHAOS_SLEEP_S="0.4")
    opts = {"key": "${CHAOS_S3_KEY}", "secret": "${CHAOS_S3_SECRET}",
            "client_kwargs": {"endpoint_url": srv.endpoint_url}}
    prefix = uuid.uuid4().hex[:8]
    p = chaos.pipeline(
        "chaos-s3-" + prefix,
        sharding={"strategy": "files"},
        sink={"format": "parquet", "path": f"s3://out/{prefix}/{{run_key}}", "storage_options": opts},
        checkpoint={"path": f"s3://ckpt/{prefix}", "storage_options": opts},
        retry={"max_attempts": 8, "base_delay_s": 1.0, "max_delay_s": 8.0},
    )
    proc = chaos.start(p, "k", summary=chaos.dir / "s.json")
    assert chaos.wait_batches(proc, 4), proc.communicate()
    srv.stop(kill=True)
    down = time.monotonic()
    time.sleep(OUTAGE_S)
    assert proc.poll() is None, "the run ended during the outage: " + proc.communicate()[1][-3000:]
    srv.start()
    outage = time.monotonic() - down
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    s = load_summary(chaos.dir / "s.json")
    print(f"S3 down {outage:.1f} s; retries={s.get('retries')} batches_reprocessed={s['batches_reprocessed']}")
    chaos.check(f"s3://out/{prefix}/k", chaos.want, so, outages=1, outage_s=round(outage, 1),
                retries=s.get("retries"), batches_reprocessed=s["batches_reprocessed"])


@pytest.mark.slow
def test_prefect_server_restart_mid_run(chaos, tmp_path):
    srv = PrefectServer(tmp_path / "prefect-private", ui=False)
    try:
        srv.start()
        chaos.env.update(PREFECT_API_URL=srv.api_url, CHAOS_SLEEP_S="0.5")
        p = chaos.pipeline("chaos-pf-" + uuid.uuid4().hex[:6], sharding={"strategy": "files"})
        proc = chaos.start(p, "k", summary=chaos.dir / "s.json")
        assert chaos.wait_batches(proc, 3), proc.communicate()
        srv.stop()
        down = time.monotonic()
        time.sleep(3)
        still_running = proc.poll() is None  # else it failed at once: the re-run must resume it
        srv.start()
        outage = time.monotonic() - down
        out, err = proc.communicate(timeout=400)
        reruns, first_rc = 0, proc.returncode
        while proc.returncode != 0 and reruns < 3:
            reruns += 1
            proc = chaos.start(p, "k", summary=chaos.dir / "s.json")
            out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
        print(f"Prefect down {outage:.1f} s; first run exit {first_rc}; re-runs {reruns}")
        chaos.check(str(chaos.dir / "out" / "k"), chaos.want, outages=1, outage_s=round(outage, 1),
                    first_run_exit=first_rc, reruns=reruns, running_during_restart=still_running)
    finally:
        srv.stop(kill=True)


@pytest.mark.prefect
@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_corrupt_latest_checkpoint_falls_back_to_previous_generation(chaos, damage):
    chaos.env["CHAOS_SLEEP_S"] = "0.05"
    name = "chaos-ck-" + uuid.uuid4().hex[:6]
    p = chaos.pipeline(name, sharding={"strategy": "files"}, runner={"kind": "threads", "workers": 2})
    proc = chaos.start(p, "k", env={"DPIPELINE_CRASHPOINT": "after_write:9"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    # the shard with the most generations: its latest and previous ones are both kept
    shards = sorted((chaos.dir / "ckpt" / name / "k" / "shards").iterdir(),
                    key=lambda d: max(int(f.stem) for f in d.glob("*.ckpt")))
    shard = shards[-1]
    gens = sorted(shard.glob("*.ckpt"))
    assert len(gens) >= 2, gens
    latest = gens[-1]
    data = latest.read_bytes()
    if damage == "truncated":
        latest.write_bytes(data[: len(data) // 2])
    else:
        b = bytearray(data)
        b[len(b) - 3] ^= 0x10
        latest.write_bytes(bytes(b))
    proc = chaos.start(p, "k", env={"PREFECT_LOGGING_LEVEL": "WARNING"}, summary=chaos.dir / "s.json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    s = load_summary(chaos.dir / "s.json")
    print(f"{damage} {latest.relative_to(chaos.dir)}; batches_reprocessed={s['batches_reprocessed']}")
    assert s["batches_reprocessed"] >= 1  # the batch of the lost generation was redone
    chaos.check(str(chaos.dir / "out" / "k"), chaos.want, kills=1, corrupted=str(latest.name),
                batches_reprocessed=s["batches_reprocessed"])
