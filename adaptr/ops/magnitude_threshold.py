"""The exact k-th largest magnitude of a tensor (a radix select on float bit patterns), and TIES's trim
built on it. The Triton twin computes the same threshold from ΔW tiles it never stores."""

from __future__ import annotations

import operator
import struct
import threading

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import (
    check_density,
    keep_count,
)

_SELECT_CHUNK = 1 << 18
_SELECT_CHUNK_1T = 1 << 16
# Below this many elements a plain ``kthvalue`` is as fast as the radix select.
_SELECT_SMALL = 1 << 16
# Number of buckets of the first radix pass: the top 16 bits of a non-negative float32 (sign bit clear).
_HI_BUCKETS = 1 << 15
_INF_BUCKET = 0x7F80  # top 16 bits of +inf
_LOW_PATTERNS = 1 << 16  # bit patterns per bucket
# ``magnitude_threshold`` guesses the k-th largest from a strided sample of about this many elements
# (odd prime strides, so rows and columns are both sampled evenly), and counts this many buckets exactly.
_SAMPLE_SIZE = 1 << 17
_SAMPLE_STRIDES = (127, 61, 31, 13, 7, 3)
_GUESS_WIDTH = 3


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def float_bits(value: float) -> int:
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
    bucket = min(_INF_BUCKET, float_bits(estimate) >> 16)
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
            return bits_to_float((h0 << 16) + _locate_from_top(window, k - above))
        h0, width = _locate_from_top(buckets, k), 1  # exact: the next pass always finds it


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
    d = check_density(density)
    if d >= 1:
        return x
    n = x.numel()
    if d <= 0 or n == 0:
        return torch.zeros_like(x)
    threshold = magnitude_threshold(x, keep_count(d, n))
    return x.masked_fill(x.abs() < threshold, 0)


def lora_magnitude_threshold(
    lora_A: Tensor, lora_B: Tensor, scaling: float, k: int, *, transpose: bool = False
) -> float:
    """The exact k-th largest ``|ΔW|`` of one LoRA module, ``ΔW = scaling · B @ A`` (``ΔWᵀ`` when
    ``transpose``): ``magnitude_threshold(lora_delta(...), k)``. The torch twin of the Triton kernel
    of the same name, which finds it from ΔW tiles it never stores.

    Raises:
        InvalidInputError: for factors that do not chain, or ``k`` outside ``[1, numel]``.
    """
    from adaptr.ops.lora_delta import lora_delta

    return magnitude_threshold(lora_delta(lora_A, lora_B, scaling, transpose=transpose), k)
