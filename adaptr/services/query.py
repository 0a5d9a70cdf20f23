"""Catalog queries for front ends that page: filters, sorting and keyset cursors.

``Catalog.ls`` lists everything at once (the CLI prints it all); the REST API pages through the
same rows, as the same JSON bodies (``Catalog.to_json``), with ``query``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, and_, cast, or_
from sqlalchemy.orm import defer
from sqlmodel import col, select

from adaptr.catalog.models import Artifact, Tag
from adaptr.errors import InvalidInputError
from adaptr.services.catalog import Catalog

SORT_KEYS = ("name", "created_at", "size_bytes")


@dataclass
class Filters:
    kind: str | None = None
    base: str | None = None
    tag: str | None = None
    rank: int | None = None
    target_module: str | None = None
    name: str | None = None  # substring of the name
    created_after: datetime | None = None
    created_before: datetime | None = None


def _column(sort: str) -> Any:
    return {"name": Artifact.name, "created_at": Artifact.created_at, "size_bytes": Artifact.size_bytes}[sort]


def _encode(sort: str, order: str, row: Artifact) -> str:
    value: Any = getattr(row, sort)
    if isinstance(value, datetime):
        value = (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    raw = json.dumps([sort, order, value, row.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str, sort: str, order: str) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        c_sort, c_order, value, last_id = json.loads(raw)
        if (c_sort, c_order) != (sort, order) or not isinstance(last_id, int):
            raise ValueError("cursor of another ordering")
        if sort == "created_at":
            value = datetime.fromisoformat(value).astimezone(UTC)
        elif not isinstance(value, int if sort == "size_bytes" else str):
            raise ValueError("bad value")
        return value, last_id
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise InvalidInputError(
            f"cursor: not a cursor of this listing ({e}); pass next_cursor from the previous page "
            "with the same sort and order"
        ) from None


def _targets(meta: dict[str, Any]) -> set[str]:
    t = meta.get("target_modules")
    if isinstance(t, str):
        return {t}
    return {str(x) for x in t or []}


def query(
    catalog: Catalog,
    filters: Filters,
    *,
    sort: str = "name",
    order: str = "asc",
    limit: int = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """One page of artifacts (``Catalog.to_json`` without files) and the cursor of the next."""
    if sort not in SORT_KEYS:
        raise InvalidInputError(f"sort: must be one of {', '.join(SORT_KEYS)}")
    if order not in ("asc", "desc"):
        raise InvalidInputError("order: must be asc or desc")
    key = _column(sort)
    after = _decode(cursor, sort, order) if cursor else None
    with catalog.session() as s:
        q = select(Artifact).options(defer(col(Artifact.manifest)))  # a listing shows no manifest
        f = filters
        if f.kind:
            q = q.where(Artifact.kind == f.kind)
        if f.rank is not None:
            q = q.where(Artifact.rank == f.rank)
        if f.tag:
            q = q.where(col(Artifact.id).in_(select(Tag.artifact_id).where(Tag.tag == f.tag)))
        if f.base:
            ids = [a.id for a in catalog._versions(s, f.base)]
            q = q.where(col(Artifact.base_id).in_(ids))
        if f.name:
            q = q.where(col(Artifact.name).contains(f.name, autoescape=True))
        if f.created_after:
            q = q.where(col(Artifact.created_at) > f.created_after.astimezone(UTC))
        if f.created_before:
            q = q.where(col(Artifact.created_at) < f.created_before.astimezone(UTC))
        if f.target_module:  # a coarse prefilter in SQL; the exact test below
            q = q.where(cast(Artifact.meta, String).contains(f'"{f.target_module}"', autoescape=True))
        desc = order == "desc"
        q = q.order_by(
            col(key).desc() if desc else col(key), col(Artifact.id).desc() if desc else Artifact.id
        )
        rows: list[Artifact] = []
        last = after
        while len(rows) <= limit:
            page = q
            if last is not None:
                value, last_id = last
                beyond = col(key) < value if desc else col(key) > value
                tie = col(Artifact.id) < last_id if desc else col(Artifact.id) > last_id
                page = q.where(or_(beyond, and_(col(key) == value, tie)))
            batch = s.exec(page.limit(limit + 1)).all()
            if not batch:
                break
            for a in batch:
                if f.target_module and f.target_module not in _targets(a.meta or {}):
                    continue
                rows.append(a)
            last = (getattr(batch[-1], sort), batch[-1].id)
            if len(batch) <= limit:
                break
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "items": catalog.to_json_many(s, rows),
            "next_cursor": _encode(sort, order, rows[-1]) if more and rows else None,
        }


def lineage(
    catalog: Catalog, ref: str, *, direction: str = "both", depth: int | None = None
) -> dict[str, Any]:
    """``Catalog.lineage`` (the shape of ``adaptr lineage --json``) cut to ancestors (``up``),
    descendants (``down``) or both, at most ``depth`` edges away from the root."""
    if direction not in ("up", "down", "both"):
        raise InvalidInputError("direction: must be up, down or both")
    graph = catalog.lineage(ref)
    if direction == "both" and depth is None:
        return graph
    keep = {graph["root"]}
    edges: list[dict[str, Any]] = []
    for up in (True, False):
        if direction == ("down" if up else "up"):
            continue
        frontier, seen, hops = {graph["root"]}, {graph["root"]}, 0
        while frontier and (depth is None or hops < depth):
            hops += 1
            step = [e for e in graph["edges"] if (e["child"] if up else e["parent"]) in frontier]
            edges += [e for e in step if e not in edges]
            nxt = {e["parent"] if up else e["child"] for e in step} - seen
            seen |= nxt
            frontier = nxt
        keep |= seen
    order = {id(e): i for i, e in enumerate(graph["edges"])}
    return {
        "root": graph["root"],
        "nodes": [n for n in graph["nodes"] if n["ref"] in keep],
        "edges": sorted(edges, key=lambda e: order[id(e)]),
    }
