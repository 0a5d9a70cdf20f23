"""Jobs: cancel leaves nothing registered; a server killed during a merge marks the job failed
at the next start and leaves no partial artifact; jobs beyond the bound wait queued."""

from __future__ import annotations

import time

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
