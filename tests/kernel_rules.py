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


def summation_order_bound(weight: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per row r, how far two fp32-accumulated computations of W[r] . x (K terms) may differ when they differ only in
    summation order (a BLAS call over a row slice vs the whole matrix, split differently across threads or
    split-K): each is within gamma_K * sum_k |W[r, k] x_k| of the exact dot product (Higham: gamma_K = K u / (1 - K u),
    u = 2^-24), so the two are within twice that; results stored in out_dtype add one rounding each (relative u of
    that dtype). fp64 [N]. Two different GEMV calls are never compared for exact equality: nothing guarantees it."""
    k = weight.shape[-1]
    u = torch.finfo(torch.float32).eps / 2
    gamma = k * u / (1 - k * u)
    magnitude = weight.double().abs() @ x.double().abs().reshape(-1)
    bound = 2 * gamma * magnitude
    if out_dtype != torch.float32:
        bound += 2 * (torch.finfo(out_dtype).eps / 2) * (1 + gamma) * magnitude
    return bound
