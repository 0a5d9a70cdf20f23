"""Fine-grained FP8 (``quant_method: fp8``): float8_e4m3fn weights, float32 scales per 128×128 block.

Written as transformers' ``FineGrainedFP8Config`` checkpoints are (DeepSeek-V3's layout), which vLLM
serves natively on FP8 GPUs; transformers on CPU dequantizes them to the model dtype on load.
"""

from __future__ import annotations

from typing import Any

from adaptr.interfaces import ParamDef, PartSpec
from adaptr_quant.bnb import _refuse_common, module_of

BLOCK = 128


class Fp8:
    name = "fp8"
    description = "Fine-grained FP8 (e4m3, one scale per 128x128 block), as DeepSeek-V3/vLLM; ~2x smaller."
    params = (
        ParamDef(
            "partial_blocks",
            bool,
            False,
            "Also quantize weights whose sides are not multiples of 128 (partial edge blocks: vLLM reads "
            "them; transformers' CPU dequantization does not, so they stay unquantized by default).",
        ),
    )

    def refuse(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> str | None:
        reason = _refuse_common(name, shape, dtype)
        if reason is None and not params.get("partial_blocks") and any(s % BLOCK for s in shape):
            reason = f"shape {tuple(shape)} is not a multiple of {BLOCK}x{BLOCK} blocks (see partial_blocks)"
        return reason

    def layout(self, name: str, shape: tuple[int, ...], dtype: str, params: dict[str, Any]) -> list[PartSpec]:
        rows, cols = shape
        return [
            PartSpec(name, "F8_E4M3", (rows, cols)),
            PartSpec(f"{module_of(name)}.weight_scale_inv", "F32", (-(-rows // BLOCK), -(-cols // BLOCK))),
        ]

    def quantize(self, name: str, tensor: Any, params: dict[str, Any]) -> dict[str, Any]:
        from adaptr.ops.fp8 import quantize_fp8

        weight, scale_inv = quantize_fp8(tensor, BLOCK)
        return {name: weight, f"{module_of(name)}.weight_scale_inv": scale_inv}

    def dequantize(self, name: str, parts: dict[str, Any], params: dict[str, Any], dtype: Any) -> Any:
        from adaptr.ops.fp8 import dequantize_fp8

        return dequantize_fp8(parts[name], parts[f"{module_of(name)}.weight_scale_inv"], dtype, BLOCK)

    def config(self, params: dict[str, Any], skipped: list[str], compute_dtype: str) -> dict[str, Any]:
        """transformers' ``FineGrainedFP8Config(weight_block_size=[128, 128]).to_dict()``."""
        return {
            "quant_method": "fp8",
            "modules_to_not_convert": list(skipped),
            "modules_to_convert": None,
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
            "dequantize": False,
            "scale_fmt": "float",
            "expert_dtype": "fp8",
        }


FP8 = Fp8()
