"""GEMV with the residual add in its epilogue: the kernel equals hidden + F.linear under the dtype rule and writes
every row of hidden exactly once."""

from __future__ import annotations

import pytest
import torch

from kernels import gemv_residual as gr
from kernels.gemv import AUTO_CONFIGS, LLAMA7B_SHAPES, GemvConfig
from kernel_rules import DEVICE, assert_dtype_rule


def _check(gen, n, k, dtype, config, device):
    x = torch.randn((1, k), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    w = (torch.randn((n, k), generator=gen, device=gen.device) * k**-0.5).to(device=device, dtype=dtype)
    hidden = (torch.randn((1, n), generator=gen, device=gen.device) * 4).to(device=device, dtype=dtype)
    got = hidden.clone()
    assert gr.gemv_residual_triton(x, w, got, config=config).data_ptr() == got.data_ptr()
    low = gr.gemv_residual_reference(x, w, hidden.clone())
    ref = gr.gemv_residual_reference(x.double(), w.double(), hidden.double())
    assert_dtype_rule(got, low, ref, f"gemv_residual {dtype} {n}x{k} {config}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n,k,config",
    [
        (37, 300, GemvConfig(8, 128, 4)),  # N not a multiple of BLOCK_N, K not a multiple of BLOCK_K
        (64, 512, GemvConfig(16, 256, 4)),
        (3, 64, GemvConfig(1, 64, 1)),
        (50, 96, None),
    ],
)
def test_kernel_matches_reference(gen, dtype, n, k, config):
    _check(gen, n, k, dtype, config, DEVICE)


def test_fp32_is_hidden_plus_product(gen):
    # The add is exact in fp32 apart from the dot product's summation order.
    x, w = torch.randn(1, 64, generator=gen), torch.randn(20, 64, generator=gen)
    hidden = torch.randn(1, 20, generator=gen)
    got = gr.gemv_residual_triton(x.to(DEVICE), w.to(DEVICE), hidden.clone().to(DEVICE), config=GemvConfig(8, 32, 1))
    torch.testing.assert_close(got.cpu(), hidden + x @ w.T, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="hidden must be"):
        gr.gemv_residual_triton(torch.randn(1, 8), torch.randn(4, 8), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="x must be"):
        gr.gemv_residual_triton(torch.randn(1, 9), torch.randn(4, 8), torch.zeros(1, 4))


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(gr, "gemv_residual_triton", boom)
    gr.gemv_residual(torch.randn(1, 8), torch.randn(4, 8), torch.zeros(1, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [s for s in LLAMA7B_SHAPES if s[0] == 4096])
def test_gpu_7b_shapes_bf16(gen, no_tf32, n, k):
    _check(gen, n, k, torch.bfloat16, None, "cuda")


@pytest.mark.gpu
def test_gpu_auto_configs_bf16(gen, no_tf32):
    for cfg in AUTO_CONFIGS[::3]:  # a spread (the engine checks every config it races)
        _check(gen, 1000, 4096, torch.bfloat16, cfg, "cuda")
