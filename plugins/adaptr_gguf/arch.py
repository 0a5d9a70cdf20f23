"""Which Hugging Face architectures map onto which llama.cpp architecture, and their GGUF metadata.

The keys and values follow llama.cpp's ``convert_hf_to_gguf.py`` (``TextModel.set_gguf_parameters``
plus the Llama/Qwen2 subclasses), so llama.cpp reads our files exactly like its own conversions.
Names and key strings come from the ``gguf`` package, never from hand-copied tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adaptr.errors import InvalidInputError


@dataclass(frozen=True)
class Family:
    hf_arch: str
    arch: Any  # gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's Llama runs rope on interleaved rows; Qwen2 (NEOX rope) does not


def _families() -> dict[str, Family]:
    import gguf

    llama, qwen2 = gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2
    return {
        "LlamaForCausalLM": Family("LlamaForCausalLM", llama, True),
        "MistralForCausalLM": Family("MistralForCausalLM", llama, True),  # llama.cpp: arch "llama"
        "Qwen2ForCausalLM": Family("Qwen2ForCausalLM", qwen2, False),
    }


SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def family_of(config: dict[str, Any], where: str) -> Family:
    """The family for a config.json, or a one-line refusal naming what is supported."""
    archs = config.get("architectures") or [None]
    arch = archs[0] if isinstance(archs, list) and archs else None
    family = _families().get(arch) if isinstance(arch, str) else None
    if family is None:
        raise InvalidInputError(
            f"{where}: architecture {arch} cannot be exported to GGUF; supported: {', '.join(SUPPORTED)}"
        )
    return family


def arch_name(family: Family) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[family.arch]


def tensor_name(tmap: Any, hf_name: str, where: str) -> str:
    """The GGUF name of a Hugging Face tensor (``blk.0.attn_q.weight``), from gguf's own tables."""
    new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise InvalidInputError(f"{where}: tensor {hf_name} has no GGUF name for this architecture")
    return new


def load_config(folder: Any, where: str) -> dict[str, Any]:
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(
            f"{where}: cannot read {path} ({exc}); GGUF export needs the model's config.json"
        ) from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{where}: {path} is not a JSON object; fix the model's config.json")
    return config


def _get(config: dict[str, Any], key: str, where: str) -> Any:
    value = config.get(key)
    if value is None:
        raise InvalidInputError(f"{where}: config.json has no {key}; fix the model's config.json")
    return value


def heads(config: dict[str, Any], where: str) -> tuple[int, int]:
    n_head = int(_get(config, "num_attention_heads", where))
    return n_head, int(config.get("num_key_value_heads") or n_head)


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes ``rope_parameters``; older configs ``rope_theta`` + ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    return rope


def check_rope(config: dict[str, Any], where: str) -> None:
    rope_type = rope_params(config).get("rope_type")
    if rope_type not in (None, "default", "linear", "yarn", "llama3"):
        raise InvalidInputError(
            f"{where}: rope scaling {rope_type!r} cannot be exported to GGUF; supported: linear, yarn, llama3"
        )


def rope_freqs(config: dict[str, Any]) -> Any | None:
    """Llama 3.1+ rope scaling becomes a ``rope_freqs`` tensor, computed as llama.cpp's converter does."""
    import numpy as np

    rope = rope_params(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def write_model_kv(writer: Any, config: dict[str, Any], family: Family, file_type: int, where: str) -> None:
    """The architecture keys llama.cpp's converter writes for Llama/Mistral and Qwen2."""
    import gguf

    writer.add_block_count(int(_get(config, "num_hidden_layers", where)))
    if (n_ctx := config.get("max_position_embeddings")) is not None:
        writer.add_context_length(int(n_ctx))
    writer.add_embedding_length(int(_get(config, "hidden_size", where)))
    if (n_ff := config.get("intermediate_size")) is not None:
        writer.add_feed_forward_length(int(n_ff))
    n_head, n_kv = heads(config, where)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    rope = rope_params(config)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if (theta := rope.get("rope_theta")) is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(_get(config, "rms_norm_eps", where)))
    if (head_dim := config.get("head_dim")) is not None:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(file_type)
    if family.permute_qk:  # LlamaModel.set_gguf_parameters adds these two; Qwen2Model does not
        writer.add_vocab_size(int(_get(config, "vocab_size", where)))
        writer.add_rope_dimension_count(int(head_dim or config["hidden_size"] // n_head))
