"""Call audio: G.711 and 16-bit linear PCM payloads <-> int16 samples, and 20 ms chunking.

The G.711 tables come from a maintained codec, not from this file: the `audioop` module (the standard library's
on Python < 3.13, the `audioop-lts` package, which installs the same module name, on 3.13 and later). Rate changes
(8 kHz <-> the session's 16 kHz) go through soxr (`streaming.frames.Resampler`), never sample repetition.

Encodings (the names used across this package):
    "mulaw"   G.711 mu-law, one byte per sample (Twilio's audio/x-mulaw, Telnyx PCMU)
    "alaw"    G.711 A-law, one byte per sample (Telnyx PCMA)
    "l16le"   16-bit signed little-endian PCM (Vonage's audio/l16 binary frames)
    "l16be"   16-bit signed big-endian PCM (an RTP L16 payload, network byte order: Telnyx L16)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

with warnings.catch_warnings():  # Python 3.11/3.12 warn that the stdlib module goes away in 3.13 (audioop-lts then)
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ENCODINGS = ("mulaw", "alaw", "l16le", "l16be")
CHUNK_S = 0.02  # every outgoing message carries 20 ms of audio; inbound frames are usually 20 ms too
MAX_CALL_RATE = 48000


class CodecError(ValueError):
    """A payload that cannot be decoded in the call's format (odd byte count for 16-bit PCM, empty)."""


@dataclass(frozen=True)
class AudioFormat:
    """A call's audio on the wire: encoding, sample rate, one channel (phone calls are mono)."""

    encoding: str
    sample_rate: int

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise CodecError(f"encoding {self.encoding!r} is not one of {ENCODINGS}")
        if not isinstance(self.sample_rate, int) or not 0 < self.sample_rate <= MAX_CALL_RATE:
            raise CodecError(f"sample rate {self.sample_rate!r} is not a positive int <= {MAX_CALL_RATE}")

    @property
    def bytes_per_sample(self) -> int:
        return 1 if self.encoding in ("mulaw", "alaw") else 2

    @property
    def chunk_samples(self) -> int:
        return round(self.sample_rate * CHUNK_S)

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_samples * self.bytes_per_sample


MULAW_8K = AudioFormat("mulaw", 8000)


def decode(payload: bytes, fmt: AudioFormat) -> np.ndarray:
    """Wire bytes -> int16 samples (mono)."""
    if not payload:
        raise CodecError("empty audio payload")
    if fmt.encoding == "mulaw":
        pcm = audioop.ulaw2lin(payload, 2)
    elif fmt.encoding == "alaw":
        pcm = audioop.alaw2lin(payload, 2)
    else:
        if len(payload) % 2:
            raise CodecError(f"{len(payload)} bytes is not a whole number of 16-bit samples")
        dtype = "<i2" if fmt.encoding == "l16le" else ">i2"
        return np.frombuffer(payload, dtype=dtype).astype(np.int16)
    return np.frombuffer(pcm, dtype=np.int16).copy()  # audioop returns native-endian samples


def encode(samples: np.ndarray, fmt: AudioFormat) -> bytes:
    """int16 samples (mono) -> wire bytes."""
    samples = np.asarray(samples, dtype=np.int16)
    if fmt.encoding == "l16le":
        return samples.astype("<i2").tobytes()
    if fmt.encoding == "l16be":
        return samples.astype(">i2").tobytes()
    native = samples.astype("=i2").tobytes()  # audioop works on native-endian fragments
    return audioop.lin2ulaw(native, 2) if fmt.encoding == "mulaw" else audioop.lin2alaw(native, 2)


def silence(fmt: AudioFormat, samples: int) -> bytes:
    return encode(np.zeros(samples, np.int16), fmt)
