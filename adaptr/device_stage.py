"""Moving tensors between the memory map and an accelerator, overlapped with compute.

Each engine worker thread owns a CUDA stream: it copies its tensor from the memory map into
a pinned host buffer, sends it to the device asynchronously on that stream, merges there and
copies the result back into pinned memory, so one worker's transfers overlap the other's
kernels. On the CPU (the torch reference, or Triton's interpreter) every step is the identity.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import replace

import torch

from adaptr.ops.merge_tensor import DenseDelta, LoraFactors, TensorMergeOp


class DeviceStage:
    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._local = threading.local()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Run the enclosed work on this thread's own stream (a no-op off CUDA)."""
        if not self.cuda:
            yield
            return
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(s):
            yield

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor on the device: memory map → pinned buffer → asynchronous copy."""
        if t.device == self.device or not self.cuda:
            return t
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        pinned.copy_(t)
        return pinned.to(self.device, non_blocking=True)

    def get(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor back on the host (pinned), complete when this returns."""
        if t.device.type == "cpu":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def put_op(self, op: TensorMergeOp) -> TensorMergeOp:
        """A merge operation whose base, factors and deltas all live on the device."""
        if not self.cuda:
            return op
        contributions = [
            LoraFactors(self.put(c.lora_A), self.put(c.lora_B), c.scaling, c.transpose)
            if isinstance(c, LoraFactors)
            else DenseDelta(self.put(c.value))
            for c in op.contributions
        ]
        magnitude = None if op.dora_magnitude is None else self.put(op.dora_magnitude)
        # the workspace holds host buffers; device scratch comes from torch's caching allocator
        return replace(
            op, base=self.put(op.base), contributions=contributions, dora_magnitude=magnitude, workspace=None
        )

    def budget(self, host_budget: int) -> int:
        """Bytes of working sets the engine may hold at once: on a GPU, also at most half its free memory."""
        if not self.cuda:
            return host_budget
        free, _total = torch.cuda.mem_get_info(self.device)
        return min(host_budget, free // 2)

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None
