"""The FastAPI application: routers under ``/v1``, one error body, the job runner's lifecycle."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
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
        runner.start()
        app.state.jobs = runner
        _settle_heap()
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
    app.add_middleware(_SettleHeap)
    for r in (system.router, catalog.router, registration.router, jobs.router):
        app.include_router(r, prefix="/v1")
    return app


def _settle_heap() -> None:
    """Move what startup allocated (modules, the app, the ORM's mappers) out of the garbage
    collector's sight: a full collection then walks only what requests allocate since, a few
    milliseconds instead of a pause of 100 ms and more (torch alone is 150,000 objects) in
    whichever request happens to trigger it. Full collections come every second or so under
    load: a listing's rows outlive the young generations."""
    gc.collect()
    gc.freeze()


class _SettleHeap:
    """After a request that imported modules (the first adapter registration imports torch),
    settle the heap again, once, rather than pay for walking them in every full collection."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.modules = len(sys.modules)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
        if len(sys.modules) != self.modules:
            self.modules = len(sys.modules)
            await anyio.to_thread.run_sync(_settle_heap)
