"""Catalog reads (artifacts, bases, adapters, lineage, files) and removal."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse

from adaptr.api import models
from adaptr.api.auth import require
from adaptr.api.errors import ERRORS, PathRefusedError
from adaptr.errors import NotFoundError
from adaptr.services import query
from adaptr.services.catalog import Catalog

router = APIRouter(tags=["catalog"], responses={k: ERRORS[k] for k in (401, 403, 404, 422)})
read = [Depends(require("read"))]

NAME_DOC = "NAME (its latest version) or NAME@N"


def _filters(
    base: str | None = Query(None, description="Only artifacts built on this base (NAME or NAME@N)."),
    tag: str | None = Query(None, max_length=200, description="Only artifacts with this tag."),
    rank: int | None = Query(None, ge=0, le=2**31 - 1, description="Only adapters of this LoRA rank."),
    target_module: str | None = Query(None, max_length=200, description="Only adapters targeting it."),
    name: str | None = Query(None, max_length=200, description="Substring of the name."),
    created_after: datetime | None = Query(None, description="ISO 8601 time (UTC when no zone)."),
    created_before: datetime | None = Query(None, description="ISO 8601 time (UTC when no zone)."),
) -> query.Filters:
    return query.Filters(
        base=base,
        tag=tag,
        rank=rank,
        target_module=target_module,
        name=name,
        created_after=created_after,
        created_before=created_before,
    )


class Paging:
    def __init__(
        self,
        sort: Literal["name", "created_at", "size_bytes"] = Query("name"),
        order: Literal["asc", "desc"] = Query("asc"),
        limit: int = Query(50, ge=1, le=500),
        cursor: str | None = Query(None, max_length=1000, description="next_cursor of the previous page."),
    ) -> None:
        self.sort, self.order, self.limit, self.cursor = sort, order, limit, cursor


def _page(f: query.Filters, p: Paging) -> dict[str, Any]:
    return query.query(Catalog(), f, sort=p.sort, order=p.order, limit=p.limit, cursor=p.cursor)


@router.get("/artifacts", response_model=models.ArtifactPage, dependencies=read)
def list_artifacts(
    kind: str | None = Query(
        None, max_length=32, description="base, adapter, merged, quantized or exported."
    ),
    f: query.Filters = Depends(_filters),
    p: Paging = Depends(),
) -> dict[str, Any]:
    """Every artifact version, filtered, sorted and paged (keyset cursor)."""
    f.kind = kind
    return _page(f, p)


@router.get("/bases", response_model=models.ArtifactPage, dependencies=read)
def list_bases(f: query.Filters = Depends(_filters), p: Paging = Depends()) -> dict[str, Any]:
    """Base models, filtered, sorted and paged."""
    f.kind = "base"
    return _page(f, p)


@router.get("/adapters", response_model=models.ArtifactPage, dependencies=read)
def list_adapters(f: query.Filters = Depends(_filters), p: Paging = Depends()) -> dict[str, Any]:
    """Adapters, filtered, sorted and paged."""
    f.kind = "adapter"
    return _page(f, p)


def _show(name: str, kind: str | None = None) -> dict[str, Any]:
    a = Catalog().show(name)
    if kind and a["kind"] != kind:
        raise NotFoundError(f"{a['ref']} is a {a['kind']}, not a {kind}; see GET /v1/artifacts/{a['ref']}")
    return a


@router.get("/artifacts/{name}", response_model=models.Artifact, dependencies=read)
def get_artifact(name: str) -> dict[str, Any]:
    """One artifact with its files and hashes: the body of `adaptr show --json`."""
    return _show(name)


@router.get("/bases/{name}", response_model=models.Artifact, dependencies=read)
def get_base(name: str) -> dict[str, Any]:
    """One base model (404 when NAME is another kind)."""
    return _show(name, "base")


@router.get("/adapters/{name}", response_model=models.Artifact, dependencies=read)
def get_adapter(name: str) -> dict[str, Any]:
    """One adapter (404 when NAME is another kind)."""
    return _show(name, "adapter")


@router.get("/artifacts/{name}/lineage", response_model=models.Lineage, dependencies=read)
def get_lineage(
    name: str,
    direction: Literal["up", "down", "both"] = Query("both", description="Ancestors, descendants or both."),
    depth: int | None = Query(None, ge=1, le=1000, description="At most this many edges from NAME."),
) -> dict[str, Any]:
    """The lineage graph of `adaptr lineage --json`: root, nodes, edges."""
    return query.lineage(Catalog(), name, direction=direction, depth=depth)


@router.get(
    "/artifacts/{name}/files/{path:path}",
    dependencies=read,
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The file; `X-Content-SHA256` carries its SHA-256. Range requests answer 206.",
        },
        206: {"content": {"application/octet-stream": {}}, "description": "The requested byte range."},
        416: {"description": "Range not satisfiable."},
    },
)
def download(name: str, path: str) -> FileResponse:
    """Stream one recorded file of an artifact; only its recorded files, never a path outside it."""
    a = Catalog().show(name)
    entry = next((f for f in a["files"] if f["path"] == path), None)
    if entry is None:
        raise NotFoundError(f"{a['ref']} has no file {path!r}; see GET /v1/artifacts/{a['ref']}")
    root = Path(a["path"]).resolve()
    full = (root / entry["path"]).resolve()
    if not full.is_relative_to(root) or not full.is_file():
        raise PathRefusedError(f"{a['ref']}: {path!r} leads outside the artifact's folder; refused")
    return FileResponse(
        full,
        media_type="application/octet-stream",
        filename=Path(path).name,
        headers={"X-Content-SHA256": entry["sha256"], "ETag": f'"{entry["sha256"]}"'},
    )


@router.delete(
    "/artifacts/{name}",
    response_model=models.Removed,
    dependencies=[Depends(require("admin"))],
    responses={409: ERRORS[409]},
)
def delete_artifact(
    name: str, force: bool = Query(False, description="Also remove every artifact derived from it.")
) -> dict[str, Any]:
    """`adaptr rm`: NAME removes every version, NAME@N one (needs an admin token)."""
    return {"removed": Catalog().rm(name, force=force)}
