"""SpeechGPT sampling: the reference equals transformers' processors (HF 4.33 order); the fused Triton sampler keeps
exactly the reference's token set with the same renormalised probabilities, bans EOS on the device counter, advances
its RNG state on the device, and draws with the reference distribution (chi-square, fixed seed)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import sampling as smp
from kernels.sampling import SamplerState, SamplingParams
from kernel_rules import DEVICE


def _state(seed: int = 0, num_generated: int = 0, device: str = DEVICE) -> SamplerState:
    return SamplerState.create(device, seed=seed, num_generated=num_generated)


def _reference_kept(logits: torch.Tensor, params: SamplingParams, num_generated: int, vocab_offset: int = 0):
    scores = smp.filter_logits_reference(logits.float().cpu(), params, num_generated, vocab_offset)
    ids = torch.isfinite(scores).nonzero().flatten()
    return ids, torch.softmax(scores, dim=-1)


def _assert_kept_equal(
    debug: smp.SampleDebug,
    logits: torch.Tensor,
    params: SamplingParams,
    num_generated: int,
    vocab_offset: int = 0,
    exact_ids: bool = True,
) -> None:
    """exact_ids: the kept id sets are equal (continuous logits). Otherwise (bf16/fp16 logits tie) the kept values
    and probabilities are equal as multisets, and every kept id strictly above the smallest kept value matches."""
    ref_ids, ref_probs = _reference_kept(logits, params, num_generated, vocab_offset)
    got_ids = debug.kept_ids.cpu() - vocab_offset
    got_probs = debug.kept_probs.cpu()
    assert len(got_ids) == len(ref_ids), f"kept {len(got_ids)} tokens, reference keeps {len(ref_ids)}"
    assert torch.all(got_probs[1:] <= got_probs[:-1]), "kept tokens must come most likely first"
    torch.testing.assert_close(got_probs.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    values = logits.float().cpu()
    if exact_ids:
        assert sorted(got_ids.tolist()) == sorted(ref_ids.tolist())
        torch.testing.assert_close(got_probs, ref_probs[got_ids], atol=1e-5, rtol=0)
    else:
        assert torch.equal(values[got_ids].sort().values, values[ref_ids].sort().values)
        torch.testing.assert_close(got_probs.sort().values, ref_probs[ref_ids].sort().values, atol=1e-5, rtol=0)
        floor = values[ref_ids].min()
        assert set(got_ids[values[got_ids] > floor].tolist()) == set(ref_ids[values[ref_ids] > floor].tolist())
    tokens = debug.tokens.cpu() - vocab_offset
    if exact_ids:
        assert set(tokens.tolist()) <= set(ref_ids.tolist()), "drew a token outside the kept set"
    else:
        assert set(values[tokens].tolist()) <= set(values[ref_ids].tolist()), "drew a value outside the kept set"


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=gen, device=gen.device))


def _chi2_critical(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.719: p = 1e-4)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


# ---------------------------------------------------------------------------------------------------------------
# reference == transformers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_generated", [0, 9, 10, 25])
def test_reference_matches_transformers_processors(gen, num_generated):
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    params = SamplingParams()
    prompt_len = 7
    input_ids = torch.zeros((1, prompt_len + num_generated), dtype=torch.long)
    processors = [
        MinNewTokensLengthLogitsProcessor(prompt_len, params.min_new_tokens, params.eos_id),
        TemperatureLogitsWarper(params.temperature),
        TopKLogitsWarper(params.top_k),
        TopPLogitsWarper(params.top_p),
    ]
    for _ in range(4):
        logits = 3.0 * torch.randn((1006,), generator=gen, device=gen.device)
        logits[params.eos_id] = logits.max() + 1.0  # EOS on top: the ban matters
        scores = logits[None].clone()
        for proc in processors:
            scores = proc(input_ids, scores)
        assert torch.equal(smp.filter_logits_reference(logits, params, num_generated), scores[0])


def test_reference_greedy_and_sampling(gen):
    logits = torch.randn((257,), generator=gen, device=gen.device)
    logits[2] = 10.0
    greedy = SamplingParams(greedy=True)
    assert smp.sample_reference(logits, greedy, 0) != 2  # banned
    assert smp.sample_reference(logits, greedy, 10) == 2
    ids, _ = _reference_kept(logits, SamplingParams(), 3)
    g = torch.Generator().manual_seed(0)
    assert all(smp.sample_reference(logits, SamplingParams(), 3, g) in ids.tolist() for _ in range(20))


# ---------------------------------------------------------------------------------------------------------------
# fused sampler: kept set and probabilities
# ---------------------------------------------------------------------------------------------------------------

KEPT_CASES = [
    # vocab, block_v, logit scale, params, num_generated
    (257, None, 3.0, SamplingParams(), 0),
    (257, 64, 3.0, SamplingParams(), 12),  # 5 programs: merged candidates
    (1006, 256, 2.0, SamplingParams(), 3),
    (1006, None, 1.0, SamplingParams(temperature=1.3, top_k=64, top_p=0.95), 11),  # K_MAX = top_k
    (1006, 128, 0.02, SamplingParams(top_k=8, top_p=1.0), 20),  # top-p keeps all k
    (1006, 256, 0.02, SamplingParams(top_k=8, top_p=0.999), 20),  # flat: the HF rule keeps all k
    (257, None, 3.0, SamplingParams(top_p=0.01), 20),  # top-p keeps only the largest
    (257, 64, 3.0, SamplingParams(top_p=1e-9), 20),  # cut rounds to 1.0: only HF's always-keep saves the largest
    (257, 64, 3.0, SamplingParams(top_k=1), 20),  # top-k = 1
    (300, 64, 3.0, SamplingParams(temperature=1.0, top_k=20, top_p=0.5), 20),
    (40, None, 3.0, SamplingParams(), 20),  # fewer tokens than top_k
]


@pytest.mark.parametrize(
    "vocab,block_v,scale,params,num_generated", KEPT_CASES, ids=[str(i) for i in range(len(KEPT_CASES))]
)
def test_kept_set_and_probs_match_reference(gen, vocab, block_v, scale, params, num_generated):
    for _ in range(2):  # two fresh logit vectors per case
        logits = (scale * torch.randn((vocab,), generator=gen, device=gen.device)).to(DEVICE)
        state = _state(seed=_seed(gen), num_generated=num_generated)
        debug = smp.sample_triton_debug(logits, params, state, block_v=block_v)
        _assert_kept_equal(debug, logits, params, num_generated)
        if params.top_p == 1.0 or params.top_p == 0.999:
            assert len(debug.kept_ids) == params.top_k
        if params.top_p <= 0.01 or params.top_k == 1:
            assert debug.kept_ids.tolist() == [int(torch.argmax(logits))]


@pytest.mark.parametrize("block_v", [64, None])
def test_fp16_logits_with_ties(gen, block_v):
    params = SamplingParams()
    for _ in range(3):
        logits = 3.0 * torch.randn((1006,), generator=gen, device=gen.device)
        logits = logits.round(decimals=1).to(device=DEVICE, dtype=torch.float16)  # one decimal: many ties
        debug = smp.sample_triton_debug(logits, params, _state(num_generated=20), block_v=block_v)
        _assert_kept_equal(debug, logits, params, 20, exact_ids=False)


def test_top_k_ties_at_the_kth_value_are_kept(gen):
    # HF keeps every token equal to the k-th largest value; so does the fused sampler (up to K_MAX).
    logits = torch.randn((257,), generator=gen, device=gen.device) - 5.0
    logits[[3, 50, 77, 200]] = 4.0
    logits[[10, 11, 120]] = 2.0  # the 5th..7th largest tie at the k-th value for k = 5
    params = SamplingParams(temperature=1.0, top_k=5, top_p=1.0)
    debug = smp.sample_triton_debug(logits.to(DEVICE), params, _state(num_generated=20), block_v=64)
    assert sorted(debug.kept_ids.tolist()) == [3, 10, 11, 50, 77, 120, 200]
    _assert_kept_equal(debug, logits, params, 20)


def test_speech_slice_uses_vocab_offset(gen):
    # Logits for rows [32000, 33006) only: ids come back global, EOS (2) is outside the slice and never banned.
    base = 32000
    params = SamplingParams()
    logits = 3.0 * torch.randn((1006,), generator=gen, device=gen.device)
    logits[2] = logits.max() + 2.0  # local 2 is unit <2> (id 32002), not EOS: must stay legal
    state = _state(num_generated=0)
    debug = smp.sample_triton_debug(logits.to(DEVICE), params, state, vocab_offset=base, block_v=256)
    _assert_kept_equal(debug, logits, params, 0, vocab_offset=base)
    assert debug.kept_ids[0].item() == base + 2
    # An EOS inside the slice (e.g. <eosp> = 33001 used as a stop id) is banned at its local index.
    eosp = SamplingParams(eos_id=33001)
    logits[1001] = logits.max() + 2.0
    debug = smp.sample_triton_debug(logits.to(DEVICE), eosp, _state(num_generated=0), vocab_offset=base)
    assert 33001 not in debug.kept_ids.tolist()
    _assert_kept_equal(debug, logits, eosp, 0, vocab_offset=base)
    debug = smp.sample_triton_debug(logits.to(DEVICE), eosp, _state(num_generated=10), vocab_offset=base)
    assert debug.kept_ids[0].item() == 33001


# ---------------------------------------------------------------------------------------------------------------
# fused sampler: EOS ban and device state
# ---------------------------------------------------------------------------------------------------------------


def test_eos_banned_until_min_new_tokens_then_allowed(gen):
    params = SamplingParams()
    logits = 3.0 * torch.randn((257,), generator=gen, device=gen.device)
    logits[params.eos_id] = logits.max() + 3.0  # EOS dominates when legal
    logits = logits.to(DEVICE)
    state = _state(seed=7, num_generated=0)
    for step in range(12):
        assert int(state.num_generated.item()) == step
        debug = smp.sample_triton_debug(logits, params, state)
        _assert_kept_equal(debug, logits, params, step)
        if step < params.min_new_tokens:
            assert params.eos_id not in debug.kept_ids.tolist()
            assert int(state.token_out.item()) != params.eos_id
        else:
            assert debug.kept_ids[0].item() == params.eos_id


def test_greedy_params_apply_the_eos_ban(gen):
    logits = torch.randn((1006,), generator=gen, device=gen.device)
    logits[2] = 50.0
    state = _state(num_generated=0)
    greedy = SamplingParams(greedy=True)
    token = smp.sample_triton(logits.to(DEVICE), greedy, state, block_v=256)
    banned = logits.clone()
    banned[2] = float("-inf")
    assert int(token.item()) == int(torch.argmax(banned))
    state.reset(num_generated=10)
    assert int(smp.sample_triton(logits.to(DEVICE), greedy, state).item()) == 2


def test_state_counters_advance_every_call(gen):
    logits = (3.0 * torch.randn((257,), generator=gen, device=gen.device)).to(DEVICE)
    state = SamplerState.create(DEVICE, seed=3, num_generated=5, offset=100)
    kept, _ = _reference_kept(logits, SamplingParams(), 5)
    for i in range(3):
        token = smp.sample_triton(logits, SamplingParams(), state)
        assert token.data_ptr() == state.token_out.data_ptr()
        assert int(state.num_generated.item()) == 6 + i
        assert int(state.offset.item()) == 101 + i
        assert int(token.item()) in kept.tolist()
    smp.sample_triton_debug(logits, SamplingParams(), state, num_draws=8)
    assert int(state.num_generated.item()) == 9 and int(state.offset.item()) == 111


def test_same_seed_and_offset_give_the_same_draw_and_batches_equal_single_calls(gen):
    # Flat logits: many kept tokens, so successive draws differ.
    logits = (0.3 * torch.randn((257,), generator=gen, device=gen.device)).to(DEVICE)
    params = SamplingParams(min_new_tokens=0)
    singles = []
    state = SamplerState.create(DEVICE, seed=1234, offset=40)
    for _ in range(8):
        singles.append(int(smp.sample_triton(logits, params, state).item()))
    again = SamplerState.create(DEVICE, seed=1234, offset=40)
    assert int(smp.sample_triton(logits, params, again).item()) == singles[0]
    batch = smp.sample_triton_debug(logits, params, SamplerState.create(DEVICE, seed=1234, offset=40), num_draws=8)
    assert batch.tokens.tolist() == singles
    assert len(set(singles)) > 1, "the offset must advance the random stream"
    other_seed = smp.sample_triton_debug(logits, params, SamplerState.create(DEVICE, seed=99, offset=40), num_draws=8)
    assert other_seed.tokens.tolist() != singles


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_draws_follow_the_reference_distribution(gen, top_p):
    # A handful of likely tokens so every bin is well filled; chi-square against the reference probabilities.
    vocab = 257
    logits = torch.randn((vocab,), generator=gen, device=gen.device) * 0.3 - 6.0
    likely = torch.randperm(vocab, generator=gen, device=gen.device)[:6]
    logits[likely] = torch.tensor([2.0, 1.7, 1.5, 1.2, 1.0, 0.6])
    params = SamplingParams(top_k=6, top_p=top_p)
    ref_ids, ref_probs = _reference_kept(logits, params, 20)
    n_draws, per_call = (4096, 4096) if DEVICE == "cpu" else (4096, 256)
    state = SamplerState.create(DEVICE, seed=2024, num_generated=20)
    tokens = torch.cat(
        [smp.sample_triton_debug(logits.to(DEVICE), params, state, num_draws=per_call).tokens.cpu()
         for _ in range(n_draws // per_call)]
    )
    assert set(tokens.tolist()) <= set(ref_ids.tolist())
    counts = torch.bincount(tokens, minlength=vocab)[ref_ids].double()
    expected = ref_probs[ref_ids].double() * n_draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(ref_ids) - 1
    assert chi2 < _chi2_critical(dof), f"chi2 {chi2:.1f} with {dof} dof; counts {counts.tolist()}"


# ---------------------------------------------------------------------------------------------------------------
# greedy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab,block_v", [(257, 64), (1006, 4096), (5000, 1024)])
def test_greedy_triton_is_torch_argmax(gen, dtype, vocab, block_v):
    token = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for case in range(3):
        logits = torch.randn((vocab,), generator=gen, device=gen.device)
        if case == 1:  # ties: torch.argmax returns the first index
            top = torch.randperm(vocab, generator=gen, device=gen.device)[:3]
            logits[top] = logits.max() + 1.0
        if case == 2:
            logits[:] = float("-inf")
            logits[vocab - 1] = 0.0
        logits = logits.to(device=DEVICE, dtype=dtype)
        smp.greedy_triton(logits, token, block_v=block_v)
        assert int(token.item()) == int(torch.argmax(logits.cpu()))
        smp.greedy_triton(logits, token, vocab_offset=32000, block_v=block_v)
        assert int(token.item()) == int(torch.argmax(logits.cpu())) + 32000


# ---------------------------------------------------------------------------------------------------------------
# validation and dispatch
# ---------------------------------------------------------------------------------------------------------------


def test_invalid_parameters_raise():
    logits = torch.zeros(100, device=DEVICE)
    with pytest.raises(ValueError, match="top_k"):
        smp.sample_triton(logits, SamplingParams(top_k=smp.K_MAX + 1), _state())
    with pytest.raises(ValueError, match="top_k"):
        smp.sample_triton(logits, SamplingParams(top_k=0), _state())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    wrong_counter = SamplerState(
        num_generated=torch.zeros(1, dtype=torch.int64, device=DEVICE),  # must be int32
        seed=torch.zeros(1, dtype=torch.int64, device=DEVICE),
        offset=torch.zeros(1, dtype=torch.int64, device=DEVICE),
        token_out=torch.zeros(1, dtype=torch.int64, device=DEVICE),
    )
    with pytest.raises(ValueError, match="num_generated"):
        smp.sample_triton(logits, SamplingParams(), wrong_counter)


def test_dispatchers_use_the_reference_on_cpu(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the CPU path must not launch Triton")

    monkeypatch.setattr(smp, "sample_triton", boom)
    monkeypatch.setattr(smp, "greedy_triton", boom)
    logits = 3.0 * torch.randn((257,), generator=gen, device=gen.device)
    state = SamplerState.create("cpu", seed=5, num_generated=4)
    token = smp.sample(logits, SamplingParams(), state)
    kept, _ = _reference_kept(logits, SamplingParams(), 4)
    assert int(token.item()) in kept.tolist()
    assert int(state.num_generated.item()) == 5 and int(state.offset.item()) == 1
    out = torch.zeros(1, dtype=torch.int64)
    assert int(smp.greedy(logits, out, vocab_offset=10).item()) == int(torch.argmax(logits)) + 10


# ---------------------------------------------------------------------------------------------------------------
# CPU draws: sample_host (HF's draw without the full sort) and sample_kept (the same distribution, fewer numbers)
# ---------------------------------------------------------------------------------------------------------------

CPU_CASES = [
    SamplingParams(),  # SpeechGPT's settings
    SamplingParams(top_p=1.0),
    SamplingParams(top_k=5, top_p=0.5, temperature=1.0),
    SamplingParams(top_k=0),  # no top-k: the reference runs
    SamplingParams(greedy=True),
]


def _cpu_logits(gen: torch.Generator, case: int, vocab: int = 33006) -> torch.Tensor:
    logits = torch.randn((vocab,), generator=gen) * (1 + case % 4)
    if case % 3 == 0:
        logits = logits.bfloat16().float()  # ties, the top-p cut among them included
    if case % 5 == 0:
        logits[: vocab - 1006] = float("-inf")  # the speech head's masked text rows
    if case % 7 == 0:
        logits[2] = logits.max() + 1.0  # EOS on top: the min-new-tokens ban decides
    return logits


@pytest.mark.parametrize("params", CPU_CASES, ids=["speechgpt", "no_top_p", "k5_p05", "no_top_k", "greedy"])
def test_sample_host_is_the_reference_draw_bit_for_bit(gen, params):
    """Same token and the same generator state afterwards as sample_reference (HF's multinomial), on fresh logits
    with and without ties, masked rows and a banned EOS."""
    for case in range(12):
        logits = _cpu_logits(gen, case)
        seed = _seed(gen)
        g_ref, g_host = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for num_generated in (case, 20):
            want = smp.sample_reference(logits, params, num_generated, g_ref)
            assert smp.sample_host(logits, params, num_generated, g_host) == want, (case, num_generated)
        assert torch.equal(g_ref.get_state(), g_host.get_state())


@pytest.mark.parametrize("params", CPU_CASES[:3], ids=["speechgpt", "no_top_p", "k5_p05"])
def test_kept_distribution_is_the_reference_one(gen, params):
    """The kept set equals the reference's, probabilities within 1e-6 (float64 on the top-k vs HF's fp32 over V), on
    fresh continuous logits (a bf16 tie at the k-th value returns None: the caller falls back to HF's draw)."""
    for case in range(8):
        logits = torch.randn((33006,), generator=gen) * (1 + case % 4)
        num_generated = 3 if case % 2 else 20
        logits[2] = logits.max() + 0.5  # EOS on top: banned below min_new_tokens
        ids, probs = smp.kept_distribution(logits, params, num_generated)
        ref_ids, ref_probs = _reference_kept(logits, params, num_generated)
        assert sorted(ids.tolist()) == sorted(ref_ids.tolist()), case
        torch.testing.assert_close(torch.tensor(probs, dtype=torch.float64), ref_probs[ids].double(), atol=1e-6, rtol=0)
    tied = torch.zeros(33006)
    tied[:60] = 1.0  # 60 tokens tie at the 50th value
    assert smp.kept_distribution(tied, SamplingParams(), 20) is None
    assert smp.kept_distribution(tied, SamplingParams(greedy=True), 20) is None


def test_sample_kept_draws_follow_the_reference_distribution(gen):
    """The exponential race over the kept tokens against the reference probabilities (chi-square, fixed seed), and
    the CPU dispatcher draws that way with cpu_draw="kept"."""
    vocab = 257
    logits = torch.randn((vocab,), generator=gen) * 0.3 - 6.0
    likely = torch.randperm(vocab, generator=gen)[:6]
    logits[likely] = torch.tensor([2.0, 1.7, 1.5, 1.2, 1.0, 0.6])
    params = SamplingParams(top_k=6, top_p=0.9)
    ref_ids, ref_probs = _reference_kept(logits, params, 20)
    g = torch.Generator().manual_seed(2024)
    n_draws = 4096
    tokens = torch.tensor([smp.sample_kept(logits, params, 20, g) for _ in range(n_draws)])
    assert set(tokens.tolist()) <= set(ref_ids.tolist())
    counts = torch.bincount(tokens, minlength=vocab)[ref_ids].double()
    expected = ref_probs[ref_ids].double() * n_draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < _chi2_critical(len(ref_ids) - 1), f"chi2 {chi2:.1f}; counts {counts.tolist()}"
    state = SamplerState.create("cpu", num_generated=20)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert int(smp.sample(logits, params, state, generator=g1, cpu_draw="kept")) == smp.sample_kept(logits, params, 20, g2)
    with pytest.raises(ValueError, match="cpu_draw must be one of hf, kept"):
        smp.sample(logits, params, state, cpu_draw="fast")


# ---------------------------------------------------------------------------------------------------------------
# GPU tier: full SpeechGPT vocabulary (33006) in bf16, CUDA graphs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("num_generated", [0, 10])
def test_gpu_full_vocab_bf16_matches_reference(gen, num_generated):
    params = SamplingParams()
    for _ in range(4):
        logits = (2.5 * torch.randn((33006,), generator=gen, device=gen.device)).to(torch.bfloat16)
        logits[params.eos_id] = logits.max()  # EOS among the candidates: the ban changes the top-k
        state = _state(seed=_seed(gen), num_generated=num_generated, device="cuda")
        debug = smp.sample_triton_debug(logits, params, state)
        _assert_kept_equal(debug, logits, params, num_generated, exact_ids=False)
        assert int(state.num_generated.item()) == num_generated + 1
        # The speech-mode slice of the same logits (rows 32000..33005, global ids).
        speech = logits[32000:].contiguous()
        speech_state = _state(num_generated=num_generated, device="cuda")
        debug = smp.sample_triton_debug(speech, params, speech_state, vocab_offset=32000)
        _assert_kept_equal(debug, speech, params, num_generated, vocab_offset=32000, exact_ids=False)


@pytest.mark.gpu
def test_gpu_full_vocab_fp32_exact_sets(gen):
    params = SamplingParams()
    for _ in range(4):
        logits = 2.5 * torch.randn((33006,), generator=gen, device=gen.device)
        debug = smp.sample_triton_debug(logits, params, _state(num_generated=20, device="cuda"))
        _assert_kept_equal(debug, logits, params, 20, exact_ids=True)


@pytest.mark.gpu
def test_gpu_greedy_bf16_full_vocab(gen):
    token = torch.zeros(1, dtype=torch.int64, device="cuda")
    for _ in range(4):
        # bf16 logits tie often: torch.argmax and the fused sampler both return the first index.
        logits = (2.5 * torch.randn((33006,), generator=gen, device=gen.device)).to(torch.bfloat16)
        smp.greedy_triton(logits, token)
        assert int(token.item()) == int(torch.argmax(logits))
        state = _state(num_generated=20, device="cuda")
        smp.sample_triton(logits, SamplingParams(greedy=True), state)
        assert int(state.token_out.item()) == int(torch.argmax(logits))


@pytest.mark.gpu
def test_gpu_sample_triton_in_a_cuda_graph(gen):
    vocab = 33006
    params = SamplingParams()
    logits = (0.5 * torch.randn((vocab,), generator=gen, device=gen.device)).to(torch.bfloat16)
    logits[params.eos_id] = -30.0  # keeps the kept set independent of the EOS ban across replays
    state = SamplerState.create("cuda", seed=1234)
    scratch = smp.sampling_scratch(vocab, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        smp.sample_triton(logits, params, state, scratch=scratch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        smp.sample_triton(logits, params, state, scratch=scratch)
    n0, off0 = int(state.num_generated.item()), int(state.offset.item())
    replays = 32
    drawn = []
    for _ in range(replays):
        graph.replay()
        drawn.append(int(state.token_out.item()))
    assert int(state.num_generated.item()) == n0 + replays
    assert int(state.offset.item()) == off0 + replays
    assert len(set(drawn)) > 1, "graph replays must draw fresh random numbers"
    kept, _ = _reference_kept(logits, params, 20)
    values = logits.float().cpu()
    assert set(values[drawn].tolist()) <= set(values[kept].tolist())  # by value: bf16 logits tie
    # The graph replays the same stream as eager calls from the same (seed, offset).
    eager_state = SamplerState.create("cuda", seed=1234, num_generated=n0, offset=off0)
    eager = [int(smp.sample_triton(logits, params, eager_state, scratch=scratch).item()) for _ in range(replays)]
    assert eager == drawn
