"""RoPE: the reference equals transformers' LLaMA rotary code; the fused decode kernel (rotate q, rotate k, write
k/v into the cache at a device-resident position) equals the reference under the dtype rule."""

from __future__ import annotations


import pytest
import torch

from kernels import rope
from kernel_rules import DEVICE, assert_dtype_rule as _assert_dtype_rule


@pytest.mark.parametrize("head_dim,max_pos", [(64, 50), (128, 2048)])
def test_tables_match_hf_llama_rotary_embedding(head_dim, max_pos):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=max_pos)
    hf = LlamaRotaryEmbedding(config)
    positions = torch.arange(max_pos)[None]
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope.rope_tables(head_dim, max_pos)
    assert cos.shape == (max_pos, head_dim // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos[0], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_equals_hf_apply_rotary_pos_emb(gen, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t, h, d, max_pos = 5, 3, 64, 40
    cos, sin = rope.rope_tables(d, max_pos)
    positions = torch.randint(0, max_pos, (t,), generator=gen, device=gen.device)
    q = torch.randn((t, h, d), generator=gen, device=gen.device).to(dtype)
    k = torch.randn((t, h, d), generator=gen, device=gen.device).to(dtype)
    # HF layout: [B, H, S, D] activations, cos/sin [B, S, D] = cat(freqs, freqs) in the activation dtype.
    hf_cos = torch.cat((cos[positions], cos[positions]), -1)[None].to(dtype)
    hf_sin = torch.cat((sin[positions], sin[positions]), -1)[None].to(dtype)
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    assert torch.equal(rope.apply_rope_reference(q, cos, sin, positions), hf_q[0].transpose(0, 1))
    assert torch.equal(rope.apply_rope_reference(k, cos, sin, positions), hf_k[0].transpose(0, 1))


def _check_fused(
    gen: torch.Generator, h: int, hkv: int, d: int, s_max: int, pos: int, dtype: torch.dtype, device: str
) -> None:
    cos, sin = rope.rope_tables(d, s_max, device=device)
    q = torch.randn((h, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    k = torch.randn((hkv, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    v = torch.randn((hkv, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    k_cache = torch.randn((hkv, s_max, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    v_cache = torch.randn((hkv, s_max, d), generator=gen, device=gen.device).to(device=device, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    pos_t = torch.tensor([pos], dtype=torch.int32, device=device)
    q_out = torch.empty_like(q)

    got_q = rope.rope_kv_write_triton(q, k, v, cos, sin, pos_t, k_cache, v_cache, q_out=q_out)
    assert got_q.data_ptr() == q_out.data_ptr()

    positions = pos_t.long()
    ref_q = rope.apply_rope_reference(q.float()[None], cos, sin, positions)[0]
    ref_k = rope.apply_rope_reference(k.float()[None], cos, sin, positions)[0]
    torch_q = rope.apply_rope_reference(q[None], cos, sin, positions)[0]
    torch_k = rope.apply_rope_reference(k[None], cos, sin, positions)[0]
    what = f"rope {dtype} H={h} Hkv={hkv} D={d} pos={pos}"
    _assert_dtype_rule(got_q, torch_q, ref_q, what + " q")
    _assert_dtype_rule(k_cache[:, pos], torch_k, ref_k, what + " k")
    assert torch.equal(v_cache[:, pos], v)
    # Every other cache row is untouched.
    others = torch.ones(s_max, dtype=torch.bool, device=device)
    others[pos] = False
    assert torch.equal(k_cache[:, others], k_before[:, others])
    assert torch.equal(v_cache[:, others], v_before[:, others])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "h,hkv,d,s_max,pos",
    [
        (4, 4, 64, 40, 0),  # first position (cos 1, sin 0)
        (4, 4, 64, 40, 39),  # last cache row
        (4, 2, 32, 17, 9),  # GQA
        (2, 2, 96, 33, 20),  # half = 48: not a power of two
    ],
)
def test_fused_rope_kv_write_matches_reference(gen, dtype, h, hkv, d, s_max, pos):
    _check_fused(gen, h, hkv, d, s_max, pos, dtype, DEVICE)


def test_fused_reads_position_from_device_each_call(gen):
    # Same buffers, position changed in place (what a CUDA-graph replay does): each call writes its own row.
    h, d, s_max = 2, 32, 8
    cos, sin = rope.rope_tables(d, s_max, device=DEVICE)
    k_cache = torch.zeros((h, s_max, d), device=DEVICE)
    v_cache = torch.zeros((h, s_max, d), device=DEVICE)
    pos = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    q = torch.randn((h, d), generator=gen, device=gen.device).to(DEVICE)
    q_out = torch.empty_like(q)
    for p in range(s_max):
        pos.fill_(p)
        k = torch.randn((h, d), generator=gen, device=gen.device).to(DEVICE)
        v = torch.randn((h, d), generator=gen, device=gen.device).to(DEVICE)
        rope.rope_kv_write_triton(q, k, v, cos, sin, pos, k_cache, v_cache, q_out=q_out)
        ref_k = rope.apply_rope_reference(k[None], cos, sin, pos.long())[0]
        torch.testing.assert_close(k_cache[:, p], ref_k, atol=1e-5, rtol=1e-5)
        assert torch.equal(v_cache[:, p], v)
        torch.testing.assert_close(q_out, rope.apply_rope_reference(q[None], cos, sin, pos.long())[0])


def test_fused_accepts_views_of_a_fused_qkv_buffer(gen):
    # The engine's qkv GEMV output [3 * H * D] viewed as q/k/v heads: strided rows, contiguous last dim.
    h, d, s_max, pos = 4, 32, 10, 3
    qkv = torch.randn((3, h, d), generator=gen, device=gen.device).to(DEVICE)
    q, k, v = qkv[0], qkv[1], qkv[2]
    cos, sin = rope.rope_tables(d, s_max, device=DEVICE)
    caches = [torch.zeros((h, s_max, d), device=DEVICE) for _ in range(4)]
    pos_t = torch.tensor([pos], dtype=torch.int32, device=DEVICE)
    got = rope.rope_kv_write_triton(q, k, v, cos, sin, pos_t, caches[0], caches[1])
    ref = rope.rope_kv_write_reference(q.clone(), k.clone(), v.clone(), cos, sin, pos_t, caches[2], caches[3])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[0], caches[2], atol=1e-5, rtol=1e-5)
    assert torch.equal(caches[1], caches[3])


def test_bad_inputs_raise(gen):
    cos, sin = rope.rope_tables(32, 8)
    q = torch.randn(2, 32)
    cache = torch.zeros(2, 8, 32)
    with pytest.raises(ValueError, match="pos"):
        rope.rope_kv_write_triton(q, q, q, cos, sin, torch.tensor([1.0]), cache, cache.clone())
    with pytest.raises(ValueError, match="k_cache"):
        rope.rope_kv_write_triton(q, q, q, cos, sin, torch.tensor([1]), torch.zeros(2, 8, 16), cache)


def test_dispatcher_uses_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(rope, "rope_kv_write_triton", boom)
    h, d, s_max = 2, 32, 8
    cos, sin = rope.rope_tables(d, s_max)
    q, k, v = (torch.randn((h, d), generator=gen, device=gen.device) for _ in range(3))
    caches = [torch.zeros((h, s_max, d)) for _ in range(4)]
    pos = torch.tensor([5], dtype=torch.int32)
    got = rope.rope_kv_write(q, k, v, cos, sin, pos, caches[0], caches[1])
    ref = rope.rope_kv_write_reference(q, k, v, cos, sin, pos, caches[2], caches[3])
    assert torch.equal(got, ref) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


# ---------------------------------------------------------------------------------------------------------------
# GPU tier: LLaMA-7B shapes (H = 32, head 128, S_max = 2048) in bf16
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("pos", [0, 1, 1000, 2047])
def test_gpu_fused_rope_kv_write_7b_bf16(gen, pos):
    _check_fused(gen, 32, 32, 128, 2048, pos, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_tables_equal_hf_rotary_embedding_on_the_device():
    # HF computes the angles and cos/sin in its forward, on the device: the tables must be bit-identical there.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    old = torch.backends.cuda.matmul.allow_tf32  # some HF versions form the angles with a K=1 matmul
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=2048)
        hf = LlamaRotaryEmbedding(config).to("cuda")
        hf_cos, hf_sin = hf(torch.zeros(1, device="cuda"), torch.arange(2048, device="cuda")[None])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    cos, sin = rope.rope_tables(128, 2048, device="cuda")
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos[0], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin[0], atol=0, rtol=0)
