"""The streaming merge engine: one output tensor at a time, never the whole model.

For each tensor of the base (in file order) it reads the base tensor from a memory map,
reads only the LoRA factors that touch it, hands the whole per-tensor merge to a kernel
(a plugin's, claimed through ``get_kernel``, or the torch reference), and streams the
result into the shard writer. Peak memory is a small multiple of the largest tensor.
The engine knows strategies only through the registry; it never names one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptr.backends import TORCH, Selected, using
from adaptr.device_stage import DeviceStage
from adaptr.errors import InvalidInputError, OperationError
from adaptr.interfaces import MergeStrategy
from adaptr.ops.merge_tensor import DenseDelta, LoraFactors, TensorMergeOp, merge_tensor
from adaptr.ops.random_drop import tensor_seed
from adaptr.ops.workspace import Workspace
from adaptr.plan import (  # noqa: F401  (planning lives beside; the engine is its one consumer)
    _CODE_BYTES,
    DEFAULT_SKIP,
    WEIGHT_FILE_PREFIXES,
    AdapterInput,
    MergePlan,
    OutputTensor,
    QuantStep,
    _plugin_errors,
    copy_side_files,
    module_skipped,
    plan_merge,
    plan_quantization,
    resolve_params,
)

log = logging.getLogger("adaptr")


def execute(
    plan: MergePlan,
    *,
    base_path: Path,
    adapters: list[AdapterInput],
    strategy: MergeStrategy | None,
    params: dict[str, Any],
    seed: int,
    dest: Path,
    max_shard_size: int,
    progress: Callable[[int], None],
    quantize: QuantStep | None = None,
    qlora: QuantStep | None = None,
    tee: Path | None = None,
    report: dict[str, dict[str, float]] | None = None,
    backend: Selected = TORCH,
    stats: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Stream every output tensor into ``dest`` (sharded safetensors); return each file's sha256.

    ``quantize`` turns the tensors planned with parts into their quantized parts in the same
    pass, recording each one's error in ``report``; ``qlora`` round-trips the base weights
    marked ``roundtrip`` before anything is added to them; ``tee`` also writes the
    unquantized result there (the merge report compares both). ``backend`` says where the
    arithmetic runs (see :mod:`adaptr.backends`); on an accelerator the tensors travel through
    :class:`DeviceStage`, and ``stats`` receives the device's peak memory.
    """
    from safetensors import safe_open

    from adaptr.io.safetensors_io import StreamingShardWriter, open_weights, torch_dtype
    from adaptr.plugins import get_host

    kernel_params = {"strategy": strategy.name if strategy else None, **params, "backend": backend.name}
    kernels: dict[tuple[str, str], Callable[[TensorMergeOp], torch.Tensor]] = {}
    reference = functools.partial(merge_tensor, strategy=strategy)
    from adaptr.ops.quant_error import error_stats

    def kernel_for(device: str, dtype: torch.dtype) -> Callable[[TensorMergeOp], torch.Tensor]:
        key = (device, str(dtype).removeprefix("torch."))
        if key not in kernels:
            claimed = get_host().pm.hook.get_kernel(
                op="merge_tensor", device=key[0], dtype=key[1], params=kernel_params
            )
            kernels[key] = claimed or reference
        return kernels[key]

    specs = [spec for t in plan.tensors for spec in t.specs]
    weights = open_weights(base_path)
    stage = DeviceStage(backend.device)
    # On an accelerator two workers suffice: one transfers while the other's kernels run. A
    # backend hosted on the CPU (Triton's interpreter, which keeps global launch state) gets one.
    workers = (
        1 if backend.accelerated and not stage.cuda else merge_workers(default=2 if stage.cuda else None)
    )
    # Tensors are merged concurrently only while their estimated working memory fits in
    # 6x the largest output tensor (the writer may hold 2x more): memory never grows with
    # model size. One tensor is always admitted, whatever its estimate.
    budget = 6 * max((math.prod(t.shape) * _CODE_BYTES.get(t.code, 1) for t in plan.tensors), default=0)
    # Delta scratch is reused across tensors (fresh buffers cost page faults and zeroing); the
    # pool keeps at most half the budget.
    workspace = Workspace(budget // 2)
    # On a GPU the same working sets live in device memory: admit no more than half of what is free.
    budget = stage.budget(budget)

    def produce(t: OutputTensor, job: Any) -> _Produced:
        with stage.stream():
            produced = produce_here(t, job)
            return _Produced(
                [(n, stage.get(v)) for n, v in produced.stored], stage.get(produced.value), produced.error
            )

    def produce_here(t: OutputTensor, job: Any) -> _Produced:
        out_dtype = torch_dtype(t.code)
        if isinstance(job, TensorMergeOp):
            job = stage.put_op(job)
            if t.roundtrip and qlora is not None:
                job.base = stage.put(qlora.roundtrip(t.source, job.base))
            value = kernel_for(str(job.base.device), out_dtype)(job)
            # min and max are one fast vectorised pass in the tensor's own dtype (a float32 sum of
            # bf16 is ten times slower), and NaN and ±Inf show up in one of them.
            if value.numel() and not all(map(math.isfinite, map(float, torch.aminmax(value)))):
                raise InvalidInputError(
                    f"merging produced NaN/Inf in {t.name}; check the adapters' weights and the strategy "
                    "parameters"
                )
        else:
            if stage.cuda and (t.roundtrip or t.parts is not None):
                job = stage.put(job)
            value = job if job.dtype == out_dtype else job.to(out_dtype)
            if t.roundtrip and qlora is not None:
                value = stage.put(qlora.roundtrip(t.source, value))
        if t.parts is None or quantize is None:
            return _Produced([(t.name, value)], value, None)
        with _plugin_errors("quantizer", quantize.quantizer.name, t.name):
            parts = quantize.quantizer.quantize(t.name, value, quantize.params)
            planned = [p.name for p in t.parts]
            if list(parts) != planned:
                raise OperationError(
                    f"quantizer {quantize.quantizer.name!r} returned {list(parts)} for {t.name}, but its "
                    f"layout announced {planned}; report this to the plugin's authors"
                )
            approx = quantize.quantizer.dequantize(t.name, parts, quantize.params, value.dtype)
        return _Produced(list(parts.items()), value, error_stats(value, approx.to(value.device)))

    _return_freed_memory()
    previous_threads = torch.get_num_threads()
    if workers > 1 and not stage.cuda:
        # Parallel across tensors, one thread per op: torch's intra-op threads stall badly when
        # the writer and hasher threads hold a core, independent tensors do not.
        torch.set_num_threads(1)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(using(backend))  # quantizers ask adaptr.backends.kernel() for it
            base = stack.enter_context(weights.reader())
            files = [
                stack.enter_context(safe_open(str(a.path / a.manifest.weights_file), framework="pt"))
                for a in adapters
            ]
            writer = stack.enter_context(
                StreamingShardWriter(dest, specs, max_shard_size=max_shard_size, check_space=False)
            )
            tee_writer = None
            if tee is not None:
                tee_specs = [(t.name, t.code, tuple(t.shape)) for t in plan.tensors]
                tee_writer = stack.enter_context(
                    StreamingShardWriter(tee, tee_specs, max_shard_size=max_shard_size, check_space=False)
                )
            pool = stack.enter_context(
                ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adaptr-merge")
            )
            # Jobs finish in any order but are written in plan order. A finished job holds only its
            # output until written, so its working memory is released (for admission) at once:
            # workers never idle behind a slow job at the head of the queue.
            window: deque[_Job] = deque()
            done = 0

            def held() -> int:
                return sum(j.out_bytes if j.future.done() else j.estimate for j in window)

            def running() -> int:
                return sum(not j.future.done() for j in window)

            def settle(block: bool) -> None:
                nonlocal done
                if block:
                    wait([j.future for j in window if not j.future.done()], return_when=FIRST_COMPLETED)
                for j in window:  # fail fast: a failed job need not wait for the ones before it
                    if j.future.done() and j.future.exception() is not None:
                        raise j.future.exception()
                while window and window[0].future.done():
                    job = window.popleft()
                    produced = job.future.result()
                    for name, value in produced.stored:
                        writer.write(name, value)
                    if tee_writer is not None:
                        tee_writer.write(job.tensor.name, produced.value)
                    if report is not None and produced.error is not None:
                        report[job.tensor.name] = produced.error
                    done += 1
                    value = produced.value
                    progress(value.numel() * value.element_size(), f"{done}/{len(plan.tensors)} tensors")

            try:
                for t in plan.tensors:
                    est = _working_bytes(t)
                    settle(block=False)
                    while window and (running() >= workers or held() + est > budget):
                        settle(block=True)
                    # Reads happen here, on one thread (readers are not thread-safe); they are
                    # zero-copy memory-map views, so only the arithmetic runs on the workers.
                    if t.replacement is not None:
                        i, key = t.replacement
                        job: Any = files[i].get_tensor(key)
                    elif t.lora or t.bias:
                        job = _tensor_op(
                            t,
                            base.get(t.source),
                            files,
                            adapters,
                            strategy.name,
                            params,
                            seed,
                            torch_dtype(t.code),
                            workspace,
                        )
                    else:
                        job = base.get(t.source)
                    out_bytes = math.prod(t.shape) * _CODE_BYTES.get(t.code, 1)
                    context = contextvars.copy_context()  # workers see the operation's backend
                    window.append(_Job(t, pool.submit(context.run, produce, t, job), est, out_bytes))
                while window:
                    settle(block=True)
            except BaseException:
                for j in window:
                    j.future.cancel()
                raise
    finally:
        torch.set_num_threads(previous_threads)
    if stats is not None:
        stats["backend"] = backend.to_dict()
        stats["device_peak_bytes"] = stage.peak_bytes()
    hashes = dict(writer.sha256)
    if writer.index_path is not None:
        from adaptr.io.files import sha256_file

        hashes[writer.index_path.name] = sha256_file(writer.index_path)
    return hashes


@dataclass
class _Produced:
    stored: list[tuple[str, torch.Tensor]]  # what the writer gets, in layout order
    value: torch.Tensor  # the unquantized output tensor
    error: dict[str, float] | None  # quantization error of this tensor


@dataclass
class _Job:
    tensor: OutputTensor
    future: Future
    estimate: int  # working bytes while it runs
    out_bytes: int  # bytes it holds once finished, until written


def merge_workers(default: int | None = None) -> int:
    """Tensors merged at once: ``ADAPTR_MERGE_WORKERS``, else ``default``, else one per CPU core."""
    import os

    value = os.environ.get("ADAPTR_MERGE_WORKERS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise InvalidInputError(f"ADAPTR_MERGE_WORKERS={value!r}: expected a whole number") from None
    if default is not None:
        return default
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _working_bytes(t: OutputTensor) -> int:
    """Anonymous memory one tensor's merge needs: fp32 deltas (DARE keeps a dropped copy too),
    the fp32 result and the cast output; copies need the tensor twice at most."""
    n = math.prod(t.shape)
    contributions = len(t.lora) + len(t.bias)
    # Quantizing keeps float32 working copies for the parts, the round trip and the error.
    quant = n * 4 * 3 if (t.parts is not None or t.roundtrip) else 0
    if contributions:
        return n * 4 * (2 * contributions + 2) + quant
    return n * _CODE_BYTES.get(t.code, 1) * 2 + quant


def _tensor_op(
    t: OutputTensor,
    base_t: torch.Tensor,
    files: list[Any],
    adapters: list[AdapterInput],
    strategy: str,
    params: dict[str, Any],
    seed: int,
    out_dtype: torch.dtype,
    workspace: Workspace,
) -> TensorMergeOp:
    contributions: list[LoraFactors | DenseDelta] = []
    idx: list[int] = []
    for i, m in t.lora:
        contributions.append(
            LoraFactors(
                files[i].get_tensor(m.a_key),
                files[i].get_tensor(m.b_key),
                m.scaling,
                transpose=m.fan_in_fan_out or m.kind == "embedding",
            )
        )
        idx.append(i)
    for i, m in t.bias:
        contributions.append(DenseDelta(files[i].get_tensor(m.bias_key).float() * m.scaling))
        idx.append(i)
    magnitude, rows_dim0 = None, True
    if t.dora is not None:
        i, m = t.dora
        magnitude, rows_dim0 = files[i].get_tensor(m.magnitude_key), not m.fan_in_fan_out
    return TensorMergeOp(
        name=t.name,
        base=base_t,
        contributions=contributions,
        weights=[adapters[i].weight for i in idx],
        strategy=strategy,
        params=params,
        # Seeded by (merge seed, tensor, adapter position): masks do not depend on order or threads.
        seeds=[tensor_seed(seed, t.name, i) for i in idx],
        out_dtype=out_dtype,
        dora_magnitude=magnitude,
        dora_rows_are_dim0=rows_dim0,
        workspace=workspace,
    )


def _return_freed_memory() -> None:
    """Make glibc hand large freed buffers back to the OS at once.

    Worker threads get their own malloc arenas, and glibc's adaptive mmap threshold would
    otherwise keep recently freed multi-MB tensors inside them: resident memory would then
    track the sum of per-thread high-water marks instead of what is live.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: allocations >= 1 MiB are mmapped, freed to the OS
    except (OSError, AttributeError):
        pass
