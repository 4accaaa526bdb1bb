"""Audio in for the unit extractor: any file soundfile reads (WAV/FLAC/OGG...), any rate and channel count ->
16 kHz mono float32.

Policy (decided here, applied identically to files and arrays):
  * integer PCM is scaled to [-1, 1) the way soundfile/torchaudio do (int16 / 32768);
  * empty input -> `AudioInputError`;
  * NaN or Inf samples -> `AudioInputError` (count and first position named);
  * float samples outside [-1, 1] (a float file that clipped) -> clipped to [-1, 1] by default and counted in
    `LoadedAudio.clipped_samples` (`AudioPolicy.out_of_range="error"` refuses instead, "keep" passes them through);
    resampling may still overshoot slightly, as torchaudio's resampler does in the official pipeline;
  * longer than `AudioPolicy.max_seconds` (default 600 s = 10 minutes) -> `AudioInputError`, checked from the
    header before the samples are read;
  * silent (peak at or below `AudioPolicy.silence_peak`, default 1e-4 = -80 dBFS: digital silence or dither only)
    -> `AudioInputError`, since it can carry no speech (`silence_peak=None` accepts it);
  * channels are down-mixed by their mean (fairseq's reader does; the official SpeechGPT script does not), then
    resampled with soxr (VHQ) to 16 kHz. The official pipeline uses torchaudio's sinc resampler: units of
    resampled audio can differ from it in a few frames; 16 kHz input is passed through untouched.

soundfile and soxr are imported inside the functions (the GPU machines do not have them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

TARGET_RATE = 16000
DEFAULT_MAX_SECONDS = 600.0


class AudioInputError(ValueError):
    """Unusable audio input; the message names the file (or array) and the problem."""


@dataclass(frozen=True)
class AudioPolicy:
    max_seconds: float = DEFAULT_MAX_SECONDS
    silence_peak: float | None = 1e-4
    out_of_range: Literal["clip", "error", "keep"] = "clip"
    resample_quality: str = "VHQ"  # soxr quality recipe


@dataclass(frozen=True)
class LoadedAudio:
    samples: np.ndarray  # float32 [n], 16 kHz mono
    source: str
    source_sample_rate: int
    source_channels: int
    source_frames: int
    clipped_samples: int = 0
    sample_rate: int = TARGET_RATE

    @property
    def duration(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def _as_float_frames(samples: np.ndarray, name: str) -> np.ndarray:
    """[n] or [n, channels] of any numeric dtype -> float32 [n, channels] in the soundfile scale."""
    a = np.asarray(samples)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise AudioInputError(f"{name}: expected samples shaped [n] or [n, channels], got {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype == np.int32:
        return (a.astype(np.float64) / 2147483648.0).astype(np.float32)
    if a.dtype == np.uint8:  # 8-bit WAV convention: unsigned, centred on 128
        return (a.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32, copy=False)
    raise AudioInputError(f"{name}: unsupported sample dtype {a.dtype} (int16, int32, uint8 or float expected)")


def _to_16k_mono(frames: np.ndarray, sample_rate: int, name: str, policy: AudioPolicy,
                 source_frames: int | None = None) -> LoadedAudio:
    if sample_rate <= 0:
        raise AudioInputError(f"{name}: invalid sample rate {sample_rate}")
    n, channels = frames.shape
    if n == 0 or channels == 0:
        raise AudioInputError(f"{name}: empty audio (0 samples)")
    if n / sample_rate > policy.max_seconds:
        raise AudioInputError(f"{name}: {n / sample_rate:.1f} s is longer than the {policy.max_seconds:.0f} s limit")
    finite = np.isfinite(frames)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise AudioInputError(f"{name}: {bad.shape[0]} NaN/Inf samples (first at frame {int(bad[0][0])}, "
                              f"channel {int(bad[0][1])})")
    clipped = 0
    peak = float(np.abs(frames).max())
    if peak > 1.0:
        over = np.abs(frames) > 1.0
        if policy.out_of_range == "error":
            raise AudioInputError(f"{name}: {int(over.sum())} samples outside [-1, 1] (peak {peak:.3f})")
        if policy.out_of_range == "clip":
            clipped = int(over.sum())
            frames = np.clip(frames, -1.0, 1.0)
    mono = frames.mean(axis=1, dtype=np.float32) if channels > 1 else frames[:, 0]
    if policy.silence_peak is not None and float(np.abs(mono).max()) <= policy.silence_peak:
        raise AudioInputError(f"{name}: silent audio (peak {float(np.abs(mono).max()):.2e} <= "
                              f"{policy.silence_peak:.0e}); no speech to encode")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if sample_rate != TARGET_RATE:
        import soxr

        mono = soxr.resample(mono, sample_rate, TARGET_RATE, quality=policy.resample_quality).astype(np.float32)
    return LoadedAudio(mono, name, int(sample_rate), int(channels), int(source_frames or n), clipped)


def load_audio(path: str | Path, policy: AudioPolicy = AudioPolicy()) -> LoadedAudio:
    """Read an audio file and return 16 kHz mono float32 (see the module docstring for the policy)."""
    import soundfile as sf

    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise AudioInputError(f"{name}: no such file")
    try:
        info = sf.info(name)
    except Exception as exc:  # libsndfile: unknown format, truncated header...
        raise AudioInputError(f"{name}: not a readable audio file ({exc})") from exc
    if info.samplerate > 0 and info.frames / info.samplerate > policy.max_seconds:
        raise AudioInputError(f"{name}: {info.frames / info.samplerate:.1f} s is longer than the "
                              f"{policy.max_seconds:.0f} s limit")
    try:
        data, rate = sf.read(name, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioInputError(f"{name}: could not decode audio ({exc})") from exc
    return _to_16k_mono(data, int(rate), name, policy, source_frames=data.shape[0])


def load_audio_array(samples: np.ndarray, sample_rate: int, policy: AudioPolicy = AudioPolicy(),
                     name: str = "<array>") -> LoadedAudio:
    """Same as `load_audio` for samples already in memory ([n] or [n, channels]; float, int16, int32, uint8)."""
    return _to_16k_mono(_as_float_frames(samples, name), int(sample_rate), name, policy)
