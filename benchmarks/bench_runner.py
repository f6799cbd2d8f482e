"""Per-task orchestration cost of Prefect task runners on Dask, measured side by side.

One command starts a real Prefect server (own PREFECT_HOME, free port) and one Dask
LocalCluster of worker processes, then times noop tasks through:

* raw Dask ``client.map`` (the floor),
* Prefect's ``ThreadPoolTaskRunner``,
* prefect-dask's stock ``DaskTaskRunner``,
* ``dpipeline_prefect.runner.FastDaskTaskRunner``.

The Prefect runners share the same cluster (connected by ``address``), so cluster start-up is
not counted. For each runner a warm-up flow runs first (worker imports, API version check),
then flows of ``--small`` and ``--large`` tasks; the marginal cost per task is
``(t_large - t_small) / (large - small)``, which cancels the fixed flow overhead. A table with
the ratios to raw Dask and to the stock runner is printed.

Usage::

    python benchmarks/bench_runner.py [--small 20] [--large 60] [--workers 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: str) -> tuple[subprocess.Popen, str]:
    """Start ``prefect server start`` on a free loopback port; return (process, API URL)."""
    port = _free_port()
    env = dict(
        os.environ,
        PREFECT_HOME=home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_UI_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    prefect_bin = os.path.join(os.path.dirname(sys.executable), "prefect")
    proc = subprocess.Popen(
        [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("prefect server did not answer /health within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the fastest is kept")
    parser.add_argument("--api-url", help="use this Prefect server instead of starting one")
    parser.add_argument(
        "--only", default="raw,threads,stock,fast", help="comma-separated subset of runners"
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench-runner-")
    server = None
    if args.api_url:
        api_url = args.api_url
    else:
        print("starting Prefect server ...", flush=True)
        server, api_url = start_prefect_server(os.path.join(tmp.name, "server-home"))
    # Settings are read when prefect is imported: set the environment first.
    os.environ["PREFECT_API_URL"] = api_url
    os.environ["PREFECT_HOME"] = os.path.join(tmp.name, "client-home")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        run(args, api_url)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        tmp.cleanup()


def run(args: argparse.Namespace, api_url: str) -> None:
    import logging

    import distributed
    from prefect import flow, task
    from prefect.futures import wait
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from dpipeline_prefect.runner import FastDaskTaskRunner

    @task
    def noop(x: int) -> int:
        return x

    def noop_fn(x: int) -> int:
        return x

    cluster = distributed.LocalCluster(
        n_workers=args.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": ":0"},  # not the fixed port 8787
        silence_logs=logging.WARNING,
    )
    address = cluster.scheduler_address
    raw_client = distributed.Client(address, set_as_default=False)

    def timed_raw(n: int) -> float:
        t0 = time.perf_counter()
        futures = raw_client.map(noop_fn, range(n), pure=False)
        results = raw_client.gather(futures)
        elapsed = time.perf_counter() - t0
        assert results == list(range(n))
        return elapsed

    def prefect_timer(runner):
        @flow(task_runner=runner, name="bench-noop", log_prints=False)
        def bench(n: int) -> float:
            t0 = time.perf_counter()
            futures = noop.map(range(n))
            wait(futures)
            results = [f.result() for f in futures]
            elapsed = time.perf_counter() - t0
            assert results == list(range(n)), results
            return elapsed

        return lambda n: bench(n)

    runners = {
        "raw": ("raw Dask client.map", timed_raw),
        "threads": (
            "Prefect ThreadPoolTaskRunner",
            prefect_timer(ThreadPoolTaskRunner(max_workers=args.workers)),
        ),
        "stock": ("prefect-dask DaskTaskRunner", prefect_timer(DaskTaskRunner(address=address))),
        "fast": ("FastDaskTaskRunner", prefect_timer(FastDaskTaskRunner(address=address))),
    }
    chosen = [k for k in args.only.split(",") if k]
    times: dict[str, dict[int, float]] = {k: {} for k in chosen}
    try:
        for name in chosen:
            print(f"warm-up {name} ...", flush=True)
            runners[name][1](4)
        for _ in range(args.repeat):
            for n in (args.small, args.large):
                for name in chosen:
                    t = runners[name][1](n)
                    times[name][n] = min(times[name].get(n, float("inf")), t)
                    print(f"  {name:8s} n={n:4d}: {t:7.3f} s", flush=True)
    finally:
        raw_client.close()
        cluster.close()

    span = args.large - args.small
    marginal = {k: (times[k][args.large] - times[k][args.small]) / span * 1000 for k in chosen}
    print()
    print(f"Prefect server {api_url}; Dask LocalCluster {args.workers} processes x 1 thread; "
          f"noop tasks; marginal = (t{args.large} - t{args.small}) / {span}")
    header = f"| {'runner':30s} | t{args.small} s | t{args.large} s | ms/task | x raw | x stock |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    def ratio(k: str, base: str) -> float:
        return marginal[k] / marginal[base] if marginal.get(base, 0) > 0 else float("nan")

    for k in chosen:
        ratio_raw, ratio_stock = ratio(k, "raw"), ratio(k, "stock")
        print(
            f"| {runners[k][0]:30s} | {times[k][args.small]:{len(str(args.small)) + 3}.2f} "
            f"| {times[k][args.large]:{len(str(args.large)) + 3}.2f} | {marginal[k]:7.1f} "
            f"| {ratio_raw:5.1f} | {ratio_stock:7.3f} |"
        )


if __name__ == "__main__":
    main()
