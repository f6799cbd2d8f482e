"""What client-side encryption (crypto.py) costs: checkpoint saves/loads and bulk AES-GCM.

    python benchmarks/bench_encryption.py [--saves 2000]

Prints, for local-disk checkpoints, the median of 3 rounds of N saves of a typical shard
document (plus one load per 10 saves) with and without a cipher, and AES-256-GCM
seal+open throughput on an 8 MiB buffer (a large dead-letter file). Not asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from dpipeline_prefect.checkpoint import CheckpointStore
from dpipeline_prefect.crypto import Cipher, aad, new_key, parse_key
from dpipeline_prefect.storage import Storage


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


if __name__ == "__main__":
    main()
