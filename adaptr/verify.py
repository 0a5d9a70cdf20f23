"""Numeric check of a merge: logits of base + adapter (unmerged, via PEFT) vs the merged model.

Optional extra (``pip install 'adaptr[verify]'``): it loads both models whole, so it is
meant for CI-sized checks, not for every production merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError

PROBE_SEED = 1234
PROBE_SHAPE = (2, 16)


def _quiet_imports() -> tuple[Any, Any, Any]:
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise InvalidInputError(
            "--verify needs transformers and peft: pip install 'adaptr[verify]'"
        ) from None
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    return torch, PeftModel, AutoModelForCausalLM


def _diff(ref: Any, out: Any) -> dict[str, float]:
    d = (ref - out).abs()
    return {"max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean())}


def qlora_logit_report(
    base_path: Path,
    adapter: Any,
    plan: Any,
    qlora: Any,
    *,
    merged_path: Path,
    requantized: tuple[Path, Any, Any] | None,
    tolerance: float,
) -> dict[str, Any]:
    """Logits of the adapter unmerged on the quantized base it was trained on (the reference)
    against the 16-bit merge and, with ``requantized``, the merge quantized again.

    The reference base is the original weights through the same quantize→dequantize round trip
    the merge used, so the report measures the merge, not a second quantizer.
    """
    import warnings

    from adaptr.io.safetensors_io import open_weights, torch_dtype

    torch, PeftModel, AutoModelForCausalLM = _quiet_imports()
    gen = torch.Generator().manual_seed(PROBE_SEED)
    method = qlora.quantizer.name
    models: dict[str, dict[str, float]] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, PROBE_SHAPE, generator=gen)
        state = model.state_dict()
        with open_weights(base_path).reader() as r:
            for t in plan.tensors:
                if t.roundtrip and t.name in state:
                    state[t.name].copy_(qlora.roundtrip(t.source, r.get(t.source)).float())
        model = PeftModel.from_pretrained(model, str(adapter.path))
        ref = model(input_ids=ids).logits.float()
        del model, state
        merged = AutoModelForCausalLM.from_pretrained(str(merged_path), dtype=torch.float32)
        models["merged_16bit"] = _diff(ref, merged(input_ids=ids).logits.float())
        if requantized is not None:
            folder, qplan, step = requantized
            state = merged.state_dict()
            with open_weights(folder).reader() as r:
                for t in qplan.tensors:
                    if t.parts is None or t.name not in state:
                        continue
                    parts = {p.name: r.get(p.name) for p in t.parts}
                    w = step.quantizer.dequantize(t.name, parts, step.params, torch_dtype(t.code))
                    state[t.name].copy_(w.float())
            models["requantized"] = _diff(ref, merged(input_ids=ids).logits.float())
    return {
        "reference": f"{adapter.ref} unmerged on the {method} base",
        "max_abs_logit": float(ref.abs().max()),
        "models": models,
        "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE)},
        "tolerance": tolerance,
        "ok": models["merged_16bit"]["max_abs_logit_diff"] <= tolerance,
    }


def logit_check(
    base_path: Path, adapters: list[Any], merged_path: Path, *, tolerance: float
) -> dict[str, Any]:
    if len(adapters) != 1:
        raise InvalidInputError(
            "--verify compares against one unmerged adapter; merge a single adapter to use it"
        )
    import warnings

    torch, PeftModel, AutoModelForCausalLM = _quiet_imports()
    gen = torch.Generator().manual_seed(PROBE_SEED)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        vocab = ref_model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, PROBE_SHAPE, generator=gen)
        ref_model = PeftModel.from_pretrained(ref_model, str(adapters[0].path))
        ref = ref_model(input_ids=ids).logits.float()
        del ref_model
        merged = AutoModelForCausalLM.from_pretrained(str(merged_path), dtype=torch.float32)
        out = merged(input_ids=ids).logits.float()
    diff = float((ref - out).abs().max())
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit": float(ref.abs().max()),
        "tolerance": tolerance,
        "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE)},
        "ok": diff <= tolerance,
    }
