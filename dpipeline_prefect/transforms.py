"""Transforms: user functions ``pandas.DataFrame -> pandas.DataFrame``, named by import path.

They are imported where they run (the Dask worker), by path, so the pipeline definition stays
plain data. A failed import names the transform and the reason; a transform that raises or
returns something other than a DataFrame is reported with its name, the shard and the batch.

Degradation: a transform marked ``optional: true`` that raises, returns something other than
a DataFrame, or runs past its ``timeout_s`` is skipped for that batch: the batch goes on as
the transform's input, and the skip is recorded where the output is:

* in the output's ``DataFrame.attrs[ATTRS_KEY]["skipped_transforms"]``, which pyarrow stores
  in the pandas metadata of each Parquet file the batch writes (read it back with
  ``pd.read_parquet(file).attrs``). Metadata, not a column, because a column present in some
  files only would change the dataset's schema for every reader (a pyarrow dataset takes the
  first file's schema and drops or nulls the column elsewhere); CSV and JSON lines have no
  metadata, so there the record is the run summary only;
* in the run summary (``transforms_skipped``: transform -> batches skipped), via the shard.

An optional transform gets a shallow copy of its input (copy-on-write in pandas 3), so one
that failed half-way through mutating it leaves the batch as it was. A timed-out call cannot
be stopped (Python cannot kill a thread): it is abandoned in a daemon thread and its result
discarded. A non-optional transform that times out raises :class:`TransformTimeoutError`,
a transient error (a slow dependency, not a bug in the rows).
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pandas as pd

from .errors import TransformError, TransientError

__all__ = [
    "load_function",
    "load_transforms",
    "apply_transforms",
    "skipped_transforms",
    "Transform",
    "LoadedTransform",
    "TransformTimeoutError",
    "ATTRS_KEY",
]

log = logging.getLogger("dpipeline_prefect.transforms")

Transform = Callable[[pd.DataFrame], pd.DataFrame]
ATTRS_KEY = "dpipeline"


class TransformTimeoutError(TransientError):
    """A transform ran longer than its ``timeout_s`` (``transform``, ``timeout_s``)."""


@dataclass(frozen=True)
class LoadedTransform:
    """An imported transform with its options."""

    name: str
    fn: Transform
    optional: bool = False
    timeout_s: float | None = None


def load_function(path: Any, what: str = "transform") -> Callable:
    """Import ``module:function``; raise :class:`TransformError` naming ``path`` if it fails.

    ``path`` may also be a ``TransformConfig`` (its ``function`` is imported).
    """
    return _load_function(getattr(path, "function", path), what)


@lru_cache(maxsize=256)
def _load_function(path: str, what: str = "transform") -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        raise TransformError(
            f"{what} {path!r} cannot be imported: {type(e).__name__}: {e}", transform=path
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise TransformError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}", transform=path)
    if not callable(fn):
        raise TransformError(f"{what} {path!r} is not callable", transform=path)
    return fn


def load_transforms(specs: Sequence[Any]) -> list[LoadedTransform]:
    """Import each transform: ``module:function`` strings or ``TransformConfig`` entries."""
    out = []
    for s in specs:
        if isinstance(s, str):
            out.append(LoadedTransform(s, load_function(s)))
        else:
            out.append(LoadedTransform(s.function, load_function(s.function), s.optional, s.timeout_s))
    return out


def _call_with_timeout(fn: Transform, df: pd.DataFrame, timeout_s: float, name: str) -> Any:
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["out"] = fn(df)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["err"] = e
        finally:
            done.set()

    # The thread runs in a copy of this context, so breaker.circuit() inside the transform
    # finds the running shard's breakers.
    ctx = contextvars.copy_context()
    threading.Thread(target=ctx.run, args=(run,), name=f"transform-{name}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TransformTimeoutError(
            f"transform {name!r} took longer than {timeout_s:g} s", transform=name, timeout_s=timeout_s)
    if "err" in box:
        raise box["err"]
    return box["out"]


def apply_transforms(
    df: pd.DataFrame, transforms: Sequence[LoadedTransform | tuple[str, Transform]], where: str = ""
) -> pd.DataFrame:
    """Run ``df`` through each transform in order.

    Optional transforms that fail or time out are skipped; the result's
    ``attrs[ATTRS_KEY]["skipped_transforms"]`` then lists them (see the module docstring).
    """
    df.attrs.pop(ATTRS_KEY, None)  # a record inherited from the input (an earlier run's output)
    skipped: list[str] = []
    for t in transforms:
        if isinstance(t, LoadedTransform):
            name, fn, optional, timeout_s = t.name, t.fn, t.optional, t.timeout_s
        else:
            (name, fn), optional, timeout_s = t, False, None
        arg = df.copy(deep=False) if optional else df
        err: Exception | None = None
        try:
            out = fn(arg) if timeout_s is None else _call_with_timeout(fn, arg, timeout_s, name)
        except TransformTimeoutError as e:
            err = e
        except Exception as e:  # noqa: BLE001 - a bug in user code is terminal, named once
            err = TransformError(
                f"transform {name!r} failed{' on ' + where if where else ''}: {type(e).__name__}: {e}",
                transform=name,
            )
            err.__cause__ = e
        else:
            if not isinstance(out, pd.DataFrame):
                err = TransformError(
                    f"transform {name!r} returned {type(out).__name__}, expected a pandas DataFrame",
                    transform=name,
                )
        if err is not None:
            if optional:
                log.warning("optional transform %r skipped%s: %s", name, " on " + where if where else "", err)
                skipped.append(name)
                continue
            raise err
        df = out
    if skipped:
        df = df.copy(deep=False)  # attrs of the output only, not of a frame the caller holds
        df.attrs[ATTRS_KEY] = {"skipped_transforms": skipped}
    return df


def skipped_transforms(df: pd.DataFrame) -> list[str]:
    """The optional transforms skipped for the batch ``df`` (as recorded by apply_transforms)."""
    rec = df.attrs.get(ATTRS_KEY)
    return list(rec.get("skipped_transforms", [])) if isinstance(rec, dict) else []
