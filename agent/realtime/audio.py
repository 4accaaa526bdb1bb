"""The audio boundary of the Realtime server: wire formats <-> the session's 16 kHz mono frames.

Wire formats (docs/realtime.md, Audio): `audio/pcm` is little-endian PCM16 mono at 24 kHz (the rate is fixed by the
protocol; another declared rate is honoured on input), `audio/pcmu` and `audio/pcma` are G.711 mu-law / A-law at
8 kHz. Inbound audio is decoded and resampled to 16 kHz with a streaming soxr resampler kept across appends (so
chunk boundaries leave no seams); outbound audio is resampled from the vocoder's 16 kHz per response and encoded.
`--input-rate 16000` overrides the rate of inbound `audio/pcm` (clients whose pipelines send 16 kHz audio labelled
as 24 kHz).

Input frames are stamped with their position in the session's audio stream (`t0` + samples appended so far), which
is what the protocol's `audio_start_ms` / `audio_end_ms` count, so bursts of audio faster than real time keep a
contiguous clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streaming.frames import AudioFrame, Resampler

PCM, PCMU, PCMA = "audio/pcm", "audio/pcmu", "audio/pcma"
FORMATS = (PCM, PCMU, PCMA)
PROTOCOL_PCM_RATE = 24000
G711_RATE = 8000
SESSION_RATE = 16000


# ---- G.711 (ITU-T G.711 segment tables, as in the public-domain Sun reference) --------------------------------
_ULAW_BIAS = 0x84


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = ((u & 0x0F) << 3) + _ULAW_BIAS
    t <<= (u & 0x70) >> 4
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


def _ulaw_encode(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int32) >> 2  # 14-bit
    mask = np.where(x < 0, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), 8159) + 0x21
    seg_end = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    seg = np.searchsorted(seg_end, x, side="left")
    uval = (np.minimum(seg, 7) << 4) | ((x >> (np.minimum(seg, 7) + 1)) & 0x0F)
    uval = np.where(seg >= 8, 0x7F, uval)
    return ((uval ^ mask) & 0xFF).astype(np.uint8)


def _alaw_encode(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.int32) >> 3  # 13-bit
    mask = np.where(x >= 0, 0xD5, 0x55)
    x = np.where(x >= 0, x, -x - 1)
    seg_end = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])
    seg = np.searchsorted(seg_end, x, side="left")
    shift = np.where(seg < 2, 1, seg)
    aval = (np.minimum(seg, 7) << 4) | ((x >> shift) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, aval)
    return ((aval ^ mask) & 0xFF).astype(np.uint8)


ULAW_TO_LINEAR = _ulaw_decode_table()
ALAW_TO_LINEAR = _alaw_decode_table()
_ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32)
LINEAR_TO_ULAW = _ulaw_encode(_ALL_INT16)  # indexed by sample + 32768
LINEAR_TO_ALAW = _alaw_encode(_ALL_INT16)


def ulaw_decode(data: bytes) -> np.ndarray:
    return ULAW_TO_LINEAR[np.frombuffer(data, np.uint8)]


def alaw_decode(data: bytes) -> np.ndarray:
    return ALAW_TO_LINEAR[np.frombuffer(data, np.uint8)]


def ulaw_encode(samples: np.ndarray) -> bytes:
    return LINEAR_TO_ULAW[samples.astype(np.int32) + 32768].tobytes()


def alaw_encode(samples: np.ndarray) -> bytes:
    return LINEAR_TO_ALAW[samples.astype(np.int32) + 32768].tobytes()


# ---- formats ----------------------------------------------------------------------------------------------------
class AudioFormatError(ValueError):
    """Audio bytes that do not fit their declared format."""


@dataclass(frozen=True)
class WireFormat:
    type: str = PCM
    rate: int = PROTOCOL_PCM_RATE  # audio/pcm only; G.711 is always 8 kHz

    def __post_init__(self) -> None:
        if self.type not in FORMATS:
            raise ValueError(f"audio format type: expected one of {FORMATS}, got {self.type!r}")
        if self.type == PCM and not (isinstance(self.rate, int) and 8000 <= self.rate <= 48000):
            raise ValueError(f"audio/pcm rate: expected an int in [8000, 48000], got {self.rate!r}")

    @property
    def sample_rate(self) -> int:
        return self.rate if self.type == PCM else G711_RATE

    def to_dict(self) -> dict:
        return {"type": self.type, "rate": self.rate} if self.type == PCM else {"type": self.type}

    def decode(self, data: bytes) -> np.ndarray:
        """Wire bytes -> int16 samples."""
        if self.type == PCMU:
            return ulaw_decode(data)
        if self.type == PCMA:
            return alaw_decode(data)
        if len(data) % 2:
            raise AudioFormatError(f"audio/pcm is 16-bit: {len(data)} bytes is not a whole number of samples")
        return np.frombuffer(data, "<i2").astype(np.int16)

    def encode(self, samples: np.ndarray) -> bytes:
        """int16 samples -> wire bytes."""
        if self.type == PCMU:
            return ulaw_encode(samples)
        if self.type == PCMA:
            return alaw_encode(samples)
        return np.ascontiguousarray(samples, "<i2").tobytes()


class InputConverter:
    """Inbound wire bytes -> 16 kHz frames stamped with their stream position (`t0` + seconds appended)."""

    def __init__(self, fmt: WireFormat, t0: float, rate_override: int | None = None):
        self.format = fmt
        self.in_rate = rate_override if (rate_override and fmt.type == PCM) else fmt.sample_rate
        self.t0 = t0
        self.seconds = 0.0  # audio appended so far (at the input rate)
        self._resampler = Resampler(SESSION_RATE, in_rate=self.in_rate)

    def push(self, data: bytes) -> list[AudioFrame]:
        samples = self.format.decode(data)
        if samples.shape[0] == 0:
            return []
        frame = AudioFrame(samples, self.in_rate, 1, self.t0 + self.seconds)
        self.seconds += samples.shape[0] / self.in_rate
        return self._resampler.push(frame)

    def flush(self) -> list[AudioFrame]:
        """What the resampler still holds (before a commit); the stream goes on after it."""
        return self._resampler.flush()


class OutputConverter:
    """The session's 16 kHz frames -> wire bytes, one resampler stream per response."""

    def __init__(self, fmt: WireFormat):
        self.format = fmt
        self._resampler = Resampler(fmt.sample_rate if fmt.type != PCM else PROTOCOL_PCM_RATE, in_rate=SESSION_RATE)

    @property
    def out_rate(self) -> int:
        return self._resampler.out_rate

    def push(self, frame: AudioFrame) -> bytes:
        return b"".join(self._encode(f) for f in self._resampler.push(frame))

    def flush(self) -> bytes:
        return b"".join(self._encode(f) for f in self._resampler.flush())

    def reset(self) -> None:
        self._resampler.reset()

    def _encode(self, frame: AudioFrame) -> bytes:
        return self.format.encode(frame.to_int16().to_mono().samples)
