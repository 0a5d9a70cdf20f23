"""NF4 end to end, with bitsandbytes, transformers and PEFT as the oracles.

- ``adaptr quantize --method nf4`` writes a folder transformers loads with no arguments, and its
  logits equal those of the model bitsandbytes quantizes itself on load.
- A ``--qlora nf4`` merge is closer to the adapter running unmerged on bitsandbytes' NF4 base
  (how QLoRA adapters are trained and served) than a merge into the original 16-bit weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import ok_json

from adaptr.testing import DEFAULT_TARGETS_ALL_LINEAR, make_llama_base, make_lora_adapter

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def qlora_fixture(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qlora")
    base = make_llama_base(root / "base", dtype="bfloat16", hidden_size=128, intermediate_size=256, seed=7)
    adapter = make_lora_adapter(
        root / "adapter", base, r=8, lora_alpha=16, target_modules=DEFAULT_TARGETS_ALL_LINEAR, seed=8
    )
    return {"base": base, "adapter": adapter}


def bnb_config(double_quant: bool) -> object:
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.bfloat16, device_map="cpu", **kwargs
        )


PROBE = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("double_quant", [False, True])
def test_adaptr_nf4_loads_in_transformers_like_bitsandbytes_own(cli, qlora_fixture, double_quant):
    ok_json(cli, "base", "add", qlora_fixture["base"], "--name", "base")
    flag = "--double-quant" if double_quant else "--no-double-quant"
    art = ok_json(cli, "quantize", "base", "--method", "nf4", flag, "--name", "nf4")
    ours = load(art["path"])  # nothing but the folder: its config.json says how to load it
    theirs = load(qlora_fixture["base"], quantization_config=bnb_config(double_quant))
    assert type(ours.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    a, b = logits(ours, PROBE), logits(theirs, PROBE)
    assert torch.equal(a, b), float((a - b).abs().max())


def test_qlora_merge_is_closer_to_the_adapter_on_its_nf4_base(cli, qlora_fixture):
    ok_json(cli, "base", "add", qlora_fixture["base"], "--name", "base")
    ok_json(cli, "adapter", "add", qlora_fixture["adapter"], "--base", "base", "--name", "sql")
    qlora = ok_json(
        cli,
        "merge",
        "--adapter",
        "sql",
        "--qlora",
        "nf4",
        "--qlora-param",
        "double_quant=true",
        "--name",
        "q",
    )
    plain = ok_json(cli, "merge", "--adapter", "sql", "--name", "plain")

    # The oracle: QLoRA as trained and served, the adapter unmerged on bitsandbytes' NF4 model.
    reference = peft.PeftModel.from_pretrained(
        load(qlora_fixture["base"], quantization_config=bnb_config(True)), str(qlora_fixture["adapter"])
    )
    ref = logits(reference, PROBE)
    d_qlora = float((logits(load(qlora["path"]), PROBE) - ref).abs().max())
    d_plain = float((logits(load(plain["path"]), PROBE) - ref).abs().max())
    print(f"\nmax |Δlogit| vs adapter on the NF4 base: --qlora nf4 {d_qlora:.4g}, plain merge {d_plain:.4g}")
    # bf16 arithmetic on both sides leaves some noise; the NF4 rounding a plain merge ignores
    # is several times larger.
    assert d_qlora * 4 < d_plain, (d_qlora, d_plain)
