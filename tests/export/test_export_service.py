"""``adaptr export`` around any exporter: staging, atomic rename, --force, refusals, and no catalog change.

Test exporters (tests/plugin_doubles.py) crash or fill the disk on demand; the GGUF format
itself is checked in test_gguf.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import plugin_doubles
import pytest
from cli_helpers import ok_json, register_demo


@pytest.fixture(autouse=True)
def doubles():
    plugin_doubles.install()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_export_writes_the_file_and_leaves_the_catalog_alone(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    before = ok_json(cli, "show", "llama")
    out = tmp_path / "dist" / "llama.json"
    result = ok_json(cli, "export", "llama", "--format", "summary", "--out", out)
    assert result["out"] == str(out) and result["artifact"] == "llama@1"
    assert result["content_hash"] == before["content_hash"] and result["plugin"] == "doubles"
    body = json.loads(out.read_text())
    assert body["ref"] == "llama@1" and "lm_head.weight" in body["tensors"]
    (entry,) = result["files"]
    assert entry["path"] == "llama.json" and entry["size"] == out.stat().st_size
    assert ok_json(cli, "show", "llama") == before
    assert len(ok_json(cli, "ls")) == 4
    assert leftovers(out.parent) == []

    manifest = out.parent / "llama.json.adaptr-manifest.json"
    assert result["manifest"] == str(manifest) and result["reused"] is False
    assert json.loads(manifest.read_text())["files"] == result["files"]
    again = ok_json(cli, "export", "llama", "--format", "summary", "--out", out)  # this very export
    assert again["reused"] is True and again["files"] == result["files"]
    out.write_text("keep me")
    code, _, err = cli("export", "llama", "--format", "summary", "--out", out)
    assert code == 2 and "already exists; choose another --out or pass --force" in err
    assert "its files no longer match its manifest: changed llama.json" in err
    assert out.read_text() == "keep me" and len(err.strip().splitlines()) == 1
    ok_json(cli, "export", "chat-r4", "--format", "summary", "--out", out, "--force")
    assert json.loads(out.read_text())["ref"] == "chat-r4@1"
    code, text, _ = cli("export", "llama", "--format", "summary", "--out", out, "--force")
    assert code == 0 and "exported llama@1 as summary (fail=) →" in text


@pytest.mark.parametrize("fail", ["crash", "enospc"])
def test_a_failed_export_leaves_nothing(cli, demo_set, tmp_path, fail):
    register_demo(cli, demo_set)
    out = tmp_path / "model.json"
    code, _, err = cli("export", "llama", "--format", "summary", "--out", out, "--param", f"fail={fail}")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "No space left on device" in err if fail == "enospc" else "crashed half-way" in err
    assert not out.exists() and leftovers(tmp_path) == []
    # and an existing output survives a failed --force
    out.write_text("old")
    code, *_ = cli(
        "export", "llama", "--format", "summary", "--out", out, "--force", "--param", f"fail={fail}"
    )
    assert code == 1 and out.read_text() == "old" and leftovers(tmp_path) == []


def test_folder_exports_swap_in_whole(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    out = tmp_path / "dist"
    result = ok_json(cli, "export", "llama", "--format", "summary-dir", "--out", out)
    assert [f["path"] for f in result["files"]] == ["README.md", "sub/summary.json"]
    (out / "stale.txt").write_text("from an older export")
    ok_json(cli, "export", "code-r8", "--format", "summary-dir", "--out", out, "--force")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "README.md",
        "adaptr-manifest.json",
        "sub/summary.json",
    ]
    assert json.loads((out / "sub" / "summary.json").read_text())["ref"] == "code-r8@1"
    assert leftovers(tmp_path) == []


def test_export_refusals(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    ok_json(cli, "quantize", "llama", "--method", "rowint8", "--name", "q")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (("llama", "--format", "nope", "--out", tmp_path / "x"), "unknown exporter 'nope'"),
        (
            ("missing", "--format", "summary", "--out", tmp_path / "x"),
            "artifact 'missing' is not in the catalog",
        ),
        (
            ("q", "--format", "summary", "--out", tmp_path / "x"),
            "q@1 is a quantized; the summary exporter takes",
        ),
        (("llama", "--format", "summary", "--out", tmp_path / "x", "--quant", "q8_0"), "does not take quant"),
        (("llama", "--format", "summary", "--out", folder, "--force"), "is a folder"),
    ]
    for args, message in cases:
        code, out, err = cli("export", *args)
        assert code == 2, (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []
