"""Batched decode attention over the slot KV cache: the Triton kernels (interpreter on the CPU) and the CPU path
against the row-by-row fp32 reference, over shapes, slot mixes and lengths."""

from __future__ import annotations

import pytest
import torch

from kernel_rules import DEVICE, assert_dtype_rule
from kernels import batched_attention as ba
from kernels.decode_attention import decode_attention_reference


def _lowp_rows(q, k_pool, v_pool, slots, lens):
    """Plain torch attention in the input dtype, row by row (the dtype rule's baseline)."""
    out = []
    for b, (s, n) in enumerate(zip(slots.tolist(), lens.tolist())):
        group = q.shape[1] // k_pool.shape[1]
        keys = k_pool[s, :, :n].repeat_interleave(group, dim=0)
        values = v_pool[s, :, :n].repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hld->hl", q[b], keys) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hl,hld->hd", torch.softmax(scores, dim=-1), values))
    return torch.stack(out)


CASES = [
    # B, H, Hkv, D, S_max, slots in the pool, num_splits, block_n
    (1, 4, 4, 32, 37, 2, 4, 8),
    (3, 4, 4, 32, 37, 5, 3, 8),  # chunk 13 is not a multiple of the block
    (4, 4, 2, 64, 50, 6, 5, 16),  # GQA
    (5, 2, 2, 48, 20, 5, 1, 16),  # head dim not a power of two; one split; every slot used
    (2, 4, 4, 32, 64, 3, None, 64),  # automatic num_splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_against_the_row_reference(case, dtype, gen):
    b, h, hkv, d, s_max, n_slots, splits, block_n = case
    q = torch.randn((b, h, d), generator=gen).to(DEVICE, dtype)
    k_pool = torch.randn((n_slots, hkv, s_max, d), generator=gen).to(DEVICE, dtype)
    v_pool = torch.randn((n_slots, hkv, s_max, d), generator=gen).to(DEVICE, dtype)
    slots = torch.randperm(n_slots, generator=gen)[:b].to(DEVICE, torch.int32)
    lens = torch.randint(1, s_max + 1, (b,), generator=gen)
    lens[0] = 1  # one valid position: every split but the first is empty
    if b > 1:
        lens[1] = s_max
    lens = lens.to(DEVICE, torch.int32)
    out = ba.batched_decode_attention_triton(q, k_pool, v_pool, slots, lens, num_splits=splits, block_n=block_n)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    ref = ba.batched_decode_attention_reference(q.float(), k_pool.float(), v_pool.float(), slots, lens)
    assert_dtype_rule(out, _lowp_rows(q, k_pool, v_pool, slots, lens), ref, f"batched attention {case} {dtype}")


def test_each_row_equals_batch1_attention_over_its_slot(gen):
    """The reference is the batch-1 reference over each row's slot (what a session computes alone), and the CPU path
    (torch SDPA per row) agrees with it; a row's output does not depend on the other rows."""
    q = torch.randn((4, 4, 16), generator=gen)
    k_pool, v_pool = torch.randn((6, 4, 40, 16), generator=gen), torch.randn((6, 4, 40, 16), generator=gen)
    slots, lens = torch.tensor([3, 0, 5, 1], dtype=torch.int32), torch.tensor([7, 40, 1, 22], dtype=torch.int32)
    ref = ba.batched_decode_attention_reference(q, k_pool, v_pool, slots, lens)
    for b in range(4):
        assert torch.equal(ref[b], decode_attention_reference(q[b], k_pool[int(slots[b])], v_pool[int(slots[b])], int(lens[b])))
    cpu = ba.batched_decode_attention_cpu(q, k_pool, v_pool, slots, lens)
    torch.testing.assert_close(cpu, ref, rtol=1e-5, atol=1e-6)
    alone = ba.batched_decode_attention_cpu(q[2:3], k_pool, v_pool, slots[2:3], lens[2:3])
    assert torch.equal(alone[0], cpu[2])


def test_bad_shapes_are_named():
    q = torch.zeros(2, 4, 8)
    pool = torch.zeros(3, 4, 10, 8)
    with pytest.raises(ValueError, match="slots must be an int tensor"):
        ba.batched_decode_attention(q, pool, pool, torch.zeros(3, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_pool / v_pool must be"):
        ba.batched_decode_attention(q, pool[0], pool[0], torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="not divisible"):
        ba.batched_decode_attention(torch.zeros(2, 3, 8), pool, pool, torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_at_7b_shapes_on_the_gpu(dtype, gen):
    """32 heads of 128 over 2048-position slots, 8 rows of mixed lengths (one of them a padded row's length 1)."""
    q = torch.randn((8, 32, 128), generator=gen, device="cuda").to(dtype)
    k_pool = torch.randn((9, 32, 2048, 128), generator=gen, device="cuda").to(dtype)
    v_pool = torch.randn((9, 32, 2048, 128), generator=gen, device="cuda").to(dtype)
    slots = torch.tensor([8, 0, 3, 5, 1, 7, 2, 6], dtype=torch.int32, device="cuda")
    lens = torch.tensor([1, 2048, 17, 300, 1024, 1025, 64, 1999], dtype=torch.int32, device="cuda")
    out = ba.batched_decode_attention_triton(q, k_pool, v_pool, slots, lens)
    ref = ba.batched_decode_attention_reference(q.float(), k_pool.float(), v_pool.float(), slots, lens)
    assert_dtype_rule(out, _lowp_rows(q, k_pool, v_pool, slots, lens), ref, f"batched attention 7B {dtype}")
