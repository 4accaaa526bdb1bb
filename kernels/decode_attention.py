"""Split-K ("flash-decoding") attention for one query token over a static KV cache.

q [H, D], k_cache / v_cache [Hkv, S_max, D] (H % Hkv == 0: GQA-capable, SpeechGPT is MHA), `seq_len` an int32
device tensor [1] = number of valid cache positions including the current token (already written).

With one program per head only H = 32 of ~132 SMs would work at long contexts, so the sequence is split:
stage 1 runs a (H, num_splits) grid; program (h, s) handles positions [s * chunk, min((s + 1) * chunk, seq_len))
with an online softmax and writes its partial max m, sum of exponentials l (relative to m) and un-normalised
accumulator acc to an fp32 scratch [H, num_splits, D + 2]. `chunk` is a launch-time constant derived from S_max and
num_splits, so the grid never depends on device values and a captured CUDA graph is valid for any seq_len <= S_max.
A split past seq_len writes the neutral element (m = -inf, l = 0, acc = 0). Stage 2 (one program per head) merges
the splits: out = sum_s acc_s * 2^(m_s - M) / sum_s l_s * 2^(m_s - M). Scores are kept in log2 units (scale folded
with log2(e) into q) so the kernels use exp2.

One-launch mode (`one_launch=True`) drops stage 2's launch: a split past seq_len exits at once, each other split
writes its partial and then counts itself in on a per-head int32 arrival counter (an acq_rel atomic at GPU scope,
after a CTA barrier so every thread's partial stores precede it); the split that arrives last merges the
ceil(seq_len / chunk) live partials (read through L2, bypassing L1) and resets the counter to 0 for the next launch.
Same arithmetic as the two-launch path over the same partials, so both give identical outputs.

L2 prefetch (`prefetch=W`, Hopper): attention reads little memory at short contexts, so DRAM idles through it. The
kernel can use that time to pull the next weight matrix (the layer's o_proj, read right after) into L2: first
thing, before any wait, every program issues bulk L2 prefetches (`cp.async.bulk.prefetch.L2`, sm_90) for its
1/P-th of W's bytes, and goes on without waiting for them. A hint only: outputs are unchanged; whether it pays
(L2 capacity and partitioning, contention with the KV reads) is measured, not assumed (kernels.engine.tune_step).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = [
    "attention_counters",
    "choose_num_splits",
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_scratch",
    "decode_attention_triton",
    "split_chunk",
]

_LOG2E = 1.4426950408889634
_DEFAULT_BLOCK_N = 64
_MAX_SPLITS = 128


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: int,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q . K[:L]^T * scale) . V[:L] computed in fp32; returns fp32 [H, D]."""
    h, d = q.shape
    hkv = k_cache.shape[0]
    if h % hkv:
        raise ValueError(f"decode_attention: {h} query heads not divisible by {hkv} KV heads")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = h // hkv
    keys = k_cache[:, :seq_len].float().repeat_interleave(group, dim=0)  # [H, L, D]
    values = v_cache[:, :seq_len].float().repeat_interleave(group, dim=0)
    scores = torch.einsum("hd,hld->hl", q.float(), keys) * scale
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hl,hld->hd", probs, values)


def choose_num_splits(
    num_heads: int,
    s_max: int,
    device: torch.device | str | None = None,
    block_n: int = _DEFAULT_BLOCK_N,
) -> int:
    """One BLOCK_N tile per split (at most _MAX_SPLITS splits), none wholly past S_max.

    The split count is fixed per cache size (the grid of a captured graph cannot follow the context), so short
    contexts must still spread over many programs: with one tile per split a 256-token context keeps 4 programs per
    head busy instead of one program walking 4 tiles in series. Measured on an H200 (7B, context 256): 8 splits of
    256 positions cost 566 us per step in this kernel, latency-bound. Empty trailing splits cost one tiny program.
    `num_heads` and `device` are accepted for callers that plan per device; the choice does not depend on them."""
    splits = max(1, min(triton.cdiv(s_max, block_n), _MAX_SPLITS))
    chunk = triton.cdiv(triton.cdiv(s_max, splits), block_n) * block_n
    return triton.cdiv(s_max, chunk)


def attention_counters(num_heads: int, device: torch.device | str) -> torch.Tensor:
    """The one-launch mode's per-head arrival counters: int32 [H], zero (the kernel returns them to zero)."""
    return torch.zeros(num_heads, dtype=torch.int32, device=device)


def split_chunk(s_max: int, num_splits: int) -> int:
    """Positions per split: a launch-time constant (never a device value)."""
    return triton.cdiv(s_max, num_splits)


def decode_attention_scratch(
    num_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> torch.Tensor:
    """fp32 [H, num_splits, D + 2]: acc in [..., :D], max in [..., D], sum of exponentials in [..., D + 1]."""
    return torch.empty((num_heads, num_splits, head_dim + 2), dtype=torch.float32, device=device)


@triton.jit
def _attend_positions(q, k_base, v_base, stride_ks, stride_vs, offs_d, dmask, start, end, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of q (log2 units) over cache positions [start, end): returns (acc [BLOCK_D], m [1], l [1])."""
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    # Dynamic bounds: an empty range (start >= end) runs no iteration and keeps the neutral element.
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        # Both tiles are requested before any math, so their memory latencies overlap.
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        scores = tl.where(nmask, scores, float("-inf"))
        # Each tile has at least one valid position (n0 < end), so m_new is finite and nothing becomes NaN.
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    return acc, m_i, l_i


_PREFETCH_CHUNK = 256  # bytes per bulk prefetch instruction (a multiple of 16; literal in _prefetch_l2_slice)


@triton.jit
def _prefetch_l2_slice(pf_ptr, pf_bytes, pid, n_prog):
    """Ask L2 to fetch this program's 1/n_prog-th of the pf_bytes at pf_ptr (a byte pointer; pf_bytes a multiple of
    256), in 256-byte bulk prefetches; does not wait for them."""
    chunks = pf_bytes // 256
    per = tl.cdiv(chunks, n_prog)
    lo = pid * per
    hi = tl.minimum(lo + per, chunks)
    for c0 in range(lo, hi, 128):
        idx = tl.minimum(c0 + tl.arange(0, 128), chunks - 1)  # a clamped tail re-requests the last chunk: harmless
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], 256;\n\tmov.u32 $0, 0;",
            "=r,l",
            [pf_ptr + idx.to(tl.int64) * 256],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def _combine_splits(scratch_ptr, out_ptr, head, stride_oh, num_splits, n_used, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[head] = the merge of the head's first n_used partials (rows of num_splits in the scratch)."""
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < n_used
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    rows = scratch_ptr + (head * num_splits + offs_s).to(tl.int64) * (D + 2)
    # .cg: read at L2, the coherence point (in one-launch mode other CTAs of this very launch wrote the rows).
    m = tl.load(rows + D, mask=smask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(rows + D + 1, mask=smask, other=0.0, cache_modifier=".cg")
    acc = tl.load(rows[:, None] + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
    m_all = tl.max(m, axis=0)
    # Empty splits (m = -inf) get weight 0 explicitly: exp2(-inf - -inf) would be NaN if every split were empty.
    w = tl.where(m > float("-inf"), tl.exp2(m - m_all), 0.0)
    denom = tl.sum(l * w, axis=0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    o = tl.sum(acc * w[:, None], axis=0) / denom
    tl.store(out_ptr + head * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _decode_attn_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    seq_len_ptr,
    scratch_ptr,
    counter_ptr,
    out_ptr,
    pf_ptr,
    pf_bytes,
    stride_qh,
    stride_kh,
    stride_ks,
    stride_vh,
    stride_vs,
    stride_oh,
    qk_scale,
    chunk,
    num_splits,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ONE_LAUNCH: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    head = tl.program_id(0)
    split = tl.program_id(1)
    if PREFETCH:  # static weights: no need to wait for the previous kernel
        _prefetch_l2_slice(pf_ptr, pf_bytes, head * num_splits + split, tl.num_programs(0) * num_splits)
    if USE_GDC:  # programmatic dependent launch: q and this step's K/V row come from the previous kernel
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # past the wait: see kernels.gemv.dot_rows
    kv_head = head // GROUP
    seq_len = tl.load(seq_len_ptr).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # Scale and log2(e) folded into q once, so the inner loop is a dot and an exp2.
    q = tl.load(q_ptr + head * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32) * qk_scale
    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
    row = scratch_ptr + (head * num_splits + split).to(tl.int64) * (D + 2)
    if ONE_LAUNCH:
        if start < seq_len:  # splits past the context neither write nor arrive
            acc, m_i, l_i = _attend_positions(q, k_base, v_base, stride_ks, stride_vs, offs_d, dmask, start, end, BLOCK_D, BLOCK_N)
            tl.store(row + offs_d, acc, mask=dmask)
            tl.store(row + D, tl.max(m_i, axis=0))
            tl.store(row + D + 1, tl.sum(l_i, axis=0))
            # Every thread's partial stores before the (single-thread) release below, which publishes them.
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + head, 1, sem="acq_rel", scope="gpu")
            live = tl.cdiv(seq_len, chunk)
            if arrived == live - 1:  # the last live split of this head: all partials are visible now
                tl.store(counter_ptr + head, 0)
                _combine_splits(scratch_ptr, out_ptr, head, stride_oh, num_splits, live, D, BLOCK_D, BLOCK_S)
    else:
        acc, m_i, l_i = _attend_positions(q, k_base, v_base, stride_ks, stride_vs, offs_d, dmask, start, end, BLOCK_D, BLOCK_N)
        tl.store(row + offs_d, acc, mask=dmask)
        # m_i / l_i are [1] blocks (loop-carried); reduce them to scalars for the scalar stores.
        tl.store(row + D, tl.max(m_i, axis=0))
        tl.store(row + D + 1, tl.sum(l_i, axis=0))


@triton.jit
def _decode_attn_combine_kernel(
    scratch_ptr,
    out_ptr,
    stride_oh,
    num_splits,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    _combine_splits(scratch_ptr, out_ptr, tl.program_id(0), stride_oh, num_splits, num_splits, D, BLOCK_D, BLOCK_S)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: torch.Tensor,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    scale: float | None = None,
    block_n: int = _DEFAULT_BLOCK_N,
    pdl: bool = False,
    one_launch: bool = False,
    counters: torch.Tensor | None = None,
    prefetch: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-token attention over the cache; returns out [H, D] in q's dtype. Graph-safe: seq_len is read on the
    device, the grid depends only on shapes and num_splits. pdl: programmatic dependent launch (Hopper+).
    one_launch: merge the splits in the split kernel (see the module doc); counters is then its int32 [H] arrival
    counters, all zero between launches (the kernel leaves them so; default: a fresh zeroed tensor).
    prefetch: a contiguous CUDA tensor (the next weight matrix) to pull into L2 meanwhile (sm_90+; see the module
    doc); its bytes past the last whole 256 are not prefetched."""
    if q.dim() != 2 or q.stride(1) != 1:
        raise ValueError(f"decode_attention: q must be [H, D] with a contiguous last dim, got {tuple(q.shape)}")
    h, d = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[2] != d or cache.stride(2) != 1:
            raise ValueError(
                f"decode_attention: {name} must be [Hkv, S_max, {d}] with a contiguous last dim, "
                f"got {tuple(cache.shape)} strides {cache.stride()}"
            )
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    hkv, s_max = k_cache.shape[0], k_cache.shape[1]
    if h % hkv:
        raise ValueError(f"decode_attention: {h} query heads not divisible by {hkv} KV heads")
    if seq_len.numel() != 1 or seq_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"decode_attention: seq_len must be an int32 tensor [1], got {seq_len.dtype} {tuple(seq_len.shape)}"
        )
    if num_splits is None:
        num_splits = choose_num_splits(h, s_max, q.device, block_n)
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    if scratch is None:
        scratch = decode_attention_scratch(h, d, num_splits, q.device)
    if scratch.shape != (h, num_splits, d + 2) or scratch.dtype != torch.float32 or not scratch.is_contiguous():
        raise ValueError(
            f"decode_attention: scratch must be contiguous fp32 {(h, num_splits, d + 2)}, "
            f"got {scratch.dtype} {tuple(scratch.shape)}"
        )
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(1) != 1:
        raise ValueError(f"decode_attention: out must be {tuple(q.shape)} with a contiguous last dim")
    if one_launch:
        counters = attention_counters(h, q.device) if counters is None else counters
        if counters.shape != (h,) or counters.dtype != torch.int32 or not counters.is_contiguous():
            raise ValueError(f"decode_attention: counters must be contiguous int32 ({h},), got {counters.dtype} {tuple(counters.shape)}")

    pf_bytes = 0
    if prefetch is not None:
        if not (prefetch.is_cuda and prefetch.is_contiguous()):
            raise ValueError(f"decode_attention: prefetch must be a contiguous CUDA tensor, got {prefetch.device} "
                             f"contiguous={prefetch.is_contiguous()}")
        if torch.cuda.get_device_capability(prefetch.device)[0] < 9:
            raise ValueError("decode_attention: prefetch uses the bulk L2 prefetch of compute capability 9.0+")
        pf_bytes = prefetch.numel() * prefetch.element_size() // _PREFETCH_CHUNK * _PREFETCH_CHUNK
        if pf_bytes >= 2**31:
            raise ValueError(f"decode_attention: prefetch of {pf_bytes} bytes: at most 2 GiB")

    scale = 1.0 / math.sqrt(d) if scale is None else scale
    chunk = split_chunk(s_max, num_splits)
    block_d = triton.next_power_of_2(d)
    block_s = triton.next_power_of_2(num_splits)
    _decode_attn_split_kernel[(h, num_splits)](
        q,
        k_cache,
        v_cache,
        seq_len,
        scratch,
        counters if one_launch else seq_len,  # unused without one_launch
        out,
        prefetch.view(-1).view(torch.uint8) if prefetch is not None else seq_len,  # unused without prefetch
        pf_bytes,
        q.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        scale * _LOG2E,
        chunk,
        num_splits,
        GROUP=h // hkv,
        D=d,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        BLOCK_S=block_s,
        ONE_LAUNCH=one_launch,
        PREFETCH=prefetch is not None,
        USE_GDC=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    if one_launch:
        return out
    _decode_attn_combine_kernel[(h,)](
        scratch,
        out,
        out.stride(0),
        num_splits,
        D=d,
        BLOCK_D=block_d,
        BLOCK_S=block_s,
        USE_GDC=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: torch.Tensor,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    pdl: bool = False,
    one_launch: bool = False,
    counters: torch.Tensor | None = None,
    prefetch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatcher: the Triton kernels on CUDA, the fp32 torch reference (cast to q's dtype) elsewhere (where the
    launch options one_launch, pdl and prefetch mean nothing)."""
    if q.is_cuda:
        return decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=num_splits, out=out, scratch=scratch,
                                       pdl=pdl, one_launch=one_launch, counters=counters, prefetch=prefetch)
    y = decode_attention_reference(q, k_cache, v_cache, int(seq_len.reshape(-1)[0])).to(q.dtype)
    if out is not None:
        out.copy_(y)
        y = out
    return y
