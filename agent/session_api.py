"""The Session's Realtime-style turn control: manual turns, conversation items and responses (the API the OpenAI
Realtime server maps its events onto). A part of `agent.session.Session`, kept in its own file: these methods run
on the session's event loop over the state the Session owns."""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np

from agent.conversation import APPEND, DuplicateItem, Message, new_item_id
from agent.events import AgentState, AudioCommitted, ItemAdded, ResponseCreated
from agent.io import PlaybackFinished
from agent.metrics import TurnMetrics
from agent.session_types import (
    EmptyAudioBuffer,
    MIN_COMMIT_S,
    Response,
    ResponseActive,
    ResponseOptions,
    TurnDetection,
    _Reply,
    _UserTurn,
    _with_end_of_turn_silence,
)
from streaming.vad import VadDetector

SAMPLE_RATE = 16000  # the session's audio rate (agent.session.SAMPLE_RATE)


class SessionItemsApi:
    """Mixed into Session (see there for the state these methods use)."""

    # ---- manual turns, items and responses (the Realtime-style API) -----------------------------------------
    # Policies:
    # - Turn detection: `TurnDetection` (the default) is the VAD-driven behaviour of the module doc, with
    #   `create_response=False` (a turn becomes a user message, nothing is answered) and `interrupt_response=False`
    #   (user speech never stops a response) honoured. `None` is manual: input frames are buffered (resampled to
    #   16 kHz), nothing is answered until `commit_audio()` makes the buffered audio a user message and
    #   `create_response()` answers. Switching mode drops the audio of a turn in progress and the buffer.
    # - `commit_audio()` computes the final units of the whole buffer (the extraction `respond` does) on the HuBERT
    #   thread; the message is in the conversation at once, its units follow, and a response waits for them.
    # - A response answers the conversation as it stands (agent/conversation.py renders it): chain of modality
    #   when the last user message is audio not transcribed yet, a text answer (SpeechGPT's text task) when it is
    #   text. Its assistant message enters the conversation when the response is created (in progress, not
    #   rendered) and is filled in when it ends; the question's transcript replaces its units once a reply has
    #   written one. Text-only output stops decoding at the end of the text answer (no units, no vocoder).
    # - One response at a time: `create_response()` while one is in progress raises ResponseActive (a preemptive
    #   VAD reply not released yet is discarded instead). `cancel_response()` stops decode and vocoder; the
    #   assistant message keeps everything generated until then ("incomplete") until `truncate_item()` cuts it
    #   to what was heard, by the barge-in rule. A barge-in under VAD cuts it at once, to the output's position.
    # - Editing the conversation (`add_item`, `delete_item`, `truncate_item`) changes the next prompt from the
    #   edited message on; the KV cache is kept up to the common prefix (`_sync_kv`), so it is invalidated from
    #   there. Editing the message of the response in progress cancels that response first.
    # - A VAD turn whose reply wrote neither a transcript nor a text answer (heard) leaves no history: its two
    #   messages stay in `conversation.items` but leave the context. A failed VAD turn does the same.
    def set_turn_detection(self, detection: TurnDetection | None) -> None:
        old, self.turn_detection = self.turn_detection, detection
        if detection is None:
            if old is not None:
                self._leave_vad_turn()
            return
        silence = detection.end_of_turn_silence_s
        if silence is not None and silence != self.config.end_of_turn_silence_s:
            self.config = _with_end_of_turn_silence(self.config, silence)
            self._leave_vad_turn()
            self.vad = VadDetector(self.config.vad_config())
        elif old is None:
            self.vad.reset()
        if old is None:
            self.clear_audio()

    def _leave_vad_turn(self) -> None:
        self._listening = None
        reply = self._reply
        if reply is not None and reply.preemptive and not reply.released.is_set():
            self._discard(reply)
        self.vad.reset()

    @property
    def input_buffer_s(self) -> float:
        """Manual turns: seconds of audio buffered since the last commit or clear."""
        return sum(a.shape[0] for a in self._input_audio) / SAMPLE_RATE

    def commit_audio(self, item_id: str | None = None, previous_item_id: str | None = APPEND) -> Message:
        """Manual turns: the audio buffered since the last commit/clear becomes a user audio message (returned at
        once; its units are extracted on the HuBERT thread). Raises EmptyAudioBuffer under `MIN_COMMIT_S`, and
        with server VAD on (the VAD commits its turns itself)."""
        if self.turn_detection is not None:
            raise EmptyAudioBuffer("server VAD is on: it commits the turns it detects, nothing is buffered")
        if item_id is not None and item_id in self.conversation:
            raise DuplicateItem(f"an item with id {item_id!r} is already in the conversation")
        if previous_item_id not in (APPEND, "root") and previous_item_id not in self.conversation:
            self.conversation.get(previous_item_id)  # raises UnknownItem
        for frame in self._input_resampler.flush():
            self._input_audio.append(frame.to_float32_mono().samples)
        audio = np.concatenate(self._input_audio) if self._input_audio else np.zeros(0, np.float32)
        self._input_audio = []
        seconds = audio.shape[0] / SAMPLE_RATE
        if seconds < MIN_COMMIT_S - 1e-9:
            raise EmptyAudioBuffer(f"{seconds * 1e3:.0f} ms of audio buffered; a commit needs at least "
                                   f"{MIN_COMMIT_S * 1e3:.0f} ms")
        message = Message(item_id or new_item_id(), "user", "audio", audio_s=seconds)
        previous = self.conversation.insert(message, previous_item_id)
        self._committed_at[message.id] = self.clock.now()
        self._extract_units(message, audio)
        self.events.emit(AudioCommitted(message.id, previous, self.clock.now()))
        self.events.emit(ItemAdded(message, previous))
        return message

    def clear_audio(self) -> float:
        """Manual turns: drop the buffered audio; returns how many seconds were dropped."""
        dropped = self.input_buffer_s
        self._input_audio = []
        self._input_resampler.reset()
        return dropped

    def add_item(self, message: Message, previous_item_id: str | None = APPEND,
                 audio: np.ndarray | None = None) -> str | None:
        """Put a message into the conversation (after `previous_item_id`; APPEND: last, "root": first); returns the
        id now before it. A user audio message may come as `audio` (16 kHz mono float32): its units are extracted
        like a commit's. Raises DuplicateItem / UnknownItem (agent.conversation)."""
        if message.role == "user" and message.modality == "audio" and message.text is None and message.units is None:
            if audio is None or audio.shape[0] / SAMPLE_RATE < MIN_COMMIT_S - 1e-9:
                raise EmptyAudioBuffer(f"user audio message {message.id!r}: no transcript, units or "
                                       f">= {MIN_COMMIT_S * 1e3:.0f} ms of audio")
            message.audio_s = audio.shape[0] / SAMPLE_RATE
        previous = self.conversation.insert(message, previous_item_id)
        if audio is not None and message.pending:
            self._extract_units(message, np.asarray(audio, np.float32))
        self.events.emit(ItemAdded(message, previous))
        return previous

    def get_item(self, item_id: str) -> Message:
        return self.conversation.get(item_id)

    def delete_item(self, item_id: str) -> Message:
        """Remove a message (the response writing it is cancelled first)."""
        self._cancel_if_writing(item_id)
        return self.conversation.delete(item_id)

    def truncate_item(self, item_id: str, audio_end_s: float) -> float:
        """Cut an assistant message to the first `audio_end_s` seconds of its audio (clamped to what it has): its
        units to those heard, its text by the barge-in rule. Returns the position kept (0.0 and no change for a
        message without audio). The response writing it is cancelled first."""
        self.conversation.get(item_id)
        self._cancel_if_writing(item_id)
        return self.conversation.truncate(item_id, audio_end_s)

    def _cancel_if_writing(self, item_id: str) -> None:
        active = self.active_response
        if active is not None and active.item.id == item_id:
            self.cancel_response("client_cancelled")

    @property
    def active_response(self) -> Response | None:
        r = self._reply
        if r is None or r.finished or r.response is None:
            return None
        return r.response

    def create_response(self, options: ResponseOptions | None = None) -> Response:
        """Answer the conversation as it stands (policies above); the Response is returned at once and its events
        follow (ResponseCreated, the text and audio, ResponseDone). Raises ResponseActive while one is in progress.
        Call it from the event loop that runs `run()`."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the session is closed")
        active = self.active_response
        if active is not None:
            raise ResponseActive(active)
        if self._reply is not None:  # a preemptive reply to a VAD turn not decided yet
            self._discard(self._reply)
        options = options or self.response_defaults
        turn = _UserTurn(self._turn_count, None, 0.0, while_speaking=self.state == AgentState.SPEAKING)
        self._turn_count += 1
        question = self.conversation.question()
        committed = self._committed_at.get(question.id) if question is not None else None
        now = self.clock.now()
        metrics = TurnMetrics(turn.index, last_voiced=committed, final_eot=now)
        reply = _Reply(turn, metrics, False, now, 0, self.config.seed + turn.index, source="items", options=options)
        reply.done = asyncio.get_running_loop().create_future()
        self._reply = reply
        self._new_response(reply, options, "client")
        self._release(reply)
        reply.task = asyncio.get_running_loop().create_task(self._run_reply(reply))
        return reply.response

    def cancel_response(self, reason: str = "client_cancelled") -> Response | None:
        """Stop the response in progress now (decode, vocoder, queued output). Returns it ("cancelled"), or None
        when none is in progress."""
        r = self._reply
        if self.active_response is None:
            return None
        finished = self.output.clear_buffer() if r.audio_started else None
        r.metrics.interrupted_at = self.clock.now()
        self._halt(r)
        self._complete(r, finished or PlaybackFinished(0.0, True, self.clock.now()), status="cancelled",
                       reason=reason, cut=False)
        return r.response

    def _new_response(self, r: _Reply, options: ResponseOptions, trigger: str) -> Response:
        item = Message(options.item_id or new_item_id(), "assistant", "audio" if options.audio else "text", text="",
                       frame_s=self._frame_s, status="in_progress")
        previous = self.conversation.insert(item)
        response = Response(new_item_id("resp"), options, item, trigger, r.turn.index,
                            question_id=r.user_item.id if r.user_item is not None else None)
        item.response_id = response.id
        r.response, r.options = response, options
        self.events.emit(ResponseCreated(response, previous))
        return response

    def _extract_units(self, message: Message, audio: np.ndarray) -> None:
        fut = self._submit(self._hubert, self._units_of, audio)
        self._pending_units[message.id] = fut
        fut.add_done_callback(lambda f: self._call_soon(self._units_ready, message, f))

    def _units_ready(self, message: Message, fut: concurrent.futures.Future) -> None:
        if self._pending_units.get(message.id) is fut:
            del self._pending_units[message.id]
        if message.units is not None:
            return
        if fut.exception() is not None:
            message.units, message.in_context = [], False  # unusable audio: it cannot be part of a prompt
            self._error("units", fut.exception())
            return
        message.units = fut.result()[0]

    def _commit_turn(self, turn: _UserTurn, end_sample: int, reply: _Reply | None) -> Message:
        """A VAD turn ended: it becomes a user audio message (units from its reply, or extracted now)."""
        message = Message(turn.item_id or new_item_id(), "user", "audio",
                          audio_s=max(0, end_sample) / SAMPLE_RATE)
        previous = self.conversation.insert(message)
        self._committed_at[message.id] = self.clock.now()
        if reply is not None:
            reply.user_item = message
            if reply.record.units:
                message.units = list(reply.record.units)
        else:
            fut = self._submit(self._hubert, self._final_units, end_sample)
            fut.add_done_callback(lambda f: self._call_soon(self._units_ready, message, f))
        self.events.emit(AudioCommitted(message.id, previous, self.clock.now()))
        self.events.emit(ItemAdded(message, previous))
        return message
