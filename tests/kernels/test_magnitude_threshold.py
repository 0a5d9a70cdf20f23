"""The radix-select threshold kernel against its torch twin
(``adaptr.ops.magnitude_threshold.lora_magnitude_threshold``).

Exact-product data (small integer factors, dyadic scalings: every ΔW entry exact in float32 whatever
the summation order, and full of ties) must give the identical threshold for every k; general random
floats a threshold within the ΔW entries' float32 rounding. Fresh random data every run (the seed is
in every assert message).
"""

from __future__ import annotations

import os

import kernel_checks  # noqa: F401  (selects the interpreter before the kernels are imported)
import pytest
import torch
from kernel_checks import DEVICE

from adaptr.errors import InvalidInputError
from adaptr.ops.lora_delta import lora_delta
from adaptr.ops.magnitude_threshold import lora_magnitude_threshold as twin
from adaptr.ops.magnitude_threshold import magnitude_threshold
from adaptr.ops.random_drop import random_drop, tensor_seed
from adaptr_triton import magnitude_threshold as kernel
from adaptr_triton.lora_tiles import pack_factors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rng() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def _exact(g, d, k, rank, dtype, lo=-3, hi=4):
    a = torch.randint(lo, hi, (rank, k), generator=g).to(dtype).to(DEVICE)
    b = torch.randint(lo, hi, (d, rank), generator=g).to(dtype).to(DEVICE)
    return a, b


def _ks(g, n):
    return sorted({1, n, max(1, n // 10), int(torch.randint(1, n + 1, (1,), generator=g))})


# (d, k, rank, dtype, transpose, scaling)
CASES = [
    (1, 1, 1, "fp32", False, 0.5),
    (1, 7, 2, "bf16", True, 2.0),
    (100, 70, 8, "fp32", False, 0.25),
    (70, 45, 64, "fp16", True, 1.0),
    (33, 47, 1, "bf16", False, 0.5),
    (17, 90, 20, "fp32", True, 3.0),
]


@pytest.mark.parametrize(("d", "k", "rank", "dtype", "transpose", "scaling"), CASES)
def test_exact_data_identical_threshold(d, k, rank, dtype, transpose, scaling) -> None:
    seed, g = _rng()
    a, b = _exact(g, d, k, rank, DTYPES[dtype])
    for kk in _ks(g, d * k):
        want = twin(a, b, scaling, kk, transpose=transpose)
        got = kernel.lora_magnitude_threshold(a, b, scaling, kk, transpose=transpose)
        assert got == want, f"seed {seed}, k={kk}: {got} != {want}"


def test_all_magnitudes_tied_and_tiny_values() -> None:
    """Every |ΔW| equal (rank 1, ±1 factors); magnitudes spread over many octaves, subnormals included."""
    seed, g = _rng()
    a = (torch.randint(0, 2, (1, 30), generator=g) * 2 - 1).float().to(DEVICE)
    b = (torch.randint(0, 2, (19, 1), generator=g) * 2 - 1).float().to(DEVICE)
    for kk in (1, 7, 300, 570):
        assert kernel.lora_magnitude_threshold(a, b, 0.75, kk) == 0.75, f"seed {seed}"
    a = torch.ldexp(torch.ones(1, 40), torch.randint(-140, 60, (1, 40), generator=g)).to(DEVICE)
    b = torch.ldexp(torch.ones(25, 1), torch.randint(-20, 20, (25, 1), generator=g)).to(DEVICE)
    for kk in _ks(g, 1000):
        want = twin(a, b, 1.0, kk)
        assert kernel.lora_magnitude_threshold(a, b, 1.0, kk) == want, f"seed {seed}, k={kk}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_random_floats_close(dtype) -> None:
    """The k-th largest moves by no more than the entries themselves do between the two products."""
    seed, g = _rng()
    dt = DTYPES[dtype]
    a = torch.randn(24, 61, generator=g).to(dt).to(DEVICE)
    b = torch.randn(50, 24, generator=g).to(dt).to(DEVICE)
    delta = lora_delta(a, b, 0.3)
    bound = 1e-5 * float(delta.abs().max())
    for kk in _ks(g, delta.numel()):
        want = twin(a, b, 0.3, kk)
        got = kernel.lora_magnitude_threshold(a, b, 0.3, kk)
        assert abs(got - want) <= bound, f"seed {seed}, k={kk}: {got} vs {want}"


def test_several_adapters_at_once_with_dare_drop() -> None:
    """``select_thresholds`` (as TIES calls it): adapters of different ranks in the same two launches,
    on the DARE-dropped and rescaled deltas (the same Philox masks as ``random_drop``)."""
    seed, g = _rng()
    d, k, density = 45, 38, 0.4
    factors = []
    for rank, scaling in ((1, 0.5), (9, 1.0), (33, 0.25)):
        a, b = _exact(g, d, k, rank, torch.float32)
        factors.append((a, b, scaling))
    packed = pack_factors(factors, (d, k), torch.device(DEVICE))
    keys = [tensor_seed(seed, "layer", i) for i in range(3)]
    picks, ks = [2, 0, 1], [5, 1, 700]
    got = kernel.select_thresholds(
        packed, picks, ks, seeds=torch.tensor(keys, device=DEVICE), drop_density=density
    )
    for j, (i, kk) in enumerate(zip(picks, ks)):
        dropped = random_drop(lora_delta(*factors[i]), density, seed=keys[i], rescale="density")
        assert got[j] == magnitude_threshold(dropped, kk), f"seed {seed}, adapter {i}"


def test_declines_bad_arguments() -> None:
    a, b = torch.ones(2, 4, device=DEVICE), torch.ones(3, 2, device=DEVICE)
    for kk in (0, 13, 2.5):
        with pytest.raises(InvalidInputError):
            kernel.lora_magnitude_threshold(a, b, 1.0, kk)
    with pytest.raises(InvalidInputError):
        kernel.lora_magnitude_threshold(a.view(2, 4, 1), b.view(3, 2, 1), 1.0, 1)
    with pytest.raises(InvalidInputError):
        kernel.lora_magnitude_threshold(a, torch.ones(3, 5, device=DEVICE), 1.0, 1)
