"""Philox4x32-10 in torch vs Triton's own tl.rand/tl.randint (run by the interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates kernels: run them on the CPU
import triton
import triton.language as tl

from adaptr.ops.philox import keep_mask_into, philox_randint, philox_uniform
from adaptr.ops.reference import random_drop, tensor_seed


@triton.jit
def _rand_kernel(out_ptr, bits_ptr, seed, start, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    counter = offs.to(tl.int64) + start  # int64 offsets: the high 32 bits enter the counter too
    tl.store(out_ptr + offs, tl.rand(seed, counter), mask=m)
    tl.store(bits_ptr + offs, tl.randint(seed, counter), mask=m)


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


def test_uniform_statistics_and_keep_mask() -> None:
    u = philox_uniform(42, torch.arange(200_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    mask = keep_mask_into(torch.empty(200_000), 42, 0, 0.3)
    assert torch.equal(mask, (u < 0.3).float())
    assert abs(float(mask.mean()) - 0.3) < 0.005


def test_random_drop_mask_is_order_and_chunk_independent() -> None:
    """Element j's fate depends only on (key, j): a slice of the tensor sees the same draws."""
    x = torch.randn(700, 900, generator=torch.Generator().manual_seed(0))
    key = tensor_seed(3, "w", 0)
    full = random_drop(x, 0.4, seed=key, rescale=None)
    u = philox_uniform(key, torch.arange(x.numel())).view_as(x)
    assert torch.equal(full, x * (u < 0.4))
    assert torch.equal(random_drop(x, 0.4, seed=key, rescale="density"), full / 0.4)
    assert not torch.equal(full, random_drop(x, 0.4, seed=key + 1, rescale=None))
