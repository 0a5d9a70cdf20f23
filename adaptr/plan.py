"""Planning a streamed merge or quantization: which output tensors, from what, changed how.

Nothing here reads a weight or imports torch: a request is validated, planned and looked up by
its recipe in milliseconds, and only an actual computation loads the engine (adaptr.engine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptr.errors import IncompatibleAdapterError, InvalidInputError, OperationError
from adaptr.interfaces import AdapterManifest, LoraModule, ModelManifest, PartSpec, Quantizer

if TYPE_CHECKING:
    import torch


WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-", "pytorch_model")
_FLOAT_CODES = {"F32", "F16", "BF16", "F64"}
_CODE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
log = logging.getLogger("adaptr")


@dataclass
class AdapterInput:
    ref: str
    path: Path
    manifest: AdapterManifest
    weight: float


@dataclass
class OutputTensor:
    """One tensor of the merged model and everything that changes it."""

    name: str
    source: str  # base tensor it starts from
    shape: list[int]
    code: str  # safetensors dtype code written
    lora: list[tuple[int, LoraModule]] = field(default_factory=list)
    bias: list[tuple[int, LoraModule]] = field(default_factory=list)
    replacement: tuple[int, str] | None = None
    dora: tuple[int, LoraModule] | None = None
    parts: list[PartSpec] | None = None  # written instead of the tensor when the output is quantized
    roundtrip: bool = False  # the base weight goes through quantize→dequantize first (QLoRA)

    @property
    def specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The stored tensors this output becomes: itself, or its quantized parts."""
        if self.parts is None:
            return [(self.name, self.code, tuple(self.shape))]
        return [(p.name, p.dtype, tuple(p.shape)) for p in self.parts]


@dataclass
class QuantStep:
    """A quantizer with resolved parameters, applied to some tensors of a plan."""

    quantizer: Quantizer
    params: dict[str, Any]

    def roundtrip(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        with _plugin_errors("quantizer", self.quantizer.name, name):
            parts = self.quantizer.quantize(name, tensor, self.params)
            return self.quantizer.dequantize(name, parts, self.params, tensor.dtype)


@contextlib.contextmanager
def _plugin_errors(kind: str, plugin: str, tensor: str) -> Iterator[None]:
    """A plugin's own bug becomes one line naming it and the tensor; adaptr's errors pass as they are."""
    from adaptr.errors import AdaptrError

    try:
        yield
    except (AdaptrError, OSError, MemoryError):
        raise
    except Exception as e:
        raise OperationError(f"{kind} {plugin!r} failed on {tensor}: {e}; nothing was registered") from e


@dataclass
class MergePlan:
    tensors: list[OutputTensor]
    untied: str | None  # name of the tensor added to untie embeddings, if any

    @property
    def output_bytes(self) -> int:
        return sum(_nbytes(code, shape) for t in self.tensors for _, code, shape in t.specs)

    @property
    def source_bytes(self) -> int:
        """Bytes of every output tensor before quantization: the work a progress bar counts."""
        return sum(math.prod(t.shape) * _CODE_BYTES.get(t.code, 1) for t in self.tensors)


def _nbytes(code: str, shape: Any) -> int:
    from adaptr.io.safetensors_io import DTYPE_BITS

    return DTYPE_BITS.get(code, 8) * math.prod(shape) // 8


# Modules that stay in full precision unless ``--skip`` says otherwise: the head and the
# embeddings are not Linear layers to transformers' quantizers (or are kept out of them), and
# quantizing them costs most of the accuracy for little size.
DEFAULT_SKIP = ("lm_head", "embed_tokens", "wte", "wpe")


def module_skipped(module: str, patterns: Sequence[str]) -> bool:
    """transformers' rule (``should_convert_module``), so a skip list means the same to both."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p) for p in patterns)


def plan_quantization(plan: MergePlan, step: QuantStep, skip: Sequence[str], *, parts: bool) -> list[str]:
    """Mark the weights ``step`` applies to: as quantized output (``parts``) or as QLoRA round
    trips. Returns the skip list transformers must be told (patterns + refused 2-D weights)."""
    refused: list[str] = []
    for t in plan.tensors:
        if t.replacement is not None or not t.name.endswith(".weight"):
            continue
        module = t.name.removesuffix(".weight")
        if module_skipped(module, skip):
            continue
        reason = step.quantizer.refuse(t.name, tuple(t.shape), t.code, step.params)
        if reason is not None:
            if len(t.shape) == 2:
                refused.append(module)
                log.debug("%s stays unquantized: %s", t.name, reason)
            continue
        if parts:
            t.parts = list(step.quantizer.layout(t.name, tuple(t.shape), t.code, step.params))
        else:
            t.roundtrip = True
    return [*skip, *refused]


def _out_code(in_code: str, dtype: str | None) -> str:
    if in_code not in _FLOAT_CODES or dtype is None:
        return in_code
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]


def plan_merge(
    base: ModelManifest, adapters: list[AdapterInput], *, dtype: str | None, modules_to_save_from: int | None
) -> MergePlan:
    """Decide, per output tensor, which adapters contribute what."""
    lora: dict[str, list[tuple[int, LoraModule]]] = {}
    bias: dict[str, list[tuple[int, LoraModule]]] = {}
    repl: dict[str, list[tuple[int, str]]] = {}
    dora: dict[str, tuple[int, LoraModule]] = {}
    for i, a in enumerate(adapters):
        for m in a.manifest.modules.values():
            lora.setdefault(m.target, []).append((i, m))
            if m.bias_key:
                bias.setdefault(f"{m.module}.bias", []).append((i, m))
            if m.magnitude_key:
                dora[m.target] = (i, m)
        for target, key in a.manifest.replacements.items():
            repl.setdefault(target, []).append((i, key))

    # Tied embeddings: a delta on the shared matrix would silently change the head too
    # (PEFT#2025). Write the head as its own tensor and untie instead.
    from adaptr.compat import tied_head_source

    names = list(base.tensors)
    untied = None
    embed = tied_head_source(base)
    touched = set(lora) | set(repl)
    if embed and (embed in touched or "lm_head.weight" in touched):
        untied = "lm_head.weight"
        names.append(untied)

    out: list[OutputTensor] = []
    for name in names:
        source = embed if name == untied else name
        meta = base.tensors[source]
        t = OutputTensor(name, source, list(meta.shape), _out_code(meta.dtype, dtype))
        t.lora = lora.get(name, [])
        t.bias = bias.get(name, [])
        t.dora = dora.get(name)
        reps = repl.get(name, [])
        if len(reps) > 1:
            if modules_to_save_from is None:
                refs = ", ".join(adapters[i].ref for i, _ in reps)
                raise InvalidInputError(
                    f"adapters {refs} each carry their own {name} (modules_to_save); pick one with "
                    "--modules-to-save-from NAME"
                )
            reps = [r for r in reps if r[0] == modules_to_save_from]
        if reps:
            if t.lora:
                raise IncompatibleAdapterError(
                    f"{name} is both LoRA-targeted and replaced by modules_to_save; merge those adapters separately"
                )
            t.replacement = reps[0]
            shape = adapters[reps[0][0]].manifest.tensors[reps[0][1]].shape
            t.shape = list(shape)
        out.append(t)
    for target in bias:
        if target not in base.tensors:
            raise IncompatibleAdapterError(
                f"adapter has a lora_B bias for {target.removesuffix('.bias')}, but the base layer has no bias; "
                "merge it into a base whose layer has a bias"
            )
    return MergePlan(out, untied)


def resolve_params(plugin: Any, given: dict[str, Any], kind: str = "strategy") -> dict[str, Any]:
    """Every declared parameter of a strategy or quantizer, given or defaulted, as its type."""
    defs = {p.name: p for p in plugin.params}
    unknown = sorted(set(given) - set(defs))
    if unknown:
        takes = ", ".join(sorted(defs)) or "no parameters"
        raise InvalidInputError(
            f"{kind} {plugin.name!r} does not take {', '.join(unknown)}; it takes {takes}"
        )
    return {name: _coerce(plugin.name, p, given.get(name, p.default), kind) for name, p in defs.items()}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(owner: str, p: Any, value: Any, kind: str = "strategy") -> Any:
    """A parameter value as its declared type; strings (``--param KEY=VALUE``) are parsed."""
    if value is None or p.type not in (float, int, bool, str):
        return value
    try:
        if p.type is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE + _FALSE:
                return text in _TRUE
        elif p.type is float and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
        elif p.type is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            number = float(value)
            if number.is_integer():
                return int(number)
        elif p.type is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    want = {float: "a finite number", int: "a whole number", bool: "true or false"}[p.type]
    raise InvalidInputError(f"parameter {p.name!r} of {kind} {owner!r} must be {want}, got {value!r}")


def copy_side_files(
    base_path: Path,
    dest: Path,
    *,
    dtype: str | None,
    untied: bool,
    quantization_config: dict[str, Any] | None = None,
) -> None:
    """Config, tokenizer and generation files travel with the weights; config records the changes."""
    import shutil

    from adaptr.store import list_files

    for src in list_files(base_path):
        rel = src.relative_to(base_path)
        if rel.name.startswith(WEIGHT_FILE_PREFIXES) or (rel.name == "config.json" and len(rel.parts) == 1):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)
    cfg = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    if dtype:
        cfg["dtype"] = dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype
    if untied:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (dest / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
