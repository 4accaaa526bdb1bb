"""The session's audio contracts (agent/io.py) over a Realtime connection.

`PushInput`: frames the connection pushes as `input_audio_buffer.append` events arrive; `drained()` returns once the
session has taken every frame pushed so far, so a commit covers exactly the audio appended before it.

`RealtimeOutput`: every reply frame is handed to the connection at once (it becomes an audio delta; the client does
its own buffering and playout). Over a WebSocket the server never learns what was played, so playback is modelled:
a reply "plays" from its first frame in real time, capped at what was sent. `clear_buffer()` (a barge-in under server
VAD) reports that estimate; `wait_for_playout()` returns as soon as the reply is flushed (the response is done when
its audio is sent, not when it is heard); a client's `conversation.item.truncate` later says what was really heard.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from agent.clock import SessionClock
from agent.io import AudioInput, AudioOutput, PlaybackFinished, PlaybackStarted
from streaming.frames import AudioFrame


class PushInput(AudioInput):
    timestamps_on_session_clock = True  # stamped with their stream position by agent.realtime.audio.InputConverter

    def __init__(self) -> None:
        self._queue: asyncio.Queue[AudioFrame | None] = asyncio.Queue()
        self._idle: list[asyncio.Future] = []
        self._waiting = False  # the consumer is waiting for a frame (it has handled every frame taken)
        self._closed = False

    def push(self, frame: AudioFrame) -> None:
        if not self._closed:
            self._queue.put_nowait(frame)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
        self._wake()

    async def aclose(self) -> None:
        self.close()

    async def drained(self) -> None:
        """Return once the consumer has handled every frame pushed so far (at once when closed)."""
        while not self._closed and not (self._waiting and self._queue.empty()):
            fut = asyncio.get_running_loop().create_future()
            self._idle.append(fut)
            await fut

    def _wake(self) -> None:
        idle, self._idle = self._idle, []
        for fut in idle:
            if not fut.done():
                fut.set_result(None)

    async def __aiter__(self) -> AsyncIterator[AudioFrame]:
        while True:
            self._waiting = True
            if self._queue.empty():
                self._wake()
            frame = await self._queue.get()
            self._waiting = False
            if frame is None:
                return
            yield frame


class RealtimeOutput(AudioOutput):
    """16 kHz reply frames to `on_frame` (the connection encodes and sends them); see the module doc."""

    def __init__(self, clock: SessionClock, on_frame: Callable[[AudioFrame], None], on_flush: Callable[[], None],
                 on_clear: Callable[[], None], sample_rate: int = 16000):
        super().__init__(sample_rate)
        self.clock = clock
        self.on_frame, self.on_flush, self.on_clear = on_frame, on_flush, on_clear
        self._started: float | None = None  # when the current segment's first frame was sent
        self._sent_s = 0.0
        self._last: PlaybackFinished | None = None

    @property
    def playing(self) -> bool:
        return self._started is not None

    async def capture_frame(self, frame: AudioFrame) -> None:
        if frame.sample_rate != self.sample_rate:
            raise ValueError(f"RealtimeOutput takes {self.sample_rate} Hz frames, got {frame.sample_rate} Hz")
        if self._started is None:
            self._started, self._sent_s = self.clock.now(), 0.0
            self._emit(PlaybackStarted(self._started))
        self._sent_s += frame.duration
        self.on_frame(frame)

    def flush(self) -> None:
        if self._started is not None:
            self.on_flush()

    def played_estimate(self) -> float:
        if self._started is None:
            return 0.0
        return max(0.0, min(self._sent_s, self.clock.now() - self._started))

    def clear_buffer(self) -> PlaybackFinished | None:
        if self._started is None:
            return None
        event = PlaybackFinished(self.played_estimate(), True, self.clock.now())
        self._end(event)
        self.on_clear()
        return event

    async def wait_for_playout(self) -> PlaybackFinished:
        if self._started is None:
            return self._last or PlaybackFinished(0.0, False, self.clock.now())
        event = PlaybackFinished(self._sent_s, False, self.clock.now())
        self._end(event)
        return event

    def _end(self, event: PlaybackFinished) -> None:
        self._started = None
        self._last = event
        self._emit(event)
