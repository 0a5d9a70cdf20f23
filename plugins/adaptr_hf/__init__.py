"""Built-in Hugging Face exporter: a folder ``from_pretrained`` loads and the Hub accepts.

Models (``base``, ``merged``, ``quantized``) become sharded safetensors with their index, config,
generation config, tokenizer and other side files; adapters become a PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``) as PEFT and vLLM load it. Both get a
model card (``README.md``). The export service adds ``adaptr-manifest.json``.

Registered through the ``adaptr`` entry-point group like any third-party plugin. Heavy imports
happen inside ``export`` so listing plugins stays cheap.
"""

from __future__ import annotations

from adaptr import hookimpl
from adaptr.interfaces import AdapterManifest, ExportRequest, ParamDef

MAX_SHARD_SIZE = ParamDef(
    "max_shard_size",
    str,
    "5GB",
    "Largest weight shard, e.g. 5GB or 500MB (decimal units, as huggingface_hub); models only.",
)


class HfExporter:
    """A Hugging Face folder: sharded safetensors + index + config + tokenizer, or a PEFT adapter."""

    name = "hf"
    description = (
        "Hugging Face folder: sharded safetensors, index, config, generation config, tokenizer and a "
        "model card (models), or a PEFT adapter folder (adapters)."
    )
    kinds = ("base", "merged", "quantized", "adapter")
    single_file = False
    params = (MAX_SHARD_SIZE,)

    def export(self, request: ExportRequest) -> list[str]:
        from .card import write_card
        from .folder import export_adapter, export_model

        if isinstance(request.manifest, AdapterManifest):
            written = export_adapter(request)
        else:
            max_shard_size = str(request.options.get("max_shard_size", MAX_SHARD_SIZE.default))
            written = export_model(request, max_shard_size)
        return sorted({*written, write_card(request)})


@hookimpl
def register_exporters(register) -> None:
    register(HfExporter())
