"""Fused residual-add + RMSNorm (LLaMA), torch reference and Triton kernel.

HF LLaMA semantics, reproduced exactly by the reference:
    h   = x + residual                                   (in the tensor dtype)
    out = weight * (h.float() * rsqrt(mean(h.float()**2, -1) + eps)).to(dtype)

The Triton kernel does one row per program: it reads x and residual once, writes the new residual stream h and the
normalised output, so the decode step pays one pass over 2 x D elements instead of the 4-5 kernels of eager torch.
Launchers are CUDA-graph safe: no host sync, shapes only, preallocated `out=` / `residual_out=` accepted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "add_rmsnorm",
    "add_rmsnorm_reference",
    "add_rmsnorm_triton",
    "rmsnorm",
    "rmsnorm_reference",
    "rmsnorm_triton",
]


# ----------------------------------------------------------------------------------------------------------------
# torch reference (HF LlamaRMSNorm + the residual add of LlamaDecoderLayer)
# ----------------------------------------------------------------------------------------------------------------


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, round to the input dtype, then scale by weight."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rmsnorm(x + residual), x + residual); the add happens in the tensor dtype as in HF."""
    h = x + residual
    return rmsnorm_reference(h, weight, eps), h


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        # Round the sum to the tensor dtype before normalising: HF adds in bf16/fp16 and normalises that.
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + offs, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    variance = tl.sum(hf * hf, axis=0) / D
    rstd = tl.rsqrt(variance + eps)
    # HF rounds the normalised value to the input dtype before the weight multiply; keep that double rounding.
    normed = (hf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block_d: int) -> int:
    # ~8-16 fp32 values per thread keeps registers low while a row of 4096 still fits one CTA.
    return max(1, min(16, block_d // 512))


def _as_rows(t: torch.Tensor, name: str, d: int) -> torch.Tensor:
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] != d:
        raise ValueError(f"rmsnorm: {name} must be [T, {d}] or [{d}], got {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"rmsnorm: {name} must be contiguous in its last dimension, got strides {t.stride()}")
    return t


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() not in (1, 2):
        raise ValueError(f"rmsnorm: x must be [T, D] or [D], got {tuple(x.shape)}")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rmsnorm: weight must be [{d}], got {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("rmsnorm: weight must be contiguous")
    x2 = _as_rows(x, "x", d)
    t = x2.shape[0]
    # Output dtype follows torch promotion of `weight * h.to(dtype)` (bf16 weight -> bf16, fp32 weight -> fp32).
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.dtype != out_dtype or out.shape != x.shape:
        raise ValueError(f"rmsnorm: out must be {tuple(x.shape)} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    out2 = _as_rows(out, "out", d)

    res2 = res_out2 = x2  # dummies when there is no residual (never read or written: HAS_RESIDUAL is constexpr)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"rmsnorm: residual must match x ({tuple(x.shape)} {x.dtype}), "
                f"got {tuple(residual.shape)} {residual.dtype}"
            )
        res2 = _as_rows(residual, "residual", d)
        if residual_out is None:
            residual_out = torch.empty_like(x)
        if residual_out.shape != x.shape or residual_out.dtype != x.dtype:
            raise ValueError(
                f"rmsnorm: residual_out must be {tuple(x.shape)} {x.dtype}, "
                f"got {tuple(residual_out.shape)} {residual_out.dtype}"
            )
        res_out2 = _as_rows(residual_out, "residual_out", d)

    block_d = triton.next_power_of_2(d)
    _add_rmsnorm_kernel[(t,)](
        x2,
        res2,
        weight,
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        d,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_d),
    )
    return out, residual_out


def add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused h = x + residual; out = rmsnorm(h). Returns (out, h). `residual_out` may alias `residual` or `x`
    (each program reads its whole row before writing it)."""
    out, h = _launch(x, residual, weight, eps, out, residual_out)
    assert h is not None
    return out, h


def rmsnorm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm without a residual (e.g. the final norm before the LM head)."""
    return _launch(x, None, weight, eps, out, None)[0]


# ----------------------------------------------------------------------------------------------------------------
# dispatchers: Triton on CUDA, the torch reference elsewhere (never the interpreter in the engine)
# ----------------------------------------------------------------------------------------------------------------


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        return add_rmsnorm_triton(x, residual, weight, eps, out=out, residual_out=residual_out)
    y, h = add_rmsnorm_reference(x, residual, weight, eps)
    if residual_out is not None:
        residual_out.copy_(h)
        h = residual_out
    if out is not None:
        out.copy_(y)
        y = out
    return y, h


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    if x.is_cuda:
        return rmsnorm_triton(x, weight, eps, out=out)
    y = rmsnorm_reference(x, weight, eps)
    if out is not None:
        out.copy_(y)
        y = out
    return y
