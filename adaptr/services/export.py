"""The export service: an artifact through an exporter plugin into a file or folder outside the store.

Export never changes the catalog. The exporter writes into a staging folder beside the
output (same filesystem), every file is fsynced, and only then is the result renamed into
place; an existing output is replaced only with ``force``. A failure, a full disk or Ctrl-C
leaves the output path as it was.

Every export carries a manifest (:mod:`adaptr.manifest`): ``adaptr-manifest.json`` in a folder,
``<file>.adaptr-manifest.json`` beside a single file. An ``out`` that already holds this very
export (same artifact content hash, format, options and exporter version, every file unchanged)
is reused: nothing is written and the result says ``"reused": true``. Anything else at ``out``
is refused without ``force``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from adaptr.errors import AdaptrError, InvalidInputError, OperationError
from adaptr.interfaces import AdapterManifest, ExportRequest, ModelManifest
from adaptr.manifest import MANIFEST_NAME, ancestry, describe, manifest_path
from adaptr.manifest import build as build_manifest
from adaptr.manifest import compare as compare_export
from adaptr.manifest import read as read_manifest
from adaptr.manifest import write as write_manifest
from adaptr.plugins import get_host, get_registry
from adaptr.services.catalog import Catalog
from adaptr.specs import ExportSpec, validate_spec


def export(
    spec: ExportSpec | dict[str, Any], *, catalog: Catalog | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """Export ``spec.input`` as ``spec.format`` to ``spec.out``; return what was written, with hashes.

    ``dry_run`` checks everything (exporter, options, artifact kind, the state of ``out``) and says
    whether the export would be reused, without writing.
    """
    from adaptr import plan as planning
    from adaptr.io.files import ensure_space, fsync_dir, sha256_file

    if isinstance(spec, dict):
        spec = validate_spec(ExportSpec, spec, source="export options")
    catalog = catalog or Catalog()
    registry = get_registry("exporter")
    exporter = registry.get(spec.format)
    plugin = registry.plugin_of(spec.format)
    options = planning.resolve_params(exporter, spec.exporter_args(), "exporter")

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
    mpath = manifest_path(out, exporter.single_file)
    started = time.perf_counter()
    plugin_version = get_host().plugin_version(plugin)
    result = {
        "artifact": ref,
        "content_hash": shown["content_hash"],
        "format": spec.format,
        "options": options,
        "plugin": plugin,
        "plugin_version": plugin_version,
        "out": str(out),
        "manifest": str(mpath),
    }
    if out.exists() or out.is_symlink():
        if exporter.single_file and out.is_dir():
            raise InvalidInputError(f"{out} is a folder; the {spec.format} exporter writes one file there")
        if not spec.force:
            held = _held(out, mpath, exporter.single_file, result)
            if isinstance(held, dict):  # this very export is already there: nothing to write
                files = held["files"]
                return {
                    **result,
                    **({"dry_run": True} if dry_run else {}),
                    "files": files,
                    "size_bytes": sum(f["size"] for f in files),
                    "reused": True,
                    "seconds": round(time.perf_counter() - started, 3),
                }
            raise InvalidInputError(
                f"{out} already exists; choose another --out or pass --force to replace it ({held})"
            )
    if dry_run:
        return {**result, "dry_run": True, "reused": False}
    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(
        out.parent, int(shown["size_bytes"] * 1.05) + (1 << 20), f"the {spec.format} export of {ref}"
    )

    chain = ancestry(catalog.lineage(ref), ref)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.adaptr-", dir=out.parent))
    try:
        with catalog.progress.task(f"exporting {ref} as {spec.format}", shown["size_bytes"]) as advance:
            request = ExportRequest(
                artifact={**shown, "lineage": chain},
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
        if exporter.single_file and written != [out.name]:
            raise OperationError(
                f"exporter {spec.format!r} wrote {written} instead of one file {out.name!r}; "
                "report this to the plugin's authors"
            )
        if MANIFEST_NAME in files:
            raise OperationError(
                f"exporter {spec.format!r} wrote its own {MANIFEST_NAME}; the export service writes it "
                "(report this to the plugin's authors)"
            )
        results = [_entry(staging / rel, rel, sha256_file) for rel in files]
        body = build_manifest(
            artifact=shown,
            chain=chain,
            format=spec.format,
            options=options,
            plugin=plugin,
            plugin_version=plugin_version,
            files=results,
            single_file=exporter.single_file,
        )
        staged_manifest = staging / (mpath.name if exporter.single_file else MANIFEST_NAME)
        write_manifest(staged_manifest, body)
        fsync_dir(staging)
        if exporter.single_file:
            os.replace(staging / out.name, out)  # replaces an old file atomically (--force)
            os.replace(staged_manifest, mpath)  # a crash in between leaves a mismatch: refused, not reused
        else:
            _replace_folder(staging, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    return {
        **result,
        "files": results,
        "size_bytes": sum(f["size"] for f in results),
        "reused": False,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _held(out: Path, mpath: Path, single_file: bool, wanted: dict[str, Any]) -> dict[str, Any] | str:
    """The manifest when ``out`` holds exactly the export ``wanted`` describes, else why not (one phrase).

    The same artifact (content hash), format, resolved options and exporter plugin version, and
    every listed file present and unchanged (sizes, then sha256), with nothing extra in a folder.
    """
    if not mpath.is_file():
        return "it has no adaptr manifest"
    try:
        held = read_manifest(mpath)
    except InvalidInputError:
        return f"its {mpath.name} is not a valid adaptr manifest"
    if (held["layout"] == "file") != single_file:
        return f"its manifest describes a {held['layout']} export"
    art = held["artifact"]
    if art.get("content_hash") != wanted["content_hash"]:
        return f"it holds an export of {art.get('ref') or art['content_hash'][:12]}"
    if held.get("format") != wanted["format"] or held.get("options") != json.loads(
        json.dumps(wanted["options"], default=str)
    ):
        opts = ", ".join(f"{k}={v}" for k, v in (held.get("options") or {}).items())
        return f"it holds an export as {held.get('format')} with other options ({opts})"
    exporter = held.get("exporter") or {}
    if exporter.get("plugin") != wanted["plugin"] or exporter.get("version") != wanted["plugin_version"]:
        return f"it was written by exporter plugin {exporter.get('plugin')} {exporter.get('version')}"
    problems = compare_export(held, out, single_file=single_file)
    if any(problems.values()):
        return f"its files no longer match its manifest: {describe(problems)}"
    return held


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
