"""One phone call: one WebSocket from the provider, one Session, everything the call holds freed at its end.

    provider messages -> rate and size limits -> serializer.parse -> call events
        start  -> CallInput / CallOutput / Session (customParameters -> attributes and SessionConfig)
        media  -> reorder window (the provider's chunk counter) -> CallInput -> the session
        mark   -> CallOutput (what the caller has heard)
        dtmf   -> DtmfReceived on session.events
        stop / socket closed -> the session is closed, the call's summary recorded

Robustness: every message that cannot be used is logged (the first few of each kind per call, then every
power of ten) and counted per call and per server; it never ends the call unless the call cannot go on (a codec
we do not speak, a flood over the rate limit, no start in time, a message over the size limit, a session that
died), and then the socket is closed with a code and a reason. Nothing a call does can end another call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from agent.clock import SessionClock
from agent.telephony.base import (
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    Cleared,
    Connected,
    Dtmf,
    MarkEchoed,
    Media,
    ProtocolError,
    ProviderError,
    Serializer,
    Started,
    Stopped,
    parse_json,
)
from agent.telephony.events import CallEnded, CallProblem, CallStarted, DtmfReceived
from agent.telephony.output import CallInput, CallOutput
from streaming.frames import AudioFrame

if TYPE_CHECKING:
    from agent.telephony.server import TelephonyServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallLimits:
    max_message_bytes: int = 64 * 1024  # a 20 ms media message is ~300 bytes; a start with parameters a few KB
    messages_per_s: float = 250.0  # sustained (50 media + 50 mark echoes a second is the normal load)
    burst_messages: int = 500
    rate_close_after: int = 250  # messages dropped over the rate before the call is closed (1008)
    start_timeout_s: float = 10.0  # from the upgrade to the start message
    max_messages_before_start: int = 20
    reorder_window: int = 3  # out-of-order media frames held while waiting for a missing one (60 ms)
    max_queued_frames: int = 250  # inbound audio queued for the session (5 s) before the oldest is dropped


class TokenBucket:
    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.t = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class MediaOrder:
    """Puts media frames back in the provider's chunk order. In-order frames pass at once; a frame ahead of a
    missing one waits, for at most `window` frames, then the gap is given up (counted as lost). A frame whose
    place was passed is dropped: a duplicate when it was already delivered, else late."""

    FAR_AHEAD = 500  # a jump this large is a restart of the counter, not reordering

    def __init__(self, window: int):
        self.window = window
        self.expected: int | None = None
        self.pending: dict[int, Any] = {}
        self.recent: deque[int] = deque(maxlen=256)
        self.counts: Counter = Counter()

    def push(self, chunk: int | None, item: Any) -> list[Any]:
        if chunk is None:
            return [item]
        if self.expected is None:  # the stream's first frames may be swapped too: where it starts is the
            if chunk in self.pending:  # lowest of the first few (a 40 ms wait, once per call)
                self.counts["duplicate_media"] += 1
                return []
            self.pending[chunk] = item
            if len(self.pending) < self.window:
                return []
            self.expected = min(self.pending)
            return self._drain()
        if chunk < self.expected or chunk in self.pending:
            self.counts["duplicate_media" if chunk in self.recent or chunk in self.pending else "late_media"] += 1
            return []
        if chunk - self.expected > self.FAR_AHEAD:
            out = [self.pending[k] for k in sorted(self.pending)]
            self.pending.clear()
            self.expected = chunk
            return out + self._deliver(chunk, item)
        self.pending[chunk] = item
        out = self._drain()
        if len(self.pending) > self.window:  # give up on the gap
            first = min(self.pending)
            self.counts["lost_media"] += first - self.expected
            self.expected = first
            out += self._drain()
        return out

    def _deliver(self, chunk: int, item: Any) -> list[Any]:
        self.pending[chunk] = item
        return self._drain()

    def _drain(self) -> list[Any]:
        out = []
        while self.expected in self.pending:
            out.append(self.pending.pop(self.expected))
            self.recent.append(self.expected)
            self.expected += 1
        return out


@dataclass
class CallSummary:
    name: str
    provider: str | None
    call_id: str
    reason: str
    duration_s: float
    turns: int
    problems: dict[str, int]
    output: dict[str, int] = field(default_factory=dict)
    prebuffer_needed: list[float] = field(default_factory=list)  # per reply (agent/telephony/output.py)

    def to_dict(self) -> dict:
        return dict(vars(self))


class Call:
    def __init__(self, server: "TelephonyServer", ws: web.WebSocketResponse, provider: str | None, name: str):
        self.server = server
        self.ws = ws
        self.name = name
        self.limits: CallLimits = server.config.limits
        self.serializer: Serializer | None = server.serializer(provider) if provider else None
        self.problems: Counter = Counter()
        self.session = None
        self.input: CallInput | None = None
        self.output: CallOutput | None = None
        self.started: Started | None = None
        self.clock: SessionClock | None = None
        self.reason = "hangup"
        self._close: tuple[int, str] | None = None
        self._order = MediaOrder(self.limits.reorder_window)
        self._bucket = TokenBucket(self.limits.messages_per_s, self.limits.burst_messages)
        self._early: list[str | bytes] = []  # messages before the provider is known (auto-detection on /)
        self._session_task: asyncio.Task | None = None
        self._t0 = time.monotonic()
        self.ending = False  # teardown has begun
        self.ended = asyncio.Event()  # teardown is done: everything the call held is freed

    @property
    def provider(self) -> str | None:
        return self.serializer.provider if self.serializer is not None else None

    # ---- the call's life --------------------------------------------------------------------------------------
    async def serve(self) -> CallSummary:
        try:
            await self._receive()
        except Exception as exc:  # noqa: BLE001 - a bug in one call must not reach the server
            log.exception("%s: call failed", self.name)
            self.reason = f"internal error: {type(exc).__name__}"
            self._close = (CLOSE_INTERNAL, "internal error")
        finally:
            summary = await self._teardown()
        return summary

    async def _receive(self) -> None:
        deadline = self._t0 + self.limits.start_timeout_s
        while True:
            timeout = None if self.started is not None else max(0.0, deadline - time.monotonic())
            try:
                msg = await self.ws.receive(timeout=timeout)
            except asyncio.TimeoutError:
                self._problem(ProtocolError("bad_message", f"no start within {self.limits.start_timeout_s:g} s",
                                            fatal=True, close_code=CLOSE_POLICY))
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:
                exc = self.ws.exception()
                if getattr(exc, "code", None) == CLOSE_TOO_BIG or self.ws.close_code == CLOSE_TOO_BIG:
                    self._problem(ProtocolError("bad_message", f"a message over {self.limits.max_message_bytes} "
                                                "bytes", fatal=True, close_code=CLOSE_TOO_BIG))
                else:
                    self.reason = f"socket error: {exc}"
                return
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            if not self._bucket.take():
                self._count("rate_limited", "message rate over the limit (dropped)")
                if self.problems["rate_limited"] >= self.limits.rate_close_after:
                    self._problem(ProtocolError("rate_limited", f"over {self.limits.messages_per_s:g} messages/s",
                                                fatal=True, close_code=CLOSE_POLICY))
                    return
                continue
            if not await self._message(msg.data):
                return

    async def _message(self, data: str | bytes) -> bool:
        """Handle one message; False when the call is over."""
        if self.serializer is None:
            self._early.append(data)
            detected = self._detect(data)
            if detected is None:
                if len(self._early) >= self.limits.max_messages_before_start:
                    self._problem(ProtocolError("unknown_event", "could not tell the provider from the first "
                                                f"{len(self._early)} messages", fatal=True))
                    return False
                return True
            self.serializer = self.server.serializer(detected)
            log.info("%s: detected %s", self.name, detected)
            early, self._early = self._early, []
            for item in early:
                if not await self._parse_and_handle(item):
                    return False
            return True
        return await self._parse_and_handle(data)

    async def _parse_and_handle(self, data: str | bytes) -> bool:
        try:
            events = self.serializer.parse(data)
        except ProtocolError as exc:
            self._problem(exc)
            return not exc.fatal
        for event in events:
            if not await self._event(event):
                return False
        return True

    def _detect(self, data: str | bytes) -> str | None:
        if isinstance(data, (bytes, bytearray)):
            return "vonage" if self.server.enabled("vonage") else None
        try:
            message = parse_json(data, "auto")
        except ProtocolError:
            return None  # counted when replayed into the serializer
        for provider in self.server.config.providers:
            if self.server.serializer_class(provider).claims(message):
                return provider
        return None

    async def _event(self, event) -> bool:
        if isinstance(event, Media):
            for samples in self._order.push(event.chunk, event.samples):
                self._feed(samples)
            for kind, n in self._order.counts.items():
                if n:
                    self._count(kind, f"{n} media frame(s) {kind.split('_')[0]}", n)
            self._order.counts.clear()
        elif isinstance(event, MarkEchoed):
            if self.output is None or not self.output.on_mark(event.name):
                self._count("unknown_mark", f"mark {event.name[:40]!r} was never sent")
        elif isinstance(event, Dtmf):
            if self.session is not None:
                self.session.events.emit(DtmfReceived(event.digit, self.clock.now(), event.duration_ms))
        elif isinstance(event, Started):
            await self._start(event)
        elif isinstance(event, Stopped):
            self.reason = event.reason
            return False
        elif isinstance(event, ProviderError):
            self._count("provider_error", event.detail)
        elif isinstance(event, (Connected, Cleared)):
            pass
        return True

    def _feed(self, samples) -> None:
        if self.input is None:
            return
        frame = AudioFrame(samples, self.serializer.format.sample_rate, 1, 0.0)
        if not self.input.push(frame):
            self._count("input_overflow", "the session fell behind; the oldest inbound audio was dropped")

    async def _start(self, started: Started) -> None:
        self.started = started
        self.clock = SessionClock()
        self.input = CallInput(self.clock, self.limits.max_queued_frames)
        self.output = CallOutput(self.serializer, self._send, self.clock, self.server.config.playout, self.name)
        config, notes = self.server.session_config(started.parameters)
        for note in notes:
            self._count("bad_message", note)
        attributes = dict(started.parameters)
        attributes.update(provider=self.provider, call_id=started.call_id, stream_id=started.stream_id)
        attributes.update({f"info.{k}": v for k, v in started.info.items()})
        self.session = await self.server.new_session(self.input, self.output, config, self.clock, self.name,
                                                     attributes)
        self.server.call_started(self)  # hooks see the session before its first event
        self.session.events.emit(CallStarted(self.provider, started.call_id, started.stream_id,
                                             dict(started.parameters), self.clock.now()))
        self._session_task = asyncio.get_running_loop().create_task(self.session.run(), name=f"{self.name}-session")
        self._session_task.add_done_callback(self._session_done)
        log.info("%s: %s call %s started (%s %d Hz; parameters %s)", self.name, self.provider, started.call_id,
                 started.format.encoding, started.format.sample_rate, sorted(started.parameters))

    def _session_done(self, task: asyncio.Task) -> None:
        if self.ending or task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: the session died: %r", self.name, exc)
        self.reason = "session"
        self._close = (CLOSE_INTERNAL, "session ended")
        asyncio.get_running_loop().create_task(self.ws.close(code=CLOSE_INTERNAL, message=b"session ended"))

    async def _send(self, message: str | bytes) -> None:
        if self.ws.closed:
            return
        try:
            if isinstance(message, str):
                await self.ws.send_str(message)
            else:
                await self.ws.send_bytes(message)
        except (ConnectionError, RuntimeError) as exc:  # the provider hung up under us
            log.debug("%s: send failed: %s", self.name, exc)

    async def _teardown(self) -> CallSummary:
        self.ending = True
        for _ in range(5):  # a reply whose last mark came with the hang-up: let the session record it first
            await asyncio.sleep(0)
        turns = 0
        if self.session is not None:
            self.session.events.emit(CallEnded(self.reason, self.clock.now(), dict(self.problems)))
            try:
                # close the session before ending its input: a run() whose input ended waits for the reply in
                # progress to finish, and a reply halted by aclose() never does
                await self.session.aclose()
            except Exception:  # noqa: BLE001
                log.exception("%s: closing the session failed", self.name)
        if self.input is not None:
            self.input.close()
        if self.session is not None:
            if self._session_task is not None and not self._session_task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(self._session_task), 5.0)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                    log.warning("%s: the session did not stop by itself; cancelled", self.name)
                    self._session_task.cancel()
            turns = len(self.session.turns)
        if self.output is not None:
            await self.output.aclose()
        if not self.ws.closed:
            code, reason = self._close or (CLOSE_NORMAL, self.reason)
            try:
                await self.ws.close(code=code, message=reason.encode()[:120])
            except Exception:  # noqa: BLE001 - already gone
                pass
        summary = CallSummary(self.name, self.provider, self.started.call_id if self.started else "", self.reason,
                              round(time.monotonic() - self._t0, 3), turns, dict(self.problems),
                              dict(self.output.stats) if self.output is not None else {},
                              list(self.output.prebuffer_needed) if self.output is not None else [])
        log.info("%s: call ended (%s) after %.1f s, %d turn(s)%s", self.name, self.reason, summary.duration_s, turns,
                 f"; problems {dict(self.problems)}" if self.problems else "")
        self.server.call_ended(self, summary)
        self.ended.set()
        return summary

    # ---- problems -------------------------------------------------------------------------------------------
    def _problem(self, exc: ProtocolError) -> None:
        self._count(exc.kind, exc.detail, fatal=exc.fatal)
        if exc.fatal:
            self.reason = exc.detail
            self._close = (exc.close_code, exc.detail)

    def _count(self, kind: str, detail: str, n: int = 1, fatal: bool = False) -> None:
        before = self.problems[kind]
        self.problems[kind] += n
        self.server.problems[kind] += n
        total = self.problems[kind]
        if fatal or before < 3 or len(str(total)) > len(str(before)):  # first few, then each power of ten
            log.warning("%s: %s: %s (%d in this call)%s", self.name, kind, detail, total,
                        "; closing the call" if fatal else "")
            if self.session is not None:  # as throttled as the log: a flood must not fill the event history
                self.session.events.emit(CallProblem(kind, detail, self.clock.now(), fatal))


def new_call_name() -> str:
    return f"call-{uuid.uuid4().hex[:8]}"
