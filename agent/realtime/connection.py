"""One Realtime WebSocket connection: client events -> Session calls, Session events -> GA server events.

The connection owns one Session over the process's one loaded model (`PushInput` / `RealtimeOutput` from
agent/realtime/transport.py), the effective session state (agent/realtime/protocol.py) and one ordered outbox: every
server event, audio deltas included, leaves through it in the order it was made, so nothing of a response can follow
its `response.done`. Client events are handled one at a time, in arrival order; a refused event is answered with an
`error` event carrying its `event_id`, and the connection goes on (docs/realtime.md, Errors).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.clock import SessionClock
from agent.conversation import APPEND, ROOT, DuplicateItem, Message, UnknownItem
from agent.events import (
    AgentText,
    AudioCommitted,
    ItemAdded,
    ResponseCreated,
    ResponseDone,
    SessionError,
    UserSpeechEnded,
    UserSpeechStarted,
    UserTranscript,
)
from agent.realtime import protocol as P
from agent.realtime.audio import SESSION_RATE, AudioFormatError, InputConverter, OutputConverter
from agent.realtime.transport import PushInput, RealtimeOutput
from agent.session import EmptyAudioBuffer, ResponseActive, ResponseOptions, SessionConfig, TurnDetection

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 16 * 2**20  # a client event larger than this is refused (an error event; the connection goes on)


@dataclass
class ServerOptions:
    model_name: str = "speechgpt"  # session.model when the client names none
    input_rate: int | None = None  # the real rate of inbound audio/pcm (16000 for clients that mislabel it)
    api_key: str | None = None  # None: any key (or none) is accepted
    max_sessions: int | None = None
    max_event_bytes: int = MAX_EVENT_BYTES
    honour_instructions: bool = False  # use the client's instructions as SpeechGPT's system prompt
    session_config: SessionConfig = field(default_factory=SessionConfig)
    event_log_dir: Path | None = None  # write every server event of each connection here (JSON lines)


@dataclass
class _Ledger:
    """What a response has sent so far."""

    response: Any
    metadata: dict | None
    audio: bool
    audio_bytes: int = 0
    text: str = ""


class RealtimeConnection:
    def __init__(self, ws, model, options: ServerOptions, url_model: str | None = None, name: str = "realtime"):
        self.ws = ws
        self.options = options
        self.clock = SessionClock()
        self.input = PushInput()
        self.output = RealtimeOutput(self.clock, self._on_reply_frame, self._on_reply_flush, self._on_reply_clear)
        self.session = model.session(self.input, self.output, options.session_config, self.clock, name=name,
                                     attributes={"transport": "realtime"})
        self.state = P.RealtimeSessionState(model=url_model or options.model_name)
        self._t0 = self.clock.now()
        self._input = InputConverter(self.state.input_format, self._t0, options.input_rate)
        self._output = OutputConverter(self.state.output_format)
        self._outbox: asyncio.Queue[dict | None] = asyncio.Queue()
        self._ledger: _Ledger | None = None
        self._transcribed: set[str] = set()
        self._log = None
        if options.event_log_dir is not None:
            options.event_log_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(options.event_log_dir / f"{self.state.id}.jsonl", "w")
        self.session.events.keep_history = False
        self.session.events.on(self._on_session_event)
        self._apply_state(None)
        self._handlers = {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.delete": self._item_delete,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.truncate": self._item_truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "output_audio_buffer.clear": self._noop,  # WebRTC/SIP only: nothing is buffered here
        }

    # ---- lifecycle ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        from aiohttp import WSMsgType

        session_task = asyncio.get_running_loop().create_task(self.session.run())
        writer = asyncio.get_running_loop().create_task(self._writer())
        await asyncio.sleep(0)  # the session's loop is running before any event is handled
        self.send(P.event("session.created", session=self.state.to_dict()))
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    await self.handle(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._error(P.ProtocolError(P.INVALID_EVENT, "binary frames are not Realtime events: send JSON text"))
                elif msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE, WSMsgType.CLOSING):
                    break
        finally:
            self.input.close()
            await self.session.aclose()
            session_task.cancel()
            await asyncio.gather(session_task, return_exceptions=True)
            self._outbox.put_nowait(None)
            await asyncio.gather(writer, return_exceptions=True)
            if self._log is not None:
                self._log.close()

    def send(self, event: dict) -> None:
        self._outbox.put_nowait(event)

    async def _writer(self) -> None:
        while (event := await self._outbox.get()) is not None:
            text = json.dumps(event)
            if self._log is not None:
                self._log.write(text + "\n")
            if self.ws.closed:
                continue
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):  # the client went away; the reader ends the connection
                continue

    # ---- client events --------------------------------------------------------------------------------------
    async def handle(self, text: str) -> None:
        if len(text) > self.options.max_event_bytes:
            self._error(P.ProtocolError(P.EVENT_TOO_LARGE, f"event of {len(text)} bytes: at most "
                                        f"{self.options.max_event_bytes} are accepted"))
            return
        try:
            evt = json.loads(text)
        except ValueError as exc:
            self._error(P.ProtocolError(P.INVALID_JSON, f"the event is not valid JSON: {exc}"))
            return
        if not isinstance(evt, dict) or not isinstance(evt.get("type"), str):
            self._error(P.ProtocolError(P.INVALID_EVENT, "an event is a JSON object with a string \"type\""))
            return
        event_id = evt.get("event_id") if isinstance(evt.get("event_id"), str) else None
        handler = self._handlers.get(evt["type"])
        if handler is None:
            self._error(P.ProtocolError(P.UNKNOWN_EVENT, f"unknown event type {evt['type']!r} (this server speaks the "
                                        "GA dialect)", "type"), event_id)
            return
        try:
            await handler(evt)
        except P.ProtocolError as err:
            self._error(err, event_id)
        except Exception as exc:  # noqa: BLE001 - one bad event must not end the connection
            log.exception("%s: %s failed", self.session.name, evt["type"])
            self._error(P.ProtocolError("server_error", f"{type(exc).__name__}: {exc}", type="server_error"), event_id)

    def _error(self, err: P.ProtocolError, event_id: str | None = None) -> None:
        log.info("%s: error %s: %s", self.session.name, err.code, err.message)
        self.send(P.error_event(err, event_id))

    async def _noop(self, evt: dict) -> None:
        return None

    async def _session_update(self, evt: dict) -> None:
        old, self.state = self.state, self.state.update(evt.get("session"))
        self._apply_state(old)
        self.send(P.event("session.updated", session=self.state.to_dict()))

    def _apply_state(self, old: P.RealtimeSessionState | None) -> None:
        s, session = self.state, self.session
        td = s.turn_detection
        if old is None or td != old.turn_detection:
            session.set_turn_detection(None if td is None else TurnDetection(
                td["create_response"], td["interrupt_response"], P.turn_silence_s(td)))
        max_tokens = None if s.max_output_tokens == "inf" else s.max_output_tokens
        session.response_defaults = replace(session.response_defaults, modalities=s.output_modalities,
                                            max_output_tokens=max_tokens)
        session.instructions = s.instructions if (self.options.honour_instructions and s.instructions) else None
        if old is not None and s.input_format != old.input_format:
            for frame in self._input.flush():
                self.input.push(frame)
            self._input = InputConverter(s.input_format, self._input.t0 + self._input.seconds, self.options.input_rate)
        if old is not None and s.output_format != old.output_format and self._ledger is None:
            self._output = OutputConverter(s.output_format)

    async def _append(self, evt: dict) -> None:
        audio = evt.get("audio")
        if not isinstance(audio, str):
            raise P.ProtocolError(P.MISSING_PARAMETER, "input_audio_buffer.append needs \"audio\" (base64)", "audio")
        data = _b64(audio, "audio")
        try:
            frames = self._input.push(data)
        except AudioFormatError as exc:
            raise P.ProtocolError(P.INVALID_VALUE, str(exc), "audio") from None
        for frame in frames:
            self.input.push(frame)

    async def _commit(self, evt: dict) -> None:
        if self.session.turn_detection is None:
            for frame in self._input.flush():
                self.input.push(frame)
        await self.input.drained()
        try:
            self.session.commit_audio()
        except EmptyAudioBuffer as exc:
            raise P.ProtocolError(P.COMMIT_EMPTY, f"Error committing input audio buffer: {exc}") from None

    async def _clear(self, evt: dict) -> None:
        self._input.flush()  # dropped with the rest
        await self.input.drained()
        self.session.clear_audio()
        self.send(P.event("input_audio_buffer.cleared"))

    async def _item_create(self, evt: dict) -> None:
        spec = P.parse_item(evt.get("item"))
        previous = evt.get("previous_item_id", APPEND)
        if previous is not None and not isinstance(previous, str):
            raise P.ProtocolError(P.INVALID_VALUE, "previous_item_id: expected a string", "previous_item_id")
        audio = None
        if spec["audio"] is not None:
            try:
                pcm = self.state.input_format.decode(_b64(spec["audio"], "item.content.audio"))
            except AudioFormatError as exc:
                raise P.ProtocolError(P.INVALID_VALUE, str(exc), "item.content.audio") from None
            audio = _to_session_rate(pcm, self._input.in_rate)
        item_id = spec["id"] or P.new_id("item")
        message = Message(item_id, spec["role"], spec["modality"], text=spec["text"])
        try:
            self.session.add_item(message, ROOT if previous == ROOT else previous, audio=audio)
        except DuplicateItem as exc:
            raise P.ProtocolError(P.CREATE_DUPLICATE, str(exc), "item.id") from None
        except UnknownItem as exc:
            raise P.ProtocolError(P.CREATE_INVALID_PREVIOUS, str(exc), "previous_item_id") from None
        except EmptyAudioBuffer as exc:
            raise P.ProtocolError(P.INVALID_VALUE, str(exc), "item.content") from None

    def _item_id(self, evt: dict) -> str:
        item_id = evt.get("item_id")
        if not isinstance(item_id, str):
            raise P.ProtocolError(P.MISSING_PARAMETER, f"{evt['type']} needs \"item_id\"", "item_id")
        return item_id

    async def _item_delete(self, evt: dict) -> None:
        item_id = self._item_id(evt)
        try:
            self.session.delete_item(item_id)
        except UnknownItem as exc:
            raise P.ProtocolError(P.DELETE_INVALID, str(exc), "item_id") from None
        self.send(P.event("conversation.item.deleted", item_id=item_id))

    async def _item_retrieve(self, evt: dict) -> None:
        item_id = self._item_id(evt)
        try:
            message = self.session.get_item(item_id)
        except UnknownItem as exc:
            raise P.ProtocolError(P.RETRIEVE_INVALID, str(exc), "item_id") from None
        self.send(P.event("conversation.item.retrieved", item=P.item_dict(message)))

    async def _item_truncate(self, evt: dict) -> None:
        item_id = self._item_id(evt)
        end_ms = evt.get("audio_end_ms")
        if isinstance(end_ms, bool) or not isinstance(end_ms, (int, float)):
            raise P.ProtocolError(P.MISSING_PARAMETER, "conversation.item.truncate needs a number \"audio_end_ms\"",
                                  "audio_end_ms")
        try:
            kept = self.session.truncate_item(item_id, max(0.0, float(end_ms)) / 1000)
        except UnknownItem as exc:
            raise P.ProtocolError(P.TRUNCATE_INVALID, str(exc), "item_id") from None
        content_index = evt.get("content_index") if isinstance(evt.get("content_index"), int) else 0
        self.send(P.event("conversation.item.truncated", item_id=item_id, content_index=content_index,
                          audio_end_ms=int(round(kept * 1000))))

    async def _response_create(self, evt: dict) -> None:
        params = evt.get("response") or {}
        if not isinstance(params, dict):
            raise P.ProtocolError(P.INVALID_VALUE, "response: expected an object", "response")
        defaults = self.session.response_defaults
        modalities = defaults.modalities
        if params.get("output_modalities") is not None:
            modalities = P.parse_modalities(params["output_modalities"], "response.output_modalities")
        max_tokens = defaults.max_output_tokens
        if params.get("max_output_tokens") is not None:
            value = P.parse_max_tokens(params["max_output_tokens"], "response.max_output_tokens")
            max_tokens = None if value == "inf" else value
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise P.ProtocolError(P.INVALID_VALUE, "response.metadata: expected an object", "response.metadata")
        instructions = params.get("instructions") if isinstance(params.get("instructions"), str) else None
        options = ResponseOptions(modalities, instructions if self.options.honour_instructions and instructions else None,
                                  metadata, max_tokens)
        try:
            self.session.create_response(options)
        except ResponseActive as exc:
            raise P.ProtocolError(P.ACTIVE_RESPONSE, f"Conversation already has an active response in progress: "
                                  f"{exc.response.id}. Wait until the response is finished before creating a new one.",
                                  "response") from None

    async def _response_cancel(self, evt: dict) -> None:
        active = self.session.active_response
        wanted = evt.get("response_id")
        if active is None or (isinstance(wanted, str) and wanted != active.id):
            raise P.ProtocolError(P.CANCEL_NOT_ACTIVE, "Cancellation failed: no active response found")
        self.session.cancel_response("client_cancelled")

    # ---- session events -------------------------------------------------------------------------------------
    def _ms(self, t: float) -> int:
        return max(0, int(round((t - self._t0) * 1000)))

    def _on_session_event(self, e) -> None:
        if isinstance(e, UserSpeechStarted):
            self.send(P.event("input_audio_buffer.speech_started", audio_start_ms=self._ms(e.at), item_id=e.item_id))
        elif isinstance(e, UserSpeechEnded):
            self.send(P.event("input_audio_buffer.speech_stopped", audio_end_ms=self._ms(e.offset), item_id=e.item_id))
        elif isinstance(e, AudioCommitted):
            self.send(P.event("input_audio_buffer.committed", item_id=e.item_id, previous_item_id=e.previous_item_id))
        elif isinstance(e, ItemAdded):
            item = P.item_dict(e.item)
            self.send(P.event("conversation.item.added", previous_item_id=e.previous_item_id, item=item))
            self.send(P.event("conversation.item.done", previous_item_id=e.previous_item_id, item=item))
        elif isinstance(e, UserTranscript):
            self._on_transcript(e)
        elif isinstance(e, ResponseCreated):
            self._on_response_created(e)
        elif isinstance(e, AgentText):
            self._on_text(e)
        elif isinstance(e, ResponseDone):
            self._on_response_done(e)
        elif isinstance(e, SessionError):
            log.warning("%s: %s failed: %s", self.session.name, e.stage, e.message)

    def _on_transcript(self, e: UserTranscript) -> None:
        if self.state.transcription is None or e.item_id is None or e.item_id in self._transcribed:
            return
        if not e.final:
            if e.delta:
                self.send(P.event("conversation.item.input_audio_transcription.delta", item_id=e.item_id,
                                  content_index=0, delta=e.delta))
            return
        self._transcribed.add(e.item_id)
        self.send(P.event("conversation.item.input_audio_transcription.completed", item_id=e.item_id,
                          content_index=0, transcript=e.text,
                          usage={"type": "tokens", "total_tokens": 0, "input_tokens": 0, "output_tokens": 0}))

    def _on_response_created(self, e: ResponseCreated) -> None:
        r = e.response
        self._ledger = ledger = _Ledger(r, r.options.metadata, r.options.audio)
        self._output = OutputConverter(self.state.output_format)
        rid, item_id = r.id, r.item.id
        self.send(P.event("response.created", response=P.response_dict(r, self.state, ledger.metadata, [], done=False)))
        item = P.item_dict(r.item, "in_progress") | {"content": []}
        self.send(P.event("response.output_item.added", response_id=rid, output_index=0, item=item))
        self.send(P.event("conversation.item.added", previous_item_id=e.previous_item_id, item=item))
        part = {"type": "audio", "transcript": ""} if ledger.audio else {"type": "text", "text": ""}
        self.send(P.event("response.content_part.added", response_id=rid, item_id=item_id, output_index=0,
                          content_index=0, part=part))

    def _on_text(self, e: AgentText) -> None:
        ledger = self._ledger
        if e.final or not e.delta or ledger is None or e.response_id != ledger.response.id:
            return
        ledger.text += e.delta
        kind = "response.output_audio_transcript.delta" if ledger.audio else "response.output_text.delta"
        self.send(P.event(kind, response_id=ledger.response.id, item_id=ledger.response.item.id, output_index=0,
                          content_index=0, delta=e.delta))

    def _on_reply_frame(self, frame) -> None:
        ledger = self._ledger
        if ledger is None or not ledger.audio:
            return
        self._send_audio(ledger, self._output.push(frame))

    def _on_reply_flush(self) -> None:
        if self._ledger is not None and self._ledger.audio:
            self._send_audio(self._ledger, self._output.flush())

    def _on_reply_clear(self) -> None:
        self._output.reset()  # what soxr still holds is never sent

    def _send_audio(self, ledger: _Ledger, data: bytes) -> None:
        if not data:
            return
        ledger.audio_bytes += len(data)
        self.send(P.event("response.output_audio.delta", response_id=ledger.response.id,
                          item_id=ledger.response.item.id, output_index=0, content_index=0,
                          delta=base64.b64encode(data).decode("ascii")))

    def _on_response_done(self, e: ResponseDone) -> None:
        ledger, r = self._ledger, e.response
        if ledger is None or ledger.response is not r:
            return
        self._ledger = None
        rid, item_id = r.id, r.item.id
        transcript = r.item.text or ""  # everything generated (a truncate later cuts the item, not this record)
        common = dict(response_id=rid, item_id=item_id, output_index=0, content_index=0)
        if ledger.audio:
            self.send(P.event("response.output_audio.done", **common))
            self.send(P.event("response.output_audio_transcript.done", **common, transcript=transcript))
            part = {"type": "audio", "transcript": transcript}
        else:
            self.send(P.event("response.output_text.done", **common, text=transcript))
            part = {"type": "text", "text": transcript}
        self.send(P.event("response.content_part.done", **common, part=part))
        item = P.item_dict(r.item)
        self.send(P.event("response.output_item.done", response_id=rid, output_index=0, item=item))
        self.send(P.event("conversation.item.done", previous_item_id=self._previous_id(item_id), item=item))
        self.send(P.event("response.done", response=P.response_dict(r, self.state, ledger.metadata, [item], done=True)))

    def _previous_id(self, item_id: str) -> str | None:
        try:
            return self.session.conversation.previous_id(item_id)
        except UnknownItem:
            return None


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise P.ProtocolError(P.INVALID_VALUE, f"{param}: not valid base64", param) from None


def _to_session_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 samples at `rate` -> 16 kHz mono float32 (one whole piece: an item's audio)."""
    from streaming.frames import AudioFrame, Resampler

    if samples.shape[0] == 0:
        return np.zeros(0, np.float32)
    resampler = Resampler(SESSION_RATE, in_rate=rate)
    frames = resampler.push(AudioFrame(samples, rate, 1, 0.0)) + resampler.flush()
    return np.concatenate([f.to_float32_mono().samples for f in frames]) if frames else np.zeros(0, np.float32)
