"""The job worker process: ``python -m adaptr.services.job_worker --workers N``.

Started once by the REST API server (:class:`adaptr.services.jobs.JobRunner`), it reads JSON
lines on its standard input (``{"op": "run", "id": ..., "options": {...}}``,
``{"op": "cancel", "id": ...}``) and runs at most N jobs at once, the rest queued in the order
received, at a lower CPU priority than the server. The job rows in the catalog carry the
requests, states and progress; on its standard output the worker only reports
``{"id": ..., "event": "started" | "done"}``. Anything else a library prints goes to standard
error. At the end of its input (the server stopped or died) it exits at once: a job it was
running registered nothing, and the next server marks it failed and removes its staging folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

log = logging.getLogger("adaptr.jobs")


class Worker:
    def __init__(self, workers: int, out: IO[str]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adaptr-job")
        self._out = out
        self._out_lock = threading.Lock()
        self._live: dict[str, Any] = {}  # job id -> JobProgress, from received to done
        self._lock = threading.Lock()

    def report(self, job_id: str, event: str) -> None:
        with self._out_lock:
            self._out.write(json.dumps({"id": job_id, "event": event}) + "\n")
            self._out.flush()

    def handle(self, msg: dict[str, Any]) -> None:
        from adaptr.services.jobs import JobProgress

        job_id = msg["id"]
        if msg["op"] == "run":
            progress = JobProgress(job_id)
            with self._lock:
                self._live[job_id] = progress
            self._pool.submit(self._run, job_id, msg.get("options") or {}, progress)
        elif msg["op"] == "cancel":
            with self._lock:
                live = self._live.get(job_id)
            if live is not None:
                live.cancelled.set()

    def _run(self, job_id: str, options: dict[str, Any], progress: Any) -> None:
        from adaptr.services.jobs import run_job

        try:
            if not progress.cancelled.is_set():
                self.report(job_id, "started")
            run_job(job_id, options, progress)
        except BaseException:
            log.exception("job %s", job_id)
        finally:
            with self._lock:
                self._live.pop(job_id, None)
            self.report(job_id, "done")


def _preload() -> None:
    """Import the job machinery now. Not the services' heavy imports (torch: 2-3 s of CPU): a
    server that runs no job should not pay them, and the first job pays them in this process,
    where they delay no request."""
    from adaptr.services import job_tasks, jobs  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adaptr.services.job_worker")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # reports only; stray prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s adaptr job worker: %(message)s")
    try:  # every thread the jobs start (merge workers, writers, torch's) inherits it
        os.nice(10)
    except (AttributeError, OSError):
        pass
    _preload()

    worker = Worker(max(1, a.workers), out)
    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        worker.handle(msg)
    os._exit(0)  # the server is gone: stop now, running jobs and all


if __name__ == "__main__":
    main()
