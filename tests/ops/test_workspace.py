"""The scratch pool: buffers are reused by size, the pool never holds more than its limit, and
merges give the same result with or without it."""

from __future__ import annotations

import threading

import torch

from adaptr.ops.merge_tensor import LoraFactors, TensorMergeOp, merge_tensor
from adaptr.ops.workspace import Workspace


def test_buffers_are_reused_by_exact_size() -> None:
    ws = Workspace(1 << 20)
    a = ws.take(1000)
    assert a.dtype == torch.float32 and a.numel() == 1000
    ptr = a.data_ptr()
    ws.give(a)
    assert ws.take(999).data_ptr() != ptr  # another size: a new buffer
    assert ws.take(1000).data_ptr() == ptr  # the same size: the same storage again
    assert ws.held == (1000 + 999) * 4


def test_pool_stays_within_its_limit() -> None:
    ws = Workspace(10_000)  # bytes: room for 2500 floats
    bufs = [ws.take(1000) for _ in range(4)]  # in use beyond the limit is allowed...
    assert ws.held == 16_000
    ws.give(*bufs)  # ...but only what fits is kept once handed back
    assert ws.held <= 10_000
    ws.clear()
    assert ws.held == 0
    assert Workspace(0).take(5).numel() == 5


def test_threads_never_share_a_buffer() -> None:
    ws = Workspace(1 << 24)
    seen: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        for _ in range(50):
            buf = ws.take(4096)
            buf.fill_(i)
            with lock:
                seen.append(buf.data_ptr())
            assert bool((buf == i).all())
            ws.give(buf)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 200 and ws.held <= 4 * 4096 * 4


class _ReturnsFirstDelta:
    """A (bad-mannered) strategy that hands back one of its inputs instead of a new tensor."""

    name = "first"

    def merge(self, deltas, weights, params, *, seeds):
        return deltas[0]


def _op(workspace: Workspace | None) -> TensorMergeOp:
    g = torch.Generator().manual_seed(0)
    factors = [
        LoraFactors(torch.randn(4, 48, generator=g), torch.randn(32, 4, generator=g), 0.5) for _ in range(2)
    ]
    return TensorMergeOp(
        name="w",
        base=torch.randn(32, 48, generator=g),
        contributions=factors,
        weights=[1.0, 1.0],
        strategy="first",
        params={},
        seeds=[0, 1],
        out_dtype=torch.float32,
        workspace=workspace,
    )


def test_merge_with_a_workspace_equals_without_and_survives_reuse() -> None:
    ws = Workspace(1 << 20)
    expected = merge_tensor(_op(None), _ReturnsFirstDelta())
    got = merge_tensor(_op(ws), _ReturnsFirstDelta())
    for _ in range(2):  # whoever reuses the delta buffers next overwrites them
        ws.take(32 * 48).fill_(float("nan"))
    assert torch.equal(got, expected)
    assert ws.held == 2 * 32 * 48 * 4
