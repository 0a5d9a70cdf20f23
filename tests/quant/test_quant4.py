"""NF4/FP4: byte-exact with bitsandbytes 0.50.2 on CPU, and exact against a plain float64 reference."""

from __future__ import annotations

import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.ops import quant4
from adaptr.ops.quant4 import Quant4, code_book, dequantize_4bit, dynamic_map, quantize_4bit

F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Odd sizes: not multiples of 64 or 256, partial last blocks, odd element counts, one element.
SHAPES = [(37, 129), (1, 1), (3, 7), (256, 4097), (96, 200)]


def weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random, never zero, rows of different scale (so blocks have different absmax)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.01 + 3 * torch.rand(shape[0], 1, generator=g))
    w = torch.where(w == 0, torch.full_like(w, 1e-3), w)
    return w.to(dtype)


def bnb_quantize(w: torch.Tensor, q: str, bs: int, dq: bool):
    return F.quantize_4bit(w, blocksize=bs, quant_type=q, compress_statistics=dq)


def assert_same_as_bnb(ours: Quant4, packed: torch.Tensor, state) -> None:
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    if state.nested:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert ours.nested_offset == float(state.offset)
        assert torch.equal(dynamic_map(), state.state2.code)
    assert torch.equal(code_book(ours.quant_type), state.code)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bytes_and_dequantize_equal_bitsandbytes(dtype, quant_type, double_quant) -> None:
    for i, shape in enumerate(SHAPES):
        for bs in (64, 256) if i % 2 else (32, 4096):
            w = weights(shape, dtype, seed=i)
            packed, state = bnb_quantize(w, quant_type, bs, double_quant)
            ours = quantize_4bit(w, blocksize=bs, quant_type=quant_type, double_quant=double_quant)
            assert_same_as_bnb(ours, packed, state)
            assert torch.equal(dequantize_4bit(ours), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("threads", [1, 2])
def test_large_tensor_both_thread_paths(threads: int) -> None:
    """Big enough for several whole chunks at either chunk size (one torch thread, or two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = weights((1536, 1000), torch.bfloat16, seed=5)
        for q, dq in (("nf4", True), ("fp4", False)):
            packed, state = bnb_quantize(w, q, 64, dq)
            ours = quantize_4bit(w, blocksize=64, quant_type=q, double_quant=dq)
            assert_same_as_bnb(ours, packed, state)
    finally:
        torch.set_num_threads(previous)


def _nextafter32(x: torch.Tensor, k: int) -> torch.Tensor:
    """x moved by k float32 ulps (keys are monotone within a sign)."""
    bits = x.view(torch.int32).to(torch.int64)
    moved = torch.where(x >= 0, bits + k, bits - k)
    return moved.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_carry_table_is_exact_bucketize_at_every_midpoint(quant_type: str) -> None:
    """The table lookup equals ``#(midpoints < s)`` on every midpoint, its ±8 ulps, ±0, ±1 and a sweep."""
    code = code_book(quant_type)
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    probes = [mids, torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-30, -1e-30])]
    probes += [_nextafter32(mids, k) for k in range(-8, 9) if k]
    probes.append(torch.linspace(-1.0, 1.0, 200_001))
    s = torch.cat(probes).float()
    s = s[(s.abs() <= 1.0000001)]
    expected = order[torch.bucketize(s, mids, right=False)].to(torch.int32)
    q = quant4._codes_(
        s.clone(),
        torch.empty(s.numel(), dtype=torch.int32),
        torch.empty(s.numel(), dtype=torch.int32),
        quant4._carry_table(quant_type),
        quant4._code_of_sorted(quant_type) if quant_type == "fp4" else None,
    )
    assert torch.equal(q, expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_float64_reference(quant_type: str) -> None:
    """Against a from-scratch reference: per block, count the code-book midpoints below the scaled value.

    The scaled value is float32 like bitsandbytes' (whole blocks times a float32 reciprocal, the
    partial block divided); everything after is float64 comparisons and sums.
    """
    w = weights((130, 77), torch.bfloat16, seed=9)  # 10010 elements: a partial last block
    bs = 64
    x = w.float().reshape(-1)
    n = x.numel()
    code = code_book(quant_type)
    order = torch.argsort(code)
    mids = ((code[order[:-1]].double() + code[order[1:]].double()) / 2).float().double()
    scaled, absmax = [], []
    for start in range(0, n, bs):
        blk = x[start : start + bs]
        am = blk.abs().max()
        scaled.append(blk * (1.0 / am) if blk.numel() == bs else blk / am)
        absmax.append(am)
    s = torch.cat([*scaled, torch.zeros(n % 2)]).double()  # odd n: one 0.0 pads the last byte
    q = order[(s[:, None] > mids[None, :]).sum(1)]
    packed = (q[0::2] << 4 | q[1::2]).to(torch.uint8)
    ours = quantize_4bit(w, blocksize=bs, quant_type=quant_type)
    assert torch.equal(ours.packed.reshape(-1), packed)
    am = torch.stack(absmax).double()
    assert torch.equal(ours.absmax.double(), am)
    # Dequantize: code * absmax, one float32 product, then the output dtype.
    scale = am.repeat_interleave(bs)[:n]
    ref = (code[q[:n]].double() * scale).float().reshape(w.shape)
    assert torch.equal(dequantize_4bit(ours, torch.float32), ref)
    assert torch.equal(dequantize_4bit(ours), ref.to(torch.bfloat16))
    # Error bound: at most half the widest code gap, times the block's absmax.
    gap = code.double().sort().values.diff().max().item() / 2
    err = (ref.double() - w.double()).abs().reshape(-1)
    assert bool((err <= scale * gap * (1 + 1e-6)).all())


def test_nested_statistics_reference() -> None:
    """Double quantization dequantizes to within one dynamic-map step of the true absmax."""
    w = weights((512, 640), torch.float16, seed=3)
    plain = quantize_4bit(w, double_quant=False)
    nested = quantize_4bit(w, double_quant=True)
    assert torch.equal(plain.packed, nested.packed)
    approx = quant4.dequantize_absmax(nested).double()
    exact = plain.absmax.double()
    assert nested.nested_offset == pytest.approx(exact.mean().item(), rel=1e-6)
    step = dynamic_map().double().diff().max().item()
    scale = nested.nested_absmax.double().repeat_interleave(256)[: exact.numel()]
    assert bool(((approx - exact).abs() <= scale * step).all())


def test_rejects() -> None:
    with pytest.raises(InvalidInputError, match="blocksize must be one of 32, 64"):
        quantize_4bit(torch.ones(8, 8), blocksize=48)
    with pytest.raises(InvalidInputError, match="float16, bfloat16 or float32"):
        quantize_4bit(torch.ones(8, 8, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        quantize_4bit(torch.tensor([[1.0, float("nan")]] * 70))
    with pytest.raises(InvalidInputError, match="'nf4' or 'fp4'"):
        quantize_4bit(torch.ones(8, 8), quant_type="int4")


def test_zero_blocks_and_constant_tensors_match_bitsandbytes() -> None:
    w = torch.zeros(4, 160)
    w[0, :5] = 1.0
    w[3] = 2.5  # every absmax in the last row equal: nested blocks of one value
    for dq in (False, True):
        packed, state = bnb_quantize(w, "nf4", 64, dq)
        ours = quantize_4bit(w, double_quant=dq)
        assert_same_as_bnb(ours, packed, state)
        assert torch.equal(dequantize_4bit(ours), F.dequantize_4bit(packed, state))
    c = torch.full((300, 64), 0.75)
    packed, state = bnb_quantize(c, "nf4", 64, True)
    assert torch.equal(quantize_4bit(c, double_quant=True).absmax, state.absmax)
