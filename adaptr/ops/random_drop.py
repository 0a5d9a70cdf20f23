"""DARE's drop and rescale, seeded per (merge seed, tensor, adapter) so masks never depend on the
device, thread count or tensor order."""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import (
    check_density,
)

# Elements per chunk of Bernoulli mask generation.
_MASK_CHUNK = 1 << 20
_RESCALE_MODES = ("density", "l1", None)


def tensor_seed(seed: int, tensor_name: str, index: int) -> int:
    """A 63-bit RNG seed for one (merge seed, tensor, adapter) triple.

    ``int.from_bytes(sha256(b"adaptr\\0<seed>\\0<tensor_name>\\0<index>")[:8], "big") & (2**63 - 1)``,
    so every DARE mask is reproducible from the merge seed alone, whatever the order in which tensors
    are processed, the thread that processes them, or which other tensors are merged. (mergekit and
    PEFT draw every mask from the one global torch RNG.)

    Args:
        seed: the merge's seed.
        tensor_name: the tensor's (module) name.
        index: the adapter's position in the merge.

    Returns:
        An integer in ``[0, 2**63)``.

    Raises:
        InvalidInputError: when ``seed`` or ``index`` is not an integer, or ``tensor_name`` not a string.
    """
    try:
        seed = operator.index(seed)
        index = operator.index(index)
    except TypeError:
        raise InvalidInputError(f"seed and index must be integers, got {seed!r} and {index!r}") from None
    if not isinstance(tensor_name, str):
        raise InvalidInputError(f"tensor_name must be a string, got {tensor_name!r}")
    payload = b"\0".join((b"adaptr", str(seed).encode(), tensor_name.encode("utf-8"), str(index).encode()))
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") & ((1 << 63) - 1)


def make_generator(
    seed: int, tensor_name: str, index: int, *, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded with ``tensor_seed(seed, tensor_name, index)``.

    Args:
        seed: the merge's seed.
        tensor_name: the tensor's (module) name.
        index: the adapter's position in the merge.
        device: the generator's device (masks must be drawn on the same device).

    Returns:
        The seeded generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, tensor_name, index))
    return generator


def bernoulli_mask(
    shape: torch.Size | Sequence[int],
    density: float,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """A boolean mask whose entries are independently True with probability ``density``.

    Entry ``j`` (row-major) is ``u_j < float32(density)`` with ``u_j`` the j-th float32 of
    ``torch.rand`` from ``generator``, drawn in chunks of 1M into one reused buffer (no full-size float
    temporary). On CPU the draw is bit-identical to ``torch.bernoulli(torch.full(shape, density))`` with
    the same generator state (which is mergekit's ``sparsify.bernoulli`` and PEFT's ``random_pruning``
    mask), so seeding torch's global RNG reproduces their masks; the tests pin this down.

    Args:
        shape: the mask's shape.
        density: the keep probability.
        generator: the RNG; ``None`` uses torch's global RNG.
        device: where to create the mask.

    Returns:
        A bool tensor of ``shape``.
    """
    d = check_density(density)
    mask = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    flat = mask.view(-1)
    n = flat.numel()
    if n == 0:
        return mask
    chunk = min(n, _MASK_CHUNK)
    buf = torch.empty(chunk, dtype=torch.float32, device=device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        torch.rand(size, generator=generator, out=buf[:size])
        torch.lt(buf[:size], d, out=flat[start : start + size])
    return mask


def _drop_chunked(x: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """``x · bernoulli_mask(x.shape, density, generator)`` without materialising the mask.

    The same draws in the same order as ``bernoulli_mask``, turned into 0.0/1.0 floats in place
    (``u < density``) and multiplied in chunk by chunk: float ops only, no bool tensor.
    """
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    chunk = min(n, _MASK_CHUNK)
    buf = torch.empty(chunk, dtype=torch.float32, device=x.device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        keep = buf[:size]
        torch.rand(size, generator=generator, out=keep)
        keep.lt_(density)
        if flat.dtype != torch.float32:
            keep = keep.to(flat.dtype)
        torch.mul(flat[start : start + size], keep, out=out[start : start + size])
    return out.view(x.shape)


def _drop_philox(x: Tensor, density: float, seed: int) -> Tensor:
    """``x`` times the Philox keep mask, chunk by chunk (no full-size mask or counter tensor)."""
    from adaptr.ops.philox import CHUNK, keep_mask_into, keep_mask_np

    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    n = flat.numel()
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        # numpy straight on the tensors' memory: x·1.0 or x·0.0 per entry, as the torch path does
        src, dst = flat.detach().numpy(), out.numpy()
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            np.multiply(
                src[start:stop], keep_mask_np(seed, start, stop - start, density), out=dst[start:stop]
            )
        return out.view(x.shape)
    buf = torch.empty(min(n, CHUNK), dtype=flat.dtype, device=x.device)
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        keep = keep_mask_into(buf[:size], seed, start, density)
        torch.mul(flat[start : start + size], keep, out=out[start : start + size])
    return out.view(x.shape)


def random_drop(
    x: Tensor,
    density: float,
    *,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    rescale: str | None = "density",
    seed: int | None = None,
) -> Tensor:
    """DARE "drop and rescale" (arXiv 2311.03099): keep each entry with probability ``density``, rescale.

    The mask is ``bernoulli_mask(x.shape, density, generator=generator)`` unless ``mask`` is given.
    The kept tensor ``m = x·mask`` is then rescaled:

    * ``"density"``: ``m / density``, the paper's ``1/(1−p)`` (and PEFT ``random_pruning(rescale=True)``
      since PEFT #3152); unbiased, ``E[result] = x``.
    * ``"l1"``: ``m · (‖x‖₁ / ‖m‖₁)``, mergekit's ``rescaled_masked_tensor`` with the L1 norm (its
      ``rescale: true``); left unscaled when either norm is below ``1e-7``. The ratio is computed as a
      float32 tensor division, as mergekit does.
    * ``None``: no rescale.

    Args:
        x: the delta (float32, any shape).
        density: the keep probability ``1 − p``.
        generator: RNG for the mask (see ``make_generator``); ``None`` uses torch's global RNG.
        mask: an explicit keep mask of ``x``'s shape (bool, or nonzero = keep); overrides ``generator``.
        rescale: ``"density"``, ``"l1"`` or ``None``.
        seed: a Philox4x32-10 key (see ``adaptr.ops.philox``): entry ``j`` (row-major) is kept iff
            Triton's ``tl.rand4x(seed, j // 4)[j % 4] < float32(density)``. This is what the merge engine uses, so masks
            are bit-identical on any device, thread count or tensor order; overrides ``generator``.

    Returns:
        ``x`` itself when ``density >= 1``; a zero tensor (never NaN) when ``density <= 0``; otherwise a
        new tensor.

    Raises:
        InvalidInputError: for a non-finite density, an unknown ``rescale`` or a mask of another shape.
    """
    d = check_density(density)
    if rescale not in _RESCALE_MODES:
        raise InvalidInputError(f"rescale must be one of 'density', 'l1' or None, got {rescale!r}")
    if d >= 1:
        return x
    if d <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    if mask is None and seed is not None:
        kept = _drop_philox(x, d, seed)
    elif mask is None:
        kept = _drop_chunked(x, d, generator)
    else:
        if mask.shape != x.shape:
            raise InvalidInputError(f"mask shape {tuple(mask.shape)} does not match {tuple(x.shape)}")
        kept = x * (mask if mask.dtype == torch.bool else mask != 0)
    if rescale == "density":
        kept.div_(d)
    elif rescale == "l1":
        before = x.abs().sum()
        after = kept.abs().sum()
        if before >= 1e-7 and after >= 1e-7:
            kept.mul_(before / after)
    return kept
