"""benchmarks/gpu_kernels.py: its dry run (tiny shapes, CPU, TRITON_INTERPRET=1) goes through every code path
and writes a complete table, and it imports nothing beyond torch, triton, safetensors, the kernel modules and
``adaptr.ops`` (the GPU machine has no service-layer packages)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_kernels.py"

# Runs the script's main() in a fresh interpreter, then reports which forbidden modules got imported.
RUNNER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gpu_kernels", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["gpu_kernels"] = mod
spec.loader.exec_module(mod)
rc = mod.main(["--dry-run", "--out", sys.argv[2], "--json", sys.argv[3]])
bad = sorted(m for m in sys.modules for f in mod.FORBIDDEN_MODULES if m == f or m.startswith(f + "."))
print("@@FORBIDDEN " + json.dumps(bad))
sys.exit(rc)
"""

KERNELS = ("linear", "DARE-linear", "TIES", "DARE-TIES", "NF4 quantize", "NF4 dequantize")
NUMBER = re.compile(r"^[0-9.]+(e[-+][0-9]+)?")


def _load_module():
    """The script as a module (registered: its dataclasses look their module up). Only its helpers
    are called here: nothing imports triton or the kernels in this process."""
    name = "gpu_kernels_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        saved = list(sys.path)
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.path[:] = saved  # the script puts benchmarks/ and the repository first: not for this process
    return sys.modules[name]


def _cells(table: str, first: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{table}")


def _numeric(cell: str) -> bool:
    return bool(NUMBER.match(cell)) and float(NUMBER.match(cell).group(0)) > 0


@pytest.mark.slow
def test_dry_run_writes_every_row_and_imports_only_torch_triton_and_ops(tmp_path: Path) -> None:
    out, raw = tmp_path / "benchmarks.md", tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(SCRIPT), str(out), str(raw)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    forbidden = json.loads(proc.stdout.rsplit("@@FORBIDDEN ", 1)[1])
    assert forbidden == [], f"the benchmark imported {forbidden}"

    text = out.read_text()
    assert "<!-- gpu:start -->" in text and "<!-- gpu:end -->" in text
    assert f"torch {torch.__version__}" in text and "triton " in text and "UTC" in text
    for kernel in KERNELS:
        kernel_cells = _cells(text, kernel)
        # kernel | base | adapters | time | GB/s | % roofline | eager | speed-up | check | target
        time_, gbs, roof, eager, speedup, check = (kernel_cells[i] for i in (3, 4, 5, 6, 7, 8))
        assert time_.endswith(" ms") and _numeric(time_), kernel_cells
        assert _numeric(gbs) and roof.endswith("%") and _numeric(roof), kernel_cells
        assert _numeric(eager) and speedup.endswith("×") and _numeric(speedup), kernel_cells
        assert check in ("max abs Δ 0.0e+00", "bytes = twin", "values = twin"), kernel_cells
    assert "≥85% roofline" in _cells(text, "linear")[9]
    assert "≥3× eager" in _cells(text, "TIES")[9]
    assert "≥70% copy BW" in _cells(text, "NF4 dequantize")[9]
    for path in ("accelerator path (interpreter, CPU)", f"CPU path (torch twin, {os.cpu_count()} threads)"):
        cells = _cells(text, path)  # path | parameters | tensors | seconds | GB/s | note
        assert cells[2] == "21" and _numeric(cells[3]) and _numeric(cells[4]) and cells[5] == "measured", (
            cells
        )
    assert "first merged tensor, GPU vs CPU: max abs Δ 0.0e+00" in text

    numbers = json.loads(raw.read_text())
    assert {r["kernel"] for r in numbers["rows"]} == set(KERNELS)
    assert all(r["roofline_s"] > 0 and r["time"] > 0 and not r["error"] for r in numbers["rows"])


def test_dry_run_leaves_docs_alone_unless_told() -> None:
    mod = _load_module()
    assert mod.output_path(mod.parse_args(["--dry-run"])) is None
    assert mod.output_path(mod.parse_args(["--dry-run", "--out", "x.md"])) == Path("x.md")
    assert mod.output_path(mod.parse_args(["--quick"])) == REPO / "docs" / "benchmarks.md"


def test_minimal_safetensors_matches_the_package(tmp_path: Path) -> None:
    """The stand-in writer and reader (for a GPU machine without safetensors) speak the same format."""
    from safetensors import safe_open

    mod = _load_module()
    g = torch.Generator().manual_seed(3)
    tensors = {"b.weight": torch.randn(5, 7, generator=g).bfloat16(), "a": torch.randn(3, generator=g)}
    path = tmp_path / "t.safetensors"
    mod.write_safetensors(tensors, path)
    with safe_open(str(path), framework="pt") as fh:
        assert sorted(fh.keys()) == ["a", "b.weight"]
        for name, t in tensors.items():
            assert torch.equal(fh.get_tensor(name), t)
    mapped = mod.MappedFile(path, force_minimal=True)
    assert sorted(mapped.keys()) == ["a", "b.weight"]
    for name, t in tensors.items():
        got = mapped.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    del got
    mapped.close()


def test_roofline_formulas() -> None:
    mod = _load_module()
    d, k, n, r = 4096, 14336, 8, 16
    assert mod.merge_bytes(d, k, n, r) == 4 * d * k + 2 * n * (d + k) * r
    assert mod.merge_flops(d, k, n, r) == 2 * d * k * r * n
    quant, deq = mod.nf4_bytes(d * k)
    packed = d * k // 2 + d * k // 64 + 4 * -(-(d * k // 64) // 256)
    assert quant == deq == 2 * d * k + packed
    ceilings = mod.DeviceCeilings(copy_bw=4e12, h2d_bw=None, matmul_flops=800e12)
    row = mod.Row("linear", "", "", bytes=8e9, flops=1e12)
    assert row.roofline(ceilings) == pytest.approx(2e-3)  # memory-bound: 8 GB at 4 TB/s
    row.time = 2e-3 / 0.9
    assert row.verdict(ceilings).endswith("✓")
    row.time = 2e-3 / 0.8
    assert row.verdict(ceilings).endswith("✗")
    ties = mod.Row("TIES", "", "", bytes=1e9, flops=1e15, time=2.0, eager=5.0)  # compute-bound: 1.25 s
    assert ties.roofline(ceilings) == pytest.approx(1.25)
    assert ties.verdict(ceilings).endswith("✗")  # 62% of roofline but only 2.5× eager
