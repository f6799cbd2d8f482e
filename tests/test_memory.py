"""Bounded memory: a shard streams its input; peak RSS grows with max_bytes, not with the input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dpipeline_prefect.examples.flights import make_dataset

MiB = 1 << 20

SCRIPT = textwrap.dedent("""
    import json, sys
    import psutil
    from dpipeline_prefect.config import parse_config
    from dpipeline_prefect.shard import RunContext, ShardSpec, process_shard
    from dpipeline_prefect.sources import plan_source, schema_to_b64

    src, out, ck, max_bytes = sys.argv[1:5]
    cfg = parse_config({"name": "mem", "source": {"path": src}, "sink": {"path": out},
                        "checkpoint": {"path": ck},
                        "batching": {"rows": 100_000_000, "max_bytes": int(max_bytes)},
                        "transforms": ["dpipeline_prefect.examples.flights:clean"]})
    plan = plan_source(cfg.source)
    spec = ShardSpec("f00000", "one", False, [f.to_dict() for f in plan.files], plan.files[0].rows)
    ctx = RunContext(cfg, "r", schema_to_b64(plan.schema), ck + "/work")
    before = psutil.Process().memory_info().rss
    r = process_shard(ctx, spec)
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's (pytest's) size
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"over": peak - before, "rows": r.rows_in, "batches": r.batches}))
""")


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("big")
    make_dataset(d, repeat=3, files=1, row_group_size=20_000)  # 1,010,328 rows, ~200 MB as Arrow
    return d


def _peak_over_baseline(tmp_path, src, max_bytes: int) -> dict:
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(tmp_path / f"out{max_bytes}"),
                        str(tmp_path / f"ck{max_bytes}"), str(max_bytes)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_peak_rss_is_bounded_by_max_bytes_not_input_size(tmp_path, big_file):
    small = _peak_over_baseline(tmp_path, big_file, 8 * MiB)
    assert small["rows"] == 1_010_328 and small["batches"] >= 20
    # fixed cost of the libraries' first use plus a few copies of one batch
    assert small["over"] < 128 * MiB + 6 * 8 * MiB, small["over"] / MiB
    # the same shard with batches of the whole file needs far more: the bound above is real
    whole = _peak_over_baseline(tmp_path, big_file, 4096 * MiB)
    assert whole["batches"] == 1
    assert whole["over"] > 2 * small["over"], (whole["over"] / MiB, small["over"] / MiB)
