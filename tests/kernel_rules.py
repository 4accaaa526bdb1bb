"""Shared rules of the kernel tests: where they run and how close a kernel must be to its reference."""

from __future__ import annotations

import os

import torch

GPU_TIER = os.environ.get("SPEECHGPT_RT_GPU_TIER") == "1"
DEVICE = "cuda" if GPU_TIER and torch.cuda.is_available() else "cpu"
# Absolute slack added to the 2x rule, per dtype (fp32 kernels and references may differ by summation order only).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-6, torch.bfloat16: 1e-6}


def assert_dtype_rule(kernel: torch.Tensor, torch_lowp: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Kernel error vs an fp32 (or fp64) reference <= 2x the error of plain torch in the same low precision."""
    k_err = (kernel.float() - ref.float()).abs().max().item()
    t_err = (torch_lowp.float() - ref.float()).abs().max().item()
    floor = FLOOR[kernel.dtype]
    assert k_err <= 2 * t_err + floor, f"{what}: kernel err {k_err:.3e} > 2 x torch err {t_err:.3e} + {floor:.0e}"
