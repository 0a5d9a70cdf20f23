"""Every mutating endpoint refuses a missing, read-only, revoked or expired token; paths outside
the import roots and the artifact, and oversized uploads, are refused; refusals register nothing."""

from __future__ import annotations

import io
import time
import zipfile
from datetime import timedelta
from pathlib import Path

from api.helpers import register_demo, token

from adaptr.services import tokens

MUTATING = [
    ("POST", "/bases", {"json": {"path": "base", "name": "b2"}}),
    ("POST", "/adapters", {"json": {"path": "adapters/chat-r4", "base": "llama", "name": "a2"}}),
    (
        "POST",
        "/adapters/uploads",
        {"data": {"base": "llama", "name": "a3"}, "files": {"files": ("x.zip", b"x")}},
    ),
    ("POST", "/merges", {"json": {"adapters": ["chat-r4"], "name": "m2"}}),
    ("POST", "/quantizations", {"json": {"input": "llama", "method": "int8", "name": "q2"}}),
    ("POST", "/exports", {"json": {"input": "llama", "format": "gguf", "out": "x.gguf"}}),
    ("POST", "/runs", {"json": {"pipeline": {"version": 1, "steps": []}}}),
    ("DELETE", "/artifacts/chat-r4", {}),
    ("DELETE", "/jobs/0123", {}),
]


def _refs(c) -> list[str]:
    return sorted(a["ref"] for a in c.get("/artifacts").json()["items"])


def test_auth_matrix(server, demo_set, backend) -> None:
    server.start()
    admin = server.client(token("admin"))
    register_demo(admin, demo_set)
    before = _refs(admin)
    revoked = tokens.create("admin")
    tokens.revoke(revoked["id"])
    expiring = tokens.create("admin", expires=timedelta(seconds=1))["token"]
    writer = token("write")
    time.sleep(1.1)
    for who, tok, status in [
        ("none", None, 401),
        ("read", token("read"), 403),
        ("revoked", revoked["token"], 401),
        ("expired", expiring, 401),
        ("garbage", "adaptr_000000000000_" + "x" * 40, 401),
    ]:
        c = server.client(tok)
        for method, path, kw in MUTATING:
            r = c.request(method, path, **kw)
            assert r.status_code == status, (who, method, path, r.text)
            assert r.json()["error"]["code"] in ("unauthorized", "forbidden")
            assert tok is None or tok not in r.text
    w = server.client(writer)  # write may not remove: admin only
    assert w.delete("/artifacts/chat-r4").status_code == 403
    assert _refs(admin) == before
    assert server.client().get("/artifacts").status_code == 401  # reads need a token by default
    assert server.client().get("/healthz").status_code == 200
    assert tokens.ls()[-1]["state"] == "active" and "token" not in tokens.ls()[-1]
    log = server.log.read_text()
    assert writer not in log and revoked["token"] not in log


def test_open_reads_setting(server, demo_set) -> None:
    server.start(ADAPTR_API_OPEN_READS="1")
    assert server.client().get("/artifacts").status_code == 200
    assert server.client().post("/merges", json={"adapters": ["x"], "name": "y"}).status_code == 401


def test_paths_and_uploads_are_confined(server, demo_set, tmp_path, backend) -> None:
    server.start(ADAPTR_MAX_UPLOAD_BYTES="200000")
    c = server.client(token("admin"))
    register_demo(c, demo_set)
    before = _refs(c)
    for path in ["/etc", str(tmp_path), "../../..", str(Path(demo_set["base"]) / ".." / ".." / "..")]:
        r = c.post("/bases", json={"path": path, "name": "evil"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_refused", (path, r.text)
    link = Path(demo_set["base"]).parent / "escape-link"
    link.unlink(missing_ok=True)
    link.symlink_to(tmp_path)
    try:
        assert c.post("/bases", json={"path": str(link), "name": "evil"}).status_code == 403
    finally:
        link.unlink()
    for bad in ["../../../../etc/passwd", "..%2F..%2Fcatalog.db", "%2Fetc%2Fpasswd", "config.json/../../x"]:
        r = c.get(f"/artifacts/chat-r4/files/{bad}")
        assert r.status_code in (403, 404), (bad, r.status_code)
        assert "root:" not in r.text

    adapter = Path(demo_set["adapters"]["chat-r4"])
    files = [("files", (p.name, p.read_bytes())) for p in sorted(adapter.iterdir()) if p.is_file()]
    big = [("files", ("adapter_model.safetensors", b"\0" * 300_000))]
    r = c.post("/adapters/uploads", data={"base": "llama", "name": "big"}, files=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    r = c.post(
        "/adapters/uploads", data={"base": "llama", "name": "evil"}, files=[("files", ("../x.json", b"{}"))]
    )
    assert r.status_code == 422, r.text
    assert _refs(c) == before
    assert not list((server.home / "uploads").glob("*/*")) if (server.home / "uploads").exists() else True

    r = c.post("/adapters/uploads", data={"base": "llama", "name": "chat-up", "tags": ["up"]}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["content_hash"] == c.get("/artifacts/chat-r4").json()["content_hash"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(adapter.iterdir()):
            z.write(p, f"chat/{p.name}")
    r = c.post(
        "/adapters/uploads",
        data={"base": "llama", "name": "chat-zip"},
        files={"files": ("a.zip", buf.getvalue())},
    )
    assert r.status_code == 201, r.text
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../../evil.json", "{}")
    r = c.post(
        "/adapters/uploads",
        data={"base": "llama", "name": "evil"},
        files={"files": ("e.zip", evil.getvalue())},
    )
    assert r.status_code == 422
    assert _refs(c) == sorted([*before, "chat-up@1", "chat-zip@1"])
