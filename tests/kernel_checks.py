"""Shared by tests/kernels: kernels run compiled on a CUDA GPU, or on the CPU under Triton's interpreter (as CI runs them)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported (jit reads it)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with garbage before a kernel writes it, so unwritten elements show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(0xAB if t.dtype == torch.uint8 else -12345)
