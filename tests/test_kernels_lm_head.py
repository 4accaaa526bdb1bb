"""Text rows of the LM head, skipped on the device inside a unit span (kernels/lm_head.py)."""

from __future__ import annotations


import pytest
import torch

from kernels.lm_head import text_rows_logits, text_rows_logits_reference, text_rows_logits_triton


def _case(gen, vocab, d, dtype, device="cpu"):
    w = (torch.randn((vocab, d), generator=gen, device=gen.device) / d**0.5).to(device=device, dtype=dtype)
    h = torch.randn((d,), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    return h, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab, row_start, d", [(300, 250, 96), (1006 + 33, 33, 64), (97, 97, 40), (129, 1, 130)])
def test_triton_matches_reference(gen, dtype, vocab, row_start, d):
    h, w = _case(gen, vocab, d, dtype)
    ref32 = torch.nn.functional.linear(h.double(), w.double())[:row_start]
    torch_err = (torch.nn.functional.linear(h, w).double()[:row_start] - ref32).abs().max()
    for flag in (0, 1):
        span = torch.tensor([flag], dtype=torch.int32)
        sentinel = torch.randn(vocab, generator=gen)
        out = sentinel.clone()
        text_rows_logits_triton(h, w, span, row_start, out, block_n=16, block_k=32)
        want = text_rows_logits_reference(h, w, span, row_start, sentinel.clone())
        torch.testing.assert_close(out[row_start:], sentinel[row_start:], rtol=0, atol=0)  # speech rows untouched
        if flag:
            assert torch.isneginf(out[:row_start]).all() and torch.isneginf(want[:row_start]).all()
        else:
            err = (out[:row_start].double() - ref32).abs().max()
            assert err <= 2 * torch_err + 1e-5, (err, torch_err)
            assert (want[:row_start].double() - ref32).abs().max() <= 2 * torch_err + 1e-5


def test_flag_is_read_from_device_memory_on_every_call(gen):
    h, w = _case(gen, 200, 48, torch.float32)
    span = torch.zeros(1, dtype=torch.int32)
    out = torch.zeros(200)
    text_rows_logits_triton(h, w, span, 150, out, block_n=16, block_k=16)
    assert torch.isfinite(out[:150]).all()
    span.fill_(1)  # same tensor, new value: the next launch must see it
    text_rows_logits_triton(h, w, span, 150, out, block_n=16, block_k=16)
    assert torch.isneginf(out[:150]).all()


def test_dispatcher_uses_reference_on_cpu(monkeypatch, gen):
    import kernels.lm_head as m

    monkeypatch.setattr(m, "text_rows_logits_triton", lambda *a, **k: pytest.fail("Triton called on CPU"))
    h, w = _case(gen, 64, 16, torch.float32)
    out = text_rows_logits(h, w, torch.zeros(1, dtype=torch.int32), 40, torch.zeros(64))
    torch.testing.assert_close(out[:40], torch.nn.functional.linear(h, w)[:40])


def test_bad_arguments_are_refused(gen):
    h, w = _case(gen, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        text_rows_logits_triton(h, w, torch.zeros(1, dtype=torch.int64), 40, torch.zeros(64))
    with pytest.raises(ValueError, match="fp32"):
        text_rows_logits_triton(h, w, torch.zeros(1, dtype=torch.int32), 40, torch.zeros(64, dtype=torch.float16))


@pytest.mark.gpu
def test_7b_head_bf16(gen):
    h, w = _case(gen, 33006, 4096, torch.bfloat16, "cuda")
    ref = torch.nn.functional.linear(h.double(), w.double())[:32000]
    torch_err = (torch.nn.functional.linear(h, w).double()[:32000] - ref).abs().max()
    out = torch.empty(33006, device="cuda")
    for flag in (0, 1):
        span = torch.tensor([flag], dtype=torch.int32, device="cuda")
        text_rows_logits_triton(h, w, span, 32000, out)
        if flag:
            assert torch.isneginf(out[:32000]).all()
        else:
            assert (out[:32000].double() - ref).abs().max() <= 2 * torch_err + 1e-6
