"""Tests of the pure-torch merge steps (adaptr.ops): hand-computed cases, exact references, mergekit/PEFT oracles."""

from __future__ import annotations

import math

import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.ops import magnitude_threshold as MT
from adaptr.ops import random_drop as RD
from adaptr.ops import ties_merge as TM
from adaptr.ops.lora_delta import lora_delta
from adaptr.ops.magnitude_threshold import magnitude_threshold, trim_by_magnitude
from adaptr.ops.random_drop import bernoulli_mask, make_generator, random_drop, tensor_seed
from adaptr.ops.ties_merge import disjoint_merge, elect_sign, ties_merge
from adaptr.ops.weighted_sum import weighted_sum


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded: timings stay stable on a shared 2-core box (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def T(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


def randn(*shape: int, seed: int) -> torch.Tensor:
    """Random normal values with no exact zeros (so signs and ranks are all well defined)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def naive_ties(deltas, weights, density, lam=1.0, trim=True, normalize=True) -> torch.Tensor:
    densities = density if isinstance(density, list) else [density] * len(deltas)
    trimmed = [trim_by_magnitude(d, p) for d, p in zip(deltas, densities)] if trim else list(deltas)
    merged = disjoint_merge(trimmed, weights, elect_sign(trimmed, weights), normalize=normalize)
    return merged * lam


# ---------------------------------------------------------------------------------------------------------
# hand-computed 3×3 cases


X = T([[0.5, -3.0, 1.0], [2.0, -0.25, 4.0], [-1.0, 0.0, 1.5]])  # |X| desc: 4 3 2 1.5 1 1 .5 .25 0


def test_lora_delta_by_hand() -> None:
    a = T([[1, 0, 2], [0, 1, -1]])  # r=2 × in=3
    b = T([[1, 0], [0, 2], [1, 1]])  # out=3 × r=2
    expected = T([[0.5, 0, 1], [0, 1, -1], [0.5, 0.5, 0.5]])  # 0.5 · B@A
    exact(lora_delta(a, b, 0.5), expected)
    out_t = lora_delta(a, b, 0.5, transpose=True)
    exact(out_t, expected.t())
    assert out_t.is_contiguous()
    exact(lora_delta(a.bfloat16(), b.half(), 0.5), expected)  # upcast to float32
    assert lora_delta(a.bfloat16(), b.half(), 0.5).dtype == torch.float32


def test_lora_delta_conv_and_errors() -> None:
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # r × in × kh × kw
    b = T([[1, 0], [0, 1], [1, -1]]).reshape(3, 2, 1, 1)
    expected = torch.einsum("or,rihw->oihw", b.reshape(3, 2), a) * 2.0
    exact(lora_delta(a, b, 2.0), expected)
    with pytest.raises(InvalidInputError):
        lora_delta(T([[1, 2]]), T([[1, 2]]), 1.0)  # A is 1×2 (r=1), B needs out×1
    with pytest.raises(InvalidInputError):
        lora_delta(a, b, 1.0, transpose=True)
    with pytest.raises(InvalidInputError):
        lora_delta(T([[1.0]]), T([[1.0]]), float("nan"))


def test_magnitude_threshold_by_hand() -> None:
    expected = {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.5, 5: 1.0, 6: 1.0, 7: 0.5, 8: 0.25, 9: 0.0}
    for k, value in expected.items():
        assert magnitude_threshold(X, k) == value
    for bad in (0, 10, -1):
        with pytest.raises(InvalidInputError):
            magnitude_threshold(X, bad)
    with pytest.raises(InvalidInputError):
        magnitude_threshold(X, 2.5)  # type: ignore[arg-type]


def test_trim_by_magnitude_by_hand() -> None:
    # density 0.34 → k = int(3.06) = 3: keep 4, -3, 2
    exact(trim_by_magnitude(X, 0.34), T([[0, -3, 0], [2, 0, 4], [0, 0, 0]]))
    # density 0.5 → k = int(4.5) = 4: keep 4, -3, 2, 1.5
    exact(trim_by_magnitude(X, 0.5), T([[0, -3, 0], [2, 0, 4], [0, 0, 1.5]]))
    # density 0.6 → k = 5: the 5th largest |x| is 1, tied with -1: both are kept (6 entries)
    exact(trim_by_magnitude(X, 0.6), T([[0, -3, 1], [2, 0, 4], [-1, 0, 1.5]]))
    # tiny density: k = max(1, int(0.45)) = 1 keeps the single largest
    exact(trim_by_magnitude(X, 0.05), T([[0, 0, 0], [0, 0, 4], [0, 0, 0]]))
    assert trim_by_magnitude(X, 1.0) is X
    assert trim_by_magnitude(X, 1.5) is X
    for d in (0.0, -0.5):
        out = trim_by_magnitude(X, d)
        exact(out, torch.zeros(3, 3))
        assert not out.isnan().any()
    assert trim_by_magnitude(torch.empty(0, 3), 0.5).shape == (0, 3)
    with pytest.raises(InvalidInputError):
        trim_by_magnitude(X, float("nan"))


Y = T([[1, -2, 3], [4, -5, 6], [-7, 8, 9]])  # ‖Y‖₁ = 45
MASK = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)  # kept: 1, 3, -5, -7 (‖·‖₁ = 16)


def test_random_drop_by_hand() -> None:
    exact(random_drop(Y, 0.5, mask=MASK, rescale="density"), T([[2, 0, 6], [0, -10, 0], [-14, 0, 0]]))
    exact(random_drop(Y, 0.5, mask=MASK, rescale=None), T([[1, 0, 3], [0, -5, 0], [-7, 0, 0]]))
    # 45/16 = 2.8125
    exact(
        random_drop(Y, 0.5, mask=MASK, rescale="l1"),
        T([[2.8125, 0, 8.4375], [0, -14.0625, 0], [-19.6875, 0, 0]]),
    )
    exact(random_drop(Y, 0.5, mask=MASK.int(), rescale=None), T([[1, 0, 3], [0, -5, 0], [-7, 0, 0]]))
    assert random_drop(Y, 1.0, mask=MASK) is Y
    for d in (0.0, -1.0):
        out = random_drop(Y, d, rescale="density")
        exact(out, torch.zeros(3, 3))
        assert not out.isnan().any()
    # nothing kept: the L1 ratio would be 45/0; mergekit leaves it unscaled, so do we (zeros, no NaN)
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    exact(random_drop(Y, 0.5, mask=nothing, rescale="l1"), torch.zeros(3, 3))
    with pytest.raises(InvalidInputError):
        random_drop(Y, 0.5, mask=MASK, rescale="l2")
    with pytest.raises(InvalidInputError):
        random_drop(Y, 0.5, mask=MASK[:2])


D1 = T([[1, -1, 0], [2, -2, 1], [0, 0, 3]])
D2 = T([[-2, 1, 0], [-1, 2, -1], [0, 0, -3]])


def test_elect_sign_by_hand() -> None:
    # sums: [[-1, 0, 0], [1, 0, 0], [0, 0, 0]]; exact zeros elect +
    expected = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    exact(elect_sign([D1, D2], [1.0, 1.0]), expected)
    # weights apply before election: sums [[0, -0.5, 0], [1.5, -1, 0.5], [0, 0, 1.5]]
    expected = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    exact(elect_sign([D1, D2], [1.0, 0.5]), expected)
    with pytest.raises(InvalidInputError):
        elect_sign([D1, D2], [1.0])
    with pytest.raises(InvalidInputError):
        elect_sign([D1, D2[:2]], [1.0, 1.0])
    with pytest.raises(InvalidInputError):
        elect_sign([], [])


M1 = T([[1, -2, 0], [3, 0, -1], [2, 2, -4]])
M2 = T([[2, 1, 0], [-3, 0, -1], [-2, 4, 1]])
M3 = T([[-1, -1, 5], [1, 0, 1], [0, -3, 2]])
W3 = [1.0, 1.0, 2.0]
# weighted sums: [[1, -3, 10], [2, 0, 0], [0, 0, 1]] → all + except [0][1]
M_SIGN = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
# [0][0]: (1+2)/2; [0][1]: (-2-2)/(1+2); [0][2]: 10/2; [1][0]: (3+2)/(1+2);
# [1][1]: no agreeing entry, divisor 1; [1][2]: 2/2 (sum is exactly 0, elects +);
# [2][0]: 2/1; [2][1]: (2+4)/2; [2][2]: (1+4)/(1+2)
M_MERGED = T([[1.5, -4 / 3, 5], [5 / 3, 0, 1], [2, 3, 5 / 3]])
# the same without normalisation: sums over agreeing weighted entries
M_SUMMED = T([[3, -4, 10], [5, 0, 2], [2, 6, 5]])


def test_disjoint_merge_by_hand() -> None:
    exact(elect_sign([M1, M2, M3], W3), M_SIGN)
    close(disjoint_merge([M1, M2, M3], W3, M_SIGN), M_MERGED)
    exact(disjoint_merge([M1, M2, M3], W3, M_SIGN, normalize=False), M_SUMMED)
    # the fused form without trimming gives the same
    close(ties_merge([M1, M2, M3], W3, trim=False), M_MERGED)
    exact(ties_merge([M1, M2, M3], W3, trim=False, normalize=False), M_SUMMED)
    # no agreeing entries anywhere: divisor 1, result 0 (never NaN)
    positive = torch.ones(3, 3, dtype=torch.bool)
    out = disjoint_merge([-M1.abs(), -M2.abs()], [1.0, 1.0], positive)
    exact(out, torch.zeros(3, 3))
    # agreeing weights that cancel (1 and -1 on opposite-signed entries) give divisor 0 → 1
    a, b = T([[1, 0, 0]] * 3), T([[-1, 0, 0]] * 3)
    sign = elect_sign([a, b], [1.0, -1.0])  # weighted: 1 and 1 → +
    exact(disjoint_merge([a, b], [1.0, -1.0], sign), T([[2, 0, 0]] * 3))


def test_weighted_sum_by_hand() -> None:
    exact(weighted_sum([D1, D2], [2.0, -1.0]), T([[4, -3, 0], [5, -6, 3], [0, 0, 9]]))
    exact(weighted_sum([D1, D2], [1.0, 1.0], normalize=True), T([[-0.5, 0, 0], [0.5, 0, 0], [0, 0, 0]]))
    # weights summing to 0: the divisor is treated as 1 (mergekit), giving the plain difference
    exact(weighted_sum([D1, D2], [1.0, -1.0], normalize=True), D1 - D2)
    exact(weighted_sum([D1, D2], [0.5, 0.25], normalize=True), (0.5 * D1 + 0.25 * D2) / 0.75)
    exact(weighted_sum([D1], [-1.0]), -D1)


T1 = T([[1, -5, 0.5], [3, 0, -1], [2, -2.5, -4]])  # top-3: -5, -4, 3
T2 = T([[2, 1, -6], [-3, 0.5, -1], [-2, 4, 1.5]])  # top-3: -6, 4, -3
T3 = T([[-1, -1, 5], [1, 0, 1], [0.25, -3, 2]])  # top-3: 5, -3, 2


def test_ties_merge_by_hand() -> None:
    # trimmed (k = 3 each), weights [1, 1, 2]; weighted sums: [[0, -5, 4], [0, 0, 0], [0, -2, 0]]
    # [0][1] −: -5/1; [0][2] +: 10/2; [1][0] + (3 − 3 = 0): 3/1; [2][1] −: -6/2; [2][2] + (−4 + 4 = 0): 4/2
    expected = T([[0, -5, 5], [3, 0, 0], [0, -3, 2]])
    exact(ties_merge([T1, T2, T3], W3, density=0.34), expected)
    exact(ties_merge([T1, T2, T3], W3, density=0.34, lam=2.0), expected * 2)
    exact(naive_ties([T1, T2, T3], W3, 0.34), expected)
    # per-delta densities; 0 drops a delta entirely, >= 1 keeps it whole
    for dens in ([1.0, 0.34, 0.0], [0.0, 0.0, 0.0], [0.2, 1.0, 0.6]):
        exact(ties_merge([T1, T2, T3], W3, density=dens), naive_ties([T1, T2, T3], W3, dens))
    exact(ties_merge([T1, T2, T3], W3, density=0.0), torch.zeros(3, 3))
    with pytest.raises(InvalidInputError):
        ties_merge([T1, T2, T3], W3, density=[0.5, 0.5])
    with pytest.raises(InvalidInputError):
        ties_merge([T1, T2, T3], W3, density=0.5, lam=float("inf"))
    assert ties_merge([torch.empty(0)], [1.0], density=0.5).shape == (0,)


def test_tensor_seed_and_generators() -> None:
    s = tensor_seed(42, "model.layers.0.q_proj", 1)
    assert s == tensor_seed(42, "model.layers.0.q_proj", 1)
    assert 0 <= s < 2**63
    others = {
        tensor_seed(43, "model.layers.0.q_proj", 1),
        tensor_seed(42, "model.layers.0.k_proj", 1),
        tensor_seed(42, "model.layers.0.q_proj", 0),
    }
    assert s not in others and len(others) == 3
    # masks depend only on the triple, not on the order in which tensors are processed
    names = [f"t{i}" for i in range(4)]
    forward = {n: bernoulli_mask((50,), 0.5, generator=make_generator(7, n, 0)) for n in names}
    backward = {n: bernoulli_mask((50,), 0.5, generator=make_generator(7, n, 0)) for n in reversed(names)}
    for n in names:
        exact(forward[n], backward[n])
    with pytest.raises(InvalidInputError):
        tensor_seed(1.5, "x", 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        tensor_seed(1, None, 0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# exact references on random inputs


def _kth_largest_abs(x: torch.Tensor, k: int) -> float:
    flat = x.reshape(-1).abs()
    return float(flat.kthvalue(flat.numel() - k + 1).values)


@pytest.mark.parametrize(
    "n",
    [1, 7, MT._SELECT_SMALL, MT._SELECT_SMALL + 1, MT._SELECT_CHUNK + 3, 4 * MT._SELECT_CHUNK + 5],
)
def test_magnitude_threshold_matches_kthvalue(n: int) -> None:
    x = randn(n, seed=n)
    ks = {1, n, max(1, n // 2), max(1, int(0.2 * n)), max(1, int(0.9 * n)), min(n, 17)}
    for k in sorted(ks):
        assert magnitude_threshold(x, k) == _kth_largest_abs(x, k), (n, k)


def test_magnitude_threshold_duplicates_zeros_denormals() -> None:
    g = torch.Generator().manual_seed(3)
    n = 2 * MT._SELECT_CHUNK + 11
    # heavy duplicates: 50 distinct magnitudes with random signs
    dup = torch.randint(0, 50, (n,), generator=g).float().div_(8) * (torch.rand(n, generator=g) - 0.5).sign()
    # zeros (both signs) and denormals mixed into normal values
    mixed = randn(n, seed=4)
    mixed[::7] = 0.0
    mixed[1::13] = -0.0
    mixed[2::11] = 1e-40
    mixed[3::17] = -3e-42
    # heavy tails: values over many binades
    tails = randn(n, seed=5).pow(9)
    # constant tensor: a one-pattern window
    const = torch.full((n,), -0.75)
    for x in (dup, mixed, tails, const):
        for k in (1, 2, n // 3, int(0.8 * n), n):
            assert magnitude_threshold(x, k) == _kth_largest_abs(x, k)


def test_magnitude_threshold_bucket_edges() -> None:
    """Answers at a bucket's first and last pattern, and neighbours just outside it."""
    n = MT._SELECT_CHUNK + 5
    x = randn(n, seed=6)
    lower = 0x3F80 << 16  # 1.0 starts a bucket
    edges = torch.tensor([lower - 1, lower, lower + 1, lower + 0xFFFF, lower + 0x10000], dtype=torch.int32)
    x[: edges.numel()] = edges.view(torch.float32)
    x[edges.numel() : 2 * edges.numel()] = -edges.view(torch.float32)
    order = x.abs().sort(descending=True).values
    for value in edges.view(torch.float32).tolist():
        first = int((order > value).sum()) + 1  # rank of the first element equal to value
        for k in (first, first + 1):
            assert magnitude_threshold(x, k) == _kth_largest_abs(x, k) == value


def test_magnitude_threshold_when_the_sample_misleads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The strided sample only decides how many passes run: a sample that sees only small (or only
    large) values sends the first pass to the wrong buckets, and the second pass still finds the
    exact answer. Without misleading, one pass suffices."""
    passes: list[int] = []
    real = MT._window_histogram

    def counted(*args, **kwargs):
        passes.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(MT, "_window_histogram", counted)
    n = 3 * (1 << 17) * 7 + 5  # sampled with stride 7
    x = randn(n, seed=21)
    magnitude_threshold(x, n // 5)
    assert passes == [MT._GUESS_WIDTH]
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[::7] = True
    for scale in (1e-3, 1e3):  # sampled entries far below, then far above, all others
        passes.clear()
        y = torch.where(sampled, x * scale, x)
        for k in (1, n // 5, n // 2, n - 3):
            assert magnitude_threshold(y, k) == _kth_largest_abs(y, k)
        assert MT._GUESS_WIDTH in passes and 1 in passes, passes  # both the guess and the fallback ran
        assert len(passes) <= 8


def test_ties_merge_onto_base_is_exactly_add_then_cast() -> None:
    """With ``base`` the fused pass equals ``(base + ties_merge(...)).to(out_dtype)`` bit for bit."""
    shape = (300, TM._MERGE_CHUNK // 256 + 3)
    deltas = [randn(*shape, seed=30 + i) for i in range(3)]
    base32 = randn(*shape, seed=40)
    for base in (base32, base32.to(torch.bfloat16), base32.to(torch.float16)):
        for out_dtype in (torch.bfloat16, torch.float32, torch.float16):
            for weights, density, lam, trim, normalize in [
                ([0.5, 0.3, 0.8], 0.2, 1.0, True, True),
                ([1.0, 1.0, 1.0], [0.1, 1.0, 0.0], 1.3, True, True),
                ([0.4, 0.9, 0.2], 0.3, 1.0, False, False),
            ]:
                kw = dict(density=density, lam=lam, trim=trim, normalize=normalize)
                fused = ties_merge(deltas, weights, base=base, out_dtype=out_dtype, **kw)
                expected = ties_merge(deltas, weights, **kw).add_(base).to(out_dtype)
                assert fused.dtype == out_dtype and fused.shape == base.shape
                assert torch.equal(fused, expected)
    # one delta, and deltas that all drop out, still give the base
    one = ties_merge(deltas[:1], [1.0], density=0.4, base=base32, out_dtype=torch.bfloat16)
    assert torch.equal(one, ties_merge(deltas[:1], [1.0], density=0.4).add_(base32).bfloat16())
    none = ties_merge(deltas, [1.0] * 3, density=0.0, base=base32, out_dtype=torch.bfloat16)
    assert torch.equal(none, base32.bfloat16())
    with pytest.raises(InvalidInputError, match="elements"):
        ties_merge(deltas, [1.0] * 3, base=torch.zeros(3))


def test_trim_matches_topk() -> None:
    x = randn(300, 400, seed=8)
    for d in (0.01, 0.2, 0.5, 0.93):
        k = max(1, int(d * x.numel()))
        mask = torch.zeros(x.numel(), dtype=torch.bool)
        mask[x.reshape(-1).abs().topk(k).indices] = True
        exact(trim_by_magnitude(x, d), x * mask.reshape(x.shape))


@pytest.mark.parametrize("shape", [(5, 7), (700, 1000), (TM._MERGE_CHUNK + 17,)])
def test_ties_merge_equals_composition(shape: tuple[int, ...]) -> None:
    deltas = [randn(*shape, seed=10 + i) for i in range(3)]
    cases = [
        ([0.5, 0.3, 0.8], 0.2, 1.0, True, True),
        ([1.0, -0.7, 2.0], [0.1, 0.6, 1.0], 1.7, True, True),
        ([0.4, 0.4, 0.2], 0.5, 0.9, False, True),
        ([0.4, 0.9, 0.2], 0.3, 1.0, True, False),
    ]
    for weights, density, lam, trim, normalize in cases:
        fused = ties_merge(deltas, weights, density=density, lam=lam, trim=trim, normalize=normalize)
        exact(fused, naive_ties(deltas, weights, density, lam, trim, normalize))


def test_lora_delta_against_float64() -> None:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(8, 300, generator=g)
    b = torch.randn(200, 8, generator=g)
    expected = (b.double() @ a.double()) * 2.5
    torch.testing.assert_close(lora_delta(a, b, 2.5).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        lora_delta(a, b, 2.5, transpose=True).double(), expected.t(), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------------------
# oracles: mergekit 0.1.5 and PEFT

mergekit_api = pytest.importorskip("mergekit.merge_methods.api")
peft_merge_utils = pytest.importorskip("peft.utils.merge_utils")


def _models(shape: tuple[int, ...], count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = randn(*shape, seed=seed)
    models = [base + 0.1 * randn(*shape, seed=seed + 1 + i) for i in range(count)]
    return base, models


def _merge(method: str, base: torch.Tensor, models: list[torch.Tensor], **parameters) -> torch.Tensor:
    return mergekit_api.merge_tensors([base, *models], method, parameters=parameters, base_index=0)


@pytest.mark.parametrize("shape", [(64, 96), (640, 1100)])  # the second runs the sampled select
def test_mergekit_ties(shape: tuple[int, int]) -> None:
    base, models = _models(shape, 3, seed=20)
    deltas = [m - base for m in models]  # the same float32 subtraction mergekit performs
    for weights, density, lam in (
        ([1.0, 1.0, 1.0], [0.2, 0.2, 0.2], 1.0),
        ([0.7, 0.3, 1.2], [0.1, 0.5, 0.9], 1.0),
        ([0.5, -0.4, 0.9], [0.3, 1.0, 0.05], 1.5),
    ):
        expected = _merge(
            "ties", base, models, weight=weights, density=density, normalize=True, **{"lambda": lam}
        )
        exact(base + ties_merge(deltas, weights, density=density, lam=lam), expected)
        summed = _merge("ties", base, models, weight=weights, density=density, normalize=False)
        exact(base + ties_merge(deltas, weights, density=density, normalize=False), summed)


def test_mergekit_task_arithmetic_and_linear() -> None:
    base, models = _models((48, 80), 3, seed=30)
    deltas = [m - base for m in models]
    weights = [0.6, -0.3, 1.1]
    expected = _merge("task_arithmetic", base, models, weight=weights)
    exact(base + weighted_sum(deltas, weights), expected)
    expected = _merge("task_arithmetic", base, models, weight=weights, normalize=True, **{"lambda": 0.8})
    exact(base + weighted_sum(deltas, weights, normalize=True) * 0.8, expected)
    # linear merges the models themselves (no base), normalised by default; mergekit uses addcmul
    linear = mergekit_api.merge_tensors(models, "linear", parameters={"weight": weights})
    close(weighted_sum(models, weights, normalize=True), linear)
    linear = mergekit_api.merge_tensors(models, "linear", parameters={"weight": weights, "normalize": False})
    close(weighted_sum(models, weights), linear)


def test_mergekit_dare_with_given_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    import mergekit.sparsify as sparsify

    base, models = _models((40, 70), 3, seed=40)
    deltas = [m - base for m in models]
    densities = [0.3, 0.5, 0.8]
    weights = [0.5, 0.9, 0.4]
    masks = [
        bernoulli_mask(base.shape, d, generator=make_generator(1, "w", i)) for i, d in enumerate(densities)
    ]
    queue: list[torch.Tensor] = []

    def given_mask(tensor, density, rescale_norm=None):
        return sparsify.rescaled_masked_tensor(tensor, queue.pop(0).float(), rescale_norm)

    monkeypatch.setattr(sparsify, "bernoulli", given_mask)
    dropped = [random_drop(d, p, mask=m, rescale="l1") for d, p, m in zip(deltas, densities, masks)]

    queue[:] = masks
    expected = _merge("dare_linear", base, models, weight=weights, density=densities)
    exact(base + weighted_sum(dropped, weights), expected)
    queue[:] = masks
    expected = _merge("dare_ties", base, models, weight=weights, density=densities)  # normalize: false
    exact(base + ties_merge(dropped, weights, trim=False, normalize=False), expected)
    queue[:] = masks
    expected = _merge("dare_ties", base, models, weight=weights, density=densities, normalize=True)
    exact(base + ties_merge(dropped, weights, trim=False), expected)
    # rescale: false keeps the masked values unscaled
    queue[:] = masks
    expected = _merge("dare_linear", base, models, weight=weights, density=densities, rescale=False)
    plain = [random_drop(d, p, mask=m, rescale=None) for d, p, m in zip(deltas, densities, masks)]
    exact(base + weighted_sum(plain, weights), expected)


def test_mergekit_dare_with_seeded_rng() -> None:
    """Our chunked mask stream is mergekit's: seed torch's global RNG and one generator identically."""
    base, models = _models((33, 65), 2, seed=50)
    deltas = [m - base for m in models]
    densities, weights = [0.25, 0.6], [1.0, 0.5]
    torch.manual_seed(1234)
    expected = _merge("dare_linear", base, models, weight=weights, density=densities)
    generator = torch.Generator().manual_seed(1234)
    dropped = [random_drop(d, p, generator=generator, rescale="l1") for d, p in zip(deltas, densities)]
    exact(base + weighted_sum(dropped, weights), expected)


def test_peft_pruning_oracles() -> None:
    x = randn(128, 96, seed=60)
    for d in (0.01, 0.2, 0.7):
        exact(trim_by_magnitude(x, d), peft_merge_utils.magnitude_based_pruning(x, d))
    torch.manual_seed(99)
    expected = peft_merge_utils.random_pruning(x, 0.3, rescale=True)
    exact(random_drop(x, 0.3, generator=torch.Generator().manual_seed(99)), expected)


def test_bernoulli_mask_matches_torch_bernoulli() -> None:
    shape = (3, RD._MASK_CHUNK // 2 + 7)  # spans several chunks
    for d in (0.1, 1 / 3):
        expected = torch.bernoulli(torch.full(shape, d), generator=torch.Generator().manual_seed(5)).bool()
        exact(bernoulli_mask(shape, d, generator=torch.Generator().manual_seed(5)), expected)


def test_dare_statistics() -> None:
    n = 400_000
    x = randn(n, seed=70)
    for d in (0.1, 0.5, 0.9):
        mask = bernoulli_mask((n,), d, generator=make_generator(0, "stats", int(d * 10)))
        rate = mask.float().mean().item()
        assert abs(rate - d) < 5 * math.sqrt(d * (1 - d) / n)
        out = random_drop(x, d, mask=mask)  # ×1/d: unbiased, E[out] = x
        err = (out - x).double().mean().item()
        sd = math.sqrt((x.double() ** 2).mean().item() * (1 - d) / d / n)
        assert abs(err) < 5 * sd
    # per entry: the mean over many independent drops converges to x
    small = randn(64, seed=71)
    draws = 4000
    outs = random_drop(small.repeat(draws, 1), 0.5, generator=torch.Generator().manual_seed(2))
    mean = outs.double().mean(dim=0)
    sd = small.double().abs() * math.sqrt((1 - 0.5) / 0.5 / draws)
    assert ((mean - small.double()).abs() <= 5 * sd + 1e-12).all()
    # L1 rescale preserves the L1 norm exactly up to rounding
    out = random_drop(x, 0.3, generator=torch.Generator().manual_seed(3), rescale="l1")
    assert math.isclose(out.abs().sum().item(), x.abs().sum().item(), rel_tol=1e-4)
