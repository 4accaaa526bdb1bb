"""`RoomAgent`: the agent in one LiveKit room, serving one participant at a time, each with its own Session.

Lifecycle of a room connection (docs/livekit.md, How the agent serves a room):
- `connect()` joins with a bounded timeout (the SDK retries a broken setup for about a minute on its own) and
  raises `JoinError` with a one-line reason; then the agent publishes its voice (a 48 kHz microphone track) and
  sets `lk.agent.state` = initializing until the model is ready.
- The served participant is the one named by `participant`, else the first remote participant who is not an
  agent. Its microphone feeds a `RoomAudioInput`; a Session is made over it and the room's `RoomAudioOutput`.
- The participant leaves: the session is closed at once (the reply stops, nothing more is said to an empty room),
  and the next participant present (or the next to join) gets a new Session: a new conversation.
- Its track is muted, unpublished or republished: the input fills silence, then follows the new track; the session
  and its history go on.
- The SDK reconnects by itself (resume or full reconnect, `reconnecting` / `reconnected`): the session goes on.
  If the room is lost for good (`disconnected` without our asking, e.g. the server restarted), the session ends
  and the agent joins again with backoff until `reconnect_timeout_s`; then `run()` returns an error line.
- `stop()` (SIGINT/SIGTERM): with `drain`, the turn in progress finishes first (the reply plays out), then the
  session closes and the agent leaves the room.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.clock import SessionClock
from agent.events import AgentState, SessionError, TurnCompleted
from agent.livekit.audio import RoomAudioInput, RoomAudioOutput
from agent.livekit.conventions import ATTR_AGENT_STATE, ATTR_SERVED
from agent.livekit.publisher import RoomPublisher

log = logging.getLogger(__name__)


class JoinError(RuntimeError):
    """The room could not be joined; str() is one line saying why."""


@dataclass
class RoomAgentConfig:
    url: str
    room: str
    token: str | Callable[[], str]  # a token, or a function minting a fresh one for each join
    participant: str | None = None  # identity to serve; None: the first remote non-agent participant
    queue_ms: int = 100
    connect_timeout_s: float = 10.0
    reconnect_timeout_s: float = 60.0
    leave_when_alone_s: float | None = None  # leave (and end run()) after this long without anyone to serve
    drain_timeout_s: float = 30.0
    seed: int = 0  # turn k of a session samples with seed + k
    session_config: object | None = None  # agent.session.SessionConfig (default: SessionConfig(seed=seed))
    extra_attributes: dict[str, str] = field(default_factory=dict)


_JWT = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def redact(text: str) -> str:
    """Access tokens (JWTs) in a message replaced by <token>."""
    return _JWT.sub("<token>", text)


def _describe_connect_error(exc: BaseException, url: str, room: str) -> str:
    text = " ".join(redact(str(exc)).split()) or type(exc).__name__
    if len(text) > 300:
        text = text[:300] + "..."
    low = text.lower()
    where = f"cannot join room {room!r} at {url}"
    if "401" in low or "unauthorized" in low or "invalid token" in low or "token" in low and "valid" in low:
        return f"{where}: the server refused the token ({text}); check LIVEKIT_API_KEY / LIVEKIT_API_SECRET or --token"
    if "refused" in low or "connect call failed" in low or "unreachable" in low or "no route" in low:
        return f"{where}: the server is unreachable ({text})"
    return f"{where}: {text}"


class RoomAgent:
    def __init__(self, model_ready: Callable[[], Awaitable] | None, config: RoomAgentConfig, on_turn=None,
                 name: str | None = None):
        """`model_ready()`: an awaitable giving the loaded SpeechGPTModel (the process loads it once, maybe while the
        agent already sits in the room as `initializing`). `on_turn(agent, session_index, participant, metrics,
        output_report)` is called for each finished turn."""
        self.config = config
        self.name = name or config.room
        self._model_ready = model_ready
        self.model = None
        self.on_turn = on_turn
        self.on_sessions = None  # optional callback(room, number of sessions running): the Prometheus gauge
        self.room = None
        self.output: RoomAudioOutput | None = None
        self.publisher: RoomPublisher | None = None
        self.clock = SessionClock()
        self.session = None
        self.session_task: asyncio.Task | None = None
        self.served: str | None = None
        self.sessions_started = 0
        self.joins = 0
        self.error: str | None = None
        self._input: RoomAudioInput | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._drain = False
        self._lost = asyncio.Event()
        self._alone_since: float | None = time.monotonic()
        self._done = asyncio.Event()

    # ---- joining ---------------------------------------------------------------------------------------------
    def _token(self) -> str:
        token = self.config.token
        return token() if callable(token) else token

    async def connect(self) -> None:
        """Join the room and publish the agent's track; JoinError (one line) on failure."""
        from livekit import rtc

        cfg = self.config
        room = rtc.Room()
        self._bind(room)
        options = rtc.RoomOptions(auto_subscribe=True, connect_timeout=min(5.0, cfg.connect_timeout_s))
        try:
            await asyncio.wait_for(room.connect(cfg.url, self._token(), options), cfg.connect_timeout_s)
        except asyncio.TimeoutError:
            await _disconnect_quietly(room)
            raise JoinError(f"cannot join room {cfg.room!r} at {cfg.url}: no answer within "
                            f"{cfg.connect_timeout_s:.0f} s (is the server up and reachable?)") from None
        except Exception as exc:  # noqa: BLE001 - rtc.ConnectError and transport errors: one line
            await _disconnect_quietly(room)
            raise JoinError(_describe_connect_error(exc, cfg.url, cfg.room)) from None
        self.room = room
        self.joins += 1
        self._lost.clear()
        if self.output is not None:  # a new room connection gets a new source and track
            await self.output.aclose()
        self.output = RoomAudioOutput(self.clock, queue_ms=cfg.queue_ms)
        try:
            options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            await asyncio.wait_for(room.local_participant.publish_track(self.output.track, options),
                                   cfg.connect_timeout_s)
        except Exception as exc:  # noqa: BLE001
            await _disconnect_quietly(room)
            self.room = None
            raise JoinError(f"joined room {cfg.room!r} but could not publish the agent's audio track: {exc}") from None
        if self.publisher is not None:
            await self.publisher.aclose()
        self.publisher = RoomPublisher(room, cfg.room, self._agent_track_sid)
        self.publisher.start()
        state = AgentState.LISTENING if self.model is not None else AgentState.INITIALIZING
        self.publisher.set_attributes({ATTR_AGENT_STATE: state.value, ATTR_SERVED: "", **cfg.extra_attributes})
        log.info("%s: joined room %r as %r", self.name, cfg.room, room.local_participant.identity)

    def _agent_track_sid(self) -> str:
        room = self.room
        if room is None or self.output is None:
            return ""
        # after a full reconnect the SDK republishes the track under a new sid: ask the publication each time
        for pub in room.local_participant.track_publications.values():
            if pub.name == self.output.track.name:
                return pub.sid
        return self.output.track.sid

    def _bind(self, room) -> None:
        room.on("participant_connected", lambda p: self._wake.set())
        room.on("participant_disconnected", self._on_participant_left)
        room.on("track_subscribed", self._on_track_subscribed)
        room.on("track_unsubscribed", self._on_track_unsubscribed)
        room.on("track_muted", lambda pub, p: self._on_mute(p, pub, True))
        room.on("track_unmuted", lambda pub, p: self._on_mute(p, pub, False))
        room.on("disconnected", lambda reason: self._on_disconnected(room, reason))
        room.on("reconnecting", lambda: log.info("%s: connection lost, the SDK is reconnecting", self.name))
        room.on("reconnected", self._on_reconnected)

    # ---- room events ------------------------------------------------------------------------------------------
    def _on_participant_left(self, participant) -> None:
        if participant.identity == self.served:
            log.info("%s: %s left", self.name, participant.identity)
            asyncio.get_running_loop().create_task(self._end_session("participant left"))
        self._wake.set()

    def _on_track_subscribed(self, track, publication, participant) -> None:
        from livekit import rtc

        if participant.identity == self.served and track.kind == rtc.TrackKind.KIND_AUDIO and self._input is not None:
            if publication.source in (rtc.TrackSource.SOURCE_MICROPHONE, rtc.TrackSource.SOURCE_UNKNOWN):
                self._input.attach(track)
                if self.publisher is not None:
                    self.publisher.user_track_sid = track.sid
        self._wake.set()

    def _on_track_unsubscribed(self, track, publication, participant) -> None:
        if participant.identity == self.served and self._input is not None and self._input.track_sid == track.sid:
            self._input.detach()  # silence until it comes back

    def _on_mute(self, participant, publication, muted: bool) -> None:
        if participant.identity == self.served:
            log.info("%s: %s %s their microphone", self.name, participant.identity, "muted" if muted else "unmuted")

    def _on_reconnected(self) -> None:
        log.info("%s: reconnected", self.name)
        if self.publisher is not None:
            # the SDK rejoins with the attributes it last knew; a change that failed while we were away is not
            # among them, so send the latest of everything
            self.publisher.republish()

    def _on_disconnected(self, room, reason) -> None:
        if room is not self.room or self._stopping:
            return
        from livekit import rtc

        name = rtc.DisconnectReason.Name(reason) if isinstance(reason, int) else str(reason)
        log.warning("%s: disconnected from the room (%s)", self.name, name)
        self._lost.set()
        self._wake.set()

    # ---- serving ----------------------------------------------------------------------------------------------
    def _candidates(self) -> list:
        from livekit import rtc

        room = self.room
        if room is None:
            return []
        out = []
        for p in room.remote_participants.values():
            if self.config.participant is not None:
                if p.identity == self.config.participant:
                    out.append(p)
            elif p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                out.append(p)
        return out

    async def _start_session(self, participant) -> None:
        from livekit import rtc

        from agent.session import SessionConfig

        self.sessions_started += 1
        index = self.sessions_started
        self.served = participant.identity
        self._input = RoomAudioInput()
        self._input.start()
        self.output.reset_listeners()
        self.publisher.user_identity = participant.identity
        self.publisher.user_track_sid = ""
        for pub in participant.track_publications.values():
            if pub.track is not None and pub.kind == rtc.TrackKind.KIND_AUDIO and pub.subscribed:
                self._input.attach(pub.track)
                self.publisher.user_track_sid = pub.track.sid
                break
        config = self.config.session_config or SessionConfig(seed=self.config.seed)
        session = self.model.session(self._input, self.output, config=config, clock=self.clock,
                                     name=f"{self.config.room}/{index}",
                                     attributes={"room": self.config.room, "participant": participant.identity})
        session.events.keep_history = False  # a long-lived room would grow it without bound
        session.events.on(self.publisher.listener(index))
        session.events.on(lambda e: self._on_session_event(index, participant.identity, e))
        self.session = session
        self.publisher.set_attributes({ATTR_SERVED: participant.identity})
        self.session_task = asyncio.get_running_loop().create_task(session.run())
        if self.on_sessions is not None:
            self.on_sessions(self.config.room, 1)
        log.info("%s: serving %s (session %d)", self.name, participant.identity, index)

    def _on_session_event(self, index: int, identity: str, event) -> None:
        if isinstance(event, TurnCompleted) and self.on_turn is not None:
            report = self.output.reports[-1] if self.output and self.output.reports else None
            try:
                self.on_turn(self, index, identity, event.metrics, report)
            except Exception:  # noqa: BLE001 - metrics must not break the session
                log.exception("%s: per-turn metrics callback failed", self.name)
        elif isinstance(event, SessionError):
            log.warning("%s: session %d: %s failed: %s", self.name, index, event.stage, event.message)

    async def _end_session(self, why: str) -> None:
        session, task, inp = self.session, self.session_task, self._input
        self.session = self.session_task = self._input = None
        self.served = None
        if session is None:
            return
        if self.on_sessions is not None:
            self.on_sessions(self.config.room, 0)
        if self.output is not None:
            self.output.clear_buffer()  # stop talking now
        if inp is not None:
            await inp.aclose()
        await session.aclose()
        if task is not None:
            try:
                await asyncio.wait_for(task, 10.0)
            except Exception as exc:  # noqa: BLE001
                log.warning("%s: session ended with %s: %s", self.name, type(exc).__name__, exc)
        if self.publisher is not None and self.room is not None and not self._lost.is_set():
            self.publisher.set_attributes({ATTR_AGENT_STATE: AgentState.LISTENING.value, ATTR_SERVED: ""})
        log.info("%s: session ended (%s)", self.name, why)

    async def _wait_idle(self, timeout_s: float) -> None:
        """Until the session has no reply in progress (drain: the current turn finishes)."""
        deadline = time.monotonic() + timeout_s
        while self.session is not None and time.monotonic() < deadline:
            s = self.session
            if s.state == AgentState.LISTENING and s.idle:  # in-process or remote (agent/realtime/remote.py)
                return
            await asyncio.sleep(0.05)

    async def run(self) -> str | None:
        """Serve until stop() (returns None) or the room is lost for good / left for being alone (returns a
        line saying why, or None when leaving alone is the normal end)."""
        try:
            if self.model is None and self._model_ready is not None:
                self.model = await self._model_ready()
            if self.publisher is not None and not self._stopping:
                self.publisher.set_attributes({ATTR_AGENT_STATE: AgentState.LISTENING.value})
            while not self._stopping:
                if self._lost.is_set():
                    await self._end_session("room connection lost")
                    problem = await self._rejoin()
                    if problem is not None:
                        self.error = problem
                        return problem
                    continue
                if self.session is None:
                    candidates = self._candidates()
                    if candidates:
                        self._alone_since = None
                        await self._start_session(candidates[0])
                    else:
                        self._alone_since = self._alone_since or time.monotonic()
                        limit = self.config.leave_when_alone_s
                        if limit is not None and time.monotonic() - self._alone_since >= limit:
                            log.info("%s: nobody to serve for %.0f s: leaving", self.name, limit)
                            return None
                elif self.session_task is not None and self.session_task.done():
                    await self._end_session("session ended")
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                except asyncio.TimeoutError:
                    pass
            return None
        finally:
            await self._shutdown()
            self._done.set()

    async def _rejoin(self) -> str | None:
        old, self.room = self.room, None
        if old is not None:
            await _disconnect_quietly(old)
        deadline = time.monotonic() + self.config.reconnect_timeout_s
        delay = 0.5
        last = "no attempt made"
        while not self._stopping:
            try:
                await self.connect()
                if self.publisher is not None and self.model is not None:
                    self.publisher.set_attributes({ATTR_AGENT_STATE: AgentState.LISTENING.value})
                log.info("%s: rejoined after losing the room", self.name)
                return None
            except JoinError as exc:
                last = str(exc)
            if time.monotonic() + delay > deadline:
                return (f"lost room {self.config.room!r} and could not rejoin within "
                        f"{self.config.reconnect_timeout_s:.0f} s: {last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return None

    async def stop(self, drain: bool = False) -> None:
        """End run(): with `drain`, the turn in progress finishes first."""
        if drain and self.session is not None:
            await self._wait_idle(self.config.drain_timeout_s)
        self._stopping = True
        self._wake.set()

    async def wait_done(self) -> None:
        await self._done.wait()

    async def _shutdown(self) -> None:
        self._stopping = True
        await self._end_session("agent stopping")
        if self.publisher is not None:
            await self.publisher.aclose()
            self.publisher = None
        room, self.room = self.room, None
        if room is not None:
            await _disconnect_quietly(room)
        if self.output is not None:
            await self.output.aclose()
            self.output = None


async def _disconnect_quietly(room, timeout_s: float = 5.0) -> None:
    try:
        await asyncio.wait_for(room.disconnect(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - leaving a room that is already gone
        log.debug("disconnect: %s", exc)
