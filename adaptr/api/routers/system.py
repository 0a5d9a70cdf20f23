"""Health and plugins."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from adaptr.api import models
from adaptr.api.auth import require
from adaptr.api.errors import ERRORS

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=models.Health)
def healthz(request: Request) -> dict[str, Any]:
    """Liveness and the catalog schema revision; needs no token."""
    from adaptr import __version__
    from adaptr.services import database

    return {
        "status": "ok",
        "version": __version__,
        "schema_revision": database.current()["current"],
        "jobs_running": request.app.state.jobs.running(),
    }


@router.get(
    "/plugins",
    response_model=list[dict[str, Any]],
    dependencies=[Depends(require("read"))],
    responses={k: ERRORS[k] for k in (401, 403)},
)
def plugins() -> list[dict[str, Any]]:
    """Loaded plugins, their distribution and version, and what each registers (`adaptr plugins --json`)."""
    from adaptr.plugins import get_host

    return get_host().describe()
