"""Catalog list latency of the REST API, idle and while a merge job runs (loopback only, bounded).

    .venv/bin/python benchmarks/bench_api.py [--requests 300] [--seconds 60] [--merges 20]

Starts ``adaptr serve`` on 127.0.0.1 over a throwaway home with the demo base and adapters plus
``--extra`` registered copies, then times ``GET /v1/artifacts?limit=50`` sequentially: first idle,
then while merge jobs run back to back (each a new version, ``force=true``), ``--requests`` and
on until ``--merges`` merges are done (within half of ``--seconds`` each). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(c: httpx.Client, n: int, deadline: float, more: Callable[[], bool] = lambda: False) -> dict:
    """``n`` timed requests, and on while ``more()``, until ``deadline``."""
    times: list[float] = []
    while len(times) < n or more():
        if time.monotonic() > deadline:
            break
        t = time.perf_counter()
        r = c.get("/artifacts", params={"limit": 50})
        times.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text
    times.sort()
    q = statistics.quantiles(times, n=100)
    return {"requests": len(times), "p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2),
            "rps": round(len(times) / (sum(times) / 1000), 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--extra", type=int, default=20, help="extra adapter versions in the catalog")
    ap.add_argument(
        "--merges", type=int, default=20, help="time requests until at least this many merges are done"
    )
    a = ap.parse_args()
    from adaptr.services import tokens
    from adaptr.testing import make_demo_set

    work = Path(tempfile.mkdtemp(prefix="adaptr-bench-api-"))
    os.environ.update(ADAPTR_HOME=str(work / "home"), ADAPTR_IMPORT_ROOTS=str(work))
    os.environ.pop("ADAPTR_DATABASE_URL", None)
    demo = make_demo_set(work / "demo")
    tok = tokens.create("admin")["token"]
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaptr", "serve", "--port", str(port), "--log-level", "warning"]
    )
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": f"Bearer {tok}"})
        for _ in range(100):
            try:
                c.get("/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        c.post("/bases", json={"path": str(demo["base"]), "name": "llama"}).raise_for_status()
        for p in demo["adapters"].values():
            c.post("/adapters", json={"path": str(p), "base": "llama"}).raise_for_status()
        for i in range(a.extra):
            c.post("/adapters", json={"path": str(demo["adapters"]["chat-r4"]), "base": "llama",
                                      "name": f"copy-{i}"}).raise_for_status()  # fmt: skip
        deadline = time.monotonic() + a.seconds / 2
        idle = _measure(c, a.requests, deadline)
        stop = threading.Event()
        merges = [0]

        def merging() -> None:
            body = {"adapters": ["chat-r4", "code-r8", "math-r16-rslora"], "strategy": "ties", "density": 0.5,
                    "name": "bench-merge"}  # fmt: skip
            w = httpx.Client(base_url=c.base_url, headers=c.headers, timeout=120)
            while not stop.is_set():
                job = w.post("/merges", params={"force": "true"}, json=body).json()
                while w.get(f"/jobs/{job['id']}").json()["state"] in ("queued", "running"):
                    time.sleep(0.05)
                merges[0] += 1

        t = threading.Thread(target=merging, daemon=True)
        t.start()
        time.sleep(0.5)
        busy = _measure(c, a.requests, time.monotonic() + a.seconds / 2, lambda: merges[0] < a.merges)
        stop.set()
        t.join(120)
        n = len(c.get("/artifacts", params={"limit": 500}).json()["items"])
        print(
            json.dumps(
                {"artifacts": n, "idle": idle, "during_merge_jobs": {**busy, "merges_done": merges[0]}}
            )
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
