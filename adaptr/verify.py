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


def logit_check(
    base_path: Path, adapters: list[Any], merged_path: Path, *, tolerance: float
) -> dict[str, Any]:
    if len(adapters) != 1:
        raise InvalidInputError(
            "--verify compares against one unmerged adapter; merge a single adapter to use it"
        )
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise InvalidInputError(
            "--verify needs transformers and peft: pip install 'adaptr[verify]'"
        ) from None

    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
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
