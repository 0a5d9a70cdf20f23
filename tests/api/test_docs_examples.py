"""Every ``sh`` example of docs/rest-api.md runs, in order, against a live server."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from api.helpers import token

DOC = Path(__file__).resolve().parents[2] / "docs" / "rest-api.md"


def test_rest_api_doc_examples_run(server, demo_set, tmp_path, backend) -> None:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 10
    server.start()
    env = {
        **os.environ,
        "API": f"{server.url}/v1",
        "TOKEN": token("admin"),
        "DEMO": str(Path(demo_set["base"]).parent),
    }
    script = "set -euo pipefail\n" + "\n".join(blocks)
    out = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    documented = set(re.findall(r"`(GET|POST|DELETE) (/v1/[^`?]*)", DOC.read_text(encoding="utf-8")))
    schema = server.client().get("/openapi.json").json()["paths"]
    for path, ops in schema.items():
        for method in ops:
            assert (method.upper(), path) in documented, f"{method.upper()} {path} is not in docs/rest-api.md"
