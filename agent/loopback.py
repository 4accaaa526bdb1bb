"""Loopback transport: audio from files or arrays in, a recording output, both paced by a session clock.

`LoopbackInput` delivers 20 ms frames at the pace of the clock (frame k of a stream is delivered when it has been
"recorded", at its end time), with silence in between on request, like a microphone would. `RecordingOutput`
plays frames on the same clock: a frame starts when the previous one ends (or when it arrives, if the output ran
dry: an underrun), `clear_buffer()` cuts playback at the current time, and the audio actually played is kept on the
session timeline. With a fast `SessionClock` both run as fast as the compute allows (agent/clock.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from agent.clock import SessionClock
from agent.io import AudioInput, AudioOutput, PlaybackFinished, PlaybackStarted
from streaming.frames import AudioFrame

SAMPLE_RATE = 16000


@dataclass
class TimedAudio:
    """Mono float32 audio that started at `start` on the session clock."""

    start: float
    samples: np.ndarray

    @property
    def end(self) -> float:
        return self.start + self.samples.shape[0] / SAMPLE_RATE


def render_timeline(pieces: list[TimedAudio], start: float, end: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The pieces placed on one timeline [start, end) (later pieces overwrite overlaps; gaps are silence)."""
    out = np.zeros(max(0, round((end - start) * sample_rate)), dtype=np.float32)
    for piece in pieces:
        i = round((piece.start - start) * sample_rate)
        a, b = max(0, i), min(out.shape[0], i + piece.samples.shape[0])
        if b > a:
            out[a:b] = piece.samples[a - i : b - i]
    return out


class LoopbackInput(AudioInput):
    """Frames from arrays, delivered in real time on `clock`. Drive it with play() / silence() from a task."""

    timestamps_on_session_clock = True

    def __init__(self, clock: SessionClock, sample_rate: int = SAMPLE_RATE, frame_ms: int = 20):
        self.clock = clock
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * frame_ms // 1000
        self.position = clock.now()  # stream time of the next sample
        self.timeline: list[TimedAudio] = []  # what was "said" (for the conversation recording)
        self._queue: asyncio.Queue[AudioFrame | None] = asyncio.Queue()
        self._closed = False

    async def play(self, samples: np.ndarray) -> tuple[float, float]:
        """Deliver `samples` (mono float32 at sample_rate) frame by frame; returns their (start, end) times."""
        samples = np.asarray(samples, dtype=np.float32)
        start = self.position
        n = self.frame_samples
        if samples.shape[0] % n:  # whole frames only: pad the last one with silence
            samples = np.concatenate([samples, np.zeros(n - samples.shape[0] % n, np.float32)])
        for i in range(0, samples.shape[0], n):
            if self._closed:
                break
            chunk = samples[i : i + n]
            t = self.position
            await self.clock.sleep_until(t + n / self.sample_rate)
            self._queue.put_nowait(AudioFrame(chunk, self.sample_rate, 1, t))
            self.timeline.append(TimedAudio(t, chunk))
            self.position = t + n / self.sample_rate
        return start, self.position

    async def silence(self, seconds: float) -> None:
        await self.play(np.zeros(round(seconds * self.sample_rate), np.float32))

    async def silence_until(self, done: Callable[[], bool], max_s: float) -> bool:
        """Silence frame by frame until done() (checked before each frame) or max_s; returns done()."""
        end = self.position + max_s
        while not done() and self.position < end - 1e-9 and not self._closed:
            await self.play(np.zeros(self.frame_samples, np.float32))
        return done()

    def close(self) -> None:
        """End of the stream: the iterator stops after the frames already delivered."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def aclose(self) -> None:
        self.close()

    async def __aiter__(self) -> AsyncIterator[AudioFrame]:
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            yield frame


@dataclass
class _Segment:
    frames: list[TimedAudio] = field(default_factory=list)
    end: float = 0.0  # when the queued audio will have played
    flushed: bool = False
    underruns: int = 0
    done: asyncio.Future | None = None
    finisher: asyncio.Task | None = None


class RecordingOutput(AudioOutput):
    """Plays 16 kHz mono frames on `clock` and keeps what was played (`timeline`, `segments`)."""

    def __init__(self, clock: SessionClock, sample_rate: int = SAMPLE_RATE):
        super().__init__(sample_rate)
        self.clock = clock
        self._segment: _Segment | None = None
        self.timeline: list[TimedAudio] = []  # every piece of audio played, cut where playback was cleared
        self.segments: list[list[TimedAudio]] = []  # the same, per segment
        self.finished: list[PlaybackFinished] = []

    @property
    def playing(self) -> bool:
        return self._segment is not None

    async def capture_frame(self, frame: AudioFrame) -> None:
        if frame.sample_rate != self.sample_rate:
            raise ValueError(f"RecordingOutput plays {self.sample_rate} Hz frames, got {frame.sample_rate} Hz")
        samples = frame.to_float32_mono().samples
        now = self.clock.now()
        seg = self._segment
        if seg is None:
            seg = self._segment = _Segment(end=now, done=asyncio.get_running_loop().create_future())
            self.segments.append(seg.frames)
            self._emit(PlaybackStarted(now))
        elif seg.flushed:
            raise RuntimeError("capture_frame() after flush(): wait_for_playout() before the next segment")
        if now > seg.end + 1e-9:
            seg.underruns += 1  # ran dry: this frame starts late
        start = max(now, seg.end)
        piece = TimedAudio(start, samples)
        seg.frames.append(piece)
        self.timeline.append(piece)
        seg.end = piece.end

    def flush(self) -> None:
        seg = self._segment
        if seg is None or seg.flushed:
            return
        seg.flushed = True
        seg.finisher = asyncio.get_running_loop().create_task(self._finish_at(seg))

    async def _finish_at(self, seg: _Segment) -> None:
        await self.clock.sleep_until(seg.end)
        if self._segment is seg:
            position = sum(p.samples.shape[0] for p in seg.frames) / self.sample_rate
            self._close(seg, PlaybackFinished(position, False, seg.end, seg.underruns))

    def _close(self, seg: _Segment, event: PlaybackFinished) -> None:
        self._segment = None
        self.finished.append(event)
        if not seg.done.done():
            seg.done.set_result(event)
        self._emit(event)

    def clear_buffer(self) -> PlaybackFinished | None:
        seg = self._segment
        if seg is None:
            return None
        now = self.clock.now()
        played = 0
        for piece in seg.frames:
            keep = int(np.clip(round((now - piece.start) * self.sample_rate), 0, piece.samples.shape[0]))
            piece.samples = piece.samples[:keep]  # the recording keeps only what was heard
            played += keep
        unplayed = {id(p) for p in seg.frames if p.samples.shape[0] == 0}
        seg.frames[:] = [p for p in seg.frames if id(p) not in unplayed]
        self.timeline[:] = [p for p in self.timeline if id(p) not in unplayed]
        if seg.finisher is not None:
            seg.finisher.cancel()
        event = PlaybackFinished(played / self.sample_rate, True, now, seg.underruns)
        self._close(seg, event)
        return event

    async def wait_for_playout(self) -> PlaybackFinished:
        seg = self._segment
        if seg is None:
            return self.finished[-1] if self.finished else PlaybackFinished(0.0, False, self.clock.now())
        return await asyncio.shield(seg.done)
