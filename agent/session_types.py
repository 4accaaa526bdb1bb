"""The Session's configuration and the records of its turns, items and responses (agent/session.py runs them)."""

from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from agent.conversation import Message
from agent.generation import SPEECHGPT_MAX_NEW_TOKENS
from agent.metrics import TurnMetrics
from agent.parser import ResponseParser
from agent.prompts import META_INSTRUCTION, Task
from kernels.sampling import SPEECHGPT_SAMPLING, SamplingParams
from streaming.incremental_units import IncrementalConfig
from streaming.synthesizer import SynthesizerConfig
from streaming.vad import VadConfig


@dataclass(frozen=True)
class SessionConfig:
    seed: int = 0
    sampling: SamplingParams = SPEECHGPT_SAMPLING
    speech_head: bool = False  # the engine's restricted head inside unit spans (same distribution as masking)
    max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS
    single_turn: bool = False
    system_prompt: str = META_INSTRUCTION
    reserve_tokens: int = 512  # context positions kept for the answer (older turns are evicted for them)
    speculative_prefill: bool = True
    preemptive_reply: bool = True
    tentative_silence_s: float = 0.2
    end_of_turn_silence_s: float = 0.5
    min_interruption_s: float = 0.5
    unit_tail_s: float = 0.1  # audio after the VAD's offset kept for the turn's units
    vad: VadConfig = field(default_factory=VadConfig)  # the three times above override its own
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    synthesizer: SynthesizerConfig = field(default_factory=SynthesizerConfig)

    def __post_init__(self) -> None:
        for name in ("tentative_silence_s", "end_of_turn_silence_s", "min_interruption_s", "unit_tail_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SessionConfig.{name}: expected a finite number >= 0, got {value!r}")
        if self.preemptive_reply and self.tentative_silence_s >= self.end_of_turn_silence_s:
            raise ValueError(f"SessionConfig.tentative_silence_s ({self.tentative_silence_s}) must be shorter than "
                             f"end_of_turn_silence_s ({self.end_of_turn_silence_s})")
        if self.unit_tail_s > min(self.tentative_silence_s, self.end_of_turn_silence_s):
            raise ValueError(f"SessionConfig.unit_tail_s ({self.unit_tail_s}) must not exceed the tentative and "
                             "end-of-turn silences (the tail must have been heard when the units are computed)")
        if self.max_new_tokens < 1:
            raise ValueError(f"SessionConfig.max_new_tokens: expected >= 1, got {self.max_new_tokens}")

    def vad_config(self) -> VadConfig:
        return replace(self.vad, end_of_turn_silence_s=self.end_of_turn_silence_s,
                       min_interruption_s=self.min_interruption_s,
                       pause_silence_s=self.tentative_silence_s if self.preemptive_reply else None)


def _with_end_of_turn_silence(config: SessionConfig, silence_s: float) -> SessionConfig:
    """The config with another end-of-turn silence (a Realtime client's silence_duration_ms): the tentative end of
    turn and the unit tail shrink with it where they would no longer fit under it."""
    if not (math.isfinite(silence_s) and silence_s > 0):
        raise ValueError(f"end-of-turn silence: expected a finite number > 0, got {silence_s!r}")
    preemptive = config.preemptive_reply and config.tentative_silence_s < silence_s
    tail = min(config.unit_tail_s, silence_s, config.tentative_silence_s if preemptive else silence_s)
    return replace(config, end_of_turn_silence_s=silence_s, preemptive_reply=preemptive, unit_tail_s=tail)


@dataclass
class TurnRecord:
    """What a turn fed the LLM and got back (for tests, benchmarks and debugging)."""

    units: list[int] = field(default_factory=list)  # the question's final reduced units
    prompt: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated, up to where decoding stopped
    logits: object | None = None  # fp32 logits after the prompt (the first token's distribution)


class StageError(RuntimeError):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


class EmptyAudioBuffer(ValueError):
    """commit_audio() with less than `MIN_COMMIT_S` of audio buffered (or with server VAD on, which commits)."""


class ResponseActive(RuntimeError):
    """create_response() while another response is in progress (one at a time per session)."""

    def __init__(self, response: "Response"):
        super().__init__(f"response {response.id} is still in progress")
        self.response = response


MIN_COMMIT_S = 0.1  # less buffered audio than this is an empty commit (what Realtime servers refuse too)
MODALITIES = ("audio", "text")


@dataclass(frozen=True)
class TurnDetection:
    """Server-side turn taking on the session's VAD (the default). `Session.set_turn_detection(None)` turns it off:
    manual turns, where nothing is answered until `commit_audio()` and `create_response()`."""

    create_response: bool = True  # answer each turn the VAD ends
    interrupt_response: bool = True  # user speech stops the response in progress (barge-in, drop while thinking)
    end_of_turn_silence_s: float | None = None  # None: SessionConfig.end_of_turn_silence_s


@dataclass(frozen=True)
class ResponseOptions:
    modalities: tuple[str, ...] = ("audio",)  # ("audio",): speech and its text; ("text",): text only, no vocoder
    instructions: str | None = None  # replaces the system prompt for this response (None: the session's)
    metadata: dict | None = None  # the caller's, carried on the Response untouched
    max_output_tokens: int | None = None  # None: SessionConfig.max_new_tokens
    item_id: str | None = None  # id of the assistant message it writes (None: a new one)

    def __post_init__(self) -> None:
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise ValueError(f"ResponseOptions.modalities: expected a non-empty subset of {MODALITIES}, got {self.modalities!r}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError(f"ResponseOptions.max_output_tokens: expected >= 1, got {self.max_output_tokens}")

    @property
    def audio(self) -> bool:
        return "audio" in self.modalities


@dataclass
class Usage:
    """Token counts of one response. Audio tokens are unit tokens; the rest is text. `cached_tokens`: prompt
    tokens found in the KV cache (not prefilled again)."""

    input_tokens: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(eq=False)
class Response:
    """One answer of the agent: the assistant message it writes and how it ended.

    status: "in_progress", then "completed", "cancelled" (reason "client_cancelled" or "turn_detected"),
    "incomplete" (reason "max_output_tokens": the token budget ran out) or "failed" (`error` says why)."""

    id: str
    options: ResponseOptions
    item: Message
    trigger: str  # "client" (create_response) or "turn_detection" (a VAD turn)
    turn: int
    question_id: str | None = None  # the user message answered (None: the conversation has none)
    status: str = "in_progress"
    reason: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)


@dataclass
class _UserTurn:
    index: int
    onset: float | None
    audio_start: float  # session time of the first sample given to the unit extractor
    while_speaking: bool  # began while the agent was playing audio
    interrupted_agent: bool = False
    paused_offset: float | None = None
    paused_at: float | None = None
    discarded: int = 0  # preemptive replies thrown away
    speculative_tokens: int = 0
    item_id: str | None = None  # the user message this turn becomes when the VAD ends it


@dataclass
class _Reply:
    turn: _UserTurn
    metrics: TurnMetrics
    preemptive: bool
    offset: float
    end_sample: int
    seed: int
    record: TurnRecord = field(default_factory=TurnRecord)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    gate: threading.Event = field(default_factory=threading.Event)  # the decode worker waits here before units
    stop: threading.Event = field(default_factory=threading.Event)
    parsed: asyncio.Queue = field(default_factory=asyncio.Queue)  # (parser events, time) from the decode worker
    audio: asyncio.Queue = field(default_factory=asyncio.Queue)  # vocoder futures, in order
    stream: object | None = None
    task: asyncio.Task | None = None
    playout: asyncio.Task | None = None
    parser: ResponseParser | None = None
    stage: str = "units"
    transcript: str = ""
    transcript_final: bool = False
    text: str = ""
    units: list[int] = field(default_factory=list)
    span_ended: bool = False
    audio_started: bool = False
    frames: list[np.ndarray] = field(default_factory=list)
    handed_s: float = 0.0  # seconds of reply audio handed to the output
    cancelled: bool = False
    finished: bool = False
    decode_t0: float = 0.0  # perf_counter when decoding started
    unit_perf: list[float] = field(default_factory=list)  # perf_counter when each unit token was decoded
    gated_at: float | None = None  # session time a preemptive decode reached the unit span and waited
    done: asyncio.Future | None = None
    source: str = "turn"  # "turn": the VAD turn's audio is the question; "items": the conversation as it stands
    options: ResponseOptions = field(default_factory=ResponseOptions)
    response: Response | None = None
    user_item: Message | None = None  # the question's user message (its transcript comes from this reply)
    answer_task: Task = Task.SPEECH  # what the question asks for (decides the parser)
    text_stop: bool = False  # decoding stopped after the text answer (text-only output)
    cached_tokens: int = 0
    generated: int = 0  # tokens decoded so far (the LLM thread counts)
    generated_units: int = 0

    def halt(self) -> None:
        """Stop producing (thread-safe parts first): decode, then the tasks."""
        self.cancelled = True
        self.stop.set()
        self.gate.set()
        if self.stream is not None:
            self.stream.cancel()
        for task in (self.task, self.playout):
            if task is not None and task is not asyncio.current_task():
                task.cancel()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
