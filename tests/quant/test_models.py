"""Whole models: folders written with the built-in quantizers load in transformers as they are.

Each test quantizes a tiny bf16 Llama with ``write_quantized`` (the plain-loop version of what
``adaptr quantize`` does through the streaming engine) and compares logits with the reference:

- nf4 (double quant) and int8: the model bitsandbytes quantizes itself on load
  (``BitsAndBytesConfig``), which must give the same logits;
- fp8: transformers cannot quantize to FP8 without a GPU, but on CPU it loads a pre-quantized FP8
  checkpoint by dequantizing it to the model dtype (``Fp8Dequantize``). The reference is the source
  model with every quantized weight replaced by transformers' own ``Fp8Quantize`` then
  ``Fp8Dequantize``.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptr.engine import DEFAULT_SKIP, module_skipped
from adaptr.testing import make_llama_base

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

PROBE = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def write_quantized(
    src: Path, dest: Path, quantizer: Any, params: dict[str, Any], skip: tuple[str, ...] = DEFAULT_SKIP
) -> dict[str, Any]:
    """Write ``src`` quantized by ``quantizer`` into ``dest``; returns the ``quantization_config``.

    Like the engine: 2-D ``*.weight`` tensors not matching ``skip`` and not refused become their parts
    (checked against ``layout``), everything else is copied as it is.
    """
    dest.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    out: dict[str, torch.Tensor] = {}
    refused: list[str] = []
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        code = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[tensor.dtype]
        if not name.endswith(".weight") or module_skipped(module, skip):
            out[name] = tensor
            continue
        if quantizer.refuse(name, tuple(tensor.shape), code, params) is not None:
            if tensor.dim() == 2:
                refused.append(module)
            out[name] = tensor
            continue
        layout = quantizer.layout(name, tuple(tensor.shape), code, params)
        parts = quantizer.quantize(name, tensor, params)
        assert [(p.name, p.shape) for p in layout] == [(k, tuple(v.shape)) for k, v in parts.items()]
        out.update(parts)
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    qconfig = quantizer.config(params, [*skip, *refused], config.get("torch_dtype") or "bfloat16")
    config["quantization_config"] = qconfig
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(src / "generation_config.json", dest / "generation_config.json")
    return qconfig


def load(path: Path, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.bfloat16, device_map="cpu", **kwargs
        )


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quant-models")
    return make_llama_base(root / "base", dtype="bfloat16", hidden_size=128, intermediate_size=384, seed=11)


@pytest.fixture(scope="module")
def quantizers() -> dict[str, Any]:
    from adaptr_quant import FP8, INT8, NF4

    return {"nf4": NF4, "int8": INT8, "fp8": FP8}


def test_nf4_double_quant_matches_bitsandbytes(base: Path, quantizers: dict, tmp_path: Path) -> None:
    params = {"blocksize": 64, "double_quant": True}
    write_quantized(base, tmp_path / "nf4", quantizers["nf4"], params)
    ours = load(tmp_path / "nf4")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = load(base, quantization_config=config)
    mine = dict(ours.state_dict())
    for key, value in theirs.state_dict().items():  # the same bytes, not just the same logits
        if key.endswith((".weight", ".absmax", ".nested_absmax")) and value.dtype == torch.uint8:
            assert torch.equal(mine[key], value), key
    assert torch.equal(logits(ours), logits(theirs))


def test_int8_matches_bitsandbytes(base: Path, quantizers: dict, tmp_path: Path) -> None:
    write_quantized(base, tmp_path / "int8", quantizers["int8"], {"threshold": 6.0})
    ours = load(tmp_path / "int8")
    theirs = load(base, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    mine = dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        if value.dtype == torch.int8 or key.endswith(".SCB"):
            assert torch.equal(mine[key], value), key
    assert torch.equal(logits(ours), logits(theirs))


def test_fp8_loads_as_transformers_dequantizes_it(base: Path, quantizers: dict, tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    qconfig = write_quantized(base, tmp_path / "fp8", quantizers["fp8"], {"partial_blocks": False})
    # k_proj/v_proj (64×128) are not whole 128×128 blocks: refused, listed, left in bf16.
    assert "model.layers.0.self_attn.k_proj" in qconfig["modules_to_not_convert"]
    ours = load(tmp_path / "fp8")

    class Hf:
        quantization_config = transformers.FineGrainedFP8Config(weight_block_size=[128, 128])

    tensors = load_file(base / "model.safetensors")
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if tensor.dim() != 2 or module_skipped(module, qconfig["modules_to_not_convert"]):
            continue
        parts = Fp8Quantize(Hf())._quantize_one(name, tensor)
        tensors[name] = Fp8Dequantize(Hf())._dequantize_one(
            parts[name], parts[f"{module}.weight_scale_inv"], output_dtype=torch.bfloat16
        )
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    save_file(tensors, ref_dir / "model.safetensors", metadata={"format": "pt"})
    for side in ("config.json", "generation_config.json"):
        shutil.copy(base / side, ref_dir / side)
    reference = load(ref_dir)
    ours_sd = ours.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours_sd[key], value), key
    assert torch.equal(logits(ours), logits(reference))
    # And the quantization is not a no-op: the dequantized weights differ from the bf16 source.
    source = load(base)
    assert not torch.equal(logits(ours), logits(source))
