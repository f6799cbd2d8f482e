"""Least privilege: each storage of a pipeline uses its own SeaweedFS identity.

The source identity may only read and list the input bucket; the sink's and the checkpoint's
identities may only touch their own bucket. The pipeline runs with exactly those. An identity
lacking a permission it needs fails the run with one terminal error naming the storage, the
operation and whose credentials to check, and nothing reaches the sink.
"""

from __future__ import annotations

import uuid

import pytest

from dpipeline_prefect.devservices import SeaweedFS
from dpipeline_prefect.errors import StoragePermissionError
from dpipeline_prefect.pipeline import Pipeline
from dpipeline_prefect.storage import Storage

from .pipeline_helpers import assert_exactly_once, flights, reference, write_parquet_files

pytestmark = [pytest.mark.s3, pytest.mark.prefect]

IDENTITIES = {
    "reader": ["Read:raw", "List:raw"],
    "lister": ["List:raw"],  # may list the input but not read it
    "writer": ["Read:out", "Write:out", "List:out"],
    "out_readonly": ["Read:out", "List:out"],
    "ckpt": ["Read:ckpt", "Write:ckpt", "List:ckpt"],
}


@pytest.fixture(scope="module")
def lp(tmp_path_factory):
    """A private SeaweedFS with one identity per role, the input uploaded by the admin identity."""
    idents = [SeaweedFS.make_identity(n, a) for n, a in IDENTITIES.items()]
    srv = SeaweedFS(tmp_path_factory.mktemp("lp") / "weed", buckets=("raw", "out", "ckpt"), identities=idents)
    srv.start()
    try:
        df = flights(6000)
        folder = tmp_path_factory.mktemp("lp-in")
        write_parquet_files(df, folder, files=2)
        admin = Storage("s3://raw/in/", srv.storage_options())
        for f in sorted(folder.iterdir()):
            admin.write_bytes(admin.path(f.name), f.read_bytes())
        yield srv, df
    finally:
        srv.stop(kill=True)


def _env_refs(monkeypatch, srv: SeaweedFS, role: str, identity: str) -> dict:
    """storage_options naming the identity's credentials by ${VAR} (kept out of flow parameters)."""
    so = srv.storage_options(identity)
    monkeypatch.setenv(f"LP_{role.upper()}_KEY", so["key"])
    monkeypatch.setenv(f"LP_{role.upper()}_SECRET", so["secret"])
    return {"key": f"${{LP_{role.upper()}_KEY}}", "secret": f"${{LP_{role.upper()}_SECRET}}",
            "client_kwargs": so["client_kwargs"]}


def _cfg(monkeypatch, srv, source: str, sink: str, ckpt: str) -> tuple[dict, str]:
    prefix = "lp-" + uuid.uuid4().hex[:8]
    return {
        "name": prefix,
        "source": {"path": "s3://raw/in/", "storage_options": _env_refs(monkeypatch, srv, "source", source)},
        "batching": {"rows": 1000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"path": f"s3://out/{prefix}/{{run_key}}", "storage_options": _env_refs(monkeypatch, srv, "sink", sink)},
        "checkpoint": {"path": f"s3://ckpt/{prefix}/", "storage_options": _env_refs(monkeypatch, srv, "ckpt", ckpt)},
        "runner": {"kind": "threads"},
    }, prefix


def _sink_objects(srv: SeaweedFS, prefix: str) -> list[str]:
    return Storage(f"s3://out/{prefix}", srv.storage_options()).find(f"out/{prefix}")


def test_the_identities_really_are_scoped(lp):
    srv, _ = lp
    reader = Storage("s3://raw/in/", srv.storage_options("reader"))
    assert reader.find(reader.root)  # may list and read the input
    with pytest.raises(StoragePermissionError, match="for write"):
        reader.write_bytes(reader.path("x"), b"no")
    with pytest.raises(StoragePermissionError):
        Storage("s3://out/x", srv.storage_options("reader")).write_bytes("out/x/y", b"no")


def test_pipeline_runs_with_a_read_only_source_identity(lp, monkeypatch):
    srv, df = lp
    cfg, prefix = _cfg(monkeypatch, srv, source="reader", sink="writer", ckpt="ckpt")
    summary = Pipeline(cfg).run(run_key="r1")
    assert summary["status"] == "completed" and summary["rows_in"] == len(df)
    assert_exactly_once(f"s3://out/{prefix}/r1", reference(df), storage_options=srv.storage_options())


@pytest.mark.parametrize("case", ["sink_cannot_write", "source_cannot_read"])
def test_a_missing_permission_fails_clearly_and_writes_nothing(lp, monkeypatch, case):
    srv, _ = lp
    if case == "sink_cannot_write":
        cfg, prefix = _cfg(monkeypatch, srv, source="reader", sink="out_readonly", ckpt="ckpt")
        want = ("sink ", "for write", "sink.storage_options credentials")
    else:
        cfg, prefix = _cfg(monkeypatch, srv, source="lister", sink="writer", ckpt="ckpt")
        want = ("source ", "for read", "source.storage_options credentials")
    with pytest.raises(StoragePermissionError) as ei:
        Pipeline(cfg).run(run_key="r1")
    msg = str(ei.value)
    for w in want:
        assert w in msg, msg
    for ident in srv.identities:
        assert ident["credentials"][0]["secretKey"] not in msg
    assert _sink_objects(srv, prefix) == []
