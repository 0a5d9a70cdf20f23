"""Fused linear merge on the GPU: ``W' = W + Σ c_i · keep_i ⊙ (scaling_i · B_i @ A_i)``, tile by tile.

Each program owns one ``BLOCK_M × BLOCK_N`` tile of the output: it recomputes every adapter's ΔW tile
from the packed factors (float32 accumulation), applies the DARE keep mask (Philox, bit-identical to
the CPU path) when seeds are given, accumulates ``c_i · tile`` in float32, adds the base tile (read
once), rounds once and writes ``W'`` (once). No ΔW is ever stored. Twin: ``adaptr.ops.linear_merge``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import check_density, check_weights, f32
from adaptr_triton.lora_tiles import (
    LAUNCH_OPTIONS,
    PackedFactors,
    check_base,
    delta_tile,
    keep_tile,
    pack_factors,
    round_for_bf16,
    tile_offsets,
)


@triton.jit
def _linear_merge_kernel(
    # Pointers to the base weight and the output (M × N, the output contiguous)
    w_ptr,
    out_ptr,
    # Pointers to the packed factors (see lora_tiles.PackedFactors) and the per-adapter tables
    left_ptr,
    right_ptr,
    rank_ptr,
    post_ptr,
    coef_ptr,  # float32 coefficient c_i
    seed_ptr,  # int64 Philox key of each adapter (read only with DROP)
    # Matrix dimensions, the padded rank and the number of adapters
    M,
    N,
    RP: tl.constexpr,
    N_FACTORS: tl.constexpr,
    # The strides of the base weight: how far to move to go one row / one column down
    stride_wm,
    stride_wn,
    # DARE keep probability, float32 (only with DROP)
    density,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NATIVE: tl.constexpr,  # dot 16-bit factors in their dtype
    DROP: tl.constexpr,  # apply the DARE keep masks
    OUT_BF16: tl.constexpr,  # round to bf16 on the bit pattern before the store
):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(N_FACTORS):
        tile = delta_tile(
            left_ptr,
            right_ptr,
            rank_ptr,
            post_ptr,
            i,
            offs_m,
            offs_n,
            M,
            N,
            RP,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            NATIVE,
        )
        if DROP:
            keep = keep_tile(tl.load(seed_ptr + i), offs_m, offs_n, N, density)
            tile = tl.where(keep, tile, 0.0)
        acc += tile * tl.load(coef_ptr + i)
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    w = tl.load(w_ptr + rows * stride_wm + cols * stride_wn, mask=inside, other=0.0)
    result = round_for_bf16(acc + w.to(tl.float32), OUT_BF16)
    tl.store(out_ptr + rows * N + cols, result.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(
    out: torch.Tensor,
    base: torch.Tensor,
    packed: PackedFactors,
    coeffs: torch.Tensor,
    seeds: torch.Tensor | None,
    density: float,
) -> torch.Tensor:
    """Run the kernel into ``out`` (contiguous, ``base``'s shape); every element is written."""
    drop = seeds is not None
    _linear_merge_kernel[(packed.grid(),)](
        base,
        out,
        packed.left,
        packed.right,
        packed.ranks,
        packed.post,
        coeffs,
        seeds if drop else coeffs,  # never read without DROP
        packed.M,
        packed.N,
        packed.RP,
        packed.count,
        base.stride(0),
        base.stride(1),
        f32(density),
        BLOCK_M=packed.block_m,
        BLOCK_N=packed.block_n,
        BLOCK_R=packed.block_r,
        NATIVE=packed.native,
        DROP=drop,
        OUT_BF16=out.dtype == torch.bfloat16,
        **LAUNCH_OPTIONS,
    )
    return out


def prepare(
    base: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    coeffs: Sequence[float],
    *,
    transpose: bool = False,
    seeds: Sequence[int] | None = None,
    density: float = 1.0,
) -> tuple[PackedFactors, torch.Tensor, torch.Tensor | None, float]:
    """Validate and pack the arguments: ``(packed, coeffs, seeds or None, density)`` for ``_launch``."""
    check_base(base)
    packed = pack_factors(factors, tuple(base.shape), base.device, transpose=transpose)
    cs = torch.tensor(check_weights(coeffs, packed.count), dtype=torch.float32, device=base.device)
    dens = check_density(density)
    keys = None
    if seeds is not None:
        keys_list = [int(k) for k in seeds]
        if len(keys_list) != packed.count:
            raise InvalidInputError(f"got {len(keys_list)} seeds for {packed.count} adapters")
        if any(not 0 <= k < 1 << 63 for k in keys_list):
            raise InvalidInputError("seeds must lie in [0, 2**63)")
        if dens < 1:  # random_drop keeps everything at density >= 1
            keys = torch.tensor(keys_list, dtype=torch.int64, device=base.device)
    return packed, cs, keys, dens


def linear_merge(
    base: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    coeffs: Sequence[float],
    *,
    transpose: bool = False,
    seeds: Sequence[int] | None = None,
    density: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``cast(base_fp32 + Σ_i coeffs[i] · keep_i ⊙ (scaling_i · B_i @ A_i))`` in one pass over ``base``.

    Same signature and result as ``adaptr.ops.linear_merge.linear_merge`` (to float32 rounding of the
    products' summation order; masks are identical). 2-D base and factors only (no convolutions);
    any float dtypes; the base may be strided.

    Args:
        base: the base weight, ``d × k`` (``k × d`` when ``transpose``).
        factors: one ``(lora_A, lora_B, scaling)`` per adapter.
        coeffs: one coefficient per adapter (the caller folds weights, λ, 1/density in).
        transpose: the base stores ``ΔWᵀ`` (``fan_in_fan_out``).
        seeds: optional Philox keys, one per adapter; entries are then kept with probability ``density``.
        density: the DARE keep probability (only with ``seeds``).
        out_dtype: the result's dtype (default ``base.dtype``).

    Returns:
        A new contiguous tensor of ``base``'s shape in ``out_dtype``.
    """
    packed, cs, keys, dens = prepare(base, factors, coeffs, transpose=transpose, seeds=seeds, density=density)
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    return _launch(out, base, packed, cs, keys, dens)
