"""The backend choice: auto, torch and triton through the CLI, and a whole merge on Triton's interpreter.

A ``--backend triton`` merge of a tiny model, run by the kernels under ``TRITON_INTERPRET=1``, must
equal the torch reference's for simple, ties and dare_ties with the same seed; asking for triton
where it cannot run fails with one line and registers nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import ok_json

from adaptr.testing import make_llama_base, make_lora_adapter

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Odd sizes (not multiples of any tile), two adapters of different ranks on several modules."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_llama_base(
        root / "base",
        hidden_size=40,
        intermediate_size=72,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        dtype="bfloat16",
        seed=11,
    )
    targets = ("q_proj", "v_proj", "down_proj")
    ad = [
        make_lora_adapter(root / f"ad{i}", base, r=r, target_modules=targets, seed=20 + i, init_scale=0.2)
        for i, r in enumerate((3, 16))
    ]
    return {"base": base, "adapters": ad}


def register(cli, tiny: dict) -> None:
    ok_json(cli, "base", "add", tiny["base"], "--name", "tb")
    for i, path in enumerate(tiny["adapters"]):
        ok_json(cli, "adapter", "add", path, "--base", "tb", "--name", f"a{i}")


def test_auto_chooses_by_device() -> None:
    from adaptr import backends

    chosen = backends.select("auto")
    assert chosen.name == ("triton" if CUDA else "torch"), chosen
    assert backends.select("torch") is backends.TORCH


def test_explicit_triton_without_a_gpu_is_refused(cli, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    register(cli, tiny)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = cli("merge", "--adapter", "a0", "--name", "m", "--backend", "triton")
    assert code == 1, (out, err)
    assert "backend 'triton' cannot run here: no CUDA device is visible" in err
    assert "TRITON_INTERPRET=1" in err and "Traceback" not in err
    assert ok_json(cli, "ls", "--kind", "merged") == []


def test_unknown_backend_is_refused_before_work(cli, tiny) -> None:
    register(cli, tiny)
    code, _out, err = cli("merge", "--adapter", "a0", "--name", "m", "--backend", "cuda")
    assert code == 2
    assert "unknown backend 'cuda'; choose one of auto, torch, triton" in err


def test_disabling_the_plugin_leaves_torch(cli, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptr.plugins import reset_plugins

    monkeypatch.setenv("ADAPTR_DISABLE_PLUGINS", "triton")
    reset_plugins()
    register(cli, tiny)
    art = ok_json(cli, "merge", "--adapter", "a0", "--name", "m")
    assert art["metadata"]["backend"]["name"] == "torch"
    code, _out, err = cli("merge", "--adapter", "a0", "--name", "m2", "--backend", "triton")
    assert code == 2 and "unknown backend 'triton'; choose one of auto, torch" in err
    names = [p["name"] for p in ok_json(cli, "plugins")]
    assert "triton" not in names


def test_plugins_lists_what_triton_accelerates(cli) -> None:
    rows = {r["name"]: r for r in ok_json(cli, "plugins")}
    ops = rows["triton"]["accelerates"]["triton"]
    assert {"merge_tensor", "quantize_4bit", "dequantize_4bit"} <= set(ops)
    assert "ties" in ops["merge_tensor"]
    code, out, _ = cli("plugins")
    assert code == 0 and "backend triton (triton) accelerates:" in out


def test_merge_yaml_takes_the_backend(cli, tiny, tmp_path) -> None:
    register(cli, tiny)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"adapters": ["a0"], "name": "y", "backend": "torch"}))
    art = ok_json(cli, "merge", "--config", cfg)
    assert art["metadata"]["backend"] == {"name": "torch", "device": "cpu", "plugin": None, "version": None}
    assert art["metadata"]["device_peak_bytes"] is None
