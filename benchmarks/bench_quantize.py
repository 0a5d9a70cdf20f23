"""Quantizer benchmark: adaptr's NF4 / int8 / FP8 functions against bitsandbytes' (and transformers') on CPU.

Over every 2-D projection weight of a ~1.1B bf16 Llama (TinyLlama shape; the embeddings and the head,
which ``adaptr quantize`` skips by default, are left out), one subprocess per contender, in one run:
throughput in GB/s of bf16 input, peak anonymous memory (``RssAnon``, sampled every 20 ms), the
quantization error of the result (relative error, max abs error, SNR) and a per-tensor sha256 of the
output bytes, which must be equal between adaptr and the reference implementation.

Writes its table into docs/benchmarks.md between ``<!-- quantize:start -->`` and ``<!-- quantize:end -->``
(appended if absent). Not a test: run it on an idle machine.

Usage: python benchmarks/bench_quantize.py [--workdir .bench] [--small]   (--small: a 0.1B model)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import SHAPES, machine  # noqa: E402
from report import write_section  # noqa: E402

SKIP = ("embed_tokens", "lm_head")

# (key, method, implementation, torch threads, label). Everything runs single-threaded, as the
# quantize engine's workers do; NF4 also with two torch threads on both sides.
CONTENDERS = [
    ("nf4_adaptr", "nf4", "adaptr", 1, "adaptr `quantize_4bit`"),
    ("nf4_bnb", "nf4", "bnb", 1, "bitsandbytes `quantize_4bit`"),
    ("nf4_adaptr_2t", "nf4", "adaptr", 2, "adaptr `quantize_4bit`, 2 threads"),
    ("nf4_bnb_2t", "nf4", "bnb", 2, "bitsandbytes `quantize_4bit`, 2 threads"),
    ("nf4dq_adaptr", "nf4-dq", "adaptr", 1, "adaptr `quantize_4bit`, double quant"),
    ("nf4dq_bnb", "nf4-dq", "bnb", 1, "bitsandbytes `quantize_4bit`, double quant"),
    ("int8_adaptr", "int8", "adaptr", 1, "adaptr `quantize_int8`"),
    ("int8_bnb", "int8", "bnb", 1, "bitsandbytes fp16 cast + `int8_vectorwise_quant`"),
    ("fp8_adaptr", "fp8", "adaptr", 1, "adaptr `quantize_fp8`"),
    ("fp8_hf", "fp8", "transformers", 1, "transformers `Fp8Quantize`"),
]
REFERENCE = {"nf4": "nf4_bnb", "nf4-dq": "nf4dq_bnb", "int8": "int8_bnb", "fp8": "fp8_hf"}
PAIRS = [  # (adaptr, reference) rows compared in the summary
    ("nf4_adaptr", "nf4_bnb"),
    ("nf4_adaptr_2t", "nf4_bnb_2t"),
    ("nf4dq_adaptr", "nf4dq_bnb"),
    ("int8_adaptr", "int8_bnb"),
    ("fp8_adaptr", "fp8_hf"),
]


# ---------------------------------------------------------------------------------------------------------
# worker (one contender per process, so peak memory is its own)


def _quantizer(method: str, impl: str):
    """A function weight -> (tuple of output tensors, dequantized float32 or None)."""
    import torch

    if impl == "adaptr":
        from adaptr.ops.fp8 import dequantize_fp8, quantize_fp8
        from adaptr.ops.int8 import dequantize_int8, quantize_int8
        from adaptr.ops.quant4 import dequantize_4bit, quantize_4bit

        if method in ("nf4", "nf4-dq"):

            def run(w):
                q = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=method == "nf4-dq")
                return (q.packed, q.absmax, *([q.nested_absmax] if q.nested else [])), q

            return run, lambda q: dequantize_4bit(q, torch.float32)
        if method == "int8":
            return (lambda w: (quantize_int8(w),) * 2), lambda q: dequantize_int8(*q, torch.float32)
        return (lambda w: (quantize_fp8(w),) * 2), lambda q: dequantize_fp8(*q, torch.float32)
    if impl == "bnb":
        import bitsandbytes.functional as F

        if method in ("nf4", "nf4-dq"):

            def run(w):
                packed, st = F.quantize_4bit(
                    w, blocksize=64, quant_type="nf4", compress_statistics=method == "nf4-dq"
                )
                return (packed, st.absmax, *([st.state2.absmax] if st.nested else [])), None

            return run, None

        def run8(w):
            cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
            return (cb, scb), None

        return run8, None
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Hf:
        class quantization_config:  # stands in for FineGrainedFP8Config
            weight_block_size = [128, 128]
            scale_fmt = "float"

    op = Fp8Quantize(Hf())

    def run_hf(w):
        out = op._quantize_one("x.weight", w)
        return (out["x.weight"], out["x.weight_scale_inv"]), None

    return run_hf, None


def worker(base: str, key: str, out: str) -> None:
    import torch

    from adaptr.io.safetensors_io import open_weights
    from adaptr.ops.quant_error import error_stats

    _, method, impl, threads, _ = next(c for c in CONTENDERS if c[0] == key)
    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    quantize, dequantize = _quantizer(method, impl)
    ws = open_weights(base)
    names = [n for n, t in ws.tensors.items() if len(t.shape) == 2 and not any(s in n for s in SKIP)]
    seconds, nbytes, digests = 0.0, 0, {}
    errors = []
    with ws.reader() as r:
        warm = r.get(names[0])
        quantize(warm)  # first-call costs (tables, imports) are not throughput
        for name in names:
            w = r.get(name)
            t0 = time.perf_counter()
            outputs, state = quantize(w)
            seconds += time.perf_counter() - t0
            nbytes += w.numel() * w.element_size()
            h = hashlib.sha256()
            for t in outputs:
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
            digests[name] = h.hexdigest()
            if dequantize is not None:
                errors.append(error_stats(w, dequantize(state)))
    result = {"seconds": seconds, "bytes": nbytes, "tensors": len(names), "digests": digests}
    result["load"] = (load_start, os.getloadavg()[0])
    if errors:
        result["rel_error"] = sum(e["rel_error"] for e in errors) / len(errors)
        result["max_abs_error"] = max(e["max_abs_error"] for e in errors)
        result["min_snr_db"] = min(e["snr_db"] for e in errors)
    Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------
# driver


def _anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(base: Path, key: str, work: Path) -> dict:
    label = next(c[4] for c in CONTENDERS if c[0] == key)
    print(f"==> {label}", flush=True)
    out = work / f"{key}.json"
    cmd = [sys.executable, __file__, "--worker", key, "--base", str(base), "--result", str(out)]
    wall, peak, _ = _sampled(cmd, os.environ.copy())
    res = json.loads(out.read_text())
    res.update(label=label, peak_anon=peak, wall_s=wall)
    print(f"    {res['bytes'] / res['seconds'] / 1e9:.3f} GB/s, peak anon {peak / 1e9:.2f} GB", flush=True)
    return res


def _sampled(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak RssAnon and stdout of one command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon(proc.pid))
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-3000:]}")
    return time.perf_counter() - t0, peak[0], out


BNB_E2E = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, dtype=torch.bfloat16,
                                         device_map="cpu")
m.save_pretrained(sys.argv[2])
"""


def end_to_end(base: Path, work: Path) -> dict:
    """The whole job, as users run it: ``adaptr quantize`` (streamed, with its error report, hashed and
    registered) against transformers + bitsandbytes quantizing on load and ``save_pretrained``."""
    import shutil

    from safetensors import safe_open

    home = work / "e2e-home"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "ADAPTR_HOME": str(home)}
    adaptr = str(Path(sys.executable).with_name("adaptr"))
    subprocess.run(
        [adaptr, "base", "add", str(base), "--name", "bench"], env=env, check=True, capture_output=True
    )
    print("==> e2e: adaptr quantize --method nf4 --double-quant", flush=True)
    cmd = [adaptr, "quantize", "bench", "--method", "nf4", "--double-quant", "--name", "q", "--json"]
    wall, peak, out = _sampled(cmd, env)
    ours = {"wall_s": wall, "peak_anon": peak, "path": json.loads(out)["path"]}
    theirs_dir = work / "e2e-bnb"
    shutil.rmtree(theirs_dir, ignore_errors=True)
    print(
        "==> e2e: transformers from_pretrained(BitsAndBytesConfig nf4, double quant) + save_pretrained",
        flush=True,
    )
    wall, peak, _ = _sampled([sys.executable, "-c", BNB_E2E, str(base), str(theirs_dir)], os.environ.copy())
    theirs = {"wall_s": wall, "peak_anon": peak, "path": str(theirs_dir)}

    def packed(folder: str) -> dict[str, str]:
        digests = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (a handle, not a dict)
                    if k.endswith((".weight", ".weight.absmax")) and "norm" not in k:
                        t = h.get_tensor(k)
                        digests[k] = hashlib.sha256(
                            t.contiguous().view(-1).view(torch_uint8()).numpy()
                        ).hexdigest()
        return digests

    a, b = packed(ours["path"]), packed(theirs["path"])
    same = sorted(k for k in a if k in b and a[k] == b[k])
    return {"adaptr": ours, "bnb": theirs, "compared": len(set(a) & set(b)), "same": len(same)}


def torch_uint8():
    import torch

    return torch.uint8


def build(work: Path, shape: str) -> Path:
    from adaptr.testing import make_llama_base

    base = work / "base"
    if not (base / "config.json").exists():
        print("==> building the base model", flush=True)
        make_llama_base(base, dtype="bfloat16", seed=0, max_shard_size=5_000_000_000, **SHAPES[shape])
    return base


def table(results: dict, info: dict, shape: str) -> str:
    first = next(iter(results.values()))
    lines = [
        "## Quantizers",
        "",
        "Generated by `python benchmarks/bench_quantize.py`; one run, each contender in its own process, on the",
        f"machine below. Input: the {first['tensors']} projection weights of a random TinyLlama-shaped bf16 Llama "
        f"({shape}; {first['bytes'] / 1e9:.2f} GB of bf16; the embeddings and the head, which `adaptr quantize` "
        "skips, excluded). Throughput counts only the quantize calls, one weight at a time from a warm memory "
        "map; peak anon is the process's own memory (`RssAnon`, torch loaded). Errors over all weights: mean "
        "relative error ‖W−Ŵ‖/‖W‖, largest |W−Ŵ|, lowest SNR. *Same bytes*: every weight's output has the "
        "same sha256 as the reference implementation's. *Load*: the machine's 1-minute load average when the "
        "contender started and ended (2 cores; other jobs shared them).",
        "",
        "| method | implementation | threads | GB/s (bf16 in) | seconds | peak anon (GB) | rel. error "
        "| max abs error | min SNR (dB) | same bytes | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, method, _impl, threads, label in CONTENDERS:
        if key not in results:
            continue
        r = results[key]
        ref = results.get(REFERENCE[method])
        if ref is None:
            same = "n/a"
        else:
            same = "reference" if ref is r else ("yes" if ref["digests"] == r["digests"] else "**no**")
        err = (
            f"{r['rel_error']:.4f} | {r['max_abs_error']:.4g} | {r['min_snr_db']:.2f}"
            if "rel_error" in r
            else "(same) | (same) | (same)"
        )
        lines.append(
            f"| {method} | {label} | {threads} | {r['bytes'] / r['seconds'] / 1e9:.3f} | {r['seconds']:.1f} | "
            f"{r['peak_anon'] / 1e9:.2f} | {err} | {same} | {r['load'][0]:.1f}–{r['load'][1]:.1f} |"
        )
    lines.append("")
    for ours, ref in PAIRS:
        if ours in results and ref in results:
            a, b = results[ours], results[ref]
            lines.append(
                f"- {a['label']} vs {b['label']}: **{b['seconds'] / a['seconds']:.1f}×** the throughput, "
                f"{a['peak_anon'] / b['peak_anon']:.2f}× the peak memory."
            )
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(ROOT / ".bench"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", nargs="*", help="contender keys to run (default: all)")
    ap.add_argument("--e2e", action="store_true", help="also time the whole job against transformers + bnb")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.base, args.worker, args.result)
        return
    shape = "small" if args.small else "1b"
    work = Path(args.workdir) / shape
    work.mkdir(parents=True, exist_ok=True)
    base = build(work, shape)
    for f in sorted(base.glob("*.safetensors")):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    results = {}
    for key, *_ in CONTENDERS:
        if not args.only or key in args.only:
            results[key] = run(base, key, work)
    from importlib.metadata import version

    info = {**machine(), "bitsandbytes": version("bitsandbytes")}
    text = table(results, info, shape)
    if args.e2e:
        e = end_to_end(base, work)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        a, b = e["adaptr"], e["bnb"]
        text += "\n".join(
            [
                "",
                "End to end, the whole model as users run it (`--e2e`): `adaptr quantize --method nf4 --double-quant` "
                "(streamed through the merge engine, with the per-tensor error report, hashed and registered) against "
                "transformers `from_pretrained(..., BitsAndBytesConfig(nf4, double quant))` + `save_pretrained`.",
                "",
                "| job | wall (s) | GB/s (model in) | peak anon (GB) |",
                "|---|---|---|---|",
                f"| adaptr quantize | {a['wall_s']:.1f} | {size / a['wall_s'] / 1e9:.3f} | {a['peak_anon'] / 1e9:.2f} |",
                f"| transformers + bitsandbytes | {b['wall_s']:.1f} | {size / b['wall_s'] / 1e9:.3f} | "
                f"{b['peak_anon'] / 1e9:.2f} |",
                "",
                f"- adaptr is **{b['wall_s'] / a['wall_s']:.1f}×** faster end to end in "
                f"{a['peak_anon'] / max(1, b['peak_anon']):.2f}× the memory; {e['same']} of {e['compared']} packed "
                "weights and absmax tensors are byte-identical between the two checkpoints.",
                "",
            ]
        )
    print(text)
    (work / "quantize-results.json").write_text(
        json.dumps({k: {x: y for x, y in v.items() if x != "digests"} for k, v in results.items()}, indent=2)
    )
    write_section(Path(args.out), "quantize", text)


if __name__ == "__main__":
    main()
