"""Long operations as jobs: stored in the catalog, run in a job worker process.

A front end (the REST API) submits a job as data: its ``kind`` (a task of
:mod:`adaptr.services.job_tasks`), its request (the service spec, as JSON) and options. The
runner records the job row, the catalog's copy being the source of truth, and sends the job to
one worker process that it started (spawned, not forked: ``python -m
adaptr.services.job_worker``). The worker runs at most ``workers`` jobs at once, the rest wait
queued in submission order, at a lower CPU priority; it moves the job row through ``running`` to
its end state and stores progress from the services' own ``Progress`` callbacks (bytes done,
``"12/201 tensors"``). The server's process keeps none of a job's work: no GIL shared with a merge,
and none of its garbage to collect while answering requests.

Cancelling sends the worker a message; the job's next progress callback turns it into
``JobCancelled``: the services clean their staging folders on the way out and nothing is
registered. The worker exits when the server's end of its pipe closes (the server stopped or
died); a job left queued or running by a server that died is marked failed when the next server
on that host starts, and one left by a worker that died is marked failed at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import update
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


def _transition(job_id: str, before: str, **fields: Any) -> bool:
    """Set ``fields`` on the job only while it is in state ``before``; whether it was. The server
    (cancelling a queued job) and the worker (starting it) race through this, never both win."""
    with session_scope() as s:
        n = s.exec(update(Job).where(col(Job.id) == job_id, col(Job.state) == before).values(**fields))
        s.commit()
        return bool(n.rowcount)


_INTERRUPTED = {
    "code": "interrupted",
    "message": "the server stopped while this job was queued or running; nothing was registered",
    "hint": "submit it again",
}


class JobRunner:
    """Sends submitted jobs to a job worker process; it runs ``workers`` at a time, the rest wait
    queued in submission order. One runner per server process."""

    # The worker's command line, before its arguments; a test substitutes an instrumented one.
    command: list[str] = [sys.executable, "-m", "adaptr.services.job_worker"]

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        self.server = server_id()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sent: dict[str, threading.Event] = {}  # jobs given to the worker, set when they end
        self._owner: dict[str, subprocess.Popen[bytes]] = {}  # the worker each was given to
        self._running: set[str] = set()
        self._lock = threading.RLock()
        self._closing = False

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
                job.error = _INTERRUPTED
                s.add(job)
                failed.append(job.id)
            s.commit()
        if failed:
            _collect_garbage()
            log.warning("marked %d interrupted job(s) failed", len(failed))
        return failed

    def start(self) -> None:
        """Start the worker process now rather than at the first job."""
        with self._lock:
            self._worker()

    def worker_pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _worker(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        proc = subprocess.Popen(
            [*self.command, "--workers", str(self.workers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._proc = proc
        threading.Thread(target=self._listen, args=(proc,), name="adaptr-job-listener", daemon=True).start()
        return proc

    def _send(self, message: dict[str, Any]) -> bool:
        with self._lock:
            proc = self._worker() if message["op"] == "run" else self._owner.get(message["id"])
            if proc is None or proc.stdin is None:
                return False
            if message["op"] == "run":
                self._owner[message["id"]] = proc
            try:
                proc.stdin.write(json.dumps(message).encode() + b"\n")
                proc.stdin.flush()
                return True
            except (BrokenPipeError, ValueError, OSError):
                return False

    def _listen(self, proc: subprocess.Popen[bytes]) -> None:
        """Read the worker's reports until its pipe closes; a worker that died takes its jobs with it."""
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            job_id = msg.get("id")
            with self._lock:
                if msg.get("event") == "started":
                    self._running.add(job_id)
                elif msg.get("event") == "done":
                    self._running.discard(job_id)
                    done = self._sent.pop(job_id, None)
                    self._owner.pop(job_id, None)
                    if done is not None:
                        done.set()
        code = proc.wait()
        with self._lock:
            if self._proc is proc:
                self._proc = None
            lost = [
                (j, self._sent.pop(j)) for j, p in list(self._owner.items()) if p is proc and j in self._sent
            ]
            for job_id, _ in lost:
                self._owner.pop(job_id, None)
                self._running.discard(job_id)
            closing = self._closing
        if lost and not closing:  # when closing, shutdown() marks what did not stop cancelled
            error = {
                "code": "worker_died",
                "message": f"the job worker process stopped unexpectedly (exit status {code}); "
                "nothing was registered",
                "hint": "submit it again; see the server's log",
            }
            for job_id, _ in lost:
                for before in ACTIVE:
                    _transition(job_id, before, state="failed", error=error, finished_at=datetime.now(UTC))
            log.error("the job worker stopped (exit status %s); %d job(s) failed", code, len(lost))
            _collect_garbage()
        for _, done in lost:
            done.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel what runs and what waits; wait for the worker to clean up, then stop it."""
        with self._lock:
            self._closing = True
            sent = list(self._sent.items())
            proc = self._proc
        for job_id, _ in sent:
            self._send({"op": "cancel", "id": job_id})
        deadline = time.monotonic() + timeout
        for _, done in sent:
            done.wait(max(0.0, deadline - time.monotonic()))
        if proc is not None:
            _close(proc.stdin)  # the worker exits at the end of its input
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
        self, kind: str, request: dict[str, Any], options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Queue the task ``kind`` of :mod:`adaptr.services.job_tasks` on ``request`` (the job's
        stored request) and ``options``; the task's return value becomes the job's result."""
        from adaptr.services.job_tasks import TASKS

        if kind not in TASKS:
            raise InvalidInputError(f"no job task {kind!r}")
        job = Job(id=uuid.uuid4().hex, kind=kind, state="queued", request=request, server=self.server)
        with session_scope() as s:
            s.add(job)
            s.commit()
            out = view(job)
        with self._lock:
            self._sent[job.id] = threading.Event()
            sent = self._send({"op": "run", "id": job.id, "options": options or {}})
            if not sent:
                self._sent.pop(job.id, None)
                self._owner.pop(job.id, None)
        if not sent:
            _transition(
                job.id,
                "queued",
                state="failed",
                finished_at=datetime.now(UTC),
                error={"code": "internal", "message": "the job worker could not be started", "hint": None},
            )
            return self.get(job.id)
        return out

    def get(self, job_id: str) -> dict[str, Any]:
        with session_scope() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"job {job_id!r} does not exist; see GET /v1/jobs")
            return view(job)

    def ls(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with session_scope() as s:
            q = select(Job)
            if state:
                q = q.where(Job.state == state)
            rows = s.exec(q.order_by(col(Job.created_at).desc(), col(Job.id)).limit(limit)).all()
            return [view(j) for j in rows]

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    def cancel(self, job_id: str, wait: float = 30.0) -> dict[str, Any]:
        """Cancel a queued or running job; waits (up to ``wait`` s) until it has stopped."""
        job = self.get(job_id)
        if job["state"] not in ACTIVE:
            raise JobFinishedError(f"job {job_id} already {job['state']}; nothing to cancel")
        with self._lock:
            done = self._sent.get(job_id)
        now = datetime.now(UTC)
        if done is None:  # queued by a server that is gone: nothing runs it
            _transition(job_id, job["state"], state="cancelled", finished_at=now)
            return self.get(job_id)
        self._send({"op": "cancel", "id": job_id})
        if not _transition(job_id, "queued", state="cancelled", finished_at=now):
            done.wait(wait)  # it runs: the worker stops it at its next progress report
        return self.get(job_id)


def _close(f: IO[bytes] | None) -> None:
    try:
        if f is not None:
            f.close()
    except OSError:
        pass


def _collect_garbage() -> None:
    from adaptr.services.catalog import Catalog

    report = Catalog().gc()
    if report["removed"]:
        log.warning("removed what interrupted jobs left: %s", report["removed"])


# --- the worker process's side ---------------------------------------------------------------


def run_job(job_id: str, options: dict[str, Any], progress: JobProgress) -> str:
    """Run one job (in the worker process): ``queued`` → ``running`` → its end state, which it
    returns; a job cancelled before it started is left as the canceller stored it."""
    from adaptr.services.catalog import Catalog
    from adaptr.services.job_tasks import TASKS

    if progress.cancelled.is_set() or not _transition(
        job_id, "queued", state="running", started_at=datetime.now(UTC)
    ):
        return "cancelled"
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        kind, request = job.kind, job.request
    try:
        result = TASKS[kind](Catalog(progress=progress), request, options)
    except JobCancelled:
        _update(job_id, state="cancelled", finished_at=datetime.now(UTC), progress=progress.state)
        log.info("job %s cancelled", job_id)
        return "cancelled"
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
        return "failed"
    _update(job_id, state="succeeded", result=result, finished_at=datetime.now(UTC), progress=progress.state)
    return "succeeded"
