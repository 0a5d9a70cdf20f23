"""Small third-party-style plugins for tests of the services around quantizers and exporters.

They go through the same registration door as real plugins, so the engine, the services and
the CLI are tested without depending on any one built-in format's numbers.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import torch

import adaptr
from adaptr.interfaces import ParamDef, PartSpec


class RowInt8:
    """Per-row absmax int8: a quantizer small enough to check by hand."""

    name = "rowint8"
    description = "test double: per-row absmax int8"
    params = (ParamDef("levels", float, 127.0, "largest code"),)

    def refuse(self, name, shape, dtype, params):
        return None if len(shape) == 2 else "not a 2-D weight"

    def layout(self, name, shape, dtype, params):
        module = name.removesuffix(".weight")
        return [PartSpec(name, "I8", tuple(shape)), PartSpec(f"{module}.row_scale", "F32", (shape[0],))]

    def quantize(self, name, tensor, params):
        module = name.removesuffix(".weight")
        scale = tensor.float().abs().amax(1).clamp_min(1e-12)
        codes = (tensor.float() * (params["levels"] / scale[:, None])).round().to(torch.int8)
        return {name: codes, f"{module}.row_scale": scale}

    def dequantize(self, name, parts, params, dtype):
        module = name.removesuffix(".weight")
        return (parts[name].float() * parts[f"{module}.row_scale"][:, None] / params["levels"]).to(dtype)

    def config(self, params, skipped, compute_dtype):
        return {"quant_method": "rowint8", "levels": params["levels"], "skip": skipped}


class WrongParts(RowInt8):
    """Returns fewer parts than its layout announced: a buggy plugin."""

    name = "wrongparts"

    def quantize(self, name, tensor, params):
        return {name: super().quantize(name, tensor, params)[name]}


class TextExporter:
    """Writes a JSON summary of a model as one file; ``fail_after`` simulates a crash or a full disk."""

    name = "summary"
    description = "test double: a JSON summary"
    kinds = ("base", "merged", "adapter")
    single_file = True
    params = (ParamDef("fail", str, "", "'', 'crash' or 'enospc'"),)

    def export(self, request):
        path = Path(request.dest) / request.filename
        body = {"ref": request.artifact["ref"], "tensors": sorted(request.manifest.tensors)}
        path.write_text(json.dumps(body))
        if request.options["fail"] == "crash":
            raise RuntimeError("exporter crashed half-way")
        if request.options["fail"] == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return [request.filename]


class FolderExporter(TextExporter):
    name = "summary-dir"
    single_file = False

    def export(self, request):
        (Path(request.dest) / "sub").mkdir()
        (Path(request.dest) / "sub" / "summary.json").write_text(json.dumps({"ref": request.artifact["ref"]}))
        (Path(request.dest) / "README.md").write_text("exported\n")
        return ["README.md", "sub/summary.json"]


class Doubles:
    @adaptr.hookimpl
    def register_quantizers(self, register):
        register(RowInt8())
        register(WrongParts())

    @adaptr.hookimpl
    def register_exporters(self, register):
        register(TextExporter())
        register(FolderExporter())


def install() -> None:
    """Register the doubles in this process's plugin host (the ``adaptr_home`` fixture resets it)."""
    from adaptr.plugins import get_host

    get_host().add(Doubles(), "doubles")
