"""Fine-grained FP8: float8_e4m3fn weights with one float32 ``weight_scale_inv`` per 128×128 block.

The layout DeepSeek-V3 introduced and transformers (``FineGrainedFP8Config``) and vLLM read. The
arithmetic is transformers' ``Fp8Quantize`` step for step, so a checkpoint written here equals one
transformers quantizes itself: per block ``scale = 448 / amax`` (torch's ``scalar / tensor``, i.e. a
reciprocal then a product; 1 for an all-zero block), ``weight_scale_inv = 1 / scale``,
``fp8 = clamp(W * scale, ±448)`` rounded to nearest even. Blocks at the right and bottom edges may be
partial (scale grid ``ceil(out/128) × ceil(in/128)``), as vLLM's kernels take them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError

__all__ = ["BLOCK", "FP8_MAX", "dequantize_fp8", "quantize_fp8", "scale_shape"]

BLOCK = 128
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a 2-D weight: one entry per (possibly partial) block."""
    rows, cols = shape
    return -(-rows // block), -(-cols // block)


def _tiles(band: Tensor, block: int) -> tuple[Tensor, int]:
    """Per-block amax of a band of ``block`` (or fewer) rows: float32 ``[ceil(cols/block)]``."""
    rows, cols = band.shape
    full = cols // block * block
    parts = []
    if full:
        parts.append(band[:, :full].reshape(rows, full // block, block).abs().amax(dim=(0, 2)))
    if full < cols:
        parts.append(band[:, full:].abs().amax().reshape(1))
    return torch.cat(parts) if len(parts) > 1 else parts[0], full


def quantize_fp8(weight: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """``(fp8 weight [out, in], weight_scale_inv float32 [ceil(out/block), ceil(in/block)])``."""
    if weight.dim() != 2:
        raise InvalidInputError(f"fp8 quantization takes 2-D weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise InvalidInputError(f"fp8 quantization takes float weights, got {weight.dtype}")
    w = weight.detach().cpu()
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    inv_all = torch.empty(scale_shape((rows, cols), block), dtype=torch.float32)
    for bi, r in enumerate(range(0, rows, block)):
        band = w[r : r + block].to(torch.float32, copy=True)  # scaled in place below
        amax, full = _tiles(band, block)
        if not bool(torch.isfinite(amax).all()):
            raise InvalidInputError("cannot quantize a tensor with NaN or infinite values")
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        scales = FP8_MAX / safe
        scales = torch.where(amax > 0, scales, torch.ones_like(scales))
        inv_all[bi] = 1.0 / scales
        n = band.shape[0]
        if full:
            band[:, :full].view(n, full // block, block).mul_(scales[: full // block, None])
        if full < cols:
            band[:, full:].mul_(scales[-1])
        q[r : r + block] = band.clamp_(min=-FP8_MAX, max=FP8_MAX)
    return q, inv_all


def dequantize_fp8(
    weight: Tensor, scale_inv: Tensor, dtype: torch.dtype = torch.bfloat16, block: int = BLOCK
) -> Tensor:
    """``fp8 * weight_scale_inv`` per block in float32, then cast to ``dtype`` (transformers' ``Fp8Dequantize``)."""
    rows, cols = weight.shape
    if tuple(scale_inv.shape) != scale_shape((rows, cols), block):
        raise InvalidInputError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {scale_shape((rows, cols), block)}"
        )
    out = torch.empty(rows, cols, dtype=dtype)
    full = cols // block * block
    s = scale_inv.float()
    for bi, r in enumerate(range(0, rows, block)):
        band = weight[r : r + block].to(torch.float32, copy=True)
        n = band.shape[0]
        if full:
            band[:, :full].view(n, full // block, block).mul_(s[bi, : full // block, None])
        if full < cols:
            band[:, full:].mul_(s[bi, -1])
        out[r : r + block] = band
    return out
