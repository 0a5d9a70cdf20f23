"""Base and merged models to one GGUF file, as ``convert_hf_to_gguf.py --outtype`` would write it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError
from adaptr.interfaces import ExportRequest

from .arch import (
    arch_name,
    check_rope,
    family_of,
    heads,
    load_config,
    rope_freqs,
    tensor_name,
    write_model_kv,
)
from .tensors import Planned, choose_type, qk_permutation, quant_types
from .vocab import read_vocab

_SKIP = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_FLOAT_CODES = ("F32", "F16", "BF16", "F64")


def _order(name: str) -> tuple[int, str]:
    """Embedding first, then blocks in layer order, then the final norm and head."""
    m = re.search(r"\.(\d+)\.", name)
    if m:
        return int(m.group(1)), name
    return (-1 if "embed" in name else 1 << 30), name


def display_name(request: ExportRequest) -> str:
    return str(request.artifact.get("name") or Path(request.source).name)


def plan_model(request: ExportRequest, quant: str) -> tuple[str, Any, list[Planned], Any]:
    """Everything about the file, checked and planned before a byte is written.

    Returns (architecture name, the KV writer callback, the tensors, the open weight reader).
    """
    import gguf

    from adaptr.io.safetensors_io import open_weights

    where = str(request.artifact.get("ref") or request.source)
    config = load_config(request.source, where)
    family = family_of(config, where)
    check_rope(config, where)
    _, file_type = quant_types(quant)
    n_head, n_kv = heads(config, where)
    weights = open_weights(request.source)
    tied = bool(config.get("tie_word_embeddings", "lm_head.weight" not in weights.tensors))
    vocab_size = int(config.get("vocab_size") or weights.tensors["model.embed_tokens.weight"].shape[0])
    vocab = read_vocab(Path(request.source), vocab_size)
    tmap = gguf.get_tensor_name_map(family.arch, int(config["num_hidden_layers"]))
    reader = weights.reader()

    planned: list[Planned] = []
    if (freqs := rope_freqs(config)) is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.append(Planned(name, tuple(freqs.shape), gguf.GGMLQuantizationType.F32, lambda f=freqs: f))
    for hf_name in sorted(weights.tensors, key=_order):
        info = weights.tensors[hf_name]
        if hf_name.endswith(_SKIP) or (tied and hf_name == "lm_head.weight"):
            continue
        new = tensor_name(tmap, hf_name, where)
        if info.dtype not in _FLOAT_CODES:
            raise InvalidInputError(
                f"{where}: tensor {hf_name} is {info.dtype}; GGUF export reads float weights (a quantized "
                "checkpoint? export the float model it came from)"
            )
        shape = tuple(info.shape)
        rows = None
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            rows = qk_permutation(shape[0], n_head)
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            rows = qk_permutation(shape[0], n_kv)
        is_output = new == "output.weight" or (tied and new == "token_embd.weight")
        planned.append(
            Planned(
                name=new,
                shape=shape,
                qtype=choose_type(new, shape, quant, is_output=is_output),
                load=lambda n=hf_name: reader.get(n),
                rows=rows,
                source_bytes=info.nbytes,
            )
        )

    total = sum(math.prod(t.shape) for t in planned)
    label = gguf.size_label(total, 0, 0, 0)

    def kv(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(display_name(request))
        writer.add_size_label(label)
        write_model_kv(writer, config, family, int(file_type), where)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if vocab is not None:
            vocab.write(writer)

    return arch_name(family), kv, planned, reader
