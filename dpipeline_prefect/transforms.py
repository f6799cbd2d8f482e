"""Transforms: user functions ``pandas.DataFrame -> pandas.DataFrame``, named by import path.

They are imported where they run (the Dask worker), by path, so the pipeline definition stays
plain data. A failed import names the transform and the reason; a transform that raises or
returns something other than a DataFrame is reported with its name, the shard and the batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from functools import lru_cache

import pandas as pd

from .errors import TransformError

__all__ = ["load_function", "load_transforms", "apply_transforms", "Transform"]

Transform = Callable[[pd.DataFrame], pd.DataFrame]


@lru_cache(maxsize=256)
def load_function(path: str, what: str = "transform") -> Callable:
    """Import ``module:function``; raise :class:`TransformError` naming ``path`` if it fails."""
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


def load_transforms(paths: Sequence[str]) -> list[tuple[str, Transform]]:
    return [(p, load_function(p)) for p in paths]


def apply_transforms(
    df: pd.DataFrame, transforms: Sequence[tuple[str, Transform]], where: str = ""
) -> pd.DataFrame:
    """Run ``df`` through each transform in order."""
    for name, fn in transforms:
        try:
            out = fn(df)
        except Exception as e:  # noqa: BLE001 - a bug in user code is terminal, named once
            raise TransformError(
                f"transform {name!r} failed{' on ' + where if where else ''}: {type(e).__name__}: {e}",
                transform=name,
            ) from e
        if not isinstance(out, pd.DataFrame):
            raise TransformError(
                f"transform {name!r} returned {type(out).__name__}, expected a pandas DataFrame",
                transform=name,
            )
        df = out
    return df
