"""``adaptr quantize`` as a user drives it: the streamed output, the report, lineage, skip rules, bad input.

The numbers of each built-in format are checked in tests/quant; here a small test quantizer
(tests/plugin_doubles.py) checks what the engine and the service do around any quantizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import plugin_doubles
import pytest
import torch
from cli_helpers import ok_json, read_tensors, register_demo

from adaptr.engine import DEFAULT_SKIP, module_skipped


@pytest.fixture(autouse=True)
def doubles():
    plugin_doubles.install()


def test_quantize_streams_parts_records_lineage_and_report(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(
        cli, "quantize", "llama", "--method", "rowint8", "--name", "llama-q", "--param", "levels=100"
    )
    assert art["kind"] == "quantized" and art["base"] == "llama@1"
    assert art["parents"] == [{"ref": "llama@1", "operation": "quantize"}]
    q = art["metadata"]["quantization"]
    assert q["method"] == "rowint8" and q["params"] == {"levels": 100.0}
    assert q["skip"] == list(DEFAULT_SKIP)

    src = read_tensors(demo_set["base"])
    out = read_tensors(art["path"])
    quantizer = plugin_doubles.RowInt8()
    quantized = [n for n in src if n.endswith("proj.weight")]
    assert q["quantized_tensors"] == len(quantized) == len(art["metadata"]["quant_errors"])
    for name, value in src.items():
        if name in quantized:
            expect = quantizer.quantize(name, value, {"levels": 100.0})
            for part, t in expect.items():
                assert torch.equal(out[part], t), part
            # The stored report is the error of exactly these parts.
            approx = quantizer.dequantize(name, expect, {"levels": 100.0}, value.dtype).double()
            ref = value.double()
            rel = float((approx - ref).norm() / ref.norm())
            stats = art["metadata"]["quant_errors"][name]
            assert stats["rel_error"] == pytest.approx(rel, rel=1e-5)
            assert stats["max_abs_error"] == pytest.approx(float((approx - ref).abs().max()), rel=1e-5)
            assert stats["snr_db"] == pytest.approx(-20 * torch.log10(torch.tensor(rel)).item(), rel=1e-4)
        else:  # norms, embeddings and the head are copied bit for bit
            assert torch.equal(out[name], value), name
    cfg = json.loads((Path(art["path"]) / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "rowint8",
        "levels": 100.0,
        "skip": list(DEFAULT_SKIP),
    }
    summary = art["metadata"]["quant_report"]
    assert summary["tensors"] == len(quantized) and summary["stored_bytes"] < summary["source_bytes"]

    lineage = ok_json(cli, "lineage", "llama-q")
    (edge,) = [e for e in lineage["edges"] if e["child"] == "llama-q@1"]
    assert edge["operation"] == "quantize" and edge["plugin"] == "doubles"
    assert edge["params"]["method"] == "rowint8" and edge["params"]["params"] == {"levels": 100.0}

    code, text, _ = cli("show", "llama-q")
    assert code == 0
    assert "quantization: 14 tensors, mean relative error" in text
    assert "model.layers.1.mlp.down_proj.weight" in text and "SNR dB" in text


def test_skip_patterns_follow_transformers(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(
        cli,
        "quantize",
        "llama",
        "--method",
        "rowint8",
        "--name",
        "q",
        "--skip",
        "lm_head",
        "--skip",
        "down_proj",
    )
    written = set(read_tensors(art["path"]))
    assert "model.layers.0.mlp.down_proj.row_scale" not in written
    assert "model.layers.0.self_attn.q_proj.row_scale" in written
    # --skip replaces the default list: the embeddings are quantized now.
    assert "model.embed_tokens.row_scale" in written
    assert art["metadata"]["quantization"]["skip"] == ["lm_head", "down_proj"]

    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [
        "lm_head",
        "model.embed_tokens",
        "model.layers.1.mlp.down_proj",
        "model.layers.11.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "transformer.wte",
        "model.decoder.layers.23.fc1",
    ]
    patterns = [
        ["lm_head"],
        ["model.layers.1"],
        ["model.layers.1.*"],
        ["mlp.gate"],
        ["mlp"],
        ["fc1", "q_proj"],
        list(DEFAULT_SKIP),
    ]
    for pats in patterns:
        for name in names:
            assert module_skipped(name, pats) is not should_convert_module(name, pats), (name, pats)


def test_bad_input_is_one_line_and_leaves_nothing(cli, demo_set, adaptr_home):
    register_demo(cli, demo_set)
    ok_json(cli, "quantize", "llama", "--method", "rowint8", "--name", "q")
    before = ok_json(cli, "ls")

    cases = [
        (("llama", "--method", "nope", "--name", "x"), 2, "unknown quantizer 'nope'"),
        (("q", "--method", "rowint8", "--name", "x"), 2, "q@1 is already quantized"),
        (("chat-r4", "--method", "rowint8", "--name", "x"), 2, "chat-r4@1 is a adapter; quantize a base"),
        (("llama", "--method", "rowint8", "--name", "x", "--param", "bits=3"), 2, "does not take bits"),
        (("llama", "--method", "rowint8", "--name", "x", "--double-quant"), 2, "does not take double_quant"),
        (("llama", "--method", "rowint8", "--name", "q", "--param", "levels=9"), 2, "already exists"),
        (
            ("llama", "--method", "rowint8", "--name", "x", "--skip", "model", "--skip", "lm_head"),
            2,
            "has no weight",
        ),
        (("llama", "--method", "wrongparts", "--name", "x"), 1, "report this to the plugin's authors"),
    ]
    for args, code, message in cases:
        got, out, err = cli("quantize", *args)
        assert got == code, (args, out, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
    assert ok_json(cli, "ls") == before
    staging = adaptr_home / "store" / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_quantize_yaml_config_uses_the_same_keys(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    cfg = tmp_path / "q.yaml"
    cfg.write_text("input: llama\nmethod: rowint8\nparams: {levels: 50}\nskip: [lm_head]\nname: from-yaml\n")
    art = ok_json(cli, "quantize", "--config", cfg)
    assert art["metadata"]["quantization"]["params"] == {"levels": 50.0}
    cfg.write_text("input: llama\nmethod: rowint8\nname: x\nbits: 4\n")
    code, _, err = cli("quantize", "--config", cfg)
    assert code == 2 and "bits: Extra inputs are not permitted" in err
