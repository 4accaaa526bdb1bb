"""Split-K decode attention for B rows at once, each row one query token of its own session over its own KV slot.

q [B, H, D]; k_pool / v_pool [slots, Hkv, S_max, D] (one layer of the slot KV cache, kernels.slot_cache);
slots int32 [B] = the pool slot each row reads; seq_lens int32 [B] = valid positions of each row's slot (the
current token included, already written). Everything per row is read from device memory and the grid is
(B * H, num_splits) with a launch-time chunk, so one captured graph serves any mix of lengths and slots, and a
padded row (slot = the scratch slot, length 1) costs one tile.

Same two stages as kernels.decode_attention (whose split and merge device functions this reuses): each program
attends over one chunk of one row's head and writes a partial (max, sum, accumulator) to an fp32 scratch
[B * H, num_splits, D + 2]; a second launch merges each (row, head)'s partials.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.decode_attention import _DEFAULT_BLOCK_N, _LOG2E, _MAX_SPLITS, _attend_positions, _combine_splits, choose_num_splits, split_chunk

__all__ = ["batched_decode_attention", "batched_decode_attention_cpu", "batched_decode_attention_reference", "batched_decode_attention_triton"]


def batched_decode_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Row by row: softmax(q_b . K_slot[:L_b]^T * scale) . V_slot[:L_b] in fp32 (the batch-1 reference over each
    row's slot); returns fp32 [B, H, D]."""
    from kernels.decode_attention import decode_attention_reference

    _check(q, k_pool, v_pool, slots, seq_lens)
    rows = [decode_attention_reference(q[b], k_pool[int(s)], v_pool[int(s)], int(n), scale)
            for b, (s, n) in enumerate(zip(slots.tolist(), seq_lens.tolist()))]
    return torch.stack(rows) if rows else q.new_zeros(q.shape, dtype=torch.float32)


def batched_decode_attention_cpu(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                                 seq_lens: torch.Tensor) -> torch.Tensor:
    """The CPU path: each row through torch's SDPA over its own slot (one op per row instead of the reference's
    eight; a row's result never depends on the other rows). Returns [B, H, D] in q's dtype."""
    _check(q, k_pool, v_pool, slots, seq_lens)
    return rows_attention_cpu(q, k_pool, v_pool, list(zip(slots.tolist(), seq_lens.tolist())))


def rows_attention_cpu(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    """batched_decode_attention_cpu over the first len(rows) rows of q, with (slot, length) per row as host ints
    (the batched step reads them once per step, not once per layer)."""
    gqa = q.shape[1] != k_pool.shape[1]
    # 4-D [1, H, 1, D] inputs: torch takes its fused CPU flash kernel (2x faster here than the 3-D math path)
    out = [F.scaled_dot_product_attention(q[b][None, :, None], k_pool[s:s + 1, :, :n], v_pool[s:s + 1, :, :n],
                                          enable_gqa=gqa)[0, :, 0]
           for b, (s, n) in enumerate(rows)]
    return torch.stack(out) if out else q[:0].clone()


def _check(q, k_pool, v_pool, slots, seq_lens) -> None:
    if q.dim() != 3:
        raise ValueError(f"batched_decode_attention: q must be [B, H, D], got {tuple(q.shape)}")
    b, h, d = q.shape
    if k_pool.dim() != 4 or k_pool.shape[3] != d or v_pool.shape != k_pool.shape:
        raise ValueError(f"batched_decode_attention: k_pool / v_pool must be [slots, Hkv, S_max, {d}], "
                         f"got {tuple(k_pool.shape)} / {tuple(v_pool.shape)}")
    if h % k_pool.shape[1]:
        raise ValueError(f"batched_decode_attention: {h} query heads not divisible by {k_pool.shape[1]} KV heads")
    for name, t in (("slots", slots), ("seq_lens", seq_lens)):
        if t.shape != (b,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"batched_decode_attention: {name} must be an int tensor [{b}], got {t.dtype} {tuple(t.shape)}")


@triton.jit
def _batched_split_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, seq_lens_ptr, scratch_ptr,
    stride_qb, stride_qh, stride_kslot, stride_kh, stride_ks, stride_vslot, stride_vh, stride_vs,
    qk_scale, chunk, num_splits,
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row_head = tl.program_id(0)
    split = tl.program_id(1)
    b = row_head // H
    head = row_head % H
    slot = tl.load(slots_ptr + b).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + head * stride_qh + offs_d, mask=dmask, other=0.0).to(tl.float32) * qk_scale
    kv_head = (head // GROUP).to(tl.int64)
    k_base = k_ptr + slot * stride_kslot + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vslot + kv_head * stride_vh
    acc, m_i, l_i = _attend_positions(q, k_base, v_base, stride_ks, stride_vs, offs_d, dmask, start, end, BLOCK_D, BLOCK_N)
    out_row = scratch_ptr + (row_head * num_splits + split).to(tl.int64) * (D + 2)
    tl.store(out_row + offs_d, acc, mask=dmask)
    tl.store(out_row + D, tl.max(m_i, axis=0))
    tl.store(out_row + D + 1, tl.sum(l_i, axis=0))


@triton.jit
def _batched_combine_kernel(scratch_ptr, out_ptr, num_splits, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    # out is [B * H, D] contiguous: (row, head) pairs are rows of one flat head axis
    _combine_splits(scratch_ptr, out_ptr, tl.program_id(0), D, num_splits, num_splits, D, BLOCK_D, BLOCK_S)


def batched_decode_attention_triton(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
    num_splits: int | None = None, out: torch.Tensor | None = None, scratch: torch.Tensor | None = None,
    scale: float | None = None, block_n: int = _DEFAULT_BLOCK_N,
) -> torch.Tensor:
    """The Triton kernels; returns out [B, H, D] in q's dtype. Graph-safe (slots and lengths read on the device).
    scratch: fp32 [B * H, num_splits, D + 2], allocated when not given."""
    _check(q, k_pool, v_pool, slots, seq_lens)
    if q.stride(2) != 1 or k_pool.stride(3) != 1 or v_pool.stride(3) != 1:
        raise ValueError("batched_decode_attention: q and the pools need a contiguous last dim")
    b, h, d = q.shape
    hkv, s_max = k_pool.shape[1], k_pool.shape[2]
    if num_splits is None:
        num_splits = choose_num_splits(h, s_max, q.device, block_n)
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"batched_decode_attention: num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    if scratch is None:
        scratch = torch.empty((b * h, num_splits, d + 2), dtype=torch.float32, device=q.device)
    if scratch.shape != (b * h, num_splits, d + 2) or scratch.dtype != torch.float32 or not scratch.is_contiguous():
        raise ValueError(f"batched_decode_attention: scratch must be contiguous fp32 {(b * h, num_splits, d + 2)}, "
                         f"got {scratch.dtype} {tuple(scratch.shape)}")
    if out is None:
        out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    if out.shape != (b, h, d) or not out.is_contiguous():
        raise ValueError(f"batched_decode_attention: out must be contiguous {(b, h, d)}")
    if b == 0:
        return out
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_d = triton.next_power_of_2(d)
    _batched_split_kernel[(b * h, num_splits)](
        q, k_pool, v_pool, slots, seq_lens, scratch,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        scale * _LOG2E, split_chunk(s_max, num_splits), num_splits,
        H=h, GROUP=h // hkv, D=d, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    _batched_combine_kernel[(b * h,)](scratch, out, num_splits, D=d, BLOCK_D=block_d,
                                      BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def batched_decode_attention(q, k_pool, v_pool, slots, seq_lens, num_splits: int | None = None,
                             scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the Triton kernels on CUDA, row-by-row SDPA elsewhere."""
    if q.is_cuda:
        return batched_decode_attention_triton(q, k_pool, v_pool, slots, seq_lens, num_splits=num_splits, scratch=scratch)
    return batched_decode_attention_cpu(q, k_pool, v_pool, slots, seq_lens)
