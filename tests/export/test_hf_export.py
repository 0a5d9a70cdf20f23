"""``adaptr export --format hf``: the Hugging Face layout, what transformers and PEFT load, the model card
and the manifest every export carries (folder formats inside, GGUF beside the file)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import ok_json, read_tensors

from adaptr.testing import make_demo_set

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROBE = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return make_demo_set(tmp_path_factory.mktemp("hf") / "demo", tokenizer=True)


def catalog_with_lineage(cli, demo) -> None:
    """llama (base) → code (adapter) → merged (merge) → q4 (nf4)."""
    ok_json(cli, "base", "add", demo["base"], "--name", "llama")
    ok_json(cli, "adapter", "add", demo["adapters"]["code-r8"], "--base", "llama", "--name", "code")
    ok_json(cli, "merge", "--adapter", "code", "--name", "merged")
    ok_json(cli, "quantize", "merged", "--method", "nf4", "--name", "q4")


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", **kwargs)


def test_model_exports_load_in_transformers(cli, demo, tmp_path):
    catalog_with_lineage(cli, demo)
    merged, q4 = ok_json(cli, "show", "merged"), ok_json(cli, "show", "q4")

    # re-sharded: small shards, an index, and every side file
    out = tmp_path / "dist" / "merged"
    result = ok_json(
        cli, "export", "merged", "--format", "hf", "--out", out, "--param", "max_shard_size=100KB"
    )
    assert result["reused"] is False and result["options"] == {"max_shard_size": "100KB"}
    assert result["manifest"] == str(out / "adaptr-manifest.json")
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    assert files_in(out) == sorted(
        [
            *shards,
            "README.md",
            "adaptr-manifest.json",
            "config.json",
            "generation_config.json",
            "model.safetensors.index.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (Path(merged["path"]) / side).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    ours, theirs = read_tensors(out), read_tensors(merged["path"])
    assert set(index["weight_map"]) == set(ours) == set(theirs)
    assert sorted(set(index["weight_map"].values())) == shards
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert torch.equal(logits(load(out)), logits(load(merged["path"])))

    # the quantized (nf4) artifact: its shard plan is unchanged, so the file is copied as it is
    q_out = tmp_path / "dist" / "q4"
    ok_json(cli, "export", "q4", "--format", "hf", "--out", q_out)
    assert (q_out / "model.safetensors").read_bytes() == (Path(q4["path"]) / "model.safetensors").read_bytes()
    assert "quantization_config" in json.loads((q_out / "config.json").read_text())
    model = load(q_out)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(model), logits(load(q4["path"])))

    front, body = card(out)
    assert front["base_model"] == "llama" and front["base_model_relation"] == "merge"
    assert front["library_name"] == "transformers" and {"adaptr", "simple"} <= set(front["tags"])
    assert "## Recipe" in body and "merge of `llama@1`, `code@1`" in body
    front, body = card(q_out)
    assert front["base_model_relation"] == "quantized" and {"adaptr", "nf4", "simple"} <= set(front["tags"])
    lineage = body.split("## Lineage", 1)[1]
    assert [ref in lineage for ref in ("`llama@1`", "`code@1`", "`merged@1`", "`q4@1`")] == [True] * 4
    assert "method nf4" in lineage


def test_adapter_export_loads_in_peft(cli, demo, tmp_path):
    ok_json(cli, "base", "add", demo["base"], "--name", "llama")
    art = ok_json(
        cli,
        "adapter",
        "add",
        demo["adapters"]["math-r16-rslora"],
        "--base",
        "llama",
        "--name",
        "m",
        "--tag",
        "math",
    )
    out = tmp_path / "m-peft"
    ok_json(cli, "export", "m", "--format", "hf", "--out", out)
    assert files_in(out) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "adaptr-manifest.json",
    ]

    def peft_logits(folder):
        return logits(peft.PeftModel.from_pretrained(load(demo["base"]), str(folder)))

    exported = peft_logits(out)
    assert torch.equal(exported, peft_logits(art["path"]))
    assert not torch.equal(exported, logits(load(demo["base"])))  # the adapter is applied
    front, body = card(out)
    assert front["base_model_relation"] == "adapter" and front["library_name"] == "peft"
    assert front["base_model"] == "llama" and {"adaptr", "lora", "math"} <= set(front["tags"])
    assert "PeftModel.from_pretrained" in body

    for bad in ("lots", "0"):
        code, _, err = cli(
            "export", "llama", "--format", "hf", "--out", tmp_path / "x", "--param", f"max_shard_size={bad}"
        )
        assert code == 2 and ("max_shard_size" in err or "cannot parse size" in err), err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adaptr-home", "m-peft"]  # no staging leftovers


def test_manifest_lists_every_file_and_the_lineage(cli, demo, tmp_path):
    catalog_with_lineage(cli, demo)  # q4 is a descendant of merged: it stays out of merged's chain
    out = tmp_path / "merged"
    result = ok_json(cli, "export", "merged", "--format", "hf", "--out", out)
    manifest = json.loads((out / "adaptr-manifest.json").read_text())
    shown = ok_json(cli, "show", "merged")

    assert manifest["schema"] == "adaptr-export-manifest/1" and manifest["layout"] == "folder"
    art = manifest["artifact"]
    assert (art["ref"], art["name"], art["version"], art["kind"]) == ("merged@1", "merged", 1, "merged")
    assert art["content_hash"] == shown["content_hash"] and art["base"] == "llama@1"
    assert manifest["format"] == "hf" and manifest["options"] == {"max_shard_size": "5GB"}
    plugins = {p["name"]: p for p in ok_json(cli, "plugins")}
    assert manifest["exporter"] == {"plugin": "hf", "version": plugins["hf"]["version"]}
    import adaptr

    assert manifest["adaptr_version"] == adaptr.__version__

    listed = {f["path"]: f for f in manifest["files"]}
    assert sorted(listed) == [f for f in files_in(out) if f != "adaptr-manifest.json"]
    for rel, entry in listed.items():
        assert entry["size"] == (out / rel).stat().st_size and entry["sha256"] == sha256(out / rel)
    assert manifest["files"] == result["files"]

    lineage = ok_json(cli, "lineage", "merged")
    chain = [e for e in lineage["edges"] if e["child"] in ("merged@1", "code@1")]
    assert manifest["lineage"]["edges"] == chain and len(chain) == 3
    assert {e["operation"] for e in chain} == {"finetune", "merge"}
    merge_edge = next(e for e in chain if e["operation"] == "merge")
    assert merge_edge["params"]["strategy"] == "simple" and merge_edge["seed"] == 0
    assert merge_edge["plugin"] == "linear" and merge_edge["params"]["output_hash"] == shown["content_hash"]
    assert [n["ref"] for n in manifest["lineage"]["nodes"]] == ["llama@1", "code@1", "merged@1"]

    # exporting the same artifact again elsewhere writes the same manifest, byte for byte
    ok_json(cli, "export", "merged", "--format", "hf", "--out", tmp_path / "again")
    assert (tmp_path / "again" / "adaptr-manifest.json").read_bytes() == (
        out / "adaptr-manifest.json"
    ).read_bytes()


def test_gguf_export_gets_a_manifest_beside_the_file(cli, demo, tmp_path):
    pytest.importorskip("gguf")
    ok_json(cli, "base", "add", demo["base"], "--name", "llama")
    out = tmp_path / "dist" / "llama.gguf"
    result = ok_json(cli, "export", "llama", "--format", "gguf", "--out", out)
    side = tmp_path / "dist" / "llama.gguf.adaptr-manifest.json"
    assert result["manifest"] == str(side) and files_in(out.parent) == [out.name, side.name]
    manifest = json.loads(side.read_text())
    assert manifest["layout"] == "file" and manifest["format"] == "gguf"
    assert manifest["files"] == [{"path": "llama.gguf", "size": out.stat().st_size, "sha256": sha256(out)}]
    assert manifest["exporter"]["plugin"] == "gguf" and manifest["options"] == {"quant": "f16"}

    again = ok_json(cli, "export", "llama", "--format", "gguf", "--out", out)
    assert again["reused"] is True and again["files"] == result["files"]
    code, _, err = cli("export", "llama", "--format", "gguf", "--out", out, "--quant", "q8_0")
    assert code == 2 and "already exists" in err and "other options (quant=f16)" in err
