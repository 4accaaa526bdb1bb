"""LLaMA rotary position embedding (HF "rotate_half" layout), torch reference and fused decode kernel.

Tables: inv_freq = 1 / theta^(arange(0, D, 2) / D), angles = pos * inv_freq in fp32, cos/sin fp32 [max_pos, D/2].
HF applies `q * cos + rotate_half(q) * sin` with cos/sin = cat(freqs, freqs) cast to the activation dtype, i.e. for
the two halves x1 = x[:D/2], x2 = x[D/2:]:
    out1 = x1 * c - x2 * s
    out2 = x2 * c + x1 * s

The decode kernel `rope_kv_write_triton` does the whole per-layer position step in one launch: rotate q, rotate k,
and write rotated k and v into the static KV cache [Hkv, S_max, D] at the position read from device memory, so a
captured CUDA graph stays valid for every position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "apply_rope_reference",
    "check_cache_write_args",
    "rope_kv_write",
    "rope_kv_write_reference",
    "rope_kv_write_triton",
    "rope_tables",
    "rotate_half",
]


def rope_tables(
    head_dim: int, max_pos: int, theta: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [max_pos, head_dim // 2], computed like HF LlamaRotaryEmbedding: inv_freq on the CPU
    (HF builds it at init, before the module moves), angles and cos/sin on `device` (HF's forward runs there)."""
    if head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    inv_freq = inv_freq.to(device)
    positions = torch.arange(max_pos, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """x [T, H, D], positions [T] -> rotated x, bit-for-bit HF `apply_rotary_pos_emb` semantics."""
    if x.dim() != 3:
        raise ValueError(f"apply_rope_reference: x must be [T, H, D], got {tuple(x.shape)}")
    positions = positions.to(device=cos.device, dtype=torch.long)
    c = cos[positions]
    s = sin[positions]
    # HF builds cat(freqs, freqs), takes cos/sin in fp32 and casts them to the activation dtype.
    c = torch.cat((c, c), dim=-1).to(x.dtype).unsqueeze(1)
    s = torch.cat((s, s), dim=-1).to(x.dtype).unsqueeze(1)
    return (x * c) + (rotate_half(x) * s)


def rope_kv_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """torch version of the fused decode step: returns rotated q, writes rotated k and v at cache position pos."""
    pos = pos.reshape(1).to(device=k_cache.device, dtype=torch.long)
    q_rot = apply_rope_reference(q.unsqueeze(0), cos, sin, pos)[0]
    k_rot = apply_rope_reference(k.unsqueeze(0), cos, sin, pos)[0]
    # index_copy_ keeps pos on the device (no host read), like the kernel.
    k_cache.index_copy_(1, pos, k_rot.unsqueeze(1).to(k_cache.dtype))
    v_cache.index_copy_(1, pos, v.unsqueeze(1).to(v_cache.dtype))
    if q_out is not None:
        q_out.copy_(q_rot)
        return q_out
    return q_rot


@triton.jit
def _rope_kv_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    k_cache_ptr,
    v_cache_ptr,
    q_out_ptr,
    stride_qh,
    stride_kh,
    stride_vh,
    stride_qoh,
    stride_cos,
    stride_kc_h,
    stride_kc_s,
    stride_vc_h,
    stride_vc_s,
    num_q_heads,
    max_pos,
    s_max,
    HALF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    head = tl.program_id(0)
    pos = tl.load(pos_ptr).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # An out-of-range position drops the write instead of corrupting memory (the engine guarantees pos < S_max).
    in_table = pos < max_pos
    mask = offs < HALF
    tmask = mask & in_table
    # HF casts the fp32 cos/sin to the activation dtype before multiplying: keep that rounding.
    act_ty = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * stride_cos + offs, mask=tmask, other=0.0).to(act_ty).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + offs, mask=tmask, other=0.0).to(act_ty).to(tl.float32)
    if head < num_q_heads:
        base = q_ptr + head * stride_qh
        x1 = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        obase = q_out_ptr + head * stride_qoh
        tl.store(obase + offs, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
        tl.store(obase + HALF + offs, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=mask)
    else:
        kvh = head - num_q_heads
        wmask = mask & (pos < s_max)
        kbase = k_ptr + kvh * stride_kh
        x1 = tl.load(kbase + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(kbase + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        kc = k_cache_ptr + kvh * stride_kc_h + pos * stride_kc_s
        tl.store(kc + offs, (x1 * c - x2 * s).to(k_cache_ptr.dtype.element_ty), mask=wmask)
        tl.store(kc + HALF + offs, (x2 * c + x1 * s).to(k_cache_ptr.dtype.element_ty), mask=wmask)
        vbase = v_ptr + kvh * stride_vh
        v1 = tl.load(vbase + offs, mask=mask, other=0.0)
        v2 = tl.load(vbase + HALF + offs, mask=mask, other=0.0)
        vc = v_cache_ptr + kvh * stride_vc_h + pos * stride_vc_s
        tl.store(vc + offs, v1.to(v_cache_ptr.dtype.element_ty), mask=wmask)
        tl.store(vc + HALF + offs, v2.to(v_cache_ptr.dtype.element_ty), mask=wmask)


def _check_heads(t: torch.Tensor, name: str, d: int) -> None:
    if t.dim() != 2 or t.shape[1] != d:
        raise ValueError(f"rope_kv_write: {name} must be [heads, {d}], got {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"rope_kv_write: {name} must be contiguous in its last dimension, got strides {t.stride()}")


def check_cache_write_args(
    who: str,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    hkv: int,
    d: int,
) -> None:
    """The checks every kernel that rotates and writes one position into the static KV cache needs (this module's
    and kernels.norm_qkv_rope): caches [hkv, S_max, d] alike, cos/sin tables [max_pos, d/2], a one-element pos."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[0] != hkv or cache.shape[2] != d or cache.stride(2) != 1:
            raise ValueError(
                f"{who}: {name} must be [{hkv}, S_max, {d}] with a contiguous last dim, "
                f"got {tuple(cache.shape)} strides {cache.stride()}"
            )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{who}: v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    if cos.dim() != 2 or cos.shape[1] != d // 2 or sin.shape != cos.shape or cos.stride(1) != 1:
        raise ValueError(f"{who}: cos/sin must be [max_pos, {d // 2}], got {tuple(cos.shape)}")
    if cos.stride() != sin.stride():
        raise ValueError(f"{who}: cos and sin must have the same strides")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: pos must be an int32/int64 tensor of one element, got {pos.dtype} {tuple(pos.shape)}")


def rope_kv_write_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [H, D], k/v [Hkv, D], cos/sin [max_pos, D/2] fp32, pos int32/int64 device tensor [1],
    k_cache/v_cache [Hkv, S_max, D]. Returns rotated q (in q_out if given); writes the caches in place."""
    if q.dim() != 2:
        raise ValueError(f"rope_kv_write: q must be [H, D], got {tuple(q.shape)}")
    h, d = q.shape
    if d % 2:
        raise ValueError(f"rope_kv_write: head dim must be even, got {d}")
    _check_heads(q, "q", d)
    _check_heads(k, "k", d)
    _check_heads(v, "v", d)
    hkv = k.shape[0]
    if v.shape[0] != hkv:
        raise ValueError(f"rope_kv_write: v must have {hkv} heads like k, got {v.shape[0]}")
    check_cache_write_args("rope_kv_write", cos, sin, pos, k_cache, v_cache, hkv, d)
    if q_out is None:
        q_out = torch.empty_like(q)
    if q_out.shape != q.shape or q_out.stride(1) != 1:
        raise ValueError(f"rope_kv_write: q_out must be {tuple(q.shape)} with a contiguous last dim")

    half = d // 2
    block = triton.next_power_of_2(half)
    _rope_kv_write_kernel[(h + hkv,)](
        q,
        k,
        v,
        cos,
        sin,
        pos,
        k_cache,
        v_cache,
        q_out,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        q_out.stride(0),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        h,
        cos.shape[0],
        k_cache.shape[1],
        HALF=half,
        BLOCK=block,
        num_warps=1 if block <= 64 else 2,
    )
    return q_out


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA, the torch reference elsewhere."""
    if q.is_cuda:
        return rope_kv_write_triton(q, k, v, cos, sin, pos, k_cache, v_cache, q_out=q_out)
    return rope_kv_write_reference(q, k, v, cos, sin, pos, k_cache, v_cache, q_out=q_out)
