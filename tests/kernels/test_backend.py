"""The backend choice: auto, torch and triton through the CLI, and a whole merge on Triton's interpreter.

A ``--backend triton`` merge of a tiny model, run by the kernels under ``TRITON_INTERPRET=1``, must
equal the torch reference's for simple, ties and dare_ties with the same seed; asking for triton
where it cannot run fails with one line and registers nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import ok_json, read_tensors

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


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the Triton entry points a run calls: equal outputs alone would not show they ran."""
    import importlib

    calls: dict[str, int] = {}
    for module, name in [
        ("adaptr_triton.linear_merge", "linear_merge"),
        ("adaptr_triton.ties_merge", "ties_merge_lora"),
        ("adaptr_triton.quant4", "quantize_4bit"),
        ("adaptr_triton.quant4", "dequantize_4bit"),
    ]:
        mod = importlib.import_module(module)
        real = getattr(mod, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, counted)
    return calls


def register(cli, tiny: dict) -> None:
    ok_json(cli, "base", "add", tiny["base"], "--name", "tb")
    for i, path in enumerate(tiny["adapters"]):
        ok_json(cli, "adapter", "add", path, "--base", "tb", "--name", f"a{i}")


def test_auto_chooses_by_device() -> None:
    from adaptr import backends

    chosen = backends.select("auto")
    assert chosen.name == ("triton" if CUDA else "torch"), chosen
    assert backends.select("torch") is backends.TORCH


def test_auto_says_why_at_debug_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from adaptr import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("adaptr.backends")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)  # setLevel, not the attribute: it clears the logger's level cache
    try:
        assert backends.select("auto") is backends.TORCH
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("backend auto -> torch" in m and "triton: no CUDA device is visible" in m for m in seen), seen


def test_explicit_triton_without_a_gpu_is_refused(cli, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    register(cli, tiny)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = cli("merge", "--adapter", "a0", "--name", "m", "--backend", "triton")
    assert code == 1, (out, err)
    assert "backend 'triton' cannot run here: no CUDA device is visible" in err
    assert "TRITON_INTERPRET=1" in err and "Traceback" not in err
    code, _out, err = cli("quantize", "tb", "--method", "nf4", "--name", "q", "--backend", "triton")
    assert code == 1 and "backend 'triton' cannot run here" in err
    assert ok_json(cli, "ls", "--kind", "merged") == [] and ok_json(cli, "ls", "--kind", "quantized") == []


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


STRATEGIES = [
    ("simple", ["--adapter", "a1", "--weights", "0.7"]),
    ("ties", ["--adapter", "a0", "--adapter", "a1", "--density", "0.3", "--weights", "1,0.5"]),
    ("dare_ties", ["--adapter", "a0", "--adapter", "a1", "--density", "0.6", "--seed", "7"]),
    ("dare_linear", ["--adapter", "a0", "--adapter", "a1", "--density", "0.5", "--seed", "3"]),
    ("linear", ["--adapter", "a0", "--adapter", "a1", "--weights", "0.5,-1.5"]),
]


@pytest.mark.parametrize(("strategy", "args"), STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_whole_merge_on_triton_equals_torch(cli, tiny, monkeypatch, kernel_calls, strategy, args) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    register(cli, tiny)
    common = ["merge", *args, "--strategy", strategy, "--dtype", "fp32"]
    ref = ok_json(cli, *common, "--name", "ref", "--backend", "torch")
    fast = ok_json(cli, *common, "--name", "fast", "--backend", "triton", "--force")
    assert fast["metadata"]["backend"]["name"] == "triton"
    assert fast["metadata"]["backend"]["device"] == ("cuda:0" if CUDA else "cpu")
    assert ref["metadata"]["backend"]["name"] == "torch"
    a, b = read_tensors(ref["path"]), read_tensors(fast["path"])
    assert a.keys() == b.keys()
    base = read_tensors(tiny["base"])
    changed = 0
    for name in a:
        # fp32 output: the kernels' sums run in another order, nothing more
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(a[name], base[name].float())
    assert changed >= 3  # the adapters' modules really changed
    kernel = "ties_merge_lora" if "ties" in strategy else "linear_merge"
    assert kernel_calls == {kernel: changed}, kernel_calls  # every changed tensor, by the kernel


def test_merge_yaml_takes_the_backend(cli, tiny, tmp_path) -> None:
    register(cli, tiny)
    cfg = tmp_path / "m.yaml"
    cfg.write_text(json.dumps({"adapters": ["a0"], "name": "y", "backend": "torch"}))
    art = ok_json(cli, "merge", "--config", cfg)
    assert art["metadata"]["backend"] == {"name": "torch", "device": "cpu", "plugin": None, "version": None}
    assert art["metadata"]["device_peak_bytes"] is None


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_on_triton_gives_the_same_bytes(cli, tiny, monkeypatch, kernel_calls, double_quant) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    register(cli, tiny)
    args = ["quantize", "tb", "--method", "nf4", "--double-quant" if double_quant else "--no-double-quant"]
    ref = ok_json(cli, *args, "--name", "q_ref", "--backend", "torch")
    fast = ok_json(cli, *args, "--name", "q_fast", "--backend", "triton", "--force")
    assert fast["metadata"]["backend"]["name"] == "triton"
    a, b = read_tensors(ref["path"]), read_tensors(fast["path"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert fast["metadata"]["quant_errors"] == ref["metadata"]["quant_errors"]
    quantized = len(ref["metadata"]["quant_errors"])
    assert kernel_calls == {"quantize_4bit": quantized, "dequantize_4bit": quantized}, kernel_calls


def test_qlora_merge_on_triton_equals_torch(cli, tiny, monkeypatch, kernel_calls) -> None:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    register(cli, tiny)
    common = ["merge", "--adapter", "a1", "--qlora", "nf4", "--qlora-param", "double_quant=true"]
    ref = ok_json(cli, *common, "--name", "ref", "--backend", "torch")
    fast = ok_json(cli, *common, "--name", "fast", "--backend", "triton", "--force")
    a, b = read_tensors(ref["path"]), read_tensors(fast["path"])
    for name in a:  # bf16 output: one rounding step apart at most
        torch.testing.assert_close(b[name].float(), a[name].float(), rtol=8e-3, atol=1e-5, msg=name)
    assert kernel_calls["quantize_4bit"] == kernel_calls["dequantize_4bit"] >= 7  # every linear weight
    assert kernel_calls["linear_merge"] == 3  # the adapter's modules
