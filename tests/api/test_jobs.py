"""Jobs: cancel leaves nothing registered; a server killed during a merge marks the job failed
at the next start and leaves no partial artifact; jobs beyond the bound wait queued; the job
worker process ends with its server, and one that dies fails its job and is replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from api.helpers import register_demo, token, wait_job

MERGE = {"adapters": ["chat-r4", "code-r8", "math-r16-rslora"], "strategy": "linear", "name": "slow"}


def _running(c, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        j = c.get(f"/jobs/{job_id}").json()
        if j["state"] == "running" and j["progress"].get("bytes_done"):
            return j
        time.sleep(0.05)
    raise AssertionError(j)


def _leftovers(server) -> list:
    tmp = server.home / "store" / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def test_cancel_and_queue(server, demo_set, backend) -> None:
    server.start(slow=True, ADAPTR_TEST_JOB_DELAY="0.1")
    c = server.client(token("write"))
    register_demo(c, demo_set)
    first = c.post("/merges", json=MERGE).json()
    second = c.post("/merges", json={**MERGE, "name": "slow2"}).json()
    j = _running(c, first["id"])
    assert j["progress"]["stage"].startswith("merging")
    assert c.get(f"/jobs/{second['id']}").json()["state"] == "queued"  # one job at a time
    cancelled = c.delete(f"/jobs/{second['id']}").json()
    assert cancelled["state"] == "cancelled"
    stopped = c.delete(f"/jobs/{first['id']}")
    assert stopped.status_code == 200 and stopped.json()["state"] == "cancelled", stopped.text
    assert c.delete(f"/jobs/{first['id']}").status_code == 409
    assert c.get("/artifacts/slow").status_code == 404 and c.get("/artifacts/slow2").status_code == 404
    assert _leftovers(server) == []
    assert [j["state"] for j in c.get("/jobs").json()] == ["cancelled", "cancelled"]


def test_kill_during_merge_then_restart(server, demo_set, backend) -> None:
    server.start(slow=True, ADAPTR_TEST_JOB_DELAY="0.3")
    c = server.client(token("write"))
    register_demo(c, demo_set)
    job = c.post("/merges", json=MERGE).json()
    _running(c, job["id"])
    server.kill9()
    server.start()
    c = server.client(token("write"))
    after = c.get(f"/jobs/{job['id']}").json()
    assert after["state"] == "failed" and after["error"]["code"] == "interrupted", after
    assert c.get("/artifacts/slow").status_code == 404
    assert _leftovers(server) == []  # the staging folder of the killed merge is gone
    again = c.post("/merges", json=MERGE)  # and it can simply be submitted again
    assert wait_job(c, again.json()["id"])["state"] == "succeeded"


def _worker_of(server_pid: int) -> int:
    """The job worker process the server started (Linux: read from /proc)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for d in Path("/proc").iterdir():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"job" in cmd and b"worker" in cmd:
                return int(d.name)
        time.sleep(0.1)
    raise AssertionError(f"server {server_pid} has no job worker process")


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):  # exited; its parent died, nobody reaped it yet
            return True
        time.sleep(0.05)
    return False


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@linux_only
@pytest.mark.sqlite_only  # processes and pipes; the catalog's backend plays no part
def test_the_job_worker_dies_with_the_server(server, demo_set, backend) -> None:
    server.start(slow=True, ADAPTR_TEST_JOB_DELAY="0.3")
    worker = _worker_of(server.proc.pid)  # started with the server, before any job
    c = server.client(token("write"))
    register_demo(c, demo_set)
    _running(c, c.post("/merges", json=MERGE).json()["id"])
    assert _worker_of(server.proc.pid) == worker  # the job runs in it, not in a fresh process
    server.kill9()
    assert _gone(worker), "the job worker outlived its server"
    server.start()  # graceful stop: the worker ends too
    worker = _worker_of(server.proc.pid)
    server.stop()
    assert _gone(worker)


@linux_only
def test_a_job_worker_that_dies_fails_its_job_and_is_replaced(server, demo_set, backend) -> None:
    server.start(slow=True, ADAPTR_TEST_JOB_DELAY="0.3")
    c = server.client(token("write"))
    register_demo(c, demo_set)
    job = c.post("/merges", json=MERGE).json()
    _running(c, job["id"])
    os.kill(_worker_of(server.proc.pid), signal.SIGKILL)
    after = wait_job(c, job["id"], timeout=30)
    assert after["state"] == "failed" and after["error"]["code"] == "worker_died", after
    assert c.get("/artifacts/slow").status_code == 404
    assert _leftovers(server) == []  # its staging folder is gone
    again = c.post("/merges", json=MERGE)  # a new worker takes the next job
    assert wait_job(c, again.json()["id"])["state"] == "succeeded"
    deadline = time.monotonic() + 10  # the worker reports the end just after storing it
    while c.get("/healthz").json()["jobs_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.get("/healthz").json()["jobs_running"] == 0
