"""The decode engine: prefill, truncate, and a streaming, cancellable decode loop.

On CUDA each decode step (all layers, the head and sampling) is one CUDA-graph replay. The step reads its input
token, position and "unit span open" flag from device memory and writes the next token there, so steps chain on
the GPU without the host. The host copies each sampled token to pinned memory asynchronously and reads it one
step behind: while it looks at token i (stop conditions, parser, cancel), step i + 1 is already queued, so the GPU
never waits for the host. A stop or cancel discards the one step computed ahead and rolls the position back.
On the CPU the same step runs eagerly with the torch reference ops.

Sampling settings are per call; a graph is captured per distinct (settings, head mode) and kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from kernels.checkpoint import LlamaCheckpoint
from kernels.model import LlamaModel, LlamaWeights
from kernels.sampling import SPEECHGPT_SAMPLING, SamplerState, SamplingParams, sample, sampling_scratch


# (N, K, dtype, device name) -> bench_gemv row with the decision, measured once per process.
_GEMV_DECISIONS: dict[tuple, dict] = {}


@dataclass
class DecodeStats:
    """Host-side timing of one decode call (seconds, perf_counter clock)."""

    started: float = 0.0
    token_times: list[float] = field(default_factory=list)  # when each token became readable on the host

    def step_times_ms(self) -> list[float]:
        t = [self.started] + self.token_times
        return [1000.0 * (b - a) for a, b in zip(t, t[1:])]


class DecodeEngine:
    def __init__(
        self,
        weights: LlamaWeights,
        max_seq: int | None = None,
        unit_rows_start: int | None = 32000,
        unit_span_ids: tuple[int, int] = (33000, 33001),
        cuda_graphs: bool = True,
        gemv: str = "torch",
    ):
        """gemv: "torch" (cuBLAS), "triton", or "auto" = measure both per weight shape on this device and keep the
        faster (kernels.gemv.bench_gemv; results cached per shape and device for the process)."""
        self.model = LlamaModel(weights, max_seq, unit_rows_start)
        self.device = self.model.device
        self.max_seq = self.model.max_seq
        self.sosp_id, self.eosp_id = unit_span_ids
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        dev = self.device
        self.state = SamplerState.create(dev)
        self.pos_dev = torch.zeros(1, dtype=torch.int32, device=dev)  # where the next token's K/V goes
        self.seq_len_dev = torch.zeros(1, dtype=torch.int32, device=dev)
        self.span_open = torch.zeros(1, dtype=torch.int32, device=dev)
        self.sampling_scratch = sampling_scratch(weights.arch.vocab_size, dev) if dev.type == "cuda" else None
        self._pos = 0  # host mirror: tokens in the cache
        self._last_logits: torch.Tensor | None = None  # logits after the last prefilled token
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._cpu_generator: torch.Generator | None = None
        self._lock = threading.Lock()  # one decode at a time
        self.pending_token: int | None = None  # last token decoded but not yet fed to the model
        self.gemv_report: dict[str, dict] = {}
        if gemv not in ("torch", "triton", "auto"):
            raise ValueError(f"gemv must be 'torch', 'triton' or 'auto', got {gemv!r}")
        if dev.type == "cuda" and gemv != "torch":
            self._choose_gemv(force_triton=gemv == "triton")
        if self.use_graphs:
            self._host_tokens = torch.zeros(2, dtype=torch.int64, pin_memory=True)
            self._events = [torch.cuda.Event(), torch.cuda.Event()]

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

    def truncate(self, pos: int) -> None:
        """Roll the cache back to its first `pos` tokens (later entries are ignored and overwritten)."""
        if not 0 <= pos <= self._pos:
            raise ValueError(f"truncate({pos}): the cache holds {self._pos} tokens")
        self._pos = pos
        self._last_logits = None
        self.pos_dev.fill_(pos)

    def prefill(self, tokens: Iterable[int] | torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        """Write tokens into the cache at start_pos (default: after what is there; earlier = truncate first).
        Returns the fp32 logits after the last token (the distribution of the next one)."""
        start = self._pos if start_pos is None else int(start_pos)
        if start > self._pos:
            raise ValueError(f"prefill at {start} would leave a gap: the cache holds {self._pos} tokens")
        ids = tokens if isinstance(tokens, torch.Tensor) else torch.tensor(list(tokens), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("prefill needs at least one token")
        logits = self.model.prefill(ids.to(self.device, torch.long).view(-1), start)
        self._pos = start + ids.numel()
        self.pos_dev.fill_(self._pos)
        self._last_logits = logits
        return logits

    # ---- decoding -------------------------------------------------------------------------------------------

    def decode(
        self,
        params: SamplingParams = SPEECHGPT_SAMPLING,
        seed: int = 0,
        max_new_tokens: int | None = None,
        speech_mode: bool = False,
        stop_ids: Iterable[int] | None = None,
        unit_span_open: bool = False,
    ) -> "DecodeStream":
        """Stream new tokens after the last prefill. speech_mode: while a unit span is open only unit and
        special rows are legal (the restricted head); False samples over the full vocabulary like the original.
        Stops after a token in stop_ids (default: EOS), at max_new_tokens, at the context end, or on cancel()."""
        if self._last_logits is None:
            raise RuntimeError("decode() needs a prefill() first (the logits of the last prompt token)")
        budget = self.max_seq - self._pos
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        stops = {params.eos_id} if stop_ids is None else set(stop_ids)
        return DecodeStream(self, params, seed, max(budget, 0), speech_mode, stops, unit_span_open)

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
            sample(logits, params, self.state, generator=self._cpu_generator)

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

    def _graph(self, params: SamplingParams, speech_mode: bool) -> torch.cuda.CUDAGraph:
        key = (params, speech_mode)
        if key in self._graphs:
            return self._graphs[key]
        # Warm-up and capture run (or record) the step, which advances device state: save and restore it.
        saved = [t.clone() for t in (self.pos_dev, self.state.token_out, self.state.num_generated, self.state.offset, self.span_open)]
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
        for t, s in zip((self.pos_dev, self.state.token_out, self.state.num_generated, self.state.offset, self.span_open), saved):
            t.copy_(s)
        self._graphs[key] = graph
        return graph

    def warmup(self, params: SamplingParams = SPEECHGPT_SAMPLING, speech_mode: bool = False) -> None:
        """Capture the graph for these settings now rather than at the first decode."""
        if self.use_graphs:
            self._graph(params, speech_mode)


class DecodeStream:
    """Iterator (and async iterator) over newly generated token ids. cancel() stops within one step."""

    def __init__(self, engine: DecodeEngine, params, seed, budget, speech_mode, stops, unit_span_open):
        self.engine = engine
        self.params = params
        self.seed = seed
        self.budget = budget
        self.speech_mode = speech_mode
        self.stops = stops
        self.unit_span_open = unit_span_open
        self.stats = DecodeStats()
        self.tokens: list[int] = []
        self.stop_reason: str | None = None
        self._cancel = threading.Event()
        self._gen = None

    def cancel(self) -> None:
        """Barge-in: no token after the one being read is yielded; the cache keeps what was consumed."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

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
        """The prefill's logits, under the speech-mode head when decoding starts inside a unit span."""
        logits, start = self.engine._last_logits, self.engine.model.unit_rows_start
        if self.speech_mode and self.unit_span_open and start is not None:
            logits = logits.clone()
            logits[:start] = float("-inf")
        return logits

    def _accept(self, token: int) -> bool:
        """Record a token; True when decoding must stop after it."""
        self.tokens.append(token)
        self.stats.token_times.append(time.perf_counter())
        if token in self.stops:
            self.stop_reason = "stop_token"
        elif len(self.tokens) >= self.budget:
            self.stop_reason = "length"
        return self.stop_reason is not None

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
            eng._sample_into_state(self._first_logits(), self.params)
            if self.speech_mode:
                eng._update_span_flag()
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
            eng._sample_into_state(self._first_logits(), self.params)  # token 0, from the prefill logits
            if self.speech_mode:
                eng._update_span_flag()
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
