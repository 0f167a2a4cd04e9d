"""Argument checks for the public array functions: static shapes (free under jit, checked while
tracing) and, for concrete inputs only, values. Each error names the function, the argument and
what was expected, instead of a broadcasting error from deep inside XLA."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def same_shape(fn: str, reference: str, arrays: dict[str, Any]) -> tuple[int, ...]:
    """All non-None arrays must have the shape of ``arrays[reference]``; returns that shape."""
    shape = tuple(np.shape(arrays[reference]))
    for name, x in arrays.items():
        if x is not None and tuple(np.shape(x)) != shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(np.shape(x))} but {reference} has {shape}; "
                f"they must match"
            )
    return shape


def row_or_token_shape(fn: str, name: str, x: Any, token_shape: tuple[int, ...]) -> None:
    """``x`` must be per row ([rows], or [rows, 1] ready to broadcast) or per token ([rows, T])
    for tokens shaped token_shape."""
    rows = token_shape[:-1]
    if tuple(np.shape(x)) not in (rows, (*rows, 1), token_shape):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(np.shape(x))}; expected one per row "
            f"{rows} or one per token {token_shape}"
        )


def concrete(*xs: Any) -> bool:
    """True when every x holds values this process can read: not a tracer inside jit / grad /
    vmap, and not a multi-host array with shards on other processes."""
    return not any(
        isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True) for x in xs
    )


def zero_one(fn: str, name: str, x: Any) -> None:
    """A mask must hold only 0 and 1 (any dtype). Checked for concrete inputs only: inside jit
    the functions read a mask as valid where > 0, never as a weight, so a 2 or a 0.5 would count
    as 1 there; here it is an error naming the first such position."""
    if x is None or not concrete(x):
        return
    v = np.asarray(x)
    if v.dtype == bool:
        return
    bad = np.argwhere((v != 0) & (v != 1))
    if bad.size:
        where = ", ".join(str(int(i)) for i in bad[0])
        raise ValueError(
            f"{fn}: {name}[{where}] = {v[tuple(bad[0])]} ({len(bad)} such values); a mask holds "
            "0 (padding) or 1 (valid), it is not a weight: scale the advantages to weight tokens"
        )
