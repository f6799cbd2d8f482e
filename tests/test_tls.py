"""S3 over TLS: SeaweedFS serving https with a certificate this module makes.

A pipeline reads, writes and checkpoints over https trusting the test CA; a CA that did not
sign the certificate (or none: the system store) gives one terminal error naming the endpoint
and "certificate verify failed" within seconds; ``verify: false`` is refused unless
``tls.insecure`` says so, and then every open warns.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

import pytest

from dpipeline_prefect.config import parse_config
from dpipeline_prefect.devservices import SeaweedFS
from dpipeline_prefect.errors import ConfigError, StorageTLSError
from dpipeline_prefect.pipeline import Pipeline
from dpipeline_prefect.storage import Storage
from dpipeline_prefect.tls import make_certificates

from .pipeline_helpers import assert_exactly_once, flights, reference, run_cli, write_parquet_files, write_yaml

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory):
    srv = SeaweedFS(tmp_path_factory.mktemp("tls") / "weed", buckets=("raw", "out", "ckpt"), tls=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(kill=True)


def _https(srv: SeaweedFS, **tls) -> dict:
    so = srv.storage_options(https=True)
    if tls:
        so["tls"] = tls
    return so


def test_https_endpoint_works_with_the_ca_bundle(tls_s3):
    assert tls_s3.https_endpoint_url.startswith("https://127.0.0.1:")
    st = Storage(f"s3://ckpt/tls-{uuid.uuid4().hex[:8]}", _https(tls_s3))
    st.write_bytes(st.path("a"), b"over tls")
    assert st.read_bytes(st.path("a")) == b"over tls"


@pytest.mark.parametrize("trust", ["other_ca", "system_store"])
def test_a_wrong_ca_fails_fast_with_one_clear_terminal_error(tls_s3, tmp_path, trust):
    if trust == "other_ca":
        so = _https(tls_s3, ca_bundle=str(make_certificates(tmp_path / "other")["ca"]))
    else:
        so = {k: v for k, v in _https(tls_s3).items() if k != "tls"}
    t0 = time.monotonic()
    with pytest.raises(StorageTLSError) as ei:
        Storage(f"s3://ckpt/tls-{uuid.uuid4().hex[:8]}", so).probe()
    took = time.monotonic() - t0
    msg = str(ei.value)
    assert "certificate verify failed" in msg and tls_s3.https_endpoint_url in msg, msg
    assert "tls.ca_bundle" in msg
    assert tls_s3.secret not in msg and tls_s3.key not in msg
    assert not ei.value.transient
    assert took < 60, f"took {took:.1f} s"  # s3fs/botocore retry internally; never a hang


def test_verify_false_is_refused_unless_insecure_is_asked_for(tls_s3, caplog):
    bare = {**{k: v for k, v in _https(tls_s3).items() if k != "tls"},
            "client_kwargs": {"endpoint_url": tls_s3.https_endpoint_url, "verify": False}}
    with pytest.raises(ConfigError, match="verify: false turns TLS certificate checks off; refused"):
        Storage("s3://ckpt/x", bare)
    with pytest.raises(ConfigError) as ei:
        parse_config({"name": "p", "source": {"path": "s3://raw/x", "storage_options": bare},
                      "sink": {"path": "s3://out/x"}})
    assert "source.storage_options" in str(ei.value) and "tls.insecure: true" in str(ei.value)
    insecure = {k: v for k, v in bare.items()}
    insecure["client_kwargs"] = {"endpoint_url": tls_s3.https_endpoint_url}
    insecure["tls"] = {"insecure": True}
    with caplog.at_level(logging.WARNING, logger="dpipeline_prefect.tls"):
        st = Storage(f"s3://ckpt/insecure-{uuid.uuid4().hex[:8]}", insecure)
        st.probe()
    assert "TLS certificate verification is OFF for s3://ckpt/insecure-" in caplog.text


def test_bad_tls_entries_are_named(tmp_path):
    base = {"name": "p", "source": {"path": "x"}, "sink": {"path": "y"}}
    cases = [
        ({"tls": {"ca_bundle": "a", "insecure": True}}, "give ca_bundle or insecure, not both"),
        ({"tls": {"cafile": "a"}}, "tls.cafile: unknown field"),
        ({"tls": "yes"}, "tls must be a mapping"),
    ]
    for so, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            parse_config({**base, "checkpoint": {"path": "s3://c/", "storage_options": so}})
    with pytest.raises(ConfigError, match="does not exist"):
        Storage("s3://ckpt/x", {"tls": {"ca_bundle": str(tmp_path / "missing.pem")}})
    with pytest.raises(ConfigError, match="applies to s3:// storage"):
        Storage(str(tmp_path), {"tls": {"ca_bundle": str(tmp_path / "missing.pem")}})


@pytest.mark.prefect
def test_a_pipeline_runs_entirely_over_https(tls_s3, tmp_path, monkeypatch):
    df = flights(6000)
    write_parquet_files(df, tmp_path / "in", files=2)
    st = Storage("s3://raw/", _https(tls_s3))
    prefix = f"tls-{uuid.uuid4().hex[:8]}"
    for f in sorted((tmp_path / "in").iterdir()):
        st.write_bytes(st.path(prefix, f.name), f.read_bytes())
    # credentials and the CA path by reference: nothing secret in the flow-run parameters
    monkeypatch.setenv("TLS_S3_KEY", tls_s3.key)
    monkeypatch.setenv("TLS_S3_SECRET", tls_s3.secret)
    monkeypatch.setenv("TLS_S3_CA", tls_s3.ca_file)
    so = {"key": "${TLS_S3_KEY}", "secret": "${TLS_S3_SECRET}",
          "client_kwargs": {"endpoint_url": tls_s3.https_endpoint_url}, "tls": {"ca_bundle": "${TLS_S3_CA}"}}
    cfg = {
        "name": "tls-" + uuid.uuid4().hex[:6],
        "source": {"path": f"s3://raw/{prefix}/", "storage_options": so},
        "batching": {"rows": 1000},
        "transforms": ["dpipeline_prefect.examples.flights:clean"],
        "sink": {"path": f"s3://out/{prefix}/{{run_key}}", "storage_options": so},
        "checkpoint": {"path": f"s3://ckpt/{prefix}/", "storage_options": so},
        "runner": {"kind": "threads"},
    }
    summary = Pipeline(cfg).run(run_key="r1")
    assert summary["status"] == "completed" and summary["rows_in"] == len(df)
    out_so = {**_https(tls_s3)}
    out_so = {"key": tls_s3.key, "secret": tls_s3.secret,
              "client_kwargs": {"endpoint_url": tls_s3.https_endpoint_url, "verify": tls_s3.ca_file}}
    assert_exactly_once(f"s3://out/{prefix}/r1", reference(df), storage_options=out_so)

    # the same pipeline trusting the wrong CA: the CLI stops at once with the clear error
    other = make_certificates(tmp_path / "other")["ca"]
    p = write_yaml(tmp_path / "p.yaml", {**cfg, "name": cfg["name"] + "w"})
    t0 = time.monotonic()
    r = run_cli("run", str(p), "--run-key", "r2", env={"TLS_S3_CA": str(other)}, timeout=300)
    assert r.returncode != 0
    assert "certificate verify failed" in r.stderr and tls_s3.https_endpoint_url in r.stderr, r.stderr[-3000:]
    assert tls_s3.secret not in r.stderr + r.stdout
    assert time.monotonic() - t0 < 120
    assert os.environ["TLS_S3_CA"] == tls_s3.ca_file
