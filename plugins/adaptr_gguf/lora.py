"""PEFT LoRA adapters to llama.cpp LoRA GGUF files, as ``convert_lora_to_gguf.py`` writes them.

llama.cpp applies ``y = W x + (alpha / rank) · B (A x)`` with one global ``adapter.lora.alpha`` and the
rank read off each B. PEFT's true per-module scale differs for rsLoRA (alpha/√r) and for
``rank_pattern``/``alpha_pattern``; the converter ignores that, we fold ``scaling · rank / alpha`` into
B so the adapter behaves exactly as it does in PEFT.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from adaptr.errors import IncompatibleAdapterError, InvalidInputError
from adaptr.interfaces import AdapterManifest, ExportRequest

from .arch import arch_name, family_of, heads, load_config, tensor_name
from .model import display_name
from .tensors import Planned, choose_type, qk_permutation

# Adapter features llama.cpp's LoRA loader has no place for.
_REFUSED_FLAGS = {
    "dora": "DoRA magnitude vectors",
    "modules_to_save": "full replacement weights (modules_to_save)",
    "layer_replication": "layer_replication",
    "trainable_tokens": "trainable_token_indices",
}


def _order(module: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", module)
    return (int(m.group(1)) if m else -1), module


def fold_factor(scaling: float, rank: int, alpha: float) -> float:
    """What B must be multiplied by so that llama.cpp's ``alpha / rank`` gives ``scaling``."""
    return scaling * rank / alpha if alpha else scaling


def _refuse_features(man: AdapterManifest, where: str) -> None:
    for flag, what in _REFUSED_FLAGS.items():
        if flag in man.flags or (flag == "modules_to_save" and man.replacements):
            raise InvalidInputError(
                f"{where}: {what} cannot be expressed in a llama.cpp LoRA GGUF; merge it instead"
            )
    if man.lora_bias or any(m.bias_key for m in man.modules.values()):
        raise InvalidInputError(
            f"{where}: LoRA biases (lora_bias) cannot be expressed in a llama.cpp LoRA GGUF; merge it instead"
        )
    if man.fan_in_fan_out or any(m.fan_in_fan_out for m in man.modules.values()):
        raise InvalidInputError(
            f"{where}: fan_in_fan_out (Conv1D) adapters have no GGUF form; merge it instead"
        )


def plan_adapter(request: ExportRequest, quant: str) -> tuple[str, Any, list[Planned], Any]:
    import gguf

    from adaptr.io.safetensors_io import open_weights

    man = request.manifest
    assert isinstance(man, AdapterManifest)
    where = str(request.artifact.get("ref") or request.source)
    if request.base_source is None:
        raise InvalidInputError(
            f"{where}: has no base model in the catalog; GGUF adapters need the base's config "
            "(re-add the adapter with --base)"
        )
    _refuse_features(man, where)
    base_where = f"{where} (base {request.base_source})"
    config = load_config(request.base_source, base_where)
    family = family_of(config, base_where)
    n_head, n_kv = heads(config, base_where)
    if request.base_manifest is not None:
        base_shapes = {k: tuple(v.shape) for k, v in request.base_manifest.tensors.items()}
    else:
        base_shapes = {k: tuple(v.shape) for k, v in open_weights(request.base_source).tensors.items()}
    tied = bool(config.get("tie_word_embeddings", "lm_head.weight" not in base_shapes))  # as the model export
    tmap = gguf.get_tensor_name_map(family.arch, int(config["num_hidden_layers"]))
    alpha = float(man.lora_alpha)
    weights = open_weights(Path(request.source) / man.weights_file)  # the header is read once
    reader = weights.reader()
    sizes = {k: t.nbytes for k, t in weights.tensors.items()}

    planned: list[Planned] = []
    for module in sorted(man.modules.values(), key=lambda m: _order(m.module)):
        if module.target == "lm_head.weight" and tied:
            raise IncompatibleAdapterError(
                f"{where}: targets lm_head, but the base ties it to the embedding and GGUF has no "
                "separate head; merge the adapter instead"
            )
        base_shape = base_shapes.get(module.target)
        if base_shape is None:
            raise IncompatibleAdapterError(
                f"{where}: targets {module.target}, which the base model does not have"
            )
        new = tensor_name(tmap, module.target, where)
        r = module.b_shape[1]
        scale = fold_factor(module.scaling, r, alpha)
        if module.kind == "embedding":
            # PEFT: A (r, vocab), B (dim, r); llama.cpp wants A transposed for token_embd (get_rows).
            ok = tuple(module.a_shape) == (r, base_shape[0]) and tuple(module.b_shape) == (base_shape[1], r)
            a_shape, a_load = (module.a_shape[1], r), (lambda k=module.a_key: reader.get(k).T)
        else:
            ok = tuple(module.a_shape) == (r, base_shape[1]) and tuple(module.b_shape) == (base_shape[0], r)
            a_shape, a_load = (r, module.a_shape[1]), (lambda k=module.a_key: reader.get(k))
        if not ok:
            raise IncompatibleAdapterError(
                f"{where}: {module.module} has A {module.a_shape} and B {module.b_shape}, which do not fit "
                f"{module.target} {list(base_shape)}; the adapter belongs to another base"
            )
        rows = None
        if family.permute_qk and module.target.endswith("q_proj.weight"):
            rows = qk_permutation(module.b_shape[0], n_head)
        elif family.permute_qk and module.target.endswith("k_proj.weight"):
            rows = qk_permutation(module.b_shape[0], n_kv)
        b_shape = tuple(module.b_shape)
        planned.append(
            Planned(
                name=new + ".lora_a",
                shape=a_shape,
                qtype=choose_type(new + ".lora_a", a_shape, quant),
                load=a_load,
                source_bytes=sizes.get(module.a_key, 0),
            )
        )
        planned.append(
            Planned(
                name=new + ".lora_b",
                shape=b_shape,
                qtype=choose_type(new + ".lora_b", b_shape, quant),
                load=lambda k=module.b_key: reader.get(k),
                rows=rows,
                scale=None if scale == 1.0 else scale,
                source_bytes=sizes.get(module.b_key, 0),
            )
        )
    if not planned:
        raise InvalidInputError(f"{where}: has no LoRA modules to export")

    invocation = (man.config or {}).get("alora_invocation_tokens")

    def kv(writer: Any) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(display_name(request))
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if invocation:
            writer.add_key_value(
                gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS,
                [int(t) for t in invocation],
                gguf.GGUFValueType.ARRAY,
                gguf.GGUFValueType.UINT32,
            )
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return arch_name(family), kv, planned, reader
