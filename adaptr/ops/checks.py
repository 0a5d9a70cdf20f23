"""Argument checks shared by the merge steps: one-line errors, values rounded as float32 computes them."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from torch import Tensor

from adaptr.errors import InvalidInputError

F32_MAX = 3.4028234663852886e38


def f32(value: float) -> float:
    """Round a Python float to the nearest float32 (the precision every step computes in)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def check_density(density: float, what: str = "density") -> float:
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a number, got {density!r}") from None
    if not math.isfinite(value):
        raise InvalidInputError(f"{what} must be finite, got {density!r}")
    return value


def check_weights(weights: Sequence[float], count: int) -> list[float]:
    values = list(weights)
    if len(values) != count:
        raise InvalidInputError(f"got {len(values)} weights for {count} deltas; give exactly one per delta")
    out: list[float] = []
    for w in values:
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise InvalidInputError(f"weights must be numbers, got {w!r}") from None
        if not math.isfinite(value) or abs(value) > F32_MAX:
            raise InvalidInputError(f"weights must be finite float32 values, got {w!r}")
        out.append(f32(value))
    return out


def check_deltas(deltas: Sequence[Tensor]) -> list[Tensor]:
    items = list(deltas)
    if not items:
        raise InvalidInputError("at least one delta is required")
    shape = items[0].shape
    for d in items[1:]:
        if d.shape != shape:
            raise InvalidInputError(
                f"all deltas must have the same shape; got {tuple(shape)} and {tuple(d.shape)}"
            )
    return items


def check_group(deltas: Sequence[Tensor], weights: Sequence[float]) -> tuple[list[Tensor], list[float]]:
    items = check_deltas(deltas)
    return items, check_weights(weights, len(items))


def per_delta_density(density: float | Sequence[float], count: int) -> list[float]:
    if isinstance(density, Sequence) and not isinstance(density, str):
        values = [check_density(d) for d in density]
        if len(values) != count:
            raise InvalidInputError(
                f"got {len(values)} densities for {count} deltas; give one or one per delta"
            )
        return values
    return [check_density(density)] * count  # type: ignore[arg-type]


def keep_count(density: float, n: int) -> int:
    """``k = max(1, int(density·n))``, mergekit 0.1.5 ``sparsify.magnitude`` (callers handle d ≤ 0, d ≥ 1)."""
    return min(n, max(1, int(density * n)))
