"""SiLU(gate) * up on the fused gate_up GEMV output: Triton (fp32 math, one rounding) vs the HF-style reference."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kernels import silu_mul as sm
from kernel_rules import DEVICE, assert_dtype_rule as _assert_dtype_rule


def _check(gen: torch.Generator, t: int, inter: int, dtype: torch.dtype, device: str) -> None:
    gate_up = (3.0 * torch.randn((t, 2 * inter), generator=gen, device=gen.device)).to(device=device, dtype=dtype)
    out = sm.silu_mul_triton(gate_up)
    assert out.shape == (t, inter) and out.dtype == dtype
    assert torch.isfinite(out).all()
    _assert_dtype_rule(
        out, sm.silu_mul_reference(gate_up), sm.silu_mul_reference(gate_up.float()), f"silu_mul {dtype} {t}x{inter}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("t,inter", [(1, 96), (3, 1000), (2, 1500), (1, 11008)])
def test_silu_mul_matches_reference(gen, dtype, t, inter):
    _check(gen, t, inter, dtype, DEVICE)


def test_reference_is_gate_first_hf_mlp(gen):
    gate = torch.randn((2, 40), generator=gen, device=gen.device)
    up = torch.randn((2, 40), generator=gen, device=gen.device)
    expected = F.silu(gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    assert torch.equal(sm.silu_mul_reference(torch.cat((gate, up), -1)), expected)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy in the interpreter: exp(1000) = inf
def test_extreme_gates_stay_finite():
    gate = torch.tensor([-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0, -0.0])
    gate_up = torch.cat((gate, torch.full_like(gate, 2.0)))[None].to(DEVICE)
    out = sm.silu_mul_triton(gate_up)
    torch.testing.assert_close(out, sm.silu_mul_reference(gate_up), atol=1e-6, rtol=1e-6)


def test_one_dimensional_and_preallocated(gen):
    gate_up = torch.randn((2 * 130,), generator=gen, device=gen.device).to(DEVICE)
    out = torch.empty((130,), device=DEVICE)
    got = sm.silu_mul_triton(gate_up, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, sm.silu_mul_reference(gate_up), atol=1e-6, rtol=1e-5)


def test_odd_width_raises():
    with pytest.raises(ValueError, match="even"):
        sm.silu_mul_triton(torch.zeros((1, 7)))


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(sm, "silu_mul_triton", boom)
    gate_up = torch.randn((2, 64), generator=gen, device=gen.device)
    assert torch.equal(sm.silu_mul(gate_up), sm.silu_mul_reference(gate_up))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4])
def test_gpu_silu_mul_7b_bf16(gen, t):
    _check(gen, t, 11008, torch.bfloat16, "cuda")
