"""Text rows of the LM head, skipped on the device while a unit span is open.

In speech mode the decode step always computes the unit/special rows (a zero-copy slice, see speech_head.py) and
calls this for the text rows [0, row_start): when the device flag `unit_span_open` is set every program writes -inf
and reads no weights (~262 MB less per 7B step in bf16); otherwise it is a plain GEMV. The decision is read from
device memory, so one captured CUDA graph serves both cases and the host never has to know, ahead of the GPU,
whether the previous token opened or closed a span. The resulting logits equal masking the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["text_rows_logits", "text_rows_logits_reference", "text_rows_logits_triton"]


def text_rows_logits_reference(
    h: torch.Tensor, weight: torch.Tensor, unit_span_open: torch.Tensor, row_start: int, out: torch.Tensor
) -> torch.Tensor:
    """out[:row_start] = -inf inside a unit span, else h . W[:row_start]^T (fp32)."""
    if int(unit_span_open.reshape(-1)[0]):
        out[:row_start].fill_(float("-inf"))
    else:
        out[:row_start].copy_(F.linear(h, weight[:row_start]).float())
    return out


@triton.jit
def _text_rows_kernel(h_ptr, w_ptr, flag_ptr, out_ptr, n_rows, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    span_open = tl.load(flag_ptr)
    if span_open != 0:
        tl.store(out_ptr + rows, tl.full([BLOCK_N], float("-inf"), tl.float32), mask=row_ok)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(h_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


def text_rows_logits_triton(
    h: torch.Tensor,
    weight: torch.Tensor,
    unit_span_open: torch.Tensor,
    row_start: int,
    out: torch.Tensor,
    block_n: int = 16,
    block_k: int = 512,
) -> torch.Tensor:
    if h.dim() != 1 or weight.dim() != 2 or h.shape[0] != weight.shape[1]:
        raise ValueError(f"text_rows_logits: h [K] and weight [V, K] expected, got {tuple(h.shape)} and {tuple(weight.shape)}")
    if weight.stride(1) != 1 or not h.is_contiguous():
        raise ValueError("text_rows_logits: weight rows and h must be contiguous")
    if out.dtype != torch.float32 or out.shape[0] < row_start or not 0 < row_start <= weight.shape[0]:
        raise ValueError(f"text_rows_logits: out must be fp32 with >= {row_start} entries and 0 < row_start <= V")
    if unit_span_open.dtype != torch.int32 or unit_span_open.numel() != 1:
        raise ValueError("text_rows_logits: unit_span_open must be an int32 tensor of one element")
    K = weight.shape[1]
    block_k = min(block_k, triton.next_power_of_2(K))
    grid = (triton.cdiv(row_start, block_n),)
    _text_rows_kernel[grid](h, weight, unit_span_open, out, row_start, K, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def text_rows_logits(
    h: torch.Tensor, weight: torch.Tensor, unit_span_open: torch.Tensor, row_start: int, out: torch.Tensor
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA (flag read on the device), the reference elsewhere."""
    if h.is_cuda:
        return text_rows_logits_triton(h, weight, unit_span_open, row_start, out)
    return text_rows_logits_reference(h, weight, unit_span_open, row_start, out)
