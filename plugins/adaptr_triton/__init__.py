"""Triton GPU backend: fused merge, TIES, DARE and NF4 kernels that never materialize ΔW.

The kernel modules here import only torch, triton and ``adaptr.ops`` (their torch twins, which
import torch alone), so they run on a bare GPU machine. The plugin's hooks live in
:mod:`adaptr_triton.plugin`; each kernel module has the same name as its torch twin in
``adaptr/ops`` and its test in ``tests/kernels``.
"""
