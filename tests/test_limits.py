"""Concurrency and rate limits (limits.py) on the real Prefect server.

* The ``limits`` config section: accepted shapes and clear errors.
* Server objects: created at run start when missing, updated when the configured value
  changed, left as they are otherwise; named per pipeline and resource.
* No limit configured: not one concurrency-limit API call (counted by wrapping the Prefect
  client's methods), and the same runs do overlap their writes and exceed the rate - the
  control that shows the checks below can fail.
* Sink concurrency 1 across two Dask worker processes: no two sink writes overlap in time
  (a ``spanlog://`` filesystem, preloaded into the test's Dask workers, records the start and
  end of every write with its pid); the output is exact.
* Sink rate: writes start at least ``1 / rate_per_s`` apart, so any 1 s window holds at most
  ``rate_per_s`` + 1 (Prefect's decay granularity; measured figures are printed).
* Two concurrent runs (different run keys, two processes) of one pipeline share the sink limit.
* ``limited(name)`` in a transform takes the run's slot for that resource.
* What a slot costs per write (ms), printed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from dpipeline_prefect import limits
from dpipeline_prefect.config import parse_config
from dpipeline_prefect.errors import ConfigError

from .pipeline_helpers import assert_exactly_once, flights, reference, write_parquet_files

CLEAN = "dpipeline_prefect.examples.flights:clean"
REPO = Path(__file__).resolve().parents[1]
BATCH = 1000


# --- a sink that records when each write starts and ends --------------------------------------
class SpanLogFileSystem(LocalFileSystem):
    """``spanlog:///path``: local disk whose ``pipe_file`` of ``part-*`` files takes at least
    ``delay`` seconds and appends ``pid start end path`` to ``span_log`` (storage options).

    One ``write`` of one short line on a file opened for appending: lines from several
    processes do not interleave.
    """

    protocol = ("spanlog",)

    def __init__(self, *args, span_log: str | None = None, delay: float = 0.0, **kwargs):
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)
        self.span_log = span_log
        self.delay = float(delay)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        if not os.path.basename(path).startswith("part-"):
            return super().pipe_file(path, value, mode=mode, **kwargs)
        t0 = time.time()
        if self.delay:
            time.sleep(self.delay)
        out = super().pipe_file(path, value, mode=mode, **kwargs)
        t1 = time.time()
        if self.span_log:
            with open(self.span_log, "a") as f:
                f.write(f"{os.getpid()} {t0:.6f} {t1:.6f} {path}\n")
        return out


fsspec.register_implementation("spanlog", SpanLogFileSystem, clobber=True)


def dask_setup(worker):  # noqa: ARG001 - Dask preload hook: importing this module is the setup
    fsspec.register_implementation("spanlog", SpanLogFileSystem, clobber=True)


def read_spans(log: Path) -> list[tuple[int, float, float, str]]:
    spans = []
    for line in log.read_text().splitlines():
        pid, t0, t1, path = line.split(" ", 3)
        spans.append((int(pid), float(t0), float(t1), path))
    return sorted(spans, key=lambda s: s[1])


def overlaps(spans) -> int:
    """Pairs of consecutive writes (by start) where the next started before the previous ended."""
    n, end = 0, float("-inf")
    for _, t0, t1, _ in spans:
        if t0 < end:
            n += 1
        end = max(end, t1)
    return n


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most of ``times`` inside any half-open window ``[t, t + window)``."""
    times, best, j = sorted(times), 0, 0
    for i, t in enumerate(times):
        while t - times[j] >= window:
            j += 1
        best = max(best, i - j + 1)
    return best


# --- config ---------------------------------------------------------------------------------
def _base(**over) -> dict:
    return {"name": "lim", "source": {"path": "x"}, "sink": {"path": "y"}, **over}


def test_limits_config_shapes_and_errors():
    cfg = parse_config(_base(limits={"sink": {"concurrency": 2, "rate_per_s": 2.5},
                                     "geo-api": {"rate_per_s": 20}}))
    assert cfg.limits["sink"].concurrency == 2 and cfg.limits["sink"].rate_per_s == 2.5
    assert cfg.limits["geo-api"].concurrency is None
    assert parse_config(_base()).limits == {}
    bad = {
        "limits.sink: set concurrency, rate_per_s or both": {"sink": {}},
        "limits.sink.concurrency": {"sink": {"concurrency": 0}},
        "limits.sink.rate_per_s": {"sink": {"rate_per_s": -1}},
        "unknown field; allowed here: concurrency, rate_per_s": {"sink": {"rate": 1}},
        "limit name 'geo api'": {"geo api": {"concurrency": 1}},
    }
    for want, limits_section in bad.items():
        with pytest.raises(ConfigError) as e:
            parse_config(_base(limits=limits_section))
        assert want in str(e.value), str(e.value)
    # limits are an operating knob: changing them must not invalidate a run's checkpoints
    assert parse_config(_base(limits={"sink": {"concurrency": 1}})).fingerprints() == \
        parse_config(_base()).fingerprints()


def test_limited_outside_a_run_or_for_an_unconfigured_resource_calls_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no API call expected")

    monkeypatch.setattr(limits._slots, "acquire", boom)
    monkeypatch.setattr(limits, "_take_rate", boom)
    with limits.limited("geo-api"):
        pass

    @limits.limited("geo-api")
    def f(x):
        return x + 1

    assert f(1) == 2
    lims = limits.run_limits(parse_config(_base(limits={"other": {"concurrency": 1}})))
    with limits.use_limits(lims):
        assert f(2) == 3  # geo-api has no limit in this pipeline
    assert lims.report() == {}


# --- server objects ---------------------------------------------------------------------------
def _read_limit(name: str):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


@pytest.mark.prefect
def test_limits_are_created_when_missing_and_updated_when_changed():
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    name = "lim-" + uuid.uuid4().hex[:8]
    cname, rname = limits.concurrency_limit_name(name, "sink"), limits.rate_limit_name(name, "sink")
    assert cname == f"dpipeline-limit:{name}:sink" and rname == f"dpipeline-rate:{name}:sink"
    with pytest.raises(ObjectNotFound):
        _read_limit(cname)

    cfg = parse_config(_base(name=name, limits={"sink": {"concurrency": 3, "rate_per_s": 2.5}}))
    assert limits.ensure_limits(cfg) == {cname: "created", rname: "created"}
    c, r = _read_limit(cname), _read_limit(rname)
    assert (c.limit, c.slot_decay_per_second, c.active) == (3, 0.0, True)
    assert (r.limit, r.slot_decay_per_second, r.active) == (1, 2.5, True)
    assert limits.ensure_limits(cfg) == {cname: "unchanged", rname: "unchanged"}

    changed = parse_config(_base(name=name, limits={"sink": {"concurrency": 5, "rate_per_s": 2.5}}))
    assert limits.ensure_limits(changed) == {cname: "updated", rname: "unchanged"}
    assert _read_limit(cname).limit == 5
    changed = parse_config(_base(name=name, limits={"sink": {"concurrency": 5, "rate_per_s": 7}}))
    assert limits.ensure_limits(changed) == {cname: "unchanged", rname: "updated"}
    assert _read_limit(rname).slot_decay_per_second == 7.0

    # someone deactivated it in the UI: reactivated (an inactive limit limits nothing)
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(cname, GlobalConcurrencyLimitUpdate(active=False))
    assert limits.ensure_limits(changed)[cname] == "updated" and _read_limit(cname).active

    # deleted during a run: the next slot recreates it instead of running unlimited
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(cname)
    lims = limits.run_limits(changed)
    with lims.slot("sink"):
        assert _read_limit(cname).active_slots == 1
    assert _read_limit(cname).active_slots == 0 and lims.report()["sink"]["slots"] == 1
    with get_client(sync_client=True) as client:
        for n in (cname, rname):
            client.delete_global_concurrency_limit_by_name(n)


@pytest.mark.prefect
def test_slot_cost_per_write_is_measured():
    """The price of a limit per sink write, uncontended (printed; bounded loosely)."""
    name = "cost-" + uuid.uuid4().hex[:8]
    cfg = parse_config(_base(name=name, limits={
        "c": {"concurrency": 4}, "r": {"rate_per_s": 1000}, "cr": {"concurrency": 4, "rate_per_s": 1000}}))
    limits.ensure_limits(cfg)
    lims = limits.run_limits(cfg)
    figures = {}
    for resource in ("none", "c", "r", "cr"):
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            with lims.slot(resource):
                pass
            times.append((time.perf_counter() - t0) * 1000)
        times = sorted(times[5:])  # the first ones open the client / start Prefect's service
        figures[resource] = (round(statistics.median(times), 2), round(times[int(len(times) * 0.9)], 2))
    print(f"\nlimit slot cost per write, ms (median, p90): none {figures['none']}, concurrency "
          f"{figures['c']}, rate {figures['r']}, both {figures['cr']}")
    assert figures["none"][0] < 0.1
    assert all(figures[r][0] < 200 for r in ("c", "r", "cr")), figures
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for r in ("c", "cr"):
            assert client.read_global_concurrency_limit_by_name(limits.concurrency_limit_name(name, r)).active_slots == 0
        for n in [limits.concurrency_limit_name(name, r) for r in ("c", "cr")] + \
                 [limits.rate_limit_name(name, r) for r in ("r", "cr")]:
            client.delete_global_concurrency_limit_by_name(n)


# --- runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    df = flights(16_000)
    folder = tmp_path_factory.mktemp("limits") / "in"
    write_parquet_files(df, folder, files=4, row_group_size=BATCH)  # 4 shards x 4 batches
    return folder, df


@pytest.fixture(scope="module")
def cluster():
    """Two Dask worker processes (two threads each) that know the spanlog:// filesystem."""
    distributed = pytest.importorskip("distributed")
    from dpipeline_prefect.cluster import local_cluster_kwargs

    kwargs = local_cluster_kwargs(2, threads_per_worker=2)
    kwargs["preload"] = [*kwargs["preload"], "tests.test_limits"]
    with distributed.LocalCluster(**kwargs) as c:
        yield c


def _cfg(tmp_path: Path, src: Path, log: Path, delay: float, **over) -> dict:
    cfg = {
        "name": "lim-" + uuid.uuid4().hex[:8],
        "source": {"format": "parquet", "path": str(src)},
        "batching": {"rows": BATCH},
        "transforms": [CLEAN],
        "sink": {"format": "parquet", "path": f"spanlog://{tmp_path / 'out'}",
                 "storage_options": {"span_log": str(log), "delay": delay}},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 4},
        "lock": {"enabled": False},
    }
    cfg.update(over)
    return cfg


_COUNTED = ("increment_concurrency_slots", "increment_concurrency_slots_with_lease",
            "release_concurrency_slots_with_lease", "renew_concurrency_lease",
            "create_global_concurrency_limit", "read_global_concurrency_limit_by_name",
            "update_global_concurrency_limit", "read_global_concurrency_limits")


@pytest.fixture
def limit_api_calls(monkeypatch):
    """Every call of the Prefect client's concurrency-limit methods in this process."""
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient

    calls: list[str] = []
    lock = threading.Lock()
    for cls in (PrefectClient, SyncPrefectClient):
        for meth in _COUNTED:
            orig = getattr(cls, meth)

            def wrapped(self, *a, __orig=orig, __name=meth, **k):
                with lock:
                    calls.append(__name)
                return __orig(self, *a, **k)

            monkeypatch.setattr(cls, meth, wrapped)
    return calls


@pytest.mark.prefect
def test_without_limits_no_api_call_and_writes_overlap(tmp_path, data, limit_api_calls):
    """The happy path costs nothing; and unlimited writes do overlap and bunch (the control
    for the two checks below). Then the same pipeline with a sink limit does call the API."""
    from dpipeline_prefect.pipeline import Pipeline

    src, df = data
    log = tmp_path / "spans.log"
    cfg = _cfg(tmp_path, src, log, delay=0.1)
    summary = Pipeline(cfg).run(run_key="free")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    assert limit_api_calls == [], limit_api_calls
    assert summary["limit_wait_s"] == 0.0 and summary["limits"] == {}
    spans = read_spans(log)
    assert len(spans) == len(df) // BATCH
    assert overlaps(spans) >= 3, spans
    assert max_in_window([s[1] for s in spans]) > 5
    from prefect import get_client

    with get_client(sync_client=True) as client:
        names = [lim.name for lim in client.read_global_concurrency_limits(limit=200)]
    assert not [n for n in names if cfg["name"] in n], names

    # the counter does see calls when a limit is configured
    tmp2 = tmp_path / "limited"
    tmp2.mkdir()
    cfg2 = _cfg(tmp2, src, tmp2 / "spans.log", delay=0.0, limits={"sink": {"concurrency": 2}})
    summary = Pipeline(cfg2).run(run_key="limited")
    assert summary["status"] == "completed"
    n_batches = len(df) // BATCH
    assert limit_api_calls.count("increment_concurrency_slots_with_lease") == n_batches
    assert limit_api_calls.count("release_concurrency_slots_with_lease") == n_batches
    assert summary["limits"]["sink"]["slots"] == n_batches
    assert summary["limits"]["sink"]["server"] == {limits.concurrency_limit_name(cfg2["name"], "sink"): "created"}
    _delete_limits(cfg2["name"], "sink")


def _delete_limits(pipeline: str, resource: str) -> None:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for n in (limits.concurrency_limit_name(pipeline, resource), limits.rate_limit_name(pipeline, resource)):
            try:
                client.delete_global_concurrency_limit_by_name(n)
            except ObjectNotFound:
                pass


@pytest.mark.prefect
def test_sink_concurrency_one_across_two_dask_worker_processes(tmp_path, data, cluster):
    from dpipeline_prefect.pipeline import Pipeline

    src, df = data
    log = tmp_path / "spans.log"
    cfg = _cfg(tmp_path, src, log, delay=0.1, limits={"sink": {"concurrency": 1}},
               runner={"kind": "dask", "address": cluster.scheduler_address})
    summary = Pipeline(cfg).run(run_key="c1")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    spans = read_spans(log)
    n_batches = len(df) // BATCH
    assert len(spans) == n_batches
    assert len({s[0] for s in spans}) == 2, "both worker processes wrote"
    assert overlaps(spans) == 0, spans
    assert summary["limits"]["sink"]["slots"] == n_batches
    # four shards at once and one writer: most of the time is queueing for the slot
    assert summary["limit_wait_s"] > 0.5, summary["limit_wait_s"]
    gaps = [b[1] - a[2] for a, b in zip(spans, spans[1:])]
    print(f"\nconcurrency 1, 2 processes: {n_batches} writes of >= 0.1 s in "
          f"{spans[-1][2] - spans[0][1]:.2f} s; gap between writes median "
          f"{statistics.median(gaps) * 1000:.0f} ms; time waiting for slots {summary['limit_wait_s']:.1f} s")
    _delete_limits(cfg["name"], "sink")


@pytest.mark.prefect
def test_sink_rate_spreads_writes(tmp_path, data, cluster):
    from dpipeline_prefect.pipeline import Pipeline

    src, df = data
    rate = 4.0
    log = tmp_path / "spans.log"
    cfg = _cfg(tmp_path, src, log, delay=0.0, limits={"sink": {"rate_per_s": rate}},
               runner={"kind": "dask", "address": cluster.scheduler_address})
    summary = Pipeline(cfg).run(run_key="r4")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    starts = [s[1] for s in read_spans(log)]
    n = len(starts)
    assert n == len(df) // BATCH and summary["limits"]["sink"]["slots"] == n
    worst = max_in_window(starts)
    took = starts[-1] - starts[0]
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    print(f"\nrate {rate}/s: {n} writes in {took:.2f} s = {(n - 1) / took:.2f}/s achieved; most in a 1 s "
          f"window {worst}; gaps min {min(gaps) * 1000:.0f} ms, median {statistics.median(gaps) * 1000:.0f} ms")
    # tokens are 1/rate apart on the server; the starts recorded by the client may come a
    # little closer (timing between the token and the write), hence + 1.
    assert worst <= rate + 1, (worst, starts)
    assert took >= (n - 1) / rate * 0.9, took  # spread over time, never faster than the rate
    assert took < (n - 1) / rate * 4, took  # and not starved either
    _delete_limits(cfg["name"], "sink")


_RUN_SCRIPT = """
import json, sys
import tests.test_limits  # registers spanlog://
from dpipeline_prefect.pipeline import Pipeline
cfg = json.loads(sys.argv[1])
print(json.dumps(Pipeline(cfg).run(run_key=sys.argv[2]), default=str))
"""


@pytest.mark.prefect
def test_two_concurrent_runs_share_the_sink_limit(tmp_path, data):
    """Two processes, two run keys, one pipeline: one writer at a time between them."""
    import json

    src, df = data
    log = tmp_path / "spans.log"
    cfg = _cfg(tmp_path, src, log, delay=0.1, limits={"sink": {"concurrency": 1}},
               runner={"kind": "threads", "workers": 2})
    cfg["sink"]["path"] = f"spanlog://{tmp_path / 'out'}" + "/{run_key}"
    procs = [subprocess.Popen([sys.executable, "-c", _RUN_SCRIPT, json.dumps(cfg), key], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key in ("day-a", "day-b")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(s["status"] == "completed" for s in summaries)
    for key in ("day-a", "day-b"):
        assert_exactly_once(str(tmp_path / "out" / key), reference(df))
    spans = read_spans(log)
    assert len(spans) == 2 * (len(df) // BATCH)
    assert len({s[0] for s in spans}) == 2
    assert overlaps(spans) == 0, spans
    # the runs did run at the same time: their writes interleave
    pids = [s[0] for s in spans]
    assert sum(a != b for a, b in zip(pids, pids[1:])) >= 3, pids
    _delete_limits(cfg["name"], "sink")


# a transform limiting its own calls ---------------------------------------------------------
_geo_calls: list[tuple[float, float]] = []
_geo_lock = threading.Lock()


@limits.limited("geo-api")
def _geo_lookup(n: int) -> None:
    t0 = time.time()
    time.sleep(0.05)
    with _geo_lock:
        _geo_calls.append((t0, time.time()))


def enrich(df):
    """A transform calling a 'remote service' once per batch, under the geo-api limit."""
    _geo_lookup(len(df))
    return df


@pytest.mark.prefect
def test_limited_in_a_transform_uses_the_run_limit(tmp_path, data):
    from dpipeline_prefect.pipeline import Pipeline

    src, df = data
    _geo_calls.clear()
    cfg = _cfg(tmp_path, src, tmp_path / "spans.log", delay=0.0,
               transforms=["tests.test_limits:enrich", CLEAN],
               limits={"geo-api": {"concurrency": 1}})
    summary = Pipeline(cfg).run(run_key="geo")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    n_batches = len(df) // BATCH
    assert len(_geo_calls) == n_batches
    spans = sorted(_geo_calls)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "geo-api calls overlapped"
    assert summary["limits"]["geo-api"]["slots"] == n_batches
    assert "sink" not in summary["limits"]
    _delete_limits(cfg["name"], "geo-api")
