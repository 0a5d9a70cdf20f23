"""The FastAPI application: routers under ``/v1``, one error body, the job runner's lifecycle."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

log = logging.getLogger("adaptr.api")


def create_app() -> FastAPI:
    from adaptr import __version__
    from adaptr.api import errors
    from adaptr.api.routers import catalog, jobs, registration, system
    from adaptr.services import database
    from adaptr.services.jobs import JobRunner
    from adaptr.settings import get_settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database.init()  # a schema this adaptr cannot use fails the start, not the first request
        runner = JobRunner(get_settings().job_workers)
        failed = runner.recover()
        if failed:
            log.warning("jobs interrupted by the previous server, now failed: %s", ", ".join(failed))
        app.state.jobs = runner
        try:
            yield
        finally:
            runner.shutdown()

    app = FastAPI(
        title="adaptr",
        version=__version__,
        description="Catalog, merge, quantize and export LoRA adapters, with lineage.",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    errors.install(app)
    for r in (system.router, catalog.router, registration.router, jobs.router):
        app.include_router(r, prefix="/v1")
    return app
