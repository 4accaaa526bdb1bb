"""GPU tier of the decode engine (runs in `make gpu-check`): the CUDA-graph path against the eager path, cancel and
speech mode on CUDA, and bf16 precision at 7B shape against an fp32 reference (transformers over the same weights)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kernel_rules import summation_order_bound
from kernels.bench_decode import SPEECHGPT_TEXT_ROWS as TEXT_ROWS, SPEECHGPT_UNIT_SPAN_IDS, SPEECHGPT_VOCAB_SIZE
from kernels.checkpoint import SPEECHGPT_7B, LlamaArch
from kernels.engine import SPEECHGPT_SAMPLING, DecodeEngine
from kernels.model import LlamaWeights
from kernels.rmsnorm import rmsnorm
from kernels.sampling import SamplingParams

pytestmark = pytest.mark.gpu

SMALL = LlamaArch(hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=8, vocab_size=SPEECHGPT_VOCAB_SIZE)
GREEDY = SamplingParams(greedy=True, min_new_tokens=0)
SOSP, EOSP = SPEECHGPT_UNIT_SPAN_IDS  # random weights: the SpeechGPT layout


def _engine(weights: LlamaWeights, **kw) -> DecodeEngine:
    return DecodeEngine(weights, **{"unit_rows_start": TEXT_ROWS, "unit_span_ids": SPEECHGPT_UNIT_SPAN_IDS, **kw})


@pytest.fixture(scope="module")
def small_weights():
    return LlamaWeights.random(SMALL, torch.bfloat16, "cuda", seed=1)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TEXT_ROWS, (n,), generator=g).tolist()


@pytest.mark.parametrize("params", [GREEDY, SPEECHGPT_SAMPLING], ids=["greedy", "sampling"])
def test_graph_stream_equals_eager_steps(small_weights, params):
    p = prompt(100, 0)
    runs = []
    for graphs in (True, False):
        eng = _engine(small_weights, cuda_graphs=graphs, prefill_graphs=False)  # same prefill for both
        eng.prefill(p)
        runs.append(list(eng.decode(params, seed=5, max_new_tokens=64, stop_ids=())))
        assert eng.pos == len(p) + 63
    assert runs[0] == runs[1]
    assert len(runs[0]) == 64


def test_cancel_and_continue_on_cuda(small_weights):
    p = prompt(50, 1)
    eng = _engine(small_weights)
    eng.prefill(p)
    stream = eng.decode(SPEECHGPT_SAMPLING, seed=2, stop_ids=())
    got = []
    for t in stream:
        got.append(t)
        if len(got) == 5:
            stream.cancel()
    assert len(got) == 5 and stream.stop_reason == "cancelled" and eng.pos == len(p) + 4
    ref = _engine(small_weights)
    ref.prefill(p)
    full = list(ref.decode(GREEDY, max_new_tokens=8, stop_ids=()))
    eng.truncate(len(p))
    eng.prefill(full[:5])
    assert list(eng.decode(GREEDY, max_new_tokens=3, stop_ids=())) == full[5:8]


def test_speech_mode_on_cuda(small_weights):
    eng = _engine(small_weights)
    eng.prefill(prompt(40, 3))
    token = torch.tensor([SOSP], device="cuda")
    pos = torch.tensor([40], dtype=torch.int32, device="cuda")
    seq = torch.zeros(1, dtype=torch.int32, device="cuda")
    m = eng.model
    full = m.decode_step(token, pos.clone(), seq).clone()
    h = rmsnorm(m.hidden, m.w.norm, m.arch.rms_norm_eps)[0].clone()  # what the head read
    masked = m.decode_step(token, pos.clone(), seq, torch.ones(1, dtype=torch.int32, device="cuda")).clone()
    assert torch.isneginf(masked[:TEXT_ROWS]).all()
    # The unit rows are a cuBLAS GEMV over a row slice, the full head one over the whole matrix: another kernel may
    # sum in another order (split-K). Bound: summation order plus bf16 rounding, x2 for split-K partials that cuBLAS
    # may reduce in bf16 (allow_bf16_reduced_precision_reduction); the decision must not change.
    bound = 2 * summation_order_bound(m.w.lm_head[TEXT_ROWS:], h, torch.bfloat16)
    assert ((masked[TEXT_ROWS:].double() - full[TEXT_ROWS:].double()).abs() <= bound).all()
    assert int(masked.argmax()) == TEXT_ROWS + int(full[TEXT_ROWS:].argmax())
    outside = eng.model.decode_step(token, pos.clone(), seq, torch.zeros(1, dtype=torch.int32, device="cuda")).clone()
    # The full head rounds logits to bf16 (like transformers); the text-row kernel writes its fp32 sums.
    torch.testing.assert_close(outside[:TEXT_ROWS], full[:TEXT_ROWS], rtol=2**-7, atol=1e-3)
    eng.truncate(40)
    eng.prefill([SOSP])
    stream = eng.decode(SPEECHGPT_SAMPLING, seed=4, speech_mode=True, unit_span_open=True, max_new_tokens=40, stop_ids=())
    toks = list(stream)
    first_close = toks.index(EOSP) if EOSP in toks else len(toks)
    assert all(t >= TEXT_ROWS for t in toks[: first_close + 1])


def test_triton_gemv_engine_matches_cublas_engine(small_weights):
    p = prompt(30, 9)
    logits = []
    for gemv in ("torch", "triton"):
        eng = _engine(small_weights, gemv=gemv)
        eng.prefill(p[:-1])
        tok = torch.tensor([p[-1]], device="cuda")
        logits.append(eng.model.decode_step(tok, torch.tensor([29], dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")).clone())
    assert eng.model.gemv_choice["qkv"] is not None
    assert _rel(logits[1], logits[0]) < 2e-2


@pytest.mark.parametrize("gemv", ["torch", "auto"])
def test_fused_layers_match_unfused_layers(small_weights, gemv, monkeypatch):
    """The fused layer kernels (default configs, or the configs the auto race picked) against one kernel per op:
    one step's logits, then the same greedy stream through CUDA graphs for both."""
    import kernels.gemv

    # Race three configs, not all: each one is a Triton compile, and this tier has minutes, not hours.
    monkeypatch.setattr(kernels.gemv, "AUTO_CONFIGS", kernels.gemv.AUTO_CONFIGS[1::6])
    p = prompt(30, 11)
    eng = _engine(small_weights, gemv=gemv)
    if gemv == "auto":
        assert set(eng.fused_report) == {"qkv", "o", "gate_up", "down"}
        assert all(eng.model.fused_choice[k] is not None for k in eng.fused_report), eng.fused_report
    logits, streams = [], []
    for fused in (True, False):
        eng.fused = fused
        eng.truncate(0)
        eng.prefill(p[:-1])
        tok = torch.tensor([p[-1]], device="cuda")
        pos, seq = torch.tensor([29], dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")
        logits.append(eng.model.decode_step(tok, pos, seq).clone())
        eng.truncate(0)
        eng.prefill(p)
        streams.append(list(eng.decode(GREEDY, max_new_tokens=16, stop_ids=())))
    assert _rel(logits[0], logits[1]) < 2e-2
    # bf16 rounding differs (the norm is applied in fp32 inside the GEMV): allow a late near-tie divergence only.
    assert streams[0][:4] == streams[1][:4], streams


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_prefill_equals_eager_prefill(small_weights, no_tf32, dtype):
    """Prefill by bucket-graph replay (chunks across two buckets, chained on the device; a bucket captured after the
    decode graph, in the same pool) against the eager prefill: logits and K/V close, then the same greedy tokens
    (fp32; bf16 rounds differently per GEMM shape, so there only the logits and cache are compared)."""
    w = small_weights if dtype == torch.bfloat16 else LlamaWeights.from_state_dict(
        SMALL, small_weights.hf_views().__getitem__, torch.float32, "cuda")
    p = prompt(130, 21)
    runs = []
    for graphs in (True, False):
        eng = _engine(w, max_seq=512, prefill_graphs=graphs, prefill_buckets=(16, 32, 64))
        assert eng.prefill_bucketed == graphs
        out = [eng.prefill(p[:80])]  # 64 + 16: two buckets in one call
        out.append(eng.prefill(p[80:120]))  # 40 at 80 (bucket 64)
        kv = [t[:, :, :120].clone() for t in (eng.model.cache.k, eng.model.cache.v)]
        first = list(eng.decode(GREEDY, max_new_tokens=24, stop_ids=()))
        if graphs:
            assert set(eng._prefill_graphs) == {16, 64}
        out.append(eng.prefill(p[100:130], start_pos=100))  # implicit truncate; 30 at 100: bucket 32, new
        if graphs:
            assert set(eng._prefill_graphs) == {16, 32, 64}
        second = list(eng.decode(GREEDY, max_new_tokens=24, stop_ids=()))  # the decode graph still replays right
        assert eng.pos == 130 + 23
        runs.append((out, kv, first, second))
    (got, got_kv, *got_tokens), (want, want_kv, *want_tokens) = runs
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    for i, (g, r) in enumerate(zip(got + got_kv, want + want_kv)):
        assert _rel(g, r) < tol, (i, _rel(g, r))
    if dtype == torch.float32:
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        assert got_tokens == want_tokens


def test_prefill_graph_warmup_keeps_the_cache(small_weights):
    """Capturing a bucket whose warm-up region [max_seq - bucket, max_seq) overlaps valid tokens restores them; the
    capture leaves the cache, positions and the last logits as they were."""
    p = prompt(120, 22)
    eng = _engine(small_weights, max_seq=128, prefill_buckets=(16, 64))
    logits = eng.prefill(p)  # 64 + 56 (bucket 64 ends at 128): only bucket 64 captured so far
    assert set(eng._prefill_graphs) == {64}
    before = [t.clone() for t in (eng.model.cache.k, eng.model.cache.v)]
    eng.warmup_prefill()  # bucket 16 warms up at [112, 128): tokens 112..119 are valid
    assert set(eng._prefill_graphs) == {16, 64}
    for t, b in zip((eng.model.cache.k, eng.model.cache.v), before):
        assert torch.equal(t[:, :, :120], b[:, :, :120])
    assert eng.pos == 120 and int(eng.pos_dev) == 120 and eng._last_logits is logits
    ref = _engine(small_weights, max_seq=128, prefill_buckets=(16, 64))
    ref.prefill(p)
    assert list(eng.decode(GREEDY, max_new_tokens=8, stop_ids=())) == list(ref.decode(GREEDY, max_new_tokens=8, stop_ids=()))
    with pytest.raises(ValueError, match="not one of"):
        eng.warmup_prefill([48])


def test_bf16_precision_and_greedy_agreement_at_7b():
    """Engine bf16 logits vs an fp32 reference: error <= 2x that of transformers in bf16; greedy agreement over 128
    steps, with the first divergence (if any) reported and required to be a near-tie of the fp32 reference."""
    from kernels.bench_decode import hf_model_sharing

    w16 = LlamaWeights.random(SPEECHGPT_7B, torch.bfloat16, "cuda", seed=7)
    p = prompt(64, 7)
    ids = torch.tensor([p], device="cuda")
    with torch.no_grad():
        hf16 = hf_model_sharing(w16)
        logits_hf16 = hf16(ids).logits[0, -1].float()
        del hf16
        w32 = LlamaWeights.from_state_dict(SPEECHGPT_7B, w16.hf_views().__getitem__, torch.float32, "cuda")
        hf32 = hf_model_sharing(w32)
        logits_32 = hf32(ids).logits[0, -1].float()

    eng = _engine(w16)
    report = {}
    for fused in (False, True):  # the default (fused) last: the greedy run below uses it
        eng.fused = fused
        eng.truncate(0)
        eng.prefill(p[:-1])
        token = torch.tensor([p[-1]], device="cuda")
        step = eng.model.decode_step(token, torch.tensor([63], dtype=torch.int32, device="cuda"), torch.zeros(1, dtype=torch.int32, device="cuda")).clone()
        err_engine, err_torch = _rel(step, logits_32), _rel(logits_hf16, logits_32)
        report |= {f"decode_step_rel_err_vs_fp32{'' if fused else '_unfused'}": err_engine, "torch_bf16_rel_err_vs_fp32": err_torch}
        assert err_engine <= 2 * err_torch + 1e-6, report

    # greedy agreement: engine (bf16, CUDA graphs) vs transformers fp32 greedy over the same weights
    eng.truncate(0)
    eng.prefill(p)
    got = list(eng.decode(GREEDY, max_new_tokens=128, stop_ids=()))
    with torch.no_grad():
        out = hf32.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0, eos_token_id=None,
                            output_scores=True, return_dict_in_generate=True)
    want = out.sequences[0, len(p):].tolist()
    diverge = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    report |= {"greedy_steps": 128, "first_divergence": diverge}
    if diverge is not None:
        scores = out.scores[diverge][0].float()
        gap = float(scores.max() - scores[got[diverge]])
        report |= {"fp32_logit_gap_at_divergence": gap, "max_abs_bf16_logit_error": float((logits_hf16 - logits_32).abs().max())}
        # The engine may only pick a different token where the fp32 reference itself is nearly tied.
        assert gap <= 4 * report["max_abs_bf16_logit_error"], report
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "gpu_precision.json").write_text(json.dumps(report, indent=2))
    print("precision report:", report)


@pytest.mark.launch_trick
def test_programmatic_dependent_launch_changes_nothing_but_timing(small_weights):
    """PDL only moves launches earlier; every kernel still waits for its inputs on the device. Same kernels, same
    arithmetic: the graph-replayed streams must be identical, token for token, and so must the step's logits.
    From here on the tests run the least proven paths (PDL, one-launch attention): a device fault in them cannot
    disturb the tests before."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    p = prompt(60, 13)
    runs, logits = [], []
    for pdl in (False, True):
        eng = _engine(small_weights, pdl=pdl)
        eng.prefill(p)
        runs.append(list(eng.decode(SPEECHGPT_SAMPLING, seed=3, max_new_tokens=48, stop_ids=())))
        eng.truncate(len(p) - 1)  # one eager step on the same cache prefix (PDL launches outside a graph too)
        tok = torch.tensor([p[-1]], device="cuda")
        pos = torch.tensor([len(p) - 1], dtype=torch.int32, device="cuda")
        logits.append(eng.model.decode_step(tok, pos, torch.zeros(1, dtype=torch.int32, device="cuda")).clone())
    assert runs[0] == runs[1]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.launch_trick
@pytest.mark.parametrize("name", ["fused+1attn", "fused+pdl", "fused+pdl+1attn", "fused+1attn+l2pf", "fused+pdl+1attn+l2pf"])
def test_launch_variants_decode_exactly_like_the_plain_fused_step(small_weights, name):
    """One-launch attention, PDL and the L2 prefetch only change how the same kernels are launched: the
    graph-replayed sampled stream equals the plain fused engine's token for token over 96 steps (a stale partial or
    an early read would show as a different token sooner or later), and the one-launch counters end at zero."""
    from kernels.engine import STEP_VARIANTS

    v = STEP_VARIANTS[name]
    if v.needs_hopper and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL and the bulk L2 prefetch need compute capability 9.0+")
    p = prompt(300, 21)  # 300+ positions: five live attention splits of 64
    runs = []
    for variant in (STEP_VARIANTS["fused"], v):
        eng = _engine(small_weights)
        eng.step_variant = variant
        eng.prefill(p)
        runs.append(list(eng.decode(SPEECHGPT_SAMPLING, seed=9, max_new_tokens=96, stop_ids=())))
        assert eng.model.attn_counters.eq(0).all()
    assert runs[0] == runs[1]


@pytest.mark.launch_trick
def test_warmup_races_the_step_variants_and_admits_every_one(small_weights):
    """On a GPU the warm-up's race must admit every variant this card runs (a twin whose logits differ from its
    plain variant's by a single bit is refused, which would point at a synchronisation bug), time each, and pick
    one; the tuned engine then decodes as the untuned engine with the chosen variant does."""
    p = prompt(200, 22)
    eng = _engine(small_weights)
    eng.prefill(p)
    eng.warmup(SPEECHGPT_SAMPLING)
    report = eng.tune_report
    print("step variant race:", json.dumps(report, indent=1))
    names = [v.name for v in eng.step_candidates()]
    assert list(report["variants"]) == names and len(names) >= 3
    for name in names:
        row = report["variants"][name]
        assert row["admitted"], (name, row)
        assert row["us_per_step"] > 0
    chosen = eng.step_variant
    assert report["chosen"] == chosen.name
    got = list(eng.decode(SPEECHGPT_SAMPLING, seed=2, max_new_tokens=32, stop_ids=()))
    ref = _engine(small_weights, tune=False)
    ref.step_variant = chosen
    ref.prefill(p)
    assert got == list(ref.decode(SPEECHGPT_SAMPLING, seed=2, max_new_tokens=32, stop_ids=()))


@pytest.mark.launch_trick
def test_engine_generator_on_cuda_answers_like_the_cpu_engine(request):
    """`respond --device cuda`'s LLM path on the tiny bundle: EngineGenerator on CUDA (fp32, graph prefill buckets,
    graph decode, fused kernels) against the CPU engine, greedy, in every mode: the same answer."""
    for module in ("sentencepiece", "joblib"):  # the tiny bundle's tokenizer and k-means writer
        pytest.importorskip(module)
    from agent.bundle import resolve_bundle
    from agent.engine_generator import EngineGenerator
    from agent.prompts import Task, prompt_for

    paths = resolve_bundle(request.getfixturevalue("tiny_bundle"))
    greedy = SamplingParams(greedy=True, min_new_tokens=0)
    gens = [EngineGenerator.from_bundle(paths, torch.float32, device, gemv="torch") for device in ("cuda", "cpu")]
    assert gens[0].engine.use_graphs and gens[0].engine.prefill_bucketed
    assert gens[0].warmup() > 0 and gens[0].engine._prefill_graphs and gens[0].engine._graphs
    for task, kw in ((Task.SPEECH, {"units": list(range(40, 90))}), (Task.TTS, {"text": "Read this."}), (Task.TEXT, {"text": "Hi."})):
        prompt = prompt_for(task, **kw)
        a, b = (g.generate(prompt, task=task, params=greedy, max_new_tokens=120) for g in gens)
        assert a.new_ids == b.new_ids, task
