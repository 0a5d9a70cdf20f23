"""Built-in GGUF exporter: llama.cpp model files and LoRA adapters, written with the ``gguf`` package.

Registered through the ``adaptr`` entry-point group like any third-party plugin. Heavy imports
(torch, numpy, gguf) happen inside ``export`` so listing plugins stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from adaptr import hookimpl
from adaptr.interfaces import AdapterManifest, ExportRequest, ParamDef

QUANT = ParamDef(
    "quant", str, "f16", "GGUF tensor type for the weight matrices: f16, bf16, q8_0 or q4_0 (norms stay F32)."
)


class GgufExporter:
    """One ``.gguf`` file llama.cpp loads: a Llama/Mistral/Qwen2 model, or a LoRA adapter for one."""

    name = "gguf"
    description = (
        "llama.cpp GGUF file: Llama, Mistral and Qwen2 models (f16, bf16, q8_0, q4_0) and LoRA adapters."
    )
    kinds = ("base", "merged", "adapter")
    single_file = True
    params = (QUANT,)

    def export(self, request: ExportRequest) -> list[str]:
        from .tensors import quant_types, write_gguf

        quant = str(request.options.get("quant", QUANT.default)).lower()
        quant_types(quant)  # refuses unknown names before anything is read
        if isinstance(request.manifest, AdapterManifest):
            from .lora import plan_adapter as plan
        else:
            from .model import plan_model as plan
        arch, kv, planned, reader = plan(request, quant)  # refusals happen here, before writing
        out = Path(request.dest) / request.filename
        try:
            with reader:
                write_gguf(out, arch, kv, planned, request.progress)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return [request.filename]


@hookimpl
def register_exporters(register) -> None:
    register(GgufExporter())
