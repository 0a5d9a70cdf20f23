"""Streaming merge and quantize: peak anonymous memory is bounded by the largest tensor, not by the model.

A ≥ 256 MiB fp32 fixture whose largest tensor is 16 MiB is merged (TIES over three rank-16 all-linear
adapters, and ``simple``) in a child process. The child is a small wrapper: it imports torch and adaptr,
records its own ``RssAnon`` as the baseline, then runs the CLI while a thread samples ``RssAnon`` every
10 ms; the parent also polls ``/proc/<pid>/status`` every ~20 ms. Pages of the memory-mapped inputs and of
the written output are file-backed and do not count. The test fails if the model is ever held whole
(that alone would be 284 MiB of growth against a 128 MiB bound).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptr.testing import make_llama_base, make_lora_adapter

MiB = 1 << 20
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

WRAPPER = r"""
import json, os, sys, threading, time

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")

import torch
import adaptr.cli
import adaptr.engine
import adaptr.io.safetensors_io
import adaptr.ops.ties_merge
import adaptr.services.merge
from adaptr.plugins import get_host

adaptr.cli.build_app()
get_host()
if os.environ.get("MEMTEST_DISK_BYTES_PER_S"):  # simulate a slow disk under the shard writer
    rate = float(os.environ["MEMTEST_DISK_BYTES_PER_S"])
    Writer = adaptr.io.safetensors_io.StreamingShardWriter
    real_write = Writer._write_chunk

    def slow_write(self, f, chunk):
        time.sleep(len(chunk) / rate)
        real_write(self, f, chunk)

    Writer._write_chunk = slow_write
x = torch.randn(256, 256)  # start torch's thread pool and allocator
(x @ x).abs().sum()
del x
baseline = rss_anon()
peak = [baseline]
stop = threading.Event()

def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.01)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
code = 0
try:
    adaptr.cli.main(sys.argv[2:])
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
stop.set()
thread.join()
peak[0] = max(peak[0], rss_anon())
with open(sys.argv[1], "w") as f:
    json.dump({"baseline": baseline, "peak": peak[0], "code": code}, f)
sys.exit(code)
"""


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def _tensor_bytes(folder: Path) -> list[int]:
    files = sorted(folder.glob("*.safetensors"))
    sizes = []
    for f in files:
        for info in _header(f).values():
            sizes.append(math.prod(info["shape"]) * {"F32": 4, "BF16": 2, "F16": 2}[info["dtype"]])
    return sizes


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("memory")
    # 7 layers of 36 MiB (q/o 4, k/v 2, gate/up/down 8) + embed and head of 16 MiB each = 284 MiB.
    base = make_llama_base(
        root / "base",
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=7,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        seed=50,
    )
    adapters = {
        f"ad{i}": make_lora_adapter(
            root / f"ad{i}",
            base,
            r=16,
            lora_alpha=32,
            target_modules=ALL_LINEAR,
            seed=51 + i,
            init_scale=0.01,
        )
        for i in range(3)
    }
    yield {"base": base, "adapters": adapters}
    shutil.rmtree(root, ignore_errors=True)


def _status_rss_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _measured_merge(tmp_path: Path, home: Path, args: list[str], tag: str, **env_extra: str) -> dict:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    report = tmp_path / f"{tag}.json"
    # As the CLI runs (``adaptr.cli.main`` sets it before torch loads): huge pages for big tensors.
    env = {**os.environ, "ADAPTR_HOME": str(home), "THP_MEM_ALLOC_ENABLE": "1", **env_extra}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), str(report), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    polled = 0
    while proc.poll() is None:
        v = _status_rss_anon(proc.pid)
        if v is not None:
            polled = max(polled, v)
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, (out, err)
    result = json.loads(report.read_text())
    result.update(polled=polled, seconds=time.perf_counter() - start, output=json.loads(out))
    return result


def _register(cli, big: dict) -> list[str]:
    code, _out, err = cli("base", "add", big["base"], "--name", "big")
    assert code == 0, err
    for name, path in big["adapters"].items():
        code, _out, err = cli("adapter", "add", path, "--base", "big", "--name", name)
        assert code == 0, err
    return [x for name in big["adapters"] for x in ("--adapter", name)]


def _check(big: dict, tmp_path: Path, home: Path, runs: dict[str, list[str]], **env: str) -> None:
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc (Linux) to read RssAnon")
    sizes = _tensor_bytes(big["base"])
    total, largest = sum(sizes), max(sizes)
    assert total >= 256 * MiB and largest <= 16 * MiB, (total, largest)
    bound = 8 * largest
    lines = [
        f"fixture {total / MiB:.0f} MiB, largest tensor {largest / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB"
    ]
    if env:
        lines[0] += f" ({', '.join(f'{k}={v}' for k, v in env.items())})"
    results = {}
    for tag, args in runs.items():
        r = _measured_merge(tmp_path, home, [*args, "--json"], tag.split()[0], **env)
        results[tag] = r
        growth = max(r["peak"], r["polled"]) - r["baseline"]
        lines.append(
            f"{tag}: baseline RssAnon {r['baseline'] / MiB:.0f} MiB, peak {r['peak'] / MiB:.0f} MiB "
            f"(parent poll {r['polled'] / MiB:.0f} MiB), growth {growth / MiB:.0f} MiB "
            f"= {growth / largest:.1f}x largest tensor, {r['seconds']:.1f} s"
        )
        if r["output"]["kind"] == "merged":
            assert r["output"]["size_bytes"] >= total
        shutil.rmtree(r["output"]["path"], ignore_errors=True)  # 284 MiB each; the numbers are all we need
    print("\n" + "\n".join(lines))
    for tag, r in results.items():
        growth = max(r["peak"], r["polled"]) - r["baseline"]
        assert growth < bound, "\n".join(
            [f"{tag}: RssAnon grew {growth / MiB:.0f} MiB > {bound / MiB:.0f} MiB"] + lines
        )


@pytest.mark.slow
def test_peak_anonymous_memory_is_bounded_by_the_largest_tensor(cli, big, tmp_path, adaptr_home):
    adapters = _register(cli, big)
    runs = {
        "ties x3": ["merge", *adapters, "--strategy", "ties", "--density", "0.2", "--name", "big-ties"],
        "simple": ["merge", "--adapter", "ad0", "--name", "big-simple"],
    }
    _check(big, tmp_path, adaptr_home, runs)


@pytest.mark.slow
def test_quantize_and_qlora_merges_are_bounded_too(cli, big, tmp_path, adaptr_home):
    _register(cli, big)
    runs = {
        "nf4 double-quant": ["quantize", "big", "--method", "nf4", "--double-quant", "--name", "big-nf4"],
        "qlora+requantize": [
            "merge", "--adapter", "ad0", "--qlora", "nf4", "--requantize", "nf4", "--name", "big-qlora",
        ],
    }  # fmt: skip
    _check(big, tmp_path, adaptr_home, runs)


@pytest.mark.slow
def test_peak_anonymous_memory_is_bounded_on_a_slow_disk(cli, big, tmp_path, adaptr_home):
    _register(cli, big)
    runs = {"simple": ["merge", "--adapter", "ad0", "--name", "big-simple"]}
    _check(big, tmp_path, adaptr_home, runs, MEMTEST_DISK_BYTES_PER_S="60e6")
