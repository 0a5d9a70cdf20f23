"""Merge benchmark: adaptr vs PEFT vs mergekit on a ~1.1B bf16 Llama (TinyLlama shape), side by side.

Measures, in one run on one machine, wall time, peak RSS and peak anonymous memory of:
  (a) the I/O floor: read every base tensor and write it back as shards;
  (b) `adaptr merge --strategy simple` (one adapter);
  (c) PEFT: load + merge_and_unload + save_pretrained (same adapter);
  (d) `adaptr merge --strategy ties` over 3 rank-16 adapters;
  (e) mergekit `ties` over the same 3 adapters (base+lora inputs, which merge each LoRA into a full model
      first), and (e') mergekit `ties` given the pre-merged full models;
  (f) `adaptr merge --strategy dare_ties` and (f') mergekit `dare_ties` on the pre-merged models.
and writes docs/benchmarks.md. Not a test: run `make bench` (or this script) on an idle machine.

Usage: python benchmarks/bench_merge.py [--workdir .bench] [--small]   (--small: a 0.1B model, quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(PY).parent

SHAPES = {
    # TinyLlama-1.1B: 1.10B parameters, vocabulary 32k.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run(label: str, cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a command, sampling its (and its children's) RSS and RssAnon every 20 ms."""
    print(f"==> {label}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = {"VmRSS": 0, "RssAnon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = [proc.pid]
            try:
                pids += [
                    int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                ]
            except OSError:
                pass
            total = {"VmRSS": 0, "RssAnon": 0}
            for pid in pids:
                for k, v in _status(pid).items():
                    total[k] += v
            for k in peak:
                peak[k] = max(peak[k], total[k])
            stop.wait(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{err[-3000:]}")
    res = {"label": label, "wall_s": wall, "peak_rss": peak["VmRSS"], "peak_anon": peak["RssAnon"]}
    print(
        f"    {wall:.1f} s, peak RSS {peak['VmRSS'] / 1e9:.2f} GB, peak anon {peak['RssAnon'] / 1e9:.2f} GB",
        flush=True,
    )
    return res


IO_FLOOR = textwrap.dedent("""
    import sys
    from adaptr.io.safetensors_io import StreamingShardWriter, open_weights
    src, dst = sys.argv[1], sys.argv[2]
    ws = open_weights(src)
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in ws.tensors.items()]
    with ws.reader() as r, StreamingShardWriter(dst, specs, max_shard_size="5GB") as w:
        for n, *_ in specs:
            w.write(n, r.get(n))
""")

PEFT_MERGE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base, adapter, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size="5GB")
""")


def mergekit_config(base: Path, models: list[str], density: float, method: str = "ties") -> str:
    # dare_ties keeps mergekit's default rescale (L1-norm matching), which adaptr runs as
    # `--rescale l1`; normalize as adaptr's dare_ties does. Masks differ (both seeded).
    lines = [
        f"merge_method: {method}",
        f"base_model: {base}",
        "dtype: bfloat16",
        "parameters: {normalize: true, lambda: 1.0}",
        "models:",
    ]
    for m in models:
        lines += [f"  - model: {m}", f"    parameters: {{weight: 1.0, density: {density}}}"]
    return "\n".join(lines) + "\n"


def build(work: Path, shape: str) -> tuple[Path, list[Path]]:
    from adaptr.testing import make_llama_base, make_lora_adapter

    base = work / "base"
    if not (base / "config.json").exists():
        print("==> building the base model", flush=True)
        make_llama_base(base, dtype="bfloat16", seed=0, max_shard_size=5_000_000_000, **SHAPES[shape])
    adapters = []
    for i in range(3):
        a = work / f"adapter{i}"
        if not (a / "adapter_config.json").exists():
            make_lora_adapter(a, base, r=16, lora_alpha=32, target_modules=TARGETS, seed=100 + i)
        adapters.append(a)
    return base, adapters


def machine() -> dict:
    import torch

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    versions = {}
    for dist in ("peft", "mergekit", "transformers", "safetensors"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **versions,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(ROOT / ".bench"))
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    shape = "small" if args.small else "1b"
    work = Path(args.workdir) / shape
    work.mkdir(parents=True, exist_ok=True)
    base, adapters = build(work, shape)
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    env = {"ADAPTR_HOME": str(home), "ADAPTR_DATABASE_URL": f"sqlite:///{home / 'catalog.db'}"}
    adaptr = [str(BIN / "adaptr")]
    subprocess.run(
        adaptr + ["base", "add", str(base), "--name", "base"], check=True, env={**os.environ, **env}
    )
    for i, a in enumerate(adapters):
        subprocess.run(
            adaptr + ["adapter", "add", str(a), "--base", "base", "--name", f"a{i}"],
            check=True,
            env={**os.environ, **env},
        )
    # Warm the page cache so every contender reads the base from memory.
    for f in sorted(base.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    outs = work / "out"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    results = {}
    results["floor"] = run(
        "I/O floor (read + write shards)", [PY, "-c", IO_FLOOR, str(base), str(outs / "floor")]
    )
    results["adaptr_simple"] = run(
        "adaptr merge --strategy simple",
        adaptr + ["merge", "-a", "a0", "--strategy", "simple", "--name", "simple"],
        env,
    )
    results["peft"] = run(
        "PEFT merge_and_unload + save_pretrained",
        [PY, "-c", PEFT_MERGE, str(base), str(adapters[0]), str(outs / "peft")],
    )
    results["adaptr_ties"] = run(
        "adaptr merge --strategy ties (3 adapters)",
        adaptr
        + [
            "merge",
            "-a",
            "a0",
            "-a",
            "a1",
            "-a",
            "a2",
            "--strategy",
            "ties",
            "--density",
            str(args.density),
            "--name",
            "ties",
        ],
        env,
    )
    cache = outs / "lora-cache"
    cfg = outs / "mergekit-lora.yml"
    cfg.write_text(mergekit_config(base, [f"{base}+{a}" for a in adapters], args.density))
    results["mergekit_lora"] = run(
        "mergekit ties (base+lora inputs)",
        [
            str(BIN / "mergekit-yaml"),
            str(cfg),
            str(outs / "mk-lora"),
            "--lora-merge-cache",
            str(cache),
            "--lazy-unpickle",
        ],
    )
    premerged = sorted(p for p in cache.iterdir() if p.is_dir())
    cfg2 = outs / "mergekit-full.yml"
    cfg2.write_text(mergekit_config(base, [str(p) for p in premerged], args.density))
    results["mergekit_full"] = run(
        "mergekit ties (pre-merged full models)",
        [str(BIN / "mergekit-yaml"), str(cfg2), str(outs / "mk-full"), "--lazy-unpickle"],
    )
    results["adaptr_dare"] = run(
        "adaptr merge --strategy dare_ties (3 adapters)",
        adaptr
        + ["merge", "-a", "a0", "-a", "a1", "-a", "a2", "--strategy", "dare_ties"]
        + ["--density", str(args.density), "--rescale", "l1", "--name", "dare"],
        env,
    )
    cfg3 = outs / "mergekit-dare.yml"
    cfg3.write_text(mergekit_config(base, [str(p) for p in premerged], args.density, method="dare_ties"))
    results["mergekit_dare"] = run(
        "mergekit dare_ties (pre-merged full models)",
        [str(BIN / "mergekit-yaml"), str(cfg3), str(outs / "mk-dare"), "--lazy-unpickle"],
    )
    info = machine()
    from adaptr.io.safetensors_io import open_weights

    ws = open_weights(base)
    params = {"total_parameters": ws.num_parameters, "total_size": ws.total_bytes}
    write_report(Path(args.out), results, info, params, shape, args.density)
    (work / "results.json").write_text(json.dumps({"results": results, "machine": info}, indent=2))
    shutil.rmtree(outs, ignore_errors=True)


def write_section(path: Path, name: str, text: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import write_section as write

    write(path, name, text)


def write_report(path: Path, r: dict, info: dict, params: dict, shape: str, density: float) -> None:
    def row(key: str) -> str:
        x = r[key]
        return (
            f"| {x['label']} | {x['wall_s']:.1f} | {x['wall_s'] / r['floor']['wall_s']:.2f}× | "
            f"{x['peak_rss'] / 1e9:.2f} | {x['peak_anon'] / 1e9:.2f} |"
        )

    simple_vs_peft = r["peft"]["wall_s"] / r["adaptr_simple"]["wall_s"]
    ties_vs_mk = r["mergekit_lora"]["wall_s"] / r["adaptr_ties"]["wall_s"]
    ties_vs_mk_full = r["mergekit_full"]["wall_s"] / r["adaptr_ties"]["wall_s"]
    size = params["total_size"]
    lines = [
        "## Merging",
        "",
        "Generated by `python benchmarks/bench_merge.py` (`make bench`); numbers from one run on the machine below.",
        "Every contender reads the same base from a warm page cache and writes bf16 safetensors shards (5 GB).",
        "",
        f"Model: random Llama, TinyLlama shape ({shape}), {params['total_parameters'] / 1e9:.2f} B parameters, "
        f"bf16, {size / 1e9:.2f} GB. Adapters: 3 × rank 16 on all linear projections. TIES density {density}.",
        "",
        "| run | wall (s) | × I/O floor | peak RSS (GB) | peak anon (GB) |",
        "|---|---|---|---|---|",
        *(
            row(k)
            for k in (
                "floor",
                "adaptr_simple",
                "peft",
                "adaptr_ties",
                "mergekit_lora",
                "mergekit_full",
                "adaptr_dare",
                "mergekit_dare",
            )
            if k in r
        ),
        "",
        "Ratios (higher is better for adaptr):",
        "",
        f"- simple merge: adaptr is **{simple_vs_peft:.1f}×** faster than PEFT "
        f"(target ≥ 2×), at {r['adaptr_simple']['wall_s'] / r['floor']['wall_s']:.2f}× the I/O floor (target ≤ 2×).",
        f"- TIES over 3 adapters: adaptr is **{ties_vs_mk:.1f}×** faster than mergekit on base+lora inputs "
        f"(target ≥ 5×) and {ties_vs_mk_full:.1f}× faster than mergekit given pre-merged full models; "
        f"{r['adaptr_ties']['wall_s'] / r['floor']['wall_s']:.2f}× the I/O floor (target ≤ 5×).",
        *(
            [
                f"- DARE-TIES over 3 adapters (not a target): adaptr is "
                f"**{r['mergekit_dare']['wall_s'] / r['adaptr_dare']['wall_s']:.1f}×** faster than mergekit given "
                f"pre-merged full models, at {r['adaptr_dare']['wall_s'] / r['floor']['wall_s']:.2f}× the I/O floor."
            ]
            if "adaptr_dare" in r
            else []
        ),
        f"- peak anonymous memory: adaptr simple {r['adaptr_simple']['peak_anon'] / size:.2f}× and ties "
        f"{r['adaptr_ties']['peak_anon'] / size:.2f}× the model size; PEFT {r['peft']['peak_anon'] / size:.2f}×, "
        f"mergekit {r['mergekit_lora']['peak_anon'] / size:.2f}×.",
        "",
        "Peak RSS counts memory-mapped file pages the process touched (page cache, reclaimable); peak anon is",
        "what the process itself allocated (`RssAnon`), the number that decides whether a merge fits in RAM.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
    ]
    notes = Path(__file__).with_name("analysis.md")
    if notes.exists():  # the hand-written analysis of these numbers
        lines += ["", notes.read_text().rstrip(), ""]
    write_section(path, "merge", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
