"""The export service: an artifact through an exporter plugin into a file or folder outside the store.

Export never changes the catalog. The exporter writes into a staging folder beside the
output (same filesystem), every file is fsynced, and only then is the result renamed into
place; an existing output is replaced only with ``force``. A failure, a full disk or Ctrl-C
leaves the output path as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from adaptr.errors import AdaptrError, InvalidInputError, OperationError
from adaptr.interfaces import AdapterManifest, ExportRequest, ModelManifest
from adaptr.plugins import get_host, get_registry
from adaptr.services.catalog import Catalog
from adaptr.specs import ExportSpec, validate_spec


def export(spec: ExportSpec | dict[str, Any], *, catalog: Catalog | None = None) -> dict[str, Any]:
    """Export ``spec.input`` as ``spec.format`` to ``spec.out``; return what was written, with hashes."""
    from adaptr import engine
    from adaptr.io.files import ensure_space, fsync_dir, sha256_file

    if isinstance(spec, dict):
        spec = validate_spec(ExportSpec, spec, source="export options")
    catalog = catalog or Catalog()
    registry = get_registry("exporter")
    exporter = registry.get(spec.format)
    plugin = registry.plugin_of(spec.format)
    options = engine.resolve_params(exporter, spec.exporter_args(), "exporter")

    with catalog.session() as s:
        art = catalog.resolve(s, spec.input)
        ref = f"{art.name}@{art.version}"
        if art.kind not in exporter.kinds:
            raise InvalidInputError(
                f"{ref} is a {art.kind}; the {spec.format} exporter takes {', '.join(exporter.kinds)}"
                + ("; export the float model it was quantized from" if art.kind == "quantized" else "")
            )
        shown = catalog.to_json(s, art)
        manifest: ModelManifest | AdapterManifest = (
            AdapterManifest.from_dict(art.manifest)
            if art.kind == "adapter"
            else ModelManifest.from_dict(art.manifest)
        )
        base_path = base_manifest = None
        if art.kind == "adapter" and art.base_id:
            from adaptr.catalog.models import Artifact

            base = s.get(Artifact, art.base_id)
            base_path, base_manifest = Path(base.path), ModelManifest.from_dict(base.manifest)

    out = Path(spec.out).expanduser().absolute()
    if out.exists() or out.is_symlink():
        if not spec.force:
            raise InvalidInputError(
                f"{out} already exists; choose another --out or pass --force to replace it"
            )
        if exporter.single_file and out.is_dir():
            raise InvalidInputError(f"{out} is a folder; the {spec.format} exporter writes one file there")
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(
        out.parent, int(shown["size_bytes"] * 1.05) + (1 << 20), f"the {spec.format} export of {ref}"
    )

    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.adaptr-", dir=out.parent))
    try:
        with catalog.progress.task(f"exporting {ref} as {spec.format}", shown["size_bytes"]) as advance:
            request = ExportRequest(
                artifact=shown,
                manifest=manifest,
                source=Path(shown["path"]),
                dest=staging,
                filename=out.name,
                options=options,
                base_source=base_path,
                base_manifest=base_manifest,
                progress=advance,
            )
            try:
                written = exporter.export(request)
            except (AdaptrError, OSError):
                raise
            except Exception as e:  # a plugin's bug: one line naming it, not a traceback
                raise OperationError(
                    f"exporter {spec.format!r} ({plugin}) failed on {ref}: {e}; nothing was written"
                ) from e
        files = _sync(staging, written, plugin)
        if exporter.single_file:
            if written != [out.name]:
                raise OperationError(
                    f"exporter {spec.format!r} wrote {written} instead of one file {out.name!r}; "
                    "report this to the plugin's authors"
                )
            os.replace(staging / out.name, out)  # replaces an old file atomically (--force)
            results = [_entry(out, out.name, sha256_file)]
        else:
            _replace_folder(staging, out)
            results = [_entry(out / rel, rel, sha256_file) for rel in files]
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return {
        "artifact": ref,
        "content_hash": shown["content_hash"],
        "format": spec.format,
        "options": options,
        "plugin": plugin,
        "plugin_version": get_host().plugin_version(plugin),
        "out": str(out),
        "files": results,
        "size_bytes": sum(f["size"] for f in results),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _sync(staging: Path, written: list[str], plugin: str) -> list[str]:
    """fsync every file the exporter reports, and refuse paths outside the staging folder."""
    from adaptr.io.files import fsync_dir

    files = []
    for rel in written:
        path = (staging / rel).resolve()
        if staging.resolve() not in path.parents or not path.is_file():
            raise OperationError(
                f"exporter plugin {plugin!r} reported {rel!r}, which is not a file it wrote; "
                "report this to the plugin's authors"
            )
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files.append(path.relative_to(staging.resolve()).as_posix())
    for folder in {(staging / rel).parent for rel in files} | {staging}:
        fsync_dir(folder)
    return sorted(files)


def _replace_folder(staging: Path, out: Path) -> None:
    """Swap the staged folder in; an old output (--force) moves aside first and goes last."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.adaptr-old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _entry(path: Path, rel: str, sha256_file: Any) -> dict[str, Any]:
    return {"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)}
