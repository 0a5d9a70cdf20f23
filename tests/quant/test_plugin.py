"""The ``adaptr_quant`` plugin: the Quantizer protocol, layouts known before data, configs transformers reads."""

from __future__ import annotations

import json

import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.interfaces import PartSpec, Quantizer
from adaptr.ops import quant4
from adaptr_quant import FP4, FP8, INT8, NF4
from adaptr_quant.bnb import BLOCKSIZES

CODES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
TORCH_CODES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
}
SHAPES = [(1, 1), (3, 7), (64, 64), (128, 384), (257, 129), (1000, 3), (5, 4097)]
PARAMS = {
    "nf4": [{"blocksize": 64, "double_quant": False}, {"blocksize": 32, "double_quant": True}],
    "fp4": [{"blocksize": 4096, "double_quant": True}, {"blocksize": 128, "double_quant": False}],
    "int8": [{"threshold": 6.0}],
    "fp8": [{"partial_blocks": True}],
}
QUANTIZERS = {"nf4": NF4, "fp4": FP4, "int8": INT8, "fp8": FP8}


def test_registered_and_protocol() -> None:
    from adaptr.plugins import get_host

    host = get_host()
    for name, q in QUANTIZERS.items():
        assert isinstance(q, Quantizer)
        assert host.registry("quantizer").get(name) is q
        assert [p.name for p in q.params] == list(PARAMS[name][0])
        assert q.description
    assert BLOCKSIZES == quant4.BLOCKSIZES


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_layout_equals_quantize(name: str) -> None:
    q = QUANTIZERS[name]
    g = torch.Generator().manual_seed(1)
    for params in PARAMS[name]:
        for i, shape in enumerate(SHAPES):
            dtype = list(CODES)[i % 3]
            w = (torch.randn(shape, generator=g) + 0.1).to(dtype)
            assert q.refuse("m.weight", shape, CODES[dtype], params) is None
            layout = q.layout("m.weight", shape, CODES[dtype], params)
            assert all(isinstance(p, PartSpec) for p in layout)
            before = w.clone()
            parts = q.quantize("m.weight", w, params)
            assert torch.equal(w, before), "quantize must not modify its input"
            got = [PartSpec(k, TORCH_CODES[v.dtype], tuple(v.shape)) for k, v in parts.items()]
            assert got == layout, (shape, params)
            back = q.dequantize("m.weight", parts, params, dtype)
            assert back.shape == w.shape and back.dtype == dtype
            rel = ((back.double() - w.double()).norm() / w.double().norm()).item()
            assert rel < 0.2, (name, shape, rel)


def test_refuse() -> None:
    for q in QUANTIZERS.values():
        params = {p.name: p.default for p in q.params}
        assert "1-D" in q.refuse("norm.weight", (64,), "BF16", params)
        assert "3-D" in q.refuse("conv.weight", (8, 8, 3), "BF16", params)
        assert q.refuse("m.weight", (8, 8), "I32", params) is not None
        assert q.refuse("m.bias", (8, 8), "BF16", params) is not None
    fp8_default = {"partial_blocks": False}
    assert "multiple of 128" in FP8.refuse("k.weight", (64, 128), "BF16", fp8_default)
    assert FP8.refuse("q.weight", (256, 128), "BF16", fp8_default) is None


@pytest.mark.parametrize("bad", [0, 48, 8192, True, "64"])
def test_bad_blocksize_is_one_line(bad) -> None:
    for method in (NF4.refuse, NF4.layout, NF4.config):
        args = ({"blocksize": bad, "double_quant": False}, [], "bfloat16")
        with pytest.raises(InvalidInputError) as info:
            if method == NF4.config:
                method(*args)
            else:
                method("m.weight", (8, 8), "BF16", args[0])
        message = str(info.value)
        assert "\n" not in message and "32, 64, 128, 256, 512, 1024, 2048, 4096" in message


@pytest.mark.parametrize("double_quant", [False, True])
def test_quant_state_loads_in_bitsandbytes(double_quant: bool) -> None:
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(300, 200, dtype=torch.bfloat16)
    params = {"blocksize": 64, "double_quant": double_quant}
    parts = NF4.quantize("m.weight", w, params)
    state = parts["m.weight.quant_state.bitsandbytes__nf4"]
    text = bytes(state.tolist()).decode()
    assert json.loads(text)["shape"] == [300, 200]  # trailing padding is JSON whitespace
    qs = F.QuantState.from_dict({k: v for k, v in parts.items() if k != "m.weight"}, torch.device("cpu"))
    assert qs.shape == (300, 200) and qs.dtype == torch.bfloat16 and qs.blocksize == 64
    assert qs.nested == double_quant
    assert torch.equal(
        F.dequantize_4bit(parts["m.weight"], qs), NF4.dequantize("m.weight", parts, params, w.dtype)
    )
    # The padded length depends on the shape and parameters only.
    for dtype in (torch.float32, torch.float16):
        other = NF4.quantize("m.weight", w.to(dtype) * 1e-30, params)
        assert other["m.weight.quant_state.bitsandbytes__nf4"].numel() == state.numel()


def test_configs_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")

    def plain(d: dict) -> dict:
        return json.loads(json.dumps(d, default=lambda v: getattr(v, "value", str(v))))

    skip = ["lm_head", "model.embed_tokens"]
    ref = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip,
    ).to_dict()
    ours = NF4.config({"blocksize": 64, "double_quant": True}, skip, "bfloat16")
    assert ours == plain(ref)
    assert list(ours) == list(ref)
    assert NF4.config({"blocksize": 64, "double_quant": True}, skip, "BF16") == ours
    ref8 = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip).to_dict()
    assert INT8.config({"threshold": 6.0}, skip, "bfloat16") == plain(ref8)
    fp4 = FP4.config({"blocksize": 64, "double_quant": False}, skip, "float16")
    assert fp4["bnb_4bit_quant_type"] == "fp4" and fp4["bnb_4bit_compute_dtype"] == "float16"
    ref_fp8 = transformers.FineGrainedFP8Config(
        weight_block_size=[128, 128], modules_to_not_convert=skip
    ).to_dict()
    assert FP8.config({"partial_blocks": False}, skip, "bfloat16") == plain(ref_fp8)
