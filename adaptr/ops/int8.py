"""LLM.int8 weight storage as bitsandbytes 0.50.2 writes it: int8 codes ``CB`` and per-row absmax ``SCB``.

``Int8Params`` casts the weight to float16 before ``int8_vectorwise_quant``, so the statistics are
float16 maxima and the codes are ``round(W16 * (127 / SCB))`` with ``127 / SCB`` computed as torch
computes ``scalar / tensor`` (a reciprocal, then a product). Everything here repeats those steps in
row blocks, so the bytes are bitsandbytes' and no full-size float32 copy is made.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adaptr.errors import InvalidInputError

__all__ = ["DEQUANT_SCALE", "dequantize_int8", "quantize_int8"]

DEQUANT_SCALE = 7.874015718698502e-3  # bitsandbytes' (and transformers') 1/127
_BLOCK = 1 << 18  # elements per row block


def _row_step(cols: int) -> int:
    return max(1, _BLOCK // max(cols, 1))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(CB, SCB)``: int8 ``[out, in]`` codes and float32 ``[out]`` row absmax, as ``Linear8bitLt`` stores them.

    Raises InvalidInputError for non-2-D weights and for values float16 cannot hold (bitsandbytes
    would silently write garbage for those rows).
    """
    if weight.dim() != 2:
        raise InvalidInputError(f"int8 quantization takes 2-D weights, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise InvalidInputError(f"int8 quantization takes float weights, got {weight.dtype}")
    w = weight.detach().cpu()
    rows, cols = w.shape
    cb = torch.empty(rows, cols, dtype=torch.int8)
    scb = torch.empty(rows, dtype=torch.float32)
    step = _row_step(cols)
    for r in range(0, rows, step):
        a = w[r : r + step].to(torch.float16)
        stats = a.abs().amax(1).float()
        if not bool(torch.isfinite(stats).all()):
            raise InvalidInputError(
                "cannot quantize to int8: the weight holds NaN, infinity or values beyond float16's range"
            )
        scb[r : r + step] = stats
        cb[r : r + step] = torch.round(a * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
    return cb, scb


def dequantize_int8(cb: Tensor, scb: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``int8_vectorwise_dequant``: ``CB * SCB[:, None] * (1/127)`` in float32, then cast to ``dtype``."""
    rows, cols = cb.shape
    out = torch.empty(rows, cols, dtype=dtype)
    step = _row_step(cols)
    for r in range(0, rows, step):
        out[r : r + step] = cb[r : r + step] * scb[r : r + step].view(-1, 1) * DEQUANT_SCALE
    return out
