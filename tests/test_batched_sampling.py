"""Batched CPU sampling: each row's token, and its sampler state, equal the batch-1 CPU sampler's for that row alone."""

from __future__ import annotations

import pytest
import torch

from kernels.batched_sampling import sample_rows
from kernels.sampling import CPU_DRAWS, SPEECHGPT_SAMPLING, SamplerState, SamplingParams

PARAMS = [
    SPEECHGPT_SAMPLING,
    SamplingParams(temperature=1.3, top_k=40, top_p=0.95, min_new_tokens=3),
    SamplingParams(greedy=True, min_new_tokens=0),  # no shortcut: the row's own draw
    SamplingParams(temperature=0.9, top_k=0, top_p=0.9),  # no top-k: the row's own draw
    SPEECHGPT_SAMPLING,
]


@pytest.mark.parametrize("cpu_draw", ["kept", "hf"])
def test_rows_draw_what_each_draws_alone(cpu_draw, gen):
    vocab = 3000
    for step in range(12):  # num_generated crosses min_new_tokens: the EOS ban lifts per row
        logits = torch.randn((len(PARAMS), vocab), generator=gen) * 3
        logits[1, 2] = 50.0  # EOS would win wherever it is not banned
        if step == 0:
            logits[4, 10:20] = 9.0  # a tie inside the top-k: the kept shortcut falls back to HF's draw
        states = [SamplerState.create("cpu", seed=i, num_generated=step) for i in range(len(PARAMS))]
        gens = [torch.Generator().manual_seed(1000 * step + i) for i in range(len(PARAMS))]
        got = sample_rows(logits, PARAMS, states, gens, cpu_draw)
        for i, p in enumerate(PARAMS):
            want = CPU_DRAWS[cpu_draw](logits[i], p, step, torch.Generator().manual_seed(1000 * step + i), 0)
            assert got[i] == want, (step, i)
            assert int(states[i].token_out[0]) == want and int(states[i].num_generated[0]) == step + 1
            assert torch.equal(gens[i].get_state(), _advanced(cpu_draw, logits[i], p, step, 1000 * step + i))


def _advanced(cpu_draw, logits, p, step, seed) -> torch.Tensor:
    """The generator state after the row's own draw (the batched draw must use the generator the same way)."""
    g = torch.Generator().manual_seed(seed)
    CPU_DRAWS[cpu_draw](logits, p, step, g, 0)
    return g.get_state()


def test_mismatched_lengths_are_named():
    with pytest.raises(ValueError, match="2 rows, 1 params"):
        sample_rows(torch.zeros(2, 10), [SPEECHGPT_SAMPLING], [SamplerState.create("cpu")] * 2, [None, None])
