"""The static-shape (padded bucket) prefill that CUDA graphs capture, run eagerly on the CPU in fp32: it must equal
the eager prefill (logits and the K/V of every valid position), never write pads onto a valid position, and the
engine's bucket chunking must give the eager engine's logits and tokens. The graph replay itself is in the GPU tier
(tests/test_engine_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from kernels.checkpoint import LlamaArch
from kernels.engine import PREFILL_BUCKETS, DecodeEngine, plan_prefill_chunks
from kernels.model import LlamaModel, LlamaWeights
from kernels.sampling import SamplingParams

MAX_SEQ = 64
SENTINEL = 3.0  # stale cache entries: finite, so a masked key contributes exactly nothing
# Grouped-query attention (2 query heads per KV head) covers the enable_gqa branch the tiny bundle does not.
GQA = LlamaArch(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=300)
GREEDY = SamplingParams(greedy=True, min_new_tokens=0, eos_id=-1)


@pytest.fixture(scope="module")
def weights(tiny_llm):
    _, arch, sd = tiny_llm
    return {
        "tiny_bundle": LlamaWeights.from_state_dict(arch, sd.__getitem__, torch.float32, "cpu"),
        "gqa_random": LlamaWeights.random(GQA, torch.float32, "cpu", seed=3),
    }


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, min(vocab, 32000), (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["tiny_bundle", "gqa_random"])
@pytest.mark.parametrize(
    "start, n_valid, bucket",
    [
        (0, 16, 16),  # a full bucket
        (0, 5, 16),
        (20, 1, 16),  # one token after an earlier prefill
        (13, 20, 32),
        (32, 10, 32),  # the bucket ends exactly at max_seq
        (48, 16, 16),  # full bucket ending at max_seq
    ],
)
def test_static_prefill_equals_eager(weights, one_torch_thread, kind, start, n_valid, bucket):
    w = weights[kind]
    vocab = w.arch.vocab_size
    prefix, chunk, pads = _ids(start, vocab, 1), _ids(n_valid, vocab, 2), _ids(bucket - n_valid, vocab, 3)

    ref = LlamaModel(w, max_seq=MAX_SEQ, unit_rows_start=None)
    if start:
        ref.prefill(prefix, 0)
    want = ref.prefill(chunk, start)

    got = LlamaModel(w, max_seq=MAX_SEQ, unit_rows_start=None)
    if start:
        got.prefill(prefix, 0)
    for t in (got.cache.k, got.cache.v):
        t[:, :, start:] = SENTINEL  # stale entries of an earlier, longer sequence
    before = [t[:, :, :start].clone() for t in (got.cache.k, got.cache.v)]
    start_t = torch.tensor([start])
    n_t = torch.tensor([n_valid])
    logits = torch.full((vocab,), float("nan"))
    out = got.prefill_static(torch.cat([chunk, pads]), start_t, n_t, logits)

    assert out is logits
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    assert int(start_t) == start + n_valid  # chained to the next chunk on the device
    end = start + n_valid
    for name, g, r, b in zip("kv", (got.cache.k, got.cache.v), (ref.cache.k, ref.cache.v), before):
        assert torch.equal(g[:, :, :start], b), f"{name}: the static prefill rewrote positions before start"
        # Fails if a pad (or the wrong token) landed on a valid position.
        torch.testing.assert_close(g[:, :, start:end], r[:, :, start:end], rtol=1e-5, atol=1e-5, msg=f"{name} cache")
        # Pads write only [end, start + bucket); everything after is untouched.
        assert (g[:, :, start + bucket :] == SENTINEL).all(), f"{name}: a write past the bucket"
        if n_valid < bucket:  # the pads did run, at their own positions
            assert (g[:, :, end : start + bucket] != SENTINEL).all()


def test_static_prefill_ignores_pad_ids(weights, one_torch_thread):
    """Valid outputs do not depend on the padding: two different pad fillings give identical logits."""
    w = weights["tiny_bundle"]
    chunk = _ids(7, w.arch.vocab_size, 4)
    outs = []
    for seed in (5, 6):
        m = LlamaModel(w, max_seq=MAX_SEQ, unit_rows_start=None)
        logits = torch.empty(w.arch.vocab_size)
        m.prefill_static(torch.cat([chunk, _ids(25, w.arch.vocab_size, seed)]), torch.tensor([4]), torch.tensor([7]), logits)
        outs.append(logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_plan_prefill_chunks():
    b = (16, 32, 64)
    assert plan_prefill_chunks(0, 16, b, 2048) == [(16, 16)]
    assert plan_prefill_chunks(0, 17, b, 2048) == [(32, 17)]
    assert plan_prefill_chunks(5, 1, b, 2048) == [(16, 1)]
    assert plan_prefill_chunks(0, 150, b, 2048) == [(64, 64), (64, 64), (32, 22)]
    # near the cache end a bucket is used only where it fits whole
    assert plan_prefill_chunks(2000, 40, b, 2048) == [(32, 32), (16, 8)]
    assert plan_prefill_chunks(1990, 50, b, 2048) == [(32, 32), (16, 16), (None, 2)]
    assert plan_prefill_chunks(2040, 8, b, 2048) == [(None, 8)]
    assert plan_prefill_chunks(2032, 16, b, 2048) == [(16, 16)]
    for start, n in ((0, 2048), (7, 1000), (1900, 148), (2047, 1)):
        plan = plan_prefill_chunks(start, n, b, 2048)
        assert sum(c for _, c in plan) == n
        pos = start
        for bucket, count in plan:
            assert bucket is None or (count <= bucket and pos + bucket <= 2048)
            pos += count
    with pytest.raises(ValueError, match="overflows"):
        plan_prefill_chunks(2040, 9, b, 2048)
    # Default buckets: pad freely up to 128 tokens or by <= 25%; otherwise fill the largest bucket first.
    d = PREFILL_BUCKETS
    assert plan_prefill_chunks(0, 70, d, 2048) == [(128, 70)]
    assert plan_prefill_chunks(0, 210, d, 2048) == [(256, 210)]
    assert plan_prefill_chunks(0, 200, d, 2048) == [(128, 128), (128, 72)]
    assert plan_prefill_chunks(0, 1000, d, 2048) == [(1024, 1000)]
    assert plan_prefill_chunks(0, 600, d, 2048) == [(512, 512), (128, 88)]
    assert plan_prefill_chunks(0, 300, d, 2048) == [(256, 256), (64, 44)]
    assert plan_prefill_chunks(0, 10, (256, 512), 2048) == [(256, 10)]  # nothing smaller: pad anyway


def _engine(w: LlamaWeights, bucketed: bool, **kw) -> DecodeEngine:
    # Prefill only (decodes run outside speech mode): no speech head, and no id opens a unit span.
    eng = DecodeEngine(w, prefill_buckets=(16, 32), unit_rows_start=None, unit_span_ids=(-1, -1), **kw)
    eng.prefill_bucketed = bucketed  # off CUDA the bucket path runs eagerly: same chunking, no capture
    return eng


def test_bucketed_engine_prefill_equals_eager(weights, one_torch_thread):
    w = weights["tiny_bundle"]
    prompt = _ids(75, w.arch.vocab_size, 7).tolist()  # chunks 32 + 32 + 11 (padded to 16)
    runs = []
    for bucketed in (False, True):
        eng = _engine(w, bucketed, max_seq=256)
        first = eng.prefill(prompt[:40])
        kept = first.clone()
        logits = eng.prefill(prompt[40:])
        torch.testing.assert_close(first, kept, rtol=0, atol=0)  # the returned logits are the caller's to keep
        assert eng.pos == len(prompt) and int(eng.pos_dev) == len(prompt)
        # implicit truncate: prefill again over the last 3 tokens after a speculative prefill
        eng.prefill(prompt[:5])
        again = eng.prefill(prompt[-3:], start_pos=len(prompt) - 3)
        tokens = list(eng.decode(GREEDY, max_new_tokens=12))
        runs.append((logits, again, tokens, eng.model.cache.k[:, :, : len(prompt)].clone()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[1][3], runs[0][3], rtol=1e-5, atol=1e-5)
    assert runs[1][2] == runs[0][2]


def test_bucketed_engine_at_the_cache_end(weights, one_torch_thread):
    """The last positions of the cache take the eager path (no bucket fits whole); the result is unchanged."""
    w = weights["tiny_bundle"]
    prompt = _ids(58, w.arch.vocab_size, 8).tolist()
    out = []
    for bucketed in (False, True):
        eng = _engine(w, bucketed, max_seq=60)
        eng.prefill(prompt[:10])
        out.append(eng.prefill(prompt[10:]))  # at 10: buckets 32 then 16, ending at 58
        eng.prefill(prompt[:55], start_pos=0)  # 32 + 16, then 7 tokens at 48 eagerly
        out.append(eng.prefill(prompt[55:]))  # at 55: no bucket fits, eager
        assert eng.pos == 58
    torch.testing.assert_close(out[2], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3], out[1], rtol=1e-5, atol=1e-5)


def test_static_prefill_reads_nothing_on_the_host():
    """A CUDA graph replays device work only: a host read of a device value (.item(), int(), a data-dependent
    shape) would freeze the captured value or break capture. On the meta device any such read raises, so running
    prefill_static there proves its torch-level code has none."""
    from kernels.model import LayerWeights

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    h, i, kv, v = GQA.hidden_size, GQA.intermediate_size, GQA.kv_dim, GQA.vocab_size
    layers = [LayerWeights(meta(h), meta(h + 2 * kv, h), meta(h, h), meta(h), meta(2 * i, h), meta(h, i)) for _ in range(2)]
    model = LlamaModel(LlamaWeights(GQA, meta(v, h), layers, meta(h), meta(v, h)), max_seq=MAX_SEQ, unit_rows_start=None)
    ids = torch.zeros(16, dtype=torch.long, device="meta")
    start, n_valid = torch.zeros(1, dtype=torch.long, device="meta"), torch.ones(1, dtype=torch.long, device="meta")
    logits = model.prefill_static(ids, start, n_valid, torch.empty(v, device="meta"))
    assert logits.shape == (v,)
    with pytest.raises(Exception, match="meta"):  # the probe itself works: a host read does raise there
        int(n_valid)
