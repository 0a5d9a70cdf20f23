"""Merges, quantizations, exports and pipeline runs as jobs; job status and cancellation.

Bodies are the service spec models themselves (``MergeSpec``, ``QuantizeSpec``, ``ExportSpec``):
FastAPI validates them (422 naming the field), then the service validates the rest with
``dry_run=True`` before the job is queued, so a request that cannot run is refused at once. A
recipe already in the catalog answers 200 with a finished job holding the reused artifact.
A queued job is data (its kind, the stored request, options): the job worker process runs the
task of :mod:`adaptr.services.job_tasks` for its kind.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import APIRouter, Depends, Query, Request, Response

from adaptr.api import models
from adaptr.api.auth import require
from adaptr.api.errors import ERRORS, PathRefusedError
from adaptr.services.catalog import Catalog
from adaptr.services.jobs import JobRunner
from adaptr.settings import get_settings
from adaptr.specs import ExportSpec, MergeSpec, QuantizeSpec

router = APIRouter(tags=["jobs"], responses={k: ERRORS[k] for k in (401, 403, 404, 409, 422)})
write = [Depends(require("write"))]
ACCEPTED = {202: {"model": models.Job, "description": "Queued; poll GET /v1/jobs/{id}"}}
REUSED = {200: {"model": models.Job, "description": "The recipe exists: a finished job with the artifact"}}


def _runner(request: Request) -> JobRunner:
    return request.app.state.jobs


def _dump(spec: Any) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True)


def _computed(
    kind: str, spec: Any, service: Any, force: bool, runner: JobRunner, response: Response
) -> dict[str, Any]:
    plan = service(spec, catalog=Catalog(), force=force, dry_run=True)
    if plan.get("reused") and not force:
        result = service(spec, catalog=Catalog(), force=False)  # links the stored files; no tensor read
        response.status_code = 200
        return runner.record(kind, _dump(spec), result=result)
    return runner.submit(kind, _dump(spec), {"force": force})


@router.post("/merges", response_model=models.Job, status_code=202, dependencies=write, responses=REUSED)
def create_merge(
    spec: MergeSpec,
    response: Response,
    force: bool = Query(False, description="Recompute even when the recipe exists (a new version)."),
    runner: JobRunner = Depends(_runner),
) -> dict[str, Any]:
    """Merge adapters into a base (the body of a merge pipeline step / `adaptr merge` flags)."""
    from adaptr.services.merge import merge

    return _computed("merge", spec, merge, force, runner, response)


@router.post(
    "/quantizations", response_model=models.Job, status_code=202, dependencies=write, responses=REUSED
)
def create_quantization(
    spec: QuantizeSpec,
    response: Response,
    force: bool = Query(False, description="Recompute even when the recipe exists (a new version)."),
    runner: JobRunner = Depends(_runner),
) -> dict[str, Any]:
    """Quantize a base or merged model (the body of `adaptr quantize`)."""
    from adaptr.services.quantize import quantize

    return _computed("quantize", spec, quantize, force, runner, response)


def export_root() -> Path:
    root = get_settings().export_root
    assert root is not None
    return root


def confine_out(out: Path) -> Path:
    """``out`` relative to the export root, or absolute inside it; anything else is refused."""
    root = export_root()
    full = (root / out).resolve() if not out.is_absolute() else out.resolve()
    if not full.is_relative_to(root) or full == root:
        raise PathRefusedError(
            f"out: {str(out)!r} is outside the server's export folder",
            hint=f"give a path relative to {root} (ADAPTR_EXPORT_ROOT)",
        )
    return full


@router.post("/exports", response_model=models.Job, status_code=202, dependencies=write)
def create_export(spec: ExportSpec, runner: JobRunner = Depends(_runner)) -> dict[str, Any]:
    """Export an artifact (gguf, hf, a plugin's) to a path under the server's export folder."""
    from adaptr.services.export import export

    spec = spec.model_copy(update={"out": confine_out(spec.out)})
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    export(spec, catalog=Catalog(), dry_run=True)
    return runner.submit("export", _dump(spec))


@router.post("/runs", response_model=models.Job, status_code=202, dependencies=write)
def create_run(body: models.RunRequest, runner: JobRunner = Depends(_runner)) -> dict[str, Any]:
    """Run a pipeline document; its relative paths are relative to a fresh folder under the export
    folder, and every export must stay inside the export folder."""
    from adaptr.pipeline import load
    from adaptr.services.pipeline import run

    folder = export_root() / "runs" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(body.pipeline, sort_keys=False), encoding="utf-8")
    pipe = load(path, force=body.force)
    for step in pipe.steps:
        out = step.body.get("out")
        if out is not None:
            confine_out(Path(folder / out))
    run(pipe, catalog=Catalog(), force=body.force, dry_run=True)
    request = {"pipeline": body.pipeline, "force": body.force, "folder": str(folder)}
    return runner.submit("run", request)


@router.get("/jobs", response_model=list[models.Job], dependencies=[Depends(require("read"))])
def list_jobs(
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = Query(None),
    limit: int = Query(50, ge=1, le=500),
    runner: JobRunner = Depends(_runner),
) -> list[dict[str, Any]]:
    """Jobs, newest first."""
    return runner.ls(state=state, limit=limit)


@router.get("/jobs/{job_id}", response_model=models.Job, dependencies=[Depends(require("read"))])
def get_job(job_id: str, runner: JobRunner = Depends(_runner)) -> dict[str, Any]:
    """State, progress (bytes and tensors done), the result artifact or the error."""
    return runner.get(job_id)


@router.delete("/jobs/{job_id}", response_model=models.Job, dependencies=write)
def cancel_job(job_id: str, runner: JobRunner = Depends(_runner)) -> dict[str, Any]:
    """Cancel a queued or running job and wait until it stopped; nothing it made is registered."""
    return runner.cancel(job_id)
