"""Sampling for B rows of a batched decode step, each row with its own settings, step count and random stream.

CUDA: each row through the fused sampling kernels with its own Philox state (SamplerState), as the batch-1 engine.
CPU: row b's token is exactly what the batch-1 CPU sampler (kernels.sampling.CPU_DRAWS[cpu_draw]) draws for that
row alone. With "kept" the rows share one top-k over the batch (the expensive part: V scores per row) and then draw
from their own generators with one random number per kept token, so a row costs little beyond its share of the
top-k; with "hf" each row draws V random numbers (transformers' stream), which batching cannot share.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels.sampling import CPU_DRAWS, SamplerState, SamplingParams, _eos_local, kept_from_top, race_pick, sample

__all__ = ["sample_rows"]


def _kept_applies(params: SamplingParams, vocab: int) -> bool:
    k = min(max(params.top_k, 1), vocab)
    return not params.greedy and params.top_k != 0 and 4 * k <= vocab


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[SamplerState],
                generators: Sequence[torch.Generator | None], cpu_draw: str = "hf") -> list[int]:
    """Tokens for rows of logits [B, V] (global ids: the vocabulary starts at 0); advances each row's state
    (num_generated, offset) as kernels.sampling.sample does."""
    b, vocab = logits.shape
    if not len(params) == len(states) == len(generators) == b:
        raise ValueError(f"sample_rows: {b} rows, {len(params)} params, {len(states)} states, {len(generators)} generators")
    if logits.is_cuda or cpu_draw != "kept":
        for i in range(b):
            sample(logits[i], params[i], states[i], generator=generators[i], cpu_draw=cpu_draw)
        return [int(t) for t in torch.cat([s.token_out for s in states]).tolist()]
    generated = [int(s.num_generated[0]) for s in states]
    tokens: list[int | None] = [None] * b
    by_k: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        if _kept_applies(p, vocab):
            by_k.setdefault(min(max(p.top_k, 1), vocab), []).append(i)
    for k, rows in by_k.items():
        scores = logits[rows].float()  # a copy (indexed by a list)
        for j, i in enumerate(rows):  # min_new_tokens: EOS banned while the answer is shorter
            eos = _eos_local(params[i], 0, vocab)
            if eos >= 0 and generated[i] < params[i].min_new_tokens:
                scores[j, eos] = float("-inf")
        values, ids = torch.topk(scores, k + 1)
        for j, i in enumerate(rows):
            kept = kept_from_top(values[j].tolist(), ids[j], params[i])
            if kept is not None:
                tokens[i] = race_pick(*kept, generators[i])
    for i in range(b):
        if tokens[i] is None:  # where the shortcut does not apply: the row's own CPU draw
            tokens[i] = CPU_DRAWS[cpu_draw](logits[i], params[i], generated[i], generators[i], 0)
        st = states[i]
        st.token_out.fill_(tokens[i])
        st.num_generated.add_(1)
        st.offset.add_(1)
    return tokens  # type: ignore[return-value]
