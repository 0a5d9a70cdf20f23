"""Building blocks shared by the LoRA merge kernels: packed factors, ΔW tiles, Philox keep masks, casts.

A kernel never stores a ΔW. It packs each adapter's two factors (tiny: ``(d + k)·r`` elements) into
two zero-padded buffers and recomputes any ``BLOCK_M × BLOCK_N`` tile of
``ΔW_i = scaling_i · B_i @ A_i`` (``ΔW_iᵀ`` for ``transpose``) from them with ``tl.dot`` and float32
accumulation. The host half (``pack_factors``) validates the factors, picks block sizes by shape and
lays out ``left`` (``n × M × RP``) and ``right`` (``n × RP × N``) so that the stored tile is
``left_i @ right_i``; the device half (``delta_tile``) loops over the rank in ``BLOCK_R`` chunks
(``tl.dot`` needs every dimension ``>= 16``: ranks below that are padded by masked loads).

Float32 factors are packed as the torch twin computes them (``B·scaling`` in float32, then the
product), and dotted with ``input_precision="ieee"``; fp16/bf16 factors of one dtype stay in their
dtype (half the bytes; tensor cores) and the scale is applied to the float32 accumulator instead.
Under Triton's CPU interpreter bf16 factors are packed as float32 (its bf16 ``tl.dot`` is broken).

Imports torch, triton and ``adaptr.ops`` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from adaptr.errors import InvalidInputError
from adaptr.ops.checks import check_density, f32

# Largest tile edge: 64 on a GPU; 32 under the interpreter, where a program is a numpy call and
# small test tensors should still span several tiles.
_GPU_BLOCK = 64
_INTERPRET_BLOCK = 32
_MAX_BLOCK_R = 64
# No fused multiply-adds: every float32 step rounds as the torch twin's separate multiply and add
# do (``acc + x·c`` fused would round once), so exact-data results match the CPU bit for bit on a
# GPU too, and the threshold passes and the merge pass see identical tiles.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


def interpreting(device: torch.device) -> bool:
    """Whether kernels on ``device`` run under Triton's CPU interpreter."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_block(size: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(max(1, size))))


@dataclass
class PackedFactors:
    """Every adapter's factors laid out so that the stored ΔW_i tile is ``left[i] @ right[i] · post[i]``."""

    left: torch.Tensor  # n × M × RP, zero-padded past each adapter's rank
    right: torch.Tensor  # n × RP × N
    ranks: torch.Tensor  # int32, one per adapter
    post: torch.Tensor  # float32: the scaling for 16-bit factors, 1.0 for float32 ones (scale pre-applied)
    M: int  # rows of the stored tensor
    N: int  # columns of the stored tensor
    RP: int  # padded rank: a multiple of BLOCK_R
    native: bool  # dot the 16-bit factors in their dtype (else float32, ieee)
    block_m: int
    block_n: int
    block_r: int

    @property
    def count(self) -> int:
        return self.left.shape[0]

    def grid(self) -> int:
        return triton.cdiv(self.M, self.block_m) * triton.cdiv(self.N, self.block_n)


def check_base(base: torch.Tensor) -> None:
    if base.dim() != 2:
        raise InvalidInputError(f"the Triton merge kernels take a 2-D base weight, got {tuple(base.shape)}")
    if not base.is_floating_point():
        raise InvalidInputError(f"the base weight must be a float tensor, got {base.dtype}")


def pack_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
    shape: tuple[int, int],
    device: torch.device,
    *,
    transpose: bool = False,
) -> PackedFactors:
    """Validate 2-D ``(lora_A, lora_B, scaling)`` factors against the stored ``shape`` and pack them.

    Raises:
        InvalidInputError: for no factors, factors that are not 2-D (convolutions), that do not chain,
            whose product does not have ``shape`` (``transpose`` swaps it), or a non-finite scaling.
    """
    items = list(factors)
    if not items:
        raise InvalidInputError("at least one LoRA factor pair is required")
    M, N = shape
    checked = []
    for entry in items:
        try:
            lora_A, lora_B, scaling = entry
        except (TypeError, ValueError):
            raise InvalidInputError("factors must be (lora_A, lora_B, scaling) tuples") from None
        scale = check_density(scaling, "scaling")
        if lora_A.dim() != 2 or lora_B.dim() != 2:
            raise InvalidInputError(
                "the Triton merge kernels take 2-D LoRA factors only; got "
                f"A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}"
            )
        if lora_B.shape[1] != lora_A.shape[0]:
            raise InvalidInputError(
                f"LoRA factors do not chain: A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}"
            )
        out_shape = (lora_A.shape[1], lora_B.shape[0]) if transpose else (lora_B.shape[0], lora_A.shape[1])
        if out_shape != (M, N):
            raise InvalidInputError(
                f"LoRA product {out_shape} (transpose={transpose}) does not match the base {(M, N)}"
            )
        if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
            raise InvalidInputError("LoRA factors must be float tensors")
        checked.append((lora_A, lora_B, scale))
    dtypes = {t.dtype for a, b, _ in checked for t in (a, b)}
    only = next(iter(dtypes)) if len(dtypes) == 1 else None
    native = only in (torch.float16, torch.bfloat16) and not (only == torch.bfloat16 and interpreting(device))
    cap = _INTERPRET_BLOCK if interpreting(device) else _GPU_BLOCK
    max_rank = max(a.shape[0] for a, _, _ in checked)
    block_r = _pow2_block(max_rank, _MAX_BLOCK_R)
    rp = triton.cdiv(max(1, max_rank), block_r) * block_r
    dtype = only if native else torch.float32
    n = len(checked)
    left = torch.zeros((n, M, rp), dtype=dtype, device=device)
    right = torch.zeros((n, rp, N), dtype=dtype, device=device)
    post = []
    for i, (lora_A, lora_B, scale) in enumerate(checked):
        rank = lora_A.shape[0]
        if native:
            a, b = lora_A.to(device), lora_B.to(device)
            post.append(f32(scale))
        else:  # exactly the torch twin's operands: A in float32, B·scaling in float32
            a = lora_A.to(device=device, dtype=torch.float32)
            b = lora_B.to(device=device, dtype=torch.float32) * scale
            post.append(1.0)
        lhs, rhs = (a.t(), b.t()) if transpose else (b, a)
        left[i, :, :rank] = lhs
        right[i, :rank, :] = rhs
    return PackedFactors(
        left=left,
        right=right,
        ranks=torch.tensor([a.shape[0] for a, _, _ in checked], dtype=torch.int32, device=device),
        post=torch.tensor(post, dtype=torch.float32, device=device),
        M=M,
        N=N,
        RP=rp,
        native=native,
        block_m=_pow2_block(M, cap),
        block_n=_pow2_block(N, cap),
        block_r=block_r,
    )


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices of this program's tile (a 1-D grid over tiles, row-major)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n


@triton.jit
def delta_tile(
    left_ptr,  # packed left factors, n × M × RP (contiguous)
    right_ptr,  # packed right factors, n × RP × N (contiguous)
    rank_ptr,  # int32 rank of each adapter
    post_ptr,  # float32 scale applied to the accumulator (1.0 when pre-applied)
    i,  # the adapter
    offs_m,  # row indices of the tile
    offs_n,  # column indices of the tile
    M,
    N,
    RP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NATIVE: tl.constexpr,  # dot 16-bit factors in their dtype (else float32, ieee)
):
    """The float32 tile ``ΔW_i[offs_m, offs_n]`` (zero outside the tensor)."""
    rank = tl.load(rank_ptr + i)
    ii = tl.cast(i, tl.int64)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    lbase = left_ptr + ii * M * RP
    rbase = right_ptr + ii * RP * N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, RP, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        in_rank = offs_r < rank
        lhs = tl.load(
            lbase + rows[:, None] * RP + offs_r[None, :],
            mask=(offs_m[:, None] < M) & in_rank[None, :],
            other=0.0,
        )
        rhs = tl.load(
            rbase + offs_r.to(tl.int64)[:, None] * N + cols[None, :],
            mask=in_rank[:, None] & (offs_n[None, :] < N),
            other=0.0,
        )
        if NATIVE:
            acc = tl.dot(lhs, rhs, acc)
        else:
            acc = tl.dot(lhs.to(tl.float32), rhs.to(tl.float32), acc, input_precision="ieee")
    if NATIVE:
        acc = acc * tl.load(post_ptr + i)
    return acc


@triton.jit
def keep_tile(seed, offs_m, offs_n, N, density):
    """DARE's keep mask of a tile: element ``j = row·N + col`` is kept iff
    ``tl.rand4x(seed, j >> 2)[j & 3] < density`` (``adaptr.ops.philox`` draws the same on the CPU)."""
    j = offs_m.to(tl.int64)[:, None] * N + offs_n.to(tl.int64)[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, j >> 2)
    q = j & 3
    u = tl.where(q == 0, u0, tl.where(q == 1, u1, tl.where(q == 2, u2, u3)))
    return u < density


@triton.jit
def round_for_bf16(x, OUT_BF16: tl.constexpr):
    """For a bf16 output, round float32 ``x`` to the nearest even bf16 value (kept in float32, so the
    store's conversion is exact): torch's rounding, on the GPU and under the interpreter alike (the
    interpreter's own float32 → bf16 conversion truncates). Other outputs: ``x`` unchanged."""
    if OUT_BF16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x
