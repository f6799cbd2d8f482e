"""Retries: the policy module, error classification at the storage boundary, and runs with a
flaky sink on the real Prefect server.

The flaky sink is a real local filesystem behind an fsspec protocol (``flaky://``) registered
only here, whose ``pipe_file`` fails on chosen attempts: the pipeline, its Storage and its
Sink run unchanged, and the errors go through the same translation as S3 errors would.
"""

from __future__ import annotations

import asyncio
import errno
import random
import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest

from dpipeline_prefect.config import parse_config
from dpipeline_prefect.errors import (
    ConfigError,
    StoragePermissionError,
    StorageUnavailableError,
    TransformError,
)
from dpipeline_prefect.retry import (
    RetryPolicy,
    backoff_schedule,
    call_with_retry,
    is_transient,
    jittered,
    prefect_task_options,
    retry_condition,
)
from dpipeline_prefect.storage import translate_errors

from .pipeline_helpers import assert_exactly_once, flights, reference, write_parquet_files

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


# -- policy ------------------------------------------------------------------------------------

def test_schedule_is_exponential_and_capped():
    assert backoff_schedule(RetryPolicy()) == [1.0, 2.0, 4.0]
    assert backoff_schedule(RetryPolicy(6, 1.0, 5.0, 3.0, 0.0)) == [1.0, 3.0, 5.0, 5.0, 5.0]
    assert backoff_schedule(RetryPolicy(max_attempts=1)) == []


def test_jitter_stays_within_its_fraction_and_under_the_cap():
    p = RetryPolicy(5, 1.0, 10.0, 2.0, 0.2)
    rng = random.Random(7)
    draws = [jittered(8.0, p, rng) for _ in range(2000)]
    assert min(draws) >= 8.0 * 0.8 and max(draws) <= 8.0 * 1.2
    assert max(draws) > 8.0 * 1.15 and min(draws) < 8.0 * 0.85  # it does vary
    capped = [jittered(10.0, p, rng) for _ in range(500)]
    assert max(capped) <= 10.0
    assert jittered(3.0, RetryPolicy(jitter=0.0)) == 3.0


def test_invalid_policies_are_refused():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay_s=5, max_delay_s=1)
    with pytest.raises(ConfigError) as e:
        parse_config({"name": "a", "source": {"path": "x"}, "sink": {"path": "y"},
                      "retry": {"max_attempts": 0, "jitter": 2}})
    assert "retry.max_attempts" in str(e.value) and "retry.jitter" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"name": "a", "source": {"path": "x"}, "sink": {"path": "y"}, "lock": {"lease_s": 10}})
    assert "lock.lease_s" in str(e.value)
    cfg = parse_config({"name": "a", "source": {"path": "x"}, "sink": {"path": "y"}})
    assert (cfg.retry.max_attempts, cfg.retry.base_delay_s, cfg.retry.max_delay_s) == (4, 1.0, 30.0)


class _Flaky:
    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_errors_are_retried_with_the_schedule_and_no_real_wait():
    slept, seen = [], []
    fn = _Flaky([StorageUnavailableError("down"), ConnectionResetError("reset")])
    p = RetryPolicy(4, 0.5, 30.0, 3.0, 0.0)
    out = call_with_retry(fn, p, sleep=slept.append, on_retry=lambda a, e, d: seen.append((a, type(e).__name__, d)))
    assert out == "ok" and fn.calls == 3
    assert slept == [0.5, 1.5]
    assert seen == [(1, "StorageUnavailableError", 0.5), (2, "ConnectionResetError", 1.5)]


def test_terminal_errors_are_raised_at_once():
    for err in (StoragePermissionError("denied"), TransformError("bug"), ValueError("user bug"), KeyError("k")):
        slept = []
        fn = _Flaky([err])
        with pytest.raises(type(err)):
            call_with_retry(fn, RetryPolicy(5, 0.1), sleep=slept.append)
        assert fn.calls == 1 and slept == []


def test_attempts_are_bounded_and_the_last_error_is_raised():
    slept = []
    errs = [StorageUnavailableError(f"down {i}") for i in range(10)]
    fn = _Flaky(errs)
    with pytest.raises(StorageUnavailableError, match="down 2"):
        call_with_retry(fn, RetryPolicy(3, 1.0, 1.5, 2.0, 0.0), sleep=slept.append)
    assert fn.calls == 3 and slept == [1.0, 1.5]


def test_is_transient_knows_lost_workers_and_network_errors():
    KilledWorker = type("KilledWorker", (Exception,), {})
    assert is_transient(KilledWorker()) and is_transient(TimeoutError()) and is_transient(ConnectionRefusedError())
    assert not is_transient(RuntimeError("x")) and not is_transient(StoragePermissionError("x"))


def test_prefect_task_options_follow_the_policy():
    from prefect.states import Completed, Failed

    opts = prefect_task_options(RetryPolicy(5, 2.0, 12.0, 2.0, 0.2))
    assert opts["retries"] == 4
    assert opts["retry_delay_seconds"] == [2.0, 4.0, 8.0, 10.0]  # capped at 12 / 1.2
    assert opts["retry_jitter_factor"] == 0.2
    cond = opts["retry_condition_fn"]
    assert cond is retry_condition
    assert cond(None, None, Failed(data=StorageUnavailableError("down"))) is True
    assert cond(None, None, Failed(data=StoragePermissionError("no"))) is False
    assert cond(None, None, Failed(data=ValueError("bug"))) is False
    assert cond(None, None, Completed(data=1)) is False
    assert prefect_task_options(RetryPolicy(max_attempts=1))["retries"] == 0


# -- classification at the storage boundary, with real client exception objects ----------------

def _client_error(code: str, status: int, message: str = "msg", op: str = "PutObject"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _translated(exc: BaseException):
    with pytest.raises(Exception) as info:
        with translate_errors("bucket/key.parquet"):
            raise exc
    return info.value


def _through_s3fs(exc: BaseException) -> BaseException:
    """What s3fs actually raises for a botocore ClientError: an OSError raised *from* it."""
    from s3fs.errors import translate_boto_error

    try:
        try:
            raise exc
        except Exception as e:
            raise translate_boto_error(e) from e
    except Exception as outer:  # noqa: BLE001
        return outer


@pytest.mark.parametrize("code,status", [
    ("SlowDown", 503), ("ServiceUnavailable", 503), ("InternalError", 500), ("RequestTimeout", 400),
    ("ThrottlingException", 400), ("SomethingNew", 502),
])
def test_s3_5xx_and_slowdown_are_transient(code, status):
    for raw in (_client_error(code, status, f"please slow down {SECRET}"),
                _through_s3fs(_client_error(code, status, f"please slow down {SECRET}"))):
        err = _translated(raw)
        assert isinstance(err, StorageUnavailableError), (code, type(raw), err)
        assert err.transient and is_transient(err)
        assert "bucket/key.parquet" in str(err) and SECRET not in str(err)


@pytest.mark.parametrize("code,status", [("AccessDenied", 403), ("SignatureDoesNotMatch", 403),
                                         ("InvalidAccessKeyId", 403), ("ExpiredToken", 400)])
def test_permission_denied_is_terminal(code, status):
    for raw in (_client_error(code, status, f"The key {SECRET} is wrong"),
                _through_s3fs(_client_error(code, status, f"The key {SECRET} is wrong"))):
        err = _translated(raw)
        assert isinstance(err, StoragePermissionError), (code, err)
        assert not is_transient(err)
        assert "access denied" in str(err) and SECRET not in str(err)


def test_botocore_network_errors_are_transient():
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    url = f"http://{SECRET}@127.0.0.1:1"
    for raw in (EndpointConnectionError(endpoint_url=url), ConnectTimeoutError(endpoint_url=url),
                ReadTimeoutError(endpoint_url=url), ConnectionClosedError(endpoint_url=url)):
        err = _translated(raw)
        assert isinstance(err, StorageUnavailableError), (type(raw), err)
        assert SECRET not in str(err)


def test_aiohttp_and_socket_errors_are_transient():
    import aiohttp

    raws = [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(errno.ECONNRESET, f"Connection reset by peer {SECRET}"),
        aiohttp.ServerTimeoutError(f"Timeout on reading data from socket {SECRET}"),
        asyncio.TimeoutError(),
        OSError(errno.ETIMEDOUT, "timed out"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    ]
    for raw in raws:
        err = _translated(raw)
        assert isinstance(err, StorageUnavailableError), (type(raw), err)
        assert SECRET not in str(err)


def test_other_errors_are_not_made_transient():
    assert isinstance(_translated(ValueError("bad value")), ValueError)
    assert isinstance(_translated(FileNotFoundError("gone")), FileNotFoundError)
    assert isinstance(_translated(_client_error("NoSuchBucket", 404)), type(_client_error("x", 1)))


# -- real runs on the Prefect server with a flaky sink -----------------------------------------

class _Faults:
    """Shared fault plan of the flaky:// filesystem (the runs here use the thread runner)."""

    lock = threading.Lock()
    attempts: Counter = Counter()
    fail = staticmethod(lambda path, n: None)  # -> exception to raise on attempt n of path, or None


def _flaky_fs_class():
    from fsspec.implementations.local import LocalFileSystem

    class FlakyFS(LocalFileSystem):
        protocol = ("flaky",)

        def __init__(self, *args, **kwargs):
            super().__init__(auto_mkdir=True)

        @classmethod
        def _strip_protocol(cls, path):
            if isinstance(path, str) and path.startswith("flaky://"):
                path = path[len("flaky://"):]
            return LocalFileSystem._strip_protocol(path)

        def unstrip_protocol(self, name):
            return "flaky://" + name

        def pipe_file(self, path, value, mode="overwrite", **kwargs):
            if path.rsplit("/", 1)[-1].startswith("part-"):
                with _Faults.lock:
                    _Faults.attempts[path] += 1
                    n = _Faults.attempts[path]
                exc = _Faults.fail(path, n)
                if exc is not None:
                    raise exc
            return super().pipe_file(path, value, mode=mode, **kwargs)

    return FlakyFS


@pytest.fixture
def flaky():
    import fsspec

    fsspec.register_implementation("flaky", _flaky_fs_class(), clobber=True)
    _Faults.attempts.clear()
    yield _Faults
    _Faults.fail = staticmethod(lambda path, n: None)
    _Faults.attempts.clear()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    df = flights(24_000)
    folder = tmp_path_factory.mktemp("retry") / "in"
    write_parquet_files(df, folder, files=3, row_group_size=2000)
    return folder, df


def _cfg(tmp_path: Path, src: Path, **over) -> dict:
    cfg = {
        "name": "r-" + uuid.uuid4().hex[:8],
        "source": {"path": str(src)},
        "batching": {"rows": 3000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"path": f"flaky://{tmp_path / 'out'}"},
        "checkpoint": {"path": str(tmp_path / "ckpt")},
        "runner": {"kind": "threads", "workers": 2},
        "retry": {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05, "jitter": 0.1},
        "lock": {"wait_s": 0},
    }
    cfg.update(over)
    return cfg


@pytest.mark.prefect
def test_transient_sink_failures_are_retried_per_batch(tmp_path, small, flaky):
    """Every output file fails on its first attempt: each batch is retried, no shard restarts."""
    from dpipeline_prefect.pipeline import Pipeline

    src, df = small
    flaky.fail = staticmethod(lambda path, n: ConnectionResetError(errno.ECONNRESET, "reset") if n == 1 else None)
    # half of all writes fail here: the circuit breaker (tested in test_breaker.py) would open;
    # this test is about the retry count, so it runs without one
    summary = Pipeline(_cfg(tmp_path, src, breaker={"enabled": False})).run(run_key="t1")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    files = list((tmp_path / "out").glob("part-*.parquet"))
    batches = sum(s["batches"] for s in summary["shards"])
    assert len(files) == batches == 9  # 3 files of 8000 rows, batches of 3000
    # one failed attempt per file, and every retry counted in the summary
    assert all(n == 2 for n in flaky.attempts.values()) and len(flaky.attempts) == batches
    assert summary["retries"] == batches
    assert summary["batches_reprocessed"] == 0


@pytest.mark.prefect
def test_exhausted_batch_retries_hand_over_to_a_prefect_task_retry(tmp_path, small, flaky):
    """A sink down longer than the in-shard attempts: Prefect re-runs the shard task, which
    resumes after its last checkpointed batch; the output is still exact."""
    from prefect.client.orchestration import get_client

    from dpipeline_prefect.pipeline import Pipeline

    src, df = small
    # the second batch of one shard fails 3 times: 2 in-shard attempts, then a task retry
    flaky.fail = staticmethod(
        lambda path, n: StorageUnavailableError("down") if "-000001." in path and "f00001" in path and n <= 3 else None)
    cfg = _cfg(tmp_path, src, retry={"max_attempts": 2, "base_delay_s": 0.01, "max_delay_s": 0.05, "jitter": 0})
    summary = Pipeline(cfg).run(run_key="t2")
    assert summary["status"] == "completed"
    assert_exactly_once(str(tmp_path / "out"), reference(df))
    hit = [p for p in flaky.attempts if "f00001" in p and "-000001." in p]
    assert len(hit) == 1 and flaky.attempts[hit[0]] == 4
    # the retried shard did not redo its first batch: one attempt for it
    first = [p for p in flaky.attempts if "f00001" in p and "-000000." in p]
    assert flaky.attempts[first[0]] == 1
    # counted: 1 in-shard retry of the successful task attempt + 1 Prefect task retry
    assert summary["retries"] == 2
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[summary["flow_run_id"]])))
    counts = {r.name: r.run_count for r in runs if r.name.startswith("shard-")}
    assert sorted(counts.values()) == [1, 1, 2], counts


@pytest.mark.prefect
def test_terminal_sink_error_is_not_retried(tmp_path, small, flaky):
    from dpipeline_prefect.pipeline import Pipeline

    src, _ = small
    flaky.fail = staticmethod(lambda path, n: PermissionError(errno.EACCES, f"denied {SECRET}"))
    with pytest.raises(StoragePermissionError) as e:
        Pipeline(_cfg(tmp_path, src, retry={"max_attempts": 4, "base_delay_s": 0.01})).run(run_key="t3")
    assert "access denied" in str(e.value) and SECRET not in str(e.value)
    assert flaky.attempts and all(n == 1 for n in flaky.attempts.values()), flaky.attempts


def test_open_breaker_refusals_wait_without_using_attempts():
    from dpipeline_prefect.breaker import BreakerOpenError
    from dpipeline_prefect.retry import BREAKER_WAIT_BUDGET_S

    calls, slept = [], []

    def fn():
        calls.append(1)
        if len(calls) <= 5:
            raise BreakerOpenError("open", resource="sink", retry_after_s=2.0)
        return "ok"

    policy = RetryPolicy(max_attempts=2, base_delay_s=1.0, max_delay_s=4.0, multiplier=2.0, jitter=0.0)
    assert call_with_retry(fn, policy, sleep=slept.append) == "ok"
    assert slept == [2.0] * 5  # waited as the breaker asked, and 5 refusals used no attempt

    # but not forever: past the budget the refusal is raised like any transient error
    def always_open():
        raise BreakerOpenError("open", resource="sink", retry_after_s=100.0)

    slept.clear()
    with pytest.raises(BreakerOpenError):
        call_with_retry(always_open, policy, sleep=slept.append)
    assert sum(slept) >= BREAKER_WAIT_BUDGET_S
