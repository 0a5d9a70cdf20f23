"""The fixture factory is only useful if its folders are genuine: these tests load them with the
real transformers and PEFT and check nothing is missing, nothing is reinterpreted, and the adapter
really changes the model."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from adaptr.testing import (  # noqa: E402
    DEFAULT_TARGETS_ALL_LINEAR,
    make_demo_set,
    make_gpt2_base,
    make_llama_base,
    make_lora_adapter,
)

INPUT_IDS = [[1, 5, 9, 42, 7, 200]]

# Library chatter about situations these tests create on purpose; the files are still valid.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*lora_bias=True. was passed"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor.s. have invalid shape"),
    pytest.mark.filterwarnings("ignore:.*save_embedding_layers"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing. is deprecated"),
]


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_base(tmp_path_factory.mktemp("llama") / "base", seed=3)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt2_base(tmp_path_factory.mktemp("gpt2") / "base", seed=4)


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    if (folder / "adapter_model.bin").is_file():
        tensors.update(torch.load(folder / "adapter_model.bin", weights_only=True))
    return tensors


def _load_base(folder: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).logits


def _assert_weights_match_file(model: torch.nn.Module, folder: Path) -> None:
    state = model.state_dict()
    on_disk = _file_tensors(folder)
    assert on_disk
    for name, tensor in on_disk.items():
        assert torch.equal(state[name], tensor.to(state[name].dtype)), name


def _expected_rank_and_scaling(config: dict, module: str) -> tuple[int, float]:
    """Restated from PEFT's documented pattern rules rather than imported, so a factory bug can't hide."""

    def pick(pattern: dict, default: float) -> float:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pick(config["rank_pattern"], config["r"])
    alpha = pick(config["alpha_pattern"], config["lora_alpha"])
    return r, alpha / math.sqrt(r) if config["use_rslora"] else alpha / r


def test_import_pulls_in_no_ml_library() -> None:
    module = Path(__file__).resolve().parents[1] / "adaptr" / "testing.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('fixture_factory', {str(module)!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "heavy = {'torch', 'transformers', 'peft', 'safetensors'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_base_is_what_transformers_writes(tmp_path: Path, tied: bool) -> None:
    base = make_llama_base(tmp_path / "base", tie_word_embeddings=tied, seed=1)
    assert (base / "model.safetensors").is_file()
    assert ("lm_head.weight" in load_file(str(base / "model.safetensors"))) is not tied

    model = _load_base(base)
    _assert_weights_match_file(model, base)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    # Round-tripping the config through transformers must not change a single field.
    transformers.AutoConfig.from_pretrained(base).save_pretrained(tmp_path / "resaved")
    written = json.loads((base / "config.json").read_text())
    assert json.loads((tmp_path / "resaved" / "config.json").read_text()) == written
    assert written["architectures"] == ["LlamaForCausalLM"] and written["dtype"] == "float32"
    for name, tensor in model.state_dict().items():
        if name.endswith("norm.weight"):
            assert tensor.min() > 0.8 and tensor.max() < 1.2, name
        else:
            assert torch.count_nonzero(tensor) == tensor.numel() and tensor.std() == pytest.approx(
                0.02, rel=0.2
            ), name


def test_llama_base_dtype_is_honoured(tmp_path: Path) -> None:
    base = make_llama_base(tmp_path / "base", dtype="bfloat16", hidden_size=32, intermediate_size=64)
    model = _load_base(base)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _assert_weights_match_file(model, base)


def test_sharded_llama_base_matches_transformers_sharding(tmp_path: Path) -> None:
    shard_size = 60_000
    sharded = make_llama_base(tmp_path / "sharded", seed=5, max_shard_size=shard_size)
    single = make_llama_base(tmp_path / "single", seed=5)
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)

    model = _load_base(sharded)
    _assert_weights_match_file(model, sharded)
    assert _file_tensors(sharded).keys() == _file_tensors(single).keys()
    for name, tensor in _file_tensors(single).items():
        assert torch.equal(model.state_dict()[name], tensor), name

    # transformers itself, saving a freshly built model of this config (state-dict order), splits the same.
    # (A model that went through from_pretrained is re-saved in sorted-key order instead.)
    fresh = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sharded))
    fresh.save_pretrained(tmp_path / "resaved", max_shard_size=shard_size)
    resaved = json.loads((tmp_path / "resaved" / "model.safetensors.index.json").read_text())
    assert resaved == index


def test_gpt2_base_loads_with_conv1d_layout(gpt2_base: Path) -> None:
    model = _load_base(gpt2_base)
    assert type(model).__name__ == "GPT2LMHeadModel"
    _assert_weights_match_file(model, gpt2_base)
    assert "lm_head.weight" not in _file_tensors(gpt2_base)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 192)  # Conv1D: [in, out]


ADAPTER_CASES = {
    "plain": {},
    "rslora": {"r": 16, "lora_alpha": 8, "use_rslora": True},
    "patterns": {
        "target_modules": DEFAULT_TARGETS_ALL_LINEAR,
        "rank_pattern": {"q_proj": 4, r"layers\.1\.mlp\.up_proj": 2},
        "alpha_pattern": {"v_proj": 32, "down_proj": 3},
    },
    "patterns-rslora": {
        "use_rslora": True,
        "rank_pattern": {"o_proj": 2},
        "target_modules": ["o_proj", "k_proj"],
    },
    "lora-bias": {"lora_bias": True},
    "dora": {"use_dora": True, "target_modules": ["q_proj", "down_proj"]},
    "modules-to-save": {"modules_to_save": ["lm_head"]},
    "layers": {"layers_to_transform": [1], "target_modules": DEFAULT_TARGETS_ALL_LINEAR},
    "lm-head": {"target_modules": ["q_proj", "lm_head"]},
    "bin": {"weights_format": "bin"},
    "bf16": {"dtype": "bfloat16", "r": 4},
}


def _check_adapter(base: Path, adapter: Path) -> None:
    model = _load_base(base)
    base_logits = _logits(model)
    peft_model = peft.PeftModel.from_pretrained(model, adapter).eval()
    config = json.loads((adapter / "adapter_config.json").read_text())

    # Every tensor in the file was consumed, and nothing PEFT expects is absent.
    loaded = peft.get_peft_model_state_dict(peft_model)
    on_disk = _file_tensors(adapter)
    assert loaded.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), name
        if "lora_" in name:
            assert tensor.abs().sum() > 0, name

    lora_layers = {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    }
    file_modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in on_disk if ".lora_" in k}
    assert lora_layers.keys() == file_modules
    for module, layer in lora_layers.items():
        r, scaling = _expected_rank_and_scaling(config, module)
        assert layer.r["default"] == r, module
        assert layer.scaling["default"] == pytest.approx(scaling), module
    assert not torch.allclose(_logits(peft_model), base_logits, atol=1e-5)


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_peft_loads_llama_adapter(tmp_path: Path, llama_base: Path, case: str) -> None:
    adapter = make_lora_adapter(tmp_path / case, llama_base, seed=11, **ADAPTER_CASES[case])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True
    assert config["target_modules"] == sorted(config["target_modules"])
    peft.LoraConfig.from_pretrained(adapter)  # PEFT accepts every field as written
    _check_adapter(llama_base, adapter)


def test_adapter_layout_details(tmp_path: Path, llama_base: Path) -> None:
    bias = _file_tensors(make_lora_adapter(tmp_path / "bias", llama_base, lora_bias=True))
    assert bias["base_model.model.model.layers.0.self_attn.v_proj.lora_B.bias"].shape == (32,)
    dora = _file_tensors(make_lora_adapter(tmp_path / "dora", llama_base, use_dora=True))
    magnitude = dora["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"]
    assert magnitude.shape == (64,) and magnitude.min() > 0
    saved = _file_tensors(make_lora_adapter(tmp_path / "mts", llama_base, modules_to_save=["lm_head"]))
    assert saved["base_model.model.lm_head.weight"].shape == (256, 64)
    layers = _file_tensors(make_lora_adapter(tmp_path / "layers", llama_base, layers_to_transform=[0]))
    assert all(".layers.0." in k for k in layers)
    assert (
        make_lora_adapter(tmp_path / "bin", llama_base, weights_format="bin") / "adapter_model.bin"
    ).is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_peft_loads_fan_in_fan_out_adapter_on_gpt2(tmp_path: Path, gpt2_base: Path, extra: dict) -> None:
    adapter = make_lora_adapter(tmp_path / "gpt2", gpt2_base, target_modules=["c_attn", "c_fc"], **extra)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    tensors = _file_tensors(adapter)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 64)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 8)
    assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (256, 8)
    _check_adapter(gpt2_base, adapter)


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
@pytest.mark.filterwarnings("ignore:.*tie_word_embeddings=True")
@pytest.mark.filterwarnings("ignore:.*fan_in_fan_out is set to")
def test_tied_head_can_be_targeted_or_saved(tmp_path: Path, gpt2_base: Path, arch: str) -> None:
    """A tied head has no tensor of its own on disk, yet PEFT can wrap it or save a copy of it."""
    base = gpt2_base if arch == "gpt2" else make_llama_base(tmp_path / "base", tie_word_embeddings=True)
    block = "c_proj" if arch == "gpt2" else "q_proj"
    targeted = make_lora_adapter(tmp_path / "targeted", base, target_modules=[block, "lm_head"])
    assert _file_tensors(targeted)["base_model.model.lm_head.lora_B.weight"].shape == (256, 8)
    _check_adapter(base, targeted)
    saved = make_lora_adapter(tmp_path / "saved", base, target_modules=[block], modules_to_save=["lm_head"])
    assert _file_tensors(saved)["base_model.model.lm_head.weight"].shape == (256, 64)
    _check_adapter(base, saved)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = make_llama_base(tmp_path / "a", seed=7)
    b = make_llama_base(tmp_path / "b", seed=7)
    c = make_llama_base(tmp_path / "c", seed=8)
    assert _folder_bytes(a) == _folder_bytes(b)
    assert _folder_bytes(a)["model.safetensors"] != _folder_bytes(c)["model.safetensors"]
    assert load_file(str(a / "model.safetensors")).keys() == load_file(str(c / "model.safetensors")).keys()

    g1, g2 = make_gpt2_base(tmp_path / "g1", seed=2), make_gpt2_base(tmp_path / "g2", seed=2)
    assert _folder_bytes(g1) == _folder_bytes(g2)

    for fmt in ("safetensors", "bin"):
        kwargs = {"weights_format": fmt, "use_dora": True}
        x = make_lora_adapter(tmp_path / f"x-{fmt}", a, seed=1, **kwargs)
        y = make_lora_adapter(tmp_path / f"y-{fmt}", b, seed=1, **kwargs)
        z = make_lora_adapter(tmp_path / f"z-{fmt}", a, seed=2, **kwargs)
        weights = f"adapter_model.{fmt}"
        assert _folder_bytes(x) == _folder_bytes(y)
        assert _folder_bytes(x)[weights] != _folder_bytes(z)[weights]
        assert _folder_bytes(x)["adapter_config.json"] == _folder_bytes(z)["adapter_config.json"]


def test_rewriting_a_folder_leaves_no_stale_layout(tmp_path: Path) -> None:
    make_llama_base(tmp_path / "base", max_shard_size=60_000)
    make_llama_base(tmp_path / "base")
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


def test_bad_requests_fail_loudly(tmp_path: Path, llama_base: Path) -> None:
    with pytest.raises(ValueError, match="target_modules"):
        make_lora_adapter(tmp_path / "none", llama_base, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"DoRA|use_dora"):
        make_lora_adapter(tmp_path / "both", llama_base, use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="embedding"):
        make_lora_adapter(tmp_path / "emb", llama_base, target_modules=["embed_tokens"])
    with pytest.raises(ValueError, match="dtype"):
        make_llama_base(tmp_path / "dt", dtype="float8")
    with pytest.raises(FileNotFoundError):
        make_lora_adapter(tmp_path / "nobase", make_gpt2_base(tmp_path / "g") / "missing")


def test_demo_set(tmp_path: Path) -> None:
    demo = make_demo_set(tmp_path / "demo", seed=0)
    assert (demo["base"] / "model.safetensors").is_file()
    configs = {
        name: json.loads((path / "adapter_config.json").read_text())
        for name, path in demo["adapters"].items()
    }
    assert sorted(c["r"] for c in configs.values()) == [4, 8, 16]
    assert sum(c["use_rslora"] for c in configs.values()) == 1
    assert len({tuple(c["target_modules"]) for c in configs.values()}) == 3
    assert all(c["base_model_name_or_path"] == str(demo["base"].resolve()) for c in configs.values())
    rslora = next(path for name, path in demo["adapters"].items() if configs[name]["use_rslora"])
    _check_adapter(demo["base"], rslora)
