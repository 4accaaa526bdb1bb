"""The decode engine: prefill, truncate, and a streaming, cancellable decode loop.

On CUDA each decode step (all layers, the head and sampling) is one CUDA-graph replay. The step reads its input
token, position and "unit span open" flag from device memory and writes the next token there, so steps chain on
the GPU without the host. The host copies each sampled token to pinned memory asynchronously and reads it one
step behind: while it looks at token i (stop conditions, parser, cancel), step i + 1 is already queued, so the GPU
never waits for the host. A stop or cancel discards the one step computed ahead and rolls the position back.
On the CPU the same step runs eagerly with the torch reference ops and draws like transformers (same tokens for a
seed); `cpu_compile` runs the layers through torch.compile instead (kernels.cpu_step, compiled once per process and
shape) and `cpu_draw="kept"` draws from the same distribution with random numbers for the kept tokens only: both
faster at small shapes, neither token-exact with transformers, so both off by default.

Sampling settings are per call; a graph is captured per distinct (settings, head mode, step variant) and kept.
How a step is launched (StepVariant: fused or unfused layers, one- or two-launch attention, programmatic dependent
launch, an L2 prefetch of the o_proj weights during attention) changes only its speed; which is fastest depends on the card, so warmup() races the variants
(tune_step) and keeps the fastest whose logits pass the check.

Prefill on CUDA replays captured graphs too: the tokens are split into chunks that fit static token buckets
(`prefill_buckets`, 16 .. 1024 by default), each chunk is padded to its bucket and run by that bucket's graph
(`LlamaModel.prefill_static`, captured on first use or by `warmup_prefill()`, in the decode graphs' memory pool).
Chunks chain through a device start position; only the last chunk's logits are copied out. A chunk no bucket fits
(the cache's last few positions), and every prefill on the CPU or with graphs off, runs eagerly (`LlamaModel.prefill`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from kernels.checkpoint import LlamaCheckpoint
from kernels.model import LlamaModel, LlamaWeights
from kernels.sampling import CPU_DRAWS, SPEECHGPT_SAMPLING, SamplerState, SamplingParams, sample, sampling_scratch


# (N, K, dtype, device name) -> bench_gemv row with the decision, measured once per process.
_GEMV_DECISIONS: dict[tuple, dict] = {}

# Static prefill token counts, one CUDA graph each (captured on first use).
PREFILL_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)


# Below about this many tokens a 7B prefill is bound by reading the weights, so padding a chunk up to its bucket
# costs (almost) nothing; above it the padded tokens cost compute (a lead from H200 arithmetic: ~2.8 ms to read
# 13.5 GB of bf16 weights = ~150 tokens of 13.4 GFLOP each at ~700 TFLOP/s).
PAD_FREE_TOKENS = 128


def plan_prefill_chunks(
    start: int, n: int, buckets: Sequence[int], max_seq: int, pad_free: int = PAD_FREE_TOKENS
) -> list[tuple[int | None, int]]:
    """Split n tokens written at start into (bucket, count) chunks, in order. A chunk uses a bucket only where the
    whole bucket fits the cache (start + bucket <= max_seq), so pad K/V never wrap onto a valid position. Each
    chunk takes the smallest fitting bucket that holds the rest when padding to it is cheap (bucket <= pad_free,
    or at most 25% padding), else the largest fitting bucket it fills (one more chunk = one more weight read,
    cheaper than computing many pads). (None, rest): no bucket fits any more (the cache's last positions), run
    the rest eagerly."""
    if n < 1 or start < 0 or start + n > max_seq:
        raise ValueError(f"prefill of {n} tokens at position {start} overflows the {max_seq}-position cache")
    plan: list[tuple[int | None, int]] = []
    ordered = sorted(buckets)
    while n > 0:
        fits = [b for b in ordered if start + b <= max_seq]
        if not fits:
            plan.append((None, n))
            break
        holds = [b for b in fits if b >= n]
        filled = [b for b in fits if b <= n]
        if holds and (holds[0] <= pad_free or 4 * holds[0] <= 5 * n or not filled):
            bucket = holds[0]
        else:
            bucket = filled[-1]
        count = min(n, bucket)
        plan.append((bucket, count))
        start, n = start + count, n - count
    return plan


def checked_prefill(tokens: Iterable[int] | torch.Tensor, start_pos: int | None, cached: int, vocab: int
                    ) -> tuple[int, torch.Tensor]:
    """A prefill's start position and its ids as a host int64 tensor, checked: the start within [0, cached] (no
    gaps), at least one token, every id inside the vocabulary. Checked on the host: an id outside the embedding
    would be a device-side assert on CUDA, which kills the process's whole CUDA context (prefill happens once per
    turn; the ids are few)."""
    start = cached if start_pos is None else int(start_pos)
    if not 0 <= start <= cached:
        raise ValueError(f"prefill at {start}: must be in [0, {cached}] (the cache holds {cached} tokens; no gaps)")
    ids = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("prefill needs at least one token")
    host = ids.detach().reshape(-1).cpu().long()
    bad = ((host < 0) | (host >= vocab)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"prefill: token id {int(host[i])} at index {i} is outside the vocabulary [0, {vocab})")
    return start, host


def decode_limits(max_seq: int, cached: int, max_new_tokens: int | None, script_len: int, params: SamplingParams,
                  stop_ids: Iterable[int] | None) -> tuple[int, set[int]]:
    """(token budget, stop ids) of a decode after `cached` tokens: the context's end, max_new_tokens and a forced
    script's length (0: none) bound the budget; the stops default to EOS."""
    budget = max_seq - cached
    if max_new_tokens is not None:
        budget = min(budget, max_new_tokens)
    if script_len:
        budget = min(budget, script_len)
    return max(budget, 0), ({params.eos_id} if stop_ids is None else set(stop_ids))


def checked_script(tokens: Sequence[int], max_seq: int, vocab: int) -> list[int]:
    """set_forced_tokens' argument as ids, checked: 1..max_seq of them, each inside the vocabulary."""
    ids = [int(t) for t in tokens]
    if not 1 <= len(ids) <= max_seq:
        raise ValueError(f"set_forced_tokens: expected 1..{max_seq} tokens, got {len(ids)}")
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"set_forced_tokens: token ids must be in [0, {vocab})")
    return ids


@dataclass
class DecodeStats:
    """Host-side timing of one decode call (seconds, perf_counter clock)."""

    started: float = 0.0
    token_times: list[float] = field(default_factory=list)  # when each token became readable on the host

    def step_times_ms(self) -> list[float]:
        t = [self.started] + self.token_times
        return [1000.0 * (b - a) for a, b in zip(t, t[1:])]


@dataclass(frozen=True)
class StepVariant:
    """How a decode step is launched. Every variant computes the same step: `fused` folds RMSNorm, RoPE, the KV write,
    SiLU*mul and the residual adds into the GEMVs (6 launches per layer instead of 10), `one_launch_attention` merges
    the attention splits in the split kernel (5), `pdl` overlaps each fused kernel's start with the previous one's
    tail (programmatic dependent launch, Hopper+), `l2_prefetch` has attention pull the o_proj weights into L2
    while DRAM would idle (Hopper+). Which is fastest depends on the card: `DecodeEngine.tune_step` measures them."""

    fused: bool = True
    pdl: bool = False
    one_launch_attention: bool = False
    l2_prefetch: bool = False

    @property
    def name(self) -> str:
        parts = (["fused" if self.fused else "unfused"] + ["pdl"] * self.pdl + ["1attn"] * self.one_launch_attention
                 + ["l2pf"] * self.l2_prefetch)
        return "+".join(parts)

    @property
    def needs_hopper(self) -> bool:
        return self.pdl or self.l2_prefetch

    @property
    def twin(self) -> "StepVariant | None":
        """The variant with the same arithmetic minus the launch tricks (pdl, one-launch attention, L2 prefetch): its
        logits must be bit-identical to this one's. None for the plain variants."""
        plain = StepVariant(fused=self.fused)
        return None if plain == self else plain


STEP_VARIANTS: dict[str, StepVariant] = {
    v.name: v
    for v in (StepVariant(), StepVariant(one_launch_attention=True), StepVariant(pdl=True),
              StepVariant(pdl=True, one_launch_attention=True), StepVariant(one_launch_attention=True, l2_prefetch=True),
              StepVariant(pdl=True, one_launch_attention=True, l2_prefetch=True), StepVariant(fused=False))
}  # in order of preference: a later variant is chosen only when it is measurably faster


def step_variant(name: str) -> StepVariant:
    try:
        return STEP_VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown decode step variant {name!r}; known: {', '.join(STEP_VARIANTS)}") from None


class DecodeEngine:
    def __init__(
        self,
        weights: LlamaWeights,
        max_seq: int | None = None,
        *,
        unit_rows_start: int | None,
        unit_span_ids: tuple[int, int],
        cuda_graphs: bool = True,
        gemv: str = "torch",
        fused: bool = True,
        pdl: bool = False,
        one_launch_attention: bool = False,
        l2_prefetch: bool = False,
        tune: bool = True,
        prefill_graphs: bool = True,
        prefill_buckets: Sequence[int] = PREFILL_BUCKETS,
        cpu_compile: bool = False,
        cpu_draw: str = "hf",
    ):
        """unit_rows_start: the first row the speech-mode head scores inside a unit span (units, then specials, to
        the vocabulary's end); None disables the speech head. unit_span_ids: (open, close) ids of a unit span. Both
        come from the tokenizer's vocabulary (agent.vocab), never from defaults here.
        fused: decode layers as six launches each (RMSNorm, RoPE + KV write, SiLU*mul and the residual
        adds ride in the Triton GEMVs; see LlamaModel.decode_step), else one kernel per op. On the CPU both compute
        the same torch reference ops.
        gemv: the unfused GEMVs and the LM head: "torch" (cuBLAS), "triton", or "auto" = measure both per weight
        shape on this device and keep the faster (kernels.gemv.bench_gemv); "auto" also races the fused kernels'
        tile configs (results cached per shape and device for the process). Otherwise fused kernels use their
        default configs.
        pdl: launch the fused path's kernels with programmatic dependent launch (CUDA, compute capability >= 9).
        one_launch_attention: decode attention as one launch per layer instead of two (same output).
        l2_prefetch: decode attention pulls the layer's o_proj weights into L2 meanwhile (compute capability >= 9).
        fused / pdl / one_launch_attention / l2_prefetch are the starting `step_variant`. tune: on CUDA with
        graphs, warmup() replaces it by the fastest variant measured on this card that passes the check (tune_step).
        prefill_graphs: on CUDA with cuda_graphs, prefill by replaying one captured graph per token bucket
        (prefill_buckets; those longer than the cache are dropped); False = eager prefill.
        cpu_compile: on the CPU, decode layers compiled by torch.compile (kernels.cpu_step: once per process and
        shape, shared by forks; warmup() compiles them) instead of the eager reference ops, which round differently:
        faster at small shapes, not bit-exact with transformers, so off by default.
        cpu_draw: how the CPU sampler draws (kernels.sampling.sample): "hf" = torch.multinomial's random stream over
        the whole vocabulary, token for token what transformers draws for a seed (V random numbers per token);
        "kept" = the same distribution from random numbers for the kept tokens only (a different stream)."""
        self.tune = tune
        self.tune_report: dict | None = None  # what tune_step measured and chose
        self.sosp_id, self.eosp_id = unit_span_ids
        self._init_conversation(LlamaModel(weights, max_seq, unit_rows_start=unit_rows_start), cuda_graphs)
        self.cpu_compile = cpu_compile
        if cpu_draw not in CPU_DRAWS:
            raise ValueError(f"cpu_draw must be one of {', '.join(CPU_DRAWS)}, got {cpu_draw!r}")
        self.cpu_draw = cpu_draw
        self.step_variant = StepVariant(fused=fused, pdl=pdl, one_launch_attention=one_launch_attention, l2_prefetch=l2_prefetch)
        self.gemv_report: dict[str, dict] = {}
        self.fused_report: dict[str, dict] = {}
        if gemv not in ("torch", "triton", "auto"):
            raise ValueError(f"gemv must be 'torch', 'triton' or 'auto', got {gemv!r}")
        if self.device.type == "cuda" and gemv != "torch":
            self._choose_gemv(force_triton=gemv == "triton")
        if self.device.type == "cuda" and gemv == "auto":
            self._choose_fused_configs()
        if any(int(b) < 1 for b in prefill_buckets):
            raise ValueError(f"prefill_buckets must be positive token counts, got {tuple(prefill_buckets)}")
        self.prefill_buckets = tuple(sorted({int(b) for b in prefill_buckets if int(b) <= self.max_seq}))
        # The bucketed (static-shape) prefill; off CUDA graphs it runs eagerly, which tests use to check the chunking.
        self.prefill_graphs = prefill_graphs
        self.prefill_bucketed = self.use_graphs and prefill_graphs and bool(self.prefill_buckets)
        self._init_prefill_buffers()

    def _init_conversation(self, model: LlamaModel, cuda_graphs: bool) -> None:
        """What one conversation owns: the model's KV cache and decode buffers, the sampler state, the device
        position, the CUDA graphs and their pool, the lock (shared with nothing; see fork)."""
        self.model = model
        self.device = dev = model.device
        self.max_seq = model.max_seq
        self.cuda_graphs = cuda_graphs
        self.use_graphs = cuda_graphs and dev.type == "cuda"
        self.state = SamplerState.create(dev)
        self.pos_dev = torch.zeros(1, dtype=torch.int32, device=dev)  # where the next token's K/V goes
        self.seq_len_dev = torch.zeros(1, dtype=torch.int32, device=dev)
        self.span_open = torch.zeros(1, dtype=torch.int32, device=dev)
        self.sampling_scratch = sampling_scratch(model.arch.vocab_size, dev) if dev.type == "cuda" else None
        self._pos = 0  # host mirror: tokens in the cache
        self._last_logits: torch.Tensor | None = None  # logits after the last prefilled token
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._cpu_generator: torch.Generator | None = None
        self._lock = threading.Lock()  # one decode at a time
        self.pending_token: int | None = None  # last token decoded but not yet fed to the model
        if self.use_graphs:
            self._host_tokens = torch.zeros(2, dtype=torch.int64, pin_memory=True)
            self._events = [torch.cuda.Event(), torch.cuda.Event()]

    def _init_prefill_buffers(self) -> None:
        dev = self.device
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prefill_tokens = torch.zeros(max(self.prefill_buckets, default=1), dtype=torch.long, device=dev)
        self._prefill_start = torch.zeros(1, dtype=torch.long, device=dev)  # advanced by each chunk on the device
        self._prefill_n = torch.zeros(1, dtype=torch.long, device=dev)  # valid tokens in the current chunk
        self._prefill_logits = torch.empty(self.model.arch.vocab_size, dtype=torch.float32, device=dev)

    def fork(self) -> "DecodeEngine":
        """A new engine for another conversation over the same weight tensors (no copy), with every load-time
        decision of this one reused as it stands, nothing measured again: GEMV and fused-kernel configs (and their
        reports), the step variant and tune_report, prefill buckets, max_seq, the speech head's rows and span ids,
        the graph flags, cpu_compile (the compiled CPU layers are shared: nothing is compiled again) and cpu_draw. The fork never
        races step variants (tune is off: fork after warmup() to share the race's choice); its warmup() only
        captures its own graphs. It owns its KV cache, decode buffers, sampler state, position, CUDA graphs, graph
        pool and lock, so forks prefill and decode independently (from different threads too)."""
        src = self.model
        twin = object.__new__(type(self))
        twin.tune, twin.tune_report = False, self.tune_report
        twin.sosp_id, twin.eosp_id = self.sosp_id, self.eosp_id
        twin._init_conversation(LlamaModel(src.w, src.max_seq, unit_rows_start=src.unit_rows_start), self.cuda_graphs)
        twin.model.gemv_choice, twin.model.fused_choice = dict(src.gemv_choice), dict(src.fused_choice)
        twin.cpu_compile, twin.cpu_draw = self.cpu_compile, self.cpu_draw
        twin.step_variant = self.step_variant
        twin.gemv_report, twin.fused_report = self.gemv_report, self.fused_report
        twin.prefill_buckets, twin.prefill_graphs, twin.prefill_bucketed = self.prefill_buckets, self.prefill_graphs, self.prefill_bucketed
        twin._init_prefill_buffers()
        return twin

    def _choose_gemv(self, force_triton: bool) -> None:
        from kernels.gemv import AUTO_CONFIGS, default_config

        shapes = self.model.gemv_shapes()
        for kind, (n, k) in shapes.items():
            if force_triton:
                self.model.gemv_choice[kind] = default_config(n, k)
                continue
            key = (n, k, self.model.dtype, torch.cuda.get_device_name(self.device))
            if key not in _GEMV_DECISIONS:
                from kernels.gemv import bench_gemv

                (row,) = bench_gemv(((n, k),), dtype=self.model.dtype, configs=AUTO_CONFIGS, device=str(self.device), verbose=False)
                # Keep Triton only when it beats cuBLAS by a margin larger than run-to-run noise.
                row["choice"] = "triton" if row["best_config"] is not None and row["torch_over_triton"] > 1.03 else "torch"
                _GEMV_DECISIONS[key] = row
            row = _GEMV_DECISIONS[key]
            self.gemv_report[kind] = {k2: (str(v) if k2 == "best_config" else v) for k2, v in row.items()}
            self.model.gemv_choice[kind] = row["best_config"] if row["choice"] == "triton" else None

    def _choose_fused_configs(self) -> None:
        """Race each fused layer kernel's tile configs on layer 0's weights and keep the fastest correct one. Where
        the plain GEMV race over the same weight shape ran (gemv="auto"), only its six fastest configs race."""
        from kernels.gemv import AUTO_CONFIGS, fastest_config, shortlist
        from kernels.gemv_residual import gemv_residual_triton
        from kernels.norm_gate_up_silu import gate_up_configs, norm_gate_up_silu_reference, norm_gate_up_silu_triton
        from kernels.norm_qkv_rope import norm_qkv_rope_reference, norm_qkv_rope_triton, qkv_configs

        m, a, L = self.model, self.model.arch, self.model.w.layers[0]
        dev, dt, eps = m.device, m.dtype, a.rms_norm_eps
        g = torch.Generator(device=dev).manual_seed(0)

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=g, device=dev).to(dt)

        hidden, attn, act = rnd(1, a.hidden_size), rnd(1, a.num_heads * a.head_dim), rnd(1, a.intermediate_size)
        caches = [torch.zeros(a.num_kv_heads, 1, a.head_dim, dtype=dt, device=dev) for _ in range(4)]
        pos0 = torch.zeros(1, dtype=torch.int32, device=dev)
        acc = torch.empty(1, a.hidden_size, dtype=dt, device=dev)
        f32 = {name: t.float() for name, t in (("hidden", hidden), ("attn_norm", L.attn_norm), ("mlp_norm", L.mlp_norm))}
        races = {
            "qkv": (
                lambda c: norm_qkv_rope_triton(hidden, L.attn_norm, L.wqkv, eps, m.cos, m.sin, pos0, caches[0], caches[1], config=c),
                lambda: norm_qkv_rope_reference(f32["hidden"], f32["attn_norm"], L.wqkv.float(), eps, m.cos, m.sin, pos0,
                                                caches[2].float(), caches[3].float()),
                qkv_configs(AUTO_CONFIGS, a.head_dim),
                L.wqkv,
            ),
            # The residual kernels add into `acc`: zero it in the launch so the check sees the plain product.
            "o": (lambda c: gemv_residual_triton(attn, L.wo, acc.zero_(), c), lambda: attn.float() @ L.wo.float().T, AUTO_CONFIGS, L.wo),
            "gate_up": (
                lambda c: norm_gate_up_silu_triton(hidden, L.mlp_norm, L.w_gate_up, eps, config=c),
                lambda: norm_gate_up_silu_reference(f32["hidden"], f32["mlp_norm"], L.w_gate_up.float(), eps),
                gate_up_configs(AUTO_CONFIGS),
                L.w_gate_up,
            ),
            "down": (lambda c: gemv_residual_triton(act, L.w_down, acc.zero_(), c), lambda: act.float() @ L.w_down.float().T, AUTO_CONFIGS, L.w_down),
        }
        for kind, (run, reference, configs, weight) in races.items():
            key = ("fused", kind, tuple(weight.shape), a.head_dim, dt, torch.cuda.get_device_name(dev))
            if key not in _GEMV_DECISIONS:
                plain = _GEMV_DECISIONS.get((*weight.shape, dt, torch.cuda.get_device_name(dev)), {})
                configs = shortlist(plain.get("us_per_config") or {}, configs) or configs
                best, best_us, times = fastest_config(run, reference(), configs)
                nbytes = weight.numel() * weight.element_size()
                _GEMV_DECISIONS[key] = {"n": weight.shape[0], "k": weight.shape[1], "best_config": best, "us": best_us,
                                        "gbps": nbytes / (best_us * 1e-6) / 1e9 if best else None, "us_per_config": times}
            row = _GEMV_DECISIONS[key]
            self.fused_report[kind] = {k2: (str(v) if k2 == "best_config" else v) for k2, v in row.items()}
            m.fused_choice[kind] = row["best_config"]  # None (no config passed the check) = the default

    @property
    def step_variant(self) -> StepVariant:
        """How decode steps are launched (see StepVariant); settable between decodes, each variant's graph is kept."""
        m = self.model
        return StepVariant(fused=m.fused, pdl=m.pdl, one_launch_attention=m.attn_one_launch, l2_prefetch=m.attn_l2_prefetch)

    @step_variant.setter
    def step_variant(self, v: StepVariant) -> None:
        self._check_idle("changing the step variant")
        if v.needs_hopper and not self._hopper():
            what = "pdl" if v.pdl else "l2_prefetch"
            raise ValueError(f"{what} needs a CUDA device of compute capability 9.0 or newer, not {self.device}")
        if v.pdl and not v.fused:
            raise ValueError("pdl applies to the fused decode layers only")
        m = self.model
        m.fused, m.pdl, m.attn_one_launch, m.attn_l2_prefetch = v.fused, v.pdl, v.one_launch_attention, v.l2_prefetch

    @property
    def cpu_compile(self) -> bool:
        """On the CPU: decode layers through torch.compile (kernels.cpu_step) instead of the eager reference ops."""
        return self.model.cpu_compiled

    @cpu_compile.setter
    def cpu_compile(self, on: bool) -> None:
        self._check_idle("changing cpu_compile")
        self.model.cpu_compiled = bool(on) and self.device.type == "cpu"

    def _hopper(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9

    @property
    def fused(self) -> bool:
        return self.model.fused

    @fused.setter
    def fused(self, on: bool) -> None:
        self.step_variant = dataclasses.replace(self.step_variant, fused=bool(on), pdl=self.pdl and bool(on))

    @property
    def pdl(self) -> bool:
        return self.model.pdl

    @pdl.setter
    def pdl(self, on: bool) -> None:
        self.step_variant = dataclasses.replace(self.step_variant, pdl=bool(on))

    def step_candidates(self) -> list[StepVariant]:
        """The variants this device can run, in order of preference."""
        if self.device.type != "cuda":
            return [StepVariant()]
        hopper = self._hopper()
        return [v for v in STEP_VARIANTS.values() if hopper or not v.needs_hopper]

    @classmethod
    def from_checkpoint(
        cls, model_dir, lora_dir=None, dtype: torch.dtype = torch.float16, device: str = "cuda", **kw
    ) -> "DecodeEngine":
        ckpt = LlamaCheckpoint(model_dir, lora_dir)
        return cls(LlamaWeights.from_checkpoint(ckpt, dtype, device), **kw)

    # ---- cache management -----------------------------------------------------------------------------------

    @property
    def pos(self) -> int:
        """Number of tokens whose K/V are in the cache."""
        return self._pos

    def _check_idle(self, what: str) -> None:
        if self._lock.locked():
            raise RuntimeError(f"{what} while a decode stream is running on this engine: finish it, or cancel() and close() it first")

    def truncate(self, pos: int) -> None:
        """Roll the cache back to its first `pos` tokens (later entries are ignored and overwritten)."""
        self._check_idle("truncate")
        if not 0 <= pos <= self._pos:
            raise ValueError(f"truncate({pos}): the cache holds {self._pos} tokens")
        self._pos = pos
        self._last_logits = None
        self.pos_dev.fill_(pos)

    def prefill(self, tokens: Iterable[int] | torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        """Write tokens into the cache at start_pos (default: after what is there; earlier = truncate first).
        Returns the fp32 logits after the last token (the distribution of the next one)."""
        self._check_idle("prefill")
        start, host = checked_prefill(tokens, start_pos, self._pos, self.model.arch.vocab_size)
        ids = host.to(self.device, torch.long)
        if self.prefill_bucketed:
            logits = self._prefill_bucketed(ids, start)
        else:
            logits = self.model.prefill(ids, start)
        self._pos = start + ids.numel()
        self.pos_dev.fill_(self._pos)
        self._last_logits = logits
        return logits

    def _prefill_bucketed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Prefill ids (device int64 [N]) at start chunk by chunk, each padded to its bucket (one graph replay on
        CUDA). Returns a copy of the fp32 logits after the last token."""
        plan = plan_prefill_chunks(start, ids.numel(), self.prefill_buckets, self.max_seq)
        graphs = {}
        if self.use_graphs:
            # Capture before any chunk runs: the valid cache is then exactly [0, start) (later entries are dropped).
            graphs = {b: self._prefill_graph(b, valid_end=start) for b, _ in plan if b is not None}
        self._prefill_start.fill_(start)
        logits, done = None, 0
        for bucket, count in plan:
            chunk = ids[done : done + count]
            if bucket is None:  # the cache's last positions: no bucket fits, run eagerly (always the last chunk)
                logits = self.model.prefill(chunk, start + done)
            else:
                # Pads keep whatever ids the buffer held (all legal ids); their K/V land after the valid tokens.
                self._prefill_tokens[:count].copy_(chunk)
                self._prefill_n.fill_(count)
                if self.use_graphs:
                    graphs[bucket].replay()
                else:
                    self._run_prefill_static(bucket)
                logits = None
            done += count
        return self._prefill_logits.clone() if logits is None else logits

    def _run_prefill_static(self, bucket: int) -> None:
        self.model.prefill_static(self._prefill_tokens[:bucket], self._prefill_start, self._prefill_n, self._prefill_logits)

    def _prefill_graph(self, bucket: int, valid_end: int) -> torch.cuda.CUDAGraph:
        """The graph of one prefill bucket, captured on first use. Cache positions [0, valid_end) hold tokens that
        must survive the capture's warm-up."""
        graph = self._prefill_graphs.get(bucket)
        if graph is not None:
            return graph
        cache = self.model.cache
        at = self.max_seq - bucket  # warm up at the cache's end: usually past every valid token
        # The warm-up really runs: it writes K/V at [at, max_seq) and moves the start. Save valid entries there.
        saved = [t[:, :, at:valid_end].clone() for t in (cache.k, cache.v)] if valid_end > at else None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles Triton kernels and lets cuBLAS/SDPA pick kernels outside the capture
                self._prefill_start.fill_(at)
                self._prefill_n.fill_(bucket)
                self._run_prefill_static(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._run_prefill_static(bucket)
        if saved is not None:
            for t, s in zip((cache.k, cache.v), saved):
                t[:, :, at:valid_end].copy_(s)
        self._prefill_graphs[bucket] = graph
        return graph

    def warmup_prefill(self, buckets: Iterable[int] | None = None) -> None:
        """Capture the prefill graphs of these buckets (default: all) now rather than at the first prefill that
        needs them; the cache contents are kept. A no-op where prefill runs eagerly."""
        if not (self.prefill_bucketed and self.use_graphs):
            return
        for b in self.prefill_buckets if buckets is None else buckets:
            if b not in self.prefill_buckets:
                raise ValueError(f"warmup_prefill: {b} is not one of this engine's prefill buckets {self.prefill_buckets}")
            self._prefill_graph(b, valid_end=self._pos)

    # ---- decoding -------------------------------------------------------------------------------------------

    def decode(
        self,
        params: SamplingParams = SPEECHGPT_SAMPLING,
        seed: int = 0,
        max_new_tokens: int | None = None,
        speech_mode: bool = False,
        stop_ids: Iterable[int] | None = None,
        unit_span_open: bool = False,
        text_first: bool = False,
    ) -> "DecodeStream":
        """Stream new tokens after the last prefill. speech_mode: while a unit span is open only unit and
        special rows are legal (the restricted head); False samples over the full vocabulary like the original.
        text_first: the first token is drawn from the text rows only (an answer wanted as text must not open with
        a unit span). Stops after a token in stop_ids (default: EOS), at max_new_tokens, at the context end, or on
        cancel()."""
        if self._last_logits is None:
            raise RuntimeError("decode() needs a prefill() first (the logits of the last prompt token)")
        budget, stops = decode_limits(self.max_seq, self._pos, max_new_tokens, self.forced_tokens, params, stop_ids)
        return DecodeStream(self, params, seed, budget, speech_mode, stops, unit_span_open, text_first)

    def _reset_sampler(self, seed: int) -> None:
        self.state.reset(num_generated=0, seed=seed, offset=0)
        if self.device.type != "cuda":
            # CPU: one torch.Generator per call, drawn like HF's multinomial (same stream as the reference).
            self._cpu_generator = torch.Generator().manual_seed(seed)

    def _sample_into_state(self, logits: torch.Tensor, params: SamplingParams) -> None:
        if self.device.type == "cuda":
            from kernels.sampling import sample_triton

            sample_triton(logits, params, self.state, scratch=self.sampling_scratch)
        else:
            sample(logits, params, self.state, generator=self._cpu_generator, cpu_draw=self.cpu_draw)
        if self.forced_tokens:
            # token k of the answer (num_generated is k + 1 now) comes from the script; on the device, so it is
            # part of the captured graph
            st, buf = self.state, self._forced_buf
            k = torch.minimum(st.num_generated.long() - 1, self._forced_last)
            st.token_out.copy_(buf.index_select(0, k.clamp_min(0)))

    # ---- scripted answers (benchmarks) ----------------------------------------------------------------------

    forced_tokens: int = 0  # length of the script in use (0: sample)

    def set_forced_tokens(self, tokens: Sequence[int] | None) -> None:
        """Benchmarks: from now on every decode emits these tokens, one per step, instead of sampling, and stops
        after the last one. The model still runs every step (the work is the real work), so random weights give a
        fixed, repeatable workload. None: sample again."""
        self._check_idle("set_forced_tokens")
        if tokens is None:
            self.forced_tokens = 0
            return
        ids = torch.tensor(checked_script(tokens, self.max_seq, self.model.arch.vocab_size), dtype=torch.int64)
        if getattr(self, "_forced_buf", None) is None:  # one buffer for the engine's life: graphs keep its address
            self._forced_buf = torch.zeros(self.max_seq, dtype=torch.int64, device=self.device)
            self._forced_last = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._forced_buf[: ids.numel()].copy_(ids)
        self._forced_last.fill_(ids.numel() - 1)
        self.forced_tokens = int(ids.numel())

    def _update_span_flag(self) -> None:
        tok = self.state.token_out
        opened = (tok == self.sosp_id).to(torch.int32)
        closed = (tok == self.eosp_id).to(torch.int32)
        # open -> 1, close -> 0, anything else keeps the flag (all on the device)
        self.span_open.copy_(opened + (1 - opened) * (1 - closed) * self.span_open)

    def _step(self, params: SamplingParams, speech_mode: bool) -> None:
        """One decode step: consume state.token_out at pos_dev, sample the next into state.token_out."""
        logits = self.model.decode_step(self.state.token_out, self.pos_dev, self.seq_len_dev, self.span_open if speech_mode else None)
        self._sample_into_state(logits, params)
        if speech_mode:
            self._update_span_flag()

    def _device_state(self) -> tuple[torch.Tensor, ...]:
        """What a decode step advances on the device."""
        st = self.state
        return (self.pos_dev, st.token_out, st.num_generated, st.offset, self.span_open)

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._device_state(), saved):
            t.copy_(s)

    def _graph(self, params: SamplingParams, speech_mode: bool) -> torch.cuda.CUDAGraph:
        key = (params, speech_mode, self.step_variant, bool(self.forced_tokens))
        if key in self._graphs:
            return self._graphs[key]
        # Warm-up and capture run (or record) the step, which advances device state: save and restore it.
        saved = [t.clone() for t in self._device_state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the Triton kernels outside the capture
                self._step(params, speech_mode)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._step(params, speech_mode)
        self._restore(saved)
        self._graphs[key] = graph
        return graph

    def warmup(self, params: SamplingParams = SPEECHGPT_SAMPLING, speech_mode: bool = False) -> None:
        """Capture the graph for these settings now rather than at the first decode. With `tune` (the default) the
        first warmup also picks the fastest step variant on this card (tune_step). On the CPU with cpu_compile it
        compiles the decode layers (once per process and shape)."""
        if self.model.cpu_compiled:
            self.model.warm_cpu_compiled()
        if not self.use_graphs:
            return
        if self.tune and self.tune_report is None:
            self.tune_step(params, speech_mode)
        self._graph(params, speech_mode)

    def tune_step(
        self,
        params: SamplingParams = SPEECHGPT_SAMPLING,
        speech_mode: bool = False,
        candidates: Sequence[StepVariant] | None = None,
        steps: int = 8,
        rounds: int = 5,
    ) -> dict:
        """Race the decode step variants (default: step_candidates()) and keep the fastest one that passes the check.

        Every candidate runs the same `steps` decode steps from the same device state, at the positions right after
        the cache's valid tokens (their K/V land where the next decode overwrites them; the state is restored).
        Check: a variant with a twin (pdl, one-launch attention, L2 prefetch) must give its twin's logits bit for bit at every
        step, since it only launches the same arithmetic differently (a mismatch means a synchronisation bug); the
        fused path's first-step logits must agree with the unfused path's (relative L2 <= 0.3: a sanity bound, the
        two round differently). Speed: the median over `rounds` interleaved rounds of the mean step time (CUDA
        events over graph replays; the host clock on the CPU). A candidate later in the preference order replaces
        the choice so far only when at least 0.5% faster. Sets step_variant; returns (and keeps) the report."""
        self._check_idle("tune_step")
        start_variant = self.step_variant
        cands = list(self.step_candidates() if candidates is None else candidates)
        steps = min(steps, self.max_seq - self._pos)
        report: dict = {"position": self._pos, "steps": steps, "variants": {}, "chosen": start_variant.name}
        if steps < 1 or not cands:
            report["skipped"] = "the cache is full" if steps < 1 else "no candidates"
            self.tune_report = report
            return report
        cuda = self.device.type == "cuda"
        saved = [t.clone() for t in self._device_state()]

        def run(v: StepVariant, record_logits: bool) -> tuple[float, list[torch.Tensor]]:
            """Run `steps` steps of variant v from the saved state; (seconds per step, logits per step)."""
            self.step_variant = v
            graph = self._graph(params, speech_mode) if self.use_graphs else None
            self._restore(saved)
            logits = []
            if cuda:
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
            else:
                t_host = time.perf_counter()
            for _ in range(steps):
                if graph is not None:
                    graph.replay()
                else:
                    self._step(params, speech_mode)
                if record_logits:
                    logits.append(self.model.logits.clone())
            if cuda:
                t1.record()
                t1.synchronize()
                return t0.elapsed_time(t1) / 1000.0 / steps, logits
            return (time.perf_counter() - t_host) / steps, logits

        chosen = start_variant
        try:
            outputs: dict[StepVariant, list[torch.Tensor]] = {}
            for v in cands:
                report["variants"][v.name] = {"admitted": False}
                try:
                    outputs[v] = run(v, record_logits=True)[1]
                except Exception as e:  # a variant this stack cannot build or run is simply not a candidate
                    report["variants"][v.name]["why"] = f"{type(e).__name__}: {e}"[:300]
            admitted = [v for v in sorted(outputs, key=lambda v: v.twin is not None) if self._passes(v, outputs, report)]
            admitted.sort(key=cands.index)
            times: dict[StepVariant, list[float]] = {v: [] for v in admitted}
            for r in range(rounds if admitted else 0):  # interleaved, in a rotated order: drift hits all alike
                for v in admitted[r % len(admitted):] + admitted[: r % len(admitted)]:
                    times[v].append(run(v, record_logits=False)[0])
            best = None
            for v in admitted:
                row = report["variants"][v.name]
                row["us_per_step"] = 1e6 * sorted(times[v])[len(times[v]) // 2]
                if best is None or row["us_per_step"] < 0.995 * report["variants"][best.name]["us_per_step"]:
                    best = v
            chosen = best or start_variant
        finally:
            self._restore(saved)
        self.step_variant = chosen
        report["chosen"] = chosen.name
        self.tune_report = report
        return report

    @staticmethod
    def _passes(v: StepVariant, outputs: dict[StepVariant, list[torch.Tensor]], report: dict) -> bool:
        """tune_step's check of variant v's logits (see there); called for plain variants before their twins."""
        row = report["variants"][v.name]
        if v.twin is not None:
            ref = v.twin
            if not report["variants"].get(ref.name, {}).get("admitted"):
                row["why"] = f"its twin {ref.name} is not admitted"
                return False
            got, want = outputs[v], outputs[ref]
            # (masked rows are -inf in both under the speech head: compare those as equal, not as NaN)
            diff = max(float(torch.where(a == b, 0.0, a - b).abs().max()) for a, b in zip(got, want))
            row["check"] = f"max |logit - {ref.name}'s| = {diff:.3g} over {len(got)} steps (must be 0)"
            ok = all(torch.equal(a, b) for a, b in zip(got, want))
        elif v.fused and StepVariant(fused=False) in outputs:
            got, want = outputs[v][0], outputs[StepVariant(fused=False)][0]
            finite = torch.isfinite(want)
            if not torch.equal(finite, torch.isfinite(got)):
                rel = float("inf")
            else:
                rel = float((got[finite] - want[finite]).norm() / want[finite].norm().clamp_min(1e-30))
            row["check"] = f"first-step relative L2 vs unfused: {rel:.3g} (bound 0.3)"
            ok = rel <= 0.3
        else:
            ok = True
        if not ok:
            row["why"] = "failed the check: " + row["check"]
        row["admitted"] = ok
        return ok


class TokenStream:
    """Iterator (and async iterator) over newly generated token ids; cancel() stops within one step. The shell
    shared by the batch-1 engine's DecodeStream and the batched engine's stream (kernels.batch_engine): a subclass
    defines `_run`, the generator of tokens."""

    def __init__(self, engine, params, seed, budget, speech_mode, stops, unit_span_open, text_first=False):
        self.engine = engine
        self.params = params
        self.seed = seed
        self.budget = budget
        self.speech_mode = speech_mode
        self.stops = stops
        self.unit_span_open = unit_span_open
        self.text_first = text_first
        self.stats = DecodeStats()
        self.tokens: list[int] = []
        self.stop_reason: str | None = None
        self._cancel = threading.Event()
        self._gen = None

    def first_token_logits(self, logits: torch.Tensor, unit_rows_start: int | None) -> torch.Tensor:
        """The logits token 0 is drawn from (the prefill's): starting inside a unit span under the speech-mode head,
        only the unit and special rows; with text_first, only the rows below them (the answer starts in text)."""
        if unit_rows_start is None:
            return logits
        if self.speech_mode and self.unit_span_open:
            logits = logits.clone()
            logits[:unit_rows_start] = float("-inf")
        elif self.text_first:
            logits = logits.clone()
            logits[unit_rows_start:] = float("-inf")
        return logits

    def cancel(self) -> None:
        """Barge-in: no token after the one being read is yielded; the cache keeps what was consumed."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self) -> None:
        """Stop now and release the engine (for a caller that abandons the stream mid-way); the cache keeps what
        was consumed, as after cancel()."""
        self._cancel.set()
        if self._gen is not None:
            self._gen.close()

    def __iter__(self):
        if self._gen is None:
            self._gen = self._run()
        return self._gen

    def __next__(self) -> int:
        return next(iter(self))

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        it = iter(self)
        # Each step blocks (GPU wait or CPU compute) for a few ms: run it off the event loop.
        token = await asyncio.to_thread(next, it, None)
        if token is None:
            raise StopAsyncIteration
        return token

    def _accept(self, token: int) -> bool:
        """Record a token; True when decoding must stop after it."""
        self.tokens.append(token)
        self.stats.token_times.append(time.perf_counter())
        if token in self.stops:
            self.stop_reason = "stop_token"
        elif len(self.tokens) >= self.budget:
            self.stop_reason = "length"
        return self.stop_reason is not None

    def _run(self):
        raise NotImplementedError


class DecodeStream(TokenStream):
    """The batch-1 engine's stream: steps run on the reader's thread (eagerly, or as CUDA-graph replays one step
    ahead of the reader)."""

    # ---- the loop -------------------------------------------------------------------------------------------

    def _run(self):
        eng = self.engine
        if not eng._lock.acquire(blocking=False):
            raise RuntimeError("another decode is running on this engine")
        try:
            yield from (self._run_cuda() if eng.use_graphs else self._run_eager())
        finally:
            eng._last_logits = None
            eng._lock.release()

    def _begin(self) -> int:
        eng = self.engine
        eng._reset_sampler(self.seed)
        eng.span_open.fill_(int(self.unit_span_open))
        self.stats.started = time.perf_counter()
        return eng._pos

    def _first_logits(self) -> torch.Tensor:
        return self.first_token_logits(self.engine._last_logits, self.engine.model.unit_rows_start)

    def _draw_first_token(self) -> None:
        """Token 0 comes from the prefill's logits (into state.token_out, on the device); later ones from steps."""
        self.engine._sample_into_state(self._first_logits(), self.params)
        if self.speech_mode:
            self.engine._update_span_flag()

    def _finish(self, start_pos: int) -> None:
        # Every yielded token except the last was fed to the model; the last one is pending.
        eng = self.engine
        eng._pos = start_pos + max(len(self.tokens) - 1, 0)
        eng.pos_dev.fill_(eng._pos)
        eng.pending_token = self.tokens[-1] if self.tokens else None

    def _run_eager(self):
        eng = self.engine
        start = self._begin()
        if self.budget <= 0:
            self.stop_reason = "length"
            return
        try:
            self._draw_first_token()
            while True:
                token = int(eng.state.token_out[0])
                stop = self._accept(token)
                yield token
                if stop:
                    return
                if self._cancel.is_set():
                    self.stop_reason = "cancelled"
                    return
                eng._step(self.params, self.speech_mode)
        finally:
            self._finish(start)

    def _run_cuda(self):
        eng = self.engine
        graph = eng._graph(self.params, self.speech_mode)
        start = self._begin()
        if self.budget <= 0:
            self.stop_reason = "length"
            return
        host, events = eng._host_tokens, eng._events
        stream = torch.cuda.current_stream()

        def publish(slot: int) -> None:
            host[slot : slot + 1].copy_(eng.state.token_out, non_blocking=True)
            events[slot].record(stream)

        try:
            self._draw_first_token()
            publish(0)
            i = 0
            while True:
                ahead = i + 1 < self.budget and not self._cancel.is_set()
                if ahead:  # queue step i + 1 before reading token i
                    graph.replay()
                    publish((i + 1) % 2)
                events[i % 2].synchronize()
                token = int(host[i % 2])
                stop = self._accept(token)
                yield token
                if stop:
                    return
                if self._cancel.is_set():
                    self.stop_reason = "cancelled"
                    return
                i += 1
        finally:
            torch.cuda.current_stream().synchronize()
            self._finish(start)
