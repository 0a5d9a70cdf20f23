"""Philox4x32-10 in plain torch, bit-identical to Triton's ``tl.randint``/``tl.rand``.

DARE masks must not depend on device, thread count or the order tensors are merged in.
A counter-based generator gives that: the random number of element ``j`` is a pure
function of (key, j). Using Triton's exact variant means a GPU kernel drawing
``tl.rand(key, offsets)`` and this CPU code produce the same mask.

Counter (c0, c1, c2, c3) = (offset low 32 bits, offset high 32 bits, 0, 0); key
(k0, k1) = (seed low 32 bits, seed high 32 bits); 10 rounds; output c0.
"""

from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_SCALE = 4.6566127342e-10  # Triton's uint_to_uniform_float for 32-bit draws
CHUNK = 1 << 18  # elements per pass: keeps the int64 temporaries in cache


def _randint_np(seed: int, offsets: np.ndarray, n_rounds: int) -> np.ndarray:
    # numpy: native wrapping uint32/uint64 arithmetic, far faster on the CPU than torch's int64 ops.
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    off = offsets.astype(np.uint64, copy=False)
    c0 = off.astype(np.uint32)
    c1 = (off >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    ra, rb, s32 = np.uint64(_ROUND_A), np.uint64(_ROUND_B), np.uint64(32)
    for _ in range(n_rounds):
        pb = c2.astype(np.uint64) * rb
        pa = c0.astype(np.uint64) * ra
        c0 = (pb >> s32).astype(np.uint32) ^ c1 ^ np.uint32(k0)
        c2 = (pa >> s32).astype(np.uint32) ^ c3 ^ np.uint32(k1)
        c1 = pb.astype(np.uint32)
        c3 = pa.astype(np.uint32)
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


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


def keep_mask_into(out: torch.Tensor, seed: int, start: int, density: float) -> torch.Tensor:
    """Fill ``out`` (1-D) with 1 where ``tl.rand(seed, start + j) < float32(density)``, else 0."""
    bits = _randint_np(seed, np.arange(start, start + out.numel(), dtype=np.uint64), 10).view(np.int32)
    x = np.where(bits < 0, ~bits, bits).astype(np.float32) * np.float32(_SCALE)
    keep = torch.from_numpy(x < np.float32(density))
    return out.copy_(keep)
