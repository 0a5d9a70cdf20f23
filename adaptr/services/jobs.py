"""Long operations as jobs: stored in the catalog, run by a bounded pool of worker threads.

A front end (the REST API) submits a function of a ``Catalog``; the runner records the job,
queues it, runs at most ``workers`` at once off the caller's thread, and reports progress from
the services' own ``Progress`` callbacks (bytes done, ``"12/201 tensors"``). Cancelling sets a
flag that the next progress callback turns into ``JobCancelled``: the services clean their
staging folders on the way out and nothing is registered. A job left queued or running by a
server that died is marked failed when the next server on that host starts.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlmodel import col, select

from adaptr.catalog.db import session_scope
from adaptr.catalog.models import Job
from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError
from adaptr.store import pid_alive as _alive

log = logging.getLogger("adaptr.jobs")

ACTIVE = ("queued", "running")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
_TENSORS = re.compile(r"(\d+)\s*/\s*(\d+)\s+tensors")
_FLUSH_SECONDS = 0.5


class JobCancelled(BaseException):  # a signal, like KeyboardInterrupt, not an error
    """Raised inside a job's progress callback once the job is cancelled."""


class JobFinishedError(InvalidInputError):
    """A finished job cannot be cancelled."""

    status = 409
    code = "job_finished"


def server_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _utc(t: datetime | None) -> str | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=UTC)).isoformat()


def view(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "request": job.request,
        "progress": job.progress,
        "result": job.result,
        "error": job.error,
        "created_at": _utc(job.created_at),
        "started_at": _utc(job.started_at),
        "finished_at": _utc(job.finished_at),
    }


def error_body(e: BaseException) -> dict[str, Any]:
    if isinstance(e, AdaptrError):
        return {"code": e.code, "message": e.message, "hint": e.hint}
    if isinstance(e, OSError):
        return {
            "code": "operation_failed",
            "message": f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}; nothing was registered",
            "hint": None,
        }
    return {"code": "internal", "message": f"the job failed unexpectedly ({type(e).__name__})", "hint": None}


class JobProgress:
    """The ``Progress`` a job's services report to; checks for cancellation at every callback."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.cancelled = threading.Event()
        self.state: dict[str, Any] = {
            "stage": None,
            "bytes_done": 0,
            "bytes_total": None,
            "tensors_done": None,
            "tensors_total": None,
            "detail": None,
        }
        self._flushed = 0.0

    def check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        self.check()
        st = self.state
        st.update(stage=description, bytes_done=0, bytes_total=total, detail=None)
        self.flush(force=True)

        def advance(n: int, detail: str | None = None) -> None:
            self.check()
            st["bytes_done"] += n
            if detail is not None:
                st["detail"] = detail
                m = _TENSORS.search(detail)
                if m:
                    st["tensors_done"], st["tensors_total"] = int(m.group(1)), int(m.group(2))
            self.flush()

        yield advance
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._flushed < _FLUSH_SECONDS:
            return
        self._flushed = now
        _update(self.job_id, progress=dict(self.state))


def _update(job_id: str, **fields: Any) -> None:
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None:
            return
        for k, v in fields.items():
            setattr(job, k, v)
        s.add(job)
        s.commit()


class JobRunner:
    """Runs submitted jobs, ``workers`` at a time; the rest wait queued in submission order."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.server = server_id()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adaptr-job")
        self._live: dict[str, JobProgress] = {}
        self._done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Mark failed the jobs that a dead server on this host left queued or running; remove
        the staging folders they left. Returns their ids."""
        host = socket.gethostname()
        failed = []
        with session_scope() as s:
            for job in s.exec(select(Job).where(col(Job.state).in_(ACTIVE))):
                owner_host, _, pid = (job.server or "").rpartition(":")
                if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                    continue
                job.state = "failed"
                job.finished_at = datetime.now(UTC)
                job.error = {
                    "code": "interrupted",
                    "message": "the server stopped while this job was queued or running; nothing was registered",
                    "hint": "submit it again",
                }
                s.add(job)
                failed.append(job.id)
            s.commit()
        if failed:
            from adaptr.services.catalog import Catalog

            report = Catalog().gc()
            log.warning("marked %d interrupted job(s) failed; removed %s", len(failed), report["removed"])
        return failed

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel what runs and what waits; wait for the workers to clean up."""
        with self._lock:
            live = list(self._live.values())
        for p in live:
            p.cancelled.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for p in live:
            ev = self._done.get(p.job_id)
            if ev is not None:
                ev.wait(max(0.0, deadline - time.monotonic()))
        with session_scope() as s:  # queued here, never started
            for job in s.exec(select(Job).where(col(Job.state).in_(ACTIVE), Job.server == self.server)):
                job.state = "cancelled"
                job.finished_at = datetime.now(UTC)
                job.error = {
                    "code": "cancelled",
                    "message": "the server shut down",
                    "hint": "submit it again",
                }
                s.add(job)
            s.commit()

    # --- jobs ----------------------------------------------------------------------------

    def record(self, kind: str, request: dict[str, Any], *, result: dict[str, Any]) -> dict[str, Any]:
        """A job that finished at once (a reused recipe): stored like any other."""
        now = datetime.now(UTC)
        job = Job(
            id=uuid.uuid4().hex,
            kind=kind,
            state="succeeded",
            request=request,
            progress={},
            result=result,
            server=self.server,
            started_at=now,
            finished_at=now,
        )
        with session_scope() as s:
            s.add(job)
            s.commit()
            return view(job)

    def submit(
        self, kind: str, request: dict[str, Any], fn: Callable[[Any], dict[str, Any]]
    ) -> dict[str, Any]:
        """Queue ``fn(catalog)``; its return value becomes the job's result."""
        job = Job(id=uuid.uuid4().hex, kind=kind, state="queued", request=request, server=self.server)
        with session_scope() as s:
            s.add(job)
            s.commit()
            out = view(job)
        progress = JobProgress(job.id)
        with self._lock:
            self._live[job.id] = progress
            self._done[job.id] = threading.Event()
        self._pool.submit(self._run, job.id, fn, progress)
        return out

    def _run(self, job_id: str, fn: Callable[[Any], dict[str, Any]], progress: JobProgress) -> None:
        from adaptr.services.catalog import Catalog

        _lower_priority()
        try:
            if progress.cancelled.is_set():
                _update(job_id, state="cancelled", finished_at=datetime.now(UTC))
                return
            _update(job_id, state="running", started_at=datetime.now(UTC))
            try:
                result = fn(Catalog(progress=progress))
            except JobCancelled:
                _update(job_id, state="cancelled", finished_at=datetime.now(UTC), progress=progress.state)
                log.info("job %s cancelled", job_id)
                return
            except BaseException as e:
                if not isinstance(e, AdaptrError | OSError):
                    log.exception("job %s failed", job_id)
                _update(
                    job_id,
                    state="failed",
                    error=error_body(e),
                    finished_at=datetime.now(UTC),
                    progress=progress.state,
                )
                if not isinstance(e, Exception):
                    raise
                return
            _update(
                job_id,
                state="succeeded",
                result=result,
                finished_at=datetime.now(UTC),
                progress=progress.state,
            )
        finally:
            with self._lock:
                self._live.pop(job_id, None)
                done = self._done.pop(job_id, None)
            if done is not None:
                done.set()

    def get(self, job_id: str) -> dict[str, Any]:
        with session_scope() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"job {job_id!r} does not exist; see GET /v1/jobs")
            out = view(job)
        live = self._live.get(job_id)
        if live is not None and out["state"] == "running":
            out["progress"] = dict(live.state)  # fresher than the last flush
        return out

    def ls(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with session_scope() as s:
            q = select(Job)
            if state:
                q = q.where(Job.state == state)
            rows = s.exec(q.order_by(col(Job.created_at).desc(), col(Job.id)).limit(limit)).all()
            return [view(j) for j in rows]

    def running(self) -> int:
        with self._lock:
            return len(self._live)

    def cancel(self, job_id: str, wait: float = 30.0) -> dict[str, Any]:
        """Cancel a queued or running job; waits (up to ``wait`` s) until it has stopped."""
        job = self.get(job_id)
        if job["state"] not in ACTIVE:
            raise JobFinishedError(f"job {job_id} already {job['state']}; nothing to cancel")
        with self._lock:
            live, done = self._live.get(job_id), self._done.get(job_id)
        if live is None:  # queued by a server that is gone: nothing runs it
            _update(job_id, state="cancelled", finished_at=datetime.now(UTC))
            return self.get(job_id)
        live.cancelled.set()
        if job["state"] == "queued":  # it will not start; no need to wait for its turn
            _update(job_id, state="cancelled", finished_at=datetime.now(UTC))
            return self.get(job_id)
        if done is not None:
            done.wait(wait)
        return self.get(job_id)


def _lower_priority() -> None:
    """Run job threads (and the merge workers, writer and hasher threads they start, which inherit
    it) at a lower CPU priority than the event loop: catalog reads stay fast while a merge saturates
    the cores. Linux nice values are per thread; elsewhere this is a no-op."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
