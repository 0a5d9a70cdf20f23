"""bitsandbytes formats: ``nf4``/``fp4`` (``Linear4bit`` state dicts) and ``int8`` (``Linear8bitLt``).

The parts are exactly what ``save_pretrained`` writes for a model bitsandbytes quantized itself, and
the bytes are bitsandbytes' own (``adaptr.ops.quant4``/``int8`` match it bit for bit), so transformers
and vLLM load the folders as pre-quantized bitsandbytes checkpoints.
"""

from __future__ import annotations

import json
import math
from typing import Any

from adaptr.errors import InvalidInputError
from adaptr.interfaces import ParamDef, PartSpec

# bitsandbytes' accepted 4-bit block sizes (adaptr.ops.quant4.BLOCKSIZES; kept here so that listing
# plugins never imports torch).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The quant-state JSON is sized before the weight is read: room for the longest dtype name and the
# longest repr of a float32 offset (sign, 17 digits, point, exponent).
_LONGEST_DTYPE = "bfloat16"
_OFFSET_WIDTH = 24


def module_of(name: str) -> str:
    return name.removesuffix(".weight")


def _refuse_common(name: str, shape: tuple[int, ...], dtype: str) -> str | None:
    if not name.endswith(".weight"):
        return "not a module's weight"
    if len(shape) != 2:
        return f"{len(shape)}-D; only 2-D (Linear) weights are quantized"
    if dtype not in FLOAT_CODES:
        return f"dtype {dtype}; only float16, bfloat16 and float32 weights are quantized"
    if 0 in shape:
        return "empty"
    return None


def _bnb_config(skipped: list[str], **fields: Any) -> dict[str, Any]:
    """transformers' ``BitsAndBytesConfig(...).to_dict()`` with ``fields`` set (keys in its order)."""
    config: dict[str, Any] = {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": False,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skipped),
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": False,
        "load_in_8bit": False,
    }
    config.update(fields)
    return config


def _dtype_name(code: str) -> str:
    """A compute dtype given as a safetensors code or a torch name, as transformers writes it."""
    name = FLOAT_CODES.get(code, code)
    return name.removeprefix("torch.")


class Bnb4bit:
    """``Linear4bit`` (NF4 or FP4), optionally with double-quantized statistics."""

    params = (
        ParamDef("blocksize", int, 64, "Elements per absmax block: 32, 64 (QLoRA), 128, ... 4096."),
        ParamDef(
            "double_quant", bool, False, "Quantize the absmax statistics too (QLoRA's double quantization)."
        ),
    )

    def __init__(self, quant_type: str, description: str) -> None:
        self.name = quant_type
        self.quant_type = quant_type
        self.description = description

    def _blocksize(self, params: dict[str, Any]) -> int:
        bs = params.get("blocksize", 64)
        if isinstance(bs, bool) or bs not in BLOCKSIZES:
            allowed = ", ".join(map(str, BLOCKSIZES))
            raise InvalidInputError(f"{self.name} blocksize must be one of {allowed}; got {bs!r}")
        return int(bs)

    def _state_key(self, name: str) -> str:
        return f"{name}.quant_state.bitsandbytes__{self.quant_type}"

    def _state_dict(self, shape: tuple[int, ...], dtype: str, params: dict[str, Any], offset: Any) -> dict:
        state: dict[str, Any] = {
            "quant_type": self.quant_type,
            "blocksize": self._blocksize(params),
            "dtype": dtype,
            "shape": list(shape),
        }
        if params.get("double_quant"):
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
        return state

    def _state_len(self, shape: tuple[int, ...], params: dict[str, Any]) -> int:
        text = json.dumps(self._state_dict(shape, _LONGEST_DTYPE, params, 0.0))
        return len(text) + (_OFFSET_WIDTH - len("0.0") if params.get("double_quant") else 0)

    def refuse(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> str | None:
        self._blocksize(params)
        return _refuse_common(name, shape, dtype)

    def layout(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> list[PartSpec]:
        bs = self._blocksize(params)
        n = math.prod(shape)
        nblocks = -(-n // bs)
        nested = bool(params.get("double_quant"))
        parts = [
            PartSpec(name, "U8", ((n + 1) // 2, 1)),
            PartSpec(f"{name}.absmax", "U8" if nested else "F32", (nblocks,)),
            PartSpec(f"{name}.quant_map", "F32", (16,)),
        ]
        if nested:
            parts.append(PartSpec(f"{name}.nested_absmax", "F32", (-(-nblocks // NESTED_BLOCKSIZE),)))
            parts.append(PartSpec(f"{name}.nested_quant_map", "F32", (256,)))
        parts.append(PartSpec(self._state_key(name), "U8", (self._state_len(tuple(shape), params),)))
        return parts

    def quantize(self, name: str, tensor: Any, params: dict[str, Any]) -> dict[str, Any]:
        import torch

        from adaptr import backends
        from adaptr.ops.quant4 import code_book, dynamic_map, quantize_4bit

        nested = bool(params.get("double_quant"))
        # an accelerated backend (--backend) may claim the per-element work, with the same bytes
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        quantize = backends.kernel("quantize_4bit", str(tensor.device), dtype_name) or quantize_4bit
        q = quantize(
            tensor, blocksize=self._blocksize(params), quant_type=self.quant_type, double_quant=nested
        )
        parts = {
            name: q.packed,
            f"{name}.absmax": q.absmax,
            f"{name}.quant_map": code_book(self.quant_type).clone(),
        }
        if nested:
            parts[f"{name}.nested_absmax"] = q.nested_absmax
            parts[f"{name}.nested_quant_map"] = dynamic_map().clone()
        text = json.dumps(self._state_dict(tuple(tensor.shape), dtype_name, params, q.nested_offset))
        width = self._state_len(tuple(tensor.shape), params)
        parts[self._state_key(name)] = torch.tensor(
            list(text.ljust(width).encode("utf-8")), dtype=torch.uint8
        )
        return parts

    def dequantize(self, name: str, parts: dict[str, Any], params: dict[str, Any], dtype: Any) -> Any:
        import torch

        from adaptr import backends
        from adaptr.ops.quant4 import Quant4, dequantize_4bit

        packed = parts[name]
        dequantize = backends.kernel("dequantize_4bit", str(packed.device), str(dtype).removeprefix("torch."))
        dequantize = dequantize or dequantize_4bit
        state = json.loads(bytes(parts[self._state_key(name)].tolist()).decode("utf-8"))
        nested = f"{name}.nested_absmax" in parts
        q = Quant4(
            packed=parts[name],
            absmax=parts[f"{name}.absmax"],
            shape=tuple(state["shape"]),
            dtype=getattr(torch, state["dtype"]),
            blocksize=int(state["blocksize"]),
            quant_type=state["quant_type"],
            nested_absmax=parts[f"{name}.nested_absmax"] if nested else None,
            nested_offset=float(state["nested_offset"]) if nested else None,
        )
        return dequantize(q, dtype)

    def config(self, params: dict[str, Any], skipped: list[str], compute_dtype: str) -> dict[str, Any]:
        self._blocksize(params)
        return _bnb_config(
            skipped,
            _load_in_4bit=True,
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=bool(params.get("double_quant")),
            bnb_4bit_compute_dtype=_dtype_name(compute_dtype),
        )


class Int8:
    """``Linear8bitLt`` weights: int8 codes, per-row float32 absmax ``SCB`` and the ``row`` format tag."""

    name = "int8"
    description = "LLM.int8 (bitsandbytes 8-bit): per-row absmax, int8 codes; about half the size of 16-bit."
    params = (
        ParamDef(
            "threshold",
            float,
            6.0,
            "LLM.int8 outlier threshold for activations at inference (config only; 0 turns it off).",
        ),
    )

    def refuse(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> str | None:
        return _refuse_common(name, shape, dtype)

    def layout(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> list[PartSpec]:
        module = module_of(name)
        return [
            PartSpec(name, "I8", tuple(shape)),
            PartSpec(f"{module}.SCB", "F32", (shape[0],)),
            PartSpec(f"{module}.weight_format", "U8", ()),
        ]

    def quantize(self, name: str, tensor: Any, params: dict[str, Any]) -> dict[str, Any]:
        import torch

        from adaptr.ops.int8 import quantize_int8

        cb, scb = quantize_int8(tensor)
        module = module_of(name)
        # weight_format: bitsandbytes' {"row": 0, ...}; transformers accepts only "row".
        return {name: cb, f"{module}.SCB": scb, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}

    def dequantize(self, name: str, parts: dict[str, Any], params: dict[str, Any], dtype: Any) -> Any:
        from adaptr.ops.int8 import dequantize_int8

        return dequantize_int8(parts[name], parts[f"{module_of(name)}.SCB"], dtype)

    def config(self, params: dict[str, Any], skipped: list[str], compute_dtype: str) -> dict[str, Any]:
        return _bnb_config(
            skipped,
            _load_in_8bit=True,
            load_in_8bit=True,
            llm_int8_threshold=float(params.get("threshold", 6.0)),
        )


NF4 = Bnb4bit(
    "nf4",
    "bitsandbytes NF4 (QLoRA's 4-bit NormalFloat): blockwise absmax, 16 normal quantiles; 4.5 bits/weight.",
)
FP4 = Bnb4bit(
    "fp4", "bitsandbytes FP4 (e2m1): blockwise absmax, 4-bit floats; NF4 is more accurate on weights."
)
INT8 = Int8()
