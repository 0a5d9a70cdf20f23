"""The catalog CLI end to end (in-process): register, list, show, versions, lineage, verify, rm.

Every JSON shape asserted here is the contract later issues (REST API, pipelines) build on.
The tests run on SQLite and on PostgreSQL (ids ending in [sqlite]/[postgres]; see conftest.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
from cli_helpers import ok_json

from adaptr.testing import make_llama_base, make_lora_adapter

SHOW_KEYS = {
    "name",
    "version",
    "kind",
    "content_hash",
    "size_bytes",
    "path",
    "files",
    "parents",
    "tags",
    "metadata",
}
EDGE_KEYS = {"parent", "child", "operation", "params", "plugin", "plugin_version", "seed"}


# --- helpers --------------------------------------------------------------------------------


def header(file: Path) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def numel_sum(file: Path) -> int:
    return sum(math.prod(t["shape"]) for t in header(file).values())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_content_hash(folder: Path, relpaths: list[str]) -> str:
    h = hashlib.sha256()
    for rel in sorted(relpaths):
        h.update(f"{rel}\0{sha(folder / rel)}\n".encode())
    return h.hexdigest()


def files_on_disk(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def register_demo(cli, demo_set: dict, *, base_name: str = "llama") -> dict:
    base = ok_json(cli, "base", "add", demo_set["base"], "--name", base_name)
    adapters = {
        name: ok_json(
            cli,
            "adapter",
            "add",
            path,
            "--base",
            base_name,
            "--tag",
            "demo",
            *(["--tag", "fast"] if name == "chat-r4" else []),
        )
        for name, path in demo_set["adapters"].items()
    }
    return {"base": base, "adapters": adapters}


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory, demo_set: dict) -> dict:
    """Adapters with the flagged features (built once per module on the demo base)."""
    root = tmp_path_factory.mktemp("extra")
    base = demo_set["base"]
    out = {
        "patterned": make_lora_adapter(
            root / "patterned",
            base,
            r=8,
            lora_alpha=16,
            target_modules=("q_proj", "v_proj", "down_proj"),
            rank_pattern={"v_proj": 4},
            alpha_pattern={"down_proj": 32},
            seed=5,
        ),
        "dora": make_lora_adapter(root / "dora", base, r=4, lora_alpha=8, use_dora=True, seed=6),
        "legacy": make_lora_adapter(root / "legacy", base, r=4, lora_alpha=8, weights_format="bin", seed=7),
        "pissa": make_lora_adapter(
            root / "pissa", base, r=4, lora_alpha=4, init_lora_weights="pissa", seed=8
        ),
    }
    # modules_to_save that resizes the vocabulary: the saved lm_head copy has 8 more rows.
    mts = make_lora_adapter(root / "resized", base, r=4, lora_alpha=8, modules_to_save=["lm_head"], seed=9)
    from safetensors.torch import load_file, save_file

    state = load_file(str(mts / "adapter_model.safetensors"))
    import torch

    key = "base_model.model.lm_head.weight"
    assert key in state
    state[key] = torch.cat([state[key], torch.randn(8, state[key].shape[1]) * 0.02])
    save_file(state, str(mts / "adapter_model.safetensors"), metadata={"format": "pt"})
    out["resized"] = mts
    return out


# --- registering and showing ------------------------------------------------------------------


def test_linked_base_show_json(cli, demo_set: dict, adaptr_home: Path) -> None:
    base_dir = Path(demo_set["base"]).resolve()
    a = ok_json(cli, "base", "add", base_dir, "--name", "llama")
    shown = ok_json(cli, "show", "llama")
    assert set(shown) >= SHOW_KEYS
    assert shown["name"] == "llama" and shown["version"] == 1 and shown["kind"] == "base"
    assert shown["content_hash"] == a["content_hash"]
    # a linked base is loaded from where it is: the original folder, nothing copied
    assert shown["path"] == str(base_dir) and shown["storage"] == "link"
    assert not (adaptr_home / "store" / "artifacts" / "llama").exists()
    assert shown["parents"] == [] and shown["tags"] == []

    assert [f["path"] for f in shown["files"]] == files_on_disk(base_dir)
    for f in shown["files"]:
        assert set(f) == {"path", "size", "sha256"}
        assert f["size"] == (base_dir / f["path"]).stat().st_size
        assert f["sha256"] == sha(base_dir / f["path"])
    assert shown["size_bytes"] == sum(f["size"] for f in shown["files"])
    assert shown["content_hash"] == expected_content_hash(base_dir, files_on_disk(base_dir))

    meta = shown["metadata"]
    cfg = json.loads((base_dir / "config.json").read_text())
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["hidden_size"] == cfg["hidden_size"] == 64
    assert meta["intermediate_size"] == cfg["intermediate_size"]
    assert meta["num_layers"] == cfg["num_hidden_layers"] == 2
    assert meta["vocab_size"] == cfg["vocab_size"]
    assert meta["dtype"] == "float32"
    assert meta["num_parameters"] == numel_sum(base_dir / "model.safetensors")


def test_relative_path_and_default_name(cli, demo_set: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir = Path(demo_set["base"]).resolve()
    monkeypatch.chdir(base_dir.parent)
    a = ok_json(cli, "base", "add", base_dir.name)
    assert a["name"] == base_dir.name and a["path"] == str(base_dir)


def test_copied_base_same_hash_and_store_folder(cli, demo_set: dict, adaptr_home: Path) -> None:
    base_dir = Path(demo_set["base"]).resolve()
    linked = ok_json(cli, "base", "add", base_dir, "--name", "linked")
    copied = ok_json(cli, "base", "add", base_dir, "--name", "copied", "--copy")
    assert copied["storage"] == "store"
    assert copied["content_hash"] == linked["content_hash"]  # same inputs, same hash
    path = Path(copied["path"])
    assert path.is_relative_to(adaptr_home / "store") and path.is_dir()
    assert files_on_disk(path) == files_on_disk(base_dir)
    assert copied["content_hash"] == expected_content_hash(path, files_on_disk(path))
    for rel in files_on_disk(path):
        assert (path / rel).read_bytes() == (base_dir / rel).read_bytes()
    # transformers needs nothing else to load it (config + weights side by side)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_adapters_show_metadata(cli, demo_set: dict) -> None:
    reg = register_demo(cli, demo_set)
    base_params = reg["base"]["metadata"]["num_parameters"]
    expect_scaling = {"chat-r4": 8 / 4, "code-r8": 16 / 8, "math-r16-rslora": 16 / math.sqrt(16)}
    for name, src in demo_set["adapters"].items():
        shown = ok_json(cli, "show", name)
        assert set(shown) >= SHOW_KEYS
        assert shown["kind"] == "adapter" and shown["base"] == "llama@1"
        assert shown["parents"] == [{"ref": "llama@1", "operation": "finetune"}]
        assert "demo" in shown["tags"]
        meta = shown["metadata"]
        cfg = json.loads((Path(src) / "adapter_config.json").read_text())
        assert meta["r"] == cfg["r"] and meta["use_rslora"] == cfg["use_rslora"]
        assert meta["lora_alpha"] == cfg["lora_alpha"]
        assert meta["scaling"], name
        for module, s in meta["scaling"].items():
            assert s == pytest.approx(expect_scaling[name]), module
        tp = numel_sum(Path(src) / "adapter_model.safetensors")
        assert meta["trainable_parameters"] == tp
        assert meta["trainable_share"] == pytest.approx(tp / base_params)
        path = Path(shown["path"])
        assert sorted(f["path"] for f in shown["files"]) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert files_on_disk(path) == ["adapter_config.json", "adapter_model.safetensors"]
        assert shown["content_hash"] == expected_content_hash(path, files_on_disk(path))
        assert shown["content_hash"] == expected_content_hash(Path(src), files_on_disk(Path(src)))


def test_rank_and_alpha_pattern_scaling(cli, demo_set: dict, extra: dict) -> None:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    a = ok_json(cli, "adapter", "add", extra["patterned"], "--base", "llama", "--name", "patterned")
    scaling = a["metadata"]["scaling"]
    assert set(scaling) == {
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    for module, s in scaling.items():
        if module.endswith("v_proj"):
            assert s == pytest.approx(16 / 4)
        elif module.endswith("down_proj"):
            assert s == pytest.approx(32 / 8)
        else:
            assert s == pytest.approx(16 / 8)
    assert a["metadata"]["ranks"] == [4, 8]
    assert a["metadata"]["rank_pattern"] == {"v_proj": 4}
    assert a["metadata"]["alpha_pattern"] == {"down_proj": 32}


def test_ls_json_and_filters(cli, demo_set: dict) -> None:
    register_demo(cli, demo_set)
    ok_json(cli, "base", "add", demo_set["base"], "--name", "other-base", "--tag", "spare")
    rows = ok_json(cli, "ls")
    assert [r["ref"] for r in rows] == [
        "chat-r4@1",
        "code-r8@1",
        "llama@1",
        "math-r16-rslora@1",
        "other-base@1",
    ]
    for r in rows:
        assert "files" not in r
        assert SHOW_KEYS - {"files"} <= set(r)
        full = ok_json(cli, "show", r["ref"])
        assert {k: v for k, v in full.items() if k != "files"} == r

    def refs(*flags: str) -> list[str]:
        return [r["ref"] for r in ok_json(cli, "ls", *flags)]

    assert refs("--kind", "base") == ["llama@1", "other-base@1"]
    assert refs("--kind", "adapter") == ["chat-r4@1", "code-r8@1", "math-r16-rslora@1"]
    assert refs("--base", "llama") == ["chat-r4@1", "code-r8@1", "math-r16-rslora@1"]
    assert refs("--base", "other-base") == []
    assert refs("--tag", "fast") == ["chat-r4@1"]
    assert refs("--tag", "spare") == ["other-base@1"]
    assert refs("--rank", "8") == ["code-r8@1"]
    assert refs("--rank", "16", "--kind", "adapter") == ["math-r16-rslora@1"]
    assert refs("--tag", "demo", "--rank", "4") == ["chat-r4@1"]
    assert [r["ref"] for r in ok_json(cli, "adapter", "ls", "--rank", "4")] == ["chat-r4@1"]
    assert [r["ref"] for r in ok_json(cli, "base", "ls")] == ["llama@1", "other-base@1"]
    # human output is a table on stdout
    code, out, _ = cli("ls")
    assert code == 0 and "chat-r4@1" in out and "REF" in out
    code, out, _ = cli("show", "chat-r4")
    assert code == 0 and "adapter_model.safetensors" in out


def test_same_inputs_same_content_hash(cli, demo_set: dict, tmp_path: Path) -> None:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    src = demo_set["adapters"]["chat-r4"]
    twin = make_lora_adapter(
        tmp_path / "twin",
        demo_set["base"],
        r=4,
        lora_alpha=8,
        target_modules=("q_proj", "v_proj"),
        seed=1,
        base_model_name_or_path=str(Path(demo_set["base"]).resolve()),
    )
    a = ok_json(cli, "adapter", "add", src, "--base", "llama", "--name", "a")
    b = ok_json(cli, "adapter", "add", twin, "--base", "llama", "--name", "b")
    assert a["content_hash"] == b["content_hash"]
    c = ok_json(cli, "adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama", "--name", "c")
    assert c["content_hash"] != a["content_hash"]


def test_versions(cli, demo_set: dict) -> None:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    first = ok_json(cli, "adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama", "--name", "x")
    assert first["version"] == 1 and first["ref"] == "x@1"
    code, out, err = cli("adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama", "--name", "x")
    assert code == 2 and out == ""
    assert "x" in err and "--new-version" in err and "Traceback" not in err
    second = ok_json(
        cli,
        "adapter",
        "add",
        demo_set["adapters"]["code-r8"],
        "--base",
        "llama",
        "--name",
        "x",
        "--new-version",
    )
    assert second["version"] == 2 and second["ref"] == "x@2"
    assert ok_json(cli, "show", "x")["version"] == 2  # NAME is the latest
    assert ok_json(cli, "show", "x@1")["content_hash"] == first["content_hash"]
    assert ok_json(cli, "show", "x@2")["content_hash"] == second["content_hash"]
    assert Path(ok_json(cli, "show", "x@1")["path"]) != Path(second["path"])
    assert [r["ref"] for r in ok_json(cli, "ls", "--kind", "adapter")] == ["x@1", "x@2"]
    code, _, err = cli("show", "x@3")
    assert code == 2 and "version 3" in err
    # a new version must keep the kind
    code, _, err = cli("base", "add", demo_set["base"], "--name", "x", "--new-version")
    assert code == 2 and "adapter" in err


def test_lineage_json_and_tree(cli, demo_set: dict) -> None:
    register_demo(cli, demo_set)
    g = ok_json(cli, "lineage", "llama")
    assert {"nodes", "edges"} <= set(g)
    assert sorted(n["ref"] for n in g["nodes"]) == ["chat-r4@1", "code-r8@1", "llama@1", "math-r16-rslora@1"]
    for n in g["nodes"]:
        assert "files" not in n and {"name", "version", "kind", "content_hash"} <= set(n)
    assert len(g["edges"]) == 3
    for e in g["edges"]:
        assert set(e) >= EDGE_KEYS
        assert e["parent"] == "llama@1" and e["operation"] == "finetune"
        assert e["plugin"] == "formats" and e["plugin_version"]
        assert isinstance(e["params"], dict) and e["seed"] is None
    # from an adapter: its ancestor, not its siblings
    g = ok_json(cli, "lineage", "chat-r4")
    assert sorted(n["ref"] for n in g["nodes"]) == ["chat-r4@1", "llama@1"]
    assert [(e["parent"], e["child"]) for e in g["edges"]] == [("llama@1", "chat-r4@1")]

    code, out, err = cli("lineage", "llama")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("llama@1")
    assert any(line.startswith(("├── chat-r4@1", "└── chat-r4@1")) for line in lines)
    assert any(line.startswith("└── ") for line in lines)
    assert "finetune" in out


def test_verify_then_drift(cli, demo_set: dict, tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(demo_set["base"], base)
    ok_json(cli, "base", "add", base, "--name", "llama")
    ok_json(cli, "adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama")
    code, out, err = cli("verify")
    assert code == 0, err
    assert "llama@1: ok" in out
    reports = ok_json(cli, "verify", "llama")
    assert reports[0]["ok"] and reports[0]["problems"] == []

    cfg = base / "config.json"
    cfg.write_text(cfg.read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    code, out, err = cli("verify", "llama")
    assert code == 3
    assert "config.json" in out and "modified" in out
    assert "llama@1" in err and "Traceback" not in err
    code, out, _ = cli("verify", "--json")
    assert code == 3
    by_ref = {r["ref"]: r for r in json.loads(out)}
    assert by_ref["chat-r4@1"]["ok"]
    assert by_ref["llama@1"]["problems"][0]["path"] == "config.json"
    assert by_ref["llama@1"]["problems"][0]["problem"] == "modified"
    (base / "model.safetensors").unlink()
    reports = json.loads(cli("verify", "llama", "--json")[1])
    assert {"path": "model.safetensors", "problem": "missing"} in reports[0]["problems"]


def test_rm_refuses_with_descendants_then_force(cli, demo_set: dict, adaptr_home: Path) -> None:
    register_demo(cli, demo_set)
    before = ok_json(cli, "ls")
    code, _out, err = cli("rm", "llama")
    assert code == 2
    for name in demo_set["adapters"]:
        assert f"{name}@1" in err
    assert "--force" in err and "Traceback" not in err
    assert ok_json(cli, "ls") == before

    # --force asks first; "no" keeps everything
    code, _, err = cli("rm", "llama", "--force", input="n\n")
    assert code == 1
    assert ok_json(cli, "ls") == before

    removed = ok_json(cli, "rm", "llama", "--force", "--yes")
    assert removed["removed"] == ["chat-r4@1", "code-r8@1", "llama@1", "math-r16-rslora@1"]
    assert ok_json(cli, "ls") == []
    store = adaptr_home / "store"
    assert not any((store / "artifacts").iterdir())
    assert not [p for p in (store / "objects").rglob("*") if p.is_file()]
    assert Path(demo_set["base"], "model.safetensors").is_file()  # a linked base's files are not ours
    code, _, err = cli("show", "llama")
    assert code == 2 and "not in the catalog" in err


def test_rm_leaf_and_single_version(cli, demo_set: dict) -> None:
    register_demo(cli, demo_set)
    ok_json(
        cli,
        "adapter",
        "add",
        demo_set["adapters"]["code-r8"],
        "--base",
        "llama",
        "--name",
        "chat-r4",
        "--new-version",
    )
    assert ok_json(cli, "rm", "chat-r4@1")["removed"] == ["chat-r4@1"]
    assert ok_json(cli, "show", "chat-r4")["version"] == 2
    code, out, _ = cli("rm", "code-r8")
    assert code == 0 and "code-r8@1" in out
    assert sorted(r["ref"] for r in ok_json(cli, "ls")) == ["chat-r4@2", "llama@1", "math-r16-rslora@1"]


def test_rm_keeps_shared_objects(cli, demo_set: dict, adaptr_home: Path) -> None:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    src = demo_set["adapters"]["chat-r4"]
    a = ok_json(cli, "adapter", "add", src, "--base", "llama", "--name", "one")
    b = ok_json(cli, "adapter", "add", src, "--base", "llama", "--name", "two")
    assert a["content_hash"] == b["content_hash"]
    objects = adaptr_home / "store" / "objects"
    shas = sorted(f["sha256"] for f in a["files"])
    assert sorted(p.name for p in objects.rglob("*") if p.is_file()) == shas  # stored once
    assert (Path(b["path"]) / "adapter_model.safetensors").stat().st_nlink == 3  # object + two folders

    ok_json(cli, "rm", "one")
    assert not Path(a["path"]).exists()
    code, _out, err = cli("verify", "two")
    assert code == 0, err
    assert sorted(p.name for p in objects.rglob("*") if p.is_file()) == shas

    ok_json(cli, "rm", "two")
    assert [p for p in objects.rglob("*") if p.is_file()] == []


def test_db_current_and_plugins(cli, backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptr.catalog.db import SCHEMA_REVISION

    if backend.name == "postgres":  # a shared server is upgraded explicitly, never on first use
        monkeypatch.setenv("ADAPTR_DATABASE_URL", backend.blank_url(tmp_path))
    # `db current` only looks: a blank catalog is reported as such, first real use upgrades it
    assert ok_json(cli, "db", "current") == {"current": None, "head": SCHEMA_REVISION, "up_to_date": False}
    if backend.name == "postgres":
        code, out, err = cli("ls")
        assert code == 1 and out == "" and "adaptr db upgrade" in err
        code, out, err = cli("db", "upgrade")
        assert code == 0, err
    ok_json(cli, "ls")
    info = ok_json(cli, "db", "current")
    assert info == {"current": SCHEMA_REVISION, "head": SCHEMA_REVISION, "up_to_date": True}
    plugins = {p["name"]: p for p in ok_json(cli, "plugins")}
    fmt = plugins["formats"]
    assert fmt["distribution"] == "adaptr" and fmt["version"]
    assert fmt["registers"]["reader"] == ["hf-safetensors", "peft-lora"]
    assert "register_readers" in fmt["hooks"]
    code, out, _ = cli("plugins")
    assert code == 0 and "formats" in out and "peft-lora" in out


def test_init(cli, adaptr_home: Path, backend) -> None:
    info = ok_json(cli, "init")
    assert Path(info["home"]) == adaptr_home.resolve()
    assert (adaptr_home / "store").is_dir()
    assert (adaptr_home / "catalog.db").is_file() == (backend.name == "sqlite")


# --- flagged adapters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "flag"),
    [
        ("dora", "dora"),
        ("legacy", "legacy_bin"),
        ("resized", "vocab_resize"),
        ("pissa", "residual_init:pissa"),
    ],
)
def test_flagged_adapters_are_accepted(cli, demo_set: dict, extra: dict, key: str, flag: str) -> None:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    a = ok_json(cli, "adapter", "add", extra[key], "--base", "llama", "--name", key)
    assert flag in a["flags"]
    assert ok_json(cli, "show", key)["flags"] == a["flags"]
    assert [r["ref"] for r in ok_json(cli, "ls", "--kind", "adapter")] == [f"{key}@1"]
    code, out, _ = cli("adapter", "add", extra[key], "--base", "llama", "--name", f"{key}-2")
    assert code == 0 and flag in out  # the human line names the flags too
    meta = a["metadata"]
    if key == "dora":
        assert meta["use_dora"] is True
    if key == "resized":
        assert "modules_to_save" in a["flags"] and meta["modules_to_save"] == ["lm_head"]
    if key == "pissa":
        assert meta["init_lora_weights"] == "pissa"


def test_legacy_bin_is_stored_as_safetensors(cli, demo_set: dict, extra: dict) -> None:
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    a = ok_json(cli, "adapter", "add", extra["legacy"], "--base", "llama", "--name", "legacy")
    path = Path(a["path"])
    assert files_on_disk(path) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [f["path"] for f in a["files"]] == ["adapter_config.json", "adapter_model.safetensors"]
    import torch
    from safetensors.torch import load_file

    stored = load_file(str(path / "adapter_model.safetensors"))
    original = torch.load(extra["legacy"] / "adapter_model.bin", weights_only=True)
    assert stored.keys() == original.keys()
    for k, v in original.items():
        assert torch.equal(stored[k], v), k
    assert a["metadata"]["trainable_parameters"] == sum(v.numel() for v in original.values())


@pytest.mark.sqlite_only  # loads transformers and PEFT: about the files, not the database
def test_peft_loads_the_store_folder(cli, demo_set: dict) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    base = ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    a = ok_json(cli, "adapter", "add", demo_set["adapters"]["code-r8"], "--base", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(base["path"])
    ids = torch.tensor([[1, 5, 9, 17]])
    with torch.no_grad():
        before = model(ids).logits
    peft_model = peft.PeftModel.from_pretrained(model, a["path"]).eval()
    with torch.no_grad():
        after = peft_model(ids).logits
    assert not torch.allclose(before, after, atol=1e-6)
    lora_layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == a["metadata"]["num_modules"]
    for layer in lora_layers:
        assert layer.r["default"] == 8 and layer.scaling["default"] == pytest.approx(2.0)


def test_gqa_smaller_base_adapter_roundtrip(cli, tmp_path: Path) -> None:
    """A second base with other sizes gets its own adapters, filtered by --base."""
    small = make_llama_base(tmp_path / "small", hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    ok_json(cli, "base", "add", small, "--name", "small")
    ad = make_lora_adapter(tmp_path / "small-ad", small, r=2, lora_alpha=4)
    a = ok_json(cli, "adapter", "add", ad, "--base", "small")
    assert a["base"] == "small@1" and a["metadata"]["r"] == 2
    assert a["metadata"]["trainable_share"] == pytest.approx(
        numel_sum(ad / "adapter_model.safetensors") / numel_sum(small / "model.safetensors")
    )
