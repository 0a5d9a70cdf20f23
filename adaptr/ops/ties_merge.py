"""TIES sign election and disjoint merge, as steps and fused into one chunked pass that can also add the
base and cast (the production CPU path)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import (
    check_density,
    check_group,
    keep_count,
    per_delta_density,
)
from adaptr.ops.magnitude_threshold import bits_to_float, float_bits, magnitude_threshold
from adaptr.ops.weighted_sum import weighted_sum

# Elements per chunk of the fused TIES merge: a handful of 1 MiB buffers stay in L2.
_MERGE_CHUNK = 1 << 16


def elect_sign(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES "elect" by mass (arXiv 2306.01708, §3): the sign of ``Σ_i w_i·δ_i`` per entry.

    The sum runs left to right over float32 products ``w_i·δ_i`` (weights rounded to float32), as
    mergekit's ``get_mask(method="sum")`` on weighted deltas. An exact-zero sum elects ``+`` (PEFT and
    mergekit do the same; the paper would use the global majority).

    Args:
        deltas: the (already sparsified) deltas, all of one shape.
        weights: one weight per delta.

    Returns:
        ``positive``: a bool tensor of the deltas' shape, True where the elected sign is ``+``
        (``Σ w_i·δ_i >= 0``), False where it is ``−``.

    Raises:
        InvalidInputError: for no deltas, mismatched shapes or a weight count that differs.
    """
    return weighted_sum(deltas, weights) >= 0  # the same float32 products, summed left to right


def disjoint_merge(
    deltas: Sequence[Tensor], weights: Sequence[float], sign: Tensor, *, normalize: bool = True
) -> Tensor:
    """TIES "disjoint merge" (arXiv 2306.01708, §3), weight-normalised as mergekit's ``ties``.

    With ``δ̃_i = w_i·δ_i`` and ``a_i = [sign(δ̃_i) equals the elected sign]`` (so zeros never agree)::

        result = Σ_i δ̃_i·a_i / D,   D = Σ_i w_i·a_i, replaced by 1 where it is exactly 0

    i.e. the weighted mean over the agreeing deltas; where no delta agrees the result is 0. This is
    mergekit's GTA with consensus ``sum`` and ``normalize: true``; with equal weights it is the paper's
    mean over agreeing entries. Agreement is judged on the *weighted* delta (mergekit); for positive
    weights that is the sign of ``δ_i`` itself.

    Args:
        deltas: the (already sparsified) deltas, all of one shape.
        weights: one weight per delta.
        sign: the elected sign as returned by ``elect_sign`` (bool, True = ``+``); a ±1 float tensor is
            accepted too (``> 0`` means ``+``).

    Returns:
        A new float32 tensor of the deltas' shape.

    Raises:
        InvalidInputError: for mismatched shapes or counts.
    """
    items, ws = check_group(deltas, weights)
    if sign.shape != items[0].shape:
        raise InvalidInputError(f"sign shape {tuple(sign.shape)} does not match {tuple(items[0].shape)}")
    positive = sign if sign.dtype == torch.bool else sign > 0
    numerator = torch.zeros_like(items[0], dtype=torch.float32)
    divisor = torch.zeros_like(items[0], dtype=torch.float32)
    for d, w in zip(items, ws):
        weighted = d.float() * w
        agree = torch.where(positive, weighted > 0, weighted < 0)
        numerator.add_(weighted.masked_fill_(~agree, 0))
        divisor.add_(agree.to(torch.float32).mul_(w))
    if not normalize:
        return numerator
    divisor.masked_fill_(divisor == 0, 1)
    return numerator.div_(divisor)


def ties_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float | Sequence[float] = 1.0,
    lam: float = 1.0,
    trim: bool = True,
    normalize: bool = True,
    base: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TIES-merging (arXiv 2306.01708): the fused form of the steps above.

    Bit-for-bit the composition (up to the sign of zeros)::

        trimmed = [trim_by_magnitude(δ_i, density_i) for each i]     # skipped when trim=False
        lam · disjoint_merge(trimmed, weights, elect_sign(trimmed, weights), normalize=normalize)

    which is mergekit's ``ties`` (``normalize: true``) on ``θ_i − θ_base``. With ``trim=False`` and
    deltas already passed through ``random_drop`` it is DARE-TIES (arXiv 2311.03099) with normalisation.

    Instead of materialising each trimmed and weighted delta, it first computes one exact threshold
    per delta (``magnitude_threshold``), then runs trim, election and the disjoint merge together over
    cache-sized chunks of 64K entries with in-place operations. Given ``base``, each chunk is also
    added to the base in float32 and cast once to ``out_dtype``, which is exactly
    ``(base + result).to(out_dtype)`` without the full-size float32 result. The operations are the
    same float32 operations in the same order as the composition, so the result is identical, not
    merely close.

    Args:
        deltas: the deltas ``δ_i``, all of one shape (float32).
        weights: one weight per delta, multiplied in before election.
        density: the fraction of entries each delta keeps (one value or one per delta); ``>= 1`` keeps
            everything, ``<= 0`` drops that delta entirely.
        lam: λ, the scale applied after the disjoint merge (the paper's tuned 0.8–2.5; mergekit
            ``lambda``).
        trim: trim each delta to its density first; False skips trimming (DARE-TIES, or plain
            elect + disjoint merge).
        normalize: divide by the sum of agreeing weights (mergekit ``normalize``; True for ``ties``,
            False is mergekit's ``dare_ties`` default, a sum over agreeing deltas).
        base: optional base weight (any float dtype, the deltas' element count) to add the result to.
        out_dtype: the dtype of the returned tensor when ``base`` is given (default float32).

    Returns:
        A new tensor of the deltas' shape (the base's when given): the merged delta in float32 (zeros
        where no delta agrees), or ``(base + merged delta)`` in ``out_dtype``.

    Raises:
        InvalidInputError: for no deltas, mismatched shapes or counts, or non-finite parameters.
    """
    items, ws = check_group(deltas, weights)
    densities = per_delta_density(density, len(items))
    scale = check_density(lam, "lam")
    n = items[0].numel()
    device = items[0].device
    if base is not None and base.numel() != n:
        raise InvalidInputError(f"base has {base.numel()} elements, the deltas {n}")
    shape = items[0].shape if base is None else base.shape
    out = torch.empty(
        shape, dtype=(out_dtype or torch.float32) if base is not None else torch.float32, device=device
    )

    # One exact threshold per delta, applied as ``hardshrink`` at the next float32 below it
    # (``|x| > prev(t)`` is ``|x| >= t``); None keeps everything. A delta with density <= 0 drops
    # out: its trimmed form is all zeros, which never agrees and adds nothing to the election sum.
    active: list[tuple[Tensor, float, float | None]] = []
    for d, w, dens in zip(items, ws, densities):
        flat = d.detach().reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if not trim or dens >= 1 or n == 0:
            active.append((flat, w, None))
        elif dens > 0:
            threshold = magnitude_threshold(flat, keep_count(dens, n))
            active.append((flat, w, None if threshold == 0 else _below(threshold)))
    result = out.view(-1)
    if not active or n == 0:
        if base is None:
            return out.zero_()
        result.copy_(base.reshape(-1))
        return out

    # Only float32 ops on float32 buffers in the loop: masks are 0.0/1.0 floats, because bool outputs,
    # masked_fill and where are several times slower than arithmetic on CPU.
    base_flat = None if base is None else base.detach().reshape(-1)
    chunk = min(n, _MERGE_CHUNK)
    m = len(active)
    weighted = torch.empty((m, chunk), dtype=torch.float32, device=device)
    scratch = torch.empty(chunk, dtype=torch.float32, device=device)
    total = torch.empty(chunk, dtype=torch.float32, device=device)
    signs = torch.empty(chunk, dtype=torch.float32, device=device)
    upper = torch.empty(chunk, dtype=torch.float32, device=device)
    lower = torch.empty(chunk, dtype=torch.float32, device=device)
    divisor = torch.empty(chunk, dtype=torch.float32, device=device)
    inf = torch.tensor(float("inf"), dtype=torch.float32, device=device)
    signed = any(w < 0 for _, w, _ in active)
    staged = None if base_flat is None and out.dtype == torch.float32 else torch.empty_like(scratch)

    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        stop = start + size
        tmp, tot, sgn, div = scratch[:size], total[:size], signs[:size], divisor[:size]
        hi, lo = upper[:size], lower[:size]
        # Trim and weight each delta: w_i·δ_i·[|δ_i| >= t_i]; accumulate the election sum.
        for i, (flat, w, below) in enumerate(active):
            x = flat[start:stop]
            wd = weighted[i, :size]
            if below is None:
                torch.mul(x, w, out=wd)
            else:
                torch.hardshrink(x, below, out=wd)
                if w != 1:
                    wd.mul_(w)
            if i == 1:
                torch.add(weighted[0, :size], wd, out=tot)
            elif i > 1:
                tot.add_(wd)
        if m == 1:
            tot.copy_(weighted[0, :size])
        # Elect: the sign s of the sum, as bounds [lo, hi] = [0, +inf] for s = +1 and [-inf, 0] for
        # s = -1 (copysign(inf, sum), then its positive and negative parts).
        torch.copysign(inf, tot, out=sgn)
        torch.clamp(sgn, min=0, out=hi)
        torch.clamp(sgn, max=0, out=lo)
        # Disjoint merge: clamp(δ̃_i, lo, hi) is δ̃_i where its sign agrees with s, else 0 (exactly
        # s·relu(s·δ̃_i); sums of them equal the composition's term for term, as negation is exact),
        # and its sign is s·a_i, so |Σ w_i·sign(...)| is the sum of agreeing weights.
        num = result[start:stop] if staged is None else staged[:size]
        for i in range(m):
            c = num if i == 0 else tmp
            torch.clamp(weighted[i, :size], lo, hi, out=c)
            if i > 0:
                num.add_(tmp)
            if not normalize:
                continue
            w = active[i][1]
            if i == 0:
                torch.sign(c, out=div)
                if w != 1:
                    div.mul_(w)
            else:
                tmp.sign_()
                div.add_(tmp, alpha=w)
        if normalize:
            if signed:  # D = s·Σ w_i·sign(...); with no negative weight that is |Σ w_i·sign(...)|
                torch.sign(sgn, out=tmp)
                div.mul_(tmp)
            else:
                div.abs_()
            torch.eq(div, 0, out=tmp)
            div.add_(tmp)  # a divisor of exactly 0 becomes 1; others are unchanged (x + 0 = x)
            num.div_(div)
        if scale != 1:
            num.mul_(scale)
        if base_flat is not None:
            num.add_(base_flat[start:stop])
        if staged is not None:
            result[start:stop].copy_(num)
    return out


def _below(value: float) -> float:
    """The largest float32 below a positive float32 ``value`` (NaN stays NaN, dropping everything)."""
    return bits_to_float(float_bits(value) - 1)


def ties_merge_lora(
    base: Tensor,
    factors: Sequence[tuple[Tensor, Tensor, float]],
    weights: Sequence[float],
    *,
    density: float | Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    drop_density: float = 1.0,
    lam: float = 1.0,
    normalize: bool = True,
    transpose: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TIES / DARE-TIES of LoRA modules onto a base weight: the torch twin (and oracle) of the Triton
    kernel ``adaptr_triton.ties_merge``.

    ``δ_i = lora_delta(A_i, B_i, scaling_i)``; with ``seeds``, ``δ_i = random_drop(δ_i, drop_density,
    seed=seeds[i], rescale="density")`` (DARE); then ``ties_merge(δ, weights, density=density,
    trim=density is not None, lam=lam, normalize=normalize, base=base, out_dtype=out_dtype)``: trim to
    the top-k magnitudes when ``density`` is given, elect signs, weighted disjoint mean, × λ, + base.

    Args:
        base: the base weight (any float dtype), ``d × k`` (``k × d`` when ``transpose``).
        factors: one ``(lora_A, lora_B, scaling)`` per adapter.
        weights: one weight per adapter.
        density: TIES's trim density (one, or one per adapter); None skips the trim (DARE-TIES).
        seeds: optional Philox keys, one per adapter, for DARE's drop.
        drop_density: DARE's keep probability (only with ``seeds``); kept entries are scaled by its
            inverse.
        lam: λ, applied after the disjoint merge.
        normalize: divide by the sum of agreeing weights.
        transpose: the base stores ``ΔWᵀ`` (``fan_in_fan_out``).
        out_dtype: the result's dtype (default ``base.dtype``).

    Returns:
        A new tensor of ``base``'s shape in ``out_dtype``.

    Raises:
        InvalidInputError: for no factors, mismatched counts or shapes, non-finite numbers.
    """
    from adaptr.ops.lora_delta import lora_delta
    from adaptr.ops.random_drop import random_drop

    deltas = [lora_delta(a, b, s, transpose=transpose) for a, b, s in factors]
    if seeds is not None:
        keys = list(seeds)
        if len(keys) != len(deltas):
            raise InvalidInputError(f"got {len(keys)} seeds for {len(deltas)} adapters")
        deltas = [random_drop(d, drop_density, seed=key, rescale="density") for d, key in zip(deltas, keys)]
    for d in deltas:
        if d.shape != base.shape:
            raise InvalidInputError(
                f"a LoRA delta of shape {tuple(d.shape)} does not match the base {tuple(base.shape)}"
            )
    return ties_merge(
        deltas,
        weights,
        density=1.0 if density is None else density,
        lam=lam,
        trim=density is not None,
        normalize=normalize,
        base=base,
        out_dtype=out_dtype or base.dtype,
    )
