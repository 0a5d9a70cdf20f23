"""Philox4x32-10 on the CPU, bit-identical to Triton's ``tl.randint4x``/``tl.rand4x``.

DARE masks must not depend on device, thread count or the order tensors are merged in.
A counter-based generator gives that: the random number of element ``j`` is a pure
function of (key, j). Using Triton's exact variant means a GPU kernel and this CPU code
draw the same mask.

Counter (c0, c1, c2, c3) = (offset low 32 bits, offset high 32 bits, 0, 0); key
(k0, k1) = (seed low 32 bits, seed high 32 bits); 10 rounds; four uint32 outputs per
counter (``tl.randint`` is the first of them). A mask uses all four: element ``j`` takes
output ``j % 4`` of counter ``j // 4``, i.e. ``tl.rand4x(key, j // 4)[j % 4]``, which is
a quarter of the work of one counter per element.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32-bit draws
CHUNK = 1 << 16  # elements per pass: 16K counters, whose uint32/uint64 working arrays stay in L2


def _randint_np(seed: int, offsets: np.ndarray, n_rounds: int) -> np.ndarray:
    return _philox_np(seed, offsets, n_rounds)[0]


def _philox_np(seed: int, offsets: np.ndarray, n_rounds: int) -> tuple[np.ndarray, ...]:
    # numpy has native wrapping uint32/uint64 arithmetic (torch's int64 ops are far slower on the
    # CPU). Each 32x32->64-bit product is viewed as (lo, hi) uint32 halves instead of shifted and
    # masked, and the product buffers alternate so last round's halves stay valid: 6 ops a round.
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    off = offsets.astype(np.uint64, copy=False)
    n = off.shape[0]
    halves = off.view(np.uint32)  # little-endian: [lo, hi] per offset
    c0, c1 = halves[0::2], halves[1::2]
    c2 = np.zeros(n, dtype=np.uint32)
    c3 = np.zeros(n, dtype=np.uint32)
    prods = [np.empty(n, dtype=np.uint64) for _ in range(4)]
    outs = [np.empty(n, dtype=np.uint32) for _ in range(4)]
    ra, rb = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    for r in range(n_rounds):
        pb, pa = prods[2 * (r % 2)], prods[2 * (r % 2) + 1]
        n0, n2 = outs[2 * (r % 2)], outs[2 * (r % 2) + 1]
        np.multiply(c2, rb, out=pb)
        np.multiply(c0, ra, out=pa)
        b32, a32 = pb.view(np.uint32), pa.view(np.uint32)
        np.bitwise_xor(b32[1::2], c1, out=n0)
        n0 ^= np.uint32(k0)
        np.bitwise_xor(a32[1::2], c3, out=n2)
        n2 ^= np.uint32(k1)
        c0, c1, c2, c3 = n0, b32[0::2], n2, a32[0::2]
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """Triton ``tl.randint(seed, offsets)``: one uint32 per offset, returned in an int64 tensor."""
    bits = _randint_np(seed, offsets.to(torch.int64).cpu().numpy(), n_rounds)
    return torch.from_numpy(bits.astype(np.int64)).to(offsets.device)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint32 → float32 in [0, 1): reinterpret as int32, fold negatives with ``~x``, scale."""
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)  # as signed int32
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


def philox_uniform(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> torch.Tensor:
    """Triton ``tl.rand(seed, offsets)``: float32 uniforms in [0, 1)."""
    return uniform_from_bits(philox_randint(seed, offsets, n_rounds))


def philox_randint4x(seed: int, offsets: torch.Tensor, n_rounds: int = 10) -> tuple[torch.Tensor, ...]:
    """Triton ``tl.randint4x(seed, offsets)``: four uint32 per offset, each in an int64 tensor."""
    outs = _philox_np(seed, offsets.to(torch.int64).cpu().numpy(), n_rounds)
    return tuple(torch.from_numpy(o.astype(np.int64)).to(offsets.device) for o in outs)


def mask_uniforms(seed: int, start: int, n: int) -> torch.Tensor:
    """The uniforms a DARE mask compares with for elements ``start .. start+n-1``:
    ``tl.rand4x(seed, j // 4)[j % 4]`` for element ``j``."""
    return uniform_from_bits(torch.from_numpy(_mask_bits(seed, start, n).astype(np.int64) & _M32))


def _mask_bits(seed: int, start: int, n: int) -> np.ndarray:
    """Element ``j``'s uint32 draw (output ``j % 4`` of counter ``j // 4``), as int32."""
    first, last = start >> 2, (start + n + 3) >> 2
    outs = _philox_np(seed, np.arange(first, last, dtype=np.uint64), 10)
    bits = np.stack(outs, axis=1).reshape(-1)
    skip = start - 4 * first
    return bits[skip : skip + n].view(np.int32)


@functools.lru_cache(maxsize=64)
def _keep_below(density: float) -> int:
    """The smallest folded draw ``v`` (see ``uniform_from_bits``) whose uniform
    ``float32(float32(v) · scale)`` is not below ``float32(density)``: keep iff ``v`` is smaller.
    Both roundings are monotone, so a binary search over ``[0, 2**31]`` finds it exactly."""
    d, scale = np.float32(density), np.float32(_SCALE)
    lo, hi = 0, 1 << 31  # the answer lies in [lo, hi]; 2**31 means every draw is kept
    while lo < hi:
        mid = (lo + hi) // 2
        if np.float32(mid) * scale < d:
            lo = mid + 1
        else:
            hi = mid
    return lo


def keep_mask_np(seed: int, start: int, n: int, density: float) -> np.ndarray:
    """Boolean keep mask of elements ``start .. start+n-1``: their uniform is ``< float32(density)``,
    decided on the integer draws (fold negatives with ``x ^ (x >> 31)``, i.e. ``~x``; compare)."""
    bits = _mask_bits(seed, start, n)
    folded = bits ^ (bits >> 31)
    return folded < _keep_below(float(density))


def keep_mask_into(out: torch.Tensor, seed: int, start: int, density: float) -> torch.Tensor:
    """Fill ``out`` (1-D) with 1 where element ``start + j``'s uniform is ``< float32(density)``, else 0."""
    return out.copy_(torch.from_numpy(keep_mask_np(seed, start, out.numel(), density)))
