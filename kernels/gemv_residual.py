"""A GEMV that adds its result into the residual stream: hidden += W x (o_proj and down_proj of a decode step).

Unfused, the product is written, then an add+RMSNorm kernel reads it back with the residual. With the norm moved
into the next GEMV (`kernels.norm_qkv_rope`, `kernels.norm_gate_up_silu`), the add is all that is left, and it
fits in this GEMV's epilogue: each program owns whole output rows, so it reads and writes its rows of `hidden` in
place with no race.

Rounding is HF's exactly: the product is rounded to the activation dtype (the projection's output), then added
to the residual in fp32 and rounded once (a bf16 + bf16 add).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.gemv import GemvConfig, default_config, dot_rows

__all__ = ["gemv_residual", "gemv_residual_reference", "gemv_residual_triton"]


def gemv_residual_reference(x: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [1, N] += F.linear(x [1, K], weight [N, K]) in the tensor dtype (HF's `residual + o_proj(...)`)."""
    return hidden.add_(F.linear(x.reshape(1, -1), weight).view(hidden.shape))


@triton.jit
def _gemv_residual_kernel(
    w_ptr,
    x_ptr,
    h_ptr,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # USE_GDC: dot_rows waits for the previous kernel (programmatic dependent launch) before reading x; h is read
    # and written after that wait.
    y, _ = dot_rows(w_ptr, tl.minimum(rows, N - 1), stride_wn, x_ptr, x_ptr, K, BLOCK_N, BLOCK_K, EVEN_K, False, USE_GDC)
    act_ty = h_ptr.dtype.element_ty
    mask = rows < N
    res = tl.load(h_ptr + rows, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + rows, (y.to(act_ty).to(tl.float32) + res).to(act_ty), mask=mask)


def gemv_residual_triton(
    x: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor, config: GemvConfig | None = None, pdl: bool = False
) -> torch.Tensor:
    """Same contract as the reference, one launch; returns hidden. pdl: programmatic dependent launch."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"gemv_residual: weight must be [N, K] with a contiguous last dim, got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.numel() != k or x.shape[-1] != k or not x.is_contiguous():
        raise ValueError(f"gemv_residual: x must be one contiguous row of {k}, got {tuple(x.shape)}")
    if hidden.numel() != n or hidden.shape[-1] != n or not hidden.is_contiguous():
        raise ValueError(f"gemv_residual: hidden must be one contiguous row of {n}, got {tuple(hidden.shape)}")
    cfg = config or default_config(n, k)
    _gemv_residual_kernel[(triton.cdiv(n, cfg.block_n),)](
        weight, x, hidden, n, k, weight.stride(0),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, USE_GDC=pdl,
        num_warps=cfg.num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return hidden


def gemv_residual(
    x: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor, config: GemvConfig | None = None, pdl: bool = False
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        return gemv_residual_triton(x, weight, hidden, config, pdl)
    return gemv_residual_reference(x, weight, hidden)
