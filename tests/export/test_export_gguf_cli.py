"""``adaptr export --format gguf`` from the catalog: a merged model and an adapter, as llama.cpp reads them."""

from __future__ import annotations

import pytest
from cli_helpers import ok_json

from adaptr.testing import make_demo_set

gguf = pytest.importorskip("gguf")


def field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def test_merged_model_and_adapter_export(cli, tmp_path):
    demo = make_demo_set(tmp_path / "demo", tokenizer=True)
    ok_json(cli, "base", "add", demo["base"], "--name", "llama")
    ok_json(cli, "adapter", "add", demo["adapters"]["code-r8"], "--base", "llama", "--name", "code")
    merged = ok_json(cli, "merge", "--adapter", "code", "--name", "merged")
    before = ok_json(cli, "show", "merged")

    out = tmp_path / "dist" / "merged-q8_0.gguf"
    result = ok_json(cli, "export", "merged", "--format", "gguf", "--quant", "q8_0", "--out", out)
    assert result["options"] == {"quant": "q8_0"} and result["files"][0]["size"] == out.stat().st_size
    reader = gguf.GGUFReader(str(out))
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert ok_json(cli, "show", "merged") == before == ok_json(cli, "show", merged["ref"])

    adapter_out = tmp_path / "dist" / "code-lora.gguf"
    ok_json(cli, "export", "code", "--format", "gguf", "--out", adapter_out)
    reader = gguf.GGUFReader(str(adapter_out))
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b"} <= names

    code, _, err = cli("export", "merged", "--format", "gguf", "--out", out)
    assert code == 2 and "already exists" in err
