"""Built-in GGUF exporter: llama.cpp model files and LoRA adapters, written with the ``gguf`` package.

Registered through the ``adaptr`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from adaptr import hookimpl


@hookimpl
def register_exporters(register) -> None:
    pass
