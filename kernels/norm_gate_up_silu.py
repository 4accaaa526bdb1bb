"""The MLP input of one decode step in one kernel: RMSNorm -> fused gate/up GEMV -> SiLU(gate) * up.

Unfused: add+RMSNorm, the [2I, K] gate_up GEMV, then SiLU*mul (three launches, the 2I-wide gate_up vector written
and read back). Here each program owns P outputs and reads the P gate rows j and the P up rows I + j (interleaved,
so the dot products reshape to [P, 2] = (gate, up)), applies the norm's 1/rms to the finished dot products (see
`kernels.gemv.dot_rows`) and writes silu(gate) * up. The weight layout is the engine's fused [gate rows; up rows].

Rounding: gate and up are rounded to the activation dtype (the projections' output dtype in HF) and SiLU * up is
computed in fp32 and rounded once (as `kernels.silu_mul`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.gemv import GemvConfig, default_config, dot_rows
from kernels.rmsnorm import rmsnorm_reference
from kernels.silu_mul import silu_mul_reference

__all__ = ["gate_up_configs", "norm_gate_up_silu", "norm_gate_up_silu_reference", "norm_gate_up_silu_triton"]


def norm_gate_up_silu_reference(
    hidden: torch.Tensor, norm_weight: torch.Tensor, w_gate_up: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF order: rmsnorm(hidden) -> gate_proj, up_proj -> silu(gate) * up. hidden [1, K] -> [1, I]."""
    y = silu_mul_reference(F.linear(rmsnorm_reference(hidden.reshape(1, -1), norm_weight, eps), w_gate_up))
    if out is not None:
        out.copy_(y.view(out.shape))
        return out
    return y


@triton.jit
def _norm_gate_up_silu_kernel(
    x_ptr,
    g_ptr,
    w_ptr,
    stride_wn,
    out_ptr,
    INTER,
    K,
    eps,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    i = tl.arange(0, 2 * P)
    j = tl.program_id(0) * P + i // 2
    # Clamp the tail's rows (masked at the store) rather than masking loads.
    rows = tl.minimum(j, INTER - 1) + (i % 2) * INTER
    # USE_GDC: dot_rows waits for the previous kernel (programmatic dependent launch) before reading x.
    y, sq = dot_rows(w_ptr, rows, stride_wn, x_ptr, g_ptr, K, 2 * P, BLOCK_K, EVEN_K, True, USE_GDC)
    act_ty = out_ptr.dtype.element_ty
    y = (y * tl.rsqrt(sq / K + eps)).to(act_ty).to(tl.float32)
    gate, up = tl.split(tl.reshape(y, [P, 2]))
    # silu(g) = g * sigmoid(g); exp(-g) overflows to inf for very negative g, giving g / inf = -0 (correct limit).
    act = gate / (1.0 + tl.exp(-gate)) * up
    out = tl.program_id(0) * P + tl.arange(0, P)
    tl.store(out_ptr + out, act.to(act_ty), mask=out < INTER)


def gate_up_configs(configs: tuple[GemvConfig, ...]) -> tuple[GemvConfig, ...]:
    """The GEMV configs this kernel can run: an even number of rows (gate/up pairs)."""
    return tuple(c for c in configs if c.block_n >= 2 and c.block_n % 2 == 0)


def norm_gate_up_silu_triton(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Same contract as the reference, one launch. config.block_n = weight rows per program (2 per output).
    pdl: launch with programmatic dependent launch (see kernels.norm_qkv_rope)."""
    if hidden.numel() != hidden.shape[-1] or not hidden.is_contiguous():
        raise ValueError(f"norm_gate_up_silu: hidden must be one contiguous row, got {tuple(hidden.shape)}")
    k = hidden.shape[-1]
    if w_gate_up.dim() != 2 or w_gate_up.shape[1] != k or w_gate_up.shape[0] % 2 or w_gate_up.stride(1) != 1:
        raise ValueError(
            f"norm_gate_up_silu: w_gate_up must be [2I, {k}] with a contiguous last dim, got {tuple(w_gate_up.shape)}"
        )
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_gate_up_silu: norm weight must be [{k}], got {tuple(norm_weight.shape)}")
    inter = w_gate_up.shape[0] // 2
    if out is None:
        out = torch.empty((1, inter), dtype=hidden.dtype, device=hidden.device)
    if out.numel() != inter or not out.is_contiguous():
        raise ValueError(f"norm_gate_up_silu: out must be a contiguous [1, {inter}] tensor, got {tuple(out.shape)}")
    cfg = config or default_config(w_gate_up.shape[0], k)
    if not gate_up_configs((cfg,)):
        raise ValueError(f"norm_gate_up_silu: block_n must be even (gate/up row pairs), got {cfg.block_n}")
    p = cfg.block_n // 2
    _norm_gate_up_silu_kernel[(triton.cdiv(inter, p),)](
        hidden, norm_weight, w_gate_up, w_gate_up.stride(0), out, inter, k, eps,
        P=p, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, USE_GDC=pdl, num_warps=cfg.num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


def norm_gate_up_silu(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Dispatcher: the fused Triton kernel on CUDA, the op-by-op torch reference elsewhere."""
    if hidden.is_cuda:
        return norm_gate_up_silu_triton(hidden, norm_weight, w_gate_up, eps, out, config, pdl)
    return norm_gate_up_silu_reference(hidden, norm_weight, w_gate_up, eps, out)
