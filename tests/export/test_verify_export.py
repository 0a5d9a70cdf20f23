"""``adaptr verify-export`` (the consuming side of CI) and the export service's reuse and refusal of ``--out``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import ok_json, register_demo


def snapshot(folder: Path) -> dict[str, int]:
    """mtime (ns) of the folder and of everything in it: a reused export touches none of them."""
    paths = [folder, *folder.rglob("*")]
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in paths}


@pytest.fixture
def exported(cli, demo_set, tmp_path) -> Path:
    register_demo(cli, demo_set)
    out = tmp_path / "dist" / "llama"
    ok_json(cli, "export", "llama", "--format", "hf", "--out", out, "--param", "max_shard_size=200KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def test_a_fresh_export_verifies(cli, exported):
    code, text, err = cli("verify-export", exported)
    assert code == 0 and text.startswith(f"ok: {exported} matches its manifest: llama@1 as hf"), (text, err)
    report = ok_json(cli, "verify-export", exported)
    assert report["ok"] is True and report["artifact"] == "llama@1" and report["format"] == "hf"
    assert report["missing"] == report["changed"] == report["extra"] == []
    manifest = json.loads((exported / "adaptr-manifest.json").read_text())
    assert report["files"] == len(manifest["files"]) and report["manifest"] == str(
        exported / "adaptr-manifest.json"
    )


def test_tampered_deleted_and_extra_files_fail_with_exit_3(cli, exported):
    shard = sorted(exported.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    code, _, err = cli("verify-export", exported)
    assert code == 3 and f"changed {shard.name}" in err and len(err.strip().splitlines()) == 1

    (exported / "generation_config.json").unlink()
    (exported / "notes.txt").write_text("not exported")
    code, out, err = cli("verify-export", exported, "--json")
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert f"missing generation_config.json; changed {shard.name}; extra notes.txt" in err
    report = json.loads(out)
    assert report["ok"] is False and report["missing"] == ["generation_config.json"]
    assert report["changed"] == [shard.name] and report["extra"] == ["notes.txt"]


def test_missing_or_corrupt_manifest_is_exit_2(cli, exported, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"x")
    cases = [
        (plain, "no such manifest; only folders and files written by `adaptr export`"),
        (tmp_path / "nowhere", "no such file or directory"),
    ]
    for path, message in cases:
        code, _, err = cli("verify-export", path)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    manifest = exported / "adaptr-manifest.json"
    for body in ("{not json", "[]", json.dumps({"schema": "adaptr-export-manifest/1", "files": []})):
        manifest.write_text(body)
        code, _, err = cli("verify-export", exported)
        assert code == 2 and "not a valid adaptr export manifest" in err, err
        assert len(err.strip().splitlines()) == 1


def test_single_file_exports_verify_through_the_side_manifest(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    out = tmp_path / "llama.gguf"
    ok_json(cli, "export", "llama", "--format", "gguf", "--out", out)
    side = tmp_path / "llama.gguf.adaptr-manifest.json"
    assert ok_json(cli, "verify-export", out)["ok"] and ok_json(cli, "verify-export", side)["ok"]
    with out.open("ab") as f:
        f.write(b"\0")
    code, _, err = cli("verify-export", out)
    assert code == 3 and "changed llama.gguf" in err
    out.unlink()
    code, _, err = cli("verify-export", out)
    assert code == 3 and "missing llama.gguf" in err


def test_reuse_refusal_and_force(cli, exported):
    args = ("export", "llama", "--format", "hf", "--out", exported, "--param", "max_shard_size=200KB")
    before = snapshot(exported)
    again = ok_json(cli, *args)
    assert again["reused"] is True and again["artifact"] == "llama@1"
    assert snapshot(exported) == before  # nothing was written
    code, text, _ = cli(*args)
    assert code == 0 and text.startswith(f"reused {exported}: it already holds llama@1 as hf")

    refusals = [
        (("export", "chat-r4", "--format", "hf", "--out", exported), "it holds an export of llama@1"),
        (
            ("export", "llama", "--format", "hf", "--out", exported),
            "it holds an export as hf with other options (max_shard_size=200KB)",
        ),
    ]
    for cmd, reason in refusals:
        code, _, err = cli(*cmd)
        assert code == 2 and "already exists; choose another --out or pass --force" in err
        assert reason in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(exported) == before

    # a changed file is not "this very export" any more
    (exported / "config.json").write_text("{}")
    code, _, err = cli(*args)
    assert code == 2 and "its files no longer match its manifest: changed config.json" in err

    # a foreign folder (no manifest) is refused too, and left as it was
    foreign = exported.parent / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    code, _, err = cli("export", "llama", "--format", "hf", "--out", foreign)
    assert code == 2 and "it has no adaptr manifest" in err
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

    # --force replaces, and the result verifies
    result = ok_json(cli, *args, "--force")
    assert result["reused"] is False and ok_json(cli, "verify-export", exported)["ok"]
    result = ok_json(cli, "export", "chat-r4", "--format", "hf", "--out", foreign, "--force")
    assert not (foreign / "keep.txt").exists() and (foreign / "adapter_model.safetensors").is_file()
    assert ok_json(cli, "verify-export", foreign)["artifact"] == "chat-r4@1"
    assert sorted(p.name for p in exported.parent.iterdir()) == ["foreign", "llama"]  # no leftovers
