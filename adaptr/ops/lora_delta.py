"""The dense update of one LoRA module, ΔW = scaling · B @ A, in fixed row blocks that block-wise
consumers reproduce bit for bit."""

from __future__ import annotations

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import (
    check_density,
)


def lora_delta(
    lora_A: Tensor, lora_B: Tensor, scaling: float, *, transpose: bool = False, out: Tensor | None = None
) -> Tensor:
    """The dense weight update of one LoRA module: ``ΔW = scaling · (B @ A)`` in float32.

    Computed as ``(B·scaling) @ A`` so that the scale touches only the small ``out×r`` factor rather
    than the full ``out×in`` product. Inputs of any float dtype are upcast to float32 first.

    Convolutions: when ``lora_A`` has more than two dimensions (``r × in × k…``) and ``lora_B`` is
    ``out × r × 1…``, the product is ``B.reshape(out, r) @ A.reshape(r, -1)`` reshaped to
    ``out × in × k…`` (PEFT's ``Conv*d.get_delta_weight`` for ungrouped convolutions).

    Args:
        lora_A: the down projection, ``r × in`` (``lora_A.weight``).
        lora_B: the up projection, ``out × r`` (``lora_B.weight``).
        scaling: ``lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` for rsLoRA), pattern overrides applied.
        transpose: return ``ΔWᵀ`` (``in × out``), for ``fan_in_fan_out`` layers (GPT-2 ``Conv1D``) and
            embeddings, whose stored weight is the transpose of ``B @ A``. Only for 2-D factors.
        out: optional contiguous float32 storage of exactly ``out·in`` elements to write into (a
            reused scratch buffer); the result is a view of it.

    Returns:
        A contiguous float32 tensor, ``out × in`` (``in × out`` when ``transpose``).

    Raises:
        InvalidInputError: when the factor shapes do not chain, or ``scaling`` is not finite.
    """
    scale = check_density(scaling, "scaling")
    if lora_A.dim() < 2 or lora_B.dim() < 2:
        raise InvalidInputError(
            f"LoRA factors must be at least 2-D; got A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}"
        )
    rank = lora_A.shape[0]
    if lora_B.shape[1] != rank or any(s != 1 for s in lora_B.shape[2:]):
        raise InvalidInputError(
            f"LoRA factors do not chain: A {tuple(lora_A.shape)} needs B of shape (out, {rank}, 1…), "
            f"got {tuple(lora_B.shape)}"
        )
    if lora_A.dim() > 2 and transpose:
        raise InvalidInputError("transpose applies only to 2-D LoRA factors")
    a = lora_A.float().reshape(rank, -1)
    b = lora_B.float().reshape(lora_B.shape[0], rank) * scale
    left, right = (a.t(), b.t()) if transpose else (b, a)
    shape = (left.shape[0], right.shape[1])
    if out is None:
        delta = torch.empty(shape, dtype=torch.float32, device=left.device)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != shape[0] * shape[1]:
        raise InvalidInputError(f"out must be contiguous float32 with {shape[0] * shape[1]} elements")
    else:
        delta = out.view(shape)
    # Row blocks, always the same ones (``delta_block_rows``): block-wise consumers reproduce
    # this product bit for bit, whatever BLAS would do with one big matmul.
    step = delta_block_rows(right.shape[1])
    for r0 in range(0, left.shape[0], step):
        torch.matmul(left[r0 : r0 + step], right, out=delta[r0 : r0 + step])
    if lora_A.dim() > 2:
        delta = delta.reshape(lora_B.shape[0], *lora_A.shape[1:])
    return delta


def delta_block_rows(columns: int) -> int:
    """Rows per block of a delta with ``columns`` columns: about 64K elements, cache sized."""
    return max(1, (1 << 16) // max(1, columns))


def lora_delta_rows(
    lora_A: Tensor, lora_B: Tensor, scaling: float, r0: int, r1: int, *, transpose: bool = False
) -> Tensor:
    """Rows ``r0:r1`` of ``lora_delta(...)``, bit-identical to them when ``r0:r1`` is one of its
    blocks (``delta_block_rows``); 2-D factors only."""
    scale = check_density(scaling, "scaling")
    a = lora_A.float()
    b = lora_B.float() * scale
    left, right = (a.t(), b.t()) if transpose else (b, a)
    return left[r0:r1] @ right
