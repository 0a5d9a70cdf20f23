"""Task arithmetic: the weighted sum of deltas (linear, task_arithmetic, DARE-linear)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adaptr.ops.checks import (
    check_group,
)


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = False) -> Tensor:
    """Task arithmetic (arXiv 2212.04089): ``Σ_i w_i·δ_i``, optionally divided by ``Σ_i w_i``.

    Products are float32 (weights rounded to float32) and summed left to right, as mergekit's GTA
    without consensus. With ``normalize`` the divisor ``Σ w_i`` (float32) is treated as 1 when
    ``|Σ w_i| < 1e-8`` (mergekit), so opposite weights that cancel give the plain sum, never inf/NaN.
    ``normalize=True`` on full weights is mergekit ``linear`` (model soups); on deltas it is the
    weighted average of the task vectors.

    Args:
        deltas: the deltas, all of one shape.
        weights: one weight per delta (negative weights subtract, "task negation").
        normalize: divide by the weight sum.

    Returns:
        A new float32 tensor of the deltas' shape.

    Raises:
        InvalidInputError: for no deltas, mismatched shapes or a weight count that differs.
    """
    items, ws = check_group(deltas, weights)
    total = items[0].float() * ws[0]
    for d, w in zip(items[1:], ws[1:]):
        total.add_(d.float() * w)
    if normalize:
        divisor = torch.tensor(ws, dtype=torch.float32).sum()
        if divisor.abs() >= 1e-8:
            total.div_(divisor)
    return total
