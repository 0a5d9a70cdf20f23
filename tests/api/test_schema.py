"""schemathesis against the live OpenAPI schema: no 500s, every response matches its schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from api.helpers import register_demo, token


def test_schemathesis_against_the_live_schema(server, demo_set, backend) -> None:
    server.start()
    admin = token("admin")
    c = server.client(admin)
    register_demo(c, demo_set)
    schema = c.get("/openapi.json").json()
    assert schema["paths"] and "/v1/artifacts/{name}/lineage" in schema["paths"]
    st = Path(sys.executable).with_name("st")
    out = subprocess.run(
        [
            str(st), "run", f"{server.url}/v1/openapi.json",
            "--checks", "not_a_server_error,response_schema_conformance",
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "6", "--generation-deterministic",
            # one worker: Python 3.11's ast.parse is not thread-safe (hypothesis describes filter
            # lambdas with it) and two workers failed with "AST constructor recursion depth mismatch"
            "--workers", "1",
            "--header", f"Authorization: Bearer {admin}", "--request-timeout", "30",
            "--exclude-path-regex", "/v1/artifacts/\\{name\\}$",  # DELETE would empty the catalog
        ],
        capture_output=True, text=True, timeout=240, env={**os.environ, "NO_COLOR": "1"}, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "500" not in server.log.read_text()
