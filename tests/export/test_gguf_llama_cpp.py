"""Exported GGUF files run in llama.cpp itself (opt-in: needs ``llama-cpp-python``, a ~10 min build).

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF" pip install llama-cpp-python

transformers' GGUF loader (tests/export/test_gguf.py) re-implements llama.cpp's reading; this
checks the real thing: tokenization, logits, and a LoRA adapter applied by llama.cpp.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from adaptr.testing import make_lora_adapter  # noqa: E402

from .test_gguf import LOGIT_TOL, MAKERS, VOCAB, export, export_adapter, sharpen_attention  # noqa: E402

TEXT = "Hello world, the quick brown fox jumps over 12345 lazy dogs! Adapters merge."


def _run(model: str, ids: list[int], lora: str | None = None) -> np.ndarray:
    kwargs = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(model_path=model, logits_all=True, n_ctx=64, n_threads=2, verbose=False, **kwargs)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.parametrize("family", sorted(MAKERS))
def test_llama_cpp_tokenizes_and_computes_like_transformers(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = sharpen_attention(MAKERS[family](tmp_path / "src", vocab_size=VOCAB, tokenizer=True))
    ids = AutoTokenizer.from_pretrained(src)(TEXT).input_ids
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor([ids])).logits[0].numpy()
    for quant in ("f16", "q8_0", "q4_0"):
        path = str(export(src, tmp_path / quant, quant))
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, verbose=False, vocab_only=True)
        assert llm.tokenize(TEXT.encode(), add_bos=True, special=False) == ids, quant
        got = _run(path, ids)
        assert np.abs(got - ref).max() / np.abs(ref).max() < LOGIT_TOL[quant], quant

    # rsLoRA r=16: llama.cpp's alpha/r would be 4x off without the folded scale
    adapter = make_lora_adapter(
        tmp_path / "lora",
        src,
        r=16,
        lora_alpha=8,
        use_rslora=True,
        init_scale=0.2,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"),
        seed=7,
    )
    lora = str(export_adapter(adapter, src, tmp_path / "lora-gguf", "f16"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(src), adapter).eval()
    with torch.no_grad():
        want = peft(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(want - ref).max() / np.abs(ref).max() > 0.5  # the adapter really moves the logits
    got = _run(str(tmp_path / "f16" / "model.gguf"), ids, lora)
    assert np.abs(got - want).max() / np.abs(want).max() < 3e-2  # measured ≤ 1.5e-2 (f16 LoRA path)


def test_llama_cpp_applies_llama3_rope_scaling_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .test_gguf import LLAMA3_ROPE, with_rope

    src = MAKERS["llama"](tmp_path / "src", vocab_size=VOCAB, tokenizer=True)
    src = with_rope(sharpen_attention(src), LLAMA3_ROPE)
    ids = AutoTokenizer.from_pretrained(src)(TEXT).input_ids  # longer than original_max_position_embeddings
    assert len(ids) > LLAMA3_ROPE["original_max_position_embeddings"]
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src).eval()(torch.tensor([ids])).logits[0].numpy()
    got = _run(str(export(src, tmp_path / "f16", "f16")), ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < LOGIT_TOL["f16"]
