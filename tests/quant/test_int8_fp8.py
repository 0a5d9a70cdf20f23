"""LLM.int8 against bitsandbytes' ``Linear8bitLt``; FP8 against transformers' own FP8 (de)quantization.

Both also against plain float64 references and the formats' error bounds.
"""

from __future__ import annotations

import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.ops.fp8 import FP8_MAX, dequantize_fp8, quantize_fp8, scale_shape
from adaptr.ops.int8 import dequantize_int8, quantize_int8

bnb = pytest.importorskip("bitsandbytes")


def weights(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.01 + 2 * torch.rand(shape[0], 1, generator=g))
    return torch.where(w == 0, torch.full_like(w, 1e-3), w).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(64, 96), (301, 77), (1, 5)])
def test_int8_equals_linear8bitlt(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = weights(shape, dtype, seed=shape[0])
    layer = bnb.nn.Linear8bitLt(shape[1], shape[0], bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")  # quantizes, as transformers does on load
    cb, scb = quantize_int8(w)
    assert torch.equal(cb, layer.weight.data)
    assert torch.equal(scb, layer.weight.SCB)
    back = dequantize_int8(cb, scb, torch.float32)
    assert torch.equal(back, bnb.functional.int8_vectorwise_dequant(cb, scb))


def test_int8_float64_reference_and_bound() -> None:
    w = weights((200, 333), torch.bfloat16, seed=1)
    w16 = w.to(torch.float16).double()
    scb = w16.abs().amax(1)
    recip = (1.0 / scb.float()).double() * 127.0  # torch's ``127 / t``: a float32 reciprocal, times 127
    ref = torch.round((w16 * recip.float().double()[:, None]).float().double())
    cb, ours_scb = quantize_int8(w)
    assert torch.equal(ours_scb.double(), scb)
    assert torch.equal(cb.double(), ref)
    err = (dequantize_int8(cb, ours_scb, torch.float32).double() - w.double()).abs()
    assert bool(
        (err <= scb[:, None] / 127 * 0.5 + scb[:, None] * 1e-3).all()
    )  # half a step (+ fp16 rounding)


def test_int8_rejects() -> None:
    with pytest.raises(InvalidInputError, match="2-D"):
        quantize_int8(torch.ones(4))
    with pytest.raises(InvalidInputError, match="float16's range"):
        quantize_int8(torch.full((2, 2), 1e6))


def test_int8_zero_rows_match_bitsandbytes() -> None:
    w = weights((8, 40), torch.bfloat16, seed=2)
    w[3] = 0
    layer = bnb.nn.Linear8bitLt(40, 8, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    cb, scb = quantize_int8(w)
    assert torch.equal(cb, layer.weight.data) and torch.equal(scb, layer.weight.SCB)


class _Hf:
    class quantization_config:  # stands in for a FineGrainedFP8Config
        weight_block_size = [128, 128]
        scale_fmt = "float"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fp8_equals_transformers(dtype: torch.dtype) -> None:
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    w = weights((384, 256), dtype, seed=4)
    w[:128, :128] = 0  # an all-zero block: scale 1
    w[200, 3] = 40.0  # an outlier in one block
    ref = fp8.Fp8Quantize(_Hf())._quantize_one("x.weight", w)
    q, inv = quantize_fp8(w)
    assert torch.equal(q.view(torch.uint8), ref["x.weight"].view(torch.uint8))
    assert torch.equal(inv, ref["x.weight_scale_inv"])
    back = fp8.Fp8Dequantize(_Hf())._dequantize_one(q, inv, output_dtype=dtype)
    assert torch.equal(dequantize_fp8(q, inv, dtype), back)


@pytest.mark.parametrize("shape", [(384, 256), (300, 200), (5, 130)])
def test_fp8_bound_and_float64_reference(shape: tuple[int, int]) -> None:
    """Partial edge blocks included: every block's amax maps to ±448 and the e4m3 rounding bound holds."""
    w = weights(shape, torch.float32, seed=shape[1])
    q, inv = quantize_fp8(w)
    assert tuple(inv.shape) == scale_shape(shape)
    wd = w.double()
    rows, cols = shape
    for bi in range(inv.shape[0]):
        for bj in range(inv.shape[1]):
            blk = wd[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128]
            scale = (1.0 / blk.abs().max().float()).double() * FP8_MAX  # float32 reciprocal, times 448
            assert inv[bi, bj].item() == pytest.approx(1 / scale.float().item(), rel=1e-6)
            assert (
                q[bi * 128 : (bi + 1) * 128, bj * 128 : (bj + 1) * 128].float().abs().max().item() == FP8_MAX
            )
    back = dequantize_fp8(q, inv, torch.float32).double()
    step = inv.double().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    # e4m3: 3 mantissa bits, so |error| <= 2^-4 relative for normals, 2^-10 (half the smallest subnormal) below.
    bound = torch.maximum(wd.abs() * 2**-4, step * 2**-10) * (1 + 1e-5)
    assert bool(((back - wd).abs() <= bound).all())


def test_fp8_rejects() -> None:
    with pytest.raises(InvalidInputError, match="2-D"):
        quantize_fp8(torch.ones(3, 3, 3))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        quantize_fp8(torch.full((4, 4), float("inf")))
