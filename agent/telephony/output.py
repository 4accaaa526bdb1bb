"""The session's audio I/O over a provider's media stream: `CallInput` and `CallOutput` (agent/io.py contracts).

`CallOutput` turns the session's 16 kHz reply frames into the provider's 20 ms messages:
- resampled to the call's rate with soxr (streaming.frames.Resampler), encoded by the call's serializer;
- paced to real time: a chunk goes out only while less than `lead_s` of audio is queued at the provider (by our
  estimate of its playout: it plays each chunk on arrival, back to back). The provider's buffer never runs far
  ahead, so a barge-in's `clear` has little to throw away and a hang-up leaves little queued;
- a reply's first chunk waits until `prebuffer_s` of audio is ready (or the reply ended): a little slack
  against a burst of slow vocoder chunks; `lead_s` covers stalls of our own event loop;
- a `mark` after every chunk (`mark_every`) and one after the last. The provider echoes a mark once the audio
  before it has played. The position reported on barge-in is the audio covered by the last echoed mark: what the
  caller actually heard, not what we sent. A reply has played out when the mark after its last chunk comes back;
  if it never does (a provider without marks, a lost echo), `mark_timeout_s` after its audio should have ended
  the reply finishes anyway with the estimated position and the call counts a `mark_timeouts`;
- `clear_buffer()` (barge-in) sends the provider's clear at once, ahead of any further audio, drops what is queued
  here and returns what was heard. Echoes of the cleared reply's marks (providers echo them on clear) are ignored.
- underruns: a chunk sent after the provider's buffer (as estimated) ran dry inside a reply. Each reply also
  records the prebuffer it would have needed (`prebuffer_needed`): measured headroom, not a guess.

`CallInput` is the inbound side: the call handler pushes decoded frames at the call's rate (the session's VAD
resamples to 16 kHz), stamped by their position in the caller's audio (see the class).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace

import numpy as np

from agent.clock import SessionClock
from agent.io import AudioInput, AudioOutput, PlaybackFinished, PlaybackStarted
from agent.telephony.base import Serializer
from agent.telephony.codec import CHUNK_S
from streaming.frames import AudioFrame, Resampler, float32_to_int16

log = logging.getLogger(__name__)

SESSION_RATE = 16000


@dataclass(frozen=True)
class PlayoutConfig:
    lead_s: float = 0.2  # audio queued at the provider ahead of its playout, at most
    prebuffer_s: float = 0.2  # audio ready before a reply's first chunk is sent (less if the reply is shorter)
    mark_every: int = 1  # a mark after every N chunks (always one after the last)
    mark_timeout_s: float = 2.0  # a reply whose last mark never comes back is finished this long after its end

    def __post_init__(self) -> None:
        for name in ("lead_s", "prebuffer_s", "mark_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"PlayoutConfig.{name}: expected a finite number >= 0, got {value!r}")
        if self.lead_s < CHUNK_S:
            raise ValueError(f"PlayoutConfig.lead_s: at least one chunk ({CHUNK_S} s), got {self.lead_s}")
        if not isinstance(self.mark_every, int) or self.mark_every < 1:
            raise ValueError(f"PlayoutConfig.mark_every: expected an int >= 1, got {self.mark_every!r}")


class CallInput(AudioInput):
    """Frames pushed by the call handler, bounded (a session that falls behind loses the oldest audio, counted).

    Frames are stamped here, on the session clock, by their position in the caller's audio: contiguous from the
    first frame's arrival, so a stall of our event loop (frames then arrive late, in a burst) does not put a gap
    into the caller's timeline (the VAD would hear a gap as silence and end the turn mid-sentence). Only when
    arrivals run more than `resync_s` behind the audio's own time (a real gap: the provider paused or lost
    frames) does the timeline jump forward to the arrival time. It never jumps back (the VAD refuses time going
    backwards); the per-call rate limit bounds how far a provider sending too fast can run ahead."""

    timestamps_on_session_clock = True

    def __init__(self, clock: SessionClock, max_frames: int = 250, resync_s: float = 1.0):
        self.clock = clock
        self.resync_s = resync_s
        self._queue: deque[AudioFrame] = deque()
        self._max = max_frames
        self._ready = asyncio.Event()
        self._closed = False
        self._next: float | None = None  # session time of the next sample of the caller's audio
        self.dropped = 0
        self.resyncs = 0

    def push(self, frame: AudioFrame) -> bool:
        """Queue a frame; False (and the oldest frame dropped) when the session is `max_frames` behind."""
        if self._closed:
            return False
        duration = frame.num_samples / frame.sample_rate
        arrived = self.clock.now() - duration  # when its first sample was spoken, had it come at once
        if self._next is None or arrived - self._next > self.resync_s:
            self.resyncs += self._next is not None
            self._next = arrived
        frame = replace(frame, timestamp=self._next)
        self._next += duration
        overflow = len(self._queue) >= self._max
        if overflow:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(frame)
        self._ready.set()
        return not overflow

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def aclose(self) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[AudioFrame]:
        while True:
            while self._queue:
                yield self._queue.popleft()
            if self._closed:
                return
            self._ready.clear()
            await self._ready.wait()


@dataclass
class _Reply:
    """One reply segment on its way to the provider."""

    index: int
    chunks: deque = field(default_factory=deque)  # int16 chunks at the call's rate, not yet sent
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))  # samples short of a chunk
    handed_s: float = 0.0  # 16 kHz audio the session handed us
    sent: int = 0  # chunks sent
    play_start: float | None = None  # estimated start of the provider's playout (moved on an underrun)
    heard_s: float = 0.0  # covered by the last echoed mark
    marks: dict[str, float] = field(default_factory=dict)  # sent, not yet echoed: name -> audio covered (s)
    flushed: bool = False
    final_mark: str | None = None
    deadline: float | None = None  # mark watchdog
    underruns: int = 0
    arrivals: list = field(default_factory=list)  # (time, reply audio before it, 20 ms) per chunk ready to send
    done: asyncio.Future | None = None

    @property
    def sent_s(self) -> float:
        return self.sent * CHUNK_S


Send = Callable[[str | bytes], Awaitable[None]]


def needed_prebuffer(arrivals: list[tuple[float, float, float]]) -> float:
    """The least prebuffer (seconds of audio held before playout starts) with which frames arriving at these times
    play back to back without running dry. Frame k (arriving at t_k, starting h_k into the reply) must be there when
    playout reaches h_k: t_k <= start + h_k for every k, i.e. start >= D = max(t_k - h_k). Playout starts when the
    prebuffer is complete, at the arrival of the frame that completes it: the first frame arriving at or after D
    decides, and the prebuffer is the audio up to its end."""
    if not arrivals:
        return 0.0
    latest = max(t - h for t, h, _ in arrivals)
    for t, h, duration in arrivals:
        if t >= latest - 1e-9:
            return h + duration
    return arrivals[-1][1] + arrivals[-1][2]  # pragma: no cover - the frame that sets `latest` qualifies


class CallOutput(AudioOutput):
    def __init__(self, serializer: Serializer, send: Send, clock: SessionClock, config: PlayoutConfig | None = None,
                 name: str = "call"):
        super().__init__(SESSION_RATE)
        self.serializer = serializer
        self.config = config or PlayoutConfig()
        self.clock = clock
        self.name = name
        self.format = serializer.format
        self._send_raw = send
        self._lock = asyncio.Lock()  # one message at a time on the socket, in order
        self._resampler = Resampler(self.format.sample_rate) if self.format.sample_rate != SESSION_RATE else None
        self._chunk = self.format.chunk_samples
        self._reply: _Reply | None = None
        self._count = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self.finished: list[PlaybackFinished] = []
        self.stats = {"chunks_sent": 0, "marks_sent": 0, "marks_echoed": 0, "clears_sent": 0, "underruns": 0,
                      "mark_timeouts": 0, "late_marks": 0}
        self.truncated_at: list[str | None] = []  # per interrupted reply: the mark whose echo set the position
        # per reply: the least prebuffer that would have played it without an underrun, given when its chunks
        # were ready to send (the session's frames, through the resampler: needed_prebuffer): what `prebuffer_s`
        # must cover on this machine at this load
        self.prebuffer_needed: list[float] = []
        self._last_echoed: str | None = None

    # ---- the AudioOutput contract ---------------------------------------------------------------------------
    async def capture_frame(self, frame: AudioFrame) -> None:
        if self._closed:
            return
        if frame.sample_rate != SESSION_RATE:
            raise ValueError(f"CallOutput takes {SESSION_RATE} Hz frames, got {frame.sample_rate} Hz")
        reply = self._reply
        if reply is None:
            self._count += 1
            reply = self._reply = _Reply(self._count, done=asyncio.get_running_loop().create_future())
            self._last_echoed = None
            if self._resampler is not None:
                self._resampler.reset()
            self._ensure_sender()
        elif reply.flushed:
            raise RuntimeError("capture_frame() after flush(): wait_for_playout() before the next reply")
        mono = frame.to_float32_mono()
        reply.handed_s += mono.num_samples / SESSION_RATE
        parts = self._resampler.push(mono) if self._resampler is not None else [mono]
        self._queue_samples(reply, parts)
        self._wake.set()

    def flush(self) -> None:
        reply = self._reply
        if reply is None or reply.flushed:
            return
        if self._resampler is not None:
            self._queue_samples(reply, self._resampler.flush())
        if reply.pending.size:  # the last chunk padded to 20 ms with silence
            last = np.zeros(self._chunk, np.int16)
            last[: reply.pending.size] = reply.pending
            reply.chunks.append(last)
            reply.arrivals.append((self.clock.now(), (reply.sent + len(reply.chunks) - 1) * CHUNK_S, CHUNK_S))
            reply.pending = np.zeros(0, np.int16)
        reply.flushed = True
        self._wake.set()

    def clear_buffer(self) -> PlaybackFinished | None:
        reply = self._reply
        if reply is None:
            return None
        if reply.play_start is not None:  # something was sent (or is on its way): the provider must drop it
            self.stats["clears_sent"] += 1
            asyncio.get_running_loop().create_task(self._send(self.serializer.clear()))
        self.truncated_at.append(self._last_echoed)
        return self._finish(reply, interrupted=True)

    async def wait_for_playout(self) -> PlaybackFinished:
        reply = self._reply
        if reply is None:
            return self.finished[-1] if self.finished else PlaybackFinished(0.0, False, self.clock.now())
        return await asyncio.shield(reply.done)

    async def aclose(self) -> None:
        self._closed = True
        if self._reply is not None:
            self._finish(self._reply, interrupted=True)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # ---- marks from the provider ----------------------------------------------------------------------------
    def on_mark(self, name: str) -> bool:
        """An echoed mark; False when we never sent that name (the caller counts it)."""
        reply = self._reply
        covered = reply.marks.get(name) if reply is not None else None
        if covered is None:
            index = name.split(":", 1)[0]
            if index.isdigit() and int(index) <= self._count:
                self.stats["late_marks"] += 1  # a cleared or finished reply's mark (echoed on clear)
                return True
            return False
        self.stats["marks_echoed"] += 1
        for sent_name in [n for n, c in reply.marks.items() if c <= covered]:
            del reply.marks[sent_name]  # an echo means everything queued before it has played
        if covered >= reply.heard_s:
            reply.heard_s = covered
            self._last_echoed = name
        if name == reply.final_mark:
            self._finish(reply, interrupted=False)
        return True

    @property
    def playing(self) -> bool:
        return self._reply is not None

    # ---- internals ------------------------------------------------------------------------------------------
    def _queue_samples(self, reply: _Reply, parts: list[AudioFrame]) -> None:
        pieces = [reply.pending] + [float32_to_int16(p.samples) if p.samples.dtype != np.int16 else p.samples
                                    for p in parts]
        samples = np.concatenate(pieces) if len(pieces) > 1 else reply.pending
        n = samples.size // self._chunk
        now = self.clock.now()
        for i in range(n):
            reply.chunks.append(samples[i * self._chunk:(i + 1) * self._chunk])
            reply.arrivals.append((now, (reply.sent + len(reply.chunks) - 1) * CHUNK_S, CHUNK_S))
        reply.pending = samples[n * self._chunk:]

    def _finish(self, reply: _Reply, interrupted: bool, position: float | None = None) -> PlaybackFinished:
        if position is None:
            position = reply.heard_s if interrupted else reply.sent_s
        event = PlaybackFinished(min(position, reply.handed_s), interrupted, self.clock.now(), reply.underruns)
        if self._reply is reply:
            self._reply = None
            self.prebuffer_needed.append(round(needed_prebuffer(reply.arrivals), 4))
        self.finished.append(event)
        if reply.done is not None and not reply.done.done():
            reply.done.set_result(event)
        self._wake.set()
        self._emit(event)
        return event

    def _ensure_sender(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-playout")

    async def _send(self, message: str | bytes, reply: _Reply | None = None) -> bool:
        """Send in order; a reply's message is dropped if the reply was cleared while it waited."""
        async with self._lock:
            if reply is not None and reply is not self._reply:
                return False
            await self._send_raw(message)
            return True

    async def _idle(self, until: float | None) -> None:
        """Wait for news (a frame, a flush, a mark, a clear) or until a time on the session clock (pacing reads
        the session's clock, so a fast clock in tests paces the same timeline without the waiting)."""
        self._wake.clear()
        if until is None:
            await self._wake.wait()
            return
        waiters = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.clock.sleep_until(until))}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _run(self) -> None:
        cfg = self.config
        try:
            while not self._closed:
                reply = self._reply
                if reply is None:
                    await self._idle(None)
                    continue
                now = self.clock.now()
                if reply.play_start is None:  # the reply's first chunk waits for the prebuffer (or the end)
                    if not reply.chunks and reply.flushed:  # a reply with no audio at all
                        self._finish(reply, interrupted=False)
                        continue
                    if not reply.chunks or (len(reply.chunks) * CHUNK_S + 1e-9 < cfg.prebuffer_s
                                            and not reply.flushed):
                        await self._idle(None)
                        continue
                    reply.play_start = now
                    self._emit(PlaybackStarted(now))
                if reply.chunks:
                    played = now - reply.play_start
                    if played > reply.sent_s:  # the provider ran dry before this chunk (as we estimate it)
                        reply.underruns += 1
                        self.stats["underruns"] += 1
                        reply.play_start = now - reply.sent_s
                    elif reply.sent_s - played >= cfg.lead_s:
                        await self._idle(reply.play_start + reply.sent_s - cfg.lead_s)
                        continue
                    chunk = reply.chunks.popleft()
                    if not await self._send(self.serializer.media(chunk), reply):
                        continue
                    reply.sent += 1
                    self.stats["chunks_sent"] += 1
                    last = reply.flushed and not reply.chunks
                    if not last and reply.sent % cfg.mark_every == 0:
                        await self._mark(reply, f"{reply.index}:{reply.sent}")
                    continue
                if reply.flushed and reply.final_mark is None:
                    reply.final_mark = f"{reply.index}:end"
                    reply.deadline = reply.play_start + reply.sent_s + cfg.mark_timeout_s
                    await self._mark(reply, reply.final_mark)
                    continue
                if reply.final_mark is not None and reply.deadline is not None and now >= reply.deadline:
                    self.stats["mark_timeouts"] += 1
                    log.warning("%s: the last mark of reply %d never came back; finishing it as played",
                                self.name, reply.index)
                    self._finish(reply, interrupted=False, position=reply.sent_s)
                    continue
                await self._idle(reply.deadline if reply.final_mark is not None else None)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a dead socket: the call handler ends the call
            log.exception("%s: playout stopped", self.name)
            if self._reply is not None:
                self._finish(self._reply, interrupted=True)

    async def _mark(self, reply: _Reply, name: str) -> None:
        reply.marks[name] = reply.sent_s
        if await self._send(self.serializer.mark(name), reply):
            self.stats["marks_sent"] += 1
