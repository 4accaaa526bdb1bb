"""Many conversations on one model: a scheduler thread that steps every decoding session in one batched forward.

`BatchedEngine` owns the slot KV cache (kernels.slot_cache), the batched step (kernels.batched_step) and one
scheduler thread. `open_slot()` admits a session and returns a `SlotEngine`: the same interface as the batch-1
`DecodeEngine` the Session uses (max_seq, pos, truncate, prefill, decode -> a token stream with cancel/close,
set_forced_tokens) plus `deadline` and `release()`. Nothing in a session changes but where its work runs.

Each scheduler iteration (docs/batching.md):
1. Decode rows: every session whose stream is running and whose reader has taken its tokens (at most `lookahead`
   tokens run ahead of the reader, so a paused reader pauses its row and a cancel discards at most that much).
   Rows are ordered by deadline (the session-clock time its playout runs dry; None = now); a row whose deadline is
   more than `skip_slack_s` away skips the step (it has audio buffered), and at most `max_batch_rows` rows run.
   One batched forward, then each row samples with its own parameters and its own random stream (the batch-1
   engine's draw, so a session's tokens for a seed do not depend on its neighbours).
2. Prefill: queued prefills (a new turn's prompt) run in chunks that share the iteration's `token_budget` with
   the decode rows, so a long prompt never stalls the others' audio; with nobody decoding a chunk may take
   `max_prefill_chunk` tokens.
Admission: `open_slot()` refuses (AdmissionRefused, with the reason) when no slot is free, or when the step time
measured at this many rows (extrapolated linearly from the batch sizes seen) would exceed the real-time budget
(`step_margin / real_time_tokens_per_s`) with one more session speaking.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from kernels.batched_step import BatchedDecoder
from kernels.engine import TokenStream, checked_prefill, checked_script, decode_limits
from kernels.model import LlamaModel, LlamaWeights
from kernels.batched_sampling import sample_rows
from kernels.sampling import CPU_DRAWS, SPEECHGPT_SAMPLING, SamplerState, SamplingParams
from kernels.slot_cache import SlotKVCache, slots_that_fit

log = logging.getLogger(__name__)

__all__ = ["AdmissionRefused", "BatchConfig", "BatchedEngine", "BatchedStream", "SlotEngine", "StepRecord", "pick_rows"]


@dataclass(frozen=True)
class BatchConfig:
    max_sessions: int | None = None  # KV slots; None: as many as fit in free GPU memory (CUDA), 8 on the CPU
    max_seq: int | None = None  # positions per slot (default: the model's trained context)
    token_budget: int = 64  # tokens per iteration: decode rows plus prefill chunk
    min_prefill_chunk: int = 8  # a queued prefill advances at least this much per iteration, however many rows decode
    max_prefill_chunk: int = 512  # the largest chunk when nobody decodes
    max_batch_rows: int | None = None  # rows per step (default: every slot)
    lookahead: int = 2  # tokens a row may compute ahead of its reader (2: a reader a moment late still makes the next step)
    skip_slack_s: float = 2.0  # a row whose deadline is further away than this skips the step
    admission: bool = True  # refuse sessions the measured step time cannot serve in real time
    real_time_tokens_per_s: float = 50.0  # what one speaking session consumes (50 units per second)
    step_margin: float = 0.8  # admit while the predicted step stays within this share of the real-time budget
    row_quantum: int = 4  # rows are padded to a multiple of this (see kernels.batched_step)
    memory_fraction: float = 0.9  # of free GPU memory for the slots, when max_sessions is None
    # the CPU draw (kernels.sampling.CPU_DRAWS): "kept" shares one top-k over the batch (kernels.batched_sampling);
    # "hf" is transformers' random stream, V random numbers per row and token (unshareable, so batching gains less)
    cpu_draw: str = "kept"
    step_log: int = 4096  # iterations kept in BatchedEngine.steps

    def __post_init__(self) -> None:
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ValueError(f"BatchConfig.max_sessions must be >= 1, got {self.max_sessions}")
        if self.token_budget < 1 or self.min_prefill_chunk < 1 or self.max_prefill_chunk < self.min_prefill_chunk:
            raise ValueError("BatchConfig: token_budget and min_prefill_chunk must be >= 1, max_prefill_chunk >= min_prefill_chunk")
        if self.lookahead < 1:
            raise ValueError(f"BatchConfig.lookahead must be >= 1, got {self.lookahead}")
        if self.cpu_draw not in CPU_DRAWS:
            raise ValueError(f"BatchConfig.cpu_draw must be one of {', '.join(CPU_DRAWS)}, got {self.cpu_draw!r}")


class AdmissionRefused(RuntimeError):
    """open_slot() cannot admit another session; the message says why."""


@dataclass
class StepRecord:
    """One scheduler iteration."""

    at: float  # clock time it started
    slots: tuple[int, ...]  # decode rows, in deadline order
    prefill: tuple[tuple[int, int], ...]  # (slot, tokens) prefilled
    skipped: tuple[int, ...]  # slots that could have stepped but had slack
    step_s: float  # the batched forward + sampling (0 without rows)
    prefill_s: float


@dataclass
class _Prefill:
    slot: "SlotEngine"
    ids: torch.Tensor  # host int64
    start: int
    done: int = 0
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class _Row:
    """A running decode stream as the scheduler sees it (touched under the engine's lock)."""

    def __init__(self, stream: "BatchedStream", first_logits: torch.Tensor, start: int):
        self.stream = stream
        self.first_logits = first_logits
        self.next_pos = start  # where the last sampled token's K/V go
        self.sampled: list[int] = []
        self.queue: collections.deque[int] = collections.deque()
        self.span_open = stream.unit_span_open
        self.finished = False  # no more steps (stop token, budget, cancel, or an error)
        self.error: BaseException | None = None
        dev = stream.engine.batch.device
        self.state = SamplerState.create(dev, seed=stream.seed)
        self.generator = torch.Generator().manual_seed(stream.seed) if dev.type != "cuda" else None


def pick_rows(deadlines: dict[int, float | None], now: float, max_rows: int, skip_slack_s: float
              ) -> tuple[list[int], list[int], float | None]:
    """The scheduling policy of one iteration, over the slots ready to step and their deadlines (None: now): the
    rows to step, most urgent first (no deadline first, then by deadline; at most max_rows); the slots skipped because
    their deadline is more than skip_slack_s away; and when the earliest skipped slot comes due (seconds from now,
    None without skips)."""
    order = sorted(deadlines, key=lambda s: (deadlines[s] is not None, deadlines[s] or 0.0, s))
    rows, skipped, wake = [], [], None
    for slot in order:
        d = deadlines[slot]
        if d is not None and d - now > skip_slack_s:
            skipped.append(slot)
            wake = min(wake if wake is not None else float("inf"), max(d - now - skip_slack_s, 0.001))
        elif len(rows) < max_rows:
            rows.append(slot)
    return rows, skipped, wake


class BatchedEngine:
    def __init__(self, weights: LlamaWeights, *, unit_rows_start: int | None, unit_span_ids: tuple[int, int],
                 config: BatchConfig = BatchConfig(), clock: Callable[[], float] = time.monotonic):
        """unit_rows_start / unit_span_ids: as for DecodeEngine (from the tokenizer's vocabulary). clock: the time
        SlotEngine.deadline is given in (time.monotonic, as the Session sets it; tests inject a virtual one)."""
        self.w = weights
        self.config = config
        self.device = weights.device
        self.clock = clock
        self.unit_rows_start = unit_rows_start
        self.sosp_id, self.eosp_id = unit_span_ids
        arch = weights.arch
        self.max_seq = config.max_seq or arch.max_position_embeddings
        slots = config.max_sessions
        if slots is None:
            slots = slots_that_fit(arch, self.max_seq, weights.dtype, self.device, config.memory_fraction) if self.device.type == "cuda" else 8
            if slots < 1:
                raise ValueError(f"no KV slot of {self.max_seq} positions fits in free GPU memory")
        self.cache = SlotKVCache(arch, slots, self.max_seq, weights.dtype, self.device)
        self.decoder = BatchedDecoder(weights, self.cache, unit_rows_start=unit_rows_start, row_quantum=config.row_quantum)
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=config.step_log)
        self.step_times: dict[int, float] = {}  # padded rows -> moving average of the step's seconds
        self._lock = threading.Condition()
        self._rows: dict[int, _Row] = {}  # slot -> running stream
        self._prefills: collections.deque[_Prefill] = collections.deque()
        self._open: dict[int, SlotEngine] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batched-engine", daemon=True)
        self._thread.start()

    # ---- sessions -------------------------------------------------------------------------------------------

    @property
    def sessions(self) -> int:
        return len(self._open)

    def open_slot(self) -> "SlotEngine":
        """Admit one more session; raises AdmissionRefused (with the reason) when it cannot be served."""
        with self._lock:
            if self._closed:
                raise AdmissionRefused("the batched engine is closed")
            if self.config.admission:
                predicted = self.predicted_step_s(len(self._open) + 1)
                budget = self.config.step_margin / self.config.real_time_tokens_per_s
                if predicted is not None and predicted > budget:
                    raise AdmissionRefused(
                        f"{len(self._open) + 1} sessions would need a {1000 * predicted:.1f} ms decode step (measured), over the "
                        f"{1000 * budget:.1f} ms real-time budget ({self.config.real_time_tokens_per_s:g} tokens/s per session, "
                        f"margin {self.config.step_margin:g})")
            slot = self.cache.allocate()
            if slot is None:
                raise AdmissionRefused(f"all {self.cache.slots} KV slots are in use")
            eng = SlotEngine(self, slot)
            self._open[slot] = eng
            return eng

    def predicted_step_s(self, sessions: int) -> float | None:
        """The step time of `sessions` rows from the measured ones (padded sizes; a linear fit through the two
        largest measured sizes, or proportional from one); None before any measurement."""
        if not self.step_times:
            return None
        rows = self.decoder.padded(sessions)
        if rows in self.step_times:
            return self.step_times[rows]
        known = sorted(self.step_times)
        if len(known) == 1 or rows < known[0]:
            b = known[0] if rows < known[0] else known[-1]
            return self.step_times[b] * rows / b
        (b0, b1) = known[-2:] if rows > known[-1] else next((a, c) for a, c in zip(known, known[1:]) if a < rows < c)
        t0, t1 = self.step_times[b0], self.step_times[b1]
        return t0 + (t1 - t0) * (rows - b0) / (b1 - b0)

    def _release(self, eng: "SlotEngine") -> None:
        with self._lock:
            row = self._rows.pop(eng.slot, None)
            if row is not None:
                row.finished = True
            self._open.pop(eng.slot, None)
            self.cache.release(eng.slot)
            self._lock.notify_all()

    def close(self) -> None:
        """Stop the scheduler thread (running streams end as cancelled; queued prefills fail)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    # ---- the scheduler thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if not self._iterate():
                    return
            except Exception as e:  # a fault here must not hang every session: fail what is in flight, go on
                log.exception("batched engine iteration failed")
                with self._lock:
                    self._fail_all(e)

    def _iterate(self) -> bool:
        """One scheduler iteration (see the module doc); False once the engine is closed."""
        with self._lock:
            rows, skipped, wait = self._pick_rows()
            while not rows and not self._prefills and not self._closed:
                self._lock.wait(timeout=wait)
                rows, skipped, wait = self._pick_rows()
            if self._closed:
                self._fail_all(RuntimeError("the batched engine was closed"))
                return False
            decoding = any(not r.finished for r in self._rows.values())
        t0 = self.clock()
        step_s = self._decode(rows) if rows else 0.0
        budget = (max(self.config.token_budget - len(rows), self.config.min_prefill_chunk) if decoding
                  else self.config.max_prefill_chunk)
        p0 = time.perf_counter()
        done = self._prefill(budget)
        self.steps.append(StepRecord(t0, tuple(r.stream.engine.slot for r in rows), tuple(done),
                                     tuple(skipped), step_s, time.perf_counter() - p0 if done else 0.0))
        return True

    def _pick_rows(self) -> tuple[list[_Row], list[int], float | None]:
        """(rows to step, in deadline order; slots skipped for slack; how long to sleep when there is nothing)."""
        cfg = self.config
        ready = {r.stream.engine.slot: r for r in self._rows.values() if not r.finished and len(r.queue) < cfg.lookahead}
        chosen, skipped, wake = pick_rows({slot: r.stream.engine.deadline for slot, r in ready.items()}, self.clock(),
                                          cfg.max_batch_rows or self.cache.slots, cfg.skip_slack_s)
        return [ready[s] for s in chosen], skipped, wake

    def _decode(self, rows: list[_Row]) -> float:
        """Sample each new row's first token from its prefill logits, feed every other row's last token in one
        batched step and sample its next; publish the tokens. Returns the step's seconds."""
        t0 = time.perf_counter()
        fresh = [r for r in rows if not r.sampled]
        stepping = [r for r in rows if r.sampled]
        outputs: list[tuple[_Row, torch.Tensor]] = [(r, r.first_logits) for r in fresh]
        try:
            if stepping:
                logits = self.decoder.step([r.sampled[-1] for r in stepping], [r.next_pos for r in stepping],
                                           [r.stream.engine.slot for r in stepping],
                                           [r.span_open and r.stream.speech_mode for r in stepping])
                for r in stepping:
                    r.next_pos += 1
                outputs += list(zip(stepping, logits))
            tokens = self._sample(outputs)
        except Exception as e:  # a failed step ends these rows' streams with the error; the engine goes on
            with self._lock:
                for r in rows:
                    r.error, r.finished = e, True
                self._lock.notify_all()
            return time.perf_counter() - t0
        elapsed = time.perf_counter() - t0
        if stepping:
            n = self.decoder.padded(len(stepping))
            old = self.step_times.get(n)
            self.step_times[n] = elapsed if old is None else 0.8 * old + 0.2 * elapsed
        with self._lock:
            for (r, _), tok in zip(outputs, tokens):
                s = r.stream
                r.sampled.append(tok)
                r.queue.append(tok)
                if tok == self.sosp_id:
                    r.span_open = True
                elif tok == self.eosp_id:
                    r.span_open = False
                if tok in s.stops or len(r.sampled) >= s.budget or s.cancelled:
                    r.finished = True
            self._lock.notify_all()
        return elapsed

    def _sample(self, outputs: list[tuple[_Row, torch.Tensor]]) -> list[int]:
        start = self.unit_rows_start
        rows = []
        for r, logits in outputs:
            rows.append(logits if r.sampled else r.stream.first_token_logits(logits, start))
        streams = [r.stream for r, _ in outputs]
        tokens = sample_rows(torch.stack(rows), [s.params for s in streams], [r.state for r, _ in outputs],
                             [r.generator for r, _ in outputs], self.config.cpu_draw)
        for i, (r, _) in enumerate(outputs):
            forced = r.stream.engine.forced
            if forced:  # a scripted answer (benchmarks): the model ran, the script decides the token
                tokens[i] = forced[min(len(r.sampled), len(forced) - 1)]
        return tokens

    def _prefill(self, budget: int) -> list[tuple[int, int]]:
        done: list[tuple[int, int]] = []
        while budget > 0:
            with self._lock:
                if not self._prefills:
                    break
                job = self._prefills[0]
            n = min(budget, job.ids.numel() - job.done)
            try:
                chunk = job.ids[job.done: job.done + n].to(self.device)
                job.logits = job.slot.model.prefill(chunk, job.start + job.done)
            except Exception as e:
                job.error = e
                n = job.ids.numel() - job.done
            job.done += n
            budget -= n
            done.append((job.slot.slot, n))
            if job.done >= job.ids.numel():
                with self._lock:
                    self._prefills.popleft()
                job.finished.set()
        return done

    def _fail_all(self, error: BaseException) -> None:
        for r in self._rows.values():
            r.error, r.finished = error, True
        for job in self._prefills:
            job.error = error
            job.finished.set()
        self._prefills.clear()
        self._lock.notify_all()

    def _submit_prefill(self, job: _Prefill) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the batched engine is closed")
            self._prefills.append(job)
            self._lock.notify_all()
        job.finished.wait()
        if job.error is not None:
            raise job.error

    def _start_row(self, row: _Row) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the batched engine is closed")
            self._rows[row.stream.engine.slot] = row
            self._lock.notify_all()

    def _end_row(self, slot: int) -> None:
        with self._lock:
            row = self._rows.pop(slot, None)
            if row is not None:
                row.finished = True
            self._lock.notify_all()


class SlotEngine:
    """One session's view of a BatchedEngine: the DecodeEngine interface over its own KV slot."""

    def __init__(self, batch: BatchedEngine, slot: int):
        self.batch = batch
        self.slot = slot
        self.max_seq = batch.max_seq
        self.model = LlamaModel(batch.w, unit_rows_start=batch.unit_rows_start, cache=batch.cache.slot_cache(slot))
        self.deadline: float | None = None  # clock time this session's playout runs dry (None: as soon as possible)
        self.forced: list[int] | None = None
        self.pending_token: int | None = None
        self._pos = 0
        self._last_logits: torch.Tensor | None = None
        self._stream: BatchedStream | None = None
        self._released = False

    @property
    def pos(self) -> int:
        return self._pos

    def _check_idle(self, what: str) -> None:
        if self._released:
            raise RuntimeError(f"{what}: this session's KV slot was released")
        if self._stream is not None and not self._stream._ended:
            raise RuntimeError(f"{what} while a decode stream is running on this engine: finish it, or cancel() and close() it first")

    def truncate(self, pos: int) -> None:
        self._check_idle("truncate")
        if not 0 <= pos <= self._pos:
            raise ValueError(f"truncate({pos}): the cache holds {self._pos} tokens")
        self._pos = pos
        self._last_logits = None

    def prefill(self, tokens: Iterable[int] | torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        """As DecodeEngine.prefill; runs on the scheduler thread in chunks between other sessions' steps (blocks
        the caller until done)."""
        self._check_idle("prefill")
        start, ids = checked_prefill(tokens, start_pos, self._pos, self.batch.w.arch.vocab_size)
        if start + ids.numel() > self.max_seq:
            raise ValueError(f"prefill of {ids.numel()} tokens at position {start} overflows the {self.max_seq}-position cache")
        job = _Prefill(self, ids, start)
        self._pos = start  # what is valid while the job runs (a failure leaves no half-written claim)
        self._last_logits = None
        self.batch._submit_prefill(job)
        self._pos = start + ids.numel()
        self._last_logits = job.logits
        return job.logits

    def decode(self, params: SamplingParams = SPEECHGPT_SAMPLING, seed: int = 0, max_new_tokens: int | None = None,
               speech_mode: bool = False, stop_ids: Iterable[int] | None = None, unit_span_open: bool = False,
               text_first: bool = False) -> "BatchedStream":
        """As DecodeEngine.decode; the tokens are computed by the scheduler thread in batched steps."""
        self._check_idle("decode")
        if self._last_logits is None:
            raise RuntimeError("decode() needs a prefill() first (the logits of the last prompt token)")
        budget, stops = decode_limits(self.max_seq, self._pos, max_new_tokens, len(self.forced or ()), params, stop_ids)
        self._stream = BatchedStream(self, params, seed, budget, speech_mode, stops, unit_span_open, text_first)
        return self._stream

    def set_forced_tokens(self, tokens: Sequence[int] | None) -> None:
        """As DecodeEngine.set_forced_tokens (benchmarks: a scripted answer, the model still runs every step)."""
        self._check_idle("set_forced_tokens")
        if tokens is None:
            self.forced = None
            return
        self.forced = checked_script(tokens, self.max_seq, self.batch.w.arch.vocab_size)

    def release(self) -> None:
        """Give the slot back (the session is over); idempotent. A running stream ends as cancelled."""
        if self._released:
            return
        if self._stream is not None:
            self._stream.cancel()
        self._released = True
        self.batch._release(self)


class BatchedStream(TokenStream):
    """A session's token stream on the batched engine: the scheduler thread computes the tokens, the reader takes
    them from the row's queue."""

    def __init__(self, *args):
        super().__init__(*args)
        self._ended = False  # the slot is free for truncate / prefill again

    def close(self) -> None:
        super().close()
        if self._gen is None:
            self._ended = True

    def _run(self):
        eng, batch = self.engine, self.engine.batch
        start = eng._pos
        self.stats.started = time.perf_counter()
        if self.budget <= 0:
            self.stop_reason = "length"
            self._ended = True
            return
        row = _Row(self, eng._last_logits, start)
        batch._start_row(row)
        lock = batch._lock
        try:
            while True:
                with lock:
                    while not row.queue and not row.finished and not self._cancel.is_set():
                        lock.wait(timeout=0.5)
                    if row.queue:
                        token = row.queue.popleft()
                        lock.notify_all()  # the row may step again
                    elif self._cancel.is_set():
                        self.stop_reason = "cancelled"
                        return
                    else:
                        raise RuntimeError(f"batched decode failed: {row.error}") from row.error
                stop = self._accept(token)
                yield token
                if stop:
                    return
                if self._cancel.is_set():
                    self.stop_reason = "cancelled"
                    return
        finally:
            batch._end_row(eng.slot)
            # Every yielded token except the last was fed to the model (rows never run behind the reader).
            eng._pos = start + max(len(self.tokens) - 1, 0)
            eng.pending_token = self.tokens[-1] if self.tokens else None
            eng._last_logits = None
            self._ended = True
