"""TIES and DARE-TIES of LoRA modules onto a base weight on the GPU, never materializing a ΔW.

Up to three launches over tiles recomputed from the factors:

1. and 2. (only when trimming) ``magnitude_threshold.select_thresholds``: each adapter's exact
   k-th largest ``|δ_i|`` by a two-pass radix select (top 16 bits, then the low 16 bits inside the
   bucket that holds it), all adapters in the same two launches; histograms only, nothing d×k.
3. the merge: per output tile, every adapter's tile ``δ_i`` is recomputed (DARE: kept by the
   Philox mask and divided by the drop density; TIES: kept where ``|δ_i| >= t_i``), weighted
   (``δ̃_i = w_i·δ_i``) and summed to elect the sign (an exact 0 elects ``+``); the tiles are recomputed
   once more for the disjoint merge ``Σ agreeing δ̃_i / Σ agreeing w_i`` (divisor 0 → 1; no division
   without ``normalize``); × λ; + the base tile (the only read of W); one rounding; one write of W'.

Twin: ``adaptr.ops.ties_merge.ties_merge_lora``. The float32 operations per element are those of
the twin's fused ``ties_merge`` in the same order (correctly rounded division), so outputs agree
exactly whenever the ΔW entries do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import check_density, check_weights, f32, keep_count, per_delta_density
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
from adaptr_triton.magnitude_threshold import select_thresholds


@triton.jit
def _weighted_tile(
    left_ptr,
    right_ptr,
    rank_ptr,
    post_ptr,
    seed_ptr,
    thresh_ptr,
    weight_ptr,
    i,
    offs_m,
    offs_n,
    M,
    N,
    RP: tl.constexpr,
    drop_density,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NATIVE: tl.constexpr,
    DROP: tl.constexpr,
    TRIM: tl.constexpr,
):
    """``w_i · trim(drop(ΔW_i))`` on one tile, in float32."""
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
        keep = keep_tile(tl.load(seed_ptr + i), offs_m, offs_n, N, drop_density)
        tile = tl.where(keep, tl.div_rn(tile, drop_density), 0.0)
    if TRIM:
        tile = tl.where(tl.abs(tile) >= tl.load(thresh_ptr + i), tile, 0.0)
    return tile * tl.load(weight_ptr + i)


@triton.jit
def _ties_merge_kernel(
    # Pointers to the base weight and the output (M × N, the output contiguous)
    w_ptr,
    out_ptr,
    # Pointers to the packed factors (see lora_tiles.PackedFactors) and the per-adapter tables
    left_ptr,
    right_ptr,
    rank_ptr,
    post_ptr,
    pick_ptr,  # int32: the packed adapters taking part (those not trimmed away entirely)
    seed_ptr,  # int64 Philox key of each adapter (read only with DROP)
    thresh_ptr,  # float32 magnitude threshold t_i of each adapter (read only with TRIM; 0 keeps all)
    weight_ptr,  # float32 weight w_i of each adapter
    # Matrix dimensions, the padded rank and the number of adapters taking part
    M,
    N,
    RP: tl.constexpr,
    N_PICKED: tl.constexpr,
    # The strides of the base weight: how far to move to go one row / one column down
    stride_wm,
    stride_wn,
    # DARE keep probability (only with DROP) and λ, float32
    drop_density,
    lam,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NATIVE: tl.constexpr,  # dot 16-bit factors in their dtype
    DROP: tl.constexpr,  # DARE: apply the keep masks and the 1/density rescale
    TRIM: tl.constexpr,  # TIES: keep |δ_i| >= t_i
    NORMALIZE: tl.constexpr,  # divide by the sum of agreeing weights
    OUT_BF16: tl.constexpr,  # round to bf16 on the bit pattern before the store
):
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
    # Elect: the sign of Σ w_i·δ_i (an exact 0 elects +).
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(N_PICKED):
        total += _weighted_tile(
            left_ptr,
            right_ptr,
            rank_ptr,
            post_ptr,
            seed_ptr,
            thresh_ptr,
            weight_ptr,
            tl.load(pick_ptr + j),
            offs_m,
            offs_n,
            M,
            N,
            RP,
            drop_density,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            NATIVE,
            DROP,
            TRIM,
        )
    positive = total >= 0
    # Disjoint merge over the deltas that agree with the elected sign (recomputed: nothing stored).
    num = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    div = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(N_PICKED):
        i = tl.load(pick_ptr + j)
        wd = _weighted_tile(
            left_ptr,
            right_ptr,
            rank_ptr,
            post_ptr,
            seed_ptr,
            thresh_ptr,
            weight_ptr,
            i,
            offs_m,
            offs_n,
            M,
            N,
            RP,
            drop_density,
            BLOCK_M,
            BLOCK_N,
            BLOCK_R,
            NATIVE,
            DROP,
            TRIM,
        )
        agree = tl.where(positive, wd > 0, wd < 0)
        num += tl.where(agree, wd, 0.0)
        if NORMALIZE:
            div += tl.where(agree, tl.load(weight_ptr + i), 0.0)
    if NORMALIZE:
        num = tl.div_rn(num, tl.where(div == 0.0, 1.0, div))
    num = num * lam
    rows = offs_m.to(tl.int64)[:, None]
    cols = offs_n.to(tl.int64)[None, :]
    inside = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    w = tl.load(w_ptr + rows * stride_wm + cols * stride_wn, mask=inside, other=0.0)
    result = round_for_bf16(num + w.to(tl.float32), OUT_BF16)
    tl.store(out_ptr + rows * N + cols, result.to(out_ptr.dtype.element_ty), mask=inside)


class TiesPlan:
    """Validated, packed arguments of one TIES merge, thresholds included (``prepare``)."""

    def __init__(
        self,
        packed: PackedFactors,
        picks: list[int],
        weights: torch.Tensor,
        thresholds: torch.Tensor,
        seeds: torch.Tensor | None,
        drop_density: float,
        lam: float,
        normalize: bool,
        trim: bool,
    ) -> None:
        self.packed = packed
        self.picks = picks
        self.weights = weights
        self.thresholds = thresholds
        self.seeds = seeds
        self.drop_density = drop_density
        self.lam = lam
        self.normalize = normalize
        self.trim = trim


def prepare(
    base: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float],
    *,
    density: float | Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    drop_density: float = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
    transpose: bool = False,
) -> TiesPlan:
    """Validate and pack, and run the threshold passes (``select_thresholds``) when trimming."""
    check_base(base)
    device = base.device
    packed = pack_factors(factors, tuple(base.shape), device, transpose=transpose)
    count = packed.count
    ws = check_weights(weights, count)
    scale = check_density(lam, "lam")
    drop = check_density(drop_density, "drop_density")
    keys = None
    if seeds is not None:
        keys_list = [int(k) for k in seeds]
        if len(keys_list) != count:
            raise InvalidInputError(f"got {len(keys_list)} seeds for {count} adapters")
        if any(not 0 <= k < 1 << 63 for k in keys_list):
            raise InvalidInputError("seeds must lie in [0, 2**63)")
        if drop < 1:  # random_drop keeps everything at density >= 1
            keys = torch.tensor(keys_list, dtype=torch.int64, device=device)
    n = packed.M * packed.N
    if n >= 1 << 31:
        raise InvalidInputError("tensors of 2**31 elements or more are not supported (int32 counters)")
    picks = list(range(count))
    thresholds = [0.0] * count
    trim = density is not None and n > 0
    if trim:
        densities = per_delta_density(density, count)
        picks = [i for i in picks if densities[i] > 0]  # density <= 0: the adapter drops out
        select = [i for i in picks if densities[i] < 1]
        found = select_thresholds(
            packed, select, [keep_count(densities[i], n) for i in select], seeds=keys, drop_density=drop
        )
        for i, t in zip(select, found):
            thresholds[i] = t
        trim = bool(select)
    return TiesPlan(
        packed,
        picks,
        torch.tensor(ws, dtype=torch.float32, device=device),
        torch.tensor(thresholds, dtype=torch.float32, device=device),
        keys,
        drop,
        scale,
        bool(normalize),
        trim,
    )


def _launch(out: torch.Tensor, base: torch.Tensor, plan: TiesPlan) -> torch.Tensor:
    """Run the merge pass into ``out`` (contiguous, ``base``'s shape); every element is written."""
    packed = plan.packed
    if not plan.picks:  # every adapter trimmed away: W' = W
        return out.copy_(base)
    picks = torch.tensor(plan.picks, dtype=torch.int32, device=base.device)
    _ties_merge_kernel[(packed.grid(),)](
        base,
        out,
        packed.left,
        packed.right,
        packed.ranks,
        packed.post,
        picks,
        plan.seeds if plan.seeds is not None else picks,  # never read without DROP
        plan.thresholds,
        plan.weights,
        packed.M,
        packed.N,
        packed.RP,
        len(plan.picks),
        base.stride(0),
        base.stride(1),
        f32(plan.drop_density),
        f32(plan.lam),
        BLOCK_M=packed.block_m,
        BLOCK_N=packed.block_n,
        BLOCK_R=packed.block_r,
        NATIVE=packed.native,
        DROP=plan.seeds is not None,
        TRIM=plan.trim,
        NORMALIZE=plan.normalize,
        OUT_BF16=out.dtype == torch.bfloat16,
        **LAUNCH_OPTIONS,
    )
    return out


def ties_merge_lora(
    base: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    weights: Sequence[float],
    *,
    density: float | Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    drop_density: float = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
    transpose: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """TIES (``density``) / DARE-TIES (``seeds``, ``drop_density``) of LoRA modules onto ``base``.

    Same signature and result as ``adaptr.ops.ties_merge.ties_merge_lora``: per adapter
    ``δ_i = scaling_i·B_i@A_i``, DARE-dropped and rescaled by ``1/drop_density`` with ``seeds``,
    trimmed to its top ``max(1, int(density_i·n))`` magnitudes (exact threshold) when ``density`` is
    given; then sign election on ``Σ w_i·δ_i``, the weighted disjoint mean (``normalize``), × λ,
    + base in float32, one cast. 2-D base and factors only (no convolutions), any float dtypes.

    Returns:
        A new contiguous tensor of ``base``'s shape in ``out_dtype`` (default ``base.dtype``).
    """
    plan = prepare(
        base,
        factors,
        weights,
        density=density,
        seeds=seeds,
        drop_density=drop_density,
        lam=lam,
        normalize=normalize,
        transpose=transpose,
    )
    out = torch.empty(base.shape, dtype=out_dtype or base.dtype, device=base.device)
    if out.numel() == 0:
        return out
    return _launch(out, base, plan)
