"""``adaptr`` whose job worker slows down every job progress callback (ADAPTR_TEST_JOB_DELAY
seconds), so a test can kill or cancel a merge while it runs. Test-only: the product has no such
switch. ``slow_server.py serve ...`` is the server; it starts ``slow_server.py --job-worker ...``
as its job worker process."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from adaptr.services import jobs

_task = jobs.JobProgress.task
DELAY = float(os.environ.get("ADAPTR_TEST_JOB_DELAY", "0.2"))


@contextmanager
def _slow_task(self, description, total):
    with _task(self, description, total) as advance:

        def slow(n, detail=None):
            time.sleep(DELAY)
            advance(n, detail)

        yield slow


jobs.JobProgress.task = _slow_task
jobs.JobRunner.command = [sys.executable, os.path.abspath(__file__), "--job-worker"]

if __name__ == "__main__":
    if sys.argv[1:2] == ["--job-worker"]:
        from adaptr.services import job_worker

        job_worker.main(sys.argv[2:])
    else:
        from adaptr.cli import main

        main(sys.argv[1:])
