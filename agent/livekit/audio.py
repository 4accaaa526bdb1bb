"""Room audio for a Session (the agent/io.py contracts over the livekit SDK).

`RoomAudioInput`: the served participant's microphone through `rtc.AudioStream(track, sample_rate=16000)` (the
SDK resamples), as 20 ms `AudioFrame`s stamped by the session on arrival. The track can be swapped (a participant
republishes) or be gone for a while (muted, unpublished): after `fill_after_s` without a frame the input produces
silence in real time, so a turn cut off by a mute still ends (the VAD needs to hear the silence) and the session's
clock keeps moving. The iterator ends at `aclose()` (the participant left).

`RoomAudioOutput`: the agent's voice as a 48 kHz mono `rtc.AudioSource` with a small queue, published as a
microphone track. `AudioSource.capture_frame` returns once a frame is queued, not when it has been sent, and the
queue holds `queue_ms` of audio (docs/livekit.md, Audio out): the position actually played is what was captured
minus `AudioSource.queued_duration`, and `clear_queue()` drops the rest at a barge-in. A small queue keeps that
drop (and the latency it adds) short and the position honest; `capture_frame` blocks while the queue is full, which
paces the session's frames in real time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from agent.io import AudioInput, AudioOutput, PlaybackFinished, PlaybackStarted
from agent.livekit.conventions import AGENT_TRACK_NAME, INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE
from streaming.frames import AudioFrame, BadFrameError, Resampler, float32_to_int16

log = logging.getLogger(__name__)

FRAME_MS = 20
SOURCE_FRAME_MS = 10  # what we hand the AudioSource (WebRTC's own frame size)


class RoomAudioInput(AudioInput):
    """The served participant's audio (see the module doc). `attach(track)` once its microphone is subscribed."""

    timestamps_on_session_clock = False  # frames carry no capture time we could map: the session stamps arrival

    def __init__(self, sample_rate: int = INPUT_SAMPLE_RATE, fill_after_s: float = 0.1):
        self.sample_rate = sample_rate
        self.frame_samples = sample_rate * FRAME_MS // 1000
        self.fill_after_s = fill_after_s
        self.track_sid: str | None = None
        self.frames_received = 0
        self.frames_filled = 0  # silence frames produced while no audio came
        self.bad_frames = 0
        self._queue: asyncio.Queue[AudioFrame | None] = asyncio.Queue()
        self._stream = None  # rtc.AudioStream
        self._reader: asyncio.Task | None = None
        self._filler: asyncio.Task | None = None
        self._last_real = time.monotonic()
        self._fill_pos: float | None = None
        self._closed = False

    # ---- track management ----------------------------------------------------------------------------------
    def attach(self, track) -> None:
        """Listen to `track` (an rtc.RemoteAudioTrack) from now on, instead of any previous one."""
        from livekit import rtc

        if self._closed:
            return
        self.detach()
        self.track_sid = track.sid
        self._stream = rtc.AudioStream(track, sample_rate=self.sample_rate, num_channels=1, frame_size_ms=FRAME_MS)
        self._reader = asyncio.get_running_loop().create_task(self._read(self._stream))
        self._ensure_filler()

    def detach(self) -> None:
        stream, self._stream = self._stream, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        if stream is not None:
            asyncio.get_running_loop().create_task(_close_quietly(stream))

    def _ensure_filler(self) -> None:
        if self._filler is None and not self._closed:
            self._last_real = time.monotonic()
            self._filler = asyncio.get_running_loop().create_task(self._fill())

    async def _read(self, stream) -> None:
        try:
            async for event in stream:
                if self._closed:
                    return
                try:
                    frame = AudioFrame.from_livekit(event.frame, timestamp=0.0)
                except BadFrameError as exc:  # report and go on: the session must not die of one frame
                    self.bad_frames += 1
                    log.warning("dropped a bad frame from track %s: %s", self.track_sid, exc)
                    continue
                self._last_real = time.monotonic()
                self._fill_pos = None
                self.frames_received += 1
                self._queue.put_nowait(frame)
        except asyncio.CancelledError:
            pass

    async def _fill(self) -> None:
        """Silence in real time while no frames arrive (muted, unpublished, not yet subscribed)."""
        frame_s = FRAME_MS / 1000
        silence = np.zeros(self.frame_samples, np.float32)
        while not self._closed:
            await asyncio.sleep(frame_s)
            now = time.monotonic()
            if now - self._last_real < self.fill_after_s:
                continue
            if self._fill_pos is None:
                self._fill_pos = self._last_real
            while self._fill_pos + frame_s <= now and not self._closed:
                self._queue.put_nowait(AudioFrame(silence, self.sample_rate, 1, 0.0))
                self._fill_pos += frame_s
                self.frames_filled += 1

    def start(self) -> None:
        """Start producing (silence until a track is attached)."""
        self._ensure_filler()

    # ---- AudioInput -----------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.detach()
        if self._filler is not None:
            self._filler.cancel()
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[AudioFrame]:
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            yield frame


async def _close_quietly(closable) -> None:
    try:
        await asyncio.wait_for(closable.aclose(), 2.0)
    except Exception as exc:  # noqa: BLE001 - closing a stream of a track that is gone
        log.debug("closing %r: %s", closable, exc)


@dataclass
class _Segment:
    started_at: float | None = None  # session clock, first samples captured to the SDK
    captured: int = 0  # samples at OUTPUT_SAMPLE_RATE handed to the AudioSource
    flushed: bool = False
    underruns: int = 0
    done: asyncio.Future | None = None
    finisher: asyncio.Task | None = None
    last_capture: float = 0.0  # monotonic
    pending: list[np.ndarray] = field(default_factory=list)  # int16 samples short of a whole 10 ms frame


@dataclass(frozen=True)
class SegmentReport:
    """What the transport saw of one reply segment (per-room metrics)."""

    started_at: float | None
    captured_s: float
    position_s: float
    interrupted: bool
    underruns: int
    queue_ms: int


class RoomAudioOutput(AudioOutput):
    """Session frames (16 kHz float32) -> soxr to 48 kHz -> 10 ms int16 frames -> small-queue AudioSource."""

    def __init__(self, clock, queue_ms: int = 100, sample_rate: int = INPUT_SAMPLE_RATE,
                 out_rate: int = OUTPUT_SAMPLE_RATE):
        from livekit import rtc

        super().__init__(sample_rate)
        self.clock = clock
        self.queue_ms = queue_ms
        self.out_rate = out_rate
        self.piece = out_rate * SOURCE_FRAME_MS // 1000
        self.source = rtc.AudioSource(out_rate, 1, queue_size_ms=queue_ms)
        self.track = rtc.LocalAudioTrack.create_audio_track(AGENT_TRACK_NAME, self.source)
        self._resampler = Resampler(out_rate, in_rate=sample_rate)
        self._seg: _Segment | None = None
        self._last: PlaybackFinished | None = None
        self.reports: list[SegmentReport] = []
        self._closed = False

    @property
    def playing(self) -> bool:
        return self._seg is not None

    def reset_listeners(self) -> None:
        """Forget the playback listeners (a room's output outlives each session that registered one)."""
        self._listeners.clear()

    def played_s(self) -> float:
        seg = self._seg
        if seg is None:
            return 0.0
        return max(0.0, seg.captured / self.out_rate - self.source.queued_duration)

    async def capture_frame(self, frame: AudioFrame) -> None:
        if frame.sample_rate != self.sample_rate:
            raise ValueError(f"RoomAudioOutput takes {self.sample_rate} Hz frames, got {frame.sample_rate} Hz")
        if self._closed:
            return
        seg = self._seg
        if seg is None:
            seg = self._seg = _Segment(done=asyncio.get_running_loop().create_future())
            self._resampler.reset()
        elif seg.flushed:
            raise RuntimeError("capture_frame() after flush(): wait_for_playout() before the next segment")
        if seg.captured and self.source.queued_duration <= 0.0:
            seg.underruns += 1  # the queue ran dry before this frame came: the listener heard a gap
        out = self._resampler.push(frame.to_float32_mono())
        await self._capture(seg, [o.samples for o in out])

    async def _capture(self, seg: _Segment, pieces: list[np.ndarray], final: bool = False) -> None:
        from livekit import rtc

        if pieces:
            seg.pending.append(float32_to_int16(np.concatenate(pieces)))
        data = np.concatenate(seg.pending) if seg.pending else np.zeros(0, np.int16)
        whole = data.shape[0] // self.piece * self.piece
        if final and data.shape[0] > whole:  # the tail: pad the last 10 ms frame with silence
            data = np.concatenate([data, np.zeros(self.piece - (data.shape[0] - whole), np.int16)])
            whole = data.shape[0]
        seg.pending = [data[whole:]] if data.shape[0] > whole else []
        for i in range(0, whole, self.piece):
            if self._seg is not seg:
                return  # cleared meanwhile
            chunk = data[i:i + self.piece]
            await self.source.capture_frame(rtc.AudioFrame(chunk.tobytes(), self.out_rate, 1, self.piece))
            if self._seg is not seg:
                return
            seg.captured += self.piece
            seg.last_capture = time.monotonic()
            if seg.started_at is None:
                seg.started_at = self.clock.now()
                self._emit(PlaybackStarted(seg.started_at))

    def flush(self) -> None:
        seg = self._seg
        if seg is None or seg.flushed:
            return
        seg.flushed = True
        seg.finisher = asyncio.get_running_loop().create_task(self._finish(seg))

    async def _finish(self, seg: _Segment) -> None:
        try:
            tail = [o.samples for o in self._resampler.flush()]
            await self._capture(seg, tail, final=True)
            if self._seg is not seg:
                return
            await self.source.wait_for_playout()
            if self._seg is seg:
                self._close(seg, PlaybackFinished(seg.captured / self.out_rate, False, self.clock.now(),
                                                  seg.underruns))
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - the track went away (room left): end the segment
            log.warning("playout of a reply segment failed: %s", exc)
            if self._seg is seg:
                self._close(seg, PlaybackFinished(self.played_s(), True, self.clock.now(), seg.underruns))

    def _close(self, seg: _Segment, event: PlaybackFinished) -> None:
        self._seg = None
        self._last = event
        self.reports.append(SegmentReport(seg.started_at, seg.captured / self.out_rate, event.position,
                                          event.interrupted, event.underruns, self.queue_ms))
        if seg.done is not None and not seg.done.done():
            seg.done.set_result(event)
        self._emit(event)

    def clear_buffer(self) -> PlaybackFinished | None:
        seg = self._seg
        if seg is None:
            return None
        position = self.played_s()
        self.source.clear_queue()
        # a capture in flight when the queue was cleared still lands in the queue: clear once more right after
        loop = asyncio.get_running_loop()
        loop.call_later(SOURCE_FRAME_MS * 3 / 1000, self._clear_if_idle)
        if seg.finisher is not None:
            seg.finisher.cancel()
        self._resampler.reset()
        event = PlaybackFinished(position, True, self.clock.now(), seg.underruns)
        self._close(seg, event)
        return event

    def _clear_if_idle(self) -> None:
        if self._seg is None and not self._closed:
            self.source.clear_queue()

    async def wait_for_playout(self) -> PlaybackFinished:
        seg = self._seg
        if seg is None:
            return self._last or PlaybackFinished(0.0, False, self.clock.now())
        return await asyncio.shield(seg.done)

    async def aclose(self) -> None:
        if self._closed:
            return
        self.clear_buffer()
        self._closed = True
        try:
            await asyncio.wait_for(self.source.aclose(), 2.0)
        except Exception as exc:  # noqa: BLE001
            log.debug("closing the audio source: %s", exc)
