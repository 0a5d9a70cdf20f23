"""Pure-torch merge steps: the production CPU path and the oracle for every accelerated kernel.

Each merge strategy (task arithmetic, TIES, DARE, DARE-TIES) is a composition of the step functions
below. They operate on **float32 deltas** ``δ_i = ΔW_i`` of one tensor (callers upcast; nothing here
down-casts), are exact (no approximation anywhere: thresholds are exact order statistics, masks are
exact Bernoulli draws) and never produce NaN for finite inputs.

Semantics follow mergekit 0.1.5's generalized task arithmetic (``merge_methods/generalized_task_arithmetic``
and ``sparsify``) wherever the tools disagree, because that is the form that has paper meaning on full
deltas:

* weights multiply the deltas **before** sign election (``δ̃_i = w_i·δ_i``);
* the disjoint merge is normalised by the **sum of agreeing weights** (TIES with ``normalize: true``);
* exact-zero sums elect ``+`` (as both PEFT and mergekit do);
* trimming keeps ``k = max(1, int(density·n))`` entries per tensor.

DARE's rescale is selectable: ``1/density`` (paper, PEFT) or the L1-norm ratio (mergekit).

Papers: task arithmetic, Ilharco et al., arXiv 2212.04089; TIES-merging, Yadav et al., arXiv 2306.01708;
DARE, Yu et al., arXiv 2311.03099.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from adaptr.errors import InvalidInputError

__all__ = [
    "bernoulli_mask",
    "disjoint_merge",
    "elect_sign",
    "lora_delta",
    "magnitude_threshold",
    "make_generator",
    "random_drop",
    "tensor_seed",
    "ties_merge",
    "trim_by_magnitude",
    "weighted_sum",
]

# ``magnitude_threshold`` streams chunks of 256K elements (1 MiB, L2-resident; 64K when ops run
# single-threaded) through elementwise ops into bin indices and scatter-adds them into one histogram.
_SELECT_CHUNK = 1 << 18
_SELECT_CHUNK_1T = 1 << 16
# Below this many elements a plain ``kthvalue`` is as fast as the radix select.
_SELECT_SMALL = 1 << 16
# Elements per chunk of the fused TIES merge: a handful of 1 MiB buffers stay in L2.
_MERGE_CHUNK = 1 << 16
# Elements per chunk of Bernoulli mask generation.
_MASK_CHUNK = 1 << 20
# Number of buckets of the first radix pass: the top 16 bits of a non-negative float32 (sign bit clear).
_HI_BUCKETS = 1 << 15
_INF_BUCKET = 0x7F80  # top 16 bits of +inf
_LOW_PATTERNS = 1 << 16  # bit patterns per bucket
# ``magnitude_threshold`` guesses the k-th largest from a strided sample of about this many elements
# (odd prime strides, so rows and columns are both sampled evenly), and counts this many buckets exactly.
_SAMPLE_SIZE = 1 << 17
_SAMPLE_STRIDES = (127, 61, 31, 13, 7, 3)
_GUESS_WIDTH = 3
_RESCALE_MODES = ("density", "l1", None)
_F32_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------------------------------------------------
# validation helpers


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32 (the precision every step computes in)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _check_density(density: float, what: str = "density") -> float:
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a number, got {density!r}") from None
    if not math.isfinite(value):
        raise InvalidInputError(f"{what} must be finite, got {density!r}")
    return value


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    values = list(weights)
    if len(values) != count:
        raise InvalidInputError(f"got {len(values)} weights for {count} deltas; give exactly one per delta")
    out: list[float] = []
    for w in values:
        try:
            value = float(w)
        except (TypeError, ValueError):
            raise InvalidInputError(f"weights must be numbers, got {w!r}") from None
        if not math.isfinite(value) or abs(value) > _F32_MAX:
            raise InvalidInputError(f"weights must be finite float32 values, got {w!r}")
        out.append(_f32(value))
    return out


def _check_deltas(deltas: Sequence[Tensor]) -> list[Tensor]:
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


def _check_group(deltas: Sequence[Tensor], weights: Sequence[float]) -> tuple[list[Tensor], list[float]]:
    items = _check_deltas(deltas)
    return items, _check_weights(weights, len(items))


def _per_delta_density(density: float | Sequence[float], count: int) -> list[float]:
    if isinstance(density, Sequence) and not isinstance(density, str):
        values = [_check_density(d) for d in density]
        if len(values) != count:
            raise InvalidInputError(
                f"got {len(values)} densities for {count} deltas; give one or one per delta"
            )
        return values
    return [_check_density(density)] * count  # type: ignore[arg-type]


def _keep_count(density: float, n: int) -> int:
    """``k = max(1, int(density·n))``, mergekit 0.1.5 ``sparsify.magnitude`` (callers handle d ≤ 0, d ≥ 1)."""
    return min(n, max(1, int(density * n)))


# ---------------------------------------------------------------------------------------------------------
# LoRA delta


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
    scale = _check_density(scaling, "scaling")
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
    scale = _check_density(scaling, "scaling")
    a = lora_A.float()
    b = lora_B.float() * scale
    left, right = (a.t(), b.t()) if transpose else (b, a)
    return left[r0:r1] @ right


# ---------------------------------------------------------------------------------------------------------
# exact top-k threshold by radix select


def _bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _float_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _locate_from_top(counts: Tensor, k: int) -> int:
    """Index of the bin holding the k-th element (1-based) counted from the highest bin down."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device))[0])
    return counts.numel() - 1 - j


class _Buffers:
    """Scratch for selections, one set per thread and reused: cache-sized float, index and ones
    buffers. (Fresh buffers would be page-faulted and zeroed by the kernel on every call.)"""

    _local = threading.local()

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.device = device
        self.values = torch.empty(size, dtype=torch.float32, device=device)
        self.index = torch.empty(size, dtype=torch.int32, device=device)
        self.ones = torch.ones(size, dtype=torch.int32, device=device)

    @classmethod
    def get(cls, device: torch.device) -> _Buffers:
        # Smaller pieces suit a single intra-op thread (the merge engine's workers run that way);
        # larger ones amortise torch's thread fan-out when ops run multi-threaded.
        size = _SELECT_CHUNK_1T if torch.get_num_threads() == 1 else _SELECT_CHUNK
        bufs = getattr(cls._local, "bufs", None)
        if bufs is None or bufs.size != size or bufs.device != device:
            bufs = cls._local.bufs = cls(size, device)
        return bufs


def _window_histogram(flat: Tensor, h0: int, width: int, bufs: _Buffers) -> tuple[Tensor, Tensor]:
    """One pass over ``|x|``: exact counts per bit pattern inside a window of top-16-bit buckets,
    and counts per bucket everywhere else.

    The window is buckets ``h0 .. h0+width-1`` (``L = width·65536`` patterns from ``lower = h0 << 16``).
    Each element goes to bin ``min(u, L + (u >> 16))`` with ``u = (bits − lower) & 0x7FFFFFFF``:
    members of the window keep their offset ``u < L``; larger patterns land in ``[L, L + 32768 − h0)``
    (bucket ``h0 + q`` at ``L + q``, the first bucket above the window spread over ``L .. L+width``);
    smaller ones wrap to ``u >= 2**31 − lower`` and land at ``L + 32768 − h0 + their bucket``. Nothing
    outside the window piles onto one counter (on which the scatter-add would serialise), and the bins
    give an exact histogram of all 32768 buckets. Only elementwise int32 ops, no bool masks; counts
    accumulate with ``index_add_`` into one int32 histogram (``bincount`` would allocate a new one and
    scan for its min and max on every call).

    Returns:
        ``(window, buckets)``: counts of the ``L`` window patterns, and of each of the 32768 buckets.
    """
    n = flat.numel()
    lower = h0 << 16
    span = width * _LOW_PATTERNS
    wide = n >= 2**31  # int32 counters would overflow
    counts = torch.zeros(span + _HI_BUCKETS, dtype=torch.int64 if wide else torch.int32, device=flat.device)
    for start in range(0, n, bufs.size):
        size = min(bufs.size, n - start)
        values = bufs.values[:size]
        index = bufs.index[:size]
        torch.abs(flat[start : start + size], out=values)
        bits = values.view(torch.int32)
        bits.sub_(lower).bitwise_and_(0x7FFFFFFF)
        torch.bitwise_right_shift(bits, 16, out=index)
        index.add_(span)
        torch.minimum(bits, index, out=index)
        ones = bufs.ones[:size]
        counts.index_add_(0, index, ones.long() if wide else ones)
    counts = counts.long()
    window, junk = counts[:span], counts[span:]
    buckets = torch.zeros(_HI_BUCKETS, dtype=torch.int64, device=flat.device)
    buckets[h0 : h0 + width] = window.view(width, _LOW_PATTERNS).sum(1)
    if h0 + width < _HI_BUCKETS:
        buckets[h0 + width] = junk[: width + 1].sum()
        buckets[h0 + width + 1 :] = junk[width + 1 : _HI_BUCKETS - h0]
    buckets[:h0] = junk[_HI_BUCKETS - h0 :]
    return window, buckets


def _guess_window(flat: Tensor, k: int) -> tuple[int, int]:
    """Three buckets around the k-th largest ``|x|`` of a strided sample: where the exact one
    almost always lies (a bucket spans 0.8% of a value; the sample's estimate is within ~0.3%)."""
    n = flat.numel()
    stride = next((p for p in _SAMPLE_STRIDES if n // p >= _SAMPLE_SIZE), 1)
    sample = flat[::stride].abs()
    m = sample.numel()
    rank = min(m, max(1, round(k * m / n)))
    if sample.device.type == "cpu":  # numpy's introselect is ~4x faster than torch.kthvalue here
        import numpy as np

        estimate = float(np.partition(sample.numpy(), m - rank)[m - rank])
    else:
        estimate = float(sample.kthvalue(m - rank + 1).values)
    bucket = min(_INF_BUCKET, _float_bits(estimate) >> 16)
    h0 = min(max(0, bucket - 1), _HI_BUCKETS - _GUESS_WIDTH)
    return h0, _GUESS_WIDTH


def magnitude_threshold(x: Tensor, k: int) -> float:
    """The exact k-th largest value of ``|x|`` over the whole tensor.

    ``|x| >= magnitude_threshold(x, k)`` therefore selects at least ``k`` entries, exactly ``k`` when the
    k-th and (k+1)-th largest magnitudes differ. This is the cut-off of TIES "trim" (arXiv 2306.01708,
    top-k% by magnitude) and of mergekit's / PEFT's magnitude pruning, without their full
    ``argsort``/``topk`` and its int64 index tensor.

    Algorithm: an MSD radix select on the IEEE-754 bit pattern (non-negative float32 values order like
    their int32 bit patterns), usually in one pass. A strided sample guesses the top-16-bit buckets
    holding the k-th largest; one histogram pass then counts every bit pattern inside those buckets
    exactly, and every other bucket as a whole (``_window_histogram``). When the k-th largest lies in
    the window, its exact pattern is read off; otherwise the bucket histogram names its bucket and a
    second pass over that bucket pins it down. The sample only decides how fast, never the result.
    Passes stream cache-sized sub-chunks through a few reused buffers (plain elementwise float/int32
    ops; no full-size temporaries, no sort, no int64 index tensor). Tensors of at most 65536 elements
    use ``torch.kthvalue`` directly.

    Args:
        x: a finite tensor of any shape (float32; other float dtypes are upcast, exactly). NaN would
            order above +inf.
        k: rank from the top, ``1 <= k <= x.numel()``.

    Returns:
        The k-th largest ``|x|`` as a Python float (exactly representable in float32).

    Raises:
        InvalidInputError: when ``k`` is outside ``[1, numel]``.
    """
    try:
        k = operator.index(k)
    except TypeError:
        raise InvalidInputError(f"k must be an integer, got {k!r}") from None
    n = x.numel()
    if not 1 <= k <= n:
        raise InvalidInputError(f"k must lie in [1, {n}] for a tensor of {n} elements, got {k}")
    flat = x.detach().reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    if n <= _SELECT_SMALL:
        return float(flat.abs().kthvalue(n - k + 1).values)
    bufs = _Buffers.get(flat.device)
    h0, width = _guess_window(flat, k)
    while True:
        window, buckets = _window_histogram(flat, h0, width, bufs)
        above = int(buckets[h0 + width :].sum())  # elements in higher buckets
        if above < k <= above + int(window.sum()):
            return _bits_to_float((h0 << 16) + _locate_from_top(window, k - above))
        h0, width = _locate_from_top(buckets, k), 1  # exact: the next pass always finds it


# ---------------------------------------------------------------------------------------------------------
# sparsifiers


def trim_by_magnitude(x: Tensor, density: float) -> Tensor:
    """TIES "trim" / magnitude pruning: keep the ``k`` largest entries by ``|x|``, zero the rest.

    ``k = max(1, int(density · numel))`` over the whole tensor, as mergekit 0.1.5's
    ``sparsify.magnitude`` (TIES-merging, arXiv 2306.01708, §3 "Trim"; the paper trims over the whole
    model, mergekit and PEFT per tensor, as here). No rescale. Entries tied with the k-th largest
    magnitude are all kept (deterministic, unlike an argsort cut), so more than ``k`` entries survive
    only when ``|x|`` has ties exactly at the threshold.

    Args:
        x: the delta (float32, any shape).
        density: the fraction of entries to keep.

    Returns:
        ``x`` itself (no copy) when ``density >= 1``; a zero tensor when ``density <= 0`` or ``x`` is
        empty; otherwise a new tensor ``x·[|x| >= t]`` with ``t = magnitude_threshold(x, k)``.

    Raises:
        InvalidInputError: when ``density`` is not a finite number.
    """
    d = _check_density(density)
    if d >= 1:
        return x
    n = x.numel()
    if d <= 0 or n == 0:
        return torch.zeros_like(x)
    threshold = magnitude_threshold(x, _keep_count(d, n))
    return x.masked_fill(x.abs() < threshold, 0)


def tensor_seed(seed: int, tensor_name: str, index: int) -> int:
    """A 63-bit RNG seed for one (merge seed, tensor, adapter) triple.

    ``int.from_bytes(sha256(b"adaptr\\0<seed>\\0<tensor_name>\\0<index>")[:8], "big") & (2**63 - 1)``,
    so every DARE mask is reproducible from the merge seed alone, whatever the order in which tensors
    are processed, the thread that processes them, or which other tensors are merged. (mergekit and
    PEFT draw every mask from the one global torch RNG.)

    Args:
        seed: the merge's seed.
        tensor_name: the tensor's (module) name.
        index: the adapter's position in the merge.

    Returns:
        An integer in ``[0, 2**63)``.

    Raises:
        InvalidInputError: when ``seed`` or ``index`` is not an integer, or ``tensor_name`` not a string.
    """
    try:
        seed = operator.index(seed)
        index = operator.index(index)
    except TypeError:
        raise InvalidInputError(f"seed and index must be integers, got {seed!r} and {index!r}") from None
    if not isinstance(tensor_name, str):
        raise InvalidInputError(f"tensor_name must be a string, got {tensor_name!r}")
    payload = b"\0".join((b"adaptr", str(seed).encode(), tensor_name.encode("utf-8"), str(index).encode()))
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & ((1 << 63) - 1)


def make_generator(
    seed: int, tensor_name: str, index: int, *, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``tensor_seed(seed, tensor_name, index)``.

    Args:
        seed: the merge's seed.
        tensor_name: the tensor's (module) name.
        index: the adapter's position in the merge.
        device: the generator's device (masks must be drawn on the same device).

    Returns:
        The seeded generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, tensor_name, index))
    return generator


def bernoulli_mask(
    shape: torch.Size | Sequence[int],
    density: float,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """A boolean mask whose entries are independently True with probability ``density``.

    Entry ``j`` (row-major) is ``u_j < float32(density)`` with ``u_j`` the j-th float32 of
    ``torch.rand`` from ``generator``, drawn in chunks of 1M into one reused buffer (no full-size float
    temporary). On CPU the draw is bit-identical to ``torch.bernoulli(torch.full(shape, density))`` with
    the same generator state (which is mergekit's ``sparsify.bernoulli`` and PEFT's ``random_pruning``
    mask), so seeding torch's global RNG reproduces their masks; the tests pin this down.

    Args:
        shape: the mask's shape.
        density: the keep probability.
        generator: the RNG; ``None`` uses torch's global RNG.
        device: where to create the mask.

    Returns:
        A bool tensor of ``shape``.
    """
    d = _check_density(density)
    mask = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    flat = mask.view(-1)
    n = flat.numel()
    if n == 0:
        return mask
    chunk = min(n, _MASK_CHUNK)
    buf = torch.empty(chunk, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        torch.rand(size, generator=generator, out=buf[:size])
        torch.lt(buf[:size], d, out=flat[start : start + size])
    return mask


def _drop_chunked(x: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """``x · bernoulli_mask(x.shape, density, generator)`` without materialising the mask.

    The same draws in the same order as ``bernoulli_mask``, turned into 0.0/1.0 floats in place
    (``u < density``) and multiplied in chunk by chunk: float ops only, no bool tensor.
    """
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    chunk = min(n, _MASK_CHUNK)
    buf = torch.empty(chunk, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        keep = buf[:size]
        torch.rand(size, generator=generator, out=keep)
        keep.lt_(density)
        if flat.dtype != torch.float32:
            keep = keep.to(flat.dtype)
        torch.mul(flat[start : start + size], keep, out=out[start : start + size])
    return out.view(x.shape)


def _drop_philox(x: Tensor, density: float, seed: int) -> Tensor:
    """``x`` times the Philox keep mask, chunk by chunk (no full-size mask or counter tensor)."""
    from adaptr.ops.philox import CHUNK, keep_mask_into, keep_mask_np

    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        # numpy straight on the tensors' memory: x·1.0 or x·0.0 per entry, as the torch path does
        src, dst = flat.detach().numpy(), out.numpy()
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            np.multiply(
                src[start:stop], keep_mask_np(seed, start, stop - start, density), out=dst[start:stop]
            )
        return out.view(x.shape)
    buf = torch.empty(min(n, CHUNK), dtype=flat.dtype, device=x.device)
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        keep = keep_mask_into(buf[:size], seed, start, density)
        torch.mul(flat[start : start + size], keep, out=out[start : start + size])
    return out.view(x.shape)


def random_drop(
    x: Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    rescale: str | None = "density",
    seed: int | None = None,
) -> Tensor:
    """DARE "drop and rescale" (arXiv 2311.03099): keep each entry with probability ``density``, rescale.

    The mask is ``bernoulli_mask(x.shape, density, generator=generator)`` unless ``mask`` is given.
    The kept tensor ``m = x·mask`` is then rescaled:

    * ``"density"``: ``m / density``, the paper's ``1/(1−p)`` (and PEFT ``random_pruning(rescale=True)``
      since PEFT #3152); unbiased, ``E[result] = x``.
    * ``"l1"``: ``m · (‖x‖₁ / ‖m‖₁)``, mergekit's ``rescaled_masked_tensor`` with the L1 norm (its
      ``rescale: true``); left unscaled when either norm is below ``1e-7``. The ratio is computed as a
      float32 tensor division, as mergekit does.
    * ``None``: no rescale.

    Args:
        x: the delta (float32, any shape).
        density: the keep probability ``1 − p``.
        generator: RNG for the mask (see ``make_generator``); ``None`` uses torch's global RNG.
        mask: an explicit keep mask of ``x``'s shape (bool, or nonzero = keep); overrides ``generator``.
        rescale: ``"density"``, ``"l1"`` or ``None``.
        seed: a Philox4x32-10 key (see ``adaptr.ops.philox``): entry ``j`` (row-major) is kept iff
            Triton's ``tl.rand4x(seed, j // 4)[j % 4] < float32(density)``. This is what the merge engine uses, so masks
            are bit-identical on any device, thread count or tensor order; overrides ``generator``.

    Returns:
        ``x`` itself when ``density >= 1``; a zero tensor (never NaN) when ``density <= 0``; otherwise a
        new tensor.

    Raises:
        InvalidInputError: for a non-finite density, an unknown ``rescale`` or a mask of another shape.
    """
    d = _check_density(density)
    if rescale not in _RESCALE_MODES:
        raise InvalidInputError(f"rescale must be one of 'density', 'l1' or None, got {rescale!r}")
    if d >= 1:
        return x
    if d <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    if mask is None and seed is not None:
        kept = _drop_philox(x, d, seed)
    elif mask is None:
        kept = _drop_chunked(x, d, generator)
    else:
        if mask.shape != x.shape:
            raise InvalidInputError(f"mask shape {tuple(mask.shape)} does not match {tuple(x.shape)}")
        kept = x * (mask if mask.dtype == torch.bool else mask != 0)
    if rescale == "density":
        kept.div_(d)
    elif rescale == "l1":
        before = x.abs().sum()
        after = kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept.mul_(before / after)
    return kept


# ---------------------------------------------------------------------------------------------------------
# sign election and combination


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
    items, ws = _check_group(deltas, weights)
    total = items[0].float() * ws[0]
    for d, w in zip(items[1:], ws[1:]):
        total.add_(d.float() * w)
    return total >= 0


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
    items, ws = _check_group(deltas, weights)
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
    items, ws = _check_group(deltas, weights)
    total = items[0].float() * ws[0]
    for d, w in zip(items[1:], ws[1:]):
        total.add_(d.float() * w)
    if normalize:
        divisor = torch.tensor(ws, dtype=torch.float32).sum()
        if divisor.abs() >= 1e-8:
            total.div_(divisor)
    return total


# ---------------------------------------------------------------------------------------------------------
# fused TIES


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
    items, ws = _check_group(deltas, weights)
    densities = _per_delta_density(density, len(items))
    scale = _check_density(lam, "lam")
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
            threshold = magnitude_threshold(flat, _keep_count(dens, n))
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
    return _bits_to_float(_float_bits(value) - 1)
