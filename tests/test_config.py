"""The pipeline definition: defaults, one clear error per mistake, ``${VAR}``, fingerprints.

Pure validation logic: no server, no filesystem beyond a temporary YAML file. Expected values
(sizes, allowed names) are written out here from the issue, not read back from the code.
"""

from __future__ import annotations

import textwrap

import pytest

from dpipeline_prefect.config import (
    PipelineConfig,
    load_config,
    parse_bytes,
    parse_config,
    redact,
    validate_run_key,
)
from dpipeline_prefect.errors import ConfigError, TerminalError

MiB = 1024**2


def base(**overrides) -> dict:
    """The smallest valid definition (name, source, sink), plus ``overrides``."""
    d = {"name": "flights", "source": {"path": "/data/in"}, "sink": {"path": "/data/out"}}
    d.update(overrides)
    return d


def config_error(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert isinstance(info.value, TerminalError)  # never retried
    return info.value


# -- defaults --------------------------------------------------------------------------------


def test_only_name_source_sink_are_required():
    cfg = parse_config(base())
    assert cfg.source.format == "parquet"
    assert cfg.source.storage_options == {}
    assert cfg.sharding.strategy == "files"
    assert cfg.sharding.catch_all is False
    assert cfg.batching.rows == 100_000
    assert cfg.batching.max_bytes == 64 * MiB
    assert cfg.transforms == []
    assert cfg.sink.format == "parquet"
    assert cfg.sink.partition_by == []
    assert cfg.checkpoint.path == "./.dpipeline/checkpoints/"
    assert cfg.runner.kind == "dask"
    assert cfg.runner.workers is None
    assert cfg.runner.threads_per_worker == 1


@pytest.mark.parametrize("missing", ["name", "source", "sink"])
def test_each_required_field_is_named_when_missing(missing):
    d = base()
    del d[missing]
    err = config_error(d)
    assert f"{missing}: required field is missing" in str(err)
    assert err.field == missing


def test_hash_defaults_to_eight_shards():
    cfg = parse_config(base(sharding={"strategy": "hash", "key": "carrier"}))
    assert cfg.sharding.shards == 8
    assert cfg.sharding.keyed


def test_load_config_reads_yaml(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text(
        textwrap.dedent(
            """
            name: flights-daily
            source: {path: /in, format: csv}
            sharding: {strategy: time, key: time_hour, every: 6h}
            batching: {rows: 500, max_bytes: 2MiB}
            sink: {path: "/out/{run_key}", partition_by: [carrier]}
            """
        )
    )
    cfg = load_config(p)
    assert cfg.source.format == "csv"
    assert cfg.batching.max_bytes == 2 * MiB
    assert cfg.sink.resolved_path("2013-01-01") == "/out/2013-01-01"


def test_load_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(top)


# -- one clear error per mistake --------------------------------------------------------------

PIPELINE_FIELDS = ["name", "source", "sharding", "batching", "transforms", "sink", "checkpoint", "runner"]
SHARDING_FIELDS = ["strategy", "key", "shards", "boundaries", "every", "start", "end", "function", "catch_all"]


def test_unknown_top_level_field_lists_allowed_names():
    err = config_error(base(sharding_key="x"))
    msg = str(err)
    assert "sharding_key: unknown field" in msg
    for name in PIPELINE_FIELDS:
        assert name in msg.split("allowed here:")[1]
    assert err.field == "sharding_key"


def test_unknown_nested_field_lists_that_sections_names():
    err = config_error(base(sharding={"strategy": "hash", "kee": "carrier"}))
    msg = str(err)
    assert "sharding.kee: unknown field" in msg
    allowed = [s.strip() for s in msg.split("allowed here:")[1].split("\n")[0].split(",")]
    assert allowed == SHARDING_FIELDS
    err = config_error(base(batching={"row": 10}))
    assert "batching.row" in str(err) and "rows, max_bytes" in str(err)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"batching": {"rows": "many"}}, "batching.rows"),
        ({"batching": {"rows": 1.5}}, "batching.rows"),
        ({"batching": {"rows": 0}}, "batching.rows"),
        ({"sharding": {"strategy": "hash", "key": "k", "shards": 0}}, "sharding.shards"),
        ({"source": "s3://raw/flights"}, "source"),
        ({"transforms": "mod:fn"}, "transforms"),
        ({"sink": {"path": "/o", "partition_by": "carrier"}}, "sink.partition_by"),
        ({"runner": {"workers": -1}}, "runner.workers"),
    ],
)
def test_wrong_type_is_one_error_naming_the_field(overrides, field):
    err = config_error(base(**overrides))
    assert err.field == field
    msg = str(err)
    assert msg.startswith("pipeline: invalid pipeline definition")
    assert f"\n  {field}: " in msg
    assert "Traceback" not in msg and "pydantic" not in msg.lower()


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"source": {"path": "/i", "format": "xlsx"}}, "source.format", ["parquet", "csv", "jsonl"]),
        ({"sink": {"path": "/o", "format": "avro"}}, "sink.format", ["parquet", "csv", "jsonl"]),
        ({"sharding": {"strategy": "random"}}, "sharding.strategy", ["files", "hash", "range", "time", "custom"]),
        ({"runner": {"kind": "spark"}}, "runner.kind", ["dask", "threads"]),
    ],
)
def test_invalid_choice_lists_allowed_values(overrides, field, allowed):
    err = config_error(base(**overrides))
    assert err.field == field
    for value in allowed:
        assert f"'{value}'" in str(err)


@pytest.mark.parametrize(
    "sharding, needle",
    [
        ({"strategy": "hash"}, "sharding.key is required"),
        ({"strategy": "range", "key": "k"}, "sharding.boundaries is required"),
        ({"strategy": "range", "key": "k", "boundaries": [10, 5]}, "strictly increasing"),
        ({"strategy": "range", "key": "k", "boundaries": [1, 1]}, "strictly increasing"),
        ({"strategy": "range", "key": "k", "boundaries": [1, "b"]}, "one type"),
        ({"strategy": "time", "key": "t"}, "sharding.every is required"),
        ({"strategy": "time", "key": "t", "every": "1M"}, "not a fixed frequency"),
        ({"strategy": "time", "key": "t", "every": "MS"}, "not a fixed frequency"),
        ({"strategy": "time", "key": "t", "every": "1Y"}, "not a fixed frequency"),
        ({"strategy": "time", "key": "t", "every": "0h"}, "positive"),
        ({"strategy": "time", "key": "t", "every": "1h", "start": "not a date"}, "not a timestamp"),
        ({"strategy": "custom"}, "sharding.function is required"),
    ],
)
def test_strategy_specific_requirements(sharding, needle):
    err = config_error(base(sharding=sharding))
    assert needle in str(err)
    assert err.field == "sharding"


@pytest.mark.parametrize(
    "sharding",
    [
        {"strategy": "range", "key": "k", "boundaries": [1, 2.5, 10]},
        {"strategy": "range", "key": "k", "boundaries": ["b", "m"]},
        {"strategy": "time", "key": "t", "every": "15min", "start": "2013-01-01", "end": "2014-01-01"},
        {"strategy": "time", "key": "t", "every": "1D"},
        {"strategy": "custom", "function": "mypkg.shards:by_region"},
    ],
)
def test_valid_strategies_pass(sharding):
    assert parse_config(base(sharding=sharding)).sharding.strategy == sharding["strategy"]


@pytest.mark.parametrize("name", ["Flights", "a b", "a/b", "x" * 101, "", "ok\n"])
def test_bad_pipeline_names(name):
    assert config_error(base(name=name)).field == "name"


@pytest.mark.parametrize("t", ["os.path", "mod:", ":fn", "mod:fn()", "a b:c"])
def test_bad_transform_paths(t):
    assert "module:function" in str(config_error(base(transforms=[t])))


# -- ${VAR} ----------------------------------------------------------------------------------


def test_env_vars_are_expanded_everywhere_but_storage_options(monkeypatch):
    monkeypatch.setenv("DP_T_BUCKET", "raw-bucket")
    monkeypatch.setenv("DP_T_ROWS", "2500")
    monkeypatch.setenv("DP_T_SECRET", "s3cr3t")
    monkeypatch.setenv("DP_T_MOD", "mypkg")
    cfg = parse_config(
        base(
            source={"path": "s3://${DP_T_BUCKET}/in/", "storage_options": {"secret": "${DP_T_SECRET}"}},
            batching={"rows": "${DP_T_ROWS}"},
            transforms=["${DP_T_MOD}.clean:fn"],
            sink={"path": "s3://${DP_T_BUCKET}/out", "storage_options": {"client_kwargs": {"x": "${DP_T_SECRET}"}}},
            checkpoint={"storage_options": {"token": "${DP_T_SECRET}"}},
        )
    )
    assert cfg.source.path == "s3://raw-bucket/in/"
    assert cfg.sink.path == "s3://raw-bucket/out"
    assert cfg.batching.rows == 2500
    assert cfg.transforms == ["mypkg.clean:fn"]
    # kept as written: resolved only where a filesystem is opened
    assert cfg.source.storage_options == {"secret": "${DP_T_SECRET}"}
    assert cfg.sink.storage_options == {"client_kwargs": {"x": "${DP_T_SECRET}"}}
    assert cfg.checkpoint.storage_options == {"token": "${DP_T_SECRET}"}
    assert "s3cr3t" not in cfg.model_dump_json()


def test_missing_env_var_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("DP_T_UNSET", raising=False)
    err = config_error(base(sink={"path": "s3://${DP_T_UNSET}/out"}))
    assert "DP_T_UNSET" in str(err) and "not set" in str(err)
    assert err.field == "sink.path"


def test_unset_env_var_in_storage_options_is_not_an_error_at_parse_time(monkeypatch):
    monkeypatch.delenv("DP_T_UNSET", raising=False)
    cfg = parse_config(base(source={"path": "/i", "storage_options": {"key": "${DP_T_UNSET}"}}))
    assert cfg.source.storage_options["key"] == "${DP_T_UNSET}"


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (1234, 1234),
        ("1234", 1234),
        ("1_000_000", 1_000_000),
        ("64MiB", 64 * 1024 * 1024),
        ("64mib", 64 * 1024 * 1024),
        ("100MB", 100_000_000),
        ("5 GB", 5_000_000_000),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("10kb", 10_000),
        ("2KiB", 2048),
        ("3k", 3000),
        ("7b", 7),
    ],
)
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["abc", "-5", "1e3", "5 parsecs", ".", "", True])
def test_parse_bytes_rejects_non_sizes(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_max_bytes_accepts_units_and_rejects_tiny_or_garbage():
    assert parse_config(base(batching={"max_bytes": "16MiB"})).batching.max_bytes == 16 * MiB
    assert config_error(base(batching={"max_bytes": "12"})).field == "batching.max_bytes"
    err = config_error(base(batching={"max_bytes": "lots"}))
    assert "64MiB" in str(err)  # the message shows the expected form


# -- fingerprints ----------------------------------------------------------------------------

FULL = base(
    source={"path": "s3://raw/in/", "format": "parquet", "storage_options": {"key": "A"}},
    sharding={"strategy": "hash", "key": "carrier", "shards": 4},
    batching={"rows": 1000},
    transforms=["mod:clean"],
    sink={"path": "s3://out/{run_key}", "partition_by": ["origin"], "storage_options": {"key": "A"}},
    checkpoint={"path": "s3://ckpt/", "storage_options": {"key": "A"}},
    runner={"kind": "dask", "workers": 2},
)


def _changed(section: str, value) -> dict:
    import copy

    d = copy.deepcopy(FULL)
    keys = section.split(".")
    target = d
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value
    return d


@pytest.mark.parametrize(
    "section, value, part",
    [
        ("source.path", "s3://raw/other/", "source"),
        ("source.format", "csv", "source"),
        ("sharding.shards", 5, "sharding"),
        ("sharding.key", "origin", "sharding"),
        ("sharding.catch_all", True, "sharding"),
        ("transforms", ["mod:clean", "mod:enrich"], "transforms"),
        ("transforms", [], "transforms"),
        ("sink.path", "s3://out2/{run_key}", "sink"),
        ("sink.partition_by", ["dest"], "sink"),
        ("sink.format", "csv", "sink"),
    ],
)
def test_fingerprint_changes_with_definition(section, value, part):
    before = parse_config(FULL).fingerprints()
    after = parse_config(_changed(section, value)).fingerprints()
    assert before[part] != after[part]
    assert {k for k in before if before[k] != after[k]} == {part}


@pytest.mark.parametrize(
    "section, value",
    [
        ("source.storage_options", {"key": "B", "secret": "rotated"}),
        ("sink.storage_options", {"key": "B"}),
        ("checkpoint.storage_options", {}),
        ("batching", {"rows": 7, "max_bytes": "1MiB"}),
        ("runner", {"kind": "threads", "workers": 8}),
    ],
)
def test_fingerprint_ignores_credentials_batching_and_runner(section, value):
    assert parse_config(FULL).fingerprints() == parse_config(_changed(section, value)).fingerprints()


def test_fingerprint_is_stable_and_covers_four_parts():
    a, b = parse_config(FULL).fingerprints(), parse_config(FULL).fingerprints()
    assert a == b
    assert set(a) == {"source", "sharding", "transforms", "sink"}


# -- run keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["2013-01-01", "run_1", "a", "x.y:z=w+1", "A" * 128])
def test_valid_run_keys(key):
    assert validate_run_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["..", "a..b", "a/b", "/abs", "a\\b", "a\x00b", "A" * 129, "", ".hidden", "-x", "_x",
     "a b", "abc\n", "abc\r", 42, None],
)
def test_rejected_run_keys(key):
    with pytest.raises(ConfigError) as info:
        validate_run_key(key)
    assert info.value.field == "run_key"


# -- redact ----------------------------------------------------------------------------------


def test_redact_hides_secrets_but_keeps_references_and_config():
    data = parse_config(
        base(
            sharding={"strategy": "hash", "key": "carrier"},
            source={
                "path": "s3://raw/in",
                "storage_options": {
                    "key": "AKIAEXAMPLE",
                    "secret": "wJalrEXAMPLE",
                    "token": "${DP_T_TOKEN}",
                    "endpoint_url": "http://127.0.0.1:8333",
                    "client_kwargs": {"aws_session_token": "tok123"},
                },
            },
            sink={"path": "/o", "storage_options": {"password": "hunter2", "profiles": [{"api_key": "k9"}]}},
        )
    ).model_dump(mode="json")
    out = redact(data)
    text = repr(out)
    for secret in ("AKIAEXAMPLE", "wJalrEXAMPLE", "tok123", "hunter2", "k9"):
        assert secret not in text
    opts = out["source"]["storage_options"]
    assert opts["token"] == "${DP_T_TOKEN}"  # a reference reveals nothing
    assert opts["endpoint_url"] == "http://127.0.0.1:8333"
    # 'key' outside storage_options is a column name, not a credential
    assert out["sharding"]["key"] == "carrier"
    assert out["name"] == "flights"
    assert data["source"]["storage_options"]["key"] == "AKIAEXAMPLE"  # a copy, input untouched


def test_model_is_the_single_definition():
    # the Python API builds the same model as YAML/parse_config
    cfg = PipelineConfig(name="p", source={"path": "/i"}, sink={"path": "/o"})
    assert cfg == parse_config(base(name="p", source={"path": "/i"}, sink={"path": "/o"}))


def test_redact_of_bare_storage_options_hides_the_access_key():
    assert redact({"key": "AKIAEXAMPLE", "secret": "x", "anon": False}) == {
        "key": "***",
        "secret": "***",
        "anon": False,
    }
