"""How far a quantized weight is from the weight it replaces, as ``adaptr show`` reports it.

Sums run in float64 over cache-sized row blocks, so the report costs one read of each
tensor and no full-size float copies.
"""

from __future__ import annotations

import math

import torch

_BLOCK = 1 << 18  # elements per step: both float32 blocks stay in L2


def error_stats(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float | None]:
    """Relative L2 error, max abs error and signal-to-noise ratio (dB) of ``approx``.

    An exact copy has no finite SNR: it is None (JSON and PostgreSQL have no Infinity).
    """
    ref = reference.reshape(-1)
    app = approx.reshape(-1)
    if ref.numel() != app.numel():
        raise ValueError(f"cannot compare {tuple(reference.shape)} with {tuple(approx.shape)}")
    signal = noise = 0.0
    worst = 0.0
    for i in range(0, ref.numel(), _BLOCK):
        r = ref[i : i + _BLOCK].float()
        d = app[i : i + _BLOCK].float() - r
        signal += float(torch.dot(r, r).double()) if r.numel() else 0.0
        noise += float(torch.dot(d, d).double()) if d.numel() else 0.0
        if d.numel():
            worst = max(worst, float(d.abs().max()))
    rel = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else 1.0)
    snr = 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else None
    return {"rel_error": rel, "max_abs_error": worst, "snr_db": snr}
