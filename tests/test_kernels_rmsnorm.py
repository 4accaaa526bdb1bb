"""Fused residual-add + RMSNorm: Triton vs the HF-exact torch reference.

CPU tier: Triton interpreter, fp32/fp16, tiny shapes. GPU tier (`make gpu-check`): LLaMA-7B shapes in bf16.
Dtype rule: kernel error vs an fp32 reference <= 2x the error of plain torch in the same dtype (+ a tiny floor).
"""

from __future__ import annotations


import pytest
import torch

from kernels import rmsnorm as rn
from kernel_rules import DEVICE, assert_dtype_rule as _assert_dtype_rule

EPS = 1e-6


def _inputs(gen: torch.Generator, t: int, d: int, dtype: torch.dtype, device: str = DEVICE):
    x = torch.randn((t, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    res = torch.randn((t, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    w = (1.0 + 0.2 * torch.randn((d,), generator=gen, device=gen.device)).to(device=device, dtype=dtype)
    return x, res, w


def _check_add_rmsnorm(gen: torch.Generator, t: int, d: int, dtype: torch.dtype, device: str = DEVICE) -> None:
    x, res, w = _inputs(gen, t, d, dtype, device)
    out, h = rn.add_rmsnorm_triton(x, res, w, EPS)
    ref_out, ref_h = rn.add_rmsnorm_reference(x.float(), res.float(), w.float(), EPS)
    torch_out, torch_h = rn.add_rmsnorm_reference(x, res, w, EPS)
    assert out.dtype == dtype and h.dtype == dtype and out.shape == (t, d)
    # The residual sum is rounded once to the dtype, exactly like torch's `x + residual`.
    assert torch.equal(h, torch_h)
    _assert_dtype_rule(out, torch_out, ref_out, f"add_rmsnorm {dtype} T={t} D={d}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,d", [(1, 96), (3, 128), (2, 1000), (1, 4096)])
def test_add_rmsnorm_matches_reference(gen, dtype, t, d):
    _check_add_rmsnorm(gen, t, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,d", [(1, 96), (4, 200)])
def test_rmsnorm_without_residual(gen, dtype, t, d):
    x, _, w = _inputs(gen, t, d, dtype)
    out = rn.rmsnorm_triton(x, w, EPS)
    _assert_dtype_rule(out, rn.rmsnorm_reference(x, w, EPS), rn.rmsnorm_reference(x.float(), w.float(), EPS), "rmsnorm")


def test_preallocated_outputs_and_in_place_residual(gen):
    x, res, w = _inputs(gen, 2, 96, torch.float32)
    expected_out, expected_h = rn.add_rmsnorm_reference(x, res, w, EPS)
    out = torch.empty_like(x)
    stream = res.clone()
    got_out, got_h = rn.add_rmsnorm_triton(x, stream, w, EPS, out=out, residual_out=stream)  # in-place residual
    assert got_out.data_ptr() == out.data_ptr() and got_h.data_ptr() == stream.data_ptr()
    assert torch.equal(stream, expected_h)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)


def test_one_dimensional_input(gen):
    x, res, w = _inputs(gen, 1, 96, torch.float32)
    out, h = rn.add_rmsnorm_triton(x[0], res[0], w, EPS)
    ref_out, ref_h = rn.add_rmsnorm_reference(x[0], res[0], w, EPS)
    assert out.shape == (96,) and torch.equal(h, ref_h)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_hf_llama_rmsnorm(gen, dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, _, w = _inputs(gen, 3, 64, dtype, "cpu")
    hf = LlamaRMSNorm(64, eps=EPS).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        expected = hf(x)
    assert torch.equal(rn.rmsnorm_reference(x, w, EPS), expected)


def test_bad_shapes_raise(gen):
    x, res, w = _inputs(gen, 2, 96, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        rn.add_rmsnorm_triton(x, res, w[:50], EPS)
    with pytest.raises(ValueError, match="residual"):
        rn.add_rmsnorm_triton(x, res[:1], w, EPS)


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(rn, "add_rmsnorm_triton", boom)
    monkeypatch.setattr(rn, "rmsnorm_triton", boom)
    x, res, w = _inputs(gen, 2, 96, torch.float32, "cpu")
    out, h = rn.add_rmsnorm(x, res, w, EPS)
    ref_out, ref_h = rn.add_rmsnorm_reference(x, res, w, EPS)
    assert torch.equal(out, ref_out) and torch.equal(h, ref_h)
    assert torch.equal(rn.rmsnorm(x, w, EPS), rn.rmsnorm_reference(x, w, EPS))


# ---------------------------------------------------------------------------------------------------------------
# GPU tier: LLaMA-7B shapes in bf16
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5])
def test_gpu_add_rmsnorm_7b_bf16(gen, t):
    _check_add_rmsnorm(gen, t, 4096, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_rmsnorm_7b_bf16_and_dispatcher(gen):
    x, res, w = _inputs(gen, 1, 4096, torch.bfloat16, "cuda")
    out = rn.rmsnorm(x, w, EPS)  # dispatcher -> Triton on CUDA
    _assert_dtype_rule(out, rn.rmsnorm_reference(x, w, EPS), rn.rmsnorm_reference(x.float(), w.float(), EPS), "rmsnorm")
    out2, h2 = rn.add_rmsnorm(x, res, w, EPS)
    assert torch.equal(h2, x + res)
