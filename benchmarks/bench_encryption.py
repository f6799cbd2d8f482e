"""What client-side encryption (crypto.py) costs: checkpoint saves/loads and bulk AES-GCM.

    python benchmarks/bench_encryption.py [--saves 2000]

Prints, for local-disk checkpoints, the median of 3 rounds of N saves of a typical shard
document (plus one load per 10 saves) with and without a cipher, and AES-256-GCM
seal+open throughput on an 8 MiB buffer (a large dead-letter file), and the shuffle of keyed
sharding (``shuffle.py``): one map task over the flights sample (8 hash shards) plus reading
back every staged file, plain vs sealed. Not asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from dpipeline_prefect.checkpoint import CheckpointStore
from dpipeline_prefect.config import ShardingConfig
from dpipeline_prefect.crypto import Cipher, aad, new_key, parse_key
from dpipeline_prefect.storage import Storage


def _shuffle_round(d: str, seal, src: str, plan) -> tuple[float, float, int, int]:
    from dpipeline_prefect.sharding import Sharder
    from dpipeline_prefect.shuffle import read_staged, run_map, staged_path

    work = Storage(os.path.join(d, f"w{time.monotonic_ns()}"))
    t0 = time.perf_counter()
    res = run_map(0, plan.files[0], Storage(src), "parquet", plan.schema,
                  Sharder(ShardingConfig(strategy="hash", key="carrier", shards=8)), work, seal=seal)
    t1 = time.perf_counter()
    rows = sum(b.num_rows for sid in res.outputs
               for b in read_staged(work, staged_path(work, sid, 0), 0, seal))
    assert rows == res.rows_in
    return t1 - t0, time.perf_counter() - t1, rows, sum(res.sizes.values())


def _shuffle(cipher: Cipher) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpipeline_prefect.config import SourceConfig
    from dpipeline_prefect.examples.flights import load_flights
    from dpipeline_prefect.shuffle import StageSeal
    from dpipeline_prefect.sources import plan_source

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "in")
        os.makedirs(src)
        pq.write_table(pa.Table.from_pandas(load_flights(), preserve_index=False),
                       os.path.join(src, "f.parquet"))
        plan = plan_source(SourceConfig(path=src))
        res: dict[str, list] = {"plain": [], "sealed": []}
        for _ in range(3):
            res["plain"].append(_shuffle_round(d, None, src, plan))
            res["sealed"].append(_shuffle_round(d, StageSeal(cipher, "bench", "r"), src, plan))
    for k, v in res.items():
        m = statistics.median(x[0] for x in v)
        r = statistics.median(x[1] for x in v)
        print(f"shuffle {k:6s}: map {m * 1e3:7.1f} ms, read back {r * 1e3:7.1f} ms "
              f"({v[0][2]} rows, {v[0][3] / 2**20:.1f} MiB staged, median of 3)")


def _round(root: str, cipher: Cipher | None, saves: int) -> float:
    store = CheckpointStore(Storage(root), "bench", f"r{time.monotonic_ns()}", cipher=cipher)
    doc = {"next_seq": 0, "offset": 0, "rows_in": 0, "rows_out": 0, "bytes_written": 0,
           "rows_dead_letter": 0, "done": False}
    t0 = time.perf_counter()
    for i in range(saves):
        doc.update(next_seq=i, offset=i * 100_000, rows_in=i * 100_000, rows_out=i * 99_000)
        store.save_shard("f00001", doc)
        if i % 10 == 0:
            store.load_shard("f00001")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saves", type=int, default=2000)
    args = ap.parse_args()
    cipher = Cipher(parse_key(new_key(), "bench"))
    with tempfile.TemporaryDirectory() as d:
        res = {"plain": [], "encrypted": []}
        for _ in range(3):
            res["plain"].append(_round(os.path.join(d, "p"), None, args.saves))
            res["encrypted"].append(_round(os.path.join(d, "e"), cipher, args.saves))
    for k, v in res.items():
        med = statistics.median(v)
        print(f"checkpoints {k:9s}: {med / args.saves * 1e6:7.1f} us per save (+1 load per 10); "
              f"rounds {', '.join(f'{x:.2f}' for x in v)} s")
    cost = statistics.median(res["encrypted"]) / statistics.median(res["plain"]) - 1
    print(f"checkpoint cost of encryption: {cost:+.1%}")
    buf = os.urandom(8 * 1024 * 1024)
    a = aad(what="bench")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        cipher.decrypt(cipher.encrypt(buf, a), a, "bench")
        times.append(time.perf_counter() - t0)
    print(f"AES-256-GCM seal+open of 8 MiB: {statistics.median(times) * 1e3:.1f} ms "
          f"({8 / statistics.median(times):.0f} MiB/s)")
    _shuffle(cipher)


if __name__ == "__main__":
    main()
