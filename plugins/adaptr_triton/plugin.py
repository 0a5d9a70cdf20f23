"""The ``triton`` backend's hooks: what it accelerates, where it can run, and its kernels.

It claims work only when the user's operation runs on it (``params["backend"] == "triton"``):
``auto`` picks it when a CUDA device is visible, ``--backend triton`` also accepts Triton's CPU
interpreter (``TRITON_INTERPRET=1``, how the tests run the kernels). A tensor the fused kernels
do not cover (DoRA, convolutions, bias deltas, DARE's ``l1`` rescale, other strategies) runs the
torch reference on the same device, so a merge never fails for want of a kernel.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

from adaptr import hookimpl

NAME = "triton"
_FLOATS = ("float32", "float16", "bfloat16")
_FUSED = ("simple", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties")


class TritonBackend:
    name = NAME
    description = (
        "Fused Triton kernels on a CUDA GPU: merges that never materialize ΔW, 4-bit (de)quantization."
    )
    operations = {
        "merge_tensor": ", ".join(_FUSED) + " on 2-D LoRA factors (anything else: torch on the same device)",
        "quantize_4bit": "nf4, fp4, with double quantization (same bytes as the torch reference)",
        "dequantize_4bit": "nf4, fp4 (QLoRA merges and quantization-error reports)",
    }

    def probe(self, explicit: bool) -> tuple[str | None, str]:
        if importlib.util.find_spec("triton") is None:
            return None, "the triton package is not installed (pip install triton)"
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            return f"cuda:{index}", torch.cuda.get_device_name(index)
        if os.environ.get("TRITON_INTERPRET") == "1" and explicit:
            return "cpu", "Triton's interpreter on the CPU (TRITON_INTERPRET=1: exact but slow, for tests)"
        return None, (
            "no CUDA device is visible (torch.cuda.is_available() is False); use --backend torch, or set "
            "TRITON_INTERPRET=1 to run the kernels on the CPU (slow)"
        )


@hookimpl
def register_backends(register) -> None:
    register(TritonBackend())


@hookimpl
def get_kernel(op: str, device: str, dtype: str, params) -> Callable[..., Any] | None:
    if params.get("backend") != NAME or dtype not in _FLOATS or not _runs_on(device):
        return None
    if op == "merge_tensor":
        from adaptr.ops.merge_tensor import merge_tensor
        from adaptr.plugins import get_strategy

        strategy = params.get("strategy")
        if strategy not in _FUSED:
            return None
        reference = get_strategy(strategy)

        def merge(job: Any) -> Any:
            fused = _fused_merge(job)
            return merge_tensor(job, reference) if fused is None else fused

        return merge
    if op == "quantize_4bit":
        from adaptr_triton.quant4 import quantize_4bit

        return quantize_4bit
    if op == "dequantize_4bit":
        from adaptr_triton.quant4 import dequantize_4bit

        return dequantize_4bit
    return None


def _runs_on(device: str) -> bool:
    """Compiled kernels need CUDA tensors; the interpreter takes CPU ones."""
    return device.startswith("cuda") or (device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _fused_merge(op: Any) -> Any:
    """The merged tensor from one fused kernel, or None when the kernels do not cover ``op``."""
    from adaptr.ops.merge_tensor import LoraFactors

    if (
        op.dora_magnitude is not None
        or op.base.dim() != 2
        or str(op.base.dtype).removeprefix("torch.") not in _FLOATS
        or not op.contributions
        or not all(isinstance(c, LoraFactors) and c.lora_A.dim() == 2 for c in op.contributions)
    ):
        return None
    factors = [(c.lora_A, c.lora_B, float(c.scaling)) for c in op.contributions]
    transpose = op.contributions[0].transpose
    p, w = op.params, [float(x) for x in op.weights]
    lam = float(p.get("lambda", 1.0))
    common = {"transpose": transpose, "out_dtype": op.out_dtype}
    if op.strategy in ("ties", "dare_ties"):
        from adaptr_triton.ties_merge import ties_merge_lora

        density = float(p["density"])
        if op.strategy == "ties":
            trim = density if density < 1 else None
            return ties_merge_lora(op.base, factors, w, density=trim, lam=lam, **common)
        if p.get("rescale") != "density":
            return None
        if density >= 1:
            return ties_merge_lora(op.base, factors, w, lam=lam, **common)
        return ties_merge_lora(op.base, factors, w, seeds=op.seeds, drop_density=density, lam=lam, **common)
    from adaptr_triton.linear_merge import linear_merge

    coeffs = _linear_coeffs(op.strategy, p, w)
    if coeffs is None:
        return None
    density = float(p.get("density", 1.0))
    if op.strategy == "dare_linear" and density < 1:
        if density <= 0:
            coeffs = [0.0] * len(coeffs)
        return linear_merge(op.base, factors, coeffs, seeds=op.seeds, density=max(density, 0.0), **common)
    return linear_merge(op.base, factors, coeffs, **common)


def _linear_coeffs(strategy: str, p: dict[str, Any], w: list[float]) -> list[float] | None:
    """Each adapter's factor in Σ c_i·ΔW_i: weight, the DARE rescale, normalization and λ folded in."""
    scale = float(p.get("lambda", 1.0))
    if strategy == "dare_linear":
        rescale, density = p.get("rescale"), float(p["density"])
        if rescale == "l1":
            return None  # a whole-tensor norm ratio: the torch reference computes it
        if rescale == "density" and 0 < density < 1:
            scale /= density
    if p.get("normalize"):
        total = math.fsum(w)
        if abs(total) >= 1e-8:
            scale /= total
    return [x * scale for x in w]
