"""The TIES / DARE-TIES kernel against its torch twin (``adaptr.ops.ties_merge.ties_merge_lora``).

Exact-product data (small integer factors, dyadic scalings and weights: every ΔW entry, every
weighted sum and so every threshold, elected sign and kept set exact in float32) must give
bit-identical outputs, for TIES (one density, or one per adapter with 0 and 1 among them),
DARE-TIES (the same Philox masks), both at once, with and without normalisation. General random
floats are compared with dtype tolerances, allowing the few entries that sit on a trim threshold or
an election sum of about zero, where either side may round the other way. Fresh random data every
run (the seed is in every assert message); the merge pass writes into a NaN-poisoned buffer.
"""

from __future__ import annotations

import os

import kernel_checks  # noqa: F401  (selects the interpreter before the kernels are imported)
import pytest
import torch
from kernel_checks import DEVICE, poison

from adaptr.errors import InvalidInputError
from adaptr.ops.random_drop import tensor_seed
from adaptr.ops.ties_merge import ties_merge_lora as twin
from adaptr_triton import ties_merge as kernel

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}


def _rng() -> tuple[int, torch.Generator]:
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def _factors(g, out_shape, rank, count, dtype, *, exact=True, transpose=False):
    d, k = (out_shape[1], out_shape[0]) if transpose else out_shape
    triples = []
    for _ in range(count):
        if exact:
            a = torch.randint(-3, 4, (rank, k), generator=g).to(dtype)
            b = torch.randint(-3, 4, (d, rank), generator=g).to(dtype)
            scaling = (0.5, 0.25, 2.0, 1.0)[int(torch.randint(0, 4, (1,), generator=g))]
        else:
            a = (torch.randn(rank, k, generator=g) / rank**0.5).to(dtype)
            b = torch.randn(d, rank, generator=g).to(dtype)
            scaling = float(torch.rand(1, generator=g)) + 0.5
        triples.append((a.to(DEVICE), b.to(DEVICE), scaling))
    return triples


def _weights(g, count, *, exact=True):
    if exact:  # positive dyadic weights (TIES takes no negative weights)
        return [float(w) for w in torch.randint(1, 13, (count,), generator=g) / 4]
    return [float(w) for w in torch.rand(count, generator=g) + 0.25]


def _run_poisoned(base, factors, weights, *, out_dtype=None, **kw):
    """Thresholds, then the merge pass into a poisoned output buffer."""
    plan = kernel.prepare(base, factors, weights, **kw)
    out = poison(torch.empty(base.shape, dtype=out_dtype or base.dtype, device=base.device))
    return kernel._launch(out, base, plan)


def _options(seed, count, mode):
    keys = [tensor_seed(seed, "model.layers.3.mlp.up_proj", i) for i in range(count)]
    per_adapter = [0.3, 0.0, 1.0, 0.15][:count] if count > 1 else [0.3]
    return {
        "ties": {"density": 0.2},
        "ties_per_adapter": {"density": per_adapter, "lam": 1.5},
        "dare_ties": {"seeds": keys, "drop_density": 0.3},
        "dare_trim_sum": {
            "seeds": keys,
            "drop_density": 0.6,
            "density": 0.5,
            "normalize": False,
            "lam": 0.75,
        },
        "elect_only": {},
    }[mode]


# (shape of the stored tensor, rank, adapters, dtype, transpose, mode)
EXACT_CASES = [
    ((1, 1), 1, 1, "fp32", False, "ties"),
    ((1, 1), 2, 3, "bf16", True, "dare_ties"),
    ((100, 70), 8, 3, "fp32", False, "ties"),
    ((70, 45), 1, 2, "bf16", True, "ties_per_adapter"),
    ((33, 47), 64, 4, "fp16", False, "ties_per_adapter"),
    ((47, 33), 5, 4, "fp32", False, "dare_ties"),
    ((64, 17), 17, 2, "bf16", False, "dare_trim_sum"),
    ((20, 90), 3, 3, "fp32", True, "elect_only"),
    ((40, 40), 32, 1, "fp16", False, "dare_trim_sum"),
]


@pytest.mark.parametrize(("shape", "rank", "count", "dtype", "transpose", "mode"), EXACT_CASES)
def test_exact_data_bit_identical(shape, rank, count, dtype, transpose, mode) -> None:
    seed, g = _rng()
    dt = DTYPES[dtype]
    base = torch.randn(shape, generator=g).to(dt).to(DEVICE)
    factors = _factors(g, shape, rank, count, dt, transpose=transpose)
    weights = _weights(g, count)
    kw = _options(seed, count, mode) | {"transpose": transpose}
    want = twin(base, factors, weights, **kw)
    got = _run_poisoned(base, factors, weights, **kw)
    assert got.dtype == want.dtype == dt
    assert torch.equal(got, want), f"seed {seed}: {(got != want).sum()} entries differ"


@pytest.mark.parametrize(
    ("dtype", "mode", "count"),
    [("fp32", "ties", 3), ("fp16", "dare_ties", 2), ("bf16", "ties_per_adapter", 4)],
)
def test_random_floats_within_tolerance(dtype, mode, count) -> None:
    seed, g = _rng()
    dt = DTYPES[dtype]
    shape = (52, 37)
    base = torch.randn(shape, generator=g).to(dt).to(DEVICE)
    factors = _factors(g, shape, 12, count, dt, exact=False)
    weights = _weights(g, count, exact=False)
    kw = _options(seed, count, mode)
    want = twin(base, factors, weights, **kw).float()
    got = _run_poisoned(base, factors, weights, **kw).float()
    atol, rtol = TOL[dt]
    off = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    # entries on a trim threshold or with an election sum of about 0 may go either way: a handful
    assert int(off.sum()) <= 2 * count, f"seed {seed}: {int(off.sum())} entries differ, e.g. {got[off][:5]}"
    assert not got.isnan().any(), f"seed {seed}"


def test_signed_and_zero_weights() -> None:
    """The generic function takes any weights: agreement is judged on the weighted delta and the
    divisor is the signed sum of agreeing weights (0 → 1), as in the twin."""
    seed, g = _rng()
    base = torch.randn(30, 41, generator=g).to(DEVICE)
    factors = _factors(g, (30, 41), 4, 3, torch.float32)
    keys = [tensor_seed(seed, "w", i) for i in range(3)]
    for weights in ([1.0, -1.0, 0.5], [-0.5, -0.25, 0.0]):
        for kw in ({"density": 0.3}, {"seeds": keys, "drop_density": 0.4}):
            want = twin(base, factors, weights, **kw)
            got = _run_poisoned(base, factors, weights, **kw)
            assert torch.equal(got, want), f"seed {seed}, {weights}, {list(kw)}"


def test_everything_trimmed_away_is_the_base_and_out_dtype() -> None:
    seed, g = _rng()
    base = torch.randn(9, 13, generator=g).to(DEVICE)
    factors = _factors(g, (9, 13), 2, 2, torch.float32)
    got = _run_poisoned(base, factors, [1.0, 2.0], density=[0.0, -1.0], out_dtype=torch.bfloat16)
    assert torch.equal(got, base.to(torch.bfloat16)), f"seed {seed}"
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        kw = {"density": 0.4, "out_dtype": out_dtype}
        got = kernel.ties_merge_lora(base, factors, [0.5, 1.25], **kw)
        want = twin(base, factors, [0.5, 1.25], **kw)
        assert torch.equal(got, want), f"seed {seed}, {out_dtype}"


def test_declines_bad_arguments() -> None:
    base = torch.zeros(6, 4, device=DEVICE)
    a, b = torch.ones(2, 4, device=DEVICE), torch.ones(6, 2, device=DEVICE)
    bad = [
        ([(a.view(2, 4, 1), b.view(6, 2, 1), 1.0)], [1.0], {}),  # convolution factors
        ([(a, b, 1.0)], [1.0, 1.0], {}),
        ([(a, b, 1.0)], [1.0], {"density": [0.5, 0.5]}),
        ([(a, b, 1.0)], [1.0], {"seeds": [1, 2], "drop_density": 0.5}),
        ([(a, b, 1.0)], [1.0], {"lam": float("inf")}),
        ([(a, b, 1.0)], [1.0], {"transpose": True}),
        ([], [], {}),
    ]
    for factors, weights, kw in bad:
        with pytest.raises(InvalidInputError):
            kernel.ties_merge_lora(base, factors, weights, **kw)
