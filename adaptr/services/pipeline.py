"""The pipeline service: run a validated pipeline file step by step through the other services.

Each step is looked up by its recipe first, so an unchanged pipeline computes nothing. A step
that fails stops the run; what earlier steps registered stays registered and is reused by the
next run. Outputs of merge and quantize steps become new versions of their names when their
recipe changes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adaptr.errors import AdaptrError
from adaptr.pipeline import Pipeline, _relative_to, _values, load, resolve_ref, validate_body
from adaptr.services.catalog import Catalog


def run(
    path: str | Path | Pipeline,
    *,
    catalog: Catalog | None = None,
    force: bool = False,
    dry_run: bool = False,
    register_missing: bool = False,
) -> dict[str, Any]:
    """Run (or plan, with ``dry_run``) every step; return one JSON-able report."""
    started = time.perf_counter()
    pipe = path if isinstance(path, Pipeline) else load(path, force=force)
    catalog = catalog or Catalog()
    produced: dict[str, str | None] = {}
    results: list[dict[str, Any]] = []
    for step in pipe.steps:
        t0 = time.perf_counter()
        waiting = [n for n in step.needs if produced.get(n) is None]
        if dry_run and waiting:  # inputs not computed yet: nothing more can be known
            produced[step.id] = None
            results.append(_row(step, {"reused": False, "after": waiting}, t0, planned=True))
            continue
        body = dict(step.body)
        notes: list[str] = []
        base_ref = None
        try:
            for key, role in sorted(step.kind.refs.items(), key=lambda kv: kv[1] != "base"):
                for where, value in _values(step.body, key):
                    ref, note = resolve_ref(
                        pipe, step, where, value, role,
                        produced=produced, catalog=catalog, register_missing=register_missing,
                        dry_run=dry_run, base=base_ref,
                    )  # fmt: skip
                    if note:
                        notes.append(note)
                    if role == "base":
                        base_ref = ref
                    _put(body, where, ref if ref is not None else value)
            body = _relative_to(pipe, body)
            if "new_version" in step.kind.spec.model_fields and "new_version" not in body:
                body["new_version"] = True  # a changed recipe becomes the next version of the name
            spec = validate_body(pipe, step, body)
            if dry_run and any(n.startswith("would register") for n in notes):
                result = {"reused": False}
            else:
                result = step.kind.run(spec, catalog=catalog, force=force, dry_run=dry_run)
        except AdaptrError as e:
            if e.message.startswith(str(pipe.path)):
                raise
            raise type(e)(
                f"{pipe.path}:{step.line}: step {step.id!r} ({step.kind.name}) failed: {e.message}"
            ) from e
        produced[step.id] = (
            result.get("ref") if step.kind.produces and (result.get("reused") or not dry_run) else None
        )
        results.append(_row(step, {**result, "notes": notes}, t0, planned=dry_run))
    return {
        "pipeline": str(pipe.path),
        "dry_run": dry_run,
        "steps": results,
        "computed": sum(1 for r in results if not r["reused"]),
        "reused": sum(1 for r in results if r["reused"]),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _put(body: dict[str, Any], where: tuple[Any, ...], value: Any) -> None:
    if len(where) == 1:
        body[where[0]] = value
    else:
        body[where[0]] = list(body[where[0]])
        body[where[0]][where[1]] = value


def _row(step: Any, result: dict[str, Any], t0: float, *, planned: bool) -> dict[str, Any]:
    """One step of the report: what it did (or would do), to which artifact or path, how long."""
    row: dict[str, Any] = {
        "id": step.id,
        "type": step.kind.name,
        "reused": bool(result.get("reused")),
        "action": ("reuse" if result.get("reused") else "compute") if planned else (
            "reused" if result.get("reused") else "computed"
        ),
    }  # fmt: skip
    for key in ("ref", "content_hash", "recipe_hash", "out", "path", "after", "notes"):
        if result.get(key):
            row[key] = result[key]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row
