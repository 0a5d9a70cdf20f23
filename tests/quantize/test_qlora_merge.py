"""QLoRA merges through the engine: into the round-tripped base, re-quantized in the same pass, with errors.

The test quantizer (tests/plugin_doubles.py) keeps the arithmetic checkable against a float64
reference; the NF4 oracle tests (bitsandbytes + PEFT) are in test_qlora_nf4.py.
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


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """float64 ΔW per base weight, straight from the PEFT files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    t = read_tensors(adapter)
    out = {}
    for key, a in t.items():
        if key.endswith("lora_A.weight"):
            b = t[key.replace("lora_A", "lora_B")]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[target] = scale * (b.double() @ a.double())
    return out


def test_qlora_merges_into_the_round_tripped_base(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(cli, "merge", "--adapter", "code-r8", "--qlora", "rowint8", "--name", "m")
    assert art["kind"] == "merged"
    assert art["metadata"]["qlora"] == {
        "method": "rowint8",
        "params": {"levels": 127.0},
        "skip": list(DEFAULT_SKIP),
    }
    q = plugin_doubles.RowInt8()
    base = read_tensors(demo_set["base"])
    deltas = lora_deltas(demo_set["adapters"]["code-r8"])
    out = read_tensors(art["path"])
    rounded = 0
    for name, w in base.items():
        if w.dim() == 2 and not module_skipped(name.removesuffix(".weight"), DEFAULT_SKIP):
            w_q = q.dequantize(name, q.quantize(name, w, {"levels": 127.0}), {"levels": 127.0}, w.dtype)
            expect = w_q.double() + deltas.get(name, 0)
            rounded += 1
        else:
            expect = w.double()
        torch.testing.assert_close(out[name].double(), expect, rtol=1e-6, atol=1e-7, msg=name)
    assert rounded == 14
    lineage = ok_json(cli, "lineage", "m")
    edge = next(e for e in lineage["edges"] if e["child"] == "m@1" and e["parent"] == "llama@1")
    assert edge["params"]["qlora"]["method"] == "rowint8"


def test_trained_on_recorded_at_import_is_honoured(cli, demo_set):
    ok_json(cli, "base", "add", demo_set["base"], "--name", "llama")
    a = ok_json(
        cli, "adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama",
        "--trained-on", "rowint8", "--trained-on-param", "levels=100",
    )  # fmt: skip
    assert a["metadata"]["trained_on"] == {"method": "rowint8", "params": {"levels": 100.0}}
    implicit = ok_json(cli, "merge", "--adapter", "chat-r4", "--name", "implicit")
    explicit = ok_json(
        cli,
        "merge",
        "--adapter",
        "chat-r4",
        "--qlora",
        "rowint8",
        "--qlora-param",
        "levels=100",
        "--name",
        "e",
    )
    plain = ok_json(
        cli,
        "merge",
        "--adapter",
        "chat-r4",
        "--qlora",
        "rowint8",
        "--qlora-param",
        "levels=127",
        "--name",
        "p",
    )
    assert implicit["metadata"]["qlora"]["params"] == {"levels": 100.0}
    assert implicit["content_hash"] == explicit["content_hash"] != plain["content_hash"]


def test_requantize_in_the_same_pass_equals_quantizing_the_merge(cli, demo_set):
    register_demo(cli, demo_set)
    merged = ok_json(cli, "merge", "--adapter", "code-r8", "--qlora", "rowint8", "--name", "m16")
    two_step = ok_json(cli, "quantize", "m16", "--method", "rowint8", "--name", "m16-q")
    one_pass = ok_json(
        cli, "merge", "--adapter", "code-r8", "--qlora", "rowint8", "--requantize", "rowint8", "--name", "mq"
    )
    assert one_pass["kind"] == "quantized" and one_pass["parents"][0]["operation"] == "merge"
    a, b = read_tensors(two_step["path"]), read_tensors(one_pass["path"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    errors_a, errors_b = two_step["metadata"]["quant_errors"], one_pass["metadata"]["quant_errors"]
    assert errors_a.keys() == errors_b.keys()
    for k in errors_a:
        assert errors_b[k] == pytest.approx(errors_a[k]), k
    cfg = json.loads((Path(one_pass["path"]) / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rowint8"
    assert "quantization_config" not in json.loads((Path(merged["path"]) / "config.json").read_text())


def test_qlora_verify_reports_three_models(cli, demo_set):
    register_demo(cli, demo_set)
    art = ok_json(
        cli, "merge", "--adapter", "code-r8", "--qlora", "rowint8", "--requantize", "rowint8",
        "--quant-param", "levels=7", "--verify", "--name", "checked",
    )  # fmt: skip
    r = art["metadata"]["qlora_report"]
    assert r["reference"] == "code-r8@1 unmerged on the rowint8 base"
    merged, requant = r["models"]["merged_16bit"], r["models"]["requantized"]
    # The 16-bit merge is the unmerged adapter on the quantized base up to float rounding; a
    # 3-bit re-quantization is visibly further away.
    assert merged["max_abs_logit_diff"] < 1e-4 < requant["max_abs_logit_diff"]
    assert r["ok"] and art["metadata"]["verify"]["ok"]
    _, out, _ = cli("show", "checked")
    assert "max |Δlogit| against code-r8@1 unmerged on the rowint8 base: merged_16bit" in out


def test_qlora_bad_input(cli, demo_set, tmp_path):
    register_demo(cli, demo_set)
    ok_json(cli, "quantize", "llama", "--method", "rowint8", "--name", "q")
    ok_json(cli, "adapter", "add", demo_set["adapters"]["chat-r4"], "--base", "llama", "--name", "qlo",
            "--trained-on", "rowint8")  # fmt: skip
    before = ok_json(cli, "ls")
    cases = [
        (("--adapter", "chat-r4", "--qlora", "nope", "--name", "x"), "unknown quantizer 'nope'"),
        (("--adapter", "chat-r4", "--qlora-param", "levels=3", "--name", "x"), "--qlora-param needs --qlora"),
        (("--adapter", "chat-r4", "--quant-param", "levels=3", "--name", "x"), "--quant-param needs --requantize"),
        (("--adapter", "chat-r4", "--skip", "lm_head", "--name", "x"), "--skip chooses what --qlora"),
        (("--adapter", "qlo", "--qlora", "wrongparts", "--name", "x"), "trained on a rowint8 base, not wrongparts"),
        (("--adapter", "qlo", "--adapter", "code-r8", "--name", "x"), "trained on different bases"),
        (("--adapter", "chat-r4", "--requantize", "rowint8", "--verify", "--name", "x"), "add --qlora"),
        (("--adapter", "chat-r4", "--qlora", "rowint8", "--skip", "model", "--skip", "lm_head", "--name", "x"),
         "quantizes no weight"),
        (("--adapter", "chat-r4", "--base", "q", "--qlora", "rowint8", "--name", "x"), "registered on llama@1, not on q@1"),
        (("--adapter", "chat-r4", "--requantize", "wrongparts", "--name", "x"), "report this to the plugin"),
    ]  # fmt: skip
    for args, message in cases:
        code, out, err = cli("merge", *args)
        assert code in (1, 2), (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert ok_json(cli, "ls") == before
