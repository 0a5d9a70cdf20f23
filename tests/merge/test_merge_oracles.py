"""Merge results checked against independent oracles, never against adaptr itself.

* ``simple``: the merged folder, loaded by transformers, gives PEFT's logits (``merge_and_unload``, or the
  unmerged PEFT forward where PEFT's own merge would re-tie embeddings).
* multi-adapter strategies: every merged tensor equals mergekit 0.1.5's ``merge_tensors`` (or PEFT's
  ``merge_utils``) run on the same deltas ``ΔW_i = s_i · B_i A_i`` computed here from the adapter files.
* identities: one adapter with weight 1 under linear/ties/dare at density 1 is byte-identical to ``simple``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from cli_helpers import ok_json
from safetensors import safe_open
from safetensors.torch import load_file

from adaptr.testing import make_gpt2_base, make_llama_base, make_lora_adapter

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- helpers --------------------------------------------------------------------------------


def register(cli, base: Path, adapters: dict[str, Path], base_name: str = "base") -> None:
    ok_json(cli, "base", "add", base, "--name", base_name)
    for name, path in adapters.items():
        ok_json(cli, "adapter", "add", path, "--base", base_name, "--name", name)


def merge(cli, *args) -> dict:
    return ok_json(cli, "merge", *args)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(folder)):
        out.update(load_file(str(f)))
    return out


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def lora_delta64(adapter: dict[str, torch.Tensor], module: str, scaling: float, *, conv1d: bool = False):
    """ΔW = s · B @ A in float64 (transposed to the stored [in, out] layout for Conv1D)."""
    a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
    d = (b @ a) * scaling
    return d.t() if conv1d else d


def lora_delta32(adapter: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    """ΔW in float32, formed as (s·B) @ A, so that every oracle below ranks exactly the same values."""
    a = adapter[f"base_model.model.{module}.lora_A.weight"].float()
    b = adapter[f"base_model.model.{module}.lora_B.weight"].float()
    return (b * scaling) @ a


def modules_of(adapter: dict[str, torch.Tensor]) -> set[str]:
    return {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        for k in adapter
        if k.endswith(".lora_A.weight")
    }


def probe_ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _quiet():
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


@torch.no_grad()
def logits_of(folder: Path, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    _quiet()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    return model(input_ids=ids).logits.float()


@torch.no_grad()
def peft_logits(
    base: Path, adapter: Path, ids: torch.Tensor, *, merge_and_unload: bool = True, dtype=torch.float32
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _quiet()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    if merge_and_unload:
        model = model.merge_and_unload()
    return model(input_ids=ids).logits.float()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, atol: float) -> None:
    """Close to the reference, and the adapter's effect on the logits is far above the tolerance."""
    effect = float((ref - base).abs().max())
    diff = float((ours - ref).abs().max())
    assert effect > 20 * atol, f"adapter barely changes the logits ({effect:.3g}); the check would be vacuous"
    assert diff <= atol, f"max |Δlogit| {diff:.3g} > {atol:.3g} (adapter effect {effect:.3g})"


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, rel: float = 1e-6) -> None:
    ref = ref.double()
    diff = float((ours.double() - ref).abs().max())
    scale = float(ref.abs().max())
    assert diff <= rel * scale + 1e-12, f"{what}: max |diff| {diff:.3g} > {rel:g} × {scale:.3g}"


# --- simple vs PEFT -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_base(tmp_path_factory.mktemp("llama") / "base", seed=1)


def _simple_case(
    cli, base: Path, adapter: Path, *extra: str
) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    register(cli, base, {"ad": adapter})
    art = merge(cli, "--adapter", "ad", "--name", "merged", *extra)
    ids = probe_ids(json.loads((base / "config.json").read_text())["vocab_size"])
    return art, logits_of(Path(art["path"]), ids), logits_of(base, ids), ids


SIMPLE_CASES = {
    "plain": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=("q_proj", "v_proj", "down_proj")),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "up_proj"),
        rank_pattern={"v_proj": 4, "up_proj": 2},
        alpha_pattern={"k_proj": 64, "up_proj": 3},
    ),
    "rslora-patterns": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=("q_proj", "v_proj"),
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 5},
    ),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=("q_proj", "v_proj", "gate_proj")),
    "modules_to_save": dict(
        r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("case", sorted(SIMPLE_CASES))
def test_simple_matches_peft_merge_and_unload(cli, llama, tmp_path, case):
    adapter = make_lora_adapter(tmp_path / case, llama, seed=3, init_scale=0.1, **SIMPLE_CASES[case])
    art, ours, base_logits, ids = _simple_case(cli, llama, adapter)
    assert art["kind"] == "merged" and art["metadata"]["strategy"] == "simple"
    assert_logits_close(ours, peft_logits(llama, adapter, ids), base_logits, atol=1e-5)
    if case == "modules_to_save":
        saved = adapter_tensors(adapter)["base_model.model.lm_head.weight"]
        assert torch.equal(state(Path(art["path"]))["lm_head.weight"], saved)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt2_base(tmp_path_factory.mktemp("gpt2") / "base", seed=2)


@pytest.mark.parametrize(
    "variant",
    ["fan_in_fan_out", "fan_in_fan_out+lora_bias", "fan_in_fan_out+dora"],
)
def test_simple_gpt2_conv1d_matches_peft(cli, gpt2, tmp_path, variant):
    lora_bias = "lora_bias" in variant
    adapter = make_lora_adapter(
        tmp_path / "ad",
        gpt2,
        r=8,
        lora_alpha=16,
        seed=4,
        init_scale=0.1,
        target_modules=("c_attn", "c_proj", "c_fc"),
        lora_bias=lora_bias,
        use_dora="dora" in variant,
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    art, ours, base_logits, ids = _simple_case(cli, gpt2, adapter)
    assert_logits_close(ours, peft_logits(gpt2, adapter, ids), base_logits, atol=1e-5)
    merged, base = state(Path(art["path"])), state(gpt2)
    ad = adapter_tensors(adapter)
    # Independent float64 check of the Conv1D layout (stored [in, out]) and of the scaled lora_B bias.
    w = "transformer.h.0.attn.c_attn"
    expect = base[f"{w}.weight"].double() + lora_delta64(ad, w, 2.0, conv1d=True)
    if "dora" in variant:  # m / ‖W + ΔW‖ per output feature: a column of the stored [in, out] matrix
        magnitude = ad[f"base_model.model.{w}.lora_magnitude_vector"].double()
        expect = expect * (magnitude / torch.linalg.vector_norm(expect, dim=0)).view(1, -1)
    assert_close(merged[f"{w}.weight"], expect, "c_attn weight")
    bias_key = f"base_model.model.{w}.lora_B.bias"
    if lora_bias:
        assert_close(
            merged[f"{w}.bias"], base[f"{w}.bias"].double() + 2.0 * ad[bias_key].double(), "c_attn bias"
        )
        assert not torch.equal(merged[f"{w}.bias"], base[f"{w}.bias"])
    else:
        assert bias_key not in ad
        assert torch.equal(merged[f"{w}.bias"], base[f"{w}.bias"])


def test_simple_bf16_base_matches_peft_and_casts_once(cli, tmp_path):
    base = make_llama_base(tmp_path / "bf16", dtype="bfloat16", seed=5)
    adapter = make_lora_adapter(
        tmp_path / "ad", base, r=8, lora_alpha=16, seed=6, init_scale=0.1, target_modules=ALL_LINEAR
    )
    art, ours, base_logits, ids = _simple_case(cli, base, adapter, "--dtype", "bf16")
    merged = state(Path(art["path"]))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((Path(art["path"]) / "config.json").read_text())["dtype"] == "bfloat16"
    # PEFT merges in fp32 on the upcast base; the only difference left is our single bf16 rounding.
    ref = peft_logits(base, adapter, ids)
    assert_logits_close(ours, ref, base_logits, atol=2e-2 * float(ref.abs().max()))
    # "add in fp32, cast once": every merged tensor is exactly round(base32 + ΔW32) to bf16.
    b = state(base)
    ad = adapter_tensors(adapter)
    for module in sorted(modules_of(ad)):
        expect = (b[f"{module}.weight"].float() + lora_delta32(ad, module, 2.0)).to(torch.bfloat16)
        got = merged[f"{module}.weight"]
        assert (got.float() - expect.float()).abs().max() <= 2.0**-7 * expect.float().abs().max(), module
        mismatch = (got != expect).float().mean().item()
        assert mismatch < 1e-3, f"{module}: {mismatch:.2%} of entries are not the single-rounded bf16 value"


def test_simple_fp32_base_to_bf16_output(cli, llama, tmp_path):
    adapter = make_lora_adapter(tmp_path / "ad", llama, r=8, lora_alpha=16, seed=7, init_scale=0.1)
    art, ours, base_logits, ids = _simple_case(cli, llama, adapter, "--dtype", "bf16")
    assert {t.dtype for t in state(Path(art["path"])).values()} == {torch.bfloat16}
    ref = peft_logits(llama, adapter, ids)
    assert_logits_close(ours, ref, base_logits, atol=2e-2 * float(ref.abs().max()))


def test_simple_sharded_base_input(cli, tmp_path):
    base = make_llama_base(tmp_path / "sharded", seed=8, max_shard_size=60_000)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    adapter = make_lora_adapter(
        tmp_path / "ad", base, r=8, lora_alpha=16, seed=9, init_scale=0.1, target_modules=ALL_LINEAR
    )
    _art, ours, base_logits, ids = _simple_case(cli, base, adapter)
    assert_logits_close(ours, peft_logits(base, adapter, ids), base_logits, atol=1e-5)


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_simple_sharded_output_loads_in_transformers(cli, llama, tmp_path):
    adapter = make_lora_adapter(
        tmp_path / "ad", llama, r=8, lora_alpha=16, seed=10, init_scale=0.1, target_modules=ALL_LINEAR
    )
    art, ours, base_logits, ids = _simple_case(cli, llama, adapter, "--max-shard-size", "20KB")
    out = Path(art["path"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    total = 0
    for shard in shards:
        h = _header(out / shard)
        assert h.pop("__metadata__") == {"format": "pt"}
        assert {index["weight_map"][k] for k in h} == {shard}
        data = sum(math.prod(t["shape"]) * {"F32": 4, "BF16": 2, "F16": 2}[t["dtype"]] for t in h.values())
        total += data
        # A shard holds at most 20 kB unless one tensor alone is larger.
        assert data <= 20_000 or len(h) == 1
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(state(llama))
    assert_logits_close(ours, peft_logits(llama, adapter, ids), base_logits, atol=1e-5)


# --- tied embeddings ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_base(tmp_path_factory.mktemp("tied") / "base", tie_word_embeddings=True, seed=11)


TIED_CASES = {
    "lora-on-lm_head": dict(target_modules=("q_proj", "v_proj", "lm_head")),
    "modules_to_save-lm_head": dict(target_modules=("q_proj", "v_proj"), modules_to_save=["lm_head"]),
    "modules_to_save-embed_tokens": dict(
        target_modules=("q_proj", "v_proj"), modules_to_save=["embed_tokens"]
    ),
}


@pytest.mark.parametrize("case", sorted(TIED_CASES))
def test_tied_embeddings_targeted_are_untied(cli, tied, tmp_path, case):
    adapter = make_lora_adapter(
        tmp_path / case, tied, r=4, lora_alpha=8, seed=12, init_scale=0.1, **TIED_CASES[case]
    )
    art, ours, base_logits, ids = _simple_case(cli, tied, adapter)
    out = Path(art["path"])
    assert "untied_embeddings" in art["flags"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged, base = state(out), state(tied)
    assert "lm_head.weight" in merged and "lm_head.weight" not in base
    # The input embedding is untouched; only the (now separate) head carries the change.
    if "embed_tokens" in case:  # the trained copy feeds the input; the head keeps the original matrix
        saved = adapter_tensors(adapter)["base_model.model.model.embed_tokens.weight"]
        assert torch.equal(merged["model.embed_tokens.weight"], saved)
        assert torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    else:  # the input embedding is untouched; only the (now separate) head carries the change
        assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
        assert not torch.equal(merged["lm_head.weight"], base["model.embed_tokens.weight"])
    # PEFT's merge_and_unload would re-tie on save; its unmerged forward is the reference.
    ref = peft_logits(tied, adapter, ids, merge_and_unload=False)
    assert_logits_close(ours, ref, base_logits, atol=1e-5)


# --- multi-adapter strategies vs mergekit / PEFT ---------------------------------------------


# name -> (factory kwargs, scaling per module name suffix is derived from these)
MULTI = {
    "a-all-r8": dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR, seed=21),
    "b-qv-up-r4": dict(r=4, lora_alpha=4, target_modules=("q_proj", "v_proj", "up_proj"), seed=22),
    "c-rslora-r16": dict(
        r=16,
        lora_alpha=8,
        use_rslora=True,
        target_modules=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"),
        seed=23,
    ),
}


def scaling_of(spec: dict, module: str) -> float:
    r, alpha = spec["r"], spec["lora_alpha"]
    return alpha / math.sqrt(r) if spec.get("use_rslora") else alpha / r


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A base whose MLP tensors exceed 65536 entries (the radix-select path), three dissimilar adapters."""
    root = tmp_path_factory.mktemp("multi")
    base = make_llama_base(
        root / "base", hidden_size=128, intermediate_size=640, num_hidden_layers=2, seed=20
    )
    adapters = {
        name: make_lora_adapter(root / name, base, init_scale=0.05, **{k: v for k, v in spec.items()})
        for name, spec in MULTI.items()
    }
    return {"base": base, "adapters": adapters}


def _deltas(multi: dict, names: list[str]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """Per base tensor, (adapter position, ΔW in float32) for each adapter that targets it."""
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for i, name in enumerate(names):
        ad = adapter_tensors(multi["adapters"][name])
        for module in modules_of(ad):
            out.setdefault(f"{module}.weight", []).append(
                (i, lora_delta32(ad, module, scaling_of(MULTI[name], module)))
            )
    return out


def _run_multi(
    cli, multi: dict, strategy: str, weights: list[float], names: list[str] | None = None, *extra: str
) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    names = names or list(MULTI)
    register(cli, multi["base"], {n: multi["adapters"][n] for n in names})
    args = [x for n in names for x in ("--adapter", n)]
    art = merge(
        cli,
        *args,
        "--strategy",
        strategy,
        "--weights",
        ",".join(map(str, weights)),
        "--name",
        "merged",
        *extra,
    )
    return art, state(Path(art["path"])), state(multi["base"]), names


def _mergekit(
    method: str, base: torch.Tensor, deltas: list[tuple[int, torch.Tensor]], weights: list[float], **params
) -> torch.Tensor:
    """mergekit on full float64 models θ_i = base + ΔW_i (exact: fp32 + fp32 fits a float64)."""
    from mergekit.merge_methods.api import merge_tensors

    b = base.double()
    ids = ["base"] + [f"m{i}" for i, _ in deltas]
    tensors = [b] + [b + d.double() for _, d in deltas]
    per_input = {"weight": {f"m{i}": weights[i] for i, _ in deltas}}
    if "density" in params:
        density = params.pop("density")
        per_input["density"] = {f"m{i}": density for i, _ in deltas}
    return merge_tensors(tensors, method, parameters={**per_input, **params}, ids=ids, base_index=0)


def _check_all(merged, base, deltas, expect_fn, rel: float = 1e-6) -> int:
    """Every tensor: targeted ones match the oracle, the rest are the base bit for bit."""
    checked = 0
    for name, b in base.items():
        if name in deltas:
            assert_close(merged[name], expect_fn(name, b, deltas[name]), name, rel)
            assert not torch.equal(merged[name], b), f"{name} unchanged"
            checked += 1
        else:
            assert torch.equal(merged[name], b), f"{name} is targeted by no adapter but changed"
    assert checked
    return checked


W3 = [0.7, 0.3, 1.0]


def test_linear_matches_mergekit_task_arithmetic(cli, multi):
    merged, base = _run_multi(cli, multi, "linear", W3)[1:3]
    deltas = _deltas(multi, list(MULTI))
    n = _check_all(
        merged, base, deltas, lambda name, b, ds: _mergekit("task_arithmetic", b, ds, W3, normalize=False)
    )
    assert n == 2 * 7  # all linear projections of two layers; b and c only touch some of them


def test_linear_normalize_matches_mergekit_linear(cli, multi):
    from mergekit.merge_methods.api import merge_tensors

    merged, base = _run_multi(cli, multi, "linear", W3, None, "--normalize")[1:3]
    deltas = _deltas(multi, list(MULTI))

    def expect(name, b, ds):  # mergekit linear on the full models that touch this tensor: Σ w θ / Σ w
        b = b.double()
        return merge_tensors(
            [b + d.double() for _, d in ds],
            "linear",
            parameters={"weight": [W3[i] for i, _ in ds], "normalize": True},
        )

    _check_all(merged, base, deltas, expect)


def test_task_arithmetic_lambda_and_negative_weights(cli, multi):
    weights = [0.7, -0.4, 1.0]
    art, merged, base, _ = _run_multi(cli, multi, "task_arithmetic", weights, None, "--lambda", "0.6")
    assert art["metadata"]["strategy_params"]["lambda"] == 0.6
    deltas = _deltas(multi, list(MULTI))
    _check_all(
        merged,
        base,
        deltas,
        lambda name, b, ds: _mergekit("task_arithmetic", b, ds, weights, **{"lambda": 0.6}),
    )


def test_task_negation_subtracts_the_delta(cli, multi):
    name = "a-all-r8"
    merged, base = _run_multi(cli, multi, "task_arithmetic", [-1.0], [name])[1:3]
    deltas = _deltas(multi, [name])
    _check_all(merged, base, deltas, lambda n, b, ds: b.double() - ds[0][1].double())


@pytest.mark.parametrize("density,lam", [(0.3, 1.0), (0.05, 1.3)])
def test_ties_matches_mergekit_ties(cli, multi, density, lam):
    merged, base = _run_multi(cli, multi, "ties", W3, None, "--density", str(density), "--lambda", str(lam))[
        1:3
    ]
    deltas = _deltas(multi, list(MULTI))
    assert any(d[0][1].numel() > 65536 for d in deltas.values())
    _check_all(
        merged,
        base,
        deltas,
        lambda n, b, ds: _mergekit("ties", b, ds, W3, density=density, normalize=True, **{"lambda": lam}),
    )


def test_magnitude_prune_matches_peft_merge_utils(cli, multi):
    from peft.utils.merge_utils import magnitude_based_pruning

    density, lam = 0.25, 0.8
    merged, base = _run_multi(
        cli, multi, "magnitude_prune", W3, None, "--density", str(density), "--lambda", str(lam)
    )[1:3]
    deltas = _deltas(multi, list(MULTI))

    def expect(name, b, ds):
        total = sum(W3[i] * magnitude_based_pruning(d.double(), density) for i, d in ds)
        return b.double() + lam * total

    _check_all(merged, base, deltas, expect)


def _our_masks(seed: int, density: float):
    """The keep masks adaptr draws, keyed on (seed, output tensor name, adapter position).

    Only the mask is taken from adaptr (the oracle is handed the same mask); it is read off
    ``random_drop`` applied to ones, keyed exactly as the engine keys it (a Philox seed per tensor and
    adapter, or a seeded torch generator in builds without the counter-based generator).
    """
    from dataclasses import fields

    from adaptr.ops import random_drop as ref
    from adaptr.ops.merge_tensor import TensorMergeOp

    philox = "seeds" in {f.name for f in fields(TensorMergeOp)}

    def mask(name: str, i: int, shape) -> torch.Tensor:
        if philox:
            ones = torch.ones(tuple(shape), dtype=torch.float32)
            return ref.random_drop(ones, density, seed=ref.tensor_seed(seed, name, i), rescale=None) != 0
        return ref.bernoulli_mask(shape, density, generator=ref.make_generator(seed, name, i))

    return mask


@pytest.mark.parametrize("strategy,method", [("dare_linear", "dare_linear"), ("dare_ties", "dare_ties")])
def test_dare_l1_rescale_matches_mergekit_with_the_same_mask(cli, multi, monkeypatch, strategy, method):
    import mergekit.sparsify as sp

    density, seed = 0.4, 7
    merged, base = _run_multi(
        cli, multi, strategy, W3, None, "--density", str(density), "--rescale", "l1", "--seed", str(seed)
    )[1:3]
    deltas = _deltas(multi, list(MULTI))
    mask_of = _our_masks(seed, density)
    queue: list[torch.Tensor] = []

    def bernoulli(tensor, density, rescale_norm=None):  # mergekit's, with the mask handed in
        m = queue.pop(0).to(tensor.dtype)
        return sp.rescaled_masked_tensor(tensor, m, rescale_norm)

    monkeypatch.setattr(sp, "bernoulli", bernoulli)

    def expect(name, b, ds):
        queue[:] = [mask_of(name, i, b.shape) for i, _ in ds]
        keep = sum(float(m.float().mean()) for m in queue) / len(queue)
        assert abs(keep - density) < 0.05
        out = _mergekit(method, b, ds, W3, density=density, normalize=strategy == "dare_ties", rescale=True)
        assert not queue
        return out

    _check_all(merged, base, deltas, expect)


def test_dare_linear_density_rescale_matches_peft_with_the_same_mask(cli, multi, monkeypatch):
    from peft.utils import merge_utils

    density, seed = 0.3, 11
    merged, base = _run_multi(
        cli, multi, "dare_linear", W3, None, "--density", str(density), "--seed", str(seed)
    )[1:3]
    deltas = _deltas(multi, list(MULTI))
    mask_of = _our_masks(seed, density)
    queue: list[torch.Tensor] = []
    real = torch.bernoulli
    monkeypatch.setattr(
        torch, "bernoulli", lambda p, *a, **k: queue.pop(0).to(p.dtype) if queue else real(p, *a, **k)
    )

    def expect(name, b, ds):
        queue[:] = [mask_of(name, i, b.shape) for i, _ in ds]
        total = merge_utils.dare_linear(
            [d.double() for _, d in ds], torch.tensor([W3[i] for i, _ in ds], dtype=torch.float64), density
        )
        assert not queue
        return b.double() + total

    _check_all(merged, base, deltas, expect)


# --- identities and edge cases --------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["linear", "ties", "dare_linear", "dare_ties", "task_arithmetic"])
def test_one_adapter_weight_one_is_byte_identical_to_simple(cli, multi, strategy):
    name = "a-all-r8"
    register(cli, multi["base"], {name: multi["adapters"][name]})
    simple = merge(cli, "--adapter", name, "--strategy", "simple", "--name", "simple")
    extra = ["--density", "1"] if strategy in ("ties", "dare_linear", "dare_ties") else []
    other = merge(cli, "--adapter", name, "--strategy", strategy, "--weights", "1", "--name", "other", *extra)
    a, b = Path(simple["path"]), Path(other["path"])
    assert sha(a / "model.safetensors") == sha(b / "model.safetensors")
    assert sha(a / "config.json") == sha(b / "config.json")


def test_mixed_ranks_and_partial_targets_two_adapters(cli, multi):
    """b (r4, q/v/up) and c (rsLoRA r16, q/k/o/gate/down): q_proj gets both, the rest one or the other."""
    names = ["b-qv-up-r4", "c-rslora-r16"]
    weights = [0.5, 2.0]
    merged, base = _run_multi(cli, multi, "ties", weights, names, "--density", "0.5")[1:3]
    deltas = _deltas(multi, names)
    counts = {len(v) for v in deltas.values()}
    assert counts == {1, 2}
    _check_all(
        merged, base, deltas, lambda n, b, ds: _mergekit("ties", b, ds, weights, density=0.5, normalize=True)
    )


def test_ties_density_zero_leaves_the_base_unchanged(cli, multi):
    _art, merged, base, _ = _run_multi(cli, multi, "ties", W3, None, "--density", "0")
    assert set(merged) == set(base)
    for name, b in base.items():
        assert torch.equal(merged[name], b), name
        assert torch.isfinite(merged[name]).all()


def test_merged_tensor_layout_matches_the_base(cli, multi):
    """Names, shapes and dtypes are the base's; the safetensors files are readable lazily tensor by tensor."""
    art = _run_multi(cli, multi, "ties", W3)[0]
    out = Path(art["path"])
    base = state(multi["base"])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = list(f.keys())
        assert set(keys) == set(base)
        for k in keys:
            t = f.get_slice(k)
            assert list(t.get_shape()) == list(base[k].shape)
    assert re.fullmatch(r"[0-9a-f]{64}", art["content_hash"])
