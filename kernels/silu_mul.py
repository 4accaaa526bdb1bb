"""SiLU(gate) * up for the LLaMA MLP, torch reference and Triton kernel.

The engine fuses gate_proj and up_proj into one [2I, D] weight (gate rows first), so the GEMV output is
gate_up [T, 2I] with gate = gate_up[:, :I] and up = gate_up[:, I:]. HF computes `F.silu(gate) * up` in the
activation dtype (two roundings); the kernel computes in fp32 and rounds once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["silu_mul", "silu_mul_reference", "silu_mul_triton"]


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] -> silu(gate) * up [T, I], in the tensor dtype like HF LlamaMLP."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim must be even (gate and up halves), got {gate_up.shape[-1]}")
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


@triton.jit
def _silu_mul_kernel(
    gu_ptr,
    out_ptr,
    stride_gu,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(gu_ptr + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # silu(g) = g * sigmoid(g); exp(-g) overflows to inf for very negative g, giving g / inf = -0 (correct limit).
    act = gate / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """gate_up [T, 2I] (or [2I]) -> [T, I] (or [I]) in the same dtype."""
    if gate_up.dim() not in (1, 2):
        raise ValueError(f"silu_mul: gate_up must be [T, 2I] or [2I], got {tuple(gate_up.shape)}")
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim must be even (gate and up halves), got {gate_up.shape[-1]}")
    if gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate_up must be contiguous in its last dim, got strides {gate_up.stride()}")
    inter = gate_up.shape[-1] // 2
    out_shape = (*gate_up.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=gate_up.dtype, device=gate_up.device)
    if tuple(out.shape) != out_shape or out.stride(-1) != 1:
        raise ValueError(f"silu_mul: out must be {out_shape} with a contiguous last dim, got {tuple(out.shape)}")
    gu2 = gate_up if gate_up.dim() == 2 else gate_up.unsqueeze(0)
    out2 = out if out.dim() == 2 else out.unsqueeze(0)
    block = min(block, triton.next_power_of_2(inter))
    grid = (gu2.shape[0], triton.cdiv(inter, block))
    _silu_mul_kernel[grid](
        gu2, out2, gu2.stride(0), out2.stride(0), inter, BLOCK=block, num_warps=4 if block >= 512 else 1
    )
    return out


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    if gate_up.is_cuda:
        return silu_mul_triton(gate_up, out=out)
    y = silu_mul_reference(gate_up)
    if out is not None:
        out.copy_(y)
        y = out
    return y
