"""Per-turn metrics: timestamps on the session clock, counts, and the compute each stage took.

Intervals (`TurnMetrics.intervals`), each None where a stage did not happen:
    eot_wait            last voiced frame -> final end-of-turn decision (the silence the VAD waited)
    units               final decision -> final units ready (0 when a kept preemptive reply had them already)
    prefill             final units ready -> prefill done
    eot_work            final end-of-turn decision -> prefill done (the end-of-turn work before decoding starts)
    first_token         prefill done -> first transcript token
    first_unit          prefill done -> first unit of the spoken answer
    vocoder             first unit -> first vocoder audio
    handoff             first vocoder audio -> first frame handed to the output
    playout             first frame handed -> first frame played (the output's playout clock)
    response            final end-of-turn decision -> first frame played
    end_to_end          last voiced frame -> first frame played (what the user waits)
Where a kept preemptive reply worked before the decision, its stage timestamps are earlier than the decision: those
stages count from the decision (an interval is 0 when its stage was done by then; the time saved is
`preemptive_saved_s`).
`overhead` = response minus the compute on its critical path (final units, prefill, decoding up to the unit that
released the first audio, the vocoder call that produced it; each measured on the thread that ran it): the
pipeline's own cost (hand-offs between threads, scheduling, the event loop, contention for the cores). Not given for
kept preemptive replies, whose compute ran before the decision.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

INTERVALS = ("eot_wait", "units", "prefill", "eot_work", "first_token", "first_unit", "vocoder", "handoff", "playout", "response",
             "end_to_end", "overhead")


@dataclass
class TurnMetrics:
    turn: int
    onset: float | None = None
    last_voiced: float | None = None  # the VAD's offset: end of the user's speech
    tentative_eot: float | None = None  # SpeechPaused (preemptive reply started)
    final_eot: float | None = None  # SpeechEnded
    final_units_ready: float | None = None
    prefill_done: float | None = None
    first_transcript_token: float | None = None
    first_text_answer_token: float | None = None
    first_unit: float | None = None
    first_vocoder_audio: float | None = None
    first_frame_handed: float | None = None
    first_frame_played: float | None = None
    playback_end: float | None = None
    interrupted_at: float | None = None  # barge-in decision (the output was cleared then)
    # counts
    input_units: int = 0
    prompt_tokens: int = 0
    speculative_tokens: int = 0  # question tokens already in the KV cache at the end of the turn
    rollback_tokens: int = 0  # speculatively prefilled tokens that had to be dropped (provisional units changed)
    eot_prefill_tokens: int = 0  # tokens prefilled after the final decision
    evicted_turns: int = 0
    new_tokens: int = 0
    output_units: int = 0
    preemptive: str = "none"  # "none", "kept", "discarded"
    preemptive_discarded: int = 0  # preemptive replies thrown away in this turn (the user went on speaking)
    preemptive_saved_s: float = 0.0
    underruns: int = 0
    interrupted: bool = False
    heard_s: float = 0.0  # reply audio played
    reply_s: float = 0.0  # reply audio produced
    errors: list[str] = field(default_factory=list)
    # compute, seconds of wall time inside each stage
    units_compute_s: float = 0.0
    prefill_compute_s: float = 0.0
    decode_compute_s: float = 0.0  # until the unit that released the first audio (the vocoder's lookahead)
    vocoder_compute_s: float = 0.0  # the vocoder call that produced the first audio
    transcript: str = ""
    text_answer: str = ""

    def _since(self, a: float | None, b: float | None) -> float | None:
        if a is None or b is None:
            return None
        return max(0.0, b - a)

    def _after_decision(self, t: float | None) -> float | None:
        """A stage that ran before the end-of-turn decision (a kept preemptive reply) counts from the decision."""
        if t is None or self.final_eot is None:
            return t
        return max(t, self.final_eot)

    def intervals(self) -> dict[str, float | None]:
        start = self.final_units_ready if self.final_units_ready is not None else self.final_eot
        prefill_done = self._after_decision(self.prefill_done)
        out = {
            "eot_wait": self._since(self.last_voiced, self.final_eot),
            "units": self._since(self.final_eot, self.final_units_ready),
            "prefill": self._since(self._after_decision(start), self.prefill_done),
            "eot_work": self._since(self.final_eot, self.prefill_done),
            "first_token": self._since(prefill_done, self.first_transcript_token),
            "first_unit": self._since(prefill_done, self.first_unit),
            "vocoder": self._since(self.first_unit, self.first_vocoder_audio),
            "handoff": self._since(self.first_vocoder_audio, self.first_frame_handed),
            "playout": self._since(self.first_frame_handed, self.first_frame_played),
            "response": self._since(self.final_eot, self.first_frame_played),
            "end_to_end": self._since(self.last_voiced, self.first_frame_played),
        }
        response = out["response"]
        if response is None or self.preemptive == "kept":
            out["overhead"] = None  # compute ran before the decision: the subtraction means nothing
        else:
            compute = self.units_compute_s + self.prefill_compute_s + self.decode_compute_s + self.vocoder_compute_s
            out["overhead"] = max(0.0, response - compute)
        return out

    def to_dict(self) -> dict:
        return asdict(self) | {"intervals": self.intervals()}


class MetricsLog:
    """Writes each finished turn as one JSON line."""

    def __init__(self, path: Path | str | None = None, stream: IO[str] | None = None):
        self._file = open(path, "a", encoding="utf-8") if path is not None else None
        self._stream = stream

    def write(self, metrics: TurnMetrics) -> None:
        line = json.dumps(metrics.to_dict(), sort_keys=True)
        for out in (self._file, self._stream):
            if out is not None:
                out.write(line + "\n")
                out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class PrometheusExporter:
    """Turn metrics on a Prometheus endpoint (prometheus_client; off unless a port is given)."""

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

    def __init__(self, port: int | None = None, addr: str = "127.0.0.1", registry=None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

        self.registry = registry or CollectorRegistry()
        self.intervals = Histogram("speechgpt_turn_interval_seconds", "Per-turn latency intervals", ["interval"],
                                   buckets=self.BUCKETS, registry=self.registry)
        self.turns = Counter("speechgpt_turns_total", "Answered user turns", ["outcome"], registry=self.registry)
        self.preemptive = Counter("speechgpt_preemptive_total", "Preemptive replies", ["result"], registry=self.registry)
        self.tokens = Counter("speechgpt_tokens_total", "Tokens", ["kind"], registry=self.registry)
        self.underruns = Counter("speechgpt_underruns_total", "Output underruns", registry=self.registry)
        self.errors = Counter("speechgpt_errors_total", "Stage errors", registry=self.registry)
        self.server = None
        if port is not None:
            self.server = start_http_server(port, addr=addr, registry=self.registry)

    def observe(self, m: TurnMetrics) -> None:
        for name, value in m.intervals().items():
            if value is not None and math.isfinite(value):
                self.intervals.labels(name).observe(value)
        self.turns.labels("interrupted" if m.interrupted else "completed").inc()
        if m.preemptive != "none":
            self.preemptive.labels(m.preemptive).inc()
        if m.preemptive_discarded:
            self.preemptive.labels("discarded").inc(m.preemptive_discarded)
        self.tokens.labels("prompt").inc(m.prompt_tokens)
        self.tokens.labels("speculative").inc(m.speculative_tokens)
        self.tokens.labels("generated").inc(m.new_tokens)
        self.underruns.inc(m.underruns)
        self.errors.inc(len(m.errors))

    def close(self) -> None:
        if self.server is not None:
            server, _thread = self.server
            server.shutdown()


def percentile(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if v is not None and math.isfinite(v))
    if not vals:
        return math.nan
    k = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def format_table(turns: list[TurnMetrics]) -> str:
    """Per-turn intervals in ms, then P50/P90 over the turns."""
    names = [n for n in INTERVALS if any(t.intervals()[n] is not None for t in turns)] or list(INTERVALS)
    head = ["turn", *names, "preempt", "tokens", "units"]
    rows = []
    for t in turns:
        iv = t.intervals()
        rows.append([str(t.turn), *(("-" if iv[n] is None else f"{iv[n] * 1e3:.0f}") for n in names), t.preemptive,
                     str(t.new_tokens), str(t.output_units)])
    for q in (50, 90):
        rows.append([f"P{q}", *(_ms(percentile([t.intervals()[n] for t in turns], q)) for n in names), "", "", ""])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines) + "\n(milliseconds; intervals are defined in agent/metrics.py)"


def _ms(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v * 1e3:.0f}"


class LoopMonitor:
    """How long the event loop was blocked: a task asks to wake every `period_s` (real time) and records how late
    it woke. A session's loop only routes frames and events, so the worst stall should stay under one 20 ms frame."""

    def __init__(self, period_s: float = 0.005):
        self.period_s = period_s
        self.lateness: list[float] = []
        self._task = None

    def start(self) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        import asyncio
        import time

        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lateness.append(max(0.0, time.perf_counter() - t - self.period_s))

    def stop(self) -> dict:
        if self._task is not None:
            self._task.cancel()
        return {"max_ms": max(self.lateness, default=0.0) * 1e3, "p99_ms": percentile(self.lateness, 99) * 1e3,
                "samples": len(self.lateness)}
