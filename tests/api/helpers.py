"""Helpers of the API suite: a real ``adaptr serve`` process, on 127.0.0.1 and a free port, with httpx clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``adaptr serve`` in a subprocess; ``start`` waits for /v1/healthz."""

    def __init__(self, home: Path, tmp: Path, import_root: Path) -> None:
        self.home, self.tmp = home, tmp
        self.env = {
            **os.environ,
            "ADAPTR_IMPORT_ROOTS": str(import_root),
            "ADAPTR_EXPORT_ROOT": str(tmp / "exports"),
            "ADAPTR_HOME": str(home),
        }
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log = tmp / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, slow: bool = False, **env: str) -> Server:
        self.port = free_port()
        entry = [str(HERE / "slow_server.py")] if slow else ["-m", "adaptr"]
        cmd = [sys.executable, *entry, "serve", "--port", str(self.port), "--log-level", "warning"]
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env={**self.env, **env}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"adaptr serve exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"adaptr serve did not answer: {self.log.read_text()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"{self.url}/v1", headers=headers, timeout=60)


def adaptr(*args: str, env: dict | None = None) -> dict | list:
    """``adaptr ARGS --json`` in a subprocess; its parsed output."""
    out = subprocess.run(
        [sys.executable, "-m", "adaptr", *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def token(scope: str, **kw: str) -> str:
    from adaptr.services import tokens

    return tokens.create(scope, **kw)["token"]


def wait_job(c: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = c.get(f"/jobs/{job_id}").json()
        if j["state"] not in ("queued", "running"):
            return j
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {j['state']}")


def register_demo(c: httpx.Client, demo_set: dict, base: str = "llama") -> None:
    r = c.post("/bases", json={"path": str(demo_set["base"]), "name": base})
    assert r.status_code == 201, r.text
    for path in demo_set["adapters"].values():
        r = c.post("/adapters", json={"path": str(path), "base": base})
        assert r.status_code == 201, r.text
