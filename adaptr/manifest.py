"""Export manifests: what ``adaptr export`` wrote, with hashes and lineage, and checking a copy against it.

Every export carries one: ``adaptr-manifest.json`` inside a folder export, or
``<file>.adaptr-manifest.json`` beside a single-file export (GGUF). It names the artifact (ref,
kind, content hash), the format and resolved options, the exporter plugin and adaptr versions,
every exported file's relpath, size and sha256, and the artifact's full ancestor chain as the
catalog recorded it (every edge with its operation, parameters, plugin, version and seed).

The manifest is deterministic: exporting the same artifact with the same options and plugin
versions writes the same manifest, so it can be committed, diffed and compared.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError, VerificationError

MANIFEST_NAME = "adaptr-manifest.json"
SIDE_SUFFIX = ".adaptr-manifest.json"
SCHEMA = "adaptr-export-manifest/1"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-export it with `adaptr export ... --force`"


def manifest_path(out: Path, single_file: bool) -> Path:
    """Where the manifest of an export at ``out`` lives."""
    return out.with_name(out.name + SIDE_SUFFIX) if single_file else out / MANIFEST_NAME


# --------------------------------------------------------------------------------------------- building


def ancestry(lineage: dict[str, Any], root: str) -> dict[str, Any]:
    """The part of ``Catalog.lineage(root)`` that leads to ``root``: its ancestors and their edges.

    Descendants are left out, so the chain of an export never changes once written. Nodes and
    edges keep the catalog's order (oldest first).
    """
    parents: dict[str, list[str]] = {}
    for edge in lineage["edges"]:
        parents.setdefault(edge["child"], []).append(edge["parent"])
    keep: set[str] = set()
    todo = [root]
    while todo:
        ref = todo.pop()
        if ref not in keep:
            keep.add(ref)
            todo.extend(parents.get(ref, []))
    nodes = []
    for node in lineage["nodes"]:
        if node["ref"] in keep:
            slim = {k: node.get(k) for k in ("ref", "name", "version", "kind", "content_hash", "base")}
            if source := (node.get("metadata") or {}).get("source"):
                slim["source"] = source
            nodes.append(slim)
    return {"nodes": nodes, "edges": [e for e in lineage["edges"] if e["child"] in keep]}


def build(
    *,
    artifact: dict[str, Any],
    chain: dict[str, Any],
    format: str,
    options: dict[str, Any],
    plugin: str,
    plugin_version: str | None,
    files: list[dict[str, Any]],
    single_file: bool,
) -> dict[str, Any]:
    """The manifest of one export; ``files`` are ``{"path", "size", "sha256"}`` of the exported files."""
    from adaptr import __version__

    return {
        "schema": SCHEMA,
        "artifact": {
            "ref": artifact["ref"],
            "name": artifact["name"],
            "version": artifact["version"],
            "kind": artifact["kind"],
            "content_hash": artifact["content_hash"],
            "size_bytes": artifact.get("size_bytes"),
            "base": artifact.get("base"),
            "tags": list(artifact.get("tags") or []),
        },
        "format": format,
        "options": dict(options),
        "layout": "file" if single_file else "folder",
        "exporter": {"plugin": plugin, "version": plugin_version},
        "adaptr_version": __version__,
        "files": sorted(files, key=lambda f: f["path"]),
        "lineage": chain,
    }


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def write(path: Path, manifest: dict[str, Any]) -> None:
    """Write and fsync (the caller renames it into place and syncs the folder)."""
    with open(path, "wb") as f:
        f.write(dumps(manifest))
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------- reading


def _safe_rel(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def read(path: Path) -> dict[str, Any]:
    """A manifest, validated; a missing or damaged one is a one-line ``InvalidInputError`` (exit 2)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(
            f"{path}: no such manifest; only folders and files written by `adaptr export` can be verified"
        ) from None
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None

    def bad(reason: str) -> InvalidInputError:
        return InvalidInputError(f"{path}: not a valid adaptr export manifest ({reason}); {_FIX}")

    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if not str(data.get("schema", "")).startswith("adaptr-export-manifest/"):
        raise bad(f"schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    if data["schema"] != SCHEMA:
        raise InvalidInputError(
            f"{path}: manifest schema {data['schema']!r} is newer than this adaptr understands ({SCHEMA}); "
            "upgrade adaptr"
        )
    art = data.get("artifact")
    if not isinstance(art, dict) or not isinstance(art.get("content_hash"), str):
        raise bad("no artifact content_hash")
    if data.get("layout") not in ("file", "folder"):
        raise bad(f"layout is {data.get('layout')!r}, expected 'file' or 'folder'")
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise bad("no files list")
    seen: set[str] = set()
    for entry in files:
        if not (
            isinstance(entry, dict)
            and _safe_rel(entry.get("path"))
            and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            raise bad(f"file entry {entry!r} needs a relative path, a size and a sha256")
        if entry["path"] in seen or entry["path"] == MANIFEST_NAME:
            raise bad(f"file {entry['path']!r} is listed twice or names the manifest")
        seen.add(entry["path"])
    if data["layout"] == "file" and len(files) != 1:
        raise bad("a single-file export lists exactly one file")
    return data


def locate(path: str | Path) -> tuple[Path, Path, bool]:
    """``(manifest, export root, single_file)`` for an export folder, an exported file or its side manifest."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        return p / MANIFEST_NAME, p, False
    if p.name.endswith(SIDE_SUFFIX) and p.name != SIDE_SUFFIX:
        return p, p.with_name(p.name.removesuffix(SIDE_SUFFIX)), True
    if p.exists() or p.with_name(p.name + SIDE_SUFFIX).exists():
        return p.with_name(p.name + SIDE_SUFFIX), p, True
    raise InvalidInputError(f"{p}: no such file or directory")


# --------------------------------------------------------------------------------------------- checking


def _folder_files(root: Path) -> list[str]:
    """Files under an export folder (hidden entries such as a hub client's .cache are skipped)."""
    out = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            p = Path(folder) / name
            if not name.startswith(".") and p.is_file():
                out.append(p.relative_to(root).as_posix())
    return out


def compare(
    manifest: dict[str, Any], root: Path, *, single_file: bool, progress: Any = None
) -> dict[str, list[str]]:
    """Missing, changed and extra files of the export at ``root`` against ``manifest``.

    A single-file export is the file at ``root`` (whatever it is called now, so a file renamed
    together with its side manifest still verifies); a folder may hold nothing the manifest does
    not list. Sizes are compared first, so a truncated file is caught without hashing it.
    """
    from adaptr.io.files import sha256_file

    missing: list[str] = []
    changed: list[str] = []
    extra: list[str] = []
    for entry in manifest["files"]:
        path = root if single_file else root / entry["path"]
        shown = path.name if single_file else entry["path"]
        if not path.is_file():
            missing.append(shown)
        elif path.stat().st_size != entry["size"] or sha256_file(path, progress=progress) != entry["sha256"]:
            changed.append(shown)
    if not single_file:
        listed = {e["path"] for e in manifest["files"]} | {MANIFEST_NAME}
        extra = [rel for rel in _folder_files(root) if rel not in listed]
    return {"missing": missing, "changed": changed, "extra": extra}


def describe(problems: dict[str, list[str]]) -> str:
    """``missing a, b; changed c; extra d`` — the one line a failed check prints."""
    parts = [f"{what} {', '.join(files)}" for what, files in problems.items() if files]
    return "; ".join(parts)


def verify(path: str | Path, *, progress: Any = None) -> dict[str, Any]:
    """Check an export against its manifest; the report says ``ok`` and lists what differs.

    Raises ``InvalidInputError`` (exit 2) when there is no readable manifest; a mismatch is
    reported, not raised (``check`` raises it).
    """
    mpath, root, single_file = locate(path)
    manifest = read(mpath)
    if (manifest["layout"] == "file") != single_file:
        what = "a single file" if manifest["layout"] == "file" else "a folder"
        raise InvalidInputError(f"{mpath}: describes {what}, but {root} is not one")
    problems = compare(manifest, root, single_file=single_file, progress=progress)
    return {
        "ok": not any(problems.values()),
        "path": str(root),
        "manifest": str(mpath),
        "artifact": manifest["artifact"].get("ref"),
        "content_hash": manifest["artifact"]["content_hash"],
        "format": manifest.get("format"),
        "files": len(manifest["files"]),
        "size_bytes": sum(f["size"] for f in manifest["files"]),
        **problems,
    }


def check(path: str | Path, *, progress: Any = None) -> dict[str, Any]:
    """``verify``, raising ``VerificationError`` (exit 3) that names every missing, changed or extra file."""
    report = verify(path, progress=progress)
    if not report["ok"]:
        raise VerificationError(failure_message(report))
    return report


def failure_message(report: dict[str, Any]) -> str:
    problems = {k: report[k] for k in ("missing", "changed", "extra")}
    return f"{report['path']} does not match its manifest ({report['manifest']}): {describe(problems)}"
