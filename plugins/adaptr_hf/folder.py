"""The files of a Hugging Face export: re-sharded weights, index and side files, or a PEFT adapter folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError
from adaptr.interfaces import ExportRequest

# Written by the exporter (README.md) or the export service (the manifest): never copied from the source.
OWN_FILES = {"README.md", "adaptr-manifest.json"}
# Weights in other layouts (.bin, consolidated.safetensors, GGUF, ...): the export carries one copy.
_OTHER_WEIGHTS = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|onnx)(\.index\.json)?")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _advance(request: ExportRequest, n: int) -> None:
    if request.progress is not None:
        request.progress(n)


def _source_files(request: ExportRequest) -> list[str]:
    """The artifact's files as the catalog recorded them (a linked folder may hold more)."""
    recorded = request.artifact.get("files")
    if recorded:
        return [f["path"] for f in recorded]
    from adaptr.store import list_files

    source = Path(request.source)
    return [p.relative_to(source).as_posix() for p in list_files(source)]


def copy_side_files(request: ExportRequest, skip: set[str]) -> list[str]:
    """Config, generation config, tokenizer and any other non-weight file, byte for byte."""
    source, dest = Path(request.source), Path(request.dest)
    written = []
    for rel in _source_files(request):
        name = Path(rel).name
        if rel in skip or rel in OWN_FILES or _OTHER_WEIGHTS.fullmatch(name):
            continue
        src = source / rel
        if not src.is_file():
            raise InvalidInputError(
                f"{request.artifact.get('ref')}: {src} is missing; run `adaptr verify` on the artifact"
            )
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / rel)
        _advance(request, src.stat().st_size)
        written.append(rel)
    return written


def _same_plan(weights: Any, writer: Any) -> bool:
    """True when the source files already are the planned shards (same names, same tensors in order)
    and carry transformers' ``{"format": "pt"}`` metadata: then they can be copied as they are."""
    from adaptr.io.safetensors_io import read_header

    files = sorted({info.file for info in weights.tensors.values()}, key=lambda p: p.name)
    if [p.name for p in files] != sorted(writer.shard_names):
        return False
    if any(info.file.name != writer.weight_map[name] for name, info in weights.tensors.items()):
        return False
    return all((read_header(p).metadata or {}).get("format") == "pt" for p in files)


def export_model(request: ExportRequest, max_shard_size: str) -> list[str]:
    """Weights as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index, and side files."""
    from adaptr.io.files import atomic_write_json
    from adaptr.io.safetensors_io import StreamingShardWriter, open_weights, parse_size

    where = str(request.artifact.get("ref") or request.source)
    if parse_size(max_shard_size) <= 0:
        raise InvalidInputError(f"max_shard_size must be larger than 0, got {max_shard_size!r}")
    source, dest = Path(request.source), Path(request.dest)
    if not (source / "config.json").is_file():
        raise InvalidInputError(
            f"{where}: {source} has no config.json; a Hugging Face export needs the model's config"
        )
    weights = open_weights(source)
    specs = [(name, info.dtype, info.shape) for name, info in weights.tensors.items()]
    writer = StreamingShardWriter(
        dest,
        specs,
        max_shard_size=max_shard_size,
        metadata={"format": "pt"},
        progress=request.progress,
        check_space=False,  # the export service checked the space for the whole export
    )
    if _same_plan(weights, writer):
        for shard in writer.shard_names:
            shutil.copyfile(source / shard, dest / shard)
            _advance(request, (source / shard).stat().st_size)
        written = list(writer.shard_names)
        if len(written) > 1:
            index = {
                "metadata": {"total_parameters": writer.total_parameters, "total_size": writer.total_size},
                "weight_map": writer.weight_map,
            }
            atomic_write_json(dest / "model.safetensors.index.json", index)
            written.append("model.safetensors.index.json")
    else:
        with writer, weights.reader() as reader:
            for name in writer.order:  # one tensor at a time: memory stays one tensor, not a shard
                writer.write(name, reader.get(name))
        written = [p.name for p in writer.files]
        if writer.index_path is not None:
            written.append(writer.index_path.name)
    return written + copy_side_files(request, set(written))


def export_adapter(request: ExportRequest) -> list[str]:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (+ any side files), as PEFT saves them."""
    source, dest = Path(request.source), Path(request.dest)
    where = str(request.artifact.get("ref") or request.source)
    config = source / ADAPTER_CONFIG
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{where}: cannot read {config} ({exc}); re-add the adapter") from None
    if (source / ADAPTER_WEIGHTS).is_file():
        shutil.copyfile(source / ADAPTER_WEIGHTS, dest / ADAPTER_WEIGHTS)
        _advance(request, (source / ADAPTER_WEIGHTS).stat().st_size)
    else:  # a legacy adapter_model.bin: PEFT and vLLM prefer safetensors
        from safetensors.torch import save_file

        from adaptr.io.safetensors_io import load_torch_bin

        legacy = source / request.manifest.weights_file  # type: ignore[union-attr]
        state = {k: v.detach().contiguous().clone() for k, v in load_torch_bin(legacy).items()}
        save_file(state, str(dest / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.copyfile(config, dest / ADAPTER_CONFIG)
    written = [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    return written + copy_side_files(request, set(written))
