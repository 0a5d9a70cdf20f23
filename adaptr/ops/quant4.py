"""bitsandbytes' blockwise 4-bit formats (NF4, FP4) in plain torch, byte for byte as bitsandbytes 0.50.2 on CPU.

Why not call bitsandbytes: its CPU quantizer is a ``torch.bucketize`` over full-size float32 copies
(~0.08 GB/s of bf16 input), and the package is an optional dependency.

The arithmetic is bitsandbytes' own (``backends/default/ops.py``): ``absmax`` per block of
``blocksize`` consecutive elements (row-major, blocks cross rows, the last block may be partial),
``s = x * (1/absmax)`` (``x / absmax`` in the partial block), code index = number of code-book
midpoints strictly below ``s`` (``bucketize``), two codes per byte with element ``2i`` in the high
nibble. Double quantization (``compress_statistics``) is ``offset = absmax.mean()`` and the 8-bit
dynamic map over ``absmax - offset`` in blocks of 256, as bitsandbytes' native CPU kernel computes it
(``v / absmax2``, nearest code, ties to the lower one).

How the index is found without ``bucketize``: ``s`` lies in [-1-ε, 1+ε], so its bits ``b`` give a key
``t = b ^ (b >> 31)`` that increases with ``s`` inside each of 1024 cells ``t >> 21`` and is at most one
midpoint away from a known index there. One int32 table ``carry`` per code book makes
``(t + carry[t >> 21]) >> 21`` that index exactly: a cell's base index plus the carry out of its low
21 bits past the midpoint's key. Per element that is a shift, an xor, a shift, one gather, an add and
a shift, in chunks with reused buffers, on every thread torch may use.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "Quant4",
    "code_book",
    "dequantize_4bit",
    "dynamic_map",
    "quantize_4bit",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# bitsandbytes functional.get_4bit_type: NF4 as hard-coded there; FP4 (e2m1, bias 2) in bit-pattern
# order, divided by its largest magnitude. ``-0`` is Python's int 0 there, so index 8 is +0.0.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_FP4 = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

_SHIFT = 21  # cell = key >> 21: 1024 cells, each holding at most one midpoint of either code book
# Elements per step. Single-threaded: fewer, longer ops beat an L2-sized chunk (each op costs a few
# microseconds of Python and dispatch). With torch threads: large enough that each thread's share
# of an op is still about that size.
_CHUNK = 1 << 17
_CHUNK_MT = 1 << 19
_local = threading.local()


@dataclass
class Quant4:
    """One tensor in bitsandbytes' 4-bit layout (``QuantState`` plus the packed bytes)."""

    packed: Tensor  # uint8 [(n+1)//2, 1]
    absmax: Tensor  # float32 [nblocks], or uint8 [nblocks] codes when double-quantized
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested_absmax: Tensor | None = None  # float32 [ceil(nblocks/256)]
    nested_offset: float | None = None  # a float32 value

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


# ---------------------------------------------------------------------------------------------------------
# code books


@cache
def code_book(quant_type: str) -> Tensor:
    """The 16 code values, indexed by the 4-bit code (float32, as bitsandbytes builds them)."""
    _check_type(quant_type)
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4)
    return data.div_(data.abs().max())


@cache
def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), used for nested absmax."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _key_to_float(t: Tensor) -> Tensor:
    """Inverse of ``t = b ^ (b >> 31)`` for keys of floats in (-2, 2) (int64 in, float32 out)."""
    bits = torch.where(t < (1 << 30), t, ~t).to(torch.int32)
    return bits.view(torch.float32)


@cache
def _carry_table(quant_type: str) -> Tensor:
    """int32 ``carry[cell]`` such that ``(t + carry[t >> 21]) >> 21`` is the sorted bucket of ``s``."""
    code = code_book(quant_type)
    order = torch.argsort(code)  # bitsandbytes: identity for NF4, a remap for FP4
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    width = 1 << _SHIFT
    t0 = torch.arange(1 << (31 - _SHIFT), dtype=torch.int64) << _SHIFT
    t1 = t0 + (width - 1)

    def below(t: Tensor) -> Tensor:  # midpoints strictly below the float with key t
        return torch.bucketize(_key_to_float(t), bounds, right=False).to(torch.int64)

    lo, hi = below(t0), below(t1)
    if bool((hi - lo > 1).any()):  # pragma: no cover - the code books are fixed
        raise AssertionError("a carry cell holds two midpoints")
    # Largest key in each cell that is still at or below the midpoint: bisect on the key.
    a, b = t0.clone(), t1.clone()
    for _ in range(_SHIFT + 1):
        mid = (a + b + 1) // 2
        same = below(mid) == lo
        a = torch.where(same, mid, a)
        b = torch.where(same, b, mid - 1)
    split = hi > lo
    table = (lo << _SHIFT) - t0 + torch.where(split, width - 1 - (a - t0), torch.zeros_like(a))
    return table.to(torch.int32)


@cache
def _code_of_sorted(quant_type: str) -> Tensor:
    return torch.argsort(code_book(quant_type)).to(torch.int32)


# ---------------------------------------------------------------------------------------------------------
# quantize


class _Scratch:
    """One thread's buffers, and every view of them a step needs, for chunks of ``size`` elements.

    Views are made once: on a small VM a slice or ``view`` costs as much as a 16K-element op.
    """

    def __init__(self, size: int, blocksize: int, quant_type: str) -> None:
        self.key = (size, blocksize, quant_type)
        self.f = torch.empty(size, dtype=torch.float32)
        self.t = self.f.view(torch.int32)
        self.blocks = self.f.view(-1, blocksize)
        a = torch.empty(size, dtype=torch.float32)  # |x|, then the cells
        self.abs_blocks = a.view(-1, blocksize)
        self.cell = a.view(torch.int32)
        self.g = torch.empty(size, dtype=torch.int32)
        self.inv = torch.empty(size // blocksize, dtype=torch.float32)
        self.inv_col = self.inv[:, None]
        self.q8 = torch.empty(size, dtype=torch.uint8)
        self.words = self.q8.view(torch.int32)
        self.w = torch.empty(size // 4, dtype=torch.int32)
        self.w16 = self.w.view(torch.int16)
        self.h_blocks = torch.empty(size, dtype=torch.int16).view(-1, blocksize)
        self.h_max = torch.empty(size // blocksize, dtype=torch.int16)
        self.carry = _carry_table(quant_type)
        self.remap = _code_of_sorted(quant_type) if quant_type != "nf4" else None


_TINY = torch.tensor(1e-38)
_S31 = torch.tensor(31, dtype=torch.int32)
_SH = torch.tensor(_SHIFT, dtype=torch.int32)
_S4 = torch.tensor(4, dtype=torch.int32)
_S8 = torch.tensor(8, dtype=torch.int32)
_NOSIGN16 = torch.tensor(0x7FFF, dtype=torch.int16)


def _codes_(s: Tensor, cell: Tensor, g: Tensor, carry: Tensor, remap: Tensor | None) -> Tensor:
    """Overwrite float32 ``s`` (contiguous, in [-2, 2]) with its int32 code indices; returns that view.

    ``cell`` and ``g`` are int32 scratch of the same length.
    """
    t = s.view(torch.int32)
    torch.bitwise_right_shift(t, _S31, out=cell)
    t.bitwise_xor_(cell)
    torch.bitwise_right_shift(t, _SH, out=cell)
    torch.index_select(carry, 0, cell, out=g)
    t.add_(g).bitwise_right_shift_(_SH)
    if remap is not None:  # FP4 codes are not in value order
        torch.index_select(remap, 0, t, out=g)
        t.copy_(g)
    return t


def _pack_(q: Tensor, q8: Tensor, words: Tensor, w: Tensor, w16: Tensor, out: Tensor) -> None:
    """``out[i] = q[2i] << 4 | q[2i+1]`` for int32 codes ``q`` (length a multiple of 4).

    ``q8`` (uint8, len(q)), ``words`` (its int32 view), ``w`` (int32, len(q)/4) and ``w16`` (its int16
    view) are scratch.
    Four codes per word ``c0 | c1<<8 | c2<<16 | c3<<24`` become ``(w << 4) | (w >> 8)``, whose bytes 0
    and 2 are the two packed bytes; narrowing the word's int16 halves to uint8 keeps exactly those.
    """
    q8.copy_(q)
    torch.bitwise_left_shift(words, _S4, out=w)
    words.bitwise_right_shift_(_S8)
    w.bitwise_or_(words)
    out.copy_(w16)


def _chunk(x: Tensor, absmax: Tensor, out: Tensor, sc: _Scratch) -> None:
    """Quantize one full chunk ``x`` into its ``absmax`` and ``out`` slices."""
    if x.dtype == torch.float32:
        sc.f.copy_(x)
        torch.abs(sc.blocks, out=sc.abs_blocks)
        torch.amax(sc.abs_blocks, 1, out=absmax)
    else:  # 16-bit floats: the largest magnitude is the largest sign-less bit pattern, at half the bytes
        torch.bitwise_and(x.view(torch.int16).view(sc.h_blocks.shape), _NOSIGN16, out=sc.h_blocks)
        torch.amax(sc.h_blocks, 1, out=sc.h_max)
        absmax.copy_(sc.h_max.view(x.dtype))
        sc.f.copy_(x)
    torch.clamp_min(absmax, _TINY, out=sc.inv)
    torch.reciprocal(sc.inv, out=sc.inv)
    sc.blocks.mul_(sc.inv_col)
    q = _codes_(sc.f, sc.cell, sc.g, sc.carry, sc.remap)
    _pack_(q, sc.q8, sc.words, sc.w, sc.w16, out)


def _run_chunks(flat: Tensor, out: Tensor, absmax: Tensor, blocksize: int, qt: str) -> int:
    """Quantize the whole chunks of ``flat``; returns how many elements that covered (the rest is ``_tail``'s).

    With several torch threads the chunks are larger and every op fans out over them (torch's own
    intra-op threads); a Python thread pool loses here, since each op hands the GIL over again.
    """
    step = _step(blocksize, _CHUNK if torch.get_num_threads() == 1 else _CHUNK_MT)
    full = flat.numel() // step * step
    if not full:
        return 0
    key = (step, blocksize, qt)
    sc = getattr(_local, "scratch", None)
    if sc is None or sc.key != key:  # one set of buffers per thread, kept: no page faults per tensor
        sc = _local.scratch = _Scratch(step, blocksize, qt)
    for x, am, o in zip(
        flat[:full].view(-1, step).unbind(0),
        absmax[: full // blocksize].view(-1, step // blocksize).unbind(0),
        out[: full // 2].view(-1, step // 2).unbind(0),
    ):
        _chunk(x, am, o, sc)
    return full


def _step(blocksize: int, target: int) -> int:
    return max(blocksize, target // blocksize * blocksize)


def _tail(x: Tensor, blocksize: int, qt: str) -> tuple[Tensor, Tensor]:
    """The last partial chunk the plain way: packed bytes and absmax (bitsandbytes' partial-block rules)."""
    f = x.float()
    n = f.numel()
    full = n - n % blocksize
    s = torch.zeros(-(-n // 4) * 4, dtype=torch.float32)  # odd n: padded with 0.0, as bitsandbytes pads
    parts = []
    if full:
        am = f[:full].view(-1, blocksize).abs().amax(1)
        s[:full] = (f[:full].view(-1, blocksize) * (1.0 / am.clamp(min=1e-38)).view(-1, 1)).reshape(-1)
        parts.append(am)
    if n > full:
        am = f[full:].abs().max().clamp(min=1e-38)  # the partial block keeps the clamped value
        s[full:n] = f[full:] / am
        parts.append(am.reshape(1))
    m = s.numel()
    remap = _code_of_sorted(qt) if qt != "nf4" else None
    q = _codes_(
        s, torch.empty(m, dtype=torch.int32), torch.empty(m, dtype=torch.int32), _carry_table(qt), remap
    )
    packed = torch.empty(m // 2, dtype=torch.uint8)
    q8 = torch.empty(m, dtype=torch.uint8)
    w = torch.empty(m // 4, dtype=torch.int32)
    _pack_(q, q8, q8.view(torch.int32), w, w.view(torch.int16), packed)
    return packed[: (n + 1) // 2], torch.cat(parts) if parts else torch.empty(0)


def quantize_4bit(
    x: Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False
) -> Quant4:
    """``bitsandbytes.functional.quantize_4bit(x, blocksize, compress_statistics=double_quant, quant_type)``.

    Same packed bytes and absmax (and nested statistics) as bitsandbytes 0.50.2 on CPU; the nested
    ``offset`` is ``absmax.mean()`` like there, so it matches when both run with the same torch
    thread count (torch's float sum order depends on it).
    """
    _check_type(quant_type)
    check_blocksize(blocksize)
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(
            f"4-bit quantization takes float16, bfloat16 or float32 tensors, got {x.dtype}"
        )
    if x.device.type != "cpu":
        x = x.cpu()
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise InvalidInputError("cannot quantize an empty tensor")
    nblocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    full = _run_chunks(flat, packed, absmax, blocksize, quant_type)
    if full < n:
        tail_packed, tail_absmax = _tail(flat[full:], blocksize, quant_type)
        packed[full // 2 :] = tail_packed
        absmax[full // blocksize :] = tail_absmax
    if not bool(torch.isfinite(absmax).all()):
        raise InvalidInputError("cannot quantize a tensor with NaN or infinite values")
    q = Quant4(packed.view(-1, 1), absmax, tuple(x.shape), x.dtype, blocksize, quant_type)
    if double_quant:
        q.absmax, q.nested_absmax, q.nested_offset = _quantize_absmax(absmax)
    return q


@cache
def _dynamic_lut() -> Tensor:
    """bitsandbytes' CPU kernel table: for 65536 evenly spaced points of [-1, 1], the nearest code."""
    code = dynamic_map()
    mid = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(65536, dtype=torch.float32)
    return torch.bucketize(-1.0 + (2.0 * i) / 65535.0, mid, right=False).to(torch.uint8)


def _quantize_absmax(absmax: Tensor) -> tuple[Tensor, Tensor, float]:
    """Nested statistics: bitsandbytes' native CPU ``quantize_blockwise(absmax - offset, blocksize=256)``.

    That kernel does not search the code book: it rounds ``(clamp(v/absmax2, -1, 1) + 1) / 2`` to one of
    65536 steps and looks the code up in a table, so a value may get the second-nearest code.
    """
    offset = absmax.mean()
    v = absmax - offset
    n = v.numel()
    nb = -(-n // NESTED_BLOCKSIZE)
    padded = torch.zeros(nb * NESTED_BLOCKSIZE, dtype=torch.float32)
    padded[:n] = v
    blocks = padded.view(nb, NESTED_BLOCKSIZE)
    amax = blocks.abs().amax(1)  # the zero padding never raises a block's max
    inv = torch.where(amax > 0, 1.0 / amax, torch.zeros_like(amax))
    t = (blocks * inv[:, None]).clamp_(-1.0, 1.0)
    t = (t + 1.0) * 0.5 * 65535.0 + 0.5
    idx = _dynamic_lut()[t.to(torch.int64).reshape(-1)[:n]]
    idx[(amax == 0).repeat_interleave(NESTED_BLOCKSIZE)[:n]] = 0  # the kernel writes 0 for an all-zero block
    return idx, amax, float(offset)


# ---------------------------------------------------------------------------------------------------------
# dequantize


@cache
def _pair_table(quant_type: str) -> Tensor:
    """For each byte, the two float32 codes it holds (high nibble first), as one int64 per byte."""
    code = code_book(quant_type)
    b = torch.arange(256)
    pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()
    return pairs.view(torch.int64).reshape(256)


def dequantize_absmax(q: Quant4) -> Tensor:
    """The float32 per-block absmax (undoing double quantization like bitsandbytes' CPU kernel)."""
    if not q.nested:
        return q.absmax
    assert q.nested_absmax is not None and q.nested_offset is not None
    n = q.absmax.numel()
    vals = dynamic_map()[q.absmax.long()]
    nb = q.nested_absmax.numel()
    scale = q.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n] if nb * NESTED_BLOCKSIZE != n else None
    if scale is None:
        vals = (vals.view(nb, NESTED_BLOCKSIZE) * q.nested_absmax[:, None]).reshape(-1)
    else:
        vals = vals * scale
    return vals + torch.tensor(q.nested_offset, dtype=torch.float32)


def dequantize_4bit(q: Quant4, dtype: torch.dtype | None = None) -> Tensor:
    """``bitsandbytes.functional.dequantize_4bit``: ``code[idx] * absmax`` in float32, then cast to ``dtype``.

    ``dtype`` defaults to the quantized tensor's own dtype (as bitsandbytes does).
    """
    dtype = dtype or q.dtype
    n = math.prod(q.shape)
    absmax = dequantize_absmax(q).float()
    packed = q.packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    out = torch.empty(n, dtype=dtype)
    table = _pair_table(q.quant_type)
    bs = q.blocksize
    step = _step(bs, _CHUNK)
    idx = torch.empty(step // 2, dtype=torch.int32)
    vals = torch.empty(step // 2, dtype=torch.int64)
    full = (n // step) * step
    for start in range(0, full, step):
        torch.index_select(table, 0, idx.copy_(packed[start // 2 : (start + step) // 2]), out=vals)
        f = vals.view(torch.float32).view(-1, bs)
        f.mul_(absmax[start // bs : (start + step) // bs, None])
        out[start : start + step].copy_(f.reshape(-1))
    if full < n:
        rest = packed[full // 2 :].long()
        f = table[rest].view(torch.float32)[: n - full]
        scale = absmax[full // bs :].repeat_interleave(bs)[: n - full]
        out[full:] = f * scale
    return out.view(q.shape)


# ---------------------------------------------------------------------------------------------------------
# validation


def _check_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise InvalidInputError(f"4-bit quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def check_blocksize(blocksize: object) -> int:
    """bitsandbytes' accepted 4-bit block sizes, or a one-line InvalidInputError."""
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        allowed = ", ".join(str(b) for b in BLOCKSIZES)
        raise InvalidInputError(f"blocksize must be one of {allowed}; got {blocksize!r}")
    return int(blocksize)  # type: ignore[call-overload]
