"""NF4/FP4 Triton kernels against their torch twins (adaptr.ops.quant4): every byte identical.

Fresh random data each run (the seed is in every assert message); outputs are poisoned before each
kernel writes them, so an element a kernel forgets shows up.
"""

from __future__ import annotations

import os

import kernel_checks  # before the kernel module: selects the interpreter without a GPU

# isort: split

import pytest
import torch

from adaptr.errors import InvalidInputError
from adaptr.ops import quant4 as ref
from adaptr_triton import quant4 as tq

DEVICE = kernel_checks.DEVICE
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# One element; odd and partial; partial last block; several programs with a partial block; several
# programs of whole blocks; more than 256 quant blocks at blocksize 32 (two nested scales).
SHAPES = [(1,), (7,), (3, 45), (33, 130), (64, 64), (77, 125)]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every output buffer the kernels write starts as garbage."""
    monkeypatch.setattr(
        tq,
        "_empty",
        lambda size, dtype, device: kernel_checks.poison(torch.empty(size, dtype=dtype, device=device)),
    )


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def weights(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random, never zero, rows of different scale (so blocks have different absmax)."""
    rows = shape[0] if len(shape) > 1 else 1
    w = torch.randn(shape, generator=g) * (
        0.01 + 3 * torch.rand(rows, *([1] * (len(shape) - 1)), generator=g)
    )
    w = torch.where(w == 0, torch.full_like(w, 1e-3), w).to(dtype)
    return torch.where(w == 0, torch.full_like(w, 1e-3), w)


def assert_same(ours: ref.Quant4, theirs: ref.Quant4, msg: str) -> None:
    assert ours.packed.device.type == torch.device(DEVICE).type, msg
    assert torch.equal(ours.packed.cpu(), theirs.packed), msg
    assert torch.equal(ours.absmax.cpu(), theirs.absmax), msg
    assert (ours.shape, ours.dtype, ours.blocksize, ours.quant_type) == (
        theirs.shape,
        theirs.dtype,
        theirs.blocksize,
        theirs.quant_type,
    ), msg
    assert ours.nested == theirs.nested, msg
    if theirs.nested:
        assert torch.equal(ours.nested_absmax.cpu(), theirs.nested_absmax), msg
        assert ours.nested_offset == theirs.nested_offset, msg


def check(x: torch.Tensor, bs: int, qt: str, dq: bool, msg: str, out_dtypes=(None,)) -> None:
    """Quantize and dequantize ``x`` both ways; every byte of every result identical."""
    theirs = ref.quantize_4bit(x, blocksize=bs, quant_type=qt, double_quant=dq)
    ours = tq.quantize_4bit(x.to(DEVICE), blocksize=bs, quant_type=qt, double_quant=dq)
    assert_same(ours, theirs, msg)
    for dtype in out_dtypes:
        expected = ref.dequantize_4bit(theirs, dtype)
        got = tq.dequantize_4bit(ours, dtype)
        assert got.device.type == torch.device(DEVICE).type, msg
        assert got.dtype == expected.dtype and got.shape == expected.shape, msg
        assert torch.equal(got.cpu(), expected), f"{msg} dequantize to {dtype}"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_and_dequantize_match_reference(dtype, quant_type, double_quant) -> None:
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for i, shape in enumerate(SHAPES):
        for bs in (32, 64, 128):
            x = weights(shape, dtype, g)
            msg = f"seed={seed} shape={shape} blocksize={bs} {dtype} {quant_type} double={double_quant}"
            # Every output dtype once per shape; the tensor's own dtype otherwise.
            check(x, bs, quant_type, double_quant, msg, (None, *DTYPES) if bs == 64 and i % 2 else (None,))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_large_blocksizes(quant_type: str) -> None:
    """One quant block per program (4096), and two per program (1024), partial last block."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for bs, n in ((4096, 2 * 4096 + 5), (1024, 3 * 1024 + 513)):
        x = weights((n,), torch.bfloat16, g)
        check(
            x, bs, quant_type, True, f"seed={seed} n={n} blocksize={bs} {quant_type}", (None, torch.float32)
        )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_blocks(quant_type: str) -> None:
    """absmax 0: all-zero blocks (also of -0.0, also partial, also the whole tensor)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    x = weights((5, 64), torch.float32, g).reshape(-1)[:300].clone()
    x[64:128] = 0.0  # a whole zero block
    x[128:192] = -0.0  # a whole block of negative zeros
    x[256:] = 0.0  # the partial last block (44 elements)
    for dtype in DTYPES:
        for dq in (False, True):
            msg = f"seed={seed} {dtype} {quant_type} double={dq}"
            check(x.to(dtype), 64, quant_type, dq, msg, (None, torch.float32))
            check(torch.zeros(3, 50, dtype=dtype), 64, quant_type, dq, "all zero " + msg)
    # constant tensors: every absmax equal, nested blocks of one value
    check(torch.full((300, 32), 0.75), 32, quant_type, True, "constant")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_edge_values(quant_type: str) -> None:
    """Scaled values on the code book's midpoints and codes, tiny and subnormal blocks, huge blocks."""
    code = ref.code_book(quant_type).sort().values
    mids = (code[:-1] + code[1:]) / 2
    # s = x * (1 / 1) = x: values exactly on the midpoints, just around them, and on the codes
    near = torch.cat([mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0)), code])
    block = torch.cat([near, torch.tensor([1.0]), torch.zeros(64 - near.numel() - 1)])
    edge = [
        block,  # absmax exactly 1
        block * 3.0,
        block * 1e-38,  # whole-block absmax below the 1e-38 clamp, subnormal elements
        block * 1.1e-38,  # absmax above the clamp, still subnormal
        block * 1e38,  # large magnitudes
        torch.tensor([1e-45, -1e-45, 1e-40] * 21 + [0.5]),  # subnormal elements beside a normal absmax
        -block,
    ]
    x = torch.cat(edge)
    for dq in (False, True):
        check(x, 64, quant_type, dq, f"{quant_type} double={dq}")
        check(x[:-7], 64, quant_type, dq, f"partial {quant_type} double={dq}")  # the last block partial
        check(x[-40:] * 1e-38, 64, quant_type, dq, f"tiny partial {quant_type} double={dq}")
    check(x.to(torch.bfloat16), 32, quant_type, False, f"bf16 {quant_type}", (None, torch.float32))
    half = torch.cat([e for e in edge if e.abs().max() < 6e4])[:-3]  # tiny blocks become zero blocks
    check(half.to(torch.float16), 32, quant_type, True, f"fp16 {quant_type}", (None, torch.float32))


def test_dequantizes_what_the_reference_quantized() -> None:
    """A Quant4 from the torch twin (on the CPU) dequantizes on the kernel's device to the same values."""
    seed = fresh_seed()
    x = weights((9, 100), torch.float16, torch.Generator().manual_seed(seed))
    for dq in (False, True):
        q = ref.quantize_4bit(x, blocksize=32, quant_type="nf4", double_quant=dq)
        moved = ref.Quant4(
            q.packed.to(DEVICE),
            q.absmax.to(DEVICE),
            q.shape,
            q.dtype,
            q.blocksize,
            q.quant_type,
            None if q.nested_absmax is None else q.nested_absmax.to(DEVICE),
            q.nested_offset,
        )
        for dtype in (None, *DTYPES):
            expected = ref.dequantize_4bit(q, dtype)
            assert torch.equal(tq.dequantize_4bit(moved, dtype).cpu(), expected), f"seed={seed} {dtype} {dq}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN math
def test_rejects_what_the_reference_rejects() -> None:
    for fn in (ref.quantize_4bit, tq.quantize_4bit):
        with pytest.raises(InvalidInputError, match="blocksize must be one of 32, 64"):
            fn(torch.ones(8, 8, device=DEVICE), blocksize=48)
        with pytest.raises(InvalidInputError, match="float16, bfloat16 or float32"):
            fn(torch.ones(8, 8, dtype=torch.float64, device=DEVICE))
        with pytest.raises(InvalidInputError, match="'nf4' or 'fp4'"):
            fn(torch.ones(8, 8, device=DEVICE), quant_type="int4")
        with pytest.raises(InvalidInputError, match="empty"):
            fn(torch.ones(0, 8, device=DEVICE))
        for bad in (float("nan"), float("inf"), -float("inf")):
            for n in (64, 70):  # a whole block and the partial block
                for dtype in DTYPES:
                    x = torch.ones(n, dtype=dtype, device=DEVICE)
                    x[n - 3] = bad
                    with pytest.raises(InvalidInputError, match="NaN or infinite"):
                        fn(x, quant_type="fp4")
    q = tq.quantize_4bit(torch.ones(70, device=DEVICE))
    with pytest.raises(InvalidInputError, match="float16, bfloat16 or float32"):
        tq.dequantize_4bit(q, torch.float64)
