"""register → merge job → poll → download → lineage through a live server; same hash as the CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from api.helpers import register_demo, token, wait_job

MERGE = {"adapters": ["chat-r4", "code-r8"], "strategy": "ties", "density": 0.5, "name": "m-ties"}


def test_full_flow_matches_the_cli(server, demo_set, backend) -> None:
    server.start()
    c = server.client(token("write"))
    register_demo(c, demo_set)

    r = c.post("/merges", json=MERGE)
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"])
    assert job["state"] == "succeeded", job
    art = job["result"]
    assert art["ref"] == "m-ties@1" and job["progress"]["tensors_total"] > 0
    import torch

    assert art["metadata"]["backend"]["name"] == ("triton" if torch.cuda.is_available() else "torch")  # auto
    bad = c.post("/merges", json={**MERGE, "name": "m-gpu", "backend": "cuda"})  # refused before queueing
    assert bad.status_code == 422 and "unknown backend 'cuda'" in bad.json()["error"]["message"], bad.text

    again = c.post("/merges", json=MERGE)  # an existing recipe answers at once
    assert again.status_code == 200 and again.json()["state"] == "succeeded"
    assert again.json()["result"]["reused"] and again.json()["result"]["ref"] == "m-ties@1"

    shown = c.get("/artifacts/m-ties").json()
    cli_show = subprocess.run(
        [sys.executable, "-m", "adaptr", "show", "m-ties@1", "--json"], capture_output=True, text=True,
        env=os.environ, check=True,
    )  # fmt: skip
    import json

    assert shown == json.loads(cli_show.stdout)
    for f in shown["files"]:
        d = c.get(f"/artifacts/m-ties@1/files/{f['path']}")
        assert d.status_code == 200
        assert d.headers["x-content-sha256"] == f["sha256"] == hashlib.sha256(d.content).hexdigest()
    part = c.get("/artifacts/m-ties/files/config.json", headers={"Range": "bytes=2-11"})
    assert part.status_code == 206 and len(part.content) == 10

    lineage = c.get("/artifacts/m-ties/lineage").json()
    cli_lineage = subprocess.run(
        [sys.executable, "-m", "adaptr", "lineage", "m-ties", "--json"], capture_output=True, text=True,
        env=os.environ, check=True,
    )  # fmt: skip
    assert lineage == json.loads(cli_lineage.stdout)
    up1 = c.get("/artifacts/m-ties/lineage", params={"direction": "up", "depth": 1}).json()
    assert {e["parent"] for e in up1["edges"]} == {"chat-r4@1", "code-r8@1", "llama@1"}
    assert {e["child"] for e in up1["edges"]} == {"m-ties@1"}  # one hop: not the adapters' own parent

    # The same merge made by the CLI (recomputed as a new version) has the same content hash.
    cli = subprocess.run(
        [sys.executable, "-m", "adaptr", "merge", "--adapter", "chat-r4", "--adapter", "code-r8", "--strategy",
         "ties", "--density", "0.5", "--name", "m-ties", "--force", "--json"],
        capture_output=True, text=True, env=os.environ, check=True,
    )  # fmt: skip
    made = json.loads(cli.stdout)
    assert made["ref"] == "m-ties@2" and made["content_hash"] == art["content_hash"]


def test_catalog_queries_filter_sort_and_page(server, demo_set, backend) -> None:
    server.start()
    c = server.client(token("write"))
    register_demo(c, demo_set)
    everything = [a["ref"] for a in c.get("/artifacts", params={"limit": 500}).json()["items"]]
    assert everything == sorted(everything)
    pages, cursor = [], None
    while True:
        page = c.get("/artifacts", params={"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        pages += [a["ref"] for a in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages == everything
    desc = c.get("/artifacts", params={"sort": "size_bytes", "order": "desc", "limit": 2}).json()
    sizes = [a["size_bytes"] for a in desc["items"]]
    assert sizes == sorted(sizes, reverse=True)
    nxt = c.get("/artifacts", params={"sort": "size_bytes", "order": "desc", "cursor": desc["next_cursor"]})
    assert [a["ref"] for a in nxt.json()["items"]] == [
        a["ref"] for a in c.get("/artifacts", params={"sort": "size_bytes", "order": "desc"}).json()["items"]
    ][2:]
    assert [a["ref"] for a in c.get("/adapters", params={"rank": 8}).json()["items"]] == ["code-r8@1"]
    assert [a["ref"] for a in c.get("/bases").json()["items"]] == ["llama@1"]
    assert [a["ref"] for a in c.get("/adapters", params={"name": "r16"}).json()["items"]] == [
        "math-r16-rslora@1"
    ]
    assert len(c.get("/adapters", params={"target_module": "q_proj"}).json()["items"]) >= 1
    assert c.get("/adapters", params={"target_module": "no_such_module"}).json()["items"] == []
    assert c.get("/artifacts", params={"created_before": "2000-01-01T00:00:00Z"}).json()["items"] == []
    assert len(c.get("/artifacts", params={"created_after": "2000-01-01T00:00:00Z"}).json()["items"]) == 4
    assert c.get("/adapters/llama").status_code == 404
    assert c.get("/bases/llama@1").json()["kind"] == "base"

    bad = c.get("/artifacts", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "limit"
    assert c.get("/artifacts", params={"cursor": "garbage"}).json()["error"]["code"] == "invalid_input"
    missing = c.get("/artifacts/nope@3")
    assert missing.status_code == 404 and set(missing.json()["error"]) >= {"code", "message", "hint"}
    taken = c.post("/bases", json={"path": str(demo_set["base"]), "name": "llama"})
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"
    invalid = c.post("/merges", json={**MERGE, "weights": [1.0, "x"]})
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "weights[1]"
    unknown = c.post("/merges", json={**MERGE, "adapters": ["nope"]})
    assert unknown.status_code == 404, unknown.text
    plugins = c.get("/plugins").json()
    assert any("strategy" in p["registers"] for p in plugins)


def test_quantize_export_and_run_jobs(server, demo_set, tmp_path, backend) -> None:
    server.start()
    c = server.client(token("write"))
    register_demo(c, demo_set)
    q = c.post("/quantizations", json={"input": "llama", "method": "int8", "name": "llama-int8"})
    assert q.status_code == 202, q.text
    assert wait_job(c, q.json()["id"])["state"] == "succeeded"
    e = c.post("/exports", json={"input": "llama", "format": "gguf", "quant": "q8_0", "out": "llama.gguf"})
    assert e.status_code == 202, e.text
    done = wait_job(c, e.json()["id"])
    assert done["state"] == "succeeded", done
    assert (tmp_path / "exports" / "llama.gguf").is_file()
    outside = c.post("/exports", json={"input": "llama", "format": "gguf", "out": str(tmp_path / "x.gguf")})
    assert outside.status_code == 403 and not (tmp_path / "x.gguf").exists()
    run = c.post(
        "/runs",
        json={
            "pipeline": {
                "version": 1,
                "steps": [{"id": "m", "merge": {"adapters": ["chat-r4"], "name": "m-run"}}],
            }
        },
    )
    assert run.status_code == 202, run.text
    assert wait_job(c, run.json()["id"])["state"] == "succeeded"
    assert c.get("/artifacts/m-run").status_code == 200
    bad = c.post(
        "/runs", json={"pipeline": {"version": 1, "steps": [{"id": "m", "merge": {"adapterz": []}}]}}
    )
    assert bad.status_code == 422
