"""The attention input of one decode step in one kernel: RMSNorm -> fused q/k/v GEMV -> RoPE -> KV-cache write.

Unfused, this is four launches per layer (add+RMSNorm, the qkv GEMV, RoPE + cache write) and two round trips of
small activations through memory. Fused:
- the norm: the GEMV already streams the whole hidden vector x through every program, so each program also sums
  x^2 and multiplies x by the norm weight g on the fly; 1/rms is applied to the finished dot products
  (W (g * x / rms) = (W (g * x)) / rms). No normalised copy of x is written.
- RoPE (HF rotate_half layout) pairs dimension j of a head with j + D/2. Each program owns PAIRS such pairs of
  weight rows (rows are contiguous along K, so taking j and j + D/2 costs nothing in coalescing), so it can rotate
  its own outputs.
- the epilogue stores q to a [H, D] buffer and rotated k / plain v straight into the static cache at the position
  read from device memory (graph-safe), like `kernels.rope.rope_kv_write`.

Rounding mirrors the reference where it matters for the layout of the math: the projection output is rounded to
the activation dtype before the rotation (HF rotates the bf16 q_proj output), cos/sin are rounded to the
activation dtype as HF does. The norm itself is applied in fp32 (one rounding fewer than HF).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.gemv import GemvConfig, default_config, dot_rows
from kernels.rmsnorm import rmsnorm_reference
from kernels.rope import check_cache_write_args, rope_kv_write_reference

__all__ = ["norm_qkv_rope", "norm_qkv_rope_reference", "norm_qkv_rope_triton", "qkv_configs"]


def norm_qkv_rope_reference(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    wqkv: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF order, op by op: rmsnorm(hidden) -> q/k/v projections -> rotate q, k -> write k, v at `pos`.
    hidden [1, K] or [K]; wqkv [(H + 2 Hkv) * D, K]; caches [Hkv, S_max, D]. Returns rotated q [H, D]."""
    hkv, d = k_cache.shape[0], k_cache.shape[2]
    h = rmsnorm_reference(hidden.reshape(1, -1), norm_weight, eps)
    qkv = F.linear(h, wqkv)[0]
    q, k, v = qkv.split([qkv.numel() - 2 * hkv * d, hkv * d, hkv * d])
    return rope_kv_write_reference(q.view(-1, d), k.view(hkv, d), v.view(hkv, d), cos, sin, pos, k_cache, v_cache, q_out=q_out)


@triton.jit
def _norm_qkv_rope_kernel(
    x_ptr,
    g_ptr,
    w_ptr,
    stride_wn,
    cos_ptr,
    sin_ptr,
    stride_cos,
    pos_ptr,
    q_out_ptr,
    stride_qo,
    k_cache_ptr,
    v_cache_ptr,
    stride_kc_h,
    stride_kc_s,
    stride_vc_h,
    stride_vc_s,
    K,
    eps,
    num_q_heads,
    num_kv_heads,
    max_pos,
    s_max,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid = tl.program_id(0)
    head = pid // (HALF // PAIRS)  # q heads, then k heads, then v heads
    j0 = (pid % (HALF // PAIRS)) * PAIRS
    # Rows interleaved (j, j + D/2) so that the outputs reshape to [PAIRS, 2] = (first half, second half).
    i = tl.arange(0, 2 * PAIRS)
    rows = head * HEAD_DIM + j0 + i // 2 + (i % 2) * HALF
    # With USE_GDC (programmatic dependent launch) dot_rows waits for the previous kernel before reading x; the
    # stores below come after that wait too.
    y, sq = dot_rows(w_ptr, rows, stride_wn, x_ptr, g_ptr, K, 2 * PAIRS, BLOCK_K, EVEN_K, True, USE_GDC)
    act_ty = q_out_ptr.dtype.element_ty
    y = (y * tl.rsqrt(sq / K + eps)).to(act_ty).to(tl.float32)  # the projection's output dtype
    x1, x2 = tl.split(tl.reshape(y, [PAIRS, 2]))
    j = j0 + tl.arange(0, PAIRS)
    pos = tl.load(pos_ptr).to(tl.int64)
    if head < num_q_heads + num_kv_heads:  # q and k heads are rotated, v heads are not
        # An out-of-range position drops the cache write below instead of corrupting memory.
        in_table = (j < HALF) & (pos < max_pos)
        c = tl.load(cos_ptr + pos * stride_cos + j, mask=in_table, other=0.0).to(act_ty).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_cos + j, mask=in_table, other=0.0).to(act_ty).to(tl.float32)
        x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
    if head < num_q_heads:
        q = q_out_ptr + head * stride_qo
        tl.store(q + j, x1.to(act_ty))
        tl.store(q + HALF + j, x2.to(act_ty))
    else:
        write = (j < HALF) & (pos < s_max) & (pos < max_pos)
        if head < num_q_heads + num_kv_heads:
            dst = k_cache_ptr + (head - num_q_heads) * stride_kc_h + pos * stride_kc_s
        else:
            dst = v_cache_ptr + (head - num_q_heads - num_kv_heads) * stride_vc_h + pos * stride_vc_s
        tl.store(dst + j, x1.to(dst.dtype.element_ty), mask=write)
        tl.store(dst + HALF + j, x2.to(dst.dtype.element_ty), mask=write)


def qkv_configs(configs: tuple[GemvConfig, ...], head_dim: int) -> tuple[GemvConfig, ...]:
    """The GEMV configs this kernel can run: an even number of rows whose pairs tile half a head."""
    half = head_dim // 2
    return tuple(c for c in configs if c.block_n >= 2 and c.block_n % 2 == 0 and half % (c.block_n // 2) == 0)


def _default_config(n: int, k: int, head_dim: int) -> GemvConfig:
    """The plain GEMV's default tile, with at most 4 row pairs per program and a pair count that tiles half a head."""
    pairs = 4
    while (head_dim // 2) % pairs:
        pairs //= 2
    return replace(default_config(n, k), block_n=2 * pairs)


def norm_qkv_rope_triton(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    wqkv: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Same contract as the reference, one launch. config.block_n = weight rows per program (pairs x 2).
    pdl: launch with programmatic dependent launch (Hopper+; overlaps this launch with the previous kernel's tail)."""
    if hidden.numel() != hidden.shape[-1] or not hidden.is_contiguous():
        raise ValueError(f"norm_qkv_rope: hidden must be one contiguous row, got {tuple(hidden.shape)}")
    k = hidden.shape[-1]
    if wqkv.dim() != 2 or wqkv.shape[1] != k or wqkv.stride(1) != 1:
        raise ValueError(f"norm_qkv_rope: wqkv must be [rows, {k}] with a contiguous last dim, got {tuple(wqkv.shape)}")
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_qkv_rope: norm weight must be [{k}], got {tuple(norm_weight.shape)}")
    if k_cache.dim() != 3:
        raise ValueError(f"norm_qkv_rope: k_cache must be [Hkv, S_max, D], got {tuple(k_cache.shape)}")
    hkv, s_max, d = k_cache.shape
    check_cache_write_args("norm_qkv_rope", cos, sin, pos, k_cache, v_cache, hkv, d)
    if d % 2 or wqkv.shape[0] % d:
        raise ValueError(f"norm_qkv_rope: {wqkv.shape[0]} weight rows are not whole heads of an even dim {d}")
    h = wqkv.shape[0] // d - 2 * hkv
    if h < 1:
        raise ValueError(f"norm_qkv_rope: {wqkv.shape[0]} rows leave no q heads beside {hkv} k and v heads of dim {d}")
    if q_out is None:
        q_out = torch.empty((h, d), dtype=hidden.dtype, device=hidden.device)
    if q_out.shape != (h, d) or q_out.stride(1) != 1:
        raise ValueError(f"norm_qkv_rope: q_out must be [{h}, {d}] with a contiguous last dim, got {tuple(q_out.shape)}")
    cfg = config or _default_config(wqkv.shape[0], k, d)
    if not qkv_configs((cfg,), d):
        raise ValueError(f"norm_qkv_rope: block_n={cfg.block_n} must be even with block_n/2 dividing {d // 2}")
    pairs = cfg.block_n // 2
    grid = ((h + 2 * hkv) * (d // 2) // pairs,)
    _norm_qkv_rope_kernel[grid](
        hidden, norm_weight, wqkv, wqkv.stride(0),
        cos, sin, cos.stride(0), pos,
        q_out, q_out.stride(0),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k, eps, h, hkv, cos.shape[0], s_max,
        HEAD_DIM=d, PAIRS=pairs, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, USE_GDC=pdl,
        num_warps=cfg.num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return q_out


def norm_qkv_rope(
    hidden: torch.Tensor,
    norm_weight: torch.Tensor,
    wqkv: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Dispatcher: the fused Triton kernel on CUDA, the op-by-op torch reference elsewhere."""
    if hidden.is_cuda:
        return norm_qkv_rope_triton(hidden, norm_weight, wqkv, eps, cos, sin, pos, k_cache, v_cache, q_out, config, pdl)
    return norm_qkv_rope_reference(hidden, norm_weight, wqkv, eps, cos, sin, pos, k_cache, v_cache, q_out)
