"""Audio frames: the one PCM type every stage passes around.

What lives here:
- `AudioFrame`: int16 or float32 PCM with its sample rate, channel count and capture timestamp, plus conversions
  (float32, int16, mono, little-endian bytes, LiveKit frames) and `validate()`.
- `BadFrameError`: what every stage raises for a frame it cannot use (wrong dtype or width, NaN/Inf, zero length,
  channel mismatch, a sample-rate change mid-stream). It is raised *before* any state changes, so a caller can
  catch it for that one frame and keep feeding the stream.
- `FrameValidator`: checks each frame of one stream against the first good one (same rate and channels).
- `Rechunker`: any piece sizes in, frames of exactly N ms out, each stamped with the capture time of its first
  sample (taken from the piece that sample came from, so jitter and gaps in the input timestamps carry over).
- `Resampler`: streaming resampling through soxr (`soxr.ResampleStream`), timestamps mapped through the rate
  change; soxr removes its filter delay from the output, so output sample k lines up with input time k/out_rate.

Constructing an `AudioFrame` does not validate (a frame read off the wire must be representable so the stage that
receives it can report it); the stages validate every frame they take, and `AudioFrame.from_pcm` /
`AudioFrame.from_bytes` validate at construction.

soxr is imported inside `Resampler` only: modules the GPU machines import must not need it at import time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

INT16_SCALE = 32768.0  # int16 <-> float32: x_float = x_int / 32768, exact both ways for every int16 value
# float32 PCM lives in [-1, 1]; resampling may overshoot a little. Far beyond that means the producer passed
# int16-scaled values as float, which is a bad frame, not loud audio.
MAX_FLOAT_MAGNITUDE = 2.0
SUPPORTED_DTYPES = (np.dtype(np.int16), np.dtype(np.float32))
MAX_SAMPLE_RATE = 768_000
MAX_CHANNELS = 64


class BadFrameError(ValueError):
    """A frame a stage cannot use. `field`, `expected` and `got` say what was wrong; `timestamp` says which frame.

    Raised before the stage changes any state: catch it per frame and go on with the next one.
    """

    def __init__(
        self,
        problem: str,
        *,
        field: str | None = None,
        expected: Any = None,
        got: Any = None,
        timestamp: float | None = None,
    ) -> None:
        self.problem = problem
        self.field = field
        self.expected = expected
        self.got = got
        self.timestamp = timestamp
        where = f" at t={timestamp:.3f} s" if isinstance(timestamp, float) and math.isfinite(timestamp) else ""
        detail = ""
        if field is not None:
            detail = f" [{field}: expected {expected}, got {got}]"
        super().__init__(f"bad audio frame{where}: {problem}{detail}")


def _timestamp_of(frame: Any) -> float | None:
    ts = getattr(frame, "timestamp", None)
    try:
        return float(ts) if ts is not None else None
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class AudioFrame:
    """A short piece of PCM audio.

    `samples` is int16 or float32 (range [-1, 1]), shaped (n,) for mono or (n, channels) interleaved by row.
    `timestamp` is the capture (or playout) time of the first sample, in seconds on the producer's clock.
    """

    samples: np.ndarray
    sample_rate: int
    channels: int = 1
    timestamp: float = 0.0

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def end_time(self) -> float:
        """Timestamp just after the last sample (timestamp + duration)."""
        return self.timestamp + self.duration

    @property
    def dtype(self) -> np.dtype:
        return self.samples.dtype

    # ---- validated constructors ------------------------------------------------------------------------------
    @classmethod
    def from_pcm(
        cls, samples: np.ndarray, sample_rate: int, channels: int | None = None, timestamp: float = 0.0
    ) -> AudioFrame:
        """A validated frame from an int16/float32 array: (n,), (n, channels), or interleaved (n*channels,)."""
        if not isinstance(samples, np.ndarray):
            raise BadFrameError("samples must be a numpy array", field="samples", expected="numpy.ndarray",
                                got=type(samples).__name__, timestamp=timestamp)
        if channels is None:
            channels = 1 if samples.ndim == 1 else int(samples.shape[-1])
        if samples.ndim == 1 and channels > 1:
            if samples.shape[0] % channels:
                raise BadFrameError(
                    "interleaved sample count is not a multiple of the channel count", field="samples",
                    expected=f"a multiple of {channels}", got=samples.shape[0], timestamp=timestamp,
                )
            samples = samples.reshape(-1, channels)
        return cls(samples, int(sample_rate) if _is_integral(sample_rate) else sample_rate, channels,
                   timestamp).validate()

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, sample_rate: int, channels: int = 1, timestamp: float = 0.0,
        *, sample_width: int = 2,
    ) -> AudioFrame:
        """A validated frame from little-endian signed 16-bit interleaved PCM (what LiveKit, Vonage, WAV carry)."""
        if sample_width != 2:
            raise BadFrameError("only 16-bit PCM bytes are supported", field="sample_width",
                                expected=2, got=sample_width, timestamp=timestamp)
        data = bytes(data)
        if not isinstance(channels, int) or channels < 1:
            raise BadFrameError("channel count must be a positive int", field="channels",
                                expected=">= 1", got=channels, timestamp=timestamp)
        if len(data) % (2 * channels):
            raise BadFrameError(
                "byte length is not a whole number of 16-bit samples per channel", field="len(data)",
                expected=f"a multiple of {2 * channels}", got=len(data), timestamp=timestamp,
            )
        samples = np.frombuffer(data, dtype="<i2").astype(np.int16)
        if channels > 1:
            samples = samples.reshape(-1, channels)
        return cls(samples, sample_rate, channels, timestamp).validate()

    @classmethod
    def from_livekit(cls, frame: Any, timestamp: float = 0.0) -> AudioFrame:
        """From a `livekit.rtc.AudioFrame` (int16 interleaved; it carries no capture time, so pass one)."""
        return cls.from_bytes(bytes(frame.data), frame.sample_rate, frame.num_channels, timestamp)

    # ---- validation --------------------------------------------------------------------------------------------
    def validate(self) -> AudioFrame:
        """Return self if this is usable PCM, else raise `BadFrameError` naming the problem."""
        ts = _timestamp_of(self)
        if not isinstance(self.samples, np.ndarray):
            raise BadFrameError("samples must be a numpy array", field="samples", expected="numpy.ndarray",
                                got=type(self.samples).__name__, timestamp=ts)
        if self.samples.dtype not in SUPPORTED_DTYPES:
            raise BadFrameError("unsupported sample type (wrong dtype or sample width)", field="samples.dtype",
                                expected="int16 or float32", got=str(self.samples.dtype), timestamp=ts)
        if not _is_integral(self.sample_rate) or not 0 < self.sample_rate <= MAX_SAMPLE_RATE:
            raise BadFrameError("sample rate must be a positive whole number of Hz", field="sample_rate",
                                expected=f"1..{MAX_SAMPLE_RATE}", got=self.sample_rate, timestamp=ts)
        if not isinstance(self.channels, (int, np.integer)) or not 1 <= self.channels <= MAX_CHANNELS:
            raise BadFrameError("channel count must be a positive int", field="channels",
                                expected=f"1..{MAX_CHANNELS}", got=self.channels, timestamp=ts)
        if self.samples.ndim == 1:
            if self.channels != 1:
                raise BadFrameError("1-D samples are mono but the frame says otherwise", field="channels",
                                    expected=1, got=self.channels, timestamp=ts)
        elif self.samples.ndim == 2:
            if self.samples.shape[1] != self.channels:
                raise BadFrameError("samples shape does not match the channel count", field="samples.shape[1]",
                                    expected=self.channels, got=self.samples.shape[1], timestamp=ts)
        else:
            raise BadFrameError("samples must be (n,) or (n, channels)", field="samples.ndim",
                                expected="1 or 2", got=self.samples.ndim, timestamp=ts)
        if self.samples.shape[0] == 0:
            raise BadFrameError("frame has no samples", field="num_samples", expected="> 0", got=0, timestamp=ts)
        if ts is None or not math.isfinite(ts):
            raise BadFrameError("timestamp must be a finite number of seconds", field="timestamp",
                                expected="finite float", got=self.timestamp)
        if self.samples.dtype == np.float32:
            if not np.isfinite(self.samples).all():
                bad = int(np.count_nonzero(~np.isfinite(self.samples)))
                raise BadFrameError("samples contain NaN or Inf", field="non-finite samples", expected=0, got=bad,
                                    timestamp=ts)
            peak = float(np.max(np.abs(self.samples)))
            if peak > MAX_FLOAT_MAGNITUDE:
                raise BadFrameError(
                    "float32 samples far outside [-1, 1] (int16-scaled values passed as float?)",
                    field="max |sample|", expected=f"<= {MAX_FLOAT_MAGNITUDE}", got=round(peak, 3), timestamp=ts,
                )
        return self

    # ---- conversions (all return new frames; timestamps unchanged) -----------------------------------------------
    def with_samples(self, samples: np.ndarray, channels: int | None = None) -> AudioFrame:
        return AudioFrame(samples, self.sample_rate, self.channels if channels is None else channels, self.timestamp)

    def to_float32(self) -> AudioFrame:
        """float32 in [-1, 1] (int16 / 32768)."""
        if self.samples.dtype == np.float32:
            return self
        return self.with_samples(int16_to_float32(self.samples))

    def to_int16(self) -> AudioFrame:
        """int16 (float * 32768, rounded and clipped)."""
        if self.samples.dtype == np.int16:
            return self
        return self.with_samples(float32_to_int16(self.samples))

    def to_mono(self) -> AudioFrame:
        """Down-mix to one channel (the mean of the channels), keeping the dtype."""
        if self.channels == 1 and self.samples.ndim == 1:
            return self
        return self.with_samples(downmix(self.samples), channels=1)

    def to_float32_mono(self) -> AudioFrame:
        """float32 in [-1, 1], one channel: what the VAD and the unit extractor take."""
        return self.to_float32().to_mono()

    def to_bytes(self) -> bytes:
        """Little-endian int16, interleaved."""
        return np.ascontiguousarray(self.to_int16().samples, dtype="<i2").tobytes()

    def to_livekit(self) -> Any:
        """A `livekit.rtc.AudioFrame` (int16); imports livekit only when called."""
        from livekit import rtc

        return rtc.AudioFrame(self.to_bytes(), self.sample_rate, self.channels, self.num_samples)


def _is_integral(value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()


def int16_to_float32(samples: np.ndarray) -> np.ndarray:
    return samples.astype(np.float32) / np.float32(INT16_SCALE)


def float32_to_int16(samples: np.ndarray) -> np.ndarray:
    scaled = np.rint(np.asarray(samples, dtype=np.float32) * np.float32(INT16_SCALE))
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def downmix(samples: np.ndarray) -> np.ndarray:
    """(n, channels) -> (n,) as the mean of the channels; int16 stays int16 (rounded), float32 stays float32."""
    if samples.ndim == 1:
        return samples
    if samples.dtype == np.int16:
        return np.rint(samples.astype(np.float32).mean(axis=1)).astype(np.int16)
    return samples.mean(axis=1, dtype=np.float32).astype(np.float32)


def _convert_dtype(samples: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if samples.dtype == dtype:
        return samples
    return float32_to_int16(samples) if dtype == np.int16 else int16_to_float32(samples)


class FrameValidator:
    """Validates each frame of one stream: usable PCM, and the same sample rate and channel count as the first
    good frame (or as given). A mismatch raises `BadFrameError`; the stream's format is left as it was.

    With `max_backward_s`, the clock is checked too: a frame with the same timestamp as the previous good frame
    (a producer that leaves every timestamp at 0 would otherwise freeze the stream's clock) or one starting
    more than `max_backward_s` before the previous frame ended is rejected; small overlaps from jitter pass,
    and so does clock drift.
    """

    def __init__(self, sample_rate: int | None = None, channels: int | None = None,
                 max_backward_s: float | None = None) -> None:
        self._initial = (sample_rate, channels)
        self.sample_rate = sample_rate
        self.channels = channels
        self.max_backward_s = max_backward_s
        self._previous: tuple[float, float] | None = None  # (timestamp, end time) of the last good frame

    def check(self, frame: AudioFrame) -> AudioFrame:
        if not isinstance(frame, AudioFrame):
            raise BadFrameError("not an AudioFrame", field="type", expected="AudioFrame",
                                got=type(frame).__name__, timestamp=_timestamp_of(frame))
        frame.validate()
        if self.sample_rate is not None and frame.sample_rate != self.sample_rate:
            raise BadFrameError("sample rate changed mid-stream (call reset() for a new stream)",
                                field="sample_rate", expected=self.sample_rate, got=frame.sample_rate,
                                timestamp=frame.timestamp)
        if self.channels is not None and frame.channels != self.channels:
            raise BadFrameError("channel count changed mid-stream (call reset() for a new stream)",
                                field="channels", expected=self.channels, got=frame.channels,
                                timestamp=frame.timestamp)
        if self.max_backward_s is not None and self._previous is not None:
            previous_start, previous_end = self._previous
            if frame.timestamp == previous_start:
                raise BadFrameError("timestamp did not advance (a frozen clock?)", field="timestamp",
                                    expected=f"> {previous_start!r}", got=frame.timestamp,
                                    timestamp=frame.timestamp)
            if frame.timestamp < previous_end - self.max_backward_s:
                raise BadFrameError("timestamp went backwards (call reset() for a new stream)", field="timestamp",
                                    expected=f">= {previous_end - self.max_backward_s:.6f}", got=frame.timestamp,
                                    timestamp=frame.timestamp)
        self.sample_rate = int(frame.sample_rate)
        self.channels = int(frame.channels)
        self._previous = (frame.timestamp, frame.end_time)
        return frame

    def reset(self) -> None:
        self.sample_rate, self.channels = self._initial
        self._previous = None


class _TimeMap:
    """Maps a position in a stream's samples (counted from the stream start) to a capture time.

    Every input piece adds an anchor (its first sample's index, its timestamp); a position takes the time of the
    anchor at or before it plus the distance in samples. So jitter and gaps in the input's timestamps carry over
    exactly, and nothing drifts however the stream is cut.
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._anchors: deque[tuple[float, float]] = deque()  # (sample index, timestamp), increasing index

    def add(self, index: int, timestamp: float) -> None:
        self._anchors.append((float(index), float(timestamp)))

    def time_at(self, position: float) -> float:
        anchors = self._anchors
        # positions asked for only move forward: drop anchors that can no longer be needed
        while len(anchors) > 1 and anchors[1][0] <= position:
            anchors.popleft()
        index, ts = anchors[0]
        return ts + (position - index) / self.sample_rate


class Rechunker:
    """Cuts a stream into frames of exactly `frame_ms` (or `frame_samples`) per channel.

    `frame_samples`, when given, wins over `frame_ms`.
    `push` takes frames of any length and returns the complete frames now available; `flush` returns what is
    left (zero-padded to a full frame when `pad=True`). Samples are passed through untouched: concatenating the
    output gives the input. Each output frame's timestamp is the capture time of its first sample, taken from the
    input piece that sample came from. The output dtype is that of the first frame (later frames are converted).
    Raises `BadFrameError` (before touching its buffer) for a bad frame or a rate/channel change.
    """

    def __init__(self, frame_ms: float | None = 20, *, frame_samples: int | None = None) -> None:
        if frame_samples is not None:  # a fixed sample count wins over the duration
            if isinstance(frame_samples, bool) or not isinstance(frame_samples, int) or frame_samples <= 0:
                raise ValueError(f"Rechunker: frame_samples must be a positive int, got {frame_samples!r}")
            frame_ms = None
        elif frame_ms is None or isinstance(frame_ms, bool) or not frame_ms > 0:
            raise ValueError(f"Rechunker: frame_ms must be > 0 (or give frame_samples), got {frame_ms!r}")
        self.frame_ms = frame_ms
        self._fixed_samples = frame_samples
        self._validator = FrameValidator()
        self.reset()

    def reset(self) -> None:
        """Forget the stream (format, buffered samples, timestamps)."""
        self._validator.reset()
        self.frame_samples: int | None = self._fixed_samples
        self._dtype: np.dtype | None = None
        self._pending: list[np.ndarray] = []
        self._pending_count = 0
        self._consumed = 0  # samples already emitted since the stream start
        self._received = 0  # samples received since the stream start
        self._times: _TimeMap | None = None

    @property
    def pending_samples(self) -> int:
        return self._pending_count

    def _samples_per_frame(self, frame: AudioFrame) -> int:
        if self.frame_samples is not None:
            return self.frame_samples
        exact = frame.sample_rate * self.frame_ms / 1000.0
        if abs(exact - round(exact)) > 1e-6 or round(exact) < 1:
            raise BadFrameError(f"{self.frame_ms} ms is not a whole number of samples at this rate",
                                field="sample_rate", expected=f"a rate where {self.frame_ms} ms is whole samples",
                                got=frame.sample_rate, timestamp=frame.timestamp)
        return int(round(exact))

    def push(self, frame: AudioFrame) -> list[AudioFrame]:
        frame = self._validator.check(frame)
        size = self._samples_per_frame(frame)
        if self._times is None:
            self.frame_samples = size
            self._dtype = frame.samples.dtype
            self._times = _TimeMap(frame.sample_rate)
        self._times.add(self._received, frame.timestamp)
        self._received += frame.num_samples
        self._pending.append(_convert_dtype(frame.samples, self._dtype))
        self._pending_count += frame.num_samples
        if self._pending_count < size:
            return []
        buffer = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        count = self._pending_count // size
        out = [self._emit(buffer[i * size:(i + 1) * size], frame) for i in range(count)]
        rest = buffer[count * size:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_count = int(rest.shape[0])
        return out

    def _emit(self, samples: np.ndarray, like: AudioFrame) -> AudioFrame:
        ts = self._times.time_at(self._consumed)
        self._consumed += samples.shape[0]
        return AudioFrame(samples.copy(), like.sample_rate, like.channels, ts)

    def flush(self, pad: bool = False) -> list[AudioFrame]:
        """The partial frame left at the end of the stream (zero-padded to full size if `pad`), then reset."""
        out: list[AudioFrame] = []
        if self._pending_count:
            rest = np.concatenate(self._pending)
            if pad and rest.shape[0] < self.frame_samples:
                shape = (self.frame_samples - rest.shape[0],) + rest.shape[1:]
                rest = np.concatenate([rest, np.zeros(shape, dtype=rest.dtype)])
            ts = self._times.time_at(self._consumed)
            out.append(AudioFrame(rest, self._validator.sample_rate, self._validator.channels, ts))
        self.reset()
        return out


RESAMPLER_QUALITIES = ("QQ", "LQ", "MQ", "HQ", "VHQ")


class Resampler:
    """Streaming resampler on soxr (`soxr.ResampleStream`) with timestamps carried through.

    `push(frame)` returns a list with zero or one frame (soxr holds back a few ms while its filter fills);
    `flush()` returns the rest at the end of the stream. The input rate and channel count come from the first
    frame (or `in_rate`); channels are kept; the output dtype is the input's.

    Timing: soxr strips its own filter delay, so output sample k corresponds to input position
    k * in_rate / out_rate from the stream start; each output frame is stamped with the capture time of that
    position (through the input frames' own timestamps). The delay shows up only as latency: `latency_s` is how
    much input audio is inside soxr and not yet out (about 20 ms for 48 -> 16 kHz at HQ, 60 ms for 8 -> 16 kHz).
    Equal rates pass frames through unchanged (still validated).
    """

    def __init__(self, out_rate: int, *, in_rate: int | None = None, quality: str = "HQ") -> None:
        if not _is_integral(out_rate) or out_rate <= 0:
            raise ValueError(f"Resampler: out_rate must be a positive int, got {out_rate!r}")
        if quality not in RESAMPLER_QUALITIES:
            raise ValueError(f"Resampler: quality must be one of {RESAMPLER_QUALITIES}, got {quality!r}")
        self.out_rate = int(out_rate)
        self.quality = quality
        self._validator = FrameValidator(sample_rate=in_rate)
        self.reset()

    def reset(self) -> None:
        self._validator.reset()
        self._stream = None
        self._times: _TimeMap | None = None
        self._dtype: np.dtype | None = None
        self._empty: np.ndarray | None = None  # a zero-length input of the stream's shape, for flush
        self._received = 0
        self._emitted = 0

    @property
    def in_rate(self) -> int | None:
        return self._validator.sample_rate

    @property
    def latency_s(self) -> float:
        """Input audio held inside the resampler (seconds)."""
        if self._stream is None:
            return 0.0
        return self._received / self.in_rate - self._emitted / self.out_rate

    def push(self, frame: AudioFrame) -> list[AudioFrame]:
        frame = self._validator.check(frame)
        if frame.sample_rate == self.out_rate:
            return [frame]
        if self._stream is None:
            import soxr  # lazy: not on the GPU machines

            self._stream = soxr.ResampleStream(frame.sample_rate, self.out_rate, frame.channels,
                                               dtype="float32", quality=self.quality)
            self._times = _TimeMap(frame.sample_rate)
            self._dtype = frame.samples.dtype
            self._empty = np.zeros((0,) + frame.samples.shape[1:], np.float32)
        self._times.add(self._received, frame.timestamp)
        self._received += frame.num_samples
        out = self._stream.resample_chunk(np.ascontiguousarray(frame.to_float32().samples))
        return self._emit(out, frame.channels)

    def flush(self) -> list[AudioFrame]:
        """Everything soxr still holds (end of stream), then reset for a new stream."""
        out: list[AudioFrame] = []
        if self._stream is not None:
            out = self._emit(self._stream.resample_chunk(self._empty, last=True), self._validator.channels)
        self.reset()
        return out

    def _emit(self, samples: np.ndarray, channels: int) -> list[AudioFrame]:
        if samples.shape[0] == 0:
            return []
        position = self._emitted * self.in_rate / self.out_rate  # input samples since the stream start
        ts = self._times.time_at(position)
        self._emitted += samples.shape[0]
        samples = samples.astype(np.float32, copy=False)
        return [AudioFrame(_convert_dtype(samples, self._dtype), self.out_rate, channels, ts)]
