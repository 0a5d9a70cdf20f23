"""Seeded, download-free model and adapter fixtures in the real on-disk layouts.

Tests and third-party plugin authors need Hugging Face base models and PEFT LoRA
adapters that the real libraries load without complaint, but CI has no network
and no model hub. Everything here is written from a seeded ``torch.Generator``
in the exact file layout transformers 5 and PEFT 0.21 produce, so the same seed
gives byte-identical files. JSON is written by hand and safetensors headers are
parsed by hand: importing this module never imports torch, transformers or peft
(torch is imported lazily, only when tensors are drawn).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TARGETS_ALL_LINEAR",
    "make_demo_set",
    "make_gpt2_base",
    "make_llama_base",
    "make_lora_adapter",
    "make_mistral_base",
    "make_qwen2_base",
]

DEFAULT_TARGETS_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_DTYPES = ("float32", "float16", "bfloat16")
# Leaf names of nn.Embedding modules: PEFT gives those a different LoRA layout (lora_embedding_A/B).
_EMBEDDING_LEAVES = ("embed_tokens", "wte", "wpe")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_STD = 0.02


def _version(dist: str, fallback: str) -> str:
    """Stamp files with the installed library version, as the libraries themselves do."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return fallback


def _torch_dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Same formatting as transformers/PEFT so byte comparisons against them stay meaningful."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _prepare_dir(path: str | Path, stale: Sequence[str]) -> Path:
    """Drop weight files from an earlier call so a folder never holds two conflicting layouts."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (out / name).unlink(missing_ok=True)
    for shard in out.glob("model-*-of-*.safetensors"):
        shard.unlink()
    return out


def _draw(gen: Any, name: str, shape: Sequence[int], dtype: Any, std: float = _STD) -> Any:
    """Norm/LayerNorm weights sit near one (as trained ones do); everything else near zero, never zero."""
    import torch

    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std
    if len(shape) == 1 and name.endswith(".weight"):
        noise = noise + 1.0
    return noise.to(dtype)


def _random_state(shapes: Sequence[tuple[str, tuple[int, ...]]], seed: int, dtype: str) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch_dtype = _torch_dtype(dtype)
    return {name: _draw(gen, name, shape, torch_dtype) for name, shape in shapes}


def _save_safetensors(tensors: Mapping[str, Any], file: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def _split_shards(tensors: Mapping[str, Any], max_shard_size: int) -> list[dict[str, Any]]:
    """Greedy split in state-dict order, quirks included, like huggingface_hub's splitter."""
    shards: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    current_size = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size > max_shard_size:  # an oversized tensor gets a shard of its own, ahead of the open one
            shards.append({name: tensor})
            continue
        if current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = {}, 0
        current[name] = tensor
        current_size += size
    if current:
        shards.append(current)
    return shards


def _write_model_weights(out: Path, tensors: dict[str, Any], max_shard_size: int | None) -> None:
    if max_shard_size is not None and max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, got {max_shard_size}")
    shards = _split_shards(tensors, max_shard_size) if max_shard_size else [tensors]
    if len(shards) == 1:
        _save_safetensors(tensors, out / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_safetensors(shard, out / file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in tensors.values()),
            "total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(out / "model.safetensors.index.json", index)


def _write_generation_config(out: Path, bos: int, eos: int) -> None:
    _write_json(
        out / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "output_attentions": False,
            "output_hidden_states": False,
            "transformers_version": _version("transformers", "5.0.0"),
            "use_cache": True,
        },
    )


def _decoder_shapes(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    qkv_bias: bool,
) -> list[tuple[str, tuple[int, ...]]]:
    """State-dict order of a Llama-style decoder (Llama, Mistral, Qwen2 share the layout)."""
    head_dim = hidden_size // num_attention_heads
    kv_size = num_key_value_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        attn = [
            (p + "self_attn.q_proj.weight", (num_attention_heads * head_dim, hidden_size)),
            (p + "self_attn.k_proj.weight", (kv_size, hidden_size)),
            (p + "self_attn.v_proj.weight", (kv_size, hidden_size)),
        ]
        if qkv_bias:
            attn = [
                attn[0],
                (p + "self_attn.q_proj.bias", (num_attention_heads * head_dim,)),
                attn[1],
                (p + "self_attn.k_proj.bias", (kv_size,)),
                attn[2],
                (p + "self_attn.v_proj.bias", (kv_size,)),
            ]
        shapes += attn + [
            (p + "self_attn.o_proj.weight", (hidden_size, num_attention_heads * head_dim)),
            (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)),
            (p + "mlp.up_proj.weight", (intermediate_size, hidden_size)),
            (p + "mlp.down_proj.weight", (hidden_size, intermediate_size)),
            (p + "input_layernorm.weight", (hidden_size,)),
            (p + "post_attention_layernorm.weight", (hidden_size,)),
        ]
    shapes.append(("model.norm.weight", (hidden_size,)))
    if not tie_word_embeddings:
        shapes.append(("lm_head.weight", (vocab_size, hidden_size)))
    return shapes


def _check_decoder_args(
    hidden_size: int, num_attention_heads: int, num_key_value_heads: int, vocab_size: int
):
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError("hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")
    if vocab_size < 3:
        raise ValueError("vocab_size must leave room for the bos (1) and eos (2) token ids")


def make_llama_base(
    path: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 256,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_shard_size: int | None = None,
    tokenizer: bool = False,
) -> Path:
    """Write a tiny random LlamaForCausalLM folder (GQA by default, optionally sharded).

    ``tokenizer=True`` adds a byte-level BPE tokenizer (Llama-3 style, adds bos) of exactly
    ``vocab_size`` tokens, which then must be at least ``MIN_TOKENIZER_VOCAB``.
    """
    _check_decoder_args(hidden_size, num_attention_heads, num_key_value_heads, vocab_size)
    _torch_dtype(dtype)
    if tokenizer:
        _check_tokenizer_vocab(vocab_size)
    out = _prepare_dir(path, _WEIGHT_FILES)
    head_dim = hidden_size // num_attention_heads
    shapes = _decoder_shapes(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        qkv_bias=False,
    )

    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": dtype,
        "eos_token_id": 2,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": _STD,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 128,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": _version("transformers", "5.0.0"),
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_generation_config(out, 1, 2)
    _write_model_weights(out, _random_state(shapes, seed, dtype), max_shard_size)
    if tokenizer:
        _write_tokenizer(out, vocab_size=vocab_size, style="llama3", max_length=128)
    return out


def make_mistral_base(
    path: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 256,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    tokenizer: bool = False,
    sliding_window: int | None = None,
) -> Path:
    """Write a tiny random MistralForCausalLM folder: Llama's layout under Mistral's config."""
    _check_decoder_args(hidden_size, num_attention_heads, num_key_value_heads, vocab_size)
    _torch_dtype(dtype)
    if tokenizer:
        _check_tokenizer_vocab(vocab_size)
    out = _prepare_dir(path, _WEIGHT_FILES)
    shapes = _decoder_shapes(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        qkv_bias=False,
    )
    config = {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": dtype,
        "eos_token_id": 2,
        "head_dim": hidden_size // num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": _STD,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 128,
        "model_type": "mistral",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": sliding_window,
        "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": _version("transformers", "5.0.0"),
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_generation_config(out, 1, 2)
    _write_model_weights(out, _random_state(shapes, seed, dtype), None)
    if tokenizer:
        _write_tokenizer(out, vocab_size=vocab_size, style="llama3", max_length=128)
    return out


def make_qwen2_base(
    path: str | Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 256,
    dtype: str = "float32",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    tokenizer: bool = False,
) -> Path:
    """Write a tiny random Qwen2ForCausalLM folder: Llama's layout plus q/k/v biases.

    ``tokenizer=True`` adds a Qwen2-style byte-level BPE tokenizer (single-digit split, no bos
    added) of exactly ``vocab_size`` tokens.
    """
    _check_decoder_args(hidden_size, num_attention_heads, num_key_value_heads, vocab_size)
    _torch_dtype(dtype)
    if tokenizer:
        _check_tokenizer_vocab(vocab_size)
    out = _prepare_dir(path, _WEIGHT_FILES)
    shapes = _decoder_shapes(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        qkv_bias=True,
    )
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": dtype,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": _STD,
        "intermediate_size": intermediate_size,
        "layer_types": ["full_attention"] * num_hidden_layers,
        "max_position_embeddings": 128,
        "max_window_layers": num_hidden_layers,
        "model_type": "qwen2",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "pad_token_id": None,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": _version("transformers", "5.0.0"),
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_generation_config(out, 1, 2)
    _write_model_weights(out, _random_state(shapes, seed, dtype), None)
    if tokenizer:
        _write_tokenizer(out, vocab_size=vocab_size, style="qwen2", max_length=128)
    return out


# --- Tokenizer ------------------------------------------------------------------------------

# Byte-level BPE needs all 256 byte symbols plus the three special tokens, and some merges.
MIN_TOKENIZER_VOCAB = 288
_SPECIAL_TOKENS = ("<|pad|>", "<|begin_of_text|>", "<|end_of_text|>")  # ids 0, 1 (bos), 2 (eos)
# The split regexes of Llama 3 and Qwen2 tokenizer.json files; llama.cpp knows both by name.
_SPLIT_REGEX = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
_TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters change a model a little; merging them changes it more.",
    "A catalog remembers every base model, adapter and merge it has seen.",
    "Quantization trades a little accuracy for a lot less memory.",
    "llama.cpp runs GGUF files on laptops, phones and servers alike.",
    "Numbers like 3, 42, 1234 and 3.14159 are split into digits.",
    "Hello, world! How are you today? I'm fine, thanks; and you're?",
    "Tokenizers turn text into ids, and ids back into text.",
    "   Leading spaces, tabs\tand\nnew lines matter too.",
    "Ünïcödé, naïve café, 東京, and emoji 🙂 are bytes as well.",
)


def _check_tokenizer_vocab(vocab_size: int) -> None:
    if vocab_size < MIN_TOKENIZER_VOCAB:
        raise ValueError(
            f"a byte-level BPE tokenizer needs vocab_size >= {MIN_TOKENIZER_VOCAB} "
            f"(256 bytes, 3 special tokens, merges), got {vocab_size}"
        )


def _write_tokenizer(out: Path, *, vocab_size: int, style: str, max_length: int) -> None:
    """Train a byte-level BPE on the embedded corpus (deterministic) and pad it to ``vocab_size``
    with reserved special tokens, as Llama 3 does, so ids and the embedding rows line up."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX[style]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TOKENIZER_CORPUS) * 4, trainer)
    reserved = vocab_size - tok.get_vocab_size()
    if reserved:
        from tokenizers import AddedToken

        tok.add_special_tokens(
            [AddedToken(f"<|reserved_special_token_{i}|>", special=True) for i in range(reserved)]
        )
    add_bos = style == "llama3"
    bos, eos, pad = _SPECIAL_TOKENS[1], _SPECIAL_TOKENS[2], _SPECIAL_TOKENS[0]
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, 1)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    data = json.loads(tok.to_str())
    (out / "tokenizer.json").write_text(
        json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "add_bos_token": add_bos,
            "add_eos_token": False,
            "bos_token": bos,
            "chat_template": _CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": eos,
            "model_max_length": max_length,
            "pad_token": pad,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    _write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos, "pad_token": pad})


def make_gpt2_base(
    path: str | Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    vocab_size: int = 256,
    dtype: str = "float32",
    seed: int = 0,
    n_positions: int = 128,
) -> Path:
    """Write a tiny random GPT2LMHeadModel folder: the Conv1D ([in, out]) case for fan_in_fan_out.

    bos/eos are ``vocab_size - 1`` rather than GPT-2's 50256 so they stay inside the tiny vocabulary.
    """
    if n_embd % n_head:
        raise ValueError("n_embd must divide by n_head")
    _torch_dtype(dtype)
    out = _prepare_dir(path, _WEIGHT_FILES)
    e = n_embd
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.wte.weight", (vocab_size, e)),
        ("transformer.wpe.weight", (n_positions, e)),
    ]
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        shapes += [
            (p + "ln_1.weight", (e,)),
            (p + "ln_1.bias", (e,)),
            (p + "attn.c_attn.weight", (e, 3 * e)),
            (p + "attn.c_attn.bias", (3 * e,)),
            (p + "attn.c_proj.weight", (e, e)),
            (p + "attn.c_proj.bias", (e,)),
            (p + "ln_2.weight", (e,)),
            (p + "ln_2.bias", (e,)),
            (p + "mlp.c_fc.weight", (e, 4 * e)),
            (p + "mlp.c_fc.bias", (4 * e,)),
            (p + "mlp.c_proj.weight", (4 * e, e)),
            (p + "mlp.c_proj.bias", (e,)),
        ]
    shapes += [("transformer.ln_f.weight", (e,)), ("transformer.ln_f.bias", (e,))]

    config = {
        "activation_function": "gelu_new",
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": vocab_size - 1,
        "dtype": dtype,
        "embd_pdrop": 0.1,
        "eos_token_id": vocab_size - 1,
        "initializer_range": _STD,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_embd": n_embd,
        "n_head": n_head,
        "n_inner": None,
        "n_layer": n_layer,
        "n_positions": n_positions,
        "pad_token_id": None,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "transformers_version": _version("transformers", "5.0.0"),
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(out / "config.json", config)
    _write_generation_config(out, vocab_size - 1, vocab_size - 1)
    _write_model_weights(out, _random_state(shapes, seed, dtype), None)
    return out


def _safetensors_header(file: Path) -> dict[str, Any]:
    """Shapes come from the header alone, so big (sharded) bases are never loaded just to size an adapter."""
    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


def _base_tensors(base: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Map every base tensor name to (file holding it, shape), single-file or sharded."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    elif (base / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{base} holds no model.safetensors or model.safetensors.index.json")
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for name in files:
        for key, info in _safetensors_header(base / name).items():
            found[key] = (base / name, tuple(info["shape"]))
    return found


def _pattern_key(pattern_keys: Sequence[str], module: str) -> str:
    """PEFT's get_pattern_key: the first pattern (dict order) matching the module name's tail."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _layer_index(module: str) -> int | None:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    return int(match.group("idx")) if match else None


def _is_target(
    module: str,
    target_modules: str | Sequence[str],
    layers_to_transform: int | Sequence[int] | None,
    modules_to_save: Sequence[str] | None,
) -> bool:
    """PEFT's check_target_module_exists, minus the options this factory does not write."""
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in modules_to_save):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    if module in target_modules:
        return True
    if not any(module.endswith(f".{t}") for t in target_modules):
        return False
    if layers_to_transform is None or (not isinstance(layers_to_transform, int) and not layers_to_transform):
        return True
    index = _layer_index(module)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def _load_tensor(file: Path, name: str) -> Any:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as fh:
        return fh.get_tensor(name)


def make_lora_adapter(
    path: str | Path,
    base_path: str | Path,
    *,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    lora_bias: bool = False,
    use_dora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    fan_in_fan_out: bool | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    dtype: str = "float32",
    seed: int = 0,
    init_scale: float = 0.02,
    weights_format: str = "safetensors",
    base_model_name_or_path: str | None = None,
    init_lora_weights: bool | str = True,
) -> Path:
    """Write a PEFT LoRA adapter folder for the base at ``base_path`` with random, non-zero A and B.

    Both factors are non-zero (unlike a freshly initialised adapter) so that loading or merging it
    really changes the model. ``base_model_name_or_path`` stays null unless given, keeping the
    folder byte-identical wherever it is written.
    """
    if use_dora and lora_bias:
        raise ValueError("PEFT does not support lora_bias=True together with use_dora=True")
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    torch_dtype = _torch_dtype(dtype)
    import torch

    base = Path(base_path)
    base_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    conv1d_model = base_config.get("model_type") == "gpt2"
    if fan_in_fan_out is None:
        fan_in_fan_out = conv1d_model
    rank_pattern = dict(rank_pattern or {})
    alpha_pattern = dict(alpha_pattern or {})
    modules_to_save = list(modules_to_save) if modules_to_save is not None else None

    tensors_on_disk = _base_tensors(base)
    # tensor name -> (shape, file holding it, name stored under there)
    params: dict[str, tuple[tuple[int, ...], Path, str]] = {
        k: (s, f, k) for k, (f, s) in tensors_on_disk.items()
    }
    if base_config.get("tie_word_embeddings") and "lm_head.weight" not in params:
        # A tied head is still an nn.Linear module that PEFT can target or save; it shares the embedding.
        embed = next(k for k in params if k.rsplit(".", 2)[-2] in ("embed_tokens", "wte"))
        params["lm_head.weight"] = params[embed]
    # module name -> (weight shape, file, stored name, weight laid out as Conv1D [in, out])
    linear: dict[str, tuple[tuple[int, ...], Path, str, bool]] = {}
    for key, (shape, file, stored) in params.items():
        if key.endswith(".weight") and len(shape) == 2:
            module = key[: -len(".weight")]
            conv1d = conv1d_model and module.startswith("transformer.h.")
            linear[module] = (shape, file, stored, conv1d)

    targets = sorted(m for m in linear if _is_target(m, target_modules, layers_to_transform, modules_to_save))
    if not targets:
        raise ValueError(f"no module of {base} matches target_modules={target_modules!r}")
    embeddings = [m for m in targets if m.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES]
    if embeddings:
        raise ValueError(f"embedding LoRA is not supported by this factory: {', '.join(embeddings)}")

    gen = torch.Generator().manual_seed(seed)
    out_tensors: dict[str, Any] = {}
    for module in targets:
        shape, file, stored, conv1d = linear[module]
        r_m = rank_pattern.get(_pattern_key(list(rank_pattern), module), r)
        alpha_m = alpha_pattern.get(_pattern_key(list(alpha_pattern), module), lora_alpha)
        in_f, out_f = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
        lora_a = torch.randn((r_m, in_f), generator=gen) * init_scale
        lora_b = torch.randn((out_f, r_m), generator=gen) * init_scale
        prefix = f"base_model.model.{module}."
        out_tensors[prefix + "lora_A.weight"] = lora_a.to(torch_dtype)
        out_tensors[prefix + "lora_B.weight"] = lora_b.to(torch_dtype)
        if lora_bias:
            out_tensors[prefix + "lora_B.bias"] = (torch.randn(out_f, generator=gen) * init_scale).to(
                torch_dtype
            )
        if use_dora:
            # PEFT starts the magnitude at the row norms of W + scaling * B @ A; jitter so DoRA != LoRA.
            weight = _load_tensor(file, stored).float()
            weight = weight.T if conv1d else weight
            scaling = alpha_m / math.sqrt(r_m) if use_rslora else alpha_m / r_m
            norm = torch.linalg.norm(weight + scaling * (lora_b @ lora_a), dim=1)
            jitter = 1.0 + 0.1 * (torch.rand(out_f, generator=gen) * 2 - 1)
            out_tensors[prefix + "lora_magnitude_vector"] = (norm * jitter).to(torch_dtype)
        if module.rsplit(".", 1)[-1] == "lm_head":
            # PEFT saves a targeted head's base weight too (save_embedding_layers="auto"); readers must cope.
            out_tensors[prefix + "base_layer.weight"] = _load_tensor(file, stored)

    for saved in modules_to_save or ():
        modules = sorted({k.rsplit(".", 1)[0] for k in params if k.rsplit(".", 1)[0].endswith(saved)})
        if not modules:
            raise ValueError(f"no module of {base} matches modules_to_save entry {saved!r}")
        for module in modules:
            for key in sorted(k for k in params if k.rsplit(".", 1)[0] == module):
                out_tensors[f"base_model.model.{key}"] = _draw(gen, key, params[key][0], torch_dtype)

    out = _prepare_dir(path, _ADAPTER_FILES)
    if weights_format == "bin":
        torch.save(out_tensors, out / "adapter_model.bin")
    else:
        _save_safetensors(out_tensors, out / "adapter_model.safetensors")
    _write_json(
        out / "adapter_config.json",
        _adapter_config(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules if isinstance(target_modules, str) else sorted(set(target_modules)),
            use_rslora=use_rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            lora_bias=lora_bias,
            use_dora=use_dora,
            modules_to_save=modules_to_save,
            fan_in_fan_out=fan_in_fan_out,
            layers_to_transform=(
                layers_to_transform
                if layers_to_transform is None or isinstance(layers_to_transform, int)
                else list(layers_to_transform)
            ),
            base_model_name_or_path=base_model_name_or_path,
            init_lora_weights=init_lora_weights,
        ),
    )
    return out


def _adapter_config(**fields: Any) -> dict[str, Any]:
    """Every field PEFT 0.21's LoraConfig saves, so strict readers see a genuine file."""
    config: dict[str, Any] = {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 8,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": _version("peft", "0.21.2"),
        "qalora_group_size": 16,
        "r": 8,
        "rank_pattern": {},
        "revision": None,
        "target_modules": None,
        "target_parameters": None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": False,
        "use_qalora": False,
        "use_rslora": False,
        "velora_config": None,
    }
    config.update(fields)
    return config


def make_demo_set(root: str | Path, seed: int = 0, *, tokenizer: bool = False) -> dict[str, Any]:
    """Write one base and three dissimilar adapters, enough to exercise listing, diffing and merging.

    ``tokenizer=True`` gives the base a tokenizer (and the vocabulary it needs), so exports such
    as GGUF run in llama.cpp. Returns ``{"base": Path, "adapters": {name: Path}}``.
    """
    root = Path(root)
    extra = {"tokenizer": True, "vocab_size": 512} if tokenizer else {}
    base = make_llama_base(root / "base", seed=seed, **extra)
    base_name = str(base.resolve())
    specs: dict[str, dict[str, Any]] = {
        "chat-r4": {"r": 4, "lora_alpha": 8, "target_modules": ("q_proj", "v_proj")},
        "code-r8": {"r": 8, "lora_alpha": 16, "target_modules": DEFAULT_TARGETS_ALL_LINEAR},
        "math-r16-rslora": {
            "r": 16,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
        },
    }
    adapters = {
        name: make_lora_adapter(
            root / "adapters" / name, base, seed=seed + i, base_model_name_or_path=base_name, **spec
        )
        for i, (name, spec) in enumerate(specs.items(), start=1)
    }
    return {"base": base, "adapters": adapters}
