"""`RemoteSession`: one conversation whose model runs behind `speechgpt-rt serve`, with the surface the transports use
on `agent.session.Session` (`run()`, `aclose()`, `events`, `turns`, `state`, `idle`, `attributes`).

It is a Realtime client of our own server (GA dialect, one WebSocket per conversation) in `server_vad` mode, the way
LiveKit Agents' OpenAI plugin uses a Realtime server:
- the transport's input frames are stamped on the session clock, resampled to 24 kHz PCM16 (streaming, timestamps
  carried through) and sent as `input_audio_buffer.append`; the server's VAD takes the turns;
- server events become the session's events (agent/events.py): speech_started / speech_stopped -> UserSpeechStarted /
  UserSpeechEnded, the input transcription -> UserTranscript, transcript deltas -> AgentText, audio deltas -> 16 kHz
  20 ms frames played on the transport's AudioOutput (ReplyAudioStarted / Finished from its playback events),
  response.done + the end of playback -> TurnCompleted with what the client can measure (the server's audio
  positions are mapped back onto the session clock through the input frames' timestamps);
- barge-in: `speech_started` while a reply plays clears the output at once and sends `conversation.item.truncate`
  with the position actually played (the output's PlaybackFinished), then retrieves the item for the text as heard;
- the server going away ends the session with a SessionError (stage "server"); it never raises into the transport.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field, replace

import numpy as np

from agent.clock import SessionClock
from agent.events import (AgentState, AgentText, EventBus, ReplyAudioFinished, ReplyAudioStarted, SessionError,
                          StateChanged, TurnCompleted, UserSpeechEnded, UserSpeechStarted, UserTranscript)
from agent.io import AudioInput, AudioOutput, PlaybackFinished, PlaybackStarted
from agent.metrics import TurnMetrics
from agent.realtime.audio import PROTOCOL_PCM_RATE, SESSION_RATE
from agent.realtime.remote import UplinkAudio
from streaming.frames import AudioFrame, BadFrameError, Resampler

log = logging.getLogger(__name__)

FRAME_SAMPLES = SESSION_RATE // 50  # the 20 ms frames the in-process session hands its outputs
QUIET_ERRORS = {"response_cancel_not_active", "conversation_already_has_active_response"}  # races, not faults


@dataclass
class RemoteTurnMetrics(TurnMetrics):
    """A turn as the client measures it: the compute of each stage ran on the server, so no `overhead` (response
    minus that compute) can be told here."""

    def intervals(self) -> dict[str, float | None]:
        return super().intervals() | {"overhead": None}


@dataclass
class _Reply:
    """One server response as this client plays it."""

    response_id: str
    item_id: str
    turn: int
    user_item_id: str | None
    metrics: TurnMetrics
    frames: asyncio.Queue = field(default_factory=asyncio.Queue)  # 16 kHz frames, then None
    resampler: Resampler = field(default_factory=lambda: Resampler(SESSION_RATE, in_rate=PROTOCOL_PCM_RATE))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # less than a frame
    text: str = ""
    heard_text: str | None = None  # the server's item after a truncate
    received_s: float = 0.0
    status: str | None = None  # response.done's
    error: str | None = None
    audio_started: bool = False
    cut: bool = False  # cleared by a barge-in
    awaiting_item: bool = False  # a truncate was sent; its retrieve answer is pending
    finished: PlaybackFinished | None = None
    completed: bool = False


class RemoteSession:
    def __init__(self, model, input: AudioInput, output: AudioOutput, config=None, clock: SessionClock | None = None,
                 name: str = "remote", attributes: dict[str, str] | None = None):
        self.model = model
        self.input, self.output = input, output
        self.config = config
        self.clock = clock or SessionClock()
        self.name = name
        self.attributes = dict(attributes or {})
        self.events = EventBus()
        self.state = AgentState.INITIALIZING
        self.turns: list[TurnMetrics] = []
        self.error_count = 0
        self.rejected_frames = 0
        self.session_id: str | None = None  # the server's
        self._ws = None
        self._http = None
        self._send_lock: asyncio.Lock | None = None
        self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._uplink = UplinkAudio(self.clock, getattr(input, "timestamps_on_session_clock", False))
        self._turn_count = 0
        self._listening: tuple[int, str | None] | None = None  # (turn, item id) between speech_started and stopped
        self._speech: dict[str, TurnMetrics] = {}  # user item id -> what its turn measured so far
        self._transcripts: dict[str, str] = {}  # user item id -> final transcript
        self._interim: dict[str, str] = {}
        self._awaiting_response: float | None = None  # when a turn ended that no response.created answered yet
        self._last_user_item: str | None = None
        self._replies: dict[str, _Reply] = {}
        self._by_item: dict[str, _Reply] = {}
        self._queue: asyncio.Queue | None = None  # replies in order, for the player
        self._playing: _Reply | None = None
        output.on_playback(self._on_playback)

    # ---- lifecycle ------------------------------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No user turn being listened to and no reply in progress or playing."""
        return self._listening is None and not self._replies

    async def run(self) -> None:
        """Serve the conversation until the input ends (then finish the reply in progress), aclose(), or the
        server goes away (a SessionError first). Never raises for the server's sake."""
        import aiohttp

        from agent.realtime.remote import RemoteError, open_socket

        self._send_lock, self._queue = asyncio.Lock(), asyncio.Queue()
        try:
            delay = self.model.retry_delay()
            if delay:
                await asyncio.sleep(delay)
            if self._closed:
                return
            self._http = aiohttp.ClientSession()
            try:
                self._ws, created = await open_socket(self._http, self.model.url, self.model.api_key,
                                                      self.model.connect_timeout_s)
            except RemoteError as exc:
                self.model.connected(False)
                self._error("server", str(exc))
                return
            self.model.connected(True)
            if self._closed:
                return
            self.session_id = (created.get("session") or {}).get("id")
            await self._send(self._session_update())
            self._set_state(AgentState.LISTENING)
            reader = asyncio.ensure_future(self._read())
            sender = asyncio.ensure_future(self._send_input())
            self._tasks = [reader, sender, asyncio.ensure_future(self._play())]
            await asyncio.wait({reader, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done() and not reader.done() and not self._closed:
                await self._end_of_input(reader)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            for r in list(self._replies.values()):  # halt: nothing more is played
                r.cut = True
                r.frames.put_nowait(None)
            if self._queue is not None:
                self._queue.put_nowait(None)
            current = asyncio.current_task()
            for task in self._tasks:
                if task is not current:
                    task.cancel()
            await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
            self.output.remove_playback_listener(self._on_playback)
            self.events.close()
        # again from run()'s end: a connection opened while aclose() ran is closed too
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    async def _end_of_input(self, reader: asyncio.Task) -> None:
        """The input ended: a turn in progress is ended by silence (as the in-process session flushes its VAD),
        then the reply in progress finishes, unless the server goes first."""
        if self._listening is not None:
            silence = self._silence_s() + 0.3
            await self._append(np.zeros(round(silence * PROTOCOL_PCM_RATE), np.int16), self.clock.now())
        while not self._closed and not reader.done() and not (self.idle and not self._response_expected()):
            await asyncio.wait({reader}, timeout=0.05)

    def _response_expected(self) -> bool:
        """A turn ended a moment ago and its response.created has not come yet (bounded: a turn the server
        keeps without answering must not hold the end of the session)."""
        return self._awaiting_response is not None and self.clock.now() - self._awaiting_response < 5.0

    def _silence_s(self) -> float:
        return float(getattr(self.config, "end_of_turn_silence_s", 0.5))

    def _session_update(self) -> dict:
        from agent.prompts import META_INSTRUCTION

        cfg = self.config
        session = {"type": "realtime", "output_modalities": ["audio"], "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": PROTOCOL_PCM_RATE},
                      "transcription": {"model": "speechgpt"},
                      "turn_detection": {"type": "server_vad", "silence_duration_ms": round(self._silence_s() * 1000),
                                         "create_response": True, "interrupt_response": True}},
            "output": {"format": {"type": "audio/pcm", "rate": PROTOCOL_PCM_RATE}}}}
        prompt = getattr(cfg, "system_prompt", None)
        if prompt and prompt != META_INSTRUCTION:  # the server uses it only with --honour-instructions
            session["instructions"] = prompt
        return {"type": "session.update", "session": session}

    # ---- to the server --------------------------------------------------------------------------------------
    async def _send(self, event: dict) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            async with self._send_lock:
                await ws.send_str(json.dumps(event))
            return True
        except (ConnectionError, RuntimeError) as exc:  # the server went away: the reader reports it
            log.debug("%s: send failed: %s", self.name, exc)
            return False

    async def _send_input(self) -> None:
        async for frame in self.input:
            if self._closed:
                return
            try:
                frames = self._uplink.push(frame)
            except BadFrameError as exc:
                self.rejected_frames += 1
                self._error("frame", str(exc))
                continue
            for f in frames:
                if not await self._append(f.to_int16().samples, f.timestamp):
                    return

    async def _append(self, pcm: np.ndarray, timestamp: float) -> bool:
        if pcm.shape[0] == 0:
            return True
        self._uplink.record(pcm.shape[0], timestamp)
        data = np.ascontiguousarray(pcm, "<i2").tobytes()
        return await self._send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode("ascii")})

    # ---- from the server ------------------------------------------------------------------------------------
    async def _read(self) -> None:
        import aiohttp

        ws = self._ws
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
                self._on_event(event)
            except Exception as exc:  # noqa: BLE001 - one bad event must not end the conversation
                log.exception("%s: server event failed", self.name)
                self._error("server", f"bad server event: {type(exc).__name__}: {exc}")
        if not self._closed:
            detail = f"code {ws.close_code}" if ws.close_code is not None else "connection lost"
            if ws.exception() is not None:
                detail += f": {ws.exception()}"
            self._lost(f"the model server {self.model.url} went away ({detail})")

    def _lost(self, message: str) -> None:
        self._error("server", message)
        self.output.clear_buffer()  # stop talking: nothing more of this reply will come
        for r in list(self._replies.values()):
            r.cut = True
            r.metrics.errors.append(f"server: {message}")
            r.finished = r.finished or PlaybackFinished(0.0, True, self.clock.now())
            r.status, r.awaiting_item = r.status or "failed", False
            r.frames.put_nowait(None)
            self._complete(r)

    def _on_event(self, e: dict) -> None:
        kind = e.get("type")
        now = self.clock.now()
        if kind == "input_audio_buffer.speech_started":
            self._on_speech_started(e, now)
        elif kind == "input_audio_buffer.speech_stopped":
            turn, _ = self._listening or (self._turn_count - 1, None)
            self._listening = None
            item_id = e.get("item_id")
            m = self._speech.setdefault(item_id, RemoteTurnMetrics(turn))
            m.last_voiced, m.final_eot = self._uplink.at(e.get("audio_end_ms")), now
            self._awaiting_response = now
            self.events.emit(UserSpeechEnded(turn, now, m.last_voiced if m.last_voiced is not None else now, item_id))
        elif kind == "input_audio_buffer.committed":
            self._last_user_item = e.get("item_id")
        elif kind in ("conversation.item.input_audio_transcription.delta",
                      "conversation.item.input_audio_transcription.completed"):
            self._on_transcript(e, kind.endswith("completed"), now)
        elif kind == "response.created":
            self._on_response_created(e.get("response") or {})
        elif kind == "response.output_item.added":
            r = self._replies.get(e.get("response_id"))
            if r is not None and isinstance((e.get("item") or {}).get("id"), str):
                r.item_id = e["item"]["id"]
                self._by_item[r.item_id] = r
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            r = self._replies.get(e.get("response_id"))
            if r is not None and not r.cut and isinstance(e.get("delta"), str) and e["delta"]:
                if r.metrics.first_text_answer_token is None:
                    r.metrics.first_text_answer_token = now
                r.text += e["delta"]
                self.events.emit(AgentText(r.turn, e["delta"], r.text, final=False, response_id=r.response_id))
        elif kind == "response.output_audio.delta":
            r = self._replies.get(e.get("response_id"))
            if r is not None and not r.cut and isinstance(e.get("delta"), str):
                self._on_audio(r, base64.b64decode(e["delta"]))
        elif kind == "response.done":
            self._on_response_done(e.get("response") or {})
        elif kind == "conversation.item.retrieved":
            r = self._by_item.get((e.get("item") or {}).get("id"))
            if r is not None and r.awaiting_item:
                content = ((e.get("item") or {}).get("content") or [{}])[0]
                r.heard_text = content.get("transcript", content.get("text"))
                r.awaiting_item = False
                self._complete(r)
        elif kind == "error":
            self._on_server_error(e.get("error") or {})

    def _on_speech_started(self, e: dict, now: float) -> None:
        item_id = e.get("item_id")
        turn = self._turn_count
        self._turn_count += 1
        self._listening = (turn, item_id)
        onset = self._uplink.at(e.get("audio_start_ms"))
        self._speech[item_id] = RemoteTurnMetrics(turn, onset=onset)
        self.events.emit(UserSpeechStarted(turn, onset if onset is not None else now, item_id))
        r = self._playing
        if r is not None and r.audio_started and not r.cut and r.finished is None:
            self._barge_in(r, now)

    def _barge_in(self, r: _Reply, now: float) -> None:
        """Silence first, then tell the server what was heard (LiveKit Agents' truncate on interruption)."""
        r.cut = True
        r.metrics.interrupted_at = now
        r.finished = self.output.clear_buffer() or PlaybackFinished(0.0, True, now)
        r.frames.put_nowait(None)
        r.awaiting_item = True
        end_ms = int(round(r.finished.position * 1000))
        loop = asyncio.get_running_loop()
        loop.create_task(self._truncate(r, end_ms))
        log.info("%s: barge-in: reply of turn %d cut at %d ms", self.name, r.turn, end_ms)
        self._set_state(AgentState.LISTENING)

    async def _truncate(self, r: _Reply, end_ms: int) -> None:
        ok = await self._send({"type": "conversation.item.truncate", "item_id": r.item_id, "content_index": 0,
                               "audio_end_ms": end_ms})
        ok = ok and await self._send({"type": "conversation.item.retrieve", "item_id": r.item_id})
        if not ok:
            r.awaiting_item = False
            self._complete(r)

    def _on_transcript(self, e: dict, final: bool, now: float) -> None:
        item_id = e.get("item_id")
        m = self._speech.get(item_id)
        turn = m.turn if m is not None else max(0, self._turn_count - 1)
        if m is not None and m.first_transcript_token is None:
            m.first_transcript_token = now
        if final:
            text = e.get("transcript") if isinstance(e.get("transcript"), str) else ""
            self._transcripts[item_id] = text
            self.events.emit(UserTranscript(turn, text, final=True, item_id=item_id))
        elif isinstance(e.get("delta"), str) and e["delta"]:
            text = self._interim.get(item_id, "") + e["delta"]
            self._interim[item_id] = text
            self.events.emit(UserTranscript(turn, text, final=False, item_id=item_id, delta=e["delta"]))

    def _on_response_created(self, response: dict) -> None:
        rid = response.get("id")
        if not isinstance(rid, str):
            return
        user_item = self._last_user_item
        spoken = self._speech.get(user_item)
        turn = spoken.turn if spoken is not None else max(0, self._turn_count - 1)
        metrics = replace(spoken or RemoteTurnMetrics(turn), errors=[])
        r = self._replies[rid] = _Reply(rid, "", turn, user_item, metrics)
        self._awaiting_response = None
        self._queue.put_nowait(r)
        self._set_state(AgentState.THINKING)

    def _on_audio(self, r: _Reply, data: bytes) -> None:
        pcm = np.frombuffer(data[: len(data) // 2 * 2], "<i2")
        if pcm.shape[0] == 0:
            return
        frames = r.resampler.push(AudioFrame(pcm.astype(np.int16), PROTOCOL_PCM_RATE, 1, self.clock.now()))
        self._frames_out(r, [f.to_float32_mono().samples for f in frames])

    def _frames_out(self, r: _Reply, pieces: list[np.ndarray], last: bool = False) -> None:
        audio = np.concatenate([r.pending, *pieces]) if pieces else r.pending
        whole = audio.shape[0] // FRAME_SAMPLES * FRAME_SAMPLES
        if last and audio.shape[0] > whole:  # the tail, padded to a whole frame
            audio = np.concatenate([audio, np.zeros(FRAME_SAMPLES - (audio.shape[0] - whole), np.float32)])
            whole = audio.shape[0]
        for i in range(0, whole, FRAME_SAMPLES):
            r.frames.put_nowait(AudioFrame(audio[i:i + FRAME_SAMPLES], SESSION_RATE, 1, self.clock.now()))
            r.received_s += FRAME_SAMPLES / SESSION_RATE
        r.pending = audio[whole:]

    def _on_response_done(self, response: dict) -> None:
        r = self._replies.get(response.get("id"))
        if r is None:
            return
        r.status = response.get("status") or "completed"
        details = response.get("status_details") or {}
        if r.status == "failed":
            r.error = str(((details.get("error") or {}).get("message")) or "the response failed")
            r.metrics.errors.append(f"server: {r.error}")
            self._error("server", r.error, r.turn)
        elif r.status == "cancelled" and not r.audio_started:
            r.metrics.errors.append(f"dropped: {details.get('reason') or 'cancelled'} before it played")
        usage = response.get("usage") or {}
        r.metrics.prompt_tokens = int(usage.get("input_tokens") or 0)
        r.metrics.new_tokens = int(usage.get("output_tokens") or 0)
        r.metrics.output_units = int((usage.get("output_token_details") or {}).get("audio_tokens") or 0)
        if not r.cut:
            frames = r.resampler.flush()
            self._frames_out(r, [f.to_float32_mono().samples for f in frames], last=True)
        r.frames.put_nowait(None)
        self._complete(r)

    def _on_server_error(self, err: dict) -> None:
        code = err.get("code")
        if code in QUIET_ERRORS:
            log.debug("%s: server: %s", self.name, err.get("message"))
            return
        if code == "item_truncate_invalid_item_id" or code == "item_retrieve_invalid_item_id":
            for r in list(self._replies.values()):  # the item is gone: complete with the text we have
                if r.awaiting_item:
                    r.awaiting_item = False
                    self._complete(r)
        self._error("server", f"{code}: {err.get('message')}")

    # ---- playout ----------------------------------------------------------------------------------------------
    async def _play(self) -> None:
        """Replies in order: their frames to the output, then the playout (one segment per reply)."""
        while (r := await self._queue.get()) is not None:
            handed = False
            while (frame := await r.frames.get()) is not None and not r.cut:
                if not handed:
                    handed, r.audio_started = True, True
                    self._playing = r
                    r.metrics.first_frame_handed = self.clock.now()
                    self._set_state(AgentState.SPEAKING)
                try:
                    await self.output.capture_frame(frame)
                except Exception as exc:  # noqa: BLE001 - a broken output ends this reply, not the session
                    self._error("output", f"{type(exc).__name__}: {exc}", r.turn)
                    r.metrics.errors.append(f"output: {type(exc).__name__}: {exc}")
                    r.cut = True
                    r.finished = PlaybackFinished(0.0, True, self.clock.now())
                    self._complete(r)
                if r.cut:
                    break
            if r.cut:
                continue  # the barge-in (or the end) completes it
            if handed:
                self.output.flush()
                finished = await self.output.wait_for_playout()
                if r.cut:
                    continue
            else:
                finished = PlaybackFinished(0.0, r.status == "cancelled", self.clock.now())
            r.finished = finished
            self._complete(r)

    def _on_playback(self, event: PlaybackStarted | PlaybackFinished) -> None:
        r = self._playing
        if isinstance(event, PlaybackStarted) and r is not None and r.metrics.first_frame_played is None:
            r.metrics.first_frame_played = event.at
            self.events.emit(ReplyAudioStarted(r.turn, event.at))

    def _complete(self, r: _Reply) -> None:
        """Once the server is done with the reply and the output with its audio (and a truncated item was read
        back): the final events and the turn's metrics, as the in-process session gives them."""
        if r.completed or r.status is None or r.finished is None or r.awaiting_item:
            return
        r.completed = True
        finished, m = r.finished, r.metrics
        m.interrupted = finished.interrupted or r.cut or r.status == "cancelled"
        m.heard_s, m.underruns, m.playback_end = finished.position, finished.underruns, finished.at
        m.reply_s = r.received_s
        user = r.user_item_id
        m.transcript = self._transcripts.pop(user, "")
        spoken = self._speech.pop(user, None)
        if spoken is not None and m.first_transcript_token is None:
            m.first_transcript_token = spoken.first_transcript_token  # it came after response.created
        self._interim.pop(user, None)
        m.text_answer = r.heard_text if r.heard_text is not None else r.text
        self.events.emit(AgentText(r.turn, "", m.text_answer, final=True, response_id=r.response_id))
        if r.audio_started:
            self.events.emit(ReplyAudioFinished(r.turn, finished.at, finished.position, finished.interrupted))
        self._replies.pop(r.response_id, None)
        self._by_item.pop(r.item_id, None)
        if self._playing is r:
            self._playing = None
        if not self._replies and not self._closed:
            self._set_state(AgentState.LISTENING)
        self.turns.append(m)
        self.events.emit(TurnCompleted(m))

    # ---- events ---------------------------------------------------------------------------------------------
    def _set_state(self, new: AgentState) -> None:
        if new != self.state:
            old, self.state = self.state, new
            self.events.emit(StateChanged(old, new, self.clock.now()))

    def _error(self, stage: str, message: str, turn: int | None = None) -> None:
        self.error_count += 1
        log.warning("%s: %s: %s", self.name, stage, message)
        self.events.emit(SessionError(stage, message, turn))
