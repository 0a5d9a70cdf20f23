"""Does an adapter fit a base? Format-agnostic checks on the two manifests.

Adapters name their base loosely (``base_model_name_or_path`` is often a stale local
path), so fit is decided by structure: every targeted module must exist in the base
with shapes that agree with the LoRA factors.
"""

from __future__ import annotations

from adaptr.errors import IncompatibleAdapterError
from adaptr.interfaces import AdapterManifest, ModelManifest

_EMBEDDING_LEAVES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def tied_head_source(base: ModelManifest) -> str | None:
    """The input embedding a tied ``lm_head.weight`` shares, when the base stores only that."""
    if not base.tie_word_embeddings or "lm_head.weight" in base.tensors:
        return None
    return next((n for n in base.tensors if n.endswith(_INPUT_EMBEDDINGS)), None)


def base_tensors(base: ModelManifest) -> dict:
    """The base's tensors, with a tied head visible under its own name (adapters may target it)."""
    source = tied_head_source(base)
    return base.tensors if source is None else {**base.tensors, "lm_head.weight": base.tensors[source]}


def check_adapter_fits(adapter: AdapterManifest, base: ModelManifest, base_name: str) -> list[str]:
    """Raise IncompatibleAdapterError when the adapter cannot apply to ``base``; return extra flags."""
    flags: list[str] = []
    hint = (
        f"the adapter was made for a different base than {base_name!r}; "
        "pass the base it was trained on with --base"
    )
    tensors = base_tensors(base)
    missing = [m for m in adapter.modules.values() if m.target not in tensors]
    if missing and len(missing) == len(adapter.modules):
        raise IncompatibleAdapterError(
            f"none of the adapter's {len(missing)} modules (e.g. {missing[0].module}) exist in base "
            f"{base_name!r}; {hint}"
        )
    if missing:
        raise IncompatibleAdapterError(
            f"module {missing[0].module} targeted by the adapter does not exist in base {base_name!r}; {hint}"
        )
    for m in adapter.modules.values():
        base_shape = tensors[m.target].shape
        if list(base_shape) != m.delta_shape:
            raise IncompatibleAdapterError(
                f"module {m.module}: adapter delta shape {m.delta_shape} (lora_B {m.b_shape} x lora_A "
                f"{m.a_shape}) does not match base weight shape {list(base_shape)}; {hint}"
            )
        if m.magnitude_key:
            mag = adapter.tensors[m.magnitude_key].shape
            if mag != [m.b_shape[0]]:  # one magnitude per output feature, whatever the storage layout
                raise IncompatibleAdapterError(
                    f"module {m.module}: DoRA magnitude has shape {mag}, expected [{m.b_shape[0]}]"
                )
        if m.bias_key:
            bias = adapter.tensors[m.bias_key].shape
            out = m.b_shape[0]
            if bias != [out]:
                raise IncompatibleAdapterError(
                    f"module {m.module}: lora_B bias has shape {bias}, expected [{out}]; re-export the adapter"
                )
    for target, key in adapter.replacements.items():
        if target not in tensors:
            raise IncompatibleAdapterError(
                f"adapter tensor {key} replaces {target}, which base {base_name!r} does not have; {hint}"
            )
        have, want = adapter.tensors[key].shape, tensors[target].shape
        if have == want:
            continue
        if target.endswith(_EMBEDDING_LEAVES) and have[1:] == want[1:]:
            if "vocab_resize" not in flags:
                flags.append("vocab_resize")
            continue
        raise IncompatibleAdapterError(
            f"adapter tensor {key} has shape {have} but base tensor {target} is {want}; {hint}"
        )
    return flags
