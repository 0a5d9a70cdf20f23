"""Built-in quantization backends: ``nf4``/``fp4`` (bitsandbytes 4-bit), ``int8`` (LLM.int8) and ``fp8``.

Registered through the ``adaptr`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from adaptr import hookimpl


@hookimpl
def register_quantizers(register) -> None:
    pass
