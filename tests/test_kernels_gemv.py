"""Batch-1 GEMV: Triton vs F.linear under the dtype rule (fp32 reference, baseline = F.linear in the same dtype)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kernels import gemv as gv
from kernel_rules import DEVICE, assert_dtype_rule as _assert_dtype_rule


def _check(gen, n: int, k: int, dtype: torch.dtype, config: gv.GemvConfig | None, device: str) -> None:
    weight = (torch.randn((n, k), generator=gen, device=gen.device) / k**0.5).to(device=device, dtype=dtype)
    x = torch.randn((k,), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    y = gv.gemv_triton(x, weight, config=config)
    assert y.shape == (n,) and y.dtype == dtype
    ref = F.linear(x.double(), weight.double())  # fp64: immune to TF32 settings on the GPU
    torch.testing.assert_close(gv.gemv_reference(x, weight).double(), ref, atol=1e-4, rtol=1e-4)
    _assert_dtype_rule(y, F.linear(x, weight), ref, f"gemv {dtype} {n}x{k} {config}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "n,k,config",
    [
        (37, 300, gv.GemvConfig(8, 128, 4)),  # N not a multiple of BLOCK_N, K not a multiple of BLOCK_K
        (64, 512, gv.GemvConfig(16, 256, 4)),  # even K
        (5, 1000, gv.GemvConfig(4, 64, 1)),
        (1, 96, None),  # one row, default config
    ],
)
def test_gemv_matches_reference(gen, dtype, n, k, config):
    _check(gen, n, k, dtype, config, DEVICE)


def test_batch_row_input_and_preallocated_out(gen):
    weight = torch.randn((20, 64), generator=gen, device=gen.device).to(DEVICE)
    x = torch.randn((1, 64), generator=gen, device=gen.device).to(DEVICE)
    out = torch.empty((1, 20), device=DEVICE)
    got = gv.gemv_triton(x, weight, out=out, config=gv.GemvConfig(8, 64, 1))
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-5, rtol=1e-5)


def test_row_slice_of_a_larger_matrix(gen):
    # The speech head passes lm_head[row_start:], a view with the parent's row stride.
    weight = torch.randn((50, 64), generator=gen, device=gen.device).to(DEVICE)
    x = torch.randn((64,), generator=gen, device=gen.device).to(DEVICE)
    torch.testing.assert_close(gv.gemv_triton(x, weight[30:]), F.linear(x, weight[30:]), atol=1e-5, rtol=1e-5)


def test_default_config_avoids_k_masks_at_7b_shapes():
    for n, k in gv.LLAMA7B_SHAPES:
        assert k % gv.default_config(n, k).block_k == 0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="x must be"):
        gv.gemv_triton(torch.zeros(10), torch.zeros(4, 12))


def test_dispatcher_uses_torch_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(gv, "gemv_triton", boom)
    weight = torch.randn((20, 64), generator=gen, device=gen.device)
    x = torch.randn((64,), generator=gen, device=gen.device)
    assert torch.equal(gv.gemv(x, weight), F.linear(x, weight))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", gv.LLAMA7B_SHAPES)
def test_gpu_gemv_7b_shapes_bf16(gen, no_tf32, n, k):
    _check(gen, n, k, torch.bfloat16, None, "cuda")


@pytest.mark.gpu
def test_gpu_bench_gemv_runs(no_tf32, capsys):
    # Not a timing assertion: the benchmark runs, every row reports positive times and a winning config.
    rows = gv.bench_gemv(shapes=((4096, 4096),), configs=(gv.GemvConfig(), gv.GemvConfig(16, 256, 4)))
    assert rows and rows[0]["best_config"] is not None and rows[0]["torch_us"] > 0 and rows[0]["triton_us"] > 0
    assert set(rows[0]["us_per_config"]) == {str(gv.GemvConfig()), str(gv.GemvConfig(16, 256, 4))}
    assert "torch/triton" in capsys.readouterr().out


def test_shortlist_keeps_the_fastest_timed_configs_of_the_given_set():
    a, b, c, d = gv.GemvConfig(4, 512, 4), gv.GemvConfig(8, 512, 4), gv.GemvConfig(2, 1024, 4), gv.GemvConfig(16, 256, 8)
    times = {str(a): 30.0, str(b): 10.0, str(c): 20.0, str(d): 5.0}  # d is faster, but not in the given set
    assert gv.shortlist(times, (a, b, c), keep=2) == (b, c)
    assert gv.shortlist({}, (a, b)) == ()


@pytest.mark.parametrize("config", gv.AUTO_CONFIGS, ids=str)
def test_every_auto_config_is_correct(gen, config):
    """Whatever the engine's measurement picks must compute the same function (K not a multiple of BLOCK_K)."""
    _check(gen, 37, 1100, torch.float32, config, "cpu")
