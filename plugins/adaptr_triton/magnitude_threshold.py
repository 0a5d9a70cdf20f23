"""The exact k-th largest ``|ΔW|`` of LoRA modules, found from ΔW tiles that are never stored.

A two-pass MSD radix select on the float32 bit patterns (non-negative floats order like their
int32 patterns). Pass 1 recomputes every ΔW tile from the factors and counts ``|δ|``'s top 16 bits
(32768 buckets, the sign bit being clear) into a global int32 histogram per adapter with atomic
adds; torch then finds the bucket holding the k-th largest, and how many lie above it. Pass 2
recomputes the tiles and counts the low 16 bits of just the elements in that bucket (65536 bins);
the k-th largest's exact bit pattern is read off. Zeros are not counted (under DARE most entries
are, and they would all hit one counter): the host adds them back. Nothing of size d×k is written:
the histograms are 384 KiB per adapter. Several adapters are selected in the same two launches
(grid axis 1).

Bin counts go straight to global memory with ``tl.atomic_add`` rather than through a per-program
``tl.histogram``: a 32768- or 65536-bin histogram is far too large for one program's registers.

Twin: ``adaptr.ops.magnitude_threshold.lora_magnitude_threshold`` (``magnitude_threshold`` of
``lora_delta``), equal to it exactly whenever the ΔW entries are (the float32 product's summation
order is the only difference).
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import f32
from adaptr.ops.magnitude_threshold import bits_to_float
from adaptr_triton.lora_tiles import (
    LAUNCH_OPTIONS,
    PackedFactors,
    delta_tile,
    keep_tile,
    pack_factors,
    tile_offsets,
)

_HI_BINS = 1 << 15  # top 16 bits of a non-negative float32
_LO_BINS = 1 << 16


@triton.jit
def _magnitude_histogram_kernel(
    # Pointer to the histograms, one row of N_BINS int32 counters per selected adapter (zeroed)
    hist_ptr,
    # Pointers to the packed factors (see lora_tiles.PackedFactors) and the per-adapter tables
    left_ptr,
    right_ptr,
    rank_ptr,
    post_ptr,
    pick_ptr,  # int32: the packed adapter behind each histogram row (program_id(1))
    seed_ptr,  # int64 Philox key of each packed adapter (read only with DROP)
    bucket_ptr,  # int32: each row's top-16-bit bucket (read only in the LOW pass)
    # Matrix dimensions and the padded rank
    M,
    N,
    RP: tl.constexpr,
    # DARE keep probability, float32: δ = keep ? tile / density : 0 (only with DROP)
    drop_density,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NATIVE: tl.constexpr,  # dot 16-bit factors in their dtype
    DROP: tl.constexpr,  # apply the DARE drop and 1/density rescale before selecting
    LOW: tl.constexpr,  # pass 2: count the low 16 bits of the elements in the row's bucket
):
    row = tl.program_id(1)
    i = tl.load(pick_ptr + row)
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N)
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
    bits = tl.abs(tile).to(tl.int32, bitcast=True)
    # Zeros (most of a DARE-dropped delta) are not counted: they would all hit one counter, whose
    # atomics serialise; the host adds them back as n minus everything counted.
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N) & (bits != 0)
    if LOW:
        valid = valid & ((bits >> 16) == tl.load(bucket_ptr + row))
        bins = bits & 0xFFFF
        hist = hist_ptr + tl.cast(row, tl.int64) * 65536
    else:
        bins = bits >> 16
        hist = hist_ptr + tl.cast(row, tl.int64) * 32768
    ones = tl.full((BLOCK_M, BLOCK_N), 1, dtype=tl.int32)
    tl.atomic_add(hist + bins, ones, mask=valid, sem="relaxed")  # counts only: no ordering needed


def _locate_from_top(counts: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the bin holding the k-th element counted from the top, and how many lie above it."""
    from_top = counts.flip(1).cumsum(1)
    j = torch.searchsorted(from_top, k[:, None]).squeeze(1)
    above = torch.where(j > 0, from_top.gather(1, (j - 1).clamp(min=0)[:, None]).squeeze(1), 0)
    return counts.shape[1] - 1 - j, above


def select_thresholds(
    packed: PackedFactors,
    picks: list[int],
    ks: list[int],
    *,
    seeds: torch.Tensor | None = None,
    drop_density: float = 1.0,
) -> list[float]:
    """The exact ``ks[j]``-th largest ``|δ|`` of packed adapter ``picks[j]``, for every j, in two
    histogram launches; ``δ`` is ΔW, or with ``seeds`` its DARE drop rescaled by ``1/drop_density``."""
    if not picks:
        return []
    device = packed.left.device
    rows = len(picks)
    pick = torch.tensor(picks, dtype=torch.int32, device=device)
    k = torch.tensor(ks, dtype=torch.int64, device=device)
    grid = (packed.grid(), rows)
    common = dict(
        M=packed.M,
        N=packed.N,
        RP=packed.RP,
        drop_density=f32(drop_density),
        BLOCK_M=packed.block_m,
        BLOCK_N=packed.block_n,
        BLOCK_R=packed.block_r,
        NATIVE=packed.native,
        DROP=seeds is not None,
        **LAUNCH_OPTIONS,
    )
    seed_arg = seeds if seeds is not None else pick  # never read without DROP
    high = torch.zeros((rows, _HI_BINS), dtype=torch.int32, device=device)
    _magnitude_histogram_kernel[grid](
        high, packed.left, packed.right, packed.ranks, packed.post, pick, seed_arg, pick, LOW=False, **common
    )
    high = high.long()
    zeros = packed.M * packed.N - high.sum(1)
    high[:, 0] += zeros
    bucket, above = _locate_from_top(high, k)
    low = torch.zeros((rows, _LO_BINS), dtype=torch.int32, device=device)
    bucket32 = bucket.to(torch.int32)
    _magnitude_histogram_kernel[grid](
        low,
        packed.left,
        packed.right,
        packed.ranks,
        packed.post,
        pick,
        seed_arg,
        bucket32,
        LOW=True,
        **common,
    )
    low = low.long()
    low[:, 0] += torch.where(bucket == 0, zeros, 0)  # the pattern of +0.0 is bucket 0's first
    pattern, _ = _locate_from_top(low, k - above)
    return [bits_to_float(int(b) << 16 | int(p)) for b, p in zip(bucket.tolist(), pattern.tolist())]


def lora_magnitude_threshold(
    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, k: int, *, transpose: bool = False
) -> float:
    """The exact k-th largest ``|ΔW|``, ``ΔW = scaling · B @ A`` (``ΔWᵀ`` when ``transpose``), from
    tiles recomputed on the fly: two histogram passes over the factors, nothing of ΔW's size stored.

    Same signature and result as ``adaptr.ops.magnitude_threshold.lora_magnitude_threshold`` (exactly
    equal whenever the float32 ΔW entries do not depend on the summation order). 2-D factors only.

    Raises:
        InvalidInputError: for factors that are not 2-D or do not chain, or ``k`` outside ``[1, numel]``.
    """
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise InvalidInputError("lora_magnitude_threshold takes 2-D LoRA factors only")
    shape = (lora_A.shape[1], lora_B.shape[0]) if transpose else (lora_B.shape[0], lora_A.shape[1])
    try:
        k = operator.index(k)
    except TypeError:
        raise InvalidInputError(f"k must be an integer, got {k!r}") from None
    n = shape[0] * shape[1]
    if not 1 <= k <= n:
        raise InvalidInputError(f"k must lie in [1, {n}] for a tensor of {n} elements, got {k}")
    if n >= 1 << 31:
        raise InvalidInputError("tensors of 2**31 elements or more are not supported (int32 counters)")
    packed = pack_factors([(lora_A, lora_B, scaling)], shape, lora_B.device, transpose=transpose)
    return select_thresholds(packed, [0], [k])[0]
