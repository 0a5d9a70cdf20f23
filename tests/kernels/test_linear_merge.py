"""The fused linear merge kernel against its torch twin (``adaptr.ops.linear_merge``).

Exact-product data (small integer factors, dyadic scalings and coefficients) makes every ΔW entry,
every sum of them and so every output exact in float32 whatever the summation order, so kernel and
twin must agree bit for bit, DARE masks included; general random floats are compared with
tolerances set by the dtype. Fresh random data every run (the seed is in every assert message);
the internal launch writes into a NaN-poisoned buffer, so an element it skips shows up.
"""

from __future__ import annotations

import os

import kernel_checks  # noqa: F401  (selects the interpreter before the kernels are imported)
import pytest
import torch
from kernel_checks import DEVICE, poison

from adaptr.errors import InvalidInputError
from adaptr.ops.linear_merge import linear_merge as twin
from adaptr.ops.philox import keep_mask_np
from adaptr.ops.random_drop import tensor_seed
from adaptr_triton import linear_merge as kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# absolute and relative tolerance of one output in each dtype (about 1 ulp of the 16-bit ones)
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}


def _rng() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def _factors(g, out_shape, rank, count, dtype, *, exact=True, transpose=False, positive=False):
    """``count`` (A, B, scaling) triples whose product (transposed when asked) has ``out_shape``."""
    d, k = (out_shape[1], out_shape[0]) if transpose else out_shape
    triples = []
    for _ in range(count):
        if exact:
            lo = 1 if positive else -3
            a = torch.randint(lo, 4, (rank, k), generator=g).to(dtype)
            b = torch.randint(lo, 4, (d, rank), generator=g).to(dtype)
            scaling = (0.5, 0.25, 2.0, 1.0)[int(torch.randint(0, 4, (1,), generator=g))]
        else:
            a = (torch.randn(rank, k, generator=g) / rank**0.5).to(dtype)
            b = torch.randn(d, rank, generator=g).to(dtype)
            scaling = float(torch.rand(1, generator=g)) + 0.5
        triples.append((a.to(DEVICE), b.to(DEVICE), scaling))
    return triples


def _coeffs(g, count, *, exact=True):
    if exact:
        return [float(c) for c in torch.randint(-8, 9, (count,), generator=g).clamp_(min=-7) / 4 + 0.125]
    return [float(c) for c in torch.randn(count, generator=g)]


def _run_poisoned(base, factors, coeffs, *, out_dtype=None, **kw):
    """The kernel through its internal launch, into a poisoned output buffer."""
    packed, cs, keys, dens = kernel.prepare(base, factors, coeffs, **kw)
    out = poison(torch.empty(base.shape, dtype=out_dtype or base.dtype, device=base.device))
    return kernel._launch(out, base, packed, cs, keys, dens)


# (shape of the stored tensor, rank, adapters, dtype, transpose, DARE density or None)
EXACT_CASES = [
    ((1, 1), 1, 1, "fp32", False, None),
    ((1, 1), 3, 2, "bf16", True, 0.5),
    ((17, 33), 5, 2, "fp16", False, 0.3),
    ((100, 70), 8, 3, "fp32", False, None),
    ((70, 45), 16, 4, "bf16", True, None),
    ((45, 100), 64, 1, "fp32", True, 0.7),
    ((33, 64), 17, 3, "fp16", False, None),
    ((64, 33), 2, 4, "fp32", False, 0.2),
]


@pytest.mark.parametrize(("shape", "rank", "count", "dtype", "transpose", "density"), EXACT_CASES)
def test_exact_data_bit_identical(shape, rank, count, dtype, transpose, density) -> None:
    seed, g = _rng()
    dt = DTYPES[dtype]
    base = torch.randn(shape, generator=g).to(dt).to(DEVICE)
    factors = _factors(g, shape, rank, count, dt, transpose=transpose)
    coeffs = _coeffs(g, count)
    kw = {"transpose": transpose}
    if density is not None:
        kw |= {"seeds": [tensor_seed(seed, "w", i) for i in range(count)], "density": density}
    want = twin(base, factors, coeffs, **kw)
    got = _run_poisoned(base, factors, coeffs, **kw)
    assert torch.equal(got, want), f"seed {seed}: max diff {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize(("shape", "rank", "count"), [((1, 1), 1, 1), ((50, 37), 24, 3), ((29, 70), 64, 2)])
def test_random_floats_within_tolerance(shape, rank, count, dtype) -> None:
    seed, g = _rng()
    dt = DTYPES[dtype]
    base = torch.randn(shape, generator=g).to(dt).to(DEVICE)
    factors = _factors(g, shape, rank, count, dt, exact=False)
    coeffs = _coeffs(g, count, exact=False)
    want = twin(base, factors, coeffs)
    got = _run_poisoned(base, factors, coeffs)
    atol, rtol = TOL[dt]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"seed {seed}: {m}")


def test_dare_kept_set_is_the_cpu_mask() -> None:
    """With ΔW nonzero everywhere (positive factors), the kept set is read off the output exactly."""
    seed, g = _rng()
    shape, density = (37, 90), 0.35
    base = torch.randint(-4, 5, shape, generator=g).float().to(DEVICE)
    factors = _factors(g, shape, 3, 2, torch.float32, positive=True)
    keys = [tensor_seed(seed, "model.layers.0.q_proj", i) for i in range(2)]
    for i, (f, key) in enumerate(zip(factors, keys)):
        got = _run_poisoned(base, [f], [1.0], seeds=[key], density=density)
        kept = (got != base).cpu().reshape(-1).numpy()
        want = keep_mask_np(key, 0, base.numel(), density)
        assert (kept == want).all(), f"seed {seed}, adapter {i}: {(kept != want).sum()} entries differ"


def test_public_function_out_dtype_and_strided_base() -> None:
    seed, g = _rng()
    base = torch.randn(40, 30, generator=g).to(DEVICE).t()  # 30 × 40, not contiguous
    factors = _factors(g, (30, 40), 4, 2, torch.float32)
    coeffs = _coeffs(g, 2)
    for out_dtype in (None, torch.bfloat16, torch.float16):
        got = kernel.linear_merge(base, factors, coeffs, out_dtype=out_dtype)
        want = twin(base, factors, coeffs, out_dtype=out_dtype)
        assert got.dtype == want.dtype == (out_dtype or torch.float32)
        assert torch.equal(got, want), f"seed {seed}, {out_dtype}"
    empty = torch.empty(0, 5, device=DEVICE)
    assert kernel.linear_merge(empty, [(torch.ones(2, 5), torch.ones(0, 2), 1.0)], [1.0]).shape == (0, 5)


def test_declines_what_it_does_not_support() -> None:
    base = torch.zeros(6, 4, device=DEVICE)
    a, b = torch.ones(2, 4, device=DEVICE), torch.ones(6, 2, device=DEVICE)
    bad = [
        ([(a.view(2, 4, 1), b.view(6, 2, 1), 1.0)], [1.0], {}),  # convolution factors
        ([(a, b, 1.0)], [1.0, 2.0], {}),  # one coefficient per adapter
        ([(a, b, 1.0)], [1.0], {"transpose": True}),  # the product does not fit the base
        ([(a, b, float("nan"))], [1.0], {}),
        ([(a, b, 1.0)], [1.0], {"seeds": [1, 2], "density": 0.5}),
        ([], [], {}),
    ]
    for factors, coeffs, kw in bad:
        with pytest.raises(InvalidInputError):
            kernel.linear_merge(base, factors, coeffs, **kw)
    with pytest.raises(InvalidInputError):
        kernel.linear_merge(base.view(6, 4, 1), [(a, b, 1.0)], [1.0])
