"""Speech-mode LM head: while a unit span is open only unit tokens and specials can be legal.

SpeechGPT's vocabulary is 32000 text pieces, 1000 units <0>..<999> at ids 32000..32999 and 6 specials at
33000..33005 (<sosp>, <eosp>, ...). Inside a unit span the text rows of lm_head would be masked anyway, so the head
reads only rows [row_start, V) -- a contiguous, zero-copy row slice of the [V, D] weight -- and returns logits for
those rows. Sampling them with `vocab_offset=row_start` (kernels.sampling) gives exactly the distribution of the
full logits with rows < row_start set to -inf (top-k/top-p only ever see the finite entries), at 1006 / 33006 of the
bytes: ~262 MB less per step in bf16.

The official SpeechGPT samples over the full vocabulary; the engine keeps that path for fidelity.
torch F.linear over the slice is a cuBLAS GEMV on 1006 x 4096 values; `kernels.gemv.gemv_triton` can replace it
where `bench_gemv` shows it faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_full_logits_reference", "speech_head_logits"]


def _check(hidden: torch.Tensor, weight: torch.Tensor, row_start: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"speech_head: lm_head weight must be [V, D], got {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"speech_head: hidden last dim {hidden.shape[-1]} != lm_head D {weight.shape[1]}")
    if not 0 <= row_start < weight.shape[0]:
        raise ValueError(f"speech_head: row_start must be in [0, {weight.shape[0]}), got {row_start}")


def speech_head_logits(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, row_start: int
) -> torch.Tensor:
    """Logits for rows [row_start, V) only: hidden [..., D] -> [..., V - row_start] (local id = id - row_start)."""
    _check(hidden, lm_head_weight, row_start)
    rows = lm_head_weight[row_start:]  # a view: rows are contiguous, nothing is copied
    return F.linear(hidden, rows)


def masked_full_logits_reference(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, row_start: int
) -> torch.Tensor:
    """Full logits [..., V] with rows < row_start set to -inf: what the restricted head must be equivalent to."""
    _check(hidden, lm_head_weight, row_start)
    logits = F.linear(hidden, lm_head_weight).clone()
    logits[..., :row_start] = float("-inf")
    return logits
