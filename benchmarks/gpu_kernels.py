"""GPU benchmark of the Triton backend's kernels: roofline, eager torch and a whole 1B-model merge.

    python benchmarks/gpu_kernels.py            # on a CUDA GPU: full run, writes docs/benchmarks.md
    python benchmarks/gpu_kernels.py --quick --out /tmp/b.md   # fewer repeats, smaller time budgets
    python benchmarks/gpu_kernels.py --dry-run --out /tmp/b.md # CPU, TRITON_INTERPRET=1, tiny shapes

1. The device: device-to-device copy bandwidth (read + write bytes / s), pinned host-to-device
   bandwidth, and bf16 matmul throughput (TFLOP/s): the roofline's two ceilings.
2. Each kernel (CUDA events, warmup, median of N) on 4096×4096 and 4096×14336 bf16 bases with 8
   adapters of rank 16 and of rank 64 (bf16 factors): fused linear, DARE-linear, TIES (density 0.2),
   DARE-TIES, NF4 quantize and dequantize (double quant), each against eager torch on the same
   device (the torch twins in ``adaptr.ops``, which materialize every ΔW; for NF4, whose twin is
   CPU-only, the same arithmetic in plain torch ops on the device). Roofline of a row:
   ``max(bytes that must move / copy bandwidth, FLOPs of the B·A products / bf16 matmul throughput)``.
3. A whole synthetic Llama-1B-shaped bf16 checkpoint with 2 rank-16 adapters on q,k,v,o,gate,up,down,
   merged by TIES tensor by tensor: GPU path (mmap → pinned buffer → async H2D on a stream → fused
   kernel → D2H into pinned memory, two workers on two streams) against the CPU path (the torch
   twin on all CPU threads).

Imports only torch, triton, safetensors (optional: a minimal reader/writer stands in), the kernel
modules and ``adaptr.ops``: it runs on a bare GPU machine from a copy of the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import mmap
import os
import platform
import queue
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO / "benchmarks", REPO, REPO / "plugins"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# Never imported here (checked by tests/test_gpu_benchmark.py): the service layers and their packages.
FORBIDDEN_MODULES = (
    "adaptr.plugins",
    "adaptr.engine",
    "adaptr.services",
    "adaptr.catalog",
    "adaptr_triton.plugin",
    "pluggy",
    "sqlmodel",
    "fastapi",
    "typer",
    "pydantic",
)

TARGETS = {
    "linear": "≥85% roofline",
    "TIES": "≥50% roofline, ≥3× eager",
    "NF4 dequantize": "≥70% copy BW",
}

GB = 1e9
SKIPPED = "skipped: --deadline reached"


# ---------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class Config:
    dry_run: bool
    quick: bool
    device: str
    shapes: list[tuple[int, int]]
    ranks: list[int]
    adapters: int
    warmup: int
    reps: int
    eager_reps: int
    eager_limit_s: float  # skip an eager DARE row whose CPU Philox masks would take longer
    cpu_budget_s: float  # the whole-model CPU path stops here and extrapolates
    copy_elems: int
    h2d_elems: int
    matmul_n: int
    model: dict[str, int] = field(default_factory=dict)
    model_adapters: int = 2
    model_rank: int = 16
    deadline: float = math.inf  # perf_counter() after which remaining rows are skipped (table still written)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def make_config(args: argparse.Namespace, device: str) -> Config:
    if args.dry_run:
        return Config(
            dry_run=True,
            quick=True,
            device=device,
            shapes=[(64, 96)],
            ranks=[4],
            adapters=2,
            warmup=0,
            reps=1,
            eager_reps=1,
            eager_limit_s=args.eager_limit or 30.0,
            cpu_budget_s=args.cpu_budget or 60.0,
            copy_elems=1 << 20,
            h2d_elems=1 << 20,
            matmul_n=128,
            model=dict(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64),
            model_rank=4,
        )
    quick = args.quick
    return Config(
        dry_run=False,
        quick=quick,
        device=device,
        shapes=[(4096, 4096), (4096, 14336)],
        ranks=[16, 64],
        adapters=8,
        warmup=3 if quick else 5,
        reps=10 if quick else 30,
        eager_reps=2 if quick else 5,
        eager_limit_s=args.eager_limit or (10.0 if quick else 30.0),
        cpu_budget_s=args.cpu_budget or (75.0 if quick else 240.0),
        copy_elems=1 << 28,  # 1 GiB of float32
        h2d_elems=1 << 27,  # 512 MiB
        matmul_n=8192,
        model=dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    )


# ---------------------------------------------------------------------------------------------------------
# timing


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        # written before each timed call on a GPU, so no call finds its operands in L2 (as the copy didn't)
        self._flush = torch.empty(1 << 28, dtype=torch.uint8, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn: Callable[[], Any]) -> float:
        if self._flush is not None:
            self._flush.zero_()
        self.sync()
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def median(self, fn: Callable[[], Any], warmup: int, reps: int) -> float:
        return self.run(fn, warmup, reps)[0]

    def run(self, fn: Callable[[], Any], warmup: int, reps: int) -> tuple[float, Any]:
        """The median time of ``reps`` calls after ``warmup`` untimed ones, and the last call's result."""
        for _ in range(warmup):
            fn()
        held: list[Any] = []
        times = [self.once(lambda: held.append(fn())) for _ in range(max(1, reps))]
        return statistics.median(times), held[-1]


# ---------------------------------------------------------------------------------------------------------
# the device's ceilings


@dataclass
class DeviceCeilings:
    copy_bw: float  # bytes/s, device-to-device copy (read + write)
    h2d_bw: float | None  # bytes/s, pinned host to device (None without CUDA)
    matmul_flops: float  # FLOP/s, bf16 matmul


def measure_ceilings(cfg: Config, timer: Timer) -> DeviceCeilings:
    import torch

    dev = cfg.device

    def copy_time(src: Any, dst: Any) -> float:
        return timer.median(lambda: dst.copy_(src, non_blocking=True), cfg.warmup, cfg.reps)

    size = cfg.copy_elems * 4
    copy_bw = (
        2 * size / copy_time(torch.ones(cfg.copy_elems, device=dev), torch.empty(cfg.copy_elems, device=dev))
    )
    h2d_bw = None
    if timer.cuda:
        host = torch.ones(cfg.h2d_elems, pin_memory=True)
        h2d_bw = cfg.h2d_elems * 4 / copy_time(host, torch.empty(cfg.h2d_elems, device=dev))
        del host
        torch.cuda.empty_cache()
    n = cfg.matmul_n
    a = torch.randn(n, n, device=dev).to(torch.bfloat16)
    b = torch.randn(n, n, device=dev).to(torch.bfloat16)
    t = timer.median(lambda: torch.matmul(a, b), cfg.warmup, cfg.reps)
    return DeviceCeilings(copy_bw, h2d_bw, 2 * n**3 / t)


# ---------------------------------------------------------------------------------------------------------
# kernel rows


@dataclass
class Row:
    kernel: str
    shape: str
    adapters: str
    bytes: float  # that must move
    flops: float  # of the B·A products, one pass
    time: float | None = None
    eager: float | None = None
    eager_note: str = ""
    check: str = ""
    error: str = ""

    def roofline(self, c: DeviceCeilings) -> float:
        return max(self.bytes / c.copy_bw, self.flops / c.matmul_flops)

    def verdict(self, c: DeviceCeilings) -> str:
        target = TARGETS.get(self.kernel)
        if target is None or self.time is None:
            return ""
        roof = self.roofline(c) / self.time
        if self.kernel == "linear":
            ok = roof >= 0.85
        elif self.kernel == "TIES":
            ok = roof >= 0.50 and self.eager is not None and self.eager / self.time >= 3
        else:  # NF4 dequantize: against the copy bandwidth (its roofline has no FLOPs)
            ok = self.bytes / self.time >= 0.70 * c.copy_bw
        return f"{target} {'✓' if ok else '✗'}"


def merge_bytes(d: int, k: int, n: int, r: int) -> float:
    """Read the base and write W' once (bf16), read every factor once (bf16)."""
    return 2 * d * k * 2 + n * (d + k) * r * 2


def merge_flops(d: int, k: int, n: int, r: int) -> float:
    """One ``B_i @ A_i`` per adapter: ``2·d·k·r`` each (TIES fundamentally needs one pass too)."""
    return 2 * d * k * r * n


def nf4_bytes(numel: int, blocksize: int = 64) -> tuple[float, float]:
    """(quantize, dequantize) bytes with double quant: bf16 values, packed nibbles, uint8 absmax codes,
    float32 nested absmax per 256 blocks."""
    nblocks = -(-numel // blocksize)
    packed = (numel + 1) // 2 + nblocks + 4 * -(-nblocks // 256)
    return 2 * numel + packed, packed + 2 * numel


def _max_diff(a: Any, b: Any) -> str:
    return f"max abs Δ {float((a.float() - b.float()).abs().max()):.1e}"


def _philox_rate() -> float:
    """Elements per second of the CPU Philox masks the eager DARE twin draws."""
    from adaptr.ops.philox import keep_mask_np

    keep_mask_np(1, 0, 1 << 12, 0.5)
    n = 1 << 20
    t0 = time.perf_counter()
    keep_mask_np(7, 0, n, 0.5)
    return n / (time.perf_counter() - t0)


class Kernels:
    """The Triton kernels and their torch twins, imported once the interpreter choice is made."""

    def __init__(self) -> None:
        from adaptr.ops import quant4 as twin_quant4
        from adaptr.ops import ties_merge as twin_ties
        from adaptr_triton import linear_merge, quant4, ties_merge

        self.linear = linear_merge.linear_merge
        self.ties = ties_merge.ties_merge_lora
        self.quantize = quant4.quantize_4bit
        self.dequantize = quant4.dequantize_4bit
        self.twin_ties = twin_ties.ties_merge_lora
        self.ref4 = twin_quant4
        try:  # imports numpy (the DARE twins' CPU Philox masks)
            from adaptr.ops import linear_merge as twin_linear
        except ImportError as exc:
            missing = f"{exc}"

            def twin_linear_missing(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError(f"the torch twin cannot be imported here: {missing}")

            self.twin_linear = twin_linear_missing
        else:
            self.twin_linear = twin_linear.linear_merge


def eager_nf4_quantize(k: Kernels, x: Any, blocksize: int = 64) -> Any:
    """NF4 with double quant in plain torch ops on ``x``'s device (the twin itself is CPU-only):
    absmax per block, nearest code by ``bucketize`` on the midpoints, two codes per byte; the nested
    statistics by the twin's ``_quantize_absmax`` on the CPU, as the Triton wrapper does."""
    import torch

    ref = k.ref4
    code = ref.code_book("nf4").to(x.device)
    f = x.reshape(-1, blocksize).float()
    absmax = f.abs().amax(1)
    s = f / absmax.clamp_min(1e-38)[:, None]
    idx = torch.bucketize(s.reshape(-1), (code[1:] + code[:-1]) * 0.5).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    codes, nested, offset = ref._quantize_absmax(absmax.cpu())
    q = ref.Quant4(packed.view(-1, 1), codes.to(x.device), tuple(x.shape), x.dtype, blocksize, "nf4")
    q.nested_absmax, q.nested_offset = nested.to(x.device), offset
    return q


def eager_nf4_dequantize(k: Kernels, q: Any) -> Any:
    """Dequantize (double quant) in plain torch ops on the device of ``q.packed``."""
    import torch

    ref = k.ref4
    dev = q.packed.device
    code = ref.code_book(q.quant_type).to(dev)
    p = q.packed.reshape(-1)
    vals = torch.stack((code[(p >> 4).long()], code[(p & 15).long()]), 1).reshape(-1, q.blocksize)
    nb = q.absmax.numel()
    nested = q.nested_absmax.to(dev).repeat_interleave(ref.NESTED_BLOCKSIZE)[:nb]
    absmax = ref.dynamic_map().to(dev)[q.absmax.long()] * nested + q.nested_offset
    return (vals * absmax[:, None]).to(q.dtype).view(q.shape)


def kernel_rows(cfg: Config, timer: Timer, k: Kernels, log: Callable[[str], None]) -> list[Row]:
    import torch

    dev = cfg.device
    g = torch.Generator(device="cpu").manual_seed(0)
    rows: list[Row] = []
    try:
        philox_rate = _philox_rate()
    except Exception as exc:  # numpy missing: the DARE twins cannot run
        philox_rate = 0.0
        log(f"  no CPU Philox masks for the eager DARE twins ({exc})")
    n = cfg.adapters
    for d, kk in cfg.shapes:
        base = (torch.randn(d, kk, generator=g) * 0.02).to(torch.bfloat16).to(dev)
        for r in cfg.ranks:
            factors = [
                (
                    (torch.randn(r, kk, generator=g) / math.sqrt(kk)).to(torch.bfloat16).to(dev),
                    (torch.randn(d, r, generator=g) * 0.01).to(torch.bfloat16).to(dev),
                    2.0,
                )
                for _ in range(n)
            ]
            weights = [1.0 / n + 0.01 * i for i in range(n)]
            seeds = [(1234567 * (i + 1)) % (1 << 63) for i in range(n)]
            dare = 0.3
            variants: list[tuple[str, dict[str, Any], Callable, Callable]] = [
                ("linear", dict(coeffs=weights), k.linear, k.twin_linear),
                (
                    "DARE-linear",
                    dict(coeffs=[w / dare for w in weights], seeds=seeds, density=dare),
                    k.linear,
                    k.twin_linear,
                ),
                ("TIES", dict(weights=weights, density=0.2), k.ties, k.twin_ties),
                ("DARE-TIES", dict(weights=weights, seeds=seeds, drop_density=dare), k.ties, k.twin_ties),
            ]
            for name, kwargs, fast, twin in variants:
                row = Row(
                    name,
                    f"{d}×{kk}",
                    f"{n}×r{r}",
                    merge_bytes(d, kk, n, r),
                    merge_flops(d, kk, n, r),
                )
                rows.append(row)
                if cfg.left() < 0:
                    row.error = SKIPPED
                    continue
                log(f"  {name} {row.shape} {row.adapters}")
                try:
                    run_fast = lambda f=fast, kw=kwargs, b=base, fs=factors: f(b, fs, **kw)  # noqa: E731
                    row.time, out = timer.run(run_fast, cfg.warmup, cfg.reps)
                    run_twin = lambda f=twin, kw=kwargs, b=base, fs=factors: f(b, fs, **kw)  # noqa: E731
                    if cfg.left() < 30:
                        row.eager_note, row.check = "skipped: --deadline near", "—"
                        continue
                    if "seeds" in kwargs:
                        need = n * d * kk / philox_rate if philox_rate else math.inf
                        if need > min(cfg.eager_limit_s, cfg.left() - 30):
                            row.eager_note = (
                                f"skipped: CPU Philox masks ≈{_num(need)} s" if philox_rate else "no numpy"
                            )
                            row.check = "—"
                            continue
                    row.eager, row.eager_note, expect = _time_eager(cfg, timer, run_twin)
                    row.check = _max_diff(out, expect)
                    del out, expect
                except Exception as exc:
                    row.error = f"{type(exc).__name__}: {exc}"[:160]
                    log(f"    error: {row.error}")
            del factors
        rows += nf4_rows(cfg, timer, k, base, log)
        del base
        if timer.cuda:
            torch.cuda.empty_cache()
    return rows


def _time_eager(cfg: Config, timer: Timer, fn: Callable[[], Any]) -> tuple[float, str, Any]:
    """The first call is the warmup (and the result); slow twins (over 2 s) are timed once."""
    holder: list[Any] = []
    first = timer.once(lambda: holder.append(fn()))
    if first > 2.0 or cfg.eager_reps <= 1:
        return first, "1 run" if first > 2.0 else "", holder[0]
    return timer.median(fn, 0, cfg.eager_reps), "", holder[0]


def nf4_rows(cfg: Config, timer: Timer, k: Kernels, base: Any, log: Callable[[str], None]) -> list[Row]:
    numel = base.numel()
    qbytes, dbytes = nf4_bytes(numel)
    shape = "×".join(map(str, base.shape))
    quant = Row("NF4 quantize", shape, "dq", qbytes, 0.0)
    deq = Row("NF4 dequantize", shape, "dq", dbytes, 0.0)
    if cfg.left() < 0:
        quant.error = deq.error = SKIPPED
        return [quant, deq]
    log(f"  NF4 {shape}")
    try:
        quant.time, q = timer.run(lambda: k.quantize(base, double_quant=True), cfg.warmup, cfg.reps)
        quant.eager, quant.eager_note, _ = _time_eager(cfg, timer, lambda: eager_nf4_quantize(k, base))
        ref = k.ref4.quantize_4bit(base.cpu(), double_quant=True)  # the CPU twin: the bytes to match
        same = bool((q.packed.cpu() == ref.packed).all() and (q.absmax.cpu() == ref.absmax).all())
        quant.check = "bytes = twin" if same else "bytes ≠ twin"
        deq.time, got = timer.run(lambda: k.dequantize(q), cfg.warmup, cfg.reps)
        deq.eager, deq.eager_note, eager_out = _time_eager(cfg, timer, lambda: eager_nf4_dequantize(k, q))
        same = bool((got.cpu() == k.ref4.dequantize_4bit(ref)).all())
        deq.check = "values = twin" if same else "values ≠ twin"
        del got, eager_out
    except Exception as exc:
        for row in (quant, deq):
            if row.time is None or not row.check:
                row.error = f"{type(exc).__name__}: {exc}"[:160]
        log(f"    error: {exc}")
    return [quant, deq]


# ---------------------------------------------------------------------------------------------------------
# the synthetic checkpoint (safetensors; a minimal reader/writer stands in when the package is missing)

_DTYPES = {"BF16": 2, "F32": 4}


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """``safetensors.torch.save_file``, or the same bytes written by hand without the package."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(tensors, str(path))
        return
    write_safetensors(tensors, path)


def write_safetensors(tensors: dict[str, Any], path: Path) -> None:
    import torch

    header: dict[str, Any] = {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        code = {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            t = tensors[name].contiguous()
            fh.write(t.view(torch.uint8).reshape(-1).numpy().tobytes())


class MappedFile:
    """Zero-copy tensors over a memory map of a safetensors file: ``safe_open`` when available."""

    def __init__(self, path: Path, force_minimal: bool = False) -> None:
        self._handle = None
        self._stack = contextlib.ExitStack()
        if not force_minimal:
            try:
                from safetensors import safe_open

                self._handle = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except ImportError:
                pass
        if self._handle is None:
            fh = self._stack.enter_context(open(path, "rb"))  # noqa: SIM115
            self._map = self._stack.enter_context(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY))
            (size,) = struct.unpack("<Q", self._map[:8])
            self._header = json.loads(self._map[8 : 8 + size])
            self._header.pop("__metadata__", None)
            self._data = 8 + size

    def keys(self) -> list[str]:
        return list(self._handle.keys()) if self._handle is not None else list(self._header)

    def get(self, name: str) -> Any:
        if self._handle is not None:
            return self._handle.get_tensor(name)
        import torch

        info = self._header[name]
        start, stop = info["data_offsets"]
        dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[info["dtype"]]
        count = (stop - start) // _DTYPES[info["dtype"]]
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._data + start)
        return flat.view(info["shape"])

    def close(self) -> None:
        self._stack.close()


MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SUFFIXES = tuple(f"{m}.weight" for m in MODULES)


def llama_shapes(m: dict[str, int]) -> dict[str, tuple[int, ...]]:
    h, i, v = m["hidden"], m["intermediate"], m["vocab"]
    kv = m["kv_heads"] * (h // m["heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(m["layers"]):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (h, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, h)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_checkpoint(cfg: Config, folder: Path) -> tuple[Path, list[Path], dict[str, tuple[int, ...]]]:
    """A random bf16 Llama-shaped checkpoint and ``cfg.model_adapters`` LoRA adapters on every
    q,k,v,o,gate,up,down projection (drawn on the benchmark's device, written to safetensors)."""
    import torch

    dev = cfg.device
    g = torch.Generator(device=dev).manual_seed(1)
    shapes = llama_shapes(cfg.model)
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=dev, dtype=torch.float32).mul_(0.02)
        tensors[name] = t.to(torch.bfloat16).cpu()
        del t
    base = folder / "model.safetensors"
    save_tensors(tensors, base)
    del tensors
    r = cfg.model_rank
    adapters = []
    for a in range(cfg.model_adapters):
        lora = {}
        for name, shape in shapes.items():
            if not name.endswith(LORA_SUFFIXES):
                continue
            out_f, in_f = shape
            stem = name[: -len(".weight")]
            A = torch.randn(r, in_f, generator=g, device=dev) / math.sqrt(in_f)
            B = torch.randn(out_f, r, generator=g, device=dev) * 0.01
            lora[stem + ".lora_A.weight"] = A.to(torch.bfloat16).cpu()
            lora[stem + ".lora_B.weight"] = B.to(torch.bfloat16).cpu()
        path = folder / f"adapter{a}.safetensors"
        save_tensors(lora, path)
        adapters.append(path)
    return base, adapters, shapes


@dataclass
class PathResult:
    seconds: float
    bytes: float
    merged_bytes: float  # of the tensors with adapters
    tensors: int
    total_tensors: int
    note: str = ""
    first: Any = None  # the first merged tensor, for the cross-check


class _Opened(threading.local):
    files: dict[Path, MappedFile] | None = None


def stream_model(
    cfg: Config,
    base_path: Path,
    adapter_paths: list[Path],
    names: list[str],
    merge: Callable[..., Any],
    *,
    device: str,
    workers: int,
    budget_s: float = math.inf,
) -> PathResult:
    """Merge every tensor of the checkpoint by TIES (density 0.2) with ``merge``, as the engine streams:
    each worker reads its tensor from the memory map into its pinned staging buffer, sends it to the
    device asynchronously on its own stream, merges there and copies the result back into pinned
    memory; tensors without adapters are copied from the map to host memory. On the CPU every
    transfer is the identity. Stops after ``budget_s`` (then the caller extrapolates)."""
    import torch

    cuda = device.startswith("cuda")
    opened = _Opened()
    local = threading.local()
    weights = [1.0 / len(adapter_paths)] * len(adapter_paths)
    largest = 0
    probe = MappedFile(base_path)
    sizes = {}
    for name in names:
        t = probe.get(name)
        sizes[name] = t.numel() * t.element_size()
        largest = max(largest, t.numel())
    probe.close()
    all_files: list[MappedFile] = []
    lock = threading.Lock()

    def files() -> dict[Path, MappedFile]:
        if opened.files is None:  # one reader per thread (safe_open handles are not thread-safe)
            opened.files = {p: MappedFile(p) for p in (base_path, *adapter_paths)}
            with lock:
                all_files.extend(opened.files.values())
        return opened.files

    # per worker, allocated before the clock starts: one stream, one pinned input and one pinned output buffer
    spare: queue.SimpleQueue[tuple[Any, Any, Any]] = queue.SimpleQueue()
    for _ in range(workers):
        spare.put(
            (
                torch.cuda.Stream(device) if cuda else None,
                torch.empty(largest, dtype=torch.bfloat16, pin_memory=cuda),
                torch.empty(largest, dtype=torch.bfloat16, pin_memory=cuda),
            )
        )

    def staging() -> tuple[Any, Any, Any]:
        st = getattr(local, "st", None)
        if st is None:
            st = local.st = spare.get_nowait()
        return st

    def one(name: str) -> Any:
        fs = files()
        stream, pin, out = staging()
        view = fs[base_path].get(name)
        n = view.numel()
        host_out = out[:n].view(view.shape)
        stem = name[: -len(".weight")]
        if not name.endswith(LORA_SUFFIXES):
            host_out.copy_(view)
            return None
        if cuda:  # memory map → pinned staging buffer (on the CPU every transfer is the identity)
            staged = pin[:n].view(view.shape)
            staged.copy_(view)
        else:
            staged = view
        ctx = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
        with ctx:
            w = staged.to(device, non_blocking=True)
            factors = [
                (
                    fs[p].get(stem + ".lora_A.weight").to(device, non_blocking=True),
                    fs[p].get(stem + ".lora_B.weight").to(device, non_blocking=True),
                    2.0,
                )
                for p in adapter_paths
            ]
            merged = merge(w, factors, weights, density=0.2)
            if cuda:  # back into pinned memory, complete when the stream is
                host_out.copy_(merged, non_blocking=True)
                stream.synchronize()
                merged = host_out
        return merged.clone() if name == first_lora else None

    first_lora = next(nm for nm in names if nm.endswith(LORA_SUFFIXES))
    done = 0
    moved = merged = 0.0
    first = None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        pending: list[tuple[str, Any]] = []
        for name in names:
            pending.append((name, pool.submit(one, name)))
            if len(pending) >= 2 * workers:
                nm, fut = pending.pop(0)
                res = fut.result()
                first = res if res is not None else first
                done += 1
                moved += 2 * sizes[nm]
                merged += 2 * sizes[nm] if nm.endswith(LORA_SUFFIXES) else 0
                if merged and time.perf_counter() - t0 > budget_s:
                    break
        for nm, fut in pending:
            res = fut.result()
            first = res if res is not None else first
            done += 1
            moved += 2 * sizes[nm]
            merged += 2 * sizes[nm] if nm.endswith(LORA_SUFFIXES) else 0
    seconds = time.perf_counter() - t0
    for f in all_files:
        f.close()
    return PathResult(seconds, moved, merged, done, len(names), first=first)


def whole_model(cfg: Config, k: Kernels, log: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """The GPU and CPU paths over the synthetic checkpoint: table lines and raw numbers."""
    import torch

    lines: list[str] = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="adaptr-gpu-bench-") as tmp:
        t0 = time.perf_counter()
        base_path, adapters, shapes = make_checkpoint(cfg, Path(tmp))
        names = list(shapes)
        params = sum(math.prod(s) for s in shapes.values())
        log(f"  checkpoint: {_params(params)} parameters in {time.perf_counter() - t0:.1f} s")
        cuda = cfg.device.startswith("cuda")
        workers = 2 if cuda else 1  # the interpreter keeps global launch state: one worker
        if cuda:  # compile the kernels for these shapes on the first layer's tensors
            first_layer = [n for n in names if ".layers.0." in n]
            stream_model(cfg, base_path, adapters, first_layer, k.ties, device=cfg.device, workers=workers)
        gpu = stream_model(cfg, base_path, adapters, names, k.ties, device=cfg.device, workers=workers)
        label = "GPU path (Triton TIES, 2 streams)" if cuda else "accelerator path (interpreter, CPU)"
        threads = os.cpu_count() or 1
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            cpu = stream_model(
                cfg,
                base_path,
                adapters,
                names,
                k.twin_ties,
                device="cpu",
                workers=1,
                budget_s=min(cfg.cpu_budget_s, max(5.0, cfg.left() - 15)),
            )
        finally:
            torch.set_num_threads(previous)
        check = _max_diff(gpu.first, cpu.first) if gpu.first is not None and cpu.first is not None else "—"
        total = sum(2 * math.prod(s) * 2 for s in shapes.values())
        merged_total = sum(2 * math.prod(s) * 2 for n, s in shapes.items() if n.endswith(LORA_SUFFIXES))
        for result, path in ((gpu, label), (cpu, f"CPU path (torch twin, {threads} threads)")):
            seconds = result.seconds
            note = ""
            if result.tensors < result.total_tensors:  # budget hit: extrapolate by the merged bytes
                seconds = result.seconds * merged_total / result.merged_bytes
                note = f"extrapolated from {result.tensors}/{result.total_tensors} tensors"
            raw[path] = {"seconds": seconds, "bytes": total, "measured_tensors": result.tensors, "note": note}
            lines.append(
                f"| {path} | {_params(params)} | {len(names)} | {_num(seconds)} | "
                f"{_num(total / seconds / GB)} | {note or 'measured'} |"
            )
        speedup = raw[f"CPU path (torch twin, {threads} threads)"]["seconds"] / raw[label]["seconds"]
        lines.append(f"\nGPU/CPU speed-up: {_num(speedup)}×; first merged tensor, GPU vs CPU: {check}.")
        raw["params"] = params
        raw["check"] = check
    return lines, raw


# ---------------------------------------------------------------------------------------------------------
# the report


def _num(x: float) -> str:
    """A number for the table: whole above 100, one decimal above 1, else three significant digits."""
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.3g} M"


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.3f} ms" if t < 10 else f"{t:.1f} s"


def render(
    cfg: Config,
    ceilings: DeviceCeilings,
    rows: list[Row],
    model_lines: list[str],
    env: dict[str, str],
) -> str:
    c = ceilings
    h2d = f"{_num(c.h2d_bw / GB)} GB/s" if c.h2d_bw else "n/a (no CUDA)"
    out = [
        "## GPU kernels (adaptr_triton)",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; {env['date']}"
        + (
            " — **dry run** (tiny shapes, CPU, TRITON_INTERPRET=1: numbers mean nothing)"
            if cfg.dry_run
            else ""
        ),
        "",
        f"Device ceilings: copy (device to device, read + write) **{_num(c.copy_bw / GB)} GB/s**; "
        f"pinned host to device {h2d}; bf16 matmul **{_num(c.matmul_flops / 1e12)} TFLOP/s**.",
        "",
        "| kernel | base | adapters | time | GB/s | % roofline | eager | speed-up | check | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            what = "skipped" if r.error == SKIPPED else "error"
            detail = r.error.replace("|", "/").replace("\n", " ")
            out.append(f"| {r.kernel} | {r.shape} | {r.adapters} | {what} | | | | | {detail} | |")
            continue
        gbs = r.bytes / r.time / GB if r.time else None
        roof = 100 * r.roofline(c) / r.time if r.time else None
        eager = _fmt_time(r.eager) + (f" ({r.eager_note})" if r.eager_note and r.eager else "")
        if r.eager is None:
            eager = r.eager_note or "—"
        speed = f"{_num(r.eager / r.time)}×" if r.eager and r.time else "—"
        out.append(
            f"| {r.kernel} | {r.shape} | {r.adapters} | {_fmt_time(r.time)} | "
            f"{_num(gbs)} | {_num(roof)}% | {eager} | {speed} | {r.check} | {r.verdict(c)} |"
        )
    out += [
        "",
        "Roofline per row: `max(bytes / copy BW, FLOPs / bf16 matmul throughput)`, with bytes = what must move "
        "(merges: read the bf16 base and write W' once, `2·2·d·k`, plus every bf16 factor once, "
        "`2·n·(d+k)·r`; NF4 with double quant: `2·numel` bf16 values plus `numel/2` packed bytes, `numel/64` "
        "absmax codes and a float32 per 256 blocks) and FLOPs = the B·A products once, `2·d·k·r` per adapter "
        "(TIES recomputes the tiles for its threshold and election passes, but fundamentally needs one). "
        "% roofline = roofline time / measured time; GB/s = those bytes / measured time. Eager = the torch "
        "twins (`adaptr.ops`) on the same device, which materialize every ΔW (the DARE twins draw their "
        "Philox masks with numpy on the CPU); for NF4 the same arithmetic in plain torch ops on the device "
        "(its twin is CPU-only). Check: Triton against eager (merges), against the CPU twin's bytes (NF4).",
        "",
        "### Whole-model merge (TIES, density 0.2)",
        "",
        f"Synthetic Llama-shaped bf16 checkpoint (hidden {cfg.model['hidden']}, intermediate "
        f"{cfg.model['intermediate']}, {cfg.model['layers']} layers, vocab {cfg.model['vocab']}), "
        f"{cfg.model_adapters} adapters of rank {cfg.model_rank} on q,k,v,o,gate,up,down; every tensor read "
        "from the memory-mapped safetensors file (page cache warm) and merged into host memory. GB/s = "
        "(bytes read + bytes written) / s. Pinned staging buffers are allocated once per worker.",
        "",
        "| path | parameters | tensors | seconds | GB/s | note |",
        "|---|---|---|---|---|---|",
        *model_lines,
    ]
    return "\n".join(out) + "\n"


def environment(cfg: Config) -> dict[str, str]:
    import torch
    import triton

    if cfg.device.startswith("cuda"):
        name = torch.cuda.get_device_name(cfg.device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, TRITON_INTERPRET=1)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller time budgets (~6 min)")
    p.add_argument("--out", type=Path, help="markdown file whose gpu section is rewritten")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--skip-model", action="store_true", help="leave out the whole-model merge")
    p.add_argument("--cpu-budget", type=float, help="seconds for the whole-model CPU path, then extrapolate")
    p.add_argument(
        "--deadline", type=float, help="seconds: skip what is left after this, still write the table"
    )
    p.add_argument("--eager-limit", type=float, help="skip eager DARE rows whose CPU masks take longer")
    return p.parse_args(argv)


def output_path(args: argparse.Namespace) -> Path | None:
    """``--out``; else docs/benchmarks.md, except on a dry run (which then writes nothing)."""
    if args.out is not None:
        return args.out
    return None if args.dry_run else REPO / "docs" / "benchmarks.md"


@contextlib.contextmanager
def _stage(name: str, log: Callable[[str], None]) -> Iterator[None]:
    t0 = time.perf_counter()
    log(f"{name} ...")
    yield
    log(f"{name}: {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    if args.dry_run:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda:0"
    else:
        print("no CUDA device: run with --dry-run (CPU, TRITON_INTERPRET=1)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    cfg = make_config(args, device)
    if args.deadline:
        cfg.deadline = started + args.deadline
    timer = Timer(device)
    k = Kernels()
    with _stage("device ceilings", log):
        ceilings = measure_ceilings(cfg, timer)
    with _stage("kernels", log):
        rows = kernel_rows(cfg, timer, k, log)
    model_lines: list[str] = []
    model_raw: dict[str, Any] = {}
    errors = [r for r in rows if r.error and r.error != SKIPPED]
    if not args.skip_model and cfg.left() < 60:
        model_lines = ["| whole model | skipped: --deadline near | | | | |"]
    elif not args.skip_model:
        with _stage("whole model", log):
            try:
                model_lines, model_raw = whole_model(cfg, k, log)
            except Exception as exc:
                model_lines = [f"| whole model | error | | | | {type(exc).__name__}: {exc} |"[:300]]
                model_raw = {"error": str(exc)}
                errors.append(exc)
                log(f"  error: {exc}")
    env = environment(cfg)
    text = render(cfg, ceilings, rows, model_lines, env)
    print(text)
    out = output_path(args)
    if out is not None:
        from report import write_section

        write_section(out, "gpu", text)
        log(f"wrote the gpu section of {out}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "env": env,
                    "ceilings": vars(ceilings),
                    "rows": [{**vars(r), "roofline_s": r.roofline(ceilings)} for r in rows],
                    "whole_model": model_raw,
                },
                indent=1,
                default=str,
            )
        )
    log(f"total {time.perf_counter() - started:.1f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
