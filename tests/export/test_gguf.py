"""The GGUF exporter: files llama.cpp (and transformers' GGUF loader) read like their own conversions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from adaptr.errors import IncompatibleAdapterError, InvalidInputError  # noqa: E402
from adaptr.interfaces import ExportRequest  # noqa: E402
from adaptr.testing import (  # noqa: E402
    make_gpt2_base,
    make_llama_base,
    make_lora_adapter,
    make_mistral_base,
    make_qwen2_base,
)
from adaptr_formats.hf_model import HFModelReader  # noqa: E402
from adaptr_formats.peft_lora import PeftLoraReader  # noqa: E402
from adaptr_gguf import GgufExporter  # noqa: E402

T = gguf.GGMLQuantizationType
VOCAB = 320
SENTENCE = "Hello world, the quick brown fox jumps over 12345 lazy dogs!"
IDS = torch.tensor([[1, 5, 80, 200, 33, 7, 290, 100, 42, 11, 64, 3]])
# max |logits - reference| / max |reference| seen on the tiny fixtures, with headroom:
# f16 ≈ 5e-4, bf16 ≈ 3.4e-3, q8_0 ≈ 1.2e-2, q4_0 ≈ 0.16; a wrong q/k row order ≈ 0.3.
LOGIT_TOL = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 4e-2, "q4_0": 0.3}
MAKERS = {"llama": make_llama_base, "mistral": make_mistral_base, "qwen2": make_qwen2_base}


def sharpen_attention(folder: Path, factor: float = 5.0) -> Path:
    """Scale q/k so attention is far from uniform: only then does a wrong q/k row order show in the
    logits (at the fixtures' std 0.02 a missing permutation moves them by ~1%, within q8_0's noise)."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = {
        k: v * factor if ("q_proj" in k or "k_proj" in k) else v for k, v in load_file(str(file)).items()
    }
    save_file(state, str(file), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-bases")
    out = {
        name: sharpen_attention(make(root / name, vocab_size=VOCAB, tokenizer=True))
        for name, make in MAKERS.items()
    }
    out["tied"] = make_llama_base(root / "tied", vocab_size=VOCAB, tie_word_embeddings=True, seed=3)
    out["odd"] = make_llama_base(root / "odd", vocab_size=VOCAB, intermediate_size=80, seed=4)
    return out


def export(src: Path, dest: Path, quant: str = "f16", *, name: str = "tiny", **extra) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    manifest = extra.pop("manifest", None) or HFModelReader().read(src)
    request = ExportRequest(
        artifact={"name": name, "ref": f"{name}@1"},
        manifest=manifest,
        source=src,
        dest=dest,
        filename="model.gguf",
        options={"quant": quant},
        **extra,
    )
    assert GgufExporter().export(request) == ["model.gguf"]
    return dest / "model.gguf"


def field(reader, key):
    f = reader.fields[key]
    value = f.contents()
    return value


def source_state(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(src / "model.safetensors"))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute (as transformers' GGUF loader undoes it)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def error_bound(x: np.ndarray, qtype) -> np.ndarray:
    """Per-element worst case of the ggml type, from the block layouts (formats.md §3.3)."""
    if qtype == T.F32:
        return np.zeros_like(x)
    if qtype == T.F16:
        return np.abs(x) * 2.0**-11 + 2.0**-25
    if qtype == T.BF16:
        return np.abs(x) * 2.0**-8 + 1e-38
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    # half a step, plus the f16 rounding of the block scale over the largest code
    step = amax / 127 * (0.5 + 127 * 2.0**-11) if qtype == T.Q8_0 else amax / 8 * (1 + 8 * 2.0**-11)
    return np.broadcast_to(step, blocks.shape).reshape(x.shape) + 1e-12


# --- model files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "quant"),
    [
        ("llama", "f16"),
        ("llama", "bf16"),
        ("llama", "q8_0"),
        ("llama", "q4_0"),
        ("qwen2", "q8_0"),
        ("mistral", "f16"),
    ],
)
def test_tensors_round_trip_within_the_type_bound(bases, tmp_path, family, quant):
    src = bases[family]
    path = export(src, tmp_path, quant)
    reader = gguf.GGUFReader(path)
    config = json.loads((src / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    tmap = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.QWEN2 if family == "qwen2" else gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"]
    )
    state = source_state(src)
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == len(state)
    assert reader.alignment == 32
    for t in reader.tensors:
        assert t.data_offset % reader.alignment == 0, t.name
    for hf_name, tensor in state.items():
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        t = by_name[gname]
        assert [int(n) for n in t.shape] == list(reversed(tensor.shape)), gname  # ggml ne order
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tensor.shape)
        if family != "qwen2" and "q_proj" in hf_name:
            values = unpermute(values, n_head)
        elif family != "qwen2" and "k_proj" in hf_name:
            values = unpermute(values, n_kv)
        x = tensor.float().numpy()
        if tensor.dim() == 1:
            assert t.tensor_type == T.F32, gname
        else:
            expected = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[quant]
            if quant == "q4_0" and gname == "output.weight":
                expected = T.Q8_0  # llama-quantize's head rule (Q6_K, which gguf cannot write)
            assert t.tensor_type == expected, gname
        assert np.all(np.abs(values - x) <= error_bound(x, t.tensor_type)), gname


def test_q_and_k_are_permuted_for_llama_but_not_qwen2(bases, tmp_path):
    for family, permuted in (("llama", True), ("qwen2", False)):
        path = export(bases[family], tmp_path / family, "f16")
        t = {t.name: t for t in gguf.GGUFReader(path).tensors}["blk.0.attn_q.weight"]
        src = source_state(bases[family])["model.layers.0.self_attn.q_proj.weight"].numpy()
        raw = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
        same = np.allclose(raw, src, rtol=1e-3, atol=1e-6)
        assert same is not permuted, family


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_metadata_has_what_llama_cpp_requires(bases, tmp_path, family):
    src = bases[family]
    config = json.loads((src / "config.json").read_text())
    reader = gguf.GGUFReader(export(src, tmp_path, "q8_0", name="tiny-model"))
    arch = field(reader, "general.architecture")
    assert arch == {"llama": "llama", "qwen2": "qwen2"}[family]
    K = gguf.Keys
    assert field(reader, K.General.TYPE) == "model"
    assert field(reader, K.General.NAME) == "tiny-model"
    assert field(reader, K.General.FILE_TYPE) == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field(reader, K.General.QUANTIZATION_VERSION) == gguf.GGML_QUANT_VERSION
    expect = {
        K.LLM.CONTEXT_LENGTH: config["max_position_embeddings"],
        K.LLM.EMBEDDING_LENGTH: config["hidden_size"],
        K.LLM.BLOCK_COUNT: config["num_hidden_layers"],
        K.LLM.FEED_FORWARD_LENGTH: config["intermediate_size"],
        K.Attention.HEAD_COUNT: config["num_attention_heads"],
        K.Attention.HEAD_COUNT_KV: config["num_key_value_heads"],
    }
    for key, value in expect.items():
        assert field(reader, key.format(arch=arch)) == value, key
    rms = field(reader, K.Attention.LAYERNORM_RMS_EPS.format(arch=arch))
    assert rms == pytest.approx(config["rms_norm_eps"])
    theta = field(reader, K.Rope.FREQ_BASE.format(arch=arch))
    assert theta == pytest.approx(config["rope_parameters"]["rope_theta"])
    if family == "llama":  # LlamaModel adds these; Qwen2Model does not
        assert field(reader, K.LLM.VOCAB_SIZE.format(arch=arch)) == VOCAB
        assert field(reader, K.Rope.DIMENSION_COUNT.format(arch=arch)) == config["head_dim"]
        assert field(reader, K.Attention.KEY_LENGTH.format(arch=arch)) == config["head_dim"]

    tk = K.Tokenizer
    assert field(reader, tk.MODEL) == "gpt2"
    assert field(reader, tk.PRE) == {"llama": "llama-bpe", "qwen2": "qwen2"}[family]
    tokens = field(reader, tk.LIST)
    assert len(tokens) == VOCAB and tokens[1] == "<|begin_of_text|>"
    types = field(reader, tk.TOKEN_TYPE)
    assert types[1] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    merges = field(reader, tk.MERGES)
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    assert field(reader, tk.BOS_ID) == 1 and field(reader, tk.EOS_ID) == 2 and field(reader, tk.PAD_ID) == 0
    assert field(reader, tk.ADD_BOS) is (family == "llama")
    assert "{% for message in messages %}" in field(reader, tk.CHAT_TEMPLATE)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize(
    ("family", "quant"),
    [
        ("llama", "f16"),
        ("llama", "q8_0"),
        ("qwen2", "f16"),
        ("qwen2", "q8_0"),
        ("mistral", "q8_0"),
        ("llama", "q4_0"),
    ],
)
def test_transformers_loads_the_file_with_matching_logits(bases, tmp_path, family, quant):
    from transformers import AutoModelForCausalLM

    src = bases[family]
    export(src, tmp_path, quant)
    ref = _logits(AutoModelForCausalLM.from_pretrained(src).eval())
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval())
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < LOGIT_TOL[quant], rel


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_wrong_q_k_row_order_would_show_in_the_logits(bases, tmp_path, monkeypatch, family):
    """The logits check is what guards the permutation: Llama without it, or Qwen2 with it, is far off."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    import adaptr_gguf.model as model_mod

    real = model_mod.family_of
    monkeypatch.setattr(
        model_mod, "family_of", lambda *a: dataclasses.replace(real(*a), permute_qk=family == "qwen2")
    )
    export(bases[family], tmp_path, "f16")
    ref = _logits(AutoModelForCausalLM.from_pretrained(bases[family]).eval())
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf").eval())
    assert ((got - ref).abs().max() / ref.abs().max()).item() > 3 * LOGIT_TOL["q8_0"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tokenizer_loads_from_the_file_and_encodes_alike(bases, tmp_path, family):
    from transformers import AutoTokenizer

    export(bases[family], tmp_path, "q8_0")
    want = AutoTokenizer.from_pretrained(bases[family])
    got = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert got(SENTENCE).input_ids == want(SENTENCE).input_ids
    assert got.decode(got(SENTENCE, add_special_tokens=False).input_ids) == SENTENCE


def test_tied_embeddings_write_no_output_tensor(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(export(bases["tied"], tmp_path / "q4", "q4_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types
    assert types["token_embd.weight"] == T.Q8_0  # the tied head keeps llama-quantize's output rule
    assert types["blk.0.attn_q.weight"] == T.Q4_0
    export(bases["tied"], tmp_path / "f16", "f16")
    ref = _logits(AutoModelForCausalLM.from_pretrained(bases["tied"]).eval())
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "f16", gguf_file="model.gguf").eval())
    assert ((got - ref).abs().max() / ref.abs().max()).item() < LOGIT_TOL["f16"]


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(bases, tmp_path):
    reader = gguf.GGUFReader(export(bases["odd"], tmp_path, "q8_0"))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == T.F16  # 80 columns: not a multiple of 32
    assert types["blk.0.ffn_up.weight"] == T.Q8_0
    assert "tokenizer.ggml.model" not in reader.fields  # no tokenizer.json, no tokenizer keys


def test_progress_reports_every_tensor(bases, tmp_path):
    calls = []
    manifest = HFModelReader().read(bases["qwen2"])
    export(
        bases["qwen2"], tmp_path, "q8_0", manifest=manifest, progress=lambda n, d=None: calls.append((n, d))
    )
    assert len(calls) == len(manifest.tensors)
    assert sum(n for n, _ in calls) == sum(
        math.prod(t.shape) * 4 for t in manifest.tensors.values()
    )  # float32 fixture: source bytes
    assert calls[-1][1] == f"{len(calls)}/{len(calls)} tensors"


def test_unsupported_architecture_is_refused_before_writing(tmp_path):
    src = make_gpt2_base(tmp_path / "gpt2")
    dest = tmp_path / "out"
    with pytest.raises(
        InvalidInputError, match="architecture GPT2LMHeadModel cannot be exported to GGUF; supported"
    ):
        export(src, dest)
    assert list(dest.iterdir()) == []


def test_unknown_quant_is_refused(bases, tmp_path):
    with pytest.raises(InvalidInputError, match="f16, bf16, q8_0, q4_0"):
        export(bases["llama"], tmp_path, "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_exporter_is_registered():
    from adaptr.plugins import get_registry

    exporter = get_registry("exporter").get("gguf")
    assert exporter.kinds == ("base", "merged", "adapter") and exporter.single_file
    assert [(p.name, p.default) for p in exporter.params] == [("quant", "f16")]


# --- LoRA adapters -------------------------------------------------------------------------


def export_adapter(adapter: Path, base: Path, dest: Path, quant: str = "f16") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    request = ExportRequest(
        artifact={"name": "tiny-lora", "ref": "tiny-lora@1"},
        manifest=PeftLoraReader().read(adapter),
        source=adapter,
        dest=dest,
        filename="adapter.gguf",
        options={"quant": quant},
        base_source=base,
        base_manifest=HFModelReader().read(base),
    )
    GgufExporter().export(request)
    return dest / "adapter.gguf"


def gguf_delta(reader, name: str, alpha: float) -> np.ndarray:
    """ΔW as llama.cpp applies it: (alpha / rank) · B A, rank = b.ne[0]."""
    t = {t.name: t for t in reader.tensors}
    a, b = t[name + ".lora_a"], t[name + ".lora_b"]
    a_np = gguf.quants.dequantize(a.data, a.tensor_type).reshape([int(n) for n in reversed(a.shape)])
    b_np = gguf.quants.dequantize(b.data, b.tensor_type).reshape([int(n) for n in reversed(b.shape)])
    rank = int(b.shape[0])
    return (alpha / rank) * (b_np.astype(np.float64) @ a_np.astype(np.float64))


ADAPTERS = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ("q_proj", "k_proj", "v_proj", "down_proj")},
    "rslora": {
        "r": 16,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ("q_proj", "k_proj", "o_proj"),
    },
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ("q_proj", "v_proj", "gate_proj"),
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {"gate_proj": 3},
    },
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapter_delta_is_exact_after_folding_the_scale(bases, tmp_path, family, kind):
    base = bases[family]
    adapter = make_lora_adapter(tmp_path / "lora", base, seed=5, **ADAPTERS[kind])
    manifest = PeftLoraReader().read(adapter)
    reader = gguf.GGUFReader(export_adapter(adapter, base, tmp_path / "out", "f16"))
    config = json.loads((base / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    alpha = field(reader, gguf.Keys.Adapter.LORA_ALPHA)
    assert alpha == manifest.lora_alpha
    tmap = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.QWEN2 if family == "qwen2" else gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"]
    )
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(reader.tensors) == 2 * len(manifest.modules)
    for module in manifest.modules.values():
        true = module.scaling * (state[module.b_key].double() @ state[module.a_key].double()).numpy()
        got = gguf_delta(reader, tmap.get_name(module.target, try_suffixes=(".weight",)), alpha)
        if family == "llama" and module.module.endswith("q_proj"):
            got = unpermute(got, n_head)
        elif family == "llama" and module.module.endswith("k_proj"):
            got = unpermute(got, n_kv)
        # only f16 storage rounding of A and the folded B remains
        assert np.abs(got - true).max() <= 4e-3 * np.abs(true).max(), module.module


def test_adapter_metadata_and_shapes_pass_llama_cpp_loader_checks(bases, tmp_path):
    base = bases["llama"]
    adapter = make_lora_adapter(tmp_path / "lora", base, **ADAPTERS["plain"])
    reader = gguf.GGUFReader(export_adapter(adapter, base, tmp_path / "out", "q8_0"))
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    model = {t.name: t for t in gguf.GGUFReader(export(base, tmp_path / "base", "f16")).tensors}
    lora = {t.name: t for t in reader.tensors}
    targets = {n.rsplit(".", 1)[0] for n in lora}
    assert "blk.0.attn_q.weight" in targets and "blk.1.ffn_down.weight" in targets
    for target in targets:
        m, a, b = model[target].shape, lora[target + ".lora_a"].shape, lora[target + ".lora_b"].shape
        # src/llama-adapter.cpp: model.ne[0] == a.ne[0], model.ne[1] == b.ne[1], a.ne[1] == b.ne[0]
        assert m[0] == a[0] and m[1] == b[1] and a[1] == b[0], target
    assert lora["blk.0.attn_q.weight.lora_a"].tensor_type == T.Q8_0  # 64 columns
    assert lora["blk.0.attn_q.weight.lora_b"].tensor_type == T.F16  # rank 8: F16 fallback


def test_embedding_lora_is_written_transposed_like_the_converter(bases, tmp_path):
    from safetensors.torch import save_file

    base = bases["llama"]
    adapter = make_lora_adapter(tmp_path / "lora", base, r=4, lora_alpha=8, target_modules=("q_proj",))
    gen = torch.Generator().manual_seed(9)
    state = {
        "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, VOCAB, generator=gen),
        "base_model.model.model.embed_tokens.lora_embedding_B": torch.randn(64, 4, generator=gen),
    }
    from safetensors.torch import load_file

    save_file(
        {**load_file(str(adapter / "adapter_model.safetensors")), **state},
        str(adapter / "adapter_model.safetensors"),
    )
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["embed_tokens", "q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    reader = gguf.GGUFReader(export_adapter(adapter, base, tmp_path / "out", "f16"))
    lora = {t.name: t for t in reader.tensors}
    a, b = lora["token_embd.weight.lora_a"].shape, lora["token_embd.weight.lora_b"].shape
    # token_embd ne = [64, VOCAB]; llama.cpp checks model.ne[0] == b.ne[1] and model.ne[1] == a.ne[1]
    assert (int(b[1]), int(a[1]), int(a[0]), int(b[0])) == (64, VOCAB, 4, 4)
    ta, tb = lora["token_embd.weight.lora_a"], lora["token_embd.weight.lora_b"]
    a_np = gguf.quants.dequantize(ta.data, ta.tensor_type).reshape(VOCAB, 4).astype(np.float64)
    b_np = gguf.quants.dequantize(tb.data, tb.tensor_type).reshape(64, 4).astype(np.float64)
    got = (8 / 4) * a_np @ b_np.T  # get_rows(a) then mul_mat(b): one row per token
    A, B = (
        state["base_model.model.model.embed_tokens.lora_embedding_A"],
        state["base_model.model.model.embed_tokens.lora_embedding_B"],
    )
    true = 2.0 * (A.double().T @ B.double().T).numpy()  # PEFT: embedding(x, A.T) @ B.T · scaling
    assert np.abs(got - true).max() <= 2e-3 * np.abs(true).max()


def test_adapter_features_llama_cpp_cannot_apply_are_refused(bases, tmp_path):
    base = bases["llama"]
    dora = make_lora_adapter(tmp_path / "dora", base, use_dora=True)
    with pytest.raises(InvalidInputError, match="DoRA"):
        export_adapter(dora, base, tmp_path / "out1")
    biased = make_lora_adapter(tmp_path / "bias", base, lora_bias=True)
    with pytest.raises(InvalidInputError, match="lora_bias"):
        export_adapter(biased, base, tmp_path / "out2")
    tied = bases["tied"]
    head = make_lora_adapter(tmp_path / "head", tied, target_modules=("q_proj", "lm_head"))
    with pytest.raises(IncompatibleAdapterError, match="lm_head"):
        export_adapter(head, tied, tmp_path / "out3")
    for out in ("out1", "out2", "out3"):
        assert list((tmp_path / out).iterdir()) == []


def test_adapter_without_a_base_is_refused(bases, tmp_path):
    adapter = make_lora_adapter(tmp_path / "lora", bases["llama"])
    request = ExportRequest(
        artifact={"name": "x", "ref": "x@1"},
        manifest=PeftLoraReader().read(adapter),
        source=adapter,
        dest=tmp_path,
        filename="a.gguf",
        options={"quant": "f16"},
    )
    with pytest.raises(InvalidInputError, match="no base model"):
        GgufExporter().export(request)


# --- encoding ------------------------------------------------------------------------------


def test_row_index_is_llama_cpps_permute():
    from adaptr_gguf.tensors import qk_permutation

    w = torch.randn(48, 8)
    n_head = 6  # LlamaModel.permute, as in convert_hf_to_gguf.py
    permuted = w.reshape(n_head, 2, 48 // n_head // 2, 8).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(w[qk_permutation(48, n_head)], permuted)
    with pytest.raises(InvalidInputError, match="rotary heads"):
        qk_permutation(50, 4)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0])
def test_chunked_encoding_is_bit_exact_with_gguf_quants(monkeypatch, qtype):
    """Row chunks (with the permutation and a folded scale) give the reference's bytes exactly."""
    import adaptr_gguf.tensors as tensors

    monkeypatch.setattr(tensors, "_CHUNK_ELEMENTS", 3 * 64)  # 3 rows per chunk: 40 rows end mid-chunk
    x = (torch.randn(40, 64, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    x[3, :32] = 0  # an all-zero block (scale 0)
    rows = tensors.qk_permutation(40, 4)
    planned = tensors.Planned("blk.0.attn_q.weight", (40, 64), qtype, lambda: x, rows=rows, scale=0.75)
    got = planned.encode()
    want = gguf.quants.quantize(x.float()[rows].numpy() * np.float32(0.75), qtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    assert got.nbytes == planned.nbytes


def test_export_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """numpy's working set (output buffers, quantizer temporaries) stays near one tensor, not the model."""
    import tracemalloc

    import adaptr_gguf.tensors as tensors

    monkeypatch.setattr(tensors, "_CHUNK_ELEMENTS", 1 << 16)
    src = make_llama_base(
        tmp_path / "m", hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=4096, seed=2
    )
    largest = 4096 * 256 * 2  # the f16 embedding / head
    total = sum(math.prod(t.shape) * 2 for t in HFModelReader().read(src).tensors.values())
    assert total > 6 * largest
    tracemalloc.start()
    try:
        export(src, tmp_path / "out", "f16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * largest, (peak, largest, total)


def test_a_bias_is_permuted_element_wise():
    """Llama checkpoints with attention_bias permute q/k biases like the weights' rows."""
    import adaptr_gguf.tensors as tensors

    b = torch.randn(32)
    rows = tensors.qk_permutation(32, 4)
    got = tensors.Planned("blk.0.attn_q.bias", (32,), T.F32, lambda: b, rows=rows).encode()
    assert np.array_equal(got, b[rows].numpy())
    assert np.array_equal(got, b.reshape(4, 2, 4).swapaxes(1, 2).reshape(32).numpy())


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # short, so the tiny model's frequencies straddle both bands
}


def with_rope(folder: Path, rope: dict) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path):
    """llama.cpp divides each rotary frequency by ``rope_freqs``; that must give transformers' llama3 frequencies."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    src = with_rope(make_llama_base(tmp_path / "m", vocab_size=VOCAB, tokenizer=True), LLAMA3_ROPE)
    reader = gguf.GGUFReader(export(src, tmp_path / "out", "f16"))
    t = {t.name: t for t in reader.tensors}["rope_freqs.weight"]
    assert t.tensor_type == T.F32
    config = AutoConfig.from_pretrained(src)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.head_dim
    plain = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    np.testing.assert_allclose(np.asarray(t.data), (plain / scaled).numpy(), rtol=1e-5)
    assert len(set(np.asarray(t.data).round(4).tolist())) > 2  # both bands and the smooth middle


def test_unknown_rope_scaling_is_refused(tmp_path):
    src = with_rope(
        make_llama_base(tmp_path / "m"), {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    )
    with pytest.raises(InvalidInputError, match="rope scaling 'longrope' cannot be exported to GGUF"):
        export(src, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_linear_rope_scaling_keys(tmp_path):
    src = with_rope(
        make_llama_base(tmp_path / "m"), {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}
    )
    reader = gguf.GGUFReader(export(src, tmp_path / "out"))
    assert field(reader, gguf.Keys.Rope.SCALING_TYPE.format(arch="llama")) == "linear"
    assert field(reader, gguf.Keys.Rope.SCALING_FACTOR.format(arch="llama")) == 2.0


# --- tokenizer edge cases ------------------------------------------------------------------


def _copy_model(bases, tmp_path: Path, **config_changes) -> Path:
    import shutil

    src = tmp_path / "copy"
    shutil.copytree(bases["llama"], src)
    if config_changes:
        config = json.loads((src / "config.json").read_text())
        config.update(config_changes)
        (src / "config.json").write_text(json.dumps(config))
    return src


def test_plain_byte_level_pre_tokenizer_is_gpt2(bases, tmp_path):
    from transformers import AutoTokenizer

    src = _copy_model(bases, tmp_path)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    (src / "tokenizer.json").write_text(json.dumps(tok))
    reader = gguf.GGUFReader(export(src, tmp_path / "out"))
    assert field(reader, gguf.Keys.Tokenizer.PRE) == "gpt-2"
    want = AutoTokenizer.from_pretrained(src)(SENTENCE, add_special_tokens=False).input_ids
    got = AutoTokenizer.from_pretrained(tmp_path / "out", gguf_file="model.gguf")
    assert got(SENTENCE, add_special_tokens=False).input_ids == want


def test_ids_the_tokenizer_lacks_are_padded_as_unused(bases, tmp_path):
    """A model whose embedding has more rows than the tokenizer has tokens (as Qwen2's does)."""
    from safetensors.torch import load_file, save_file

    src = _copy_model(bases, tmp_path, vocab_size=VOCAB + 32)
    state = load_file(str(src / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.zeros(32, state[name].shape[1])])
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    reader = gguf.GGUFReader(export(src, tmp_path / "out"))
    tokens, types = field(reader, gguf.Keys.Tokenizer.LIST), field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert len(tokens) == VOCAB + 32 and tokens[VOCAB] == f"[PAD{VOCAB}]"
    assert types[VOCAB] == gguf.TokenType.UNUSED


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pre_tokenizer": {"type": "Whitespace"}}, "pre-tokenizer"),
        ({"model": {"type": "WordPiece", "vocab": {}}}, "byte-level BPE"),
        ({"added_tokens": [{"id": VOCAB + 5, "content": "<|x|>", "special": True}]}, "does not fit"),
    ],
)
def test_tokenizers_llama_cpp_could_not_run_are_refused(bases, tmp_path, change, message):
    src = _copy_model(bases, tmp_path)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok.update(change)
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidInputError, match=message):
        export(src, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_fixture_tokenizers_are_deterministic_and_sized_to_the_model(tmp_path, family):
    from transformers import AutoTokenizer

    a = MAKERS[family](tmp_path / "a", vocab_size=VOCAB, tokenizer=True, seed=1)
    b = MAKERS[family](tmp_path / "b", vocab_size=VOCAB, tokenizer=True, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(a)
    assert len(tok) == VOCAB and tok.bos_token_id == 1 and tok.eos_token_id == 2
    with pytest.raises(ValueError, match="vocab_size >= 288"):
        MAKERS[family](tmp_path / "c", tokenizer=True)  # the default 256 leaves no room for merges
