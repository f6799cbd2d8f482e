"""Prefect Blocks: storage credentials and whole pipeline definitions kept on the server.

Two block types, registered through the ``prefect.collections`` entry point (pyproject.toml),
so ``prefect block register``, the UI and ``Block.load("dpipeline-storage/NAME")`` know them
wherever this package is installed:

* :class:`StorageBlock` (``dpipeline-storage``) - an fsspec base URL, an S3-compatible
  endpoint, key and secret as ``SecretStr``, and extra fsspec options. Any ``source``,
  ``sink``, ``checkpoint`` or ``dead_letter`` section may say ``block: NAME`` instead of
  inline ``storage_options``; only the block's *name* travels in the pipeline definition
  (hence in flow-run parameters). The block is loaded where a filesystem is opened
  (:func:`resolve_storage`, called by ``storage.Storage`` in the flow process and in Dask
  workers), and its secrets go straight into the filesystem client, never into a message.
* :class:`PipelineBlock` (``dpipeline-pipeline``) - a whole pipeline definition, validated by
  :class:`~dpipeline_prefect.config.PipelineConfig` when the block is created and when it is
  loaded. ``flows/pipeline_flow.py`` runs a pipeline given such a block's name.

``blocks/create_blocks.py`` registers the types and creates named blocks from arguments and
the environment.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, SecretStr, field_validator

from prefect.blocks.core import Block

from .config import PipelineConfig, parse_config
from .errors import ConfigError

__all__ = [
    "StorageBlock",
    "PipelineBlock",
    "resolve_storage",
    "load_pipeline_block",
    "BLOCK_OPTION",
    "check_block_name",
]

# Where the docs of these blocks live (the README's "Blocks" section of this project).
_DOCS_URL = "https://github.com/dpipeline/dpipeline-prefect/blob/main/README.md#blocks-and-deployments"

#: The key in ``storage_options`` that names a :class:`StorageBlock` (set by ``block: NAME``).
BLOCK_OPTION = "block"

_BLOCK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
_CACHE_TTL_S = 60.0


def check_block_name(name: str, where: str = "block") -> str:
    """``name`` if it is a valid Prefect block name, else a :class:`ConfigError` naming ``where``."""
    if not isinstance(name, str) or not _BLOCK_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a block name; use lowercase letters, digits and '-' "
            "(at most 100 characters, starting with a letter or digit)",
            field=where,
        )
    return name


class StorageBlock(Block):
    """Where data lives and how to reach it: an fsspec base URL, an S3-compatible endpoint and
    credentials. Name it in a pipeline (``source``, ``sink``, ``checkpoint`` or
    ``dead_letter``) with ``block: NAME``; credentials are then read from this block where
    the storage is opened and never travel in flow-run parameters."""

    _block_type_name: ClassVar[str] = "dpipeline storage"
    _block_type_slug: ClassVar[str] = "dpipeline-storage"
    _description: ClassVar[str] = (
        "Storage location and credentials for dpipeline-prefect pipelines: an fsspec base URL, "
        "an S3-compatible endpoint, key and secret. Pipelines name it with `block: NAME`."
    )
    _documentation_url: ClassVar[str] = _DOCS_URL
    _code_example: ClassVar[str] = """
        ```python
        from dpipeline_prefect.blocks import StorageBlock

        storage_block = StorageBlock.load("BLOCK_NAME")
        options = storage_block.storage_options()   # fsspec storage_options, secrets included
        ```
        In a pipeline YAML: `sink: {path: out/{run_key}/, block: BLOCK_NAME}`.
    """

    base_url: str | None = Field(
        default=None,
        description="fsspec URL that relative paths of a pipeline section are joined to, "
        "e.g. s3://bucket/prefix (empty: paths must be full URLs).",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:8333 (empty: AWS).",
    )
    key: SecretStr | None = Field(default=None, description="Access key id.")
    secret: SecretStr | None = Field(default=None, description="Secret access key.")
    region: str | None = Field(default=None, description="Region name, if the store needs one.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="More fsspec storage_options (not secret), merged over the ones above.",
    )

    def storage_options(self) -> dict[str, Any]:
        """The fsspec ``storage_options`` this block stands for (s3fs names; secrets included).

        The result holds credentials: hand it to a filesystem, never to a log or a message.
        """
        out: dict[str, Any] = {}
        if self.key is not None:
            out["key"] = self.key.get_secret_value()
        if self.secret is not None:
            out["secret"] = self.secret.get_secret_value()
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            out["client_kwargs"] = client_kwargs
        for k, v in self.options.items():
            if k == "client_kwargs" and isinstance(v, dict):
                out["client_kwargs"] = {**out.get("client_kwargs", {}), **v}
            else:
                out[k] = v
        return out

    def url_for(self, path: str) -> str:
        """``path`` joined to ``base_url`` when it is relative, else ``path`` unchanged."""
        if not self.base_url or "://" in path or path.startswith("/"):
            return path
        rel = path[2:] if path.startswith("./") else path
        return self.base_url.rstrip("/") + "/" + rel.lstrip("/") if rel not in ("", ".") else self.base_url


class PipelineBlock(Block):
    """A whole dpipeline-prefect pipeline definition (the same fields as a pipeline YAML file),
    validated when saved and when loaded. Run it with the ``run-pipeline`` flow's
    ``pipeline_block`` parameter."""

    _block_type_name: ClassVar[str] = "dpipeline pipeline"
    _block_type_slug: ClassVar[str] = "dpipeline-pipeline"
    _description: ClassVar[str] = (
        "A dpipeline-prefect pipeline definition (source, sharding, transforms, sink, "
        "checkpoint, ...), validated like a pipeline YAML file."
    )
    _documentation_url: ClassVar[str] = _DOCS_URL
    _code_example: ClassVar[str] = """
        ```python
        from dpipeline_prefect.blocks import PipelineBlock

        pipeline_block = PipelineBlock.load("BLOCK_NAME")
        summary = pipeline_block.pipeline().run(run_key="2026-11-29")
        ```
    """

    definition: dict[str, Any] = Field(
        description="The pipeline definition; credentials belong in storage blocks (block: NAME), "
        "or as ${VAR} references resolved where storage is opened.",
    )

    @field_validator("definition")
    @classmethod
    def _valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        _validate_definition(v, "pipeline block definition")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineBlock":
        """A block holding the pipeline file ``path`` (validated; ``${VAR}`` kept as written)."""
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"pipeline file {str(p)!r} does not exist", path=str(p)) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}", path=str(p)) from None
        _validate_definition(data, str(p))
        return cls(definition=data)

    def config(self) -> PipelineConfig:
        """The validated :class:`PipelineConfig` (``${VAR}`` outside storage_options expanded now)."""
        name = getattr(self, "_block_document_name", None)
        return parse_config(dict(self.definition), origin=f"pipeline block {name or '(unsaved)'}")

    def pipeline(self):
        """A :class:`~dpipeline_prefect.pipeline.Pipeline` for this definition."""
        from .pipeline import Pipeline

        return Pipeline(self.config())


def _validate_definition(data: Any, origin: str) -> None:
    """Validate without expanding ``${VAR}``: the block keeps references, not their values."""
    from pydantic import ValidationError

    from .config import _format_validation_error

    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None
    literal = _literal_secret(data)
    if literal:
        # a block's plain fields are shown in the UI and returned by the API: no credentials here
        raise ConfigError(
            f"{origin}: {literal} holds a credential written out; name a storage block "
            "(block: NAME) or use a ${VAR} reference instead",
            field=literal,
        )


def _literal_secret(data: Any, where: str = "", in_options: bool = False) -> str | None:
    """The dotted path of the first secret-looking value written out (not a ``${VAR}``) inside
    a ``storage_options`` mapping. Other sections are not judged: there ``key`` is a column."""
    from .config import redact

    if isinstance(data, dict):
        masked = redact(data) if in_options else {}
        for k, v in data.items():
            path = f"{where}.{k}" if where else str(k)
            if in_options and isinstance(v, str) and masked.get(k) == "***" and v != "***":
                return path
            if isinstance(v, (dict, list)):
                found = _literal_secret(v, path, in_options or k == "storage_options")
                if found:
                    return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found = _literal_secret(v, f"{where}[{i}]", in_options)
            if found:
                return found
    return None


# --- resolution where a filesystem is opened -------------------------------------------------

_cache: dict[str, tuple[float, StorageBlock]] = {}
_cache_lock = threading.Lock()


def _load_storage_block(name: str, url: str) -> StorageBlock:
    """Load (at most once a minute per process) the storage block ``name``."""
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(name)
        if hit and now - hit[0] < _CACHE_TTL_S:
            return hit[1]
    from prefect.exceptions import ObjectNotFound

    try:
        block = StorageBlock.load(name, _sync=True)
    except (ObjectNotFound, ValueError) as e:
        if isinstance(e, ValueError) and "Unable to find block document" not in str(e):
            raise
        raise ConfigError(
            f"storage block {name!r} (named for {url}) does not exist on the Prefect server; "
            "create it with blocks/create_blocks.py storage NAME ...",
            key=name,
        ) from None
    with _cache_lock:
        _cache[name] = (now, block)
    return block


def resolve_storage(url: str, storage_options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(url, storage_options)`` with a ``block: NAME`` entry replaced by that block's options.

    A relative ``url`` is joined to the block's ``base_url``. Inline options win over the
    block's. Without a block entry both are returned unchanged.
    """
    if BLOCK_OPTION not in storage_options:
        return url, storage_options
    rest = dict(storage_options)
    name = check_block_name(rest.pop(BLOCK_OPTION), "storage_options.block")
    block = _load_storage_block(name, url)
    merged = block.storage_options()
    for k, v in rest.items():
        if k == "client_kwargs" and isinstance(v, dict):
            merged["client_kwargs"] = {**merged.get("client_kwargs", {}), **v}
        else:
            merged[k] = v
    return block.url_for(url), merged


def load_pipeline_block(name: str) -> PipelineBlock:
    """Load the pipeline block ``name`` with a clear error if it does not exist."""
    from prefect.exceptions import ObjectNotFound

    check_block_name(name, "pipeline_block")
    try:
        return PipelineBlock.load(name, _sync=True)
    except (ObjectNotFound, ValueError) as e:
        if isinstance(e, ValueError) and "Unable to find block document" not in str(e):
            raise
        raise ConfigError(
            f"pipeline block {name!r} does not exist on the Prefect server; create it with "
            "blocks/create_blocks.py pipeline NAME --file pipeline.yaml",
            key=name,
        ) from None
