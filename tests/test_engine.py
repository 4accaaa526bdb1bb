"""The decode engine against the transformers reference, on the tiny bundle (fp32, CPU path)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from agent.prompts import Task, prompt_for
from agent.reference import SPEECHGPT_SAMPLING, ReferenceGenerator, build_hf_llama
from kernels.engine import DecodeEngine
from kernels.model import LlamaWeights
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(greedy=True, min_new_tokens=0)
# The tiny model's answers are ~40 tokens; to compare 64+ steps both sides decode through EOS.
GREEDY_THROUGH_EOS = SamplingParams(greedy=True, min_new_tokens=0, eos_id=-1)


@pytest.fixture(scope="module")
def hf(tiny_llm):
    tok, arch, sd = tiny_llm
    return ReferenceGenerator(tok, build_hf_llama(arch, sd, torch.float32, "cpu"))


def new_engine(tiny_llm, **kw) -> DecodeEngine:
    """An engine on the tiny bundle, its speech head and unit span ids read off the bundle's tokenizer."""
    tok, arch, sd = tiny_llm
    vocab = tok.vocab
    kw = {"unit_rows_start": vocab.speech_rows[0], "unit_span_ids": (vocab.sosp, vocab.eosp), **kw}
    return DecodeEngine(LlamaWeights.from_state_dict(arch, sd.__getitem__, torch.float32, "cpu"), **kw)


def speech_prompt(tok, seed: int, n: int = 60) -> list[int]:
    rng = random.Random(seed)
    return tok.encode(prompt_for(Task.SPEECH, units=[rng.randrange(1000) for _ in range(n)]))


def test_greedy_equals_transformers_for_64_steps(tiny_llm, hf):
    tok = tiny_llm[0]
    for seed in (0, 1):
        prompt = speech_prompt(tok, seed)
        ref = hf.generate(prompt, params=GREEDY_THROUGH_EOS, max_new_tokens=80)
        eng = new_engine(tiny_llm)
        eng.prefill(prompt)
        got = list(eng.decode(GREEDY_THROUGH_EOS, max_new_tokens=80))
        assert len(ref.new_ids) == 80 and tok.eos_id in ref.new_ids  # the answer and what follows its EOS
        assert got == ref.new_ids


def test_step_logits_match_transformers(tiny_llm, hf):
    """Prefill logits and every decode step's logits equal a full HF forward over the same sequence."""
    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 2, n=20)
    eng = new_engine(tiny_llm)
    logits = [eng.prefill(prompt).clone()]  # the first token is drawn from these
    tokens = []
    for t in eng.decode(GREEDY, max_new_tokens=12):
        if tokens:  # every later token was drawn from the decode step that consumed the previous one
            logits.append(eng.model.logits.clone())
        tokens.append(t)
    with torch.no_grad():
        full = hf.model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].float()
    torch.testing.assert_close(torch.stack(logits), full, rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_and_matches_the_reference(tiny_llm, hf):
    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 3)
    eng = new_engine(tiny_llm)
    runs = []
    for seed in (7, 7, 8):
        eng.truncate(0)
        eng.prefill(prompt)
        runs.append(list(eng.decode(SPEECHGPT_SAMPLING, seed=seed)))
    assert runs[0] == runs[1]
    ref = hf.generate(prompt, seed=7)
    assert runs[0] == ref.new_ids  # same HF sampling order, same RNG stream
    assert runs[0][-1] == tok.eos_id and tok.eos_id not in runs[0][:10]


def test_prefill_in_pieces_and_truncate_equal_a_fresh_prefill(tiny_llm):
    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 4, n=30)
    fresh = new_engine(tiny_llm)
    want = fresh.prefill(prompt).clone()

    eng = new_engine(tiny_llm)
    eng.prefill(prompt[:50])
    got = eng.prefill(prompt[50:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert eng.pos == len(prompt)

    # speculative prefill of provisional units, then roll back and prefill the final ones
    provisional = [tok.vocab.unit_id(u) for u in (5, 6, 7, 8)]
    eng.prefill(provisional)
    eng.truncate(len(prompt) - 3)
    got = eng.prefill(prompt[-3:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # prefill at an explicit earlier position truncates implicitly
    eng.prefill(provisional)
    got = eng.prefill(prompt[-3:], start_pos=len(prompt) - 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gap"):
        eng.prefill([5], start_pos=eng.pos + 1)
    with pytest.raises(ValueError, match="holds"):
        eng.truncate(eng.pos + 1)


def test_cancel_stops_within_one_step(tiny_llm):
    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 5)
    eng = new_engine(tiny_llm)
    eng.prefill(prompt)
    stream = eng.decode(SPEECHGPT_SAMPLING, seed=1)
    got = []
    for t in stream:
        got.append(t)
        if len(got) == 3:
            stream.cancel()
    assert len(got) == 3 and stream.stop_reason == "cancelled"
    assert eng.pos == len(prompt) + 2 and eng.pending_token == got[-1]
    # the cache is consistent: continuing from the pending token gives the uncancelled run's next token
    eng2 = new_engine(tiny_llm)
    eng2.prefill(prompt)
    full = list(eng2.decode(GREEDY, max_new_tokens=6))
    eng.truncate(len(prompt))
    eng.prefill(full[:3])
    assert list(eng.decode(GREEDY, max_new_tokens=1)) == [full[3]]


def test_async_iteration_and_cancel_from_another_task(tiny_llm):
    tok = tiny_llm[0]
    eng = new_engine(tiny_llm)
    eng.prefill(speech_prompt(tok, 6))

    async def main():
        stream = eng.decode(SPEECHGPT_SAMPLING, seed=2)
        got = []

        async def consume():
            async for t in stream:
                got.append(t)
                if len(got) == 5:
                    await asyncio.sleep(0)  # let the canceller run while this token is being handled
                    canceller.set()
                    await asyncio.sleep(0.01)

        canceller = asyncio.Event()

        async def cancel_when_told():
            await canceller.wait()
            stream.cancel()

        await asyncio.gather(consume(), cancel_when_told())
        return got, stream.stop_reason

    got, reason = asyncio.run(main())
    assert len(got) == 5 and reason == "cancelled"


def test_speech_mode_head_equals_masked_full_logits(tiny_llm):
    """Inside a unit span the restricted head gives the full logits with text rows at -inf: the masked rows exactly,
    the unit/special rows within the rounding of a K-term fp32 dot product (the row slice is another BLAS call than
    the full matrix, and may sum in another order), with the same argmax and the same sampled tokens."""
    from kernel_rules import summation_order_bound
    from kernels.rmsnorm import rmsnorm
    from kernels.sampling import sample_reference

    tok = tiny_llm[0]
    v = tok.vocab
    ub = v.unit_base
    prompt = speech_prompt(tok, 7) + tok.encode("hello; [ta] hi; [ua]", add_bos=False) + [v.sosp]
    eng = new_engine(tiny_llm, unit_rows_start=ub)
    m = eng.model
    eng.prefill(prompt[:-1])
    token = torch.tensor([v.sosp])
    pos = torch.tensor([len(prompt) - 1], dtype=torch.int32)
    seq = torch.zeros(1, dtype=torch.int32)
    logits, hidden = {}, {}
    for name, span in (("full", None), ("masked", torch.ones(1, dtype=torch.int32)), ("outside", torch.zeros(1, dtype=torch.int32))):
        logits[name] = m.decode_step(token, pos.clone(), seq, span).clone()
        hidden[name] = rmsnorm(m.hidden, m.w.norm, m.arch.rms_norm_eps)[0].clone()  # what the head read
    # Each side's rounding, plus what a difference between the hidden states the two heads read can move a logit.
    head = m.w.lm_head.double()
    bound = {name: summation_order_bound(m.w.lm_head, hidden["full"])
             + head.abs() @ (hidden[name].double() - hidden["full"].double()).abs() for name in ("masked", "outside")}
    assert torch.isneginf(logits["masked"][:ub]).all()
    err = (logits["masked"][ub:].double() - logits["full"][ub:].double()).abs()
    assert (err <= bound["masked"][ub:]).all(), f"unit rows differ by up to {err.max():.3g} (bound {bound['masked'][ub:].min():.3g}..)"
    err = (logits["outside"].double() - logits["full"].double()).abs()
    assert (err <= bound["outside"]).all(), f"span closed: logits differ by up to {err.max():.3g}"
    # Decisions: the argmax is the same (its margin is far above the bound), and so are sampled tokens.
    top2 = logits["full"][ub:].topk(2).values
    assert top2[0] - top2[1] > 2 * bound["masked"][ub:].max()
    assert int(logits["masked"].argmax()) == ub + int(logits["full"][ub:].argmax())
    reference = logits["full"].clone()
    reference[:ub] = float("-inf")
    for seed in range(5):
        draws = [sample_reference(x, SPEECHGPT_SAMPLING, 1, torch.Generator().manual_seed(seed)) for x in (logits["masked"], reference)]
        assert draws[0] == draws[1], seed

    # decoding in speech mode: every token inside the span is a unit or a special
    eng.truncate(0)
    eng.prefill(prompt)
    stream = eng.decode(SPEECHGPT_SAMPLING, seed=3, speech_mode=True, unit_span_open=True, max_new_tokens=80)
    inside = []
    for t in stream:
        if t == v.eosp:
            break
        inside.append(t)
    assert inside and all(t >= v.unit_base for t in inside)


def test_budget_respects_the_context(tiny_llm):
    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 8, n=10)
    eng = new_engine(tiny_llm, max_seq=len(prompt) + 4)
    eng.prefill(prompt)
    stream = eng.decode(GREEDY)
    assert len(list(stream)) == 4 and stream.stop_reason == "length"
    with pytest.raises(RuntimeError, match="needs a prefill"):
        eng.decode(GREEDY)
    with pytest.raises(ValueError, match="overflows"):
        eng.prefill(prompt + prompt, start_pos=0)


def test_speech_mode_constrains_the_first_token_too():
    """The first token comes from the prefill logits: inside a span it must also be a unit/special (random weights,
    so nothing but the head restriction keeps text tokens out)."""
    from kernels.bench_decode import CONFIGS, SPEECHGPT_TEXT_ROWS, SPEECHGPT_UNIT_SPAN_IDS

    w = LlamaWeights.random(CONFIGS["tiny"], torch.float32, "cpu", seed=11)
    sosp, eosp = SPEECHGPT_UNIT_SPAN_IDS
    for seed in range(5):
        eng = DecodeEngine(w, unit_rows_start=SPEECHGPT_TEXT_ROWS, unit_span_ids=SPEECHGPT_UNIT_SPAN_IDS)
        eng.prefill([1, 5, sosp])
        toks = list(eng.decode(SPEECHGPT_SAMPLING, seed=seed, speech_mode=True, unit_span_open=True, max_new_tokens=6, stop_ids=()))
        closed = toks.index(eosp) if eosp in toks else len(toks)
        assert all(t >= SPEECHGPT_TEXT_ROWS for t in toks[: closed + 1]), toks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_layer_kernels_equal_the_unfused_step(tiny_llm, monkeypatch, dtype):
    """The fused decode layers with their Triton kernels (interpreter) against the one-op-per-kernel step with the
    torch reference ops, step by step on the same tokens: logits and every K/V row written."""
    import kernels.model as km
    from kernels import gemv_residual, norm_gate_up_silu, norm_qkv_rope
    from kernel_rules import assert_dtype_rule
    from kernels.model import LlamaModel

    tok, arch, sd = tiny_llm
    models = {}
    for name, dt, fused in (("fused", dtype, True), ("unfused", dtype, False), ("fp32", torch.float32, False)):
        models[name] = LlamaModel(LlamaWeights.from_state_dict(arch, sd.__getitem__, dt, "cpu"), max_seq=128, unit_rows_start=None)
        models[name].fused = fused
    monkeypatch.setattr(km, "norm_qkv_rope", norm_qkv_rope.norm_qkv_rope_triton)
    monkeypatch.setattr(km, "norm_gate_up_silu", norm_gate_up_silu.norm_gate_up_silu_triton)
    monkeypatch.setattr(km, "gemv_residual", gemv_residual.gemv_residual_triton)
    prompt = torch.tensor(speech_prompt(tok, 3, n=10))
    for m in models.values():
        m.prefill(prompt, 0)
    state = {name: (torch.zeros(1, dtype=torch.int32) + len(prompt), torch.zeros(1, dtype=torch.int32)) for name in models}
    token = torch.tensor([int(tok.encode("<sosp>")[-1])])
    for step in range(6):
        logits = {name: m.decode_step(token, *state[name]).clone() for name, m in models.items()}
        if dtype == torch.float32:
            torch.testing.assert_close(logits["fused"], logits["unfused"], atol=1e-4, rtol=1e-4)
        else:
            assert_dtype_rule(logits["fused"].to(dtype), logits["unfused"].to(dtype), logits["fp32"], f"step {step} logits")
        token = logits["fp32"].argmax().view(1)
    end = len(prompt) + 6
    for kv in ("k", "v"):
        got, want = getattr(models["fused"].cache, kv)[:, :, :end], getattr(models["unfused"].cache, kv)[:, :, :end]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert all(int(s[0][0]) == end for s in state.values())


def test_pdl_needs_a_hopper_gpu(tiny_llm):
    with pytest.raises(ValueError, match="compute capability 9.0"):
        new_engine(tiny_llm, pdl=True)
    eng = new_engine(tiny_llm)
    assert eng.fused and not eng.pdl


def test_prefill_rejects_bad_ids_and_busy_engine(tiny_llm):
    tok = tiny_llm[0]
    eng = new_engine(tiny_llm)
    with pytest.raises(ValueError, match=r"token id 33006 at index 2 is outside the vocabulary \[0, 33006\)"):
        eng.prefill([1, 5, 33006, 7])
    with pytest.raises(ValueError, match="token id -1 at index 0"):
        eng.prefill(torch.tensor([-1, 3]))
    assert eng.pos == 0  # nothing was written
    eng.prefill(speech_prompt(tok, 4, n=8))
    with pytest.raises(ValueError, match=rf"prefill at {eng.pos + 1}: must be in \[0, {eng.pos}\]"):
        eng.prefill([5], start_pos=eng.pos + 1)
    stream = eng.decode(GREEDY, max_new_tokens=10)
    first = next(iter(stream))
    with pytest.raises(RuntimeError, match="while a decode stream is running"):
        eng.prefill([5])
    with pytest.raises(RuntimeError, match="while a decode stream is running"):
        eng.truncate(0)
    stream.cancel()
    stream.close()  # an abandoned stream releases the engine
    assert eng.pending_token == first
    eng.truncate(0)
    eng.prefill([1, 2, 3])
    assert eng.pos == 3


def test_one_launch_attention_in_the_decode_step(tiny_llm, monkeypatch):
    """The model hands the one-launch flag and its arrival counters to the Triton attention (interpreter): the same
    logits and K/V as the two-launch step, step after step (the counters must be back at zero each time)."""
    import kernels.model as km
    from kernels import decode_attention as da
    from kernels.model import LlamaModel

    tok, arch, sd = tiny_llm
    modes = []

    def spy(*args, **kw):
        modes.append(kw.get("one_launch"))
        return da.decode_attention_triton(*args, **kw)

    monkeypatch.setattr(km, "decode_attention", spy)
    models = [LlamaModel(LlamaWeights.from_state_dict(arch, sd.__getitem__, torch.float32, "cpu"), max_seq=256, unit_rows_start=None) for _ in range(2)]
    models[1].attn_one_launch = True
    prompt = torch.tensor(speech_prompt(tok, 5, n=40))
    assert 128 < len(prompt) < 190  # three live splits of 64 positions (of 4) in the 256-position cache
    for m in models:
        m.prefill(prompt, 0)
    state = [(torch.zeros(1, dtype=torch.int32) + len(prompt), torch.zeros(1, dtype=torch.int32)) for _ in models]
    token = torch.tensor([7])
    for _ in range(4):
        a, b = (m.decode_step(token, *s).clone() for m, s in zip(models, state))
        assert torch.equal(a, b)
        assert models[1].attn_counters.eq(0).all()
        token = a.argmax().view(1)
    assert torch.equal(models[0].cache.k, models[1].cache.k) and torch.equal(models[0].cache.v, models[1].cache.v)
    assert modes.count(True) == modes.count(False) == 4 * arch.num_layers


def _tuned_engine(tiny_llm, prompt):
    eng = new_engine(tiny_llm)
    eng.prefill(prompt)
    return eng


def test_tune_step_races_variants_and_leaves_the_engine_as_it_was(tiny_llm):
    """The race runs every candidate from the same state and restores it: the decode afterwards equals an untuned
    engine's, the valid cache is untouched, and every admitted variant has a time."""
    from kernels.engine import STEP_VARIANTS

    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 6, n=30)
    cands = [STEP_VARIANTS["fused"], STEP_VARIANTS["fused+1attn"], STEP_VARIANTS["unfused"]]
    eng = _tuned_engine(tiny_llm, prompt)
    k_before = eng.model.cache.k[:, :, : len(prompt)].clone()
    report = eng.tune_step(SPEECHGPT_SAMPLING, candidates=cands, steps=4, rounds=3)
    assert report["position"] == len(prompt) and report["steps"] == 4
    assert [n for n, r in report["variants"].items() if r["admitted"]] == ["fused", "fused+1attn", "unfused"]
    assert all(r["us_per_step"] > 0 for r in report["variants"].values())
    assert "must be 0" in report["variants"]["fused+1attn"]["check"] and "vs unfused" in report["variants"]["fused"]["check"]
    assert report["chosen"] == eng.step_variant.name and eng.tune_report is report
    assert eng.pos == len(prompt) and int(eng.pos_dev[0]) == len(prompt)
    assert torch.equal(eng.model.cache.k[:, :, : len(prompt)], k_before)
    got = list(eng.decode(SPEECHGPT_SAMPLING, seed=4, max_new_tokens=20, stop_ids=()))
    ref = _tuned_engine(tiny_llm, prompt)
    assert got == list(ref.decode(SPEECHGPT_SAMPLING, seed=4, max_new_tokens=20, stop_ids=()))


def test_tune_step_rejects_a_variant_whose_logits_differ_from_its_twin(tiny_llm, monkeypatch):
    """A launch trick that changes the arithmetic (here: one-launch attention made to add 1e-3, as a merge reading a
    stale partial would) is not admitted, whatever its speed; a variant that cannot run is reported, not chosen."""
    import kernels.model as km
    from kernels.engine import STEP_VARIANTS

    real = km.decode_attention

    def skewed(*args, one_launch=False, **kw):
        out = real(*args, one_launch=one_launch, **kw)
        return out + 1e-3 if one_launch else out

    monkeypatch.setattr(km, "decode_attention", skewed)
    eng = _tuned_engine(tiny_llm, speech_prompt(tiny_llm[0], 7, n=20))
    cands = [STEP_VARIANTS[n] for n in ("fused", "fused+1attn", "fused+pdl", "unfused")]
    report = eng.tune_step(SPEECHGPT_SAMPLING, candidates=cands, steps=3, rounds=2)
    bad = report["variants"]["fused+1attn"]
    assert not bad["admitted"] and bad["why"].startswith("failed the check: max |logit - fused's|")
    assert not report["variants"]["fused+pdl"]["admitted"] and "compute capability" in report["variants"]["fused+pdl"]["why"]
    assert report["chosen"] in ("fused", "unfused")


def test_tune_step_keeps_the_faster_variant(tiny_llm, monkeypatch):
    """With the two-launch attention made 10 ms slower per layer, the race picks the one-launch variant. The race
    reads a virtual clock that only the slowdown advances, so machine load cannot change what it measures."""
    import types

    import kernels.engine as ke
    import kernels.model as km
    from kernels.engine import STEP_VARIANTS

    real = km.decode_attention
    now = [0.0]

    def slow_two_launch(*args, one_launch=False, **kw):
        if not one_launch:
            now[0] += 0.01
        return real(*args, one_launch=one_launch, **kw)

    monkeypatch.setattr(km, "decode_attention", slow_two_launch)
    monkeypatch.setattr(ke, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    eng = _tuned_engine(tiny_llm, speech_prompt(tiny_llm[0], 8, n=20))
    report = eng.tune_step(SPEECHGPT_SAMPLING, candidates=[STEP_VARIANTS["fused"], STEP_VARIANTS["fused+1attn"]], steps=2, rounds=3)
    assert report["chosen"] == "fused+1attn" and eng.step_variant == STEP_VARIANTS["fused+1attn"]
    v = report["variants"]
    assert v["fused"]["us_per_step"] > v["fused+1attn"]["us_per_step"] + 15000  # two layers x 10 ms


def test_tune_step_on_a_full_cache_changes_nothing(tiny_llm):
    eng = new_engine(tiny_llm, max_seq=16)
    eng.prefill(list(range(3, 19)))
    report = eng.tune_step()
    assert report["skipped"] == "the cache is full" and report["chosen"] == "fused" and eng.pos == 16


def test_tune_step_in_speech_mode_compares_masked_logits(tiny_llm):
    """Under the speech head with a unit span open the text rows are -inf in every variant: equal, not NaN."""
    from kernels.engine import STEP_VARIANTS

    eng = _tuned_engine(tiny_llm, speech_prompt(tiny_llm[0], 9, n=20))
    eng.span_open.fill_(1)
    cands = [STEP_VARIANTS[n] for n in ("fused", "fused+1attn", "unfused")]
    report = eng.tune_step(SPEECHGPT_SAMPLING, speech_mode=True, candidates=cands, steps=2, rounds=1)
    assert all(r["admitted"] for r in report["variants"].values()), report
    assert "= 0 over 2 steps" in report["variants"]["fused+1attn"]["check"]
    assert int(eng.span_open[0]) == 1  # restored


def test_step_variants_name_themselves_and_hopper_only_ones_refuse_the_cpu(tiny_llm):
    from kernels.engine import STEP_VARIANTS, StepVariant, step_variant

    assert list(STEP_VARIANTS)[0] == "fused" and list(STEP_VARIANTS)[-1] == "unfused"
    for name, v in STEP_VARIANTS.items():
        assert v.name == name and step_variant(name) is v
        assert (v.twin is None) == (v in (StepVariant(), StepVariant(fused=False)))
    with pytest.raises(ValueError, match=r"unknown decode step variant .fused\+xyz.; known: fused, fused\+1attn, "):
        step_variant("fused+xyz")
    eng = new_engine(tiny_llm)
    assert eng.step_candidates() == [StepVariant()]
    with pytest.raises(ValueError, match="l2_prefetch needs a CUDA device"):
        eng.step_variant = STEP_VARIANTS["fused+1attn+l2pf"]
    eng.fused = False
    assert eng.step_variant == StepVariant(fused=False)
    with pytest.raises(ValueError, match="l2_prefetch needs a CUDA device"):
        new_engine(tiny_llm, l2_prefetch=True)


def _decode_alone(tiny_llm, turns, seed):
    """Tokens a fresh engine gives for these turns (each prompt prefilled after the last answer, then decoded)."""
    eng = new_engine(tiny_llm)
    out = []
    for prompt in turns:
        eng.prefill(prompt)
        out.append(list(eng.decode(SPEECHGPT_SAMPLING, seed=seed, max_new_tokens=10, stop_ids=())))
    return out


def test_forks_interleaved_give_the_tokens_each_gives_alone(tiny_llm):
    """Two forks of one engine, prefilled and decoded in alternation (a few tokens of one stream, then of the
    other), over two turns each: every stream equals a fresh engine running that conversation alone."""
    tok = tiny_llm[0]
    turns = {"a": [speech_prompt(tok, 10, n=20), tok.encode("next", add_bos=False)],
             "b": [speech_prompt(tok, 11, n=30), tok.encode("and then", add_bos=False)]}
    seeds = {"a": 5, "b": 6}
    parent = new_engine(tiny_llm)
    engines = {"a": parent.fork(), "b": parent.fork()}
    got = {name: [] for name in engines}
    for turn in range(2):
        streams = {}
        for name, eng in engines.items():
            eng.prefill(turns[name][turn])
        for name, eng in engines.items():
            streams[name] = eng.decode(SPEECHGPT_SAMPLING, seed=seeds[name], max_new_tokens=10, stop_ids=())
            got[name].append([])
        for chunk in (3, 1, 4, 2):
            for name, stream in streams.items():
                got[name][-1] += [next(stream) for _ in range(chunk)]
        for stream in streams.values():
            assert list(stream) == [] and stream.stop_reason == "length"
    for name in engines:
        assert got[name] == _decode_alone(tiny_llm, turns[name], seeds[name]), name
    assert parent.pos == 0  # the parent's own conversation is untouched


def test_forks_decode_from_two_threads(tiny_llm):
    import threading

    tok = tiny_llm[0]
    prompts = [speech_prompt(tok, 12 + i, n=20) for i in range(2)]
    parent = new_engine(tiny_llm)
    forks = [parent, parent.fork()]
    got: list[list[int] | None] = [None, None]

    def run(i: int) -> None:
        forks[i].prefill(prompts[i])
        got[i] = list(forks[i].decode(SPEECHGPT_SAMPLING, seed=i, max_new_tokens=10, stop_ids=()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [_decode_alone(tiny_llm, [p], i)[0] for i, p in enumerate(prompts)]


def test_fork_shares_weights_not_state(tiny_llm):
    parent = new_engine(tiny_llm, max_seq=96, prefill_buckets=(16, 32))
    fork = parent.fork()
    w, fw = parent.model.w, fork.model.w
    assert fw is w and fw.embed.data_ptr() == w.embed.data_ptr() and fw.lm_head.data_ptr() == w.lm_head.data_ptr()
    assert all(a.wqkv.data_ptr() == b.wqkv.data_ptr() and a.w_down.data_ptr() == b.w_down.data_ptr()
               for a, b in zip(w.layers, fw.layers))
    own = lambda e: [e.model.cache.k, e.model.cache.v, e.model.logits, e.model.hidden, e.model.q_buf, e.model.act_buf,  # noqa: E731
                     e.model.attn_scratch, e.state.token_out, e.state.offset, e.pos_dev, e.span_open, e._prefill_tokens]
    assert not {t.data_ptr() for t in own(parent)} & {t.data_ptr() for t in own(fork)}
    assert fork._lock is not parent._lock and fork.model is not parent.model
    assert (fork.max_seq, fork.prefill_buckets, fork.model.unit_rows_start, (fork.sosp_id, fork.eosp_id)) == (
        96, (16, 32), parent.model.unit_rows_start, (parent.sosp_id, parent.eosp_id))
    parent.prefill([1, 5, 7])
    assert fork.pos == 0 and not fork.model.cache.k.any()


def test_fork_of_a_tuned_engine_keeps_its_variant_and_reports(tiny_llm):
    from kernels.engine import STEP_VARIANTS

    parent = _tuned_engine(tiny_llm, speech_prompt(tiny_llm[0], 13, n=10))
    report = parent.tune_step(candidates=[STEP_VARIANTS["unfused"]], steps=2, rounds=1)
    assert report["chosen"] == "unfused"
    parent.model.fused_choice["qkv"] = "a config"  # stand-ins for what gemv="auto" measures on CUDA
    parent.gemv_report["head"] = {"choice": "torch"}
    fork = parent.fork()
    assert fork.step_variant == STEP_VARIANTS["unfused"] and fork.tune_report is report and not fork.tune
    assert fork.model.fused_choice == {"qkv": "a config"} and fork.gemv_report == {"head": {"choice": "torch"}}
    assert fork.cuda_graphs == parent.cuda_graphs and fork.prefill_bucketed == parent.prefill_bucketed
    fork.step_variant = STEP_VARIANTS["fused"]  # a fork's variant is its own
    assert parent.step_variant == STEP_VARIANTS["unfused"]


def test_compiled_cpu_layers_against_the_eager_step():
    """cpu_compile runs the decode layers through torch.compile (kernels.cpu_step), whose fused reductions round
    differently from the eager reference ops: on random weights at bench-decode's tiny shape (one compile per process
    serves both tests), every step's logits agree within 1e-4 and the greedy tokens are the same (each step's top-2
    margin is checked to exceed that bound, so an equal argmax is implied, not luck). After warmup() nothing compiles
    again: not the decode, not a fork's."""
    from torch._dynamo.utils import counters

    from kernels.bench_decode import CONFIGS, SPEECHGPT_TEXT_ROWS, SPEECHGPT_UNIT_SPAN_IDS

    w = LlamaWeights.random(CONFIGS["tiny"], torch.float32, "cpu", seed=12)
    kw = {"unit_rows_start": SPEECHGPT_TEXT_ROWS, "unit_span_ids": SPEECHGPT_UNIT_SPAN_IDS}
    compiled, eager = DecodeEngine(w, cpu_compile=True, **kw), DecodeEngine(w, **kw)
    assert compiled.cpu_compile and not eager.cpu_compile
    compiled.warmup()
    graphs = counters["stats"]["unique_graphs"]  # from here on nothing compiles: not the decode, not a fork
    prompt = torch.randint(3, SPEECHGPT_TEXT_ROWS, (40,), generator=torch.Generator().manual_seed(12))
    runs = {}
    for name, eng in (("compiled", compiled), ("eager", eager)):
        logits = [eng.prefill(prompt).clone()]
        tokens = []
        for t in eng.decode(GREEDY_THROUGH_EOS, max_new_tokens=24):
            if tokens:
                logits.append(eng.model.logits.clone())
            tokens.append(t)
        runs[name] = tokens, torch.stack(logits)
    top2 = runs["eager"][1].topk(2, dim=-1).values
    assert ((top2[:, 0] - top2[:, 1]) > 2e-4).all()
    torch.testing.assert_close(runs["compiled"][1], runs["eager"][1], rtol=1e-4, atol=1e-4)
    assert runs["compiled"][0] == runs["eager"][0]
    fork = compiled.fork()
    assert fork.cpu_compile
    fork.warmup()
    fork.prefill(prompt)
    assert list(fork.decode(GREEDY_THROUGH_EOS, max_new_tokens=24)) == runs["compiled"][0]
    assert counters["stats"]["unique_graphs"] == graphs
