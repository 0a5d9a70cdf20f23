"""One output tensor's whole merge, as a single operation an accelerated backend can claim.

The engine builds a ``TensorMergeOp`` per output tensor and asks the ``get_kernel`` hook
for ``op="merge_tensor"``; a plugin may return a callable ``fn(op) -> Tensor`` that fuses
everything (delta products, strategy, base add, cast). When nobody claims it,
``merge_tensor`` below runs: the strategy's step functions in plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from adaptr.ops.lora_delta import delta_block_rows, lora_delta, lora_delta_rows

if TYPE_CHECKING:
    from adaptr.interfaces import MergeStrategy
    from adaptr.ops.workspace import Workspace


@dataclass
class LoraFactors:
    """ΔW = scaling · B @ A, transposed when the base stores the weight as [in, out]."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    transpose: bool = False

    def delta(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return lora_delta(self.lora_A, self.lora_B, self.scaling, transpose=self.transpose, out=out)

    def numel(self) -> int:
        return self.lora_B.shape[0] * self.lora_A[0].numel()

    def delta_rows(self, r0: int, r1: int) -> torch.Tensor:
        return lora_delta_rows(self.lora_A, self.lora_B, self.scaling, r0, r1, transpose=self.transpose)


@dataclass
class DenseDelta:
    """An already-formed delta (e.g. ``scaling · lora_B.bias``)."""

    value: torch.Tensor

    def delta(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.value.to(torch.float32, copy=True)


@dataclass
class TensorMergeOp:
    """Everything needed to produce one merged tensor.

    ``contributions[i]``, ``weights[i]`` and ``seeds[i]`` (a Philox key) belong to the i-th
    adapter that touches this tensor (adapters that do not are left out).
    """

    name: str
    base: torch.Tensor
    contributions: list[LoraFactors | DenseDelta]
    weights: list[float]
    strategy: str
    params: dict[str, Any]
    seeds: list[int]
    out_dtype: torch.dtype
    dora_magnitude: torch.Tensor | None = None
    dora_rows_are_dim0: bool = True  # False when the weight is stored [in, out] (fan_in_fan_out)
    extra: dict[str, Any] = field(default_factory=dict)
    workspace: Workspace | None = None  # reusable float32 scratch for the deltas


def apply_dora(weight: torch.Tensor, magnitude: torch.Tensor, rows_are_dim0: bool) -> torch.Tensor:
    """DoRA (arXiv 2402.09353) merge: W' = m / ‖W + ΔW‖_row ⊙ (W + ΔW), as PEFT merges it."""
    if rows_are_dim0:
        norm = torch.linalg.vector_norm(weight, dim=1)
        return weight.mul_((magnitude.float() / norm).view(-1, 1))
    norm = torch.linalg.vector_norm(weight, dim=0)
    return weight.mul_((magnitude.float() / norm).view(1, -1))


def merge_tensor(op: TensorMergeOp, strategy: MergeStrategy) -> torch.Tensor:
    """Reference: fp32 deltas → strategy → + base in fp32 → (DoRA) → one cast to the output dtype.

    Strategies with a ``merge_onto`` method do the base add and the cast themselves, fused.
    """
    if _blockwise(op, strategy):
        return _merge_blockwise(op, strategy)
    deltas, scratch = _deltas(op)
    onto = getattr(strategy, "merge_onto", None) if op.dora_magnitude is None else None
    try:
        if onto is not None:
            merged = onto(op.base, deltas, op.weights, op.params, seeds=op.seeds, out_dtype=op.out_dtype)
        else:
            merged = strategy.merge(deltas, op.weights, op.params, seeds=op.seeds)
        if any(_shares_memory(merged, s) for s in scratch):  # a strategy handed back a delta itself
            merged = merged.clone()
    finally:
        del deltas
        if op.workspace is not None:
            op.workspace.give(*scratch)
    if onto is not None:
        return merged
    if merged.shape != op.base.shape:
        merged = merged.reshape(op.base.shape)
    merged.add_(op.base)
    if op.dora_magnitude is not None:
        apply_dora(merged, op.dora_magnitude, op.dora_rows_are_dim0)
    return merged if merged.dtype == op.out_dtype else merged.to(op.out_dtype)


def _deltas(op: TensorMergeOp) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each contribution's fp32 delta; LoRA products go into workspace buffers when there is one."""
    deltas, scratch = [], []
    for c in op.contributions:
        if op.workspace is not None and isinstance(c, LoraFactors):
            buf = op.workspace.take(c.numel())
            scratch.append(buf)
            deltas.append(c.delta(out=buf))
        else:
            deltas.append(c.delta())
    return deltas, scratch


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _blockwise(op: TensorMergeOp, strategy: MergeStrategy) -> bool:
    # Strategies that act entry by entry (declared ``elementwise = True``) can run one
    # cache-sized row block at a time: one pass over memory instead of five.
    return (
        getattr(strategy, "elementwise", False)
        and op.dora_magnitude is None
        and op.base.dim() == 2
        and all(isinstance(c, LoraFactors) and c.lora_A.dim() == 2 for c in op.contributions)
    )


def _merge_blockwise(op: TensorMergeOp, strategy: MergeStrategy) -> torch.Tensor:
    """Same arithmetic as the whole-tensor path, in the same row blocks as ``lora_delta``."""
    rows, cols = op.base.shape
    out = torch.empty((rows, cols), dtype=op.out_dtype, device=op.base.device)
    step = delta_block_rows(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        deltas = [c.delta_rows(r0, r1) for c in op.contributions]
        merged = strategy.merge(deltas, op.weights, op.params, seeds=op.seeds)
        merged.add_(op.base[r0:r1])
        out[r0:r1].copy_(merged)
    return out
