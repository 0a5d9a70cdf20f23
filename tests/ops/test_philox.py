"""Philox4x32-10 on the CPU vs Triton's own tl.rand/tl.randint/tl.randint4x/tl.rand4x (run by the
interpreter on the CPU), and the DARE keep masks drawn from it."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates kernels: run them on the CPU
import triton
import triton.language as tl

from adaptr.ops import philox
from adaptr.ops.philox import (
    keep_mask_into,
    keep_mask_np,
    mask_uniforms,
    philox_randint,
    philox_randint4x,
    philox_uniform,
)
from adaptr.ops.random_drop import random_drop, tensor_seed


@triton.jit
def _rand_kernel(out_ptr, bits_ptr, seed, start, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    counter = offs.to(tl.int64) + start  # int64 offsets: the high 32 bits enter the counter too
    tl.store(out_ptr + offs, tl.rand(seed, counter), mask=m)
    tl.store(bits_ptr + offs, tl.randint(seed, counter), mask=m)


@triton.jit
def _rand4x_kernel(bits_ptr, uni_ptr, seed, start, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    counter = offs.to(tl.int64) + start
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    for i, (r, u) in enumerate(((r0, u0), (r1, u1), (r2, u2), (r3, u3))):
        tl.store(bits_ptr + offs * 4 + i, r, mask=m)
        tl.store(uni_ptr + offs * 4 + i, u, mask=m)


def _triton(seed: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(n)
    bits = torch.empty(n, dtype=torch.int32)
    _rand_kernel[(triton.cdiv(n, 1024),)](out, bits, seed, start, n, BLOCK=1024)
    return out, bits


@pytest.mark.parametrize("seed", [0, 1, 123456789, (1 << 62) + 12345, tensor_seed(7, "model.layers.0.q", 2)])
@pytest.mark.parametrize("start", [0, (1 << 32) - 100])
def test_bit_identical_to_triton(seed: int, start: int) -> None:
    n = 3000
    ref_u, ref_bits = _triton(seed, start, n)
    offsets = torch.arange(start, start + n)
    bits = philox_randint(seed, offsets)
    assert torch.equal(torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32), ref_bits)
    assert torch.equal(philox_uniform(seed, offsets), ref_u)


@pytest.mark.parametrize("seed", [0, (1 << 62) + 12345, tensor_seed(7, "model.layers.0.q", 2)])
@pytest.mark.parametrize("start", [0, (1 << 32) - 100])
def test_randint4x_and_mask_stream_bit_identical_to_triton(seed: int, start: int) -> None:
    """Element j of a mask draws ``tl.rand4x(seed, j // 4)[j % 4]``."""
    n = 1000  # counters
    bits = torch.empty(4 * n, dtype=torch.int32)
    uni = torch.empty(4 * n)
    _rand4x_kernel[(triton.cdiv(n, 256),)](bits, uni, seed, start, n, BLOCK=256)
    ours = torch.stack(philox_randint4x(seed, torch.arange(start, start + n)), dim=1).reshape(-1)
    assert torch.equal(torch.where(ours >= 1 << 31, ours - (1 << 32), ours).to(torch.int32), bits)
    assert torch.equal(mask_uniforms(seed, 4 * start, 4 * n), uni)
    # any window of elements, aligned to counters or not, sees the same draws
    for a, b in ((1, 4 * n - 3), (6, 7), (4 * n - 1, 4 * n)):
        assert torch.equal(mask_uniforms(seed, 4 * start + a, b - a), uni[a:b])


def test_uniform_statistics_and_keep_mask() -> None:
    u = mask_uniforms(42, 0, 200_000)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    for density in (0.3, 0.05, 0.999, 1e-9, 0.5):
        mask = keep_mask_into(torch.empty(200_000), 42, 0, density)
        assert torch.equal(mask, (u < torch.tensor(density, dtype=torch.float32)).float()), density
    assert abs(float(keep_mask_into(torch.empty(200_000), 42, 0, 0.3).mean()) - 0.3) < 0.005


def test_integer_cut_equals_the_float_comparison_at_its_edges() -> None:
    """Keeping draws below ``_keep_below(d)`` is exactly ``uniform < float32(d)``, checked on the
    folded draws right around the cut (where float32 rounding of the draw and the product bites)."""
    for density in (0.3, 0.2, 0.1, 0.7, 0.9, 1e-6, 0.999999):
        cut = philox._keep_below(density)
        v = torch.arange(max(0, cut - 300), min(1 << 31, cut + 300), dtype=torch.int64)
        u = v.to(torch.int32).to(torch.float32) * torch.tensor(philox._SCALE, dtype=torch.float32)
        assert torch.equal(v < cut, u < torch.tensor(density, dtype=torch.float32)), density
    assert philox._keep_below(1.0) == 1 << 31 and philox._keep_below(0.0) == 0
    assert keep_mask_np(5, 10, 8, 0.0).sum() == 0


def test_random_drop_mask_is_order_and_chunk_independent() -> None:
    """Element j's fate depends only on (key, j): a slice of the tensor sees the same draws."""
    x = torch.randn(700, 900, generator=torch.Generator().manual_seed(0))
    key = tensor_seed(3, "w", 0)
    full = random_drop(x, 0.4, seed=key, rescale=None)
    u = mask_uniforms(key, 0, x.numel()).view_as(x)
    assert torch.equal(full, x * (u < 0.4))
    assert torch.equal(random_drop(x, 0.4, seed=key, rescale="density"), full / 0.4)
    assert not torch.equal(full, random_drop(x, 0.4, seed=key + 1, rescale=None))
