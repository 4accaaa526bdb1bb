"""Split-K decode attention: Triton (two stages, fp32 scratch) vs the fp32 softmax reference, under the dtype rule
(the low-precision baseline is plain torch attention computed in that dtype)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import decode_attention as da
from kernel_rules import DEVICE, assert_dtype_rule as _assert_dtype_rule


def _torch_lowp_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Plain torch attention with every op in the input dtype (the baseline of the dtype rule)."""
    h, d = q.shape
    group = h // k_cache.shape[0]
    keys = k_cache[:, :seq_len].repeat_interleave(group, dim=0)
    values = v_cache[:, :seq_len].repeat_interleave(group, dim=0)
    scores = torch.einsum("hd,hld->hl", q, keys) * (1.0 / math.sqrt(d))
    return torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), values)


def _inputs(gen: torch.Generator, h: int, hkv: int, d: int, s_max: int, dtype: torch.dtype, device: str):
    q = torch.randn((h, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    k_cache = torch.randn((hkv, s_max, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    v_cache = torch.randn((hkv, s_max, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    return q, k_cache, v_cache


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: int,
    num_splits: int | None,
    block_n: int,
    what: str,
) -> torch.Tensor:
    seq_len_t = torch.tensor([seq_len], dtype=torch.int32, device=q.device)
    out = da.decode_attention_triton(q, k_cache, v_cache, seq_len_t, num_splits=num_splits, block_n=block_n)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    ref = da.decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), seq_len)
    _assert_dtype_rule(out, _torch_lowp_attention(q, k_cache, v_cache, seq_len), ref, what)
    return out


CASES = [
    # h, hkv, d, s_max, seq_len, num_splits, block_n
    (4, 4, 32, 37, 1, 4, 8),  # one valid position: every split but the first is empty
    (4, 4, 32, 37, 37, 3, 8),  # seq_len = S_max; chunk 13 is not a multiple of the block
    (4, 4, 32, 37, 14, 3, 8),  # ends one past a split boundary
    (4, 2, 64, 50, 23, 5, 16),  # GQA; seq_len not a multiple of the block
    (2, 2, 48, 20, 20, 1, 16),  # head dim not a power of two; a single split
    (4, 4, 32, 64, 40, None, 64),  # automatic num_splits
    (2, 1, 32, 30, 30, 7, 4),  # more splits than needed: trailing splits empty at full length
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,hkv,d,s_max,seq_len,num_splits,block_n", CASES)
def test_decode_attention_matches_reference(gen, dtype, h, hkv, d, s_max, seq_len, num_splits, block_n):
    q, k_cache, v_cache = _inputs(gen, h, hkv, d, s_max, dtype, DEVICE)
    _check(q, k_cache, v_cache, seq_len, num_splits, block_n, f"{dtype} {h}/{hkv}x{d} S={s_max} L={seq_len}")


def test_empty_splits_write_the_neutral_element(gen):
    h, d, s_max, splits = 2, 32, 40, 4
    q, k_cache, v_cache = _inputs(gen, h, h, d, s_max, torch.float32, DEVICE)
    scratch = torch.full((h, splits, d + 2), float("nan"), device=DEVICE)  # stale garbage must be overwritten
    seq_len = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    out = da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=splits, scratch=scratch, block_n=8)
    empty = scratch[:, 1:]
    assert torch.all(empty[..., d] == float("-inf"))  # max
    assert torch.all(empty[..., d + 1] == 0)  # sum of exponentials
    assert torch.all(empty[..., :d] == 0)  # accumulator
    assert torch.isfinite(scratch[:, 0]).all()
    torch.testing.assert_close(out, da.decode_attention_reference(q, k_cache, v_cache, 3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,hkv,d,s_max,seq_len,num_splits,block_n", CASES)
def test_one_launch_equals_two_launches(gen, dtype, h, hkv, d, s_max, seq_len, num_splits, block_n):
    """The merge by the last-arriving split is the combine kernel's arithmetic over the same partials: identical
    output, and the arrival counters are back at zero for the next launch (checked by launching twice)."""
    q, k_cache, v_cache = _inputs(gen, h, hkv, d, s_max, dtype, DEVICE)
    seq_len_t = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
    two = da.decode_attention_triton(q, k_cache, v_cache, seq_len_t, num_splits=num_splits, block_n=block_n)
    counters = da.attention_counters(h, DEVICE)
    for _ in range(2):
        one = da.decode_attention_triton(q, k_cache, v_cache, seq_len_t, num_splits=num_splits, block_n=block_n,
                                         one_launch=True, counters=counters)
        assert torch.equal(one, two)
        assert counters.tolist() == [0] * h


def test_one_launch_skips_splits_past_the_context(gen):
    h, d, s_max, splits = 2, 32, 40, 4  # chunk 10
    q, k_cache, v_cache = _inputs(gen, h, h, d, s_max, torch.float32, DEVICE)
    scratch = torch.full((h, splits, d + 2), float("nan"), device=DEVICE)
    counters = da.attention_counters(h, DEVICE)
    seq_len = torch.tensor([13], dtype=torch.int32, device=DEVICE)  # two live splits
    out = da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=splits, scratch=scratch, block_n=8,
                                     one_launch=True, counters=counters)
    assert torch.isfinite(scratch[:, :2]).all() and torch.isnan(scratch[:, 2:]).all()  # dead splits wrote nothing
    torch.testing.assert_close(out, da.decode_attention_reference(q, k_cache, v_cache, 13), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="counters"):
        da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=splits, one_launch=True,
                                   counters=torch.zeros(h, dtype=torch.int64, device=DEVICE))


def test_l2_prefetch_takes_a_cuda_tensor_only(gen):
    q, k_cache, v_cache = _inputs(gen, 2, 2, 32, 8, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="prefetch must be a contiguous CUDA tensor, got cpu"):
        da.decode_attention_triton(q, k_cache, v_cache, torch.tensor([4], dtype=torch.int32), prefetch=torch.zeros(64, 64))


def test_preallocated_buffers_follow_the_device_seq_len(gen):
    # Graph-style use: same out/scratch/seq_len tensors, seq_len changed in place between launches.
    h, d, s_max = 2, 32, 24
    q, k_cache, v_cache = _inputs(gen, h, h, d, s_max, torch.float32, DEVICE)
    splits = da.choose_num_splits(h, s_max, DEVICE, block_n=8)
    scratch = da.decode_attention_scratch(h, d, splits, DEVICE)
    out = torch.empty_like(q)
    seq_len = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for length in (1, 9, 24, 5):
        seq_len.fill_(length)
        got = da.decode_attention_triton(
            q, k_cache, v_cache, seq_len, num_splits=splits, out=out, scratch=scratch, block_n=8
        )
        assert got.data_ptr() == out.data_ptr()
        ref = da.decode_attention_reference(q, k_cache, v_cache, length)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_choose_num_splits_fills_an_h100_at_full_context():
    splits = da.choose_num_splits(32, 2048, "cpu")  # planned for the nominal 132 SMs
    chunk = da.split_chunk(2048, splits)
    assert 32 * splits >= 132  # every SM busy
    assert chunk % 64 == 0 and chunk * splits >= 2048 and chunk * (splits - 1) < 2048  # no split wholly past S_max
    assert da.choose_num_splits(32, 64, "cpu") == 1  # short caches: one split


def test_reference_matches_sdpa(gen):
    q, k_cache, v_cache = _inputs(gen, 4, 4, 32, 20, torch.float32, "cpu")
    seq_len = 13
    expected = torch.nn.functional.scaled_dot_product_attention(
        q[:, None, None], k_cache[:, None, :seq_len], v_cache[:, None, :seq_len]
    )[:, 0, 0]
    torch.testing.assert_close(da.decode_attention_reference(q, k_cache, v_cache, seq_len), expected)


def test_bad_inputs_raise(gen):
    q, k_cache, v_cache = _inputs(gen, 3, 2, 32, 8, torch.float32, "cpu")
    seq_len = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="divisible"):
        da.decode_attention_triton(q, k_cache, v_cache, seq_len)
    q, k_cache, v_cache = _inputs(gen, 2, 2, 32, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="scratch"):
        da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=2, scratch=torch.empty(2, 3, 34))


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(da, "decode_attention_triton", boom)
    q, k_cache, v_cache = _inputs(gen, 2, 2, 32, 8, torch.float16, "cpu")
    got = da.decode_attention(q, k_cache, v_cache, torch.tensor([5], dtype=torch.int32))
    expected = da.decode_attention_reference(q, k_cache, v_cache, 5).to(torch.float16)
    assert got.dtype == torch.float16 and torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------
# GPU tier: LLaMA-7B (H = 32, head 128, S_max = 2048) in bf16
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("hkv", [32, 8])
def test_gpu_decode_attention_7b_bf16(gen, no_tf32, hkv):
    q, k_cache, v_cache = _inputs(gen, 32, hkv, 128, 2048, torch.bfloat16, "cuda")
    for seq_len in (1, 7, 64, 1000, 2047, 2048):
        _check(q, k_cache, v_cache, seq_len, None, 64, f"bf16 32/{hkv}x128 L={seq_len}")


@pytest.mark.gpu
@pytest.mark.parametrize("one_launch", [False, pytest.param(True, marks=pytest.mark.launch_trick)])
def test_gpu_decode_attention_in_a_cuda_graph(gen, no_tf32, one_launch):
    h, d, s_max = 32, 128, 2048
    q, k_cache, v_cache = _inputs(gen, h, h, d, s_max, torch.bfloat16, "cuda")
    splits = da.choose_num_splits(h, s_max, "cuda")
    scratch = da.decode_attention_scratch(h, d, splits, "cuda")
    counters = da.attention_counters(h, "cuda")
    out = torch.empty_like(q)
    seq_len = torch.tensor([1], dtype=torch.int32, device="cuda")

    def launch() -> None:
        da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=splits, out=out, scratch=scratch,
                                   one_launch=one_launch, counters=counters)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch()
    for length in (1, 300, 2048, 17):
        seq_len.fill_(length)
        graph.replay()
        torch.cuda.synchronize()
        ref = da.decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), length)
        _assert_dtype_rule(out, _torch_lowp_attention(q, k_cache, v_cache, length), ref, f"graph L={length}")
    assert counters.eq(0).all()


@pytest.mark.gpu
@pytest.mark.launch_trick
def test_gpu_one_launch_attention_is_race_free_under_repetition(gen):
    """The arrival counter is the one-launch kernel's only synchronisation: a missing release/acquire shows up as
    a merge that read a stale partial, i.e. an output that differs from the two-launch kernel's (identical
    arithmetic) on some of many launches. 7B shape, every live-split count from 1 to 32."""
    h, d, s_max = 32, 128, 2048
    q, k_cache, v_cache = _inputs(gen, h, h, d, s_max, torch.bfloat16, "cuda")
    splits = da.choose_num_splits(h, s_max, "cuda")
    counters = da.attention_counters(h, "cuda")
    seq_len = torch.zeros(1, dtype=torch.int32, device="cuda")
    chunk = da.split_chunk(s_max, splits)
    mismatches = []
    for live in range(1, splits + 1):
        seq_len.fill_((live - 1) * chunk + 1 + (live * 37) % chunk)
        two = da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=splits)
        for rep in range(20):
            one = da.decode_attention_triton(q, k_cache, v_cache, seq_len, num_splits=splits, one_launch=True, counters=counters)
            if not torch.equal(one, two):  # the size tells a race (large) from a compiler's rounding (tiny)
                mismatches.append((live, rep, float((one.float() - two.float()).abs().max())))
    torch.cuda.synchronize()
    assert not mismatches, f"one-launch output differed from two-launch at (live splits, repetition, max |diff|) {mismatches[:10]}"
    assert counters.eq(0).all()


@pytest.mark.gpu
@pytest.mark.launch_trick
@pytest.mark.parametrize("one_launch", [False, True])
def test_gpu_l2_prefetch_changes_nothing_but_timing(gen, one_launch):
    """The bulk L2 prefetch of the next weight matrix (Hopper) is a hint: outputs are bit-identical with and without
    it, at every live-split count, and the prefetched tensor is untouched."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the bulk L2 prefetch needs compute capability 9.0+")
    h, d, s_max = 32, 128, 2048
    q, k_cache, v_cache = _inputs(gen, h, h, d, s_max, torch.bfloat16, "cuda")
    wo = torch.randn(4096, 4096, device="cuda").to(torch.bfloat16)
    before = wo.clone()
    seq_len = torch.zeros(1, dtype=torch.int32, device="cuda")
    for length in (1, 64, 65, 700, 2048):
        seq_len.fill_(length)
        plain = da.decode_attention_triton(q, k_cache, v_cache, seq_len, one_launch=one_launch)
        hinted = da.decode_attention_triton(q, k_cache, v_cache, seq_len, one_launch=one_launch, prefetch=wo)
        assert torch.equal(plain, hinted), length
    assert torch.equal(wo, before)
