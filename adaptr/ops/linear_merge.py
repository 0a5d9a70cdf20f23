"""The fused linear merge of LoRA factors onto a base weight, ``W' = W + Σ c_i·keep_i⊙ΔW_i``: the torch
twin (and oracle) of the Triton kernel ``adaptr_triton.linear_merge``, composed of the step functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError
from adaptr.ops.lora_delta import lora_delta
from adaptr.ops.random_drop import random_drop
from adaptr.ops.weighted_sum import weighted_sum


def linear_merge(
    base: Tensor,
    factors: Sequence[tuple[Tensor, Tensor, float]],
    coeffs: Sequence[float],
    *,
    transpose: bool = False,
    seeds: Sequence[int] | None = None,
    density: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """``cast(base_fp32 + Σ_i coeffs[i] · keep_i ⊙ (scaling_i · B_i @ A_i))``, all in float32.

    The linear family in one call: task arithmetic / linear (``coeffs`` = weights, λ and any
    normalisation folded in by the caller) and DARE-linear (``seeds`` given; the caller folds the
    ``1/density`` rescale into ``coeffs``, nothing is rescaled here).

    Args:
        base: the base weight (any float dtype), ``d × k`` (``k × d`` when ``transpose``).
        factors: one ``(lora_A, lora_B, scaling)`` per adapter: ``A`` is ``r × k``, ``B`` is ``d × r``.
        coeffs: one coefficient per adapter (rounded to float32, as ``weighted_sum`` does).
        transpose: the base stores ``ΔWᵀ`` (``fan_in_fan_out``).
        seeds: optional Philox keys, one per adapter (``tensor_seed``): ``keep_i`` is
            ``random_drop``'s mask with ``seed=seeds[i]`` at ``density``; None keeps everything.
        density: the DARE keep probability (only with ``seeds``).
        out_dtype: the result's dtype (default ``base.dtype``).

    Returns:
        A new tensor of ``base``'s shape in ``out_dtype``.

    Raises:
        InvalidInputError: for no factors, mismatched counts or shapes, non-finite numbers.
    """
    items = list(factors)
    deltas = [lora_delta(a, b, s, transpose=transpose) for a, b, s in items]
    if seeds is not None:
        keys = list(seeds)
        if len(keys) != len(deltas):
            raise InvalidInputError(f"got {len(keys)} seeds for {len(deltas)} adapters")
        deltas = [random_drop(d, density, seed=key, rescale=None) for d, key in zip(deltas, keys)]
    for d in deltas:
        if d.shape != base.shape:
            raise InvalidInputError(
                f"a LoRA delta of shape {tuple(d.shape)} does not match the base {tuple(base.shape)}"
            )
    total = weighted_sum(deltas, coeffs)
    total.add_(base.float())
    return total.to(out_dtype or base.dtype)
