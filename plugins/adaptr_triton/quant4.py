"""NF4/FP4 4-bit quantize and dequantize in Triton, byte for byte as :mod:`adaptr.ops.quant4`.

Same signatures and the same :class:`~adaptr.ops.quant4.Quant4` as the torch twins, but every result
stays on the input's device (the torch reference moves to the CPU).

``quantize_4bit``: one kernel reads ``x`` once and writes the packed bytes and the per-block absmax.
Each program takes ``BLOCKS_PER_PROG`` whole quant blocks as one ``[blocks, blocksize]`` tile (contiguous,
so loads vectorize), and ``tl.split`` of its ``[blocks, blocksize/2, 2]`` view pairs the two nibbles of
a byte. The arithmetic is the reference's, in float32, op for op:

* ``absmax`` = the largest ``|x|``, taken as the largest sign-less float32 bit pattern (an integer max:
  exact, and a NaN or inf in the block wins, so the finiteness check after the kernel sees it);
* a whole block: ``s = x * (1 / max(absmax, 1e-38))``; the partial last block (``n % blocksize``
  elements) ``s = x / max(absmax, 1e-38)`` and stores the clamped absmax, as the reference does. Both
  divisions are ``tl.math.div_rn`` (correctly rounded, as torch's ``/`` and ``reciprocal`` are on the
  CPU; plain ``/`` in Triton may be approximate on a GPU), and only the last program ever divides
  per element;
* code index by the reference's ``carry`` trick on the bits of ``s`` (its own ``carry`` and FP4
  ``remap`` tables, loaded as tiny lookup tensors), masked lanes of the partial block are ``+0.0``,
  which is the reference's padding of an odd ``n``;
* two codes per byte, element ``2i`` in the high nibble.

Double quantization: the nested statistics run over the small absmax vector (``n / blocksize``
floats) with the torch reference's own ``_quantize_absmax``, on the CPU: its ``offset =
absmax.mean()`` depends on torch's summation order, so only that function gives the same float32
offset. The absmax vector goes to the CPU and its three results come back; every per-element step is
in Triton.

``dequantize_4bit``: one kernel reads each packed byte once (plus the per-block absmax, or its uint8
code, the nested scale and the offset when double-quantized) and writes the output once: unpack,
code-book lookup, ``dynamic_map[code] * nested_absmax[block // 256] + offset`` (two float32 roundings,
like ``dequantize_absmax``), ``value * absmax`` in float32, then the cast to ``dtype``.

bfloat16 goes in and out as its int16 bits: widening is a 16-bit shift, narrowing is torch's
round-to-nearest-even done on the bits (Triton's interpreter truncates a float32 -> bfloat16 cast; a
GPU rounds; the bits are the same on both). Kernels launch with ``enable_fp_fusion=False`` so a GPU compiler never fuses a multiply and an add
into one FMA (one rounding instead of the reference's two). Block sizes come from the shape (no
autotuning); only triton APIs of 3.6 and earlier are used.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from adaptr.errors import InvalidInputError
from adaptr.ops.quant4 import (
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    Quant4,
    _carry_table,
    _check_type,
    _code_of_sorted,
    _quantize_absmax,
    check_blocksize,
    code_book,
    dynamic_map,
)

__all__ = ["dequantize_4bit", "quantize_4bit"]

_TILE = 2048  # elements per program (several quant blocks when the blocksize is smaller)
_TINY = torch.tensor(1e-38, dtype=torch.float32)  # the reference's clamp, rounded as torch rounds it


@triton.jit
def _quantize_kernel(
    x_ptr,  # *Pointer* to the flat input (float32 or float16; bfloat16 as its int16 bits), n elements
    packed_ptr,  # *Pointer* to the packed output, uint8, (n + 1) // 2 bytes
    absmax_ptr,  # *Pointer* to the per-block absmax output, float32, nblocks values
    carry_ptr,  # *Pointer* to the reference's int32 carry table (1024 cells)
    remap_ptr,  # *Pointer* to the int32 sorted-index -> code table (16 entries; FP4 only)
    tiny_ptr,  # *Pointer* to one float32: the 1e-38 clamp
    n,  # Number of input elements
    nbytes,  # Number of packed bytes, (n + 1) // 2 (its own argument: aligned, it lets stores vectorize)
    nblocks,  # Number of quant blocks, ceil(n / BLOCKSIZE)
    BLOCKSIZE: tl.constexpr,  # Elements per quant block (32..4096, a power of two)
    BLOCKS_PER_PROG: tl.constexpr,  # Quant blocks each program handles
    REMAP: tl.constexpr,  # Whether codes are not in value order (FP4)
    PARTIAL: tl.constexpr,  # Whether the last quant block is partial (n % BLOCKSIZE != 0)
    X_BF16: tl.constexpr,  # Whether x holds bfloat16 bits (widened by a shift: exact everywhere)
):
    pid = tl.program_id(axis=0)
    # int64 from the start: block * BLOCKSIZE may pass 2**31.
    blk = pid.to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # [B]
    e = tl.arange(0, BLOCKSIZE)  # element within the block
    offs = blk[:, None] * BLOCKSIZE + e[None, :]  # [B, BLOCKSIZE]
    if X_BF16:
        h = tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.int32)
        x = (h << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)

    # absmax: the largest sign-less bit pattern is the largest |x| (NaN and inf win over any number).
    mag = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    am = tl.max(mag, axis=1).to(tl.float32, bitcast=True)  # [B]
    tiny = tl.load(tiny_ptr)
    amc = tl.where(am < tiny, tiny, am)  # clamp that keeps a NaN (like torch's clamp)
    inv = tl.math.div_rn(tl.full([BLOCKS_PER_PROG], 1.0, tl.float32), amc)
    s = x * inv[:, None]
    if PARTIAL:
        last = blk == nblocks - 1
        am = tl.where(last, amc, am)  # the partial block stores its clamped absmax
        if pid == tl.num_programs(axis=0) - 1:  # only this program divides per element
            s = tl.where(last[:, None], tl.math.div_rn(x, tl.broadcast_to(amc[:, None], x.shape)), s)

    # Code index: the reference's carry trick on the bits of s.
    b = s.to(tl.int32, bitcast=True)
    t = b ^ (b >> 31)
    q = (t + tl.load(carry_ptr + (t >> 21))) >> 21
    if REMAP:
        q = tl.load(remap_ptr + (q & 15))  # & 15 keeps a NaN's garbage index in bounds (it raises later)

    # Two codes per byte, element 2i in the high nibble.
    hi, lo = tl.split(tl.reshape(q, [BLOCKS_PER_PROG, BLOCKSIZE // 2, 2]))
    j = tl.arange(0, BLOCKSIZE // 2)
    boffs = blk[:, None] * (BLOCKSIZE // 2) + j[None, :]  # [B, BLOCKSIZE / 2]
    tl.store(packed_ptr + boffs, ((hi << 4) | lo).to(tl.uint8), mask=boffs < nbytes)
    tl.store(absmax_ptr + blk, am, mask=blk < nblocks)


@triton.jit
def _dequantize_kernel(
    packed_ptr,  # *Pointer* to the packed codes, uint8, (n + 1) // 2 bytes
    absmax_ptr,  # *Pointer* to the per-block absmax (float32), or its uint8 dynamic-map codes if NESTED
    nested_absmax_ptr,  # *Pointer* to the float32 nested scales, one per 256 blocks (NESTED only)
    offset_ptr,  # *Pointer* to one float32: the nested offset (NESTED only)
    dmap_ptr,  # *Pointer* to the float32 dynamic map (256 entries; NESTED only)
    code_ptr,  # *Pointer* to the float32 code book (16 entries)
    out_ptr,  # *Pointer* to the output, n elements (float32 or float16; bfloat16 as its int16 bits)
    n,  # Number of output elements
    nbytes,  # Number of packed bytes, (n + 1) // 2 (its own argument: aligned, it lets loads vectorize)
    nblocks,  # Number of quant blocks, ceil(n / BLOCKSIZE)
    BLOCKSIZE: tl.constexpr,  # Elements per quant block (32..4096, a power of two)
    BLOCKS_PER_PROG: tl.constexpr,  # Quant blocks each program handles
    NESTED: tl.constexpr,  # Whether the absmax is double-quantized
    NESTED_BLOCKSIZE: tl.constexpr,  # Quant blocks per nested scale (256)
    OUT_BF16: tl.constexpr,  # Whether out takes bfloat16 bits, rounded to nearest even as torch rounds
):
    pid = tl.program_id(axis=0)
    blk = pid.to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # [B]
    in_range = blk < nblocks
    if NESTED:
        c = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        am = tl.load(dmap_ptr + c) * scale  # rounded here: no FMA (enable_fp_fusion=False)
        am = am + tl.load(offset_ptr)
    else:
        am = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)

    j = tl.arange(0, BLOCKSIZE // 2)
    boffs = blk[:, None] * (BLOCKSIZE // 2) + j[None, :]  # [B, BLOCKSIZE / 2]
    byte = tl.load(packed_ptr + boffs, mask=boffs < nbytes, other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4)) * am[:, None]  # element 2i
    lo = tl.load(code_ptr + (byte & 15)) * am[:, None]  # element 2i + 1
    val = tl.reshape(tl.join(hi, lo), [BLOCKS_PER_PROG, BLOCKSIZE])
    e = tl.arange(0, BLOCKSIZE)
    offs = blk[:, None] * BLOCKSIZE + e[None, :]  # [B, BLOCKSIZE]
    if OUT_BF16:
        # torch's float32 -> bfloat16 (round to nearest even) on the bits: the same on a GPU and in
        # the interpreter (whose own cast truncates). Values are finite: no NaN case.
        u = val.to(tl.int32, bitcast=True)
        r = ((u + ((u >> 16) & 1) + 0x7FFF) >> 16) & 0xFFFF
        tl.store(out_ptr + offs, r.to(tl.int16), mask=offs < n)
    else:
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=offs < n)


# ---------------------------------------------------------------------------------------------------------
# host side


@cache
def _tables(quant_type: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reference's lookup tables on ``device``: carry, remap, code book, dynamic map, the clamp."""
    return (
        _carry_table(quant_type).to(device),
        _code_of_sorted(quant_type).to(device),
        code_book(quant_type).to(device),
        dynamic_map().to(device),
        _TINY.to(device),
    )


def _empty(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output buffer comes from here (tests poison it)."""
    return torch.empty(size, dtype=dtype, device=device)


def _launch(blocksize: int, nblocks: int) -> tuple[int, tuple[int], int]:
    """Blocks per program, the grid and the warp count for a tensor of ``nblocks`` quant blocks."""
    per_prog = max(1, _TILE // blocksize)
    warps = 4 if per_prog * blocksize <= 2048 else 8
    return per_prog, (triton.cdiv(nblocks, per_prog),), warps


def quantize_4bit(
    x: Tensor, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False
) -> Quant4:
    """Triton twin of :func:`adaptr.ops.quant4.quantize_4bit`: the same bytes, on ``x``'s device.

    The nested statistics (``double_quant``) come from the reference's ``_quantize_absmax`` on a CPU
    copy of the absmax vector, since its ``offset = absmax.mean()`` is order-dependent.
    """
    _check_type(quant_type)
    check_blocksize(blocksize)
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidInputError(
            f"4-bit quantization takes float16, bfloat16 or float32 tensors, got {x.dtype}"
        )
    flat = x.detach().contiguous().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise InvalidInputError("cannot quantize an empty tensor")
    device = flat.device
    nblocks = -(-n // blocksize)
    packed = _empty((n + 1) // 2, torch.uint8, device)
    absmax = _empty(nblocks, torch.float32, device)
    carry, remap, _, _, tiny = _tables(quant_type, device)
    per_prog, grid, warps = _launch(blocksize, nblocks)
    _quantize_kernel[grid](
        flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat,
        packed,
        absmax,
        carry,
        remap,
        tiny,
        n,
        (n + 1) // 2,
        nblocks,
        BLOCKSIZE=blocksize,
        BLOCKS_PER_PROG=per_prog,
        REMAP=quant_type != "nf4",
        PARTIAL=n % blocksize != 0,
        X_BF16=flat.dtype == torch.bfloat16,
        num_warps=warps,
        enable_fp_fusion=False,
    )
    if not bool(torch.isfinite(absmax).all()):
        raise InvalidInputError("cannot quantize a tensor with NaN or infinite values")
    q = Quant4(packed.view(-1, 1), absmax, tuple(x.shape), x.dtype, blocksize, quant_type)
    if double_quant:
        codes, nested_absmax, offset = _quantize_absmax(absmax.cpu())
        q.absmax, q.nested_absmax, q.nested_offset = codes.to(device), nested_absmax.to(device), offset
    return q


def dequantize_4bit(q: Quant4, dtype: torch.dtype | None = None) -> Tensor:
    """Triton twin of :func:`adaptr.ops.quant4.dequantize_4bit`, on the device of ``q.packed``.

    ``dtype`` defaults to the quantized tensor's own dtype; float32, float16 and bfloat16 are
    supported (the reference also casts to other dtypes; this raises InvalidInputError for them).
    """
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise InvalidInputError(f"4-bit dequantization writes float16, bfloat16 or float32, got {dtype}")
    _check_type(q.quant_type)
    check_blocksize(q.blocksize)
    n = math.prod(q.shape)
    packed = q.packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    device = packed.device
    nblocks = -(-n // q.blocksize)
    if packed.numel() != (n + 1) // 2 or q.absmax.numel() != nblocks:
        raise InvalidInputError(
            f"4-bit tensor of shape {q.shape} needs {(n + 1) // 2} packed bytes and {nblocks} absmax "
            f"values, got {packed.numel()} and {q.absmax.numel()}"
        )
    _, _, code, dmap, _ = _tables(q.quant_type, device)
    if q.nested:
        assert q.nested_absmax is not None and q.nested_offset is not None
        absmax = q.absmax.to(device=device, dtype=torch.uint8)
        nested_absmax = q.nested_absmax.to(device=device, dtype=torch.float32)
        offset = torch.tensor(q.nested_offset, dtype=torch.float32).to(device)  # rounded as the reference
    else:
        absmax = q.absmax.to(device=device, dtype=torch.float32)
        nested_absmax = offset = absmax  # unused
    out = _empty(n, dtype, device)
    if n:
        per_prog, grid, warps = _launch(q.blocksize, nblocks)
        _dequantize_kernel[grid](
            packed,
            absmax,
            nested_absmax,
            offset,
            dmap,
            code,
            out.view(torch.int16) if dtype == torch.bfloat16 else out,
            n,
            (n + 1) // 2,
            nblocks,
            BLOCKSIZE=q.blocksize,
            BLOCKS_PER_PROG=per_prog,
            NESTED=q.nested,
            NESTED_BLOCKSIZE=NESTED_BLOCKSIZE,
            OUT_BF16=dtype == torch.bfloat16,
            num_warps=warps,
            enable_fp_fusion=False,
        )
    return out.view(q.shape)
