"""Built-in quantization backends: ``nf4``/``fp4`` (bitsandbytes 4-bit), ``int8`` (LLM.int8) and ``fp8``.

Registered through the ``adaptr`` entry-point group like any third-party plugin. Each writes the
tensors transformers' own loaders expect (``quantization_config`` included), so a folder the engine
writes loads with ``from_pretrained`` and no arguments. torch is imported only when a tensor is
touched: the CLI imports every plugin at start-up.
"""

from __future__ import annotations

from adaptr import hookimpl
from adaptr_quant.bnb import FP4, INT8, NF4
from adaptr_quant.fp8 import FP8

__all__ = ["FP4", "FP8", "INT8", "NF4"]


@hookimpl
def register_quantizers(register) -> None:
    for quantizer in (NF4, FP4, INT8, FP8):
        register(quantizer)
