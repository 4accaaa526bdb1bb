"""One conversation: `Session` listens on an audio input, answers in speech on an audio output, and remembers.

    input frames -> VAD (webrtcvad) -> incremental units -> speculative prefill of stable units (KV cache)
                 -> end of turn: final units, KV rolled back to the first changed token, the rest prefilled
                 -> decode (one worker thread feeding an asyncio queue) -> streaming parser -> events
                 -> units -> streaming vocoder (its own worker) -> output frames

Decoding, vocoding and playout overlap; the event loop only routes (VAD, parser, events), every model call runs
on one of the session's three worker threads (HuBERT, LLM, vocoder), so a turn never blocks the loop.

Policies (what an experienced LiveKit Agents user expects, and where we differ):
- Units of a turn are those of its audio from the pre-roll to the VAD's offset + `unit_tail_s`: the end-of-turn
  silence does not enter them (HuBERT normalises over the whole input, so trailing silence would change every unit).
- Speculative prefill: whenever the incremental extractor declares more units stable, they are prefilled behind the
  history and the turn head; at the end of turn the cache is rolled back to the first token that differs from the
  final prompt and only the rest is prefilled (agent/conversation.py builds both as ids).
- Preemptive reply: at a tentative end of turn (`tentative_silence_s` of silence, VAD SpeechPaused) the final units
  of the audio so far are computed and decoding starts: the transcript and the text answer, then it holds before
  the unit span. If the end of turn is confirmed with the same offset (same audio, so the same units) the reply is
  kept and released; if the user speaks again it is discarded. Nothing is shown or played before the decision.
- Barge-in: user speech of at least `min_interruption_s` while the agent plays audio stops decode and vocoder and
  clears the output at once; the agent's turn enters the history as heard: the text answer is cut at the word
  matching the fraction of its units played (units with any audio played count as heard; the word count kept is
  that fraction of the words, rounded). Shorter user speech is a false interruption: the reply goes on and that
  speech is not answered.
- A user turn that starts while the agent is thinking (decided, nothing played yet) drops the pending reply and the
  new turn is answered (LiveKit's policy); a dropped reply leaves no history.
- Multi-turn: past turns enter the history as text (agent/conversation.py); the KV cache is reused up to the first
  token that changed, and the oldest turns are evicted when the context would overflow. `single_turn=True` gives
  every turn a fresh context, like the original code.
- Seeds: turn k samples with `seed + k`; with the same final units, turn 0 draws what `respond --seed` draws.
- Failures (a bad frame, a malformed model output, an exception in any stage) are logged, counted and reported as
  SessionError; the session goes back to listening and answers the next turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import replace

import numpy as np

from agent.clock import SessionClock
from agent.conversation import Conversation, PromptBuilder, heard_text, new_item_id, units_heard
from agent.events import (
    AgentState,
    AgentText,
    EventBus,
    ReplyAudioFinished,
    ReplyAudioStarted,
    ResponseDone,
    SessionError,
    StateChanged,
    TurnCompleted,
    UserSpeechEnded,
    UserSpeechStarted,
    UserTranscript,
)
from agent.io import AudioInput, AudioOutput, PlaybackFinished, PlaybackStarted
from agent.metrics import TurnMetrics
from agent.parser import (AnswerDone, ResponseParser, Segment, SegmentDone, TextDelta, Unit, UnitSpanEnded,
                          UnitSpanStarted)
from agent.prompts import Task
from agent.session_api import SessionItemsApi
from agent.session_types import (  # noqa: F401 - re-exported: agent.session is where users import them from
    EmptyAudioBuffer,
    MIN_COMMIT_S,
    Response,
    ResponseActive,
    ResponseOptions,
    SessionConfig,
    StageError,
    TurnDetection,
    TurnRecord,
    Usage,
    _Reply,
    _UserTurn,
    _common_prefix,
    _with_end_of_turn_silence,
)
from streaming.frames import AudioFrame, BadFrameError, Resampler
from streaming.hubert import RECEPTIVE_FIELD
from streaming.incremental_units import IncrementalUnitExtractor
from streaming.synthesizer import StreamingSynthesizer
from streaming.vad import (
    FrameRejected,
    Interruption,
    SpeechAudio,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    VadDetector,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


class Session(SessionItemsApi):
    """See the module doc. Made by `SpeechGPTModel.session()`; `await run()` until the input ends."""

    def __init__(self, model, input: AudioInput, output: AudioOutput, config: SessionConfig | None = None,
                 clock: SessionClock | None = None, name: str = "session", attributes: dict[str, str] | None = None):
        self.model = model
        self.attributes = dict(attributes or {})  # what the transport knows of the conversation (caller id, room...)
        self.config = config or SessionConfig()
        self.clock = clock or SessionClock()
        self.input = input
        self.output = output
        self.name = name
        self.events = EventBus()
        self.tokenizer = model.tokenizer
        self.vocab = model.tokenizer.vocab
        self.engine = model.new_engine()
        self.conversation = Conversation(PromptBuilder(self.tokenizer, self.config.system_prompt), self.engine.max_seq,
                                         self.config.reserve_tokens, self.config.single_turn)
        self.vad = VadDetector(self.config.vad_config())
        self.units = IncrementalUnitExtractor(model.units, self.config.incremental)
        self.synth = StreamingSynthesizer(model.vocoder_backend, self.config.synthesizer)
        self._frame_s = model.vocoder_backend.hop_size / model.vocoder_backend.sample_rate
        self._hubert = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-hubert")
        self._llm = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-llm")
        self._vocoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-vocoder")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.kv_ids: list[int] = []  # what the engine's KV cache holds (touched on the LLM thread only)
        self.state = AgentState.INITIALIZING
        self.turns: list[TurnMetrics] = []  # finished turns, in order
        self.replies: dict[int, np.ndarray] = {}  # turn -> the reply audio handed to the output
        self.records: dict[int, TurnRecord] = {}  # turn -> what the LLM read and wrote (answered turns)
        self.error_count = 0
        self.rejected_frames = 0
        self._listening: _UserTurn | None = None
        self._reply: _Reply | None = None
        self._turn_count = 0
        self._spec_target: list[int] | None = None
        self._spec_queued = False
        self._closed = False
        self._next_ts: float | None = None  # session time of the next input sample (transports without our clock)
        # turn taking and the Realtime-style API (see "Manual turns, items and responses" below)
        self.turn_detection: TurnDetection | None = TurnDetection()
        self.response_defaults = ResponseOptions()  # what a VAD turn's response is made with
        self.instructions: str | None = None  # the system prompt of responses (None: config.system_prompt)
        self._input_audio: list[np.ndarray] = []  # manual turns: 16 kHz mono audio since the last commit/clear
        self._input_resampler = Resampler(SAMPLE_RATE)
        self._pending_units: dict[str, concurrent.futures.Future] = {}  # user message id -> its unit extraction
        self._committed_at: dict[str, float] = {}  # user message id -> session time it was committed
        output.on_playback(self._on_playback)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the conversation until the input ends (then finish the reply in progress) or aclose()."""
        self._loop = asyncio.get_running_loop()
        self._set_state(AgentState.LISTENING)
        try:
            async for frame in self.input:
                if self._closed:
                    break
                self._on_frame(frame)
            if not self._closed:
                for event in self.vad.flush():
                    self._on_vad(event)
                while self._reply is not None and not self._closed:
                    await asyncio.shield(self._reply.done)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        reply, self._reply = self._reply, None
        if reply is not None:
            reply.halt()
            if reply.done is not None and not reply.done.done():
                reply.done.set_result(None)  # a run() waiting for this reply ends too
        for pool in (self._hubert, self._llm, self._vocoder):
            await asyncio.to_thread(pool.shutdown, True)
        release = getattr(self.engine, "release", None)  # a batched engine's KV slot goes back to the pool
        if release is not None:
            release()
        self.events.close()

    @property
    def idle(self) -> bool:
        """No user turn being listened to and no reply in progress (a transport may drain or hand over now)."""
        return self._listening is None and self._reply is None

    # ---- helpers --------------------------------------------------------------------------------------------
    def _set_state(self, new: AgentState) -> None:
        if new != self.state:
            old, self.state = self.state, new
            self.events.emit(StateChanged(old, new, self.clock.now()))

    def _submit(self, pool: concurrent.futures.ThreadPoolExecutor, fn, *args) -> concurrent.futures.Future:
        """Run fn on a worker thread; the clock counts it as work until it returns."""
        self.clock.begin_work()
        fut = pool.submit(fn, *args)
        fut.add_done_callback(lambda _f: self.clock.end_work())
        return fut

    def _error(self, stage: str, exc: BaseException | str, turn: int | None = None) -> None:
        self.error_count += 1
        message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, BaseException):
            log.error("%s: %s failed: %s", self.name, stage, message, exc_info=exc)
        else:
            log.warning("%s: %s: %s", self.name, stage, message)
        self.events.emit(SessionError(stage, message, turn))

    # ---- input ----------------------------------------------------------------------------------------------
    def _on_frame(self, frame: AudioFrame) -> None:
        if not getattr(self.input, "timestamps_on_session_clock", False):
            frame = self._stamp(frame)
        if self.turn_detection is None:
            self._buffer_input(frame)
            return
        for event in self.vad.push(frame):
            self._on_vad(event)

    def _buffer_input(self, frame: AudioFrame) -> None:
        """Manual turns: keep the frame (validated, 16 kHz mono float32) for the next commit."""
        try:
            frames = self._input_resampler.push(frame)
        except BadFrameError as exc:
            self.rejected_frames += 1
            self._error("frame", str(exc))
            return
        for f in frames:
            self._input_audio.append(f.to_float32_mono().samples)

    def _stamp(self, frame: AudioFrame) -> AudioFrame:
        """Frames from transports whose timestamps are on another clock: contiguous session times (re-synced to
        the arrival time after a gap, e.g. a muted track)."""
        duration = frame.num_samples / frame.sample_rate if frame.sample_rate else 0.0
        arrival = self.clock.now() - duration
        ts = self._next_ts if self._next_ts is not None and abs(arrival - self._next_ts) < 0.25 else arrival
        self._next_ts = ts + duration
        return replace(frame, timestamp=ts)

    def _on_vad(self, event) -> None:
        if isinstance(event, SpeechAudio):
            if self._listening is not None:
                turn = self._listening
                fut = self._submit(self._hubert, self.units.push, event.frame.samples)
                fut.add_done_callback(lambda f: self._call_soon(self._on_provisional, turn, f))
        elif isinstance(event, SpeechStarted):
            self._on_speech_started(event)
        elif isinstance(event, SpeechPaused):
            self._on_paused(event)
        elif isinstance(event, SpeechResumed):
            reply = self._reply
            if reply is not None and reply.preemptive and not reply.released.is_set():
                self._discard(reply)
        elif isinstance(event, Interruption):
            if self.state == AgentState.SPEAKING and self._reply is not None and self.turn_detection.interrupt_response:
                if self._listening is not None:
                    self._listening.interrupted_agent = True
                self._barge_in(self._reply)
        elif isinstance(event, SpeechEnded):
            self._on_speech_ended(event)
        elif isinstance(event, FrameRejected):
            self.rejected_frames += 1
            self._error("frame", str(event.error))

    def _call_soon(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_speech_started(self, event: SpeechStarted) -> None:
        reply = self._reply
        if (reply is not None and reply.released.is_set() and not reply.audio_started
                and self.turn_detection.interrupt_response):
            self._drop(reply)  # the user spoke again while we were thinking: answer the new turn
        turn = _UserTurn(self._turn_count, event.onset,
                         event.pre_roll.timestamp if event.pre_roll is not None else event.onset,
                         while_speaking=self.state == AgentState.SPEAKING, item_id=new_item_id())
        self._turn_count += 1
        self._listening = turn
        self._submit(self._hubert, self.units.reset)
        if event.pre_roll is not None:
            fut = self._submit(self._hubert, self.units.push, event.pre_roll.samples)
            fut.add_done_callback(lambda f: self._call_soon(self._on_provisional, turn, f))
        self.events.emit(UserSpeechStarted(turn.index, event.onset, turn.item_id))

    def _on_provisional(self, turn: _UserTurn, fut: concurrent.futures.Future) -> None:
        if fut.exception() is not None:
            self._error("units", fut.exception(), turn.index)
            return
        if (turn is not self._listening or not self.config.speculative_prefill or self._reply is not None
                or self._closed):
            return
        updates = fut.result()
        if not any(u.new_stable.size for u in updates):
            return
        last = updates[-1]
        self._spec_target = self.conversation.question_prefix_ids(last.reduced_units[: last.stable_count].tolist())
        if not self._spec_queued:
            self._spec_queued = True
            self._submit(self._llm, self._speculate, turn)

    def _speculate(self, turn: _UserTurn) -> None:  # LLM thread
        self._spec_queued = False
        target, self._spec_target = self._spec_target, None
        if target is None or self._closed:
            return
        try:
            self._sync_kv(target, need_logits=False)
        except Exception as exc:  # noqa: BLE001 - reported; the end of turn re-prefills from scratch
            self._call_soon(self._error, "prefill", exc, turn.index)

    def _on_paused(self, event: SpeechPaused) -> None:
        turn = self._listening
        if turn is None:
            return
        turn.paused_offset, turn.paused_at = event.offset, event.detected_at
        if self._reply is None and not turn.while_speaking and self.turn_detection.create_response:
            self._start_reply(turn, event.offset, preemptive=True)

    def _on_speech_ended(self, event: SpeechEnded) -> None:
        turn, self._listening = self._listening, None
        if turn is None:
            return
        self.events.emit(UserSpeechEnded(turn.index, event.decided_at, event.offset, turn.item_id))
        reply = self._reply
        if turn.while_speaking and not turn.interrupted_agent and reply is not None:
            log.info("%s: false interruption (%.2f s of speech): the reply goes on", self.name, event.duration)
            return
        detection = self.turn_detection
        end_sample = self._end_sample(turn, event.offset)
        if reply is not None and reply.preemptive and not reply.released.is_set():
            if reply.turn is turn and reply.offset == event.offset and detection.create_response:
                self._commit_turn(turn, end_sample, reply)
                reply.metrics.final_eot = event.decided_at
                reply.metrics.preemptive = "kept"
                self._release(reply)
                return
            self._discard(reply)
        elif reply is not None:
            if not detection.interrupt_response:
                self._commit_turn(turn, end_sample, None)  # a response is in progress: the turn is only kept
                return
            self._drop(reply)
        if not detection.create_response:
            self._commit_turn(turn, end_sample, None)
            return
        reply = self._start_reply(turn, event.offset, preemptive=False)
        self._commit_turn(turn, end_sample, reply)
        reply.metrics.final_eot = event.decided_at
        self._release(reply)

    # ---- replies --------------------------------------------------------------------------------------------
    def _end_sample(self, turn: _UserTurn, offset: float) -> int:
        return max(0, round((offset + self.config.unit_tail_s - turn.audio_start) * SAMPLE_RATE))

    def _start_reply(self, turn: _UserTurn, offset: float, preemptive: bool) -> _Reply:
        end_sample = self._end_sample(turn, offset)
        metrics = TurnMetrics(turn.index, onset=turn.onset, last_voiced=offset,
                              tentative_eot=turn.paused_at if preemptive else None,
                              preemptive_discarded=turn.discarded)
        reply = _Reply(turn, metrics, preemptive, offset, end_sample, self.config.seed + turn.index)
        reply.done = asyncio.get_running_loop().create_future()
        reply.parser = ResponseParser(self.tokenizer, Task.SPEECH)
        self._reply = reply
        reply.task = asyncio.get_running_loop().create_task(self._run_reply(reply))
        return reply

    def _release(self, reply: _Reply) -> None:
        m = reply.metrics
        if m.preemptive == "kept" and m.final_eot is not None and m.tentative_eot is not None:
            # the work done between the tentative end and the decision (units, prefill, decoding up to the unit
            # span) would otherwise have started at the decision
            busy_until = m.final_eot if reply.gated_at is None else min(m.final_eot, reply.gated_at)
            m.preemptive_saved_s = max(0.0, busy_until - m.tentative_eot)
        if reply.response is None:
            self._new_response(reply, self.response_defaults, "turn_detection")
        reply.released.set()
        reply.gate.set()
        self._set_state(AgentState.THINKING)

    def _halt(self, reply: _Reply) -> None:
        reply.halt()
        if reply.units:
            self.synth.cancel()  # a chunk being computed is dropped; the next reply resets the synthesizer

    def _discard(self, reply: _Reply) -> None:
        """A preemptive reply the user made obsolete: nothing of it was shown."""
        self._halt(reply)
        reply.turn.discarded += 1
        self._finish(reply)

    def _drop(self, reply: _Reply) -> None:
        """A decided reply dropped before any audio played (the user spoke again)."""
        self._halt(reply)
        reply.metrics.errors.append("dropped: the user spoke before it played")
        self._complete(reply, PlaybackFinished(0.0, True, self.clock.now()), status="cancelled", reason="turn_detected")

    def _barge_in(self, reply: _Reply) -> None:
        finished = self.output.clear_buffer()  # silence first
        reply.metrics.interrupted_at = self.clock.now()
        self._halt(reply)
        self._complete(reply, finished or PlaybackFinished(0.0, True, self.clock.now()), status="cancelled",
                       reason="turn_detected")

    async def _run_reply(self, r: _Reply) -> None:
        m = r.metrics
        try:
            if r.source == "items":
                prompt, units_start = await self._items_prompt(r)
            else:
                units, m.units_compute_s = await asyncio.wrap_future(self._submit(self._hubert, self._final_units, r.end_sample))
                m.final_units_ready = self.clock.now()
                m.input_units = len(units)
                r.record.units = units
                if not units:
                    raise StageError("units", "the turn produced no speech units")
                r.stage = "prompt"
                evicted = self.conversation.evicted
                prompt = self.conversation.prompt_ids(units)  # (the turn's own message is not rendered yet)
                if r.user_item is not None and r.user_item.units is None:
                    r.user_item.units = list(units)
                m.evicted_turns = self.conversation.evicted - evicted
                units_start = len(prompt) - len(self.conversation.builder.tail_ids) - len(units)
            m.prompt_tokens = len(prompt)
            r.record.prompt = prompt
            r.stage = "prefill"
            await asyncio.wrap_future(self._submit(self._llm, self._prefill_reply, r, prompt, units_start))
            m.prefill_done = self.clock.now()
            r.stage = "decode"
            decoding = self._submit(self._llm, self._decode, r, prompt)
            await r.released.wait()
            r.playout = asyncio.get_running_loop().create_task(self._play(r))
            while (item := await r.parsed.get()) is not None:
                events, at = item
                for event in events:
                    self._on_parsed(r, event, at)
            await asyncio.wrap_future(decoding)  # a decode failure surfaces here
            if r.units and not r.span_ended:
                r.audio.put_nowait(self._submit(self._vocoder, self._flush_vocoder, r))
            r.audio.put_nowait(None)
            r.stage = "vocoder"
            await r.playout
            r.stage = "output"
            if r.audio_started:
                self.output.flush()
                finished = await self.output.wait_for_playout()
            else:
                finished = PlaybackFinished(0.0, False, self.clock.now())
            if not r.finished:
                self._complete(r, finished)
        except asyncio.CancelledError:
            if not r.finished and not r.cancelled:
                raise
        except Exception as exc:  # noqa: BLE001 - one failed reply must not end the session
            self._fail(r, getattr(exc, "stage", r.stage), exc)

    async def _items_prompt(self, r: _Reply) -> tuple[list[int], int]:
        """A response to the conversation as it stands: wait for the units of its user audio messages, then the
        prompt (and where the question's units start in it, for the metrics)."""
        m = r.metrics
        for message in [x for x in self.conversation.items if x.pending and x.in_context]:
            fut = self._pending_units.get(message.id)
            if fut is None:
                raise StageError("units", f"user message {message.id!r} has no units and none are being extracted")
            _, seconds = await asyncio.wrap_future(fut)
            m.units_compute_s += seconds
            self._units_ready(message, fut)
        m.final_units_ready = self.clock.now()
        r.stage = "prompt"
        r.answer_task = self.conversation.response_task()
        r.parser = ResponseParser(self.tokenizer, r.answer_task)
        question = self.conversation.question()
        r.user_item = question if r.answer_task is Task.SPEECH else None
        if r.response is not None:
            r.response.question_id = question.id if question is not None else None
        units = list(question.units or []) if r.user_item is not None else []
        r.record.units = units
        m.input_units = len(units)
        evicted = self.conversation.evicted
        instructions = r.options.instructions if r.options.instructions is not None else self.instructions
        prompt = self.conversation.response_prompt_ids(instructions)
        m.evicted_turns = self.conversation.evicted - evicted
        builder = self.conversation.builder
        units_start = len(prompt) - len(builder.opener_ids) - len(builder.close_ids) - len(builder.unit_ids(units))
        return prompt, units_start if units else len(prompt)

    def _final_units(self, end_sample: int) -> tuple[list[int], float]:  # HuBERT thread
        """Exact units of the turn's audio up to end_sample (the whole-utterance extraction, bit for bit)."""
        return self._units_of(np.array(self.units.audio[:end_sample], dtype=np.float32))

    def _units_of(self, audio: np.ndarray) -> tuple[list[int], float]:  # HuBERT thread
        """Exact units of 16 kHz mono audio (the whole-utterance extraction) and the seconds it took."""
        t0 = time.perf_counter()
        if audio.shape[0] < RECEPTIVE_FIELD:
            return [], time.perf_counter() - t0
        _, reduced = self.model.units.extract(audio)
        return [int(u) for u in reduced], time.perf_counter() - t0

    def _sync_kv(self, target: list[int], need_logits: bool) -> tuple[int, int, int, object]:  # LLM thread
        """Make the KV cache hold `target`: keep the common prefix, prefill the rest (at least the last token when
        logits are needed). Returns (tokens kept, tokens prefilled, tokens rolled back, logits or None)."""
        logits = None
        keep = _common_prefix(self.kv_ids, target)
        if need_logits:
            keep = min(keep, len(target) - 1)
        rolled = len(self.kv_ids) - keep
        try:
            if rolled:
                self.engine.truncate(keep)
            self.kv_ids = self.kv_ids[:keep]
            if len(target) > keep:
                logits = self.engine.prefill(target[keep:], start_pos=keep)
            self.kv_ids = list(target)
        except Exception:
            self.kv_ids = []  # unknown cache contents: the next prefill starts from position 0
            self.engine.truncate(0)
            raise
        return keep, len(target) - keep, rolled, logits

    def _prefill_reply(self, r: _Reply, prompt: list[int], units_start: int) -> None:  # LLM thread
        t0 = time.perf_counter()
        keep, prefilled, rolled, logits = self._sync_kv(prompt, need_logits=True)
        r.cached_tokens = keep
        r.record.logits = logits.clone()
        m = r.metrics
        m.prefill_compute_s = time.perf_counter() - t0
        m.eot_prefill_tokens = prefilled
        m.speculative_tokens = max(0, keep - units_start)  # question units found in the cache
        m.rollback_tokens = rolled  # cached tokens dropped (changed provisional units, a re-rendered history)

    def _decode(self, r: _Reply, prompt: list[int]) -> None:  # LLM thread
        """Decode and parse here (the parser is cheap), so decoding stops at the exact token that ends the answer;
        the loop receives (parser events, time) in order."""
        cfg = self.config
        budget = min(cfg.max_new_tokens, r.options.max_output_tokens or cfg.max_new_tokens,
                     self.engine.max_seq - len(prompt))
        if budget < 1:
            raise StageError("decode", f"a {len(prompt)}-token prompt leaves no room to answer")
        r.decode_t0 = time.perf_counter()
        sosp = self.vocab.sosp
        stream = None
        try:
            # An answer to a text question is a text answer first, and a text-only answer is cut where units begin:
            # neither may open with a unit span (a model that tries would leave the text empty).
            text_first = not r.options.audio or r.answer_task is Task.TEXT
            stream = self.engine.decode(cfg.sampling, seed=r.seed, max_new_tokens=budget, speech_mode=cfg.speech_head,
                                        text_first=text_first)
            r.stream = stream
            if r.stop.is_set():
                stream.cancel()
            for token in stream:
                events = r.parser.feed(token)
                self._call_soon(r.parsed.put_nowait, (events, self.clock.now()))
                r.generated += 1
                if self.vocab.is_unit(token):
                    r.unit_perf.append(time.perf_counter())
                    r.generated_units += 1
                if not r.options.audio and any(isinstance(e, UnitSpanStarted) or (
                        isinstance(e, SegmentDone) and e.segment is Segment.TEXT_ANSWER) for e in events):
                    r.text_stop = True  # text-only output: the text answer is complete, no units wanted
                    stream.cancel()
                elif r.parser.done:
                    stream.cancel()  # the answer is complete (the final "." and EOS add nothing)
                elif token == sosp and not r.gate.is_set():
                    r.gated_at = self.clock.now()
                    gate_t = time.perf_counter()
                    r.gate.wait()  # preemptive: hold before the unit span until the end of turn is decided
                    r.decode_t0 += time.perf_counter() - gate_t  # waiting is not decode compute
                if r.stop.is_set():
                    stream.cancel()
            if not r.parser.done:
                reason = "text_only" if r.text_stop else "cancelled" if r.stop.is_set() else "length"
                self._call_soon(r.parsed.put_nowait, (r.parser.finish(reason), self.clock.now()))
        finally:
            if stream is not None:
                stream.close()
                self.kv_ids = prompt + stream.tokens[:-1]  # the last token was never fed to the model
                r.metrics.new_tokens = len(stream.tokens)
                r.record.tokens = list(stream.tokens)
            self._call_soon(r.parsed.put_nowait, None)

    def _on_parsed(self, r: _Reply, event, at: float) -> None:
        m, turn = r.metrics, r.turn.index
        item_id = r.user_item.id if r.user_item is not None else None
        response_id = r.response.id if r.response is not None else None
        if isinstance(event, TextDelta):
            if event.segment is Segment.TRANSCRIPT:
                m.first_transcript_token = m.first_transcript_token or at
                r.transcript += event.text
                self.events.emit(UserTranscript(turn, r.transcript, final=False, item_id=item_id, delta=event.text))
            else:
                m.first_text_answer_token = m.first_text_answer_token or at
                r.text += event.text
                self.events.emit(AgentText(turn, event.text, r.text, final=False, response_id=response_id))
        elif isinstance(event, SegmentDone) and event.segment is Segment.TRANSCRIPT:
            r.transcript, r.transcript_final = event.text, True
            self.events.emit(UserTranscript(turn, r.transcript, final=True, item_id=item_id))
        elif isinstance(event, SegmentDone):
            r.text = event.text
        elif isinstance(event, Unit) and not r.options.audio:
            return  # text-only output (decoding stops before the units; a unit in the same token step is dropped)
        elif isinstance(event, Unit):
            m.first_unit = m.first_unit or at
            if not r.units:
                r.audio.put_nowait(self._submit(self._vocoder, self.synth.reset))
            r.units.append(event.unit)
            r.audio.put_nowait(self._submit(self._vocoder, self._vocode, r, event.unit))
        elif isinstance(event, UnitSpanEnded) and r.options.audio:
            r.span_ended = True
            if r.units:
                r.audio.put_nowait(self._submit(self._vocoder, self._flush_vocoder, r))
        elif isinstance(event, AnswerDone) and event.response.issues:
            log.info("%s: turn %d answer issues: %s", self.name, turn, [i.value for i in event.response.issues])

    def _vocode(self, r: _Reply, unit: int) -> list[AudioFrame]:  # vocoder thread
        return self._synthesize(r, lambda: self.synth.push(unit))

    def _flush_vocoder(self, r: _Reply) -> list[AudioFrame]:  # vocoder thread
        return self._synthesize(r, self.synth.flush)

    def _synthesize(self, r: _Reply, step) -> list[AudioFrame]:  # vocoder thread
        if r.cancelled:
            return []
        t0 = time.perf_counter()
        frames = step()
        m = r.metrics
        if m.first_vocoder_audio is None and frames:
            m.vocoder_compute_s = time.perf_counter() - t0  # the call that made the first audio (the critical path)
            m.first_vocoder_audio = self.clock.now()
            # decode compute: until the unit that released the first audio (the vocoder's lookahead)
            released_by = min(self.synth.units_received, len(r.unit_perf)) - 1
            if released_by >= 0:
                m.decode_compute_s = r.unit_perf[released_by] - r.decode_t0
        return frames

    async def _play(self, r: _Reply) -> None:
        """Hand vocoder frames to the output in order, as they become ready."""
        while (fut := await r.audio.get()) is not None:
            frames = await asyncio.wrap_future(fut)
            for frame in frames or ():
                if r.cancelled:
                    return
                if not r.audio_started:
                    r.audio_started = True
                    r.metrics.first_frame_handed = self.clock.now()
                    self.vad.set_agent_speaking(True)
                    self._set_state(AgentState.SPEAKING)
                r.frames.append(frame.to_float32_mono().samples)
                r.handed_s += frame.duration
                self._set_deadline(r)
                await self.output.capture_frame(frame)

    def _set_deadline(self, r: _Reply | None) -> None:
        """Tell a batched engine when this session's playout runs dry (its decode steps are scheduled by it); None:
        no audio buffered, as soon as possible."""
        if not hasattr(self.engine, "deadline"):
            return
        if r is None or r.metrics.first_frame_handed is None:
            self.engine.deadline = None
            return
        left = r.metrics.first_frame_handed + r.handed_s - self.clock.now()
        self.engine.deadline = time.monotonic() + left

    def _on_playback(self, event: PlaybackStarted | PlaybackFinished) -> None:
        r = self._reply
        if isinstance(event, PlaybackStarted) and r is not None and r.metrics.first_frame_played is None:
            r.metrics.first_frame_played = event.at
            self.events.emit(ReplyAudioStarted(r.turn.index, event.at))

    def _complete(self, r: _Reply, finished: PlaybackFinished, status: str | None = None, reason: str | None = None,
                  cut: bool = True) -> None:
        """The reply ended (played out, interrupted, cancelled or dropped): history, final events, metrics. `cut`:
        an interrupted reply enters the history as heard (a client's cancel keeps all of it until a truncate)."""
        self._set_deadline(None)
        m = r.metrics
        m.interrupted = finished.interrupted
        m.heard_s = finished.position
        m.underruns = finished.underruns
        m.playback_end = finished.at
        m.output_units = len(r.units)
        m.reply_s = sum(f.shape[0] for f in r.frames) / SAMPLE_RATE
        text = r.text
        cut = cut and finished.interrupted
        if cut:
            heard = units_heard(self.synth.durations, finished.position, self._frame_s)
            text = heard_text(r.text, heard, len(r.units))
        m.transcript, m.text_answer = r.transcript, text
        if r.frames:
            self.replies[r.turn.index] = np.concatenate(r.frames)
        self.records[r.turn.index] = r.record
        item_id = r.user_item.id if r.user_item is not None else None
        if r.transcript and not r.transcript_final:
            self.events.emit(UserTranscript(r.turn.index, r.transcript, final=True, item_id=item_id))
        if status is None:
            status = "completed"
            if r.parser is not None and r.parser.response.end_reason == "length":
                status, reason = "incomplete", "max_output_tokens"
        self._record_history(r, finished, cut, status)
        response_id = r.response.id if r.response is not None else None
        self.events.emit(AgentText(r.turn.index, "", text, final=True, response_id=response_id))
        if r.audio_started:
            self.events.emit(ReplyAudioFinished(r.turn.index, finished.at, finished.position, finished.interrupted))
        self._finish(r)
        self._end_response(r, status, reason)
        self.turns.append(m)
        self.events.emit(TurnCompleted(m))

    def _record_history(self, r: _Reply, finished: PlaybackFinished, cut: bool, status: str) -> None:
        """The assistant message gets what the reply generated (cut to what was heard); the question its
        transcript (policies of the Realtime-style API above)."""
        if r.response is None:
            return
        item = r.response.item
        item.text = r.text
        item.units = list(r.units)
        item.durations = [int(d) for d in self.synth.durations] if r.units else []
        item.audio_s = r.metrics.reply_s
        item.frame_s = self._frame_s
        if cut:
            item.heard_s = finished.position
        item.status = "completed" if status == "completed" and not cut else "incomplete"
        question = r.user_item
        if question is None or r.answer_task is not Task.SPEECH:
            return
        if r.transcript:
            question.text = r.transcript
        elif r.source == "turn" and not item.heard_text:
            question.in_context = item.in_context = False  # answered with nothing: no history (module doc)
            question.units = question.units if question.units is not None else []
        elif r.source == "turn":
            question.text = ""

    def _end_response(self, r: _Reply, status: str, reason: str | None = None, error: str | None = None) -> None:
        response = r.response
        if response is None:
            return
        response.status, response.reason, response.error = status, reason, error
        if response.item.status == "in_progress":
            response.item.status = "incomplete"
        vocab = self.vocab
        prompt = r.record.prompt
        audio_in = sum(1 for t in prompt if vocab.is_unit(t))
        u = response.usage
        u.input_tokens, u.input_audio_tokens = len(prompt), audio_in
        u.input_text_tokens = len(prompt) - audio_in
        u.cached_tokens = r.cached_tokens
        u.output_tokens, u.output_audio_tokens = r.generated, r.generated_units
        u.output_text_tokens = r.generated - r.generated_units
        self.events.emit(ResponseDone(response))

    def _fail(self, r: _Reply, stage: str, exc: BaseException) -> None:
        r.metrics.errors.append(f"{stage}: {type(exc).__name__}: {exc}")
        self._error(stage, exc, r.turn.index)
        if r.audio_started:
            self.output.clear_buffer()
        self._halt(r)
        if r.response is not None:  # a failed answer is no history (its question stays, unless a VAD turn's)
            item = r.response.item
            item.text, item.units, item.in_context = r.text, list(r.units), False
            if r.source == "turn" and r.user_item is not None:
                r.user_item.in_context = False
                if r.user_item.units is None:
                    r.user_item.units = []
        self._finish(r)
        self._end_response(r, "failed", "error", f"{stage}: {type(exc).__name__}: {exc}")
        self.turns.append(r.metrics)
        self.events.emit(TurnCompleted(r.metrics))

    def _finish(self, r: _Reply) -> None:
        r.finished = True
        if r.done is not None and not r.done.done():
            r.done.set_result(None)
        if self._reply is r:
            self._reply = None
            self.vad.set_agent_speaking(False)
            self._set_state(AgentState.LISTENING)
