"""Fused RMSNorm -> qkv GEMV -> RoPE -> KV write: the reference equals the unfused op-by-op path, the kernel equals
the reference under the dtype rule (fp64 reference, baseline = the reference run in the kernel's dtype)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import norm_qkv_rope as nq
from kernels.gemv import AUTO_CONFIGS, GemvConfig
from kernels.rmsnorm import rmsnorm_reference
from kernels.rope import rope_kv_write_reference, rope_tables
from kernel_rules import DEVICE, assert_dtype_rule


def _inputs(gen, h, hkv, d, k, s_max, dtype, device):
    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device=gen.device) * scale).to(device=device, dtype=dtype)

    hidden = rnd(1, k, scale=3.0)  # rms far from 1: the norm must matter
    norm_w = (1.0 + 0.2 * torch.randn(k, generator=gen, device=gen.device)).to(device=device, dtype=dtype)
    wqkv = rnd((h + 2 * hkv) * d, k, scale=k**-0.5)
    k_cache, v_cache = rnd(hkv, s_max, d), rnd(hkv, s_max, d)
    return hidden, norm_w, wqkv, k_cache, v_cache


def _check(gen, h, hkv, d, k, s_max, pos, dtype, config, device):
    hidden, norm_w, wqkv, k_cache, v_cache = _inputs(gen, h, hkv, d, k, s_max, dtype, device)
    cos, sin = rope_tables(d, s_max, device=device)
    pos_t = torch.tensor([pos], dtype=torch.int32, device=device)
    eps = 1e-6

    k_got, v_got = k_cache.clone(), v_cache.clone()
    q_out = torch.empty((h, d), dtype=dtype, device=device)
    q = nq.norm_qkv_rope_triton(hidden, norm_w, wqkv, eps, cos, sin, pos_t, k_got, v_got, q_out=q_out, config=config)
    assert q.data_ptr() == q_out.data_ptr()

    k_low, v_low = k_cache.clone(), v_cache.clone()
    q_low = nq.norm_qkv_rope_reference(hidden, norm_w, wqkv, eps, cos, sin, pos_t, k_low, v_low)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    q_ref = nq.norm_qkv_rope_reference(
        hidden.double(), norm_w.double(), wqkv.double(), eps, cos, sin, pos_t, k_ref, v_ref
    )
    what = f"norm_qkv_rope {dtype} H={h} Hkv={hkv} D={d} K={k} pos={pos} {config}"
    assert_dtype_rule(q, q_low, q_ref, what + " q")
    assert_dtype_rule(k_got[:, pos], k_low[:, pos], k_ref[:, pos], what + " k")
    assert_dtype_rule(v_got[:, pos], v_low[:, pos], v_ref[:, pos], what + " v")
    others = torch.arange(s_max, device=device) != pos
    assert torch.equal(k_got[:, others], k_cache[:, others]) and torch.equal(v_got[:, others], v_cache[:, others])


def test_reference_is_the_unfused_path(gen):
    h, hkv, d, k, s_max, pos = 4, 2, 32, 128, 9, 5
    hidden, norm_w, wqkv, k_cache, v_cache = _inputs(gen, h, hkv, d, k, s_max, torch.float32, "cpu")
    cos, sin = rope_tables(d, s_max)
    pos_t = torch.tensor([pos])
    k1, v1, k2, v2 = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    got = nq.norm_qkv_rope_reference(hidden, norm_w, wqkv, 1e-5, cos, sin, pos_t, k1, v1)
    qkv = F.linear(rmsnorm_reference(hidden, norm_w, 1e-5), wqkv)[0]
    q, kk, v = qkv.split([h * d, hkv * d, hkv * d])
    want = rope_kv_write_reference(q.view(h, d), kk.view(hkv, d), v.view(hkv, d), cos, sin, pos_t, k2, v2)
    assert torch.equal(got, want) and torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "h,hkv,d,k,s_max,pos,config",
    [
        (4, 4, 32, 256, 12, 0, GemvConfig(8, 128, 4)),  # position 0 (cos 1, sin 0)
        (4, 4, 32, 256, 12, 11, GemvConfig(2, 64, 1)),  # last cache row, one pair per program
        (4, 2, 64, 300, 20, 7, GemvConfig(16, 128, 4)),  # GQA; K not a multiple of BLOCK_K
        (2, 2, 48, 96, 5, 3, GemvConfig(8, 32, 2)),  # half = 24: not a power of two (PAIRS 4 divides it)
        (3, 1, 16, 40, 4, 2, None),  # default config; odd head counts
    ],
)
def test_kernel_matches_reference(gen, dtype, h, hkv, d, k, s_max, pos, config):
    _check(gen, h, hkv, d, k, s_max, pos, dtype, config, DEVICE)


def test_position_is_read_from_device_each_call(gen):
    # One set of buffers, the position changed in place (a CUDA-graph replay): each call writes its own row.
    h, hkv, d, k, s_max = 2, 2, 16, 64, 6
    _, norm_w, wqkv, k_cache, v_cache = _inputs(gen, h, hkv, d, k, s_max, torch.float32, DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cos, sin = rope_tables(d, s_max, device=DEVICE)
    pos = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    q_out = torch.empty((h, d), device=DEVICE)
    for p in range(s_max):
        pos.fill_(p)
        hidden = torch.randn((1, k), generator=gen, device=gen.device).to(DEVICE)
        nq.norm_qkv_rope_triton(hidden, norm_w, wqkv, 1e-5, cos, sin, pos, k_cache, v_cache, q_out=q_out)
        q_ref = nq.norm_qkv_rope_reference(hidden, norm_w, wqkv, 1e-5, cos, sin, pos, k_ref, v_ref)
        torch.testing.assert_close(q_out, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache, k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache, v_ref, atol=1e-5, rtol=1e-5)


def test_config_filter_and_bad_inputs():
    assert all(c.block_n % 2 == 0 and 64 % (c.block_n // 2) == 0 for c in nq.qkv_configs(AUTO_CONFIGS, 128))
    assert GemvConfig(1, 4096, 4) not in nq.qkv_configs(AUTO_CONFIGS, 128)
    assert nq.qkv_configs((GemvConfig(16, 64, 4),), 24) == ()  # 8 pairs do not tile 12
    d, k = 16, 32
    cos, sin = rope_tables(d, 4)
    cache = torch.zeros(1, 4, d)
    args = (torch.ones(k), torch.randn(4 * d, k), 1e-5, cos, sin, torch.tensor([0]), cache, cache.clone())
    with pytest.raises(ValueError, match="block_n"):
        nq.norm_qkv_rope_triton(torch.randn(1, k), *args, config=GemvConfig(6, 32, 1))
    with pytest.raises(ValueError, match="hidden must be one contiguous row"):
        nq.norm_qkv_rope_triton(torch.randn(2, k), *args)
    with pytest.raises(ValueError, match="pos"):
        nq.norm_qkv_rope_triton(torch.randn(1, k), *args[:5], torch.tensor([0.0]), *args[6:])
    with pytest.raises(ValueError, match="no q heads"):
        nq.norm_qkv_rope_triton(torch.randn(1, k), torch.ones(k), torch.randn(2 * d, k), 1e-5, cos, sin, torch.tensor([0]), cache, cache.clone())


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(nq, "norm_qkv_rope_triton", boom)
    h, hkv, d, k, s_max = 2, 1, 16, 32, 3
    hidden, norm_w, wqkv, k_cache, v_cache = _inputs(gen, h, hkv, d, k, s_max, torch.float32, "cpu")
    cos, sin = rope_tables(d, s_max)
    nq.norm_qkv_rope(hidden, norm_w, wqkv, 1e-5, cos, sin, torch.tensor([1]), k_cache, v_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("pos", [0, 1000, 2047])
def test_gpu_7b_shape_bf16(gen, no_tf32, pos):
    _check(gen, 32, 32, 128, 4096, 2048, pos, torch.bfloat16, None, "cuda")


@pytest.mark.gpu
def test_gpu_auto_configs_bf16(gen, no_tf32):
    for cfg in nq.qkv_configs(AUTO_CONFIGS, 128)[::3]:  # a spread (the engine checks every config it races)
        _check(gen, 4, 4, 128, 4096, 64, 17, torch.bfloat16, cfg, "cuda")
