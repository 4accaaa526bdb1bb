"""`speechgpt-rt bench-decode`: batch-1 decode speed of the engine against two baselines, side by side.

Random weights at the chosen shape (7B = SpeechGPT-7B-cm: 32 x 4096, vocab 33006). For each context length the
prompt is prefilled, then tokens are decoded with SpeechGPT's sampling (EOS ignored so every run has the same
length) by:
  (a) hf       transformers LlamaForCausalLM eager `generate` (what the original code uses), sharing the weights;
  (b) compile  a gpt-fast-style static-cache forward written here in plain torch, compiled with
               torch.compile(mode="reduce-overhead") (CUDA graphs through Inductor);
  (c) engine   our DecodeEngine (Triton kernels, one CUDA graph per step, pipelined host loop) as a user gets it:
               its warm-up races the step variants (kernels.engine.StepVariant: fused or unfused layers, one- or
               two-launch attention, programmatic dependent launch on Hopper) and keeps the fastest that passes
               its check; the race is printed. With `variants`, each variant is then also measured on its own as
               `engine[<variant>]` (e.g. `engine[unfused]`, one kernel per op: what the fusion replaces).
               On the CPU `engine` runs its decode layers compiled by torch.compile (cpu_compile) and
               `engine_eager`, side by side, is the same engine on the eager reference ops (the default).
ms/token is the median over steps (p90 too); achieved GB/s counts the weight bytes and the KV-cache bytes each
step reads; % of spec is against the card's datasheet memory bandwidth. Prefill time is measured for 128/512/1024
tokens, by the engine's default path (`prefill_ms`: CUDA-graph replays per token bucket on CUDA) and, side by side,
by its eager prefill (`prefill_eager_ms`, ratio `prefill_eager_over_graph`). Every number in one run, on one device,
with ratios printed.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.checkpoint import SPEECHGPT_7B, LlamaArch
from kernels.engine import SPEECHGPT_SAMPLING, STEP_VARIANTS, DecodeEngine, StepVariant, step_variant
from kernels.model import LlamaWeights
from kernels.rope import apply_rope_reference, rope_tables

# SpeechGPT's vocabulary layout, for the random-weight shapes here (a real model's ids come from its tokenizer
# files): 32000 text pieces, then 1000 units <0>..<999>, then 6 specials from 33000 (<sosp> = 33000, <eosp> = 33001).
SPEECHGPT_TEXT_ROWS = 32000  # the first unit row: where the speech-mode head starts
SPEECHGPT_UNIT_SPAN_IDS = (33000, 33001)
SPEECHGPT_VOCAB_SIZE = 33006

CONFIGS: dict[str, LlamaArch] = {
    "7b": SPEECHGPT_7B,
    "1b": LlamaArch(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=16, num_kv_heads=16, vocab_size=SPEECHGPT_VOCAB_SIZE),
    "small": LlamaArch(hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=8, vocab_size=SPEECHGPT_VOCAB_SIZE),
    "tiny": LlamaArch(hidden_size=64, intermediate_size=172, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=SPEECHGPT_VOCAB_SIZE),
}

# Datasheet memory bandwidth, bytes/s (leads, not measurements).
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100": 1.555e12, "L4": 0.3e12}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def spec_bandwidth(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, bw in SPEC_BANDWIDTH.items():
        if key in name:
            return name, bw
    return name, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(step_ms: list[float]) -> dict:
    s = sorted(step_ms)
    p90 = s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)]
    med = statistics.median(s)
    return {"ms_median": med, "ms_p90": p90, "tok_s": 1000.0 / med, "steps": len(s)}


def kv_bytes(arch: LlamaArch, context: int, elem: int) -> int:
    return 2 * arch.num_layers * arch.num_kv_heads * context * arch.head_dim * elem


# ---------------------------------------------------------------------------------------------------------------
# (b) gpt-fast-style baseline: plain torch, static cache, masked attention over the whole cache, torch.compile


class _GptFastLayer(torch.nn.Module):
    def __init__(self, L, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        super().__init__()
        for name in ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down"):
            setattr(self, name, torch.nn.Parameter(getattr(L, name), requires_grad=False))  # shared storage, no copy
        # One cache buffer per layer, updated in place (a view of one big cache would make the compiled graph
        # copy the whole buffer on every write).
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device))


class _GptFastModel(torch.nn.Module):
    def __init__(self, w: LlamaWeights, max_seq: int):
        super().__init__()
        a = w.arch
        self.arch = a
        self.embed = torch.nn.Parameter(w.embed, requires_grad=False)
        self.norm = torch.nn.Parameter(w.norm, requires_grad=False)
        self.lm_head = torch.nn.Parameter(w.lm_head, requires_grad=False)
        shape = (1, a.num_kv_heads, max_seq, a.head_dim)
        self.layers = torch.nn.ModuleList(_GptFastLayer(L, shape, w.dtype, w.device) for L in w.layers)
        cos, sin = rope_tables(a.head_dim, max_seq, a.rope_theta, device=w.device)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.register_buffer("positions", torch.arange(max_seq, device=w.device))

    @staticmethod
    def _rms(x, weight, eps):
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        a = self.arch
        H, Hkv, D = a.num_heads, a.num_kv_heads, a.head_dim
        x = F.embedding(token, self.embed)  # [1, hidden]
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for L in self.layers:
            h = self._rms(x, L.attn_norm, a.rms_norm_eps)
            q, k, v = F.linear(h, L.wqkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = apply_rope_reference(q.view(1, H, D), self.cos, self.sin, pos)
            k = apply_rope_reference(k.view(1, Hkv, D), self.cos, self.sin, pos)
            L.k_cache[:, :, pos] = k.view(1, Hkv, 1, D)  # gpt-fast's KVCache.update
            L.v_cache[:, :, pos] = v.view(1, Hkv, 1, D)
            y = F.scaled_dot_product_attention(q.view(1, H, 1, D), L.k_cache, L.v_cache, attn_mask=mask, enable_gqa=H != Hkv)
            x = x + F.linear(y.view(1, H * D), L.wo)
            gate, up = F.linear(self._rms(x, L.mlp_norm, a.rms_norm_eps), L.w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, L.w_down)
        logits = F.linear(self._rms(x, self.norm, a.rms_norm_eps), self.lm_head).float()
        # SpeechGPT sampling in graph-safe torch ops: temperature, top-k, top-p, exponential-race draw.
        logits = logits / SPEECHGPT_SAMPLING.temperature
        vals, idx = torch.topk(logits, SPEECHGPT_SAMPLING.top_k, dim=-1)  # descending
        probs = vals.softmax(-1)
        keep = (probs.cumsum(-1) - probs) < SPEECHGPT_SAMPLING.top_p
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        race = torch.empty_like(probs).exponential_(1)
        return idx.gather(-1, torch.argmax(probs / race, dim=-1, keepdim=True)).view(1)


class CompiledBaseline:
    """gpt-fast's recipe: an nn.Module whose weights are parameters and whose per-layer KV caches are buffers (so
    the CUDA graphs of mode="reduce-overhead" treat them as static instead of copying them in on every replay),
    masked attention over the whole static cache, compiled with torch.compile(mode="reduce-overhead")."""

    def __init__(self, w: LlamaWeights, max_seq: int):
        self.dev = w.device
        self.model = _GptFastModel(w, max_seq)
        self.step = torch.compile(self.model, mode="reduce-overhead", fullgraph=True)

    def run(self, context: int, steps: int) -> list[float]:
        """Per-step ms of the loop a gpt-fast user writes: each step feeds the previous token, the host never waits
        (steps are paced by device events recorded after each one; on the CPU by the host clock)."""
        token = torch.zeros(1, dtype=torch.long, device=self.dev)
        pos = torch.tensor([context], device=self.dev)
        cuda = self.dev.type == "cuda"
        marks: list = []
        for _ in range(steps + 1):
            token = self.step(token, pos).clone()  # cudagraph outputs are overwritten by the next replay
            pos = pos + 1
            if cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            else:
                marks.append(time.perf_counter())
        _sync(self.dev)
        if cuda:
            return [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
        return [1000.0 * (b - a) for a, b in zip(marks, marks[1:])]

# ---------------------------------------------------------------------------------------------------------------
# (a) transformers eager generate over the same weights


def hf_model_sharing(w: LlamaWeights):
    """A transformers LlamaForCausalLM whose parameters are views of `w` (no second copy of the weights)."""
    from kernels.hf_reference import build_hf_llama

    return build_hf_llama(w.arch, w.hf_views(), w.dtype, w.device)


def run_hf(model, context: int, steps: int, device: torch.device) -> list[float]:
    """Per-step times of HF eager generate, stamped by a logits processor (called once per step; generate syncs
    every step anyway for its stopping check, so the extra sync costs nothing)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    ids = torch.randint(3, SPEECHGPT_TEXT_ROWS, (1, context), device=device)
    kw = dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.8, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        stamps.clear()
        model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, logits_processor=LogitsProcessorList([Stamp()]), **kw)
    return [1000.0 * (b - a) for a, b in zip(stamps, stamps[1:])]


# ---------------------------------------------------------------------------------------------------------------
# (c) the engine


def run_engine(engine: DecodeEngine, context: int, steps: int) -> tuple[list[float], list[float]]:
    """(host-loop per-token times, graph-replay per-step times) in ms."""
    engine.truncate(0)
    engine.prefill(torch.randint(3, SPEECHGPT_TEXT_ROWS, (context,)))
    stream = engine.decode(SPEECHGPT_SAMPLING, seed=0, max_new_tokens=steps + 1, stop_ids=())
    list(stream)
    loop_ms = stream.stats.step_times_ms()[1:]  # the first interval includes the first sample from prefill logits
    replay_ms: list[float] = []
    if engine.use_graphs:
        graph = engine._graph(SPEECHGPT_SAMPLING, False)
        engine.truncate(context)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(steps):
            engine.pos_dev.fill_(context)  # re-run the step at the same context
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            replay_ms.append(start.elapsed_time(end))
    return loop_ms, replay_ms


def profile_step(engine: DecodeEngine, context: int, replays: int = 5) -> dict:
    """Kernel time per decode step (torch.profiler over graph replays): where the step's time goes, and how much of
    it is idle gaps between kernels (step time minus the sum of kernel times)."""
    from torch.profiler import ProfilerActivity, profile

    graph = engine._graph(SPEECHGPT_SAMPLING, False)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    engine.pos_dev.fill_(context)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(replays):
            engine.pos_dev.fill_(context)
            graph.replay()
        end.record()
        end.synchronize()
    step_us = 1000.0 * start.elapsed_time(end) / replays
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = getattr(e, "cuda_time_total", 0.0)
        if t > 0 and "Memset" not in e.key and "fill" not in e.key:
            rows.append({"kernel": e.key[:90], "us_per_step": t / replays, "calls_per_step": e.count / replays})
    rows.sort(key=lambda r: -r["us_per_step"])
    busy = sum(r["us_per_step"] for r in rows)
    return {"context": context, "step_us": step_us, "kernel_us": busy, "idle_us": step_us - busy,
            "kernels_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:15]}


def time_prefill(engine: DecodeEngine, n: int, repeats: int = 3, bucketed: bool | None = None) -> float:
    """Median ms of prefilling n tokens at position 0 (after one untimed run); bucketed: force the bucket-graph
    (True) or the eager (False) prefill, None = the engine's setting."""
    tokens = torch.randint(3, SPEECHGPT_TEXT_ROWS, (n,))
    saved = engine.prefill_bucketed
    if bucketed is not None:
        engine.prefill_bucketed = bucketed
    try:
        times = []
        for _ in range(repeats + 1):
            engine.truncate(0)
            _sync(engine.device)
            t0 = time.perf_counter()
            engine.prefill(tokens)
            _sync(engine.device)
            times.append(1000.0 * (time.perf_counter() - t0))
        return statistics.median(times[1:])
    finally:
        engine.prefill_bucketed = saved


# ---------------------------------------------------------------------------------------------------------------


def benchmark(
    config: str,
    device: str,
    dtype: str,
    contexts: list[int],
    steps: int,
    methods: list[str],
    gemv: str = "auto",
    json_path: Path | None = None,
    log=print,
    variants: list[str] | None = None,
    cpu_compile: bool = True,
) -> dict:
    unknown = [m for m in methods if m not in ("engine", "variants", "compile", "hf") and m not in STEP_VARIANTS]
    if unknown:
        raise ValueError(f"bench-decode: unknown methods {unknown}; known: engine, variants, compile, hf, {', '.join(STEP_VARIANTS)}")
    dev = torch.device(device)
    arch = CONFIGS[config]
    dt = DTYPES[dtype]
    name, bw = spec_bandwidth(dev)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    weights = LlamaWeights.random(arch, dt, dev, seed=0)
    log(f"[bench-decode] {config} {dtype} on {name}: random weights in {time.perf_counter() - t0:.1f}s")
    wbytes = weights.decode_bytes()
    elem = torch.finfo(dt).bits // 8
    max_seq = arch.max_position_embeddings
    out: dict = {
        "device": name,
        "spec_bandwidth_Bps": bw,
        "config": config,
        "arch": arch.__dict__,
        "dtype": dtype,
        "weight_bytes_per_step": wbytes,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "results": [],
        "prefill_ms": {},  # the engine's default prefill path (see prefill_path)
        "prefill_eager_ms": {},
        "prefill_eager_over_graph": {},
        "errors": {},
    }
    try:
        import triton

        out["versions"]["triton"] = triton.__version__
    except Exception:  # pragma: no cover - triton is optional on the CPU
        pass

    plan = []
    for requested in contexts:
        if not 0 < requested <= max_seq:
            raise ValueError(f"context {requested} is outside the {max_seq}-position window")
        # A context at the end of the window starts early enough that its decode steps still fit.
        ctx = min(requested, max_seq - steps - 1)
        if ctx != requested:
            log(f"  context {requested}: prompt of {ctx} tokens + {steps} steps ends at {ctx + steps + 1}")
        plan.append((requested, ctx))

    t0 = time.perf_counter()
    compiled_cpu = cpu_compile and dev.type == "cpu"
    engine = DecodeEngine(weights, max_seq=max_seq, gemv=gemv, unit_rows_start=SPEECHGPT_TEXT_ROWS,
                          unit_span_ids=SPEECHGPT_UNIT_SPAN_IDS, cpu_compile=compiled_cpu, cpu_draw="kept" if compiled_cpu else "hf")
    out["cpu_compile"] = compiled_cpu
    eager_engine = None
    if compiled_cpu:
        t1 = time.perf_counter()
        engine.warmup(SPEECHGPT_SAMPLING)
        out["cpu_compile_s"] = time.perf_counter() - t1
        log(f"[bench-decode] CPU decode layers compiled in {out['cpu_compile_s']:.1f}s (the `engine` rows, drawing over "
            f"the kept tokens; `engine_eager`: the defaults, eager reference ops and HF's draw)")
        eager_engine = engine.fork()  # same weights, own cache
        eager_engine.cpu_compile, eager_engine.cpu_draw = False, "hf"
    out["gemv"] = {"mode": gemv, "per_shape": engine.gemv_report}
    for kind, row in engine.gemv_report.items():
        log(f"[bench-decode] GEMV {kind:>7} {row['n']}x{row['k']}: cuBLAS {row['torch_us']:.1f} us, Triton {row['triton_us']:.1f} us "
            f"-> {row['choice']}")
    out["fused"] = engine.fused_report
    for kind, row in engine.fused_report.items():
        gbps = f"{row['gbps']:.0f} GB/s" if row.get("gbps") else "no config passed"
        log(f"[bench-decode] fused {kind:>7} {row['n']}x{row['k']}: {row['us']:.1f} us ({gbps}) with {row['best_config']}")
    log(f"[bench-decode] engine ready in {time.perf_counter() - t0:.1f}s")
    candidates = engine.step_candidates() if variants is None else [step_variant(n) for n in variants]
    if engine.use_graphs:
        t0 = time.perf_counter()
        engine.truncate(0)
        engine.prefill(torch.randint(3, SPEECHGPT_TEXT_ROWS, (plan[0][1],)))  # race the variants at the first context
        engine.tune_step(SPEECHGPT_SAMPLING, candidates=candidates)
        engine.warmup(SPEECHGPT_SAMPLING)
        out["tune"] = engine.tune_report
        log(f"[bench-decode] step variants raced at position {engine.tune_report['position']} and graph captured in "
            f"{time.perf_counter() - t0:.1f}s; chosen: {engine.tune_report['chosen']}")
        for name, row in engine.tune_report["variants"].items():
            verdict = f"{row['us_per_step']:8.1f} us/step" if row["admitted"] else f"rejected: {row.get('why')}"
            log(f"    [race] {name:>15}  {verdict}" + (f"  ({row['check']})" if row.get("check") and row["admitted"] else ""))
    chosen = engine.step_variant
    out["step_variant"] = chosen.name

    def record(method: str, context: int, step_ms: list[float], **extra) -> None:
        row = {"method": method, "context": context, **_stats(step_ms), **extra}
        nbytes = wbytes + kv_bytes(arch, context if method != "compile" else max_seq, elem)
        row["GBps"] = nbytes / (row["ms_median"] / 1000.0) / 1e9
        row["pct_spec"] = 100.0 * nbytes / (row["ms_median"] / 1000.0) / bw if bw else None
        out["results"].append(row)
        log(f"  {method:>24} ctx {context:5d}: {row['ms_median']:8.3f} ms/token (p90 {row['ms_p90']:.3f}), "
            f"{row['tok_s']:7.1f} tok/s, {row['GBps']:7.1f} GB/s" + (f", {row['pct_spec']:.1f}% of spec" if bw else ""))

    def ratios() -> None:
        out["ratios"] = {}
        for ctx in contexts:
            by = {r["method"]: r["ms_median"] for r in out["results"] if r["requested_context"] == ctx}
            if "engine" in by:
                out["ratios"][str(ctx)] = {
                    f"{m}_over_engine": t / by["engine"] for m, t in by.items() if m not in ("engine", "engine_replay")
                }

    def save() -> None:  # after every result, so a run cut short by a time limit still leaves its numbers
        ratios()
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(out, indent=2))

    def attempt(label: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:
            out["errors"][label] = traceback.format_exc(limit=6)
            log(f"  {label} failed: {type(e).__name__}: {e}")
            return False
        finally:
            save()

    def engine_at(requested: int, ctx: int) -> None:
        loop_ms, replay_ms = run_engine(engine, ctx, steps)
        record("engine", ctx, loop_ms, requested_context=requested)
        if replay_ms:
            record("engine_replay", ctx, replay_ms, requested_context=requested)
        if eager_engine is not None:
            record("engine_eager", ctx, run_engine(eager_engine, ctx, steps)[0], requested_context=requested)

    def variant_at(v, requested: int, ctx: int) -> None:
        # The same engine forced to one step variant, for the side-by-side ratios.
        engine.step_variant = v
        try:
            record(f"engine[{v.name}]", ctx, run_engine(engine, ctx, steps)[0], requested_context=requested)
        finally:
            engine.step_variant = chosen

    # Measured on their own: with `variants` every candidate that passed the race's check (but the chosen one, which
    # is "engine"), and every variant named in methods.
    tuned = (out.get("tune") or {}).get("variants", {})
    forced = [v for v in candidates if "variants" in methods and v != chosen and tuned.get(v.name, {}).get("admitted", True)]
    forced += [step_variant(m) for m in methods if m in STEP_VARIANTS and step_variant(m) not in forced]

    hf = []

    def hf_at(requested: int, ctx: int) -> None:
        if not hf:
            hf.append(hf_model_sharing(weights))
        record("hf_eager", ctx, run_hf(hf[0], ctx, min(steps, 32), dev), requested_context=requested)

    def prefill_times() -> None:
        graphs = engine.prefill_bucketed
        out["prefill_path"] = "graph" if graphs else "eager"
        if graphs:
            t0 = time.perf_counter()
            engine.warmup_prefill()
            out["prefill_capture_s"] = time.perf_counter() - t0
            log(f"[bench-decode] prefill graphs for buckets {engine.prefill_buckets} captured in {out['prefill_capture_s']:.1f}s")
        for n_tok in (128, 512, 1024):
            if n_tok < max_seq:
                key = str(n_tok)
                out["prefill_ms"][key] = time_prefill(engine, n_tok)
                if not graphs:
                    log(f"  prefill {n_tok:5d} tokens: {out['prefill_ms'][key]:.2f} ms (eager)")
                    continue
                out["prefill_eager_ms"][key] = eager = time_prefill(engine, n_tok, bucketed=False)
                out["prefill_eager_over_graph"][key] = eager / out["prefill_ms"][key]
                log(f"  prefill {n_tok:5d} tokens: graph {out['prefill_ms'][key]:.2f} ms, eager {eager:.2f} ms "
                    f"({out['prefill_eager_over_graph'][key]:.2f}x)")

    # Cheap, essential measurements first; the torch.compile baseline (minutes of compilation at 7B) last.
    for requested, ctx in plan:
        if "engine" in methods:
            attempt(f"engine@{requested}", lambda: engine_at(requested, ctx))
        for v in forced:
            attempt(f"{v.name}@{requested}", lambda: variant_at(v, requested, ctx))
        if "hf" in methods:
            attempt(f"hf@{requested}", lambda: hf_at(requested, ctx))
    attempt("prefill", prefill_times)
    if engine.use_graphs:

        def prof(v) -> None:
            engine.step_variant = v
            try:
                p = out["profile"][v.name] = profile_step(engine, plan[0][1])
            finally:
                engine.step_variant = chosen
            log(f"[bench-decode] profile ({v.name}) at ctx {p['context']}: step {p['step_us']:.0f} us "
                f"= kernels {p['kernel_us']:.0f} us ({p['kernels_per_step']:.0f} launches) + idle {p['idle_us']:.0f} us")
            for r in p["top"][:8]:
                log(f"    {r['us_per_step']:8.1f} us  x{r['calls_per_step']:5.0f}  {r['kernel']}")

        out["profile"] = {}
        unfused = StepVariant(fused=False)
        for v in [chosen] + ([unfused] if unfused in forced and unfused != chosen else []):
            attempt(f"profile[{v.name}]", lambda: prof(v))
    hf.clear()
    if "compile" in methods:
        compiled = []

        def build() -> None:
            t0 = time.perf_counter()
            compiled.append(CompiledBaseline(weights, max_seq))
            compiled[0].run(plan[0][1], 3)
            out["compile_seconds"] = time.perf_counter() - t0
            log(f"[bench-decode] torch.compile baseline compiled in {out['compile_seconds']:.1f}s")

        if attempt("compile_build", build):
            for requested, ctx in plan:
                attempt(f"compile@{requested}", lambda: record("compile", ctx, compiled[0].run(ctx, steps), requested_context=requested))
    save()
    return out


def format_table(res: dict) -> str:
    lines = [f"bench-decode: {res['config']} {res['dtype']} on {res['device']}" + (f", engine step variant {res['step_variant']}" if res.get("step_variant") else "")
             + (", engine = compiled CPU layers, engine_eager = eager reference ops" if res.get("cpu_compile") else ""),
             f"{'method':>24} {'ctx':>5} {'ms/tok':>8} {'p90':>8} {'tok/s':>8} {'GB/s':>8} {'%spec':>6}"]
    for r in res["results"]:
        pct = f"{r['pct_spec']:.1f}" if r.get("pct_spec") else "-"
        lines.append(f"{r['method']:>24} {r['context']:>5} {r['ms_median']:8.3f} {r['ms_p90']:8.3f} {r['tok_s']:8.1f} {r['GBps']:8.1f} {pct:>6}")
    for ctx, rs in res["ratios"].items():
        lines.append(f"ctx {ctx}: " + ", ".join(f"{k} = {v:.2f}x" for k, v in rs.items()))
    lines.append(f"prefill ms ({res.get('prefill_path', 'eager')}): " + ", ".join(f"{k}: {v:.2f}" for k, v in res["prefill_ms"].items()))
    if res.get("prefill_eager_ms"):
        lines.append("prefill ms (eager): " + ", ".join(
            f"{k}: {v:.2f} ({res['prefill_eager_over_graph'][k]:.2f}x the graph's)" for k, v in res["prefill_eager_ms"].items()))
    return "\n".join(lines)


def markdown_report(res: dict) -> str:
    """The run as BENCHMARKS.md tables (what a GPU session pastes, with the machine, command and date it adds)."""
    out = [f"bench-decode: {res['config']} {res['dtype']} on **{res['device']}**, "
           + ", ".join(f"{k} {v}" for k, v in res["versions"].items()), ""]
    rows = res["results"]
    contexts = sorted({r["requested_context"] for r in rows})

    def at(method: str, ctx: int) -> dict | None:
        return next((r for r in rows if r["method"] == method and r["requested_context"] == ctx), None)

    def ms(r: dict | None) -> str:
        return f"{r['ms_median']:.3f}" if r else "-"

    out += ["| context | engine ms/token (p90) | tok/s | % of spec BW | torch.compile ms | HF eager ms | compile / engine | HF / engine |",
            "|---|---|---|---|---|---|---|---|"]
    for ctx in contexts:
        e, c, h = at("engine", ctx), at("compile", ctx), at("hf_eager", ctx)
        if e is None:
            continue
        pct = f"{e['pct_spec']:.1f}" if e.get("pct_spec") else "-"
        ratio = lambda r: f"{r['ms_median'] / e['ms_median']:.2f}x" if r else "-"  # noqa: E731
        label = f"{ctx} ({e['context']})" if e["context"] != ctx else str(ctx)
        out.append(f"| {label} | {e['ms_median']:.3f} ({e['ms_p90']:.3f}) | {e['tok_s']:.0f} | {pct} | {ms(c)} | {ms(h)} | {ratio(c)} | {ratio(h)} |")
    tune = res.get("tune")
    if tune:
        out += ["", f"Step variants raced at position {tune['position']} ({tune['steps']} steps x rounds, graph replays); "
                    f"chosen: **{tune['chosen']}** (the `engine` rows).", "",
                "| variant | us / step | admitted | check, or why refused |", "|---|---|---|---|"]
        for name, v in tune["variants"].items():
            us = f"{v['us_per_step']:.1f}" if v.get("us_per_step") else "-"
            out.append(f"| {name} | {us} | {'yes' if v['admitted'] else 'no'} | {v.get('why') or v.get('check') or ''} |")
    variants = sorted({r["method"] for r in rows if r["method"].startswith("engine[")}, key=lambda m: m)
    if variants:
        out += ["", "Each variant on its own (pipelined host loop, ms/token; ratio to `engine`):", "",
                "| variant | " + " | ".join(str(c) for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
        for m in variants:
            cells = []
            for ctx in contexts:
                r, e = at(m, ctx), at("engine", ctx)
                cells.append(f"{r['ms_median']:.3f} ({r['ms_median'] / e['ms_median']:.2f}x)" if r and e else ms(r))
            out.append(f"| {m[7:-1]} | " + " | ".join(cells) + " |")
    eager = [(ctx, at("engine_eager", ctx), at("engine", ctx)) for ctx in contexts]
    if any(r for _, r, _ in eager):
        out += ["", f"CPU: `engine` runs the decode layers compiled by torch.compile (compiled in {res.get('cpu_compile_s', 0):.1f}s "
                    "at load); `engine_eager` is the same engine on the eager reference ops (the default), ms/token (ratio to `engine`): "
                + ", ".join(f"ctx {ctx}: {r['ms_median']:.3f} ({r['ms_median'] / e['ms_median']:.2f}x)" for ctx, r, e in eager if r and e)]
    for name, p in (res.get("profile") or {}).items():
        out += ["", f"Profile of `{name}` at context {p['context']}: {p['step_us']:.0f} us per step = {p['kernel_us']:.0f} us of "
                    f"kernels ({p['kernels_per_step']:.0f} launches) + {p['idle_us']:.0f} us idle.", "",
                "| kernel | us / step | launches |", "|---|---|---|"]
        out += [f"| {r['kernel']} | {r['us_per_step']:.1f} | {r['calls_per_step']:.0f} |" for r in p["top"][:10]]
    if res.get("prefill_ms"):
        eager = res.get("prefill_eager_ms") or {}
        out += ["", "Prefill ms: " + ", ".join(
            f"{k} tokens {v:.2f}" + (f" (eager {eager[k]:.2f}, {eager[k] / v:.2f}x)" if k in eager else "")
            for k, v in res["prefill_ms"].items()) + f" [{res.get('prefill_path', 'eager')}]"]
    if res.get("errors"):
        out += ["", "Errors: " + ", ".join(sorted(res["errors"]))]
    return "\n".join(out)


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--config", default="7b", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--context", type=int, nargs="+", default=[256, 1024, 2048],
                        help="prompt lengths to decode after (at the window's end the prompt is shortened by --steps)")
    parser.add_argument("--steps", type=int, default=128, help="decode steps timed per context")
    parser.add_argument("--methods", default="engine,variants,compile,hf",
                        help="comma list of engine (tuned, as users get it), variants (every step variant that passed "
                             "the race, each on its own), compile, hf, or step variant names to measure (e.g. unfused)")
    parser.add_argument("--step-variants", default=None,
                        help=f"comma list of the step variants to race and measure (default: all this device runs): "
                             f"{', '.join(STEP_VARIANTS)}")
    parser.add_argument("--gemv", default="auto", choices=["auto", "torch", "triton"],
                        help="engine GEMVs: auto = measure cuBLAS vs Triton per shape and keep the faster")
    parser.add_argument("--no-cpu-compile", dest="cpu_compile", action="store_false",
                        help="on the CPU, measure only the eager engine (default: `engine` = compiled CPU decode layers, "
                             "`engine_eager` side by side)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                        help="instead: batched decode of B sessions per step vs the batch-1 engine stepping them in turn "
                             "(kernels.bench_batch), e.g. --batch 1 2 4 8 16 32 64")
    parser.add_argument("--json", type=Path, required=True, help="write results here")


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-decode: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.batch:
        from kernels.bench_batch import batch_benchmark, markdown_table

        if any(b < 1 for b in args.batch):
            print(f"bench-decode: --batch sizes must be >= 1, got {args.batch}", file=sys.stderr)
            return 2
        res = batch_benchmark(args.config, args.device, DTYPES[dtype], sorted(set(args.batch)), args.context,
                              steps=min(args.steps, 32), json_path=args.json)
        print(markdown_table(res))
        return 0
    variants = args.step_variants.split(",") if args.step_variants else None
    res = benchmark(args.config, args.device, dtype, args.context, args.steps, args.methods.split(","), args.gemv, args.json,
                    variants=variants, cpu_compile=args.cpu_compile)
    print(format_table(res))
    return 0 if not res["errors"] else 1


if __name__ == "__main__":  # python -m kernels.bench_decode --markdown RESULT.json
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown_report(json.loads(Path(sys.argv[2]).read_text())))
    else:
        sys.exit("usage: python -m kernels.bench_decode --markdown RESULT.json (the benchmark itself: speechgpt-rt bench-decode)")
