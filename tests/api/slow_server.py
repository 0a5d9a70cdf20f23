"""``adaptr`` with every job progress callback slowed down (ADAPTR_TEST_JOB_DELAY seconds), so a
test can kill or cancel a merge while it runs. Test-only: the product has no such switch."""

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

if __name__ == "__main__":
    from adaptr.cli import main

    main(sys.argv[1:])
