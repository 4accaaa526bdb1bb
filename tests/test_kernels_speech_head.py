"""Speech-mode LM head: logits of the row slice [row_start, V) give the same argmax and the same filtered sampling
distribution (temperature / top-k / top-p) as the full logits with rows < row_start masked to -inf."""

from __future__ import annotations


import pytest
import torch

from kernels import sampling as smp
from kernels import speech_head as sh
from kernels.bench_decode import SPEECHGPT_TEXT_ROWS as TEXT_ROWS, SPEECHGPT_VOCAB_SIZE
from kernels.sampling import SamplerState, SamplingParams
from kernel_rules import DEVICE


def _head(gen: torch.Generator, vocab: int, d: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    weight = (torch.randn((vocab, d), generator=gen, device=gen.device) / d**0.5).to(device=device, dtype=dtype)
    hidden = (3.0 * torch.randn((d,), generator=gen, device=gen.device)).to(device=device, dtype=dtype)
    return hidden, weight


def _assert_same_distribution(restricted: torch.Tensor, masked: torch.Tensor, row_start: int, params, n: int):
    """Filtered probabilities of the slice (ids shifted by row_start) equal those of the masked full logits."""
    full = smp.filter_logits_reference(masked.float().cpu(), params, n)
    part = smp.filter_logits_reference(restricted.float().cpu(), params, n, vocab_offset=row_start)
    full_ids = torch.isfinite(full).nonzero().flatten()
    part_ids = torch.isfinite(part).nonzero().flatten() + row_start
    assert full_ids.tolist() == part_ids.tolist()
    torch.testing.assert_close(
        torch.softmax(part, -1)[part_ids - row_start], torch.softmax(full, -1)[full_ids], atol=1e-5, rtol=0
    )
    return full_ids


@pytest.mark.parametrize("vocab,row_start", [(1106, 1000), (1006 + 64, 64), (300, 0)])
def test_restricted_head_equals_masked_full_head(gen, vocab, row_start):
    hidden, weight = _head(gen, vocab, 64)
    restricted = sh.speech_head_logits(hidden, weight, row_start)
    masked = sh.masked_full_logits_reference(hidden, weight, row_start)
    assert restricted.shape == (vocab - row_start,)
    assert torch.all(masked[:row_start] == float("-inf"))
    torch.testing.assert_close(restricted, masked[row_start:], atol=1e-5, rtol=1e-5)
    assert int(torch.argmax(restricted)) + row_start == int(torch.argmax(masked))
    for params, n in [(SamplingParams(), 0), (SamplingParams(), 12), (SamplingParams(temperature=1.0, top_k=5), 3)]:
        _assert_same_distribution(restricted, masked, row_start, params, n)


def test_restricted_head_is_a_zero_copy_slice(gen):
    hidden, weight = _head(gen, 1106, 64)
    rows = weight[1000:]
    assert rows.data_ptr() == weight.data_ptr() + 1000 * 64 * weight.element_size() and rows.is_contiguous()
    torch.testing.assert_close(sh.speech_head_logits(hidden, weight, 1000), rows @ hidden)


def test_fused_sampler_on_the_slice_matches_masked_full_logits(gen):
    # The property end to end: Triton sampler on the restricted logits (vocab_offset = row_start) keeps exactly
    # what the reference keeps on the masked full logits.
    vocab, row_start = 1106, 1000
    for _ in range(3):
        hidden, weight = _head(gen, vocab, 64)
        restricted = sh.speech_head_logits(hidden, weight, row_start)
        masked = sh.masked_full_logits_reference(hidden, weight, row_start)
        params = SamplingParams()
        state = SamplerState.create(DEVICE, seed=11, num_generated=0)
        debug = smp.sample_triton_debug(restricted.to(DEVICE), params, state, vocab_offset=row_start, num_draws=4)
        full = smp.filter_logits_reference(masked, params, 0)
        full_ids = torch.isfinite(full).nonzero().flatten()
        assert sorted(debug.kept_ids.tolist()) == full_ids.tolist()
        expected = torch.softmax(full, -1)[debug.kept_ids.cpu()]
        torch.testing.assert_close(debug.kept_probs.cpu(), expected, atol=1e-5, rtol=0)
        assert set(debug.tokens.tolist()) <= set(full_ids.tolist())
        greedy = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        smp.greedy_triton(restricted.to(DEVICE), greedy, vocab_offset=row_start)
        assert int(greedy.item()) == int(torch.argmax(masked))


def test_bad_row_start_raises(gen):
    hidden, weight = _head(gen, 100, 16)
    with pytest.raises(ValueError, match="row_start"):
        sh.speech_head_logits(hidden, weight, 100)
    with pytest.raises(ValueError, match="hidden"):
        sh.speech_head_logits(hidden[:8], weight, 10)


@pytest.mark.gpu
def test_gpu_speech_head_7b_shapes(gen, no_tf32):
    # SpeechGPT lm_head [33006, 4096] in bf16; logits compared in fp32 (exact GEMV order differs between the slice
    # and the full matrix, bf16 output rounding would create ties that are not the property under test).
    hidden, weight = _head(gen, SPEECHGPT_VOCAB_SIZE, 4096, torch.bfloat16, "cuda")
    restricted = sh.speech_head_logits(hidden.float(), weight.float(), TEXT_ROWS)
    masked = sh.masked_full_logits_reference(hidden.float(), weight.float(), TEXT_ROWS)
    assert restricted.shape == (1006,)
    torch.testing.assert_close(restricted, masked[TEXT_ROWS:], atol=1e-4, rtol=1e-5)
    assert int(torch.argmax(restricted)) + TEXT_ROWS == int(torch.argmax(masked))
    ids = _assert_same_distribution(restricted, masked, TEXT_ROWS, SamplingParams(), 0)
    assert ids.min() >= TEXT_ROWS
    bf16 = sh.speech_head_logits(hidden, weight, TEXT_ROWS)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == (1006,)
