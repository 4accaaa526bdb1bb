"""Session events -> what LiveKit frontends read (docs/livekit.md, Frontend conventions).

- `StateChanged` -> the agent participant's `lk.agent.state` attribute.
- `UserTranscript` (interim, then final) and `AgentText` (deltas, then final) -> text streams on `lk.transcription`.
  Per turn and side one segment id. The interim text of a segment goes out as one stream written delta by delta
  (`lk.transcription_final` = "false"); the end of the segment is a second, complete stream with the same segment
  id and `lk.transcription_final` = "true" holding the final text. Frontends keep one entry per segment id and show
  the latest stream's text, so the final stream replaces the interim one: for the agent that is the text as heard
  (the session cuts it at a barge-in), which the delta stream alone could not express.
- The user's segments name the user's microphone track in `lk.transcribed_track_id` and are sent on the user's
  behalf (the stream's sender identity is the user, as LiveKit Agents does); the agent's name the agent's track.

Session callbacks are synchronous and run on the session's path: they only enqueue. One task per room connection
does the network calls in order, each under a timeout, and a failure is logged and skipped (a caption must never
stall or kill a conversation).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.events import AgentText, StateChanged, UserTranscript
from agent.livekit.conventions import (
    ATTR_AGENT_STATE,
    TOPIC_TRANSCRIPTION,
    segment_id,
    transcription_attributes,
)

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
ATTR_RETRIES = 10


@dataclass
class _Op:
    kind: str  # "attrs", "text"
    attrs: dict[str, str] | None = None
    side: str = ""  # "user" or "agent"
    turn: int = 0
    text: str = ""  # user: the whole text so far; agent: the delta (interim) or whole text (final)
    final: bool = False
    session: int = 0


class _Stream:
    def __init__(self, writer, segment: str):
        self.writer = writer
        self.segment = segment
        self.sent = ""


class RoomPublisher:
    """Publishes one room connection's agent state and captions (see the module doc)."""

    def __init__(self, room, room_name: str, agent_track_sid: Callable[[], str]):
        self.room = room
        self.room_name = room_name
        self._agent_track_sid = agent_track_sid
        self._queue: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._open: dict[tuple[int, str, int], _Stream] = {}
        self.user_identity = ""
        self.user_track_sid = ""
        self.attributes: dict[str, str] = {}  # everything set so far (the latest value of each)
        self.sent_segments: list[tuple[str, str, bool]] = []  # (segment id, text, final): what went out
        self.failures = 0
        self._attr_retries = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def set_attributes(self, attrs: dict[str, str]) -> None:
        self.attributes.update(attrs)
        self._queue.put_nowait(_Op("attrs", attrs=dict(attrs)))

    def republish(self) -> None:
        """All attributes again: after a full reconnect the server knows nothing of what we had set."""
        if self._task is not None:
            self._queue.put_nowait(_Op("attrs", attrs=dict(self.attributes)))

    def listener(self, session_index: int) -> Callable[[object], None]:
        """A Session event callback for the session numbered `session_index` on this connection."""

        def on_event(event) -> None:
            if isinstance(event, StateChanged):
                self.set_attributes({ATTR_AGENT_STATE: event.new.value})
            elif isinstance(event, UserTranscript):
                self._queue.put_nowait(_Op("text", side="user", turn=event.turn, text=event.text, final=event.final,
                                           session=session_index))
            elif isinstance(event, AgentText):
                self._queue.put_nowait(_Op("text", side="agent", turn=event.turn,
                                           text=event.text if event.final else event.delta, final=event.final,
                                           session=session_index))

        return on_event

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until everything queued so far went out (or timeout_s)."""
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op("barrier", attrs={"future": done}))  # type: ignore[dict-item]
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s: captions/state still queued after %.1f s", self.room_name, timeout_s)

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._task, CALL_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self._task = None

    # ---- the publishing task --------------------------------------------------------------------------------
    async def _run(self) -> None:
        while (op := await self._queue.get()) is not None:
            if op.kind == "barrier":
                fut = op.attrs["future"]  # type: ignore[index]
                if not fut.done():
                    fut.set_result(None)
                continue
            if op.kind == "text" and not op.final and op.side == "agent":
                op = self._coalesce(op)
            try:
                await asyncio.wait_for(self._apply(op), CALL_TIMEOUT_S)
                if op.kind == "attrs":
                    self._attr_retries = 0
            except Exception as exc:  # noqa: BLE001 - see the module doc
                self.failures += 1
                log.warning("%s: publishing %s failed: %s: %s", self.room_name, op.kind, type(exc).__name__,
                            exc or "no answer")
                if op.kind == "attrs" and self._attr_retries < ATTR_RETRIES:
                    # attributes are state, not history: send the latest of all of them again shortly
                    self._attr_retries += 1
                    asyncio.get_running_loop().call_later(1.0, self.republish)
        for stream in list(self._open.values()):
            await self._close(stream)
        self._open.clear()

    def _coalesce(self, op: _Op) -> _Op:
        """Merge agent deltas already waiting behind this one (the queue backs up when the network is slow)."""
        while not self._queue.empty():
            nxt = self._queue._queue[0]  # noqa: SLF001 - peek: asyncio.Queue has no public peek
            if (nxt is None or nxt.kind != "text" or nxt.side != "agent" or nxt.final or nxt.turn != op.turn
                    or nxt.session != op.session):
                break
            self._queue.get_nowait()
            op.text += nxt.text
        return op

    async def _apply(self, op: _Op) -> None:
        lp = self.room.local_participant
        if op.kind == "attrs":
            await lp.set_attributes(op.attrs)
            return
        key = (op.session, op.side, op.turn)
        segment = segment_id(op.side, self.room_name, op.session, op.turn)
        user = op.side == "user"
        track = self.user_track_sid if user else self._agent_track_sid()
        sender = self.user_identity if user and self.user_identity else None
        if not op.final:
            stream = self._open.get(key)
            if stream is None:
                writer = await lp.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=sender,
                                              attributes=transcription_attributes(segment, track, False))
                stream = self._open[key] = _Stream(writer, segment)
            if user and not op.text.startswith(stream.sent):
                # an interim transcript that does not extend the previous one: a new interim stream
                await self._close(stream)
                writer = await lp.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=sender,
                                              attributes=transcription_attributes(segment, track, False))
                stream = self._open[key] = _Stream(writer, segment)
            # user events carry the whole text so far, agent events the delta
            delta = op.text[len(stream.sent):] if user else op.text
            if delta:
                await stream.writer.write(delta)
                stream.sent += delta
            return
        stream = self._open.pop(key, None)
        if stream is not None:
            await self._close(stream)
        writer = await lp.stream_text(topic=TOPIC_TRANSCRIPTION, sender_identity=sender,
                                      attributes=transcription_attributes(segment, track, True))
        if op.text:
            await writer.write(op.text)
        await writer.aclose()
        self.sent_segments.append((segment, op.text, True))

    async def _close(self, stream: _Stream) -> None:
        try:
            await asyncio.wait_for(stream.writer.aclose(), CALL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001
            log.debug("closing a caption stream: %s", exc)
        self.sent_segments.append((stream.segment, stream.sent, False))
