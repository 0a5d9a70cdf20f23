"""Built-in pipeline step types: ``merge``, ``quantize`` and ``export``, each a thin door to its service.

Registered through the ``adaptr`` entry-point group (``steps``), exactly like a plugin's own
step types; the pipeline runner knows steps only through that registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptr import hookimpl
from adaptr.specs import ExportSpec, MergeSpec, QuantizeSpec


class MergeStep:
    name = "merge"
    description = "Merge adapters into their base (adaptr merge)."
    spec = MergeSpec
    refs = {"base": "base", "adapters": "adapter"}
    produces = True

    def run(self, spec: Any, *, catalog: Any, force: bool, dry_run: bool) -> dict[str, Any]:
        from adaptr.services.merge import merge

        return merge(spec, catalog=catalog, force=force, dry_run=dry_run)


class QuantizeStep:
    name = "quantize"
    description = "Quantize a base or merged model (adaptr quantize)."
    spec = QuantizeSpec
    refs = {"input": "artifact"}
    produces = True

    def run(self, spec: Any, *, catalog: Any, force: bool, dry_run: bool) -> dict[str, Any]:
        from adaptr.services.quantize import quantize

        return quantize(spec, catalog=catalog, force=force, dry_run=dry_run)


class ExportStep:
    name = "export"
    description = "Export an artifact to a file or folder (adaptr export)."
    spec = ExportSpec
    refs = {"input": "artifact"}
    produces = False

    def check(self, spec: Any, *, force: bool) -> str | None:
        """Refuse before anything runs an ``out`` that holds something no adaptr export wrote."""
        out = Path(spec.out).expanduser()
        if force or spec.force or not (out.exists() or out.is_symlink()):
            return None
        manifest = (
            out / "adaptr-manifest.json"
            if out.is_dir()
            else out.with_name(out.name + ".adaptr-manifest.json")
        )
        if manifest.is_file():
            return None  # the export decides: this very artifact is reused, anything else refused
        return f"{out} already exists and holds no adaptr export; choose another out or pass --force"

    def run(self, spec: Any, *, catalog: Any, force: bool, dry_run: bool) -> dict[str, Any]:
        from adaptr.services.export import export

        if force:
            spec = spec.model_copy(update={"force": True})
        return export(spec, catalog=catalog, dry_run=dry_run)


@hookimpl
def register_pipeline_steps(register) -> None:
    register(MergeStep())
    register(QuantizeStep())
    register(ExportStep())
