"""Fused RMSNorm -> gate/up GEMV -> SiLU * up: the reference equals the unfused op-by-op path, the kernel equals the
reference under the dtype rule (fp64 reference, baseline = the reference run in the kernel's dtype)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import norm_gate_up_silu as ng
from kernels.gemv import AUTO_CONFIGS, GemvConfig
from kernels.rmsnorm import rmsnorm_reference
from kernels.silu_mul import silu_mul_reference
from kernel_rules import DEVICE, assert_dtype_rule


def _inputs(gen, inter, k, dtype, device):
    hidden = (torch.randn((1, k), generator=gen, device=gen.device) * 3.0).to(device=device, dtype=dtype)
    norm_w = (1.0 + 0.2 * torch.randn(k, generator=gen, device=gen.device)).to(device=device, dtype=dtype)
    w = (torch.randn((2 * inter, k), generator=gen, device=gen.device) * k**-0.5).to(device=device, dtype=dtype)
    return hidden, norm_w, w


def _check(gen, inter, k, dtype, config, device):
    hidden, norm_w, w = _inputs(gen, inter, k, dtype, device)
    out = torch.empty((1, inter), dtype=dtype, device=device)
    got = ng.norm_gate_up_silu_triton(hidden, norm_w, w, 1e-6, out=out, config=config)
    assert got.data_ptr() == out.data_ptr()
    low = ng.norm_gate_up_silu_reference(hidden, norm_w, w, 1e-6)
    ref = ng.norm_gate_up_silu_reference(hidden.double(), norm_w.double(), w.double(), 1e-6)
    assert_dtype_rule(got, low, ref, f"norm_gate_up_silu {dtype} I={inter} K={k} {config}")


def test_reference_is_the_unfused_path(gen):
    hidden, norm_w, w = _inputs(gen, 48, 64, torch.float32, "cpu")
    want = silu_mul_reference(F.linear(rmsnorm_reference(hidden, norm_w, 1e-5), w))
    assert torch.equal(ng.norm_gate_up_silu_reference(hidden, norm_w, w, 1e-5), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "inter,k,config",
    [
        (64, 256, GemvConfig(8, 128, 4)),
        (37, 300, GemvConfig(8, 128, 4)),  # I not a multiple of the outputs per program, K not of BLOCK_K
        (5, 96, GemvConfig(2, 32, 1)),  # one output per program
        (100, 64, GemvConfig(32, 64, 4)),
        (11, 40, None),  # default config
    ],
)
def test_kernel_matches_reference(gen, dtype, inter, k, config):
    _check(gen, inter, k, dtype, config, DEVICE)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="block_n must be even"):
        ng.norm_gate_up_silu_triton(torch.randn(1, 32), torch.ones(32), torch.randn(8, 32), 1e-5, config=GemvConfig(3, 32, 1))
    with pytest.raises(ValueError, match=r"w_gate_up must be \[2I, 32\]"):
        ng.norm_gate_up_silu_triton(torch.randn(1, 32), torch.ones(32), torch.randn(7, 32), 1e-5)
    with pytest.raises(ValueError, match="out must be"):
        ng.norm_gate_up_silu_triton(torch.randn(1, 32), torch.ones(32), torch.randn(8, 32), 1e-5, out=torch.empty(1, 5))
    assert all(c.block_n % 2 == 0 for c in ng.gate_up_configs(AUTO_CONFIGS))


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(ng, "norm_gate_up_silu_triton", boom)
    hidden, norm_w, w = _inputs(gen, 8, 16, torch.float32, "cpu")
    out = torch.empty(1, 8)
    assert ng.norm_gate_up_silu(hidden, norm_w, w, 1e-5, out=out).data_ptr() == out.data_ptr()


@pytest.mark.gpu
def test_gpu_7b_shape_bf16(gen, no_tf32):
    _check(gen, 11008, 4096, torch.bfloat16, None, "cuda")


@pytest.mark.gpu
def test_gpu_auto_configs_bf16(gen, no_tf32):
    for cfg in ng.gate_up_configs(AUTO_CONFIGS)[::3]:  # a spread (the engine checks every config it races)
        _check(gen, 1000, 4096, torch.bfloat16, cfg, "cuda")
