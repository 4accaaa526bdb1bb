"""Audio in: any rate / channel count / container -> 16 kHz mono float32, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streaming.audio_io import AudioInputError, AudioPolicy, load_audio, load_audio_array


def _peak_frequency(x: np.ndarray, rate: int) -> float:
    window = np.hanning(x.size)
    spectrum = np.abs(np.fft.rfft(x * window, n=8 * x.size))
    return float(np.argmax(spectrum) * rate / (8 * x.size))


def _sine(rate: int, freq: float, seconds: float, amplitude: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("layout", ["mono-wav16", "stereo-flac", "stereo-wavfloat"])
def test_sine_keeps_its_frequency(tmp_path, rate, layout):
    freq = {8000: 440.0, 16000: 1000.0, 22050: 3100.0, 44100: 5000.0, 48000: 7000.0}[rate]
    seconds = 1.25
    left = _sine(rate, freq, seconds)
    if layout.startswith("mono"):
        data, subtype, ext = left, "PCM_16", "wav"
    else:
        right = _sine(rate, freq, seconds, amplitude=0.25, phase=0.0)  # in phase: mean amplitude 0.375
        data = np.stack([left, right], axis=1)
        subtype, ext = ("PCM_24", "flac") if layout.endswith("flac") else ("FLOAT", "wav")
    path = tmp_path / f"sine_{rate}.{ext}"
    sf.write(path, data, rate, subtype=subtype)
    audio = load_audio(path)
    x = audio.samples
    assert x.dtype == np.float32 and x.ndim == 1 and audio.sample_rate == 16000
    assert abs(x.size - seconds * 16000) <= 2
    assert (audio.source_sample_rate, audio.source_channels) == (rate, 1 if layout.startswith("mono") else 2)
    assert abs(_peak_frequency(x, 16000) - freq) < 2.0
    expected_amplitude = 0.5 if layout.startswith("mono") else 0.375
    middle = x[2000:-2000]
    assert abs(np.abs(middle).max() - expected_amplitude) < 0.01
    assert abs(np.sqrt((middle ** 2).mean()) - expected_amplitude / np.sqrt(2)) < 0.01


def test_ogg_vorbis_reads(tmp_path):
    path = tmp_path / "tone.ogg"
    sf.write(path, _sine(44100, 660.0, 1.0), 44100, format="OGG", subtype="VORBIS")
    audio = load_audio(path)
    assert abs(_peak_frequency(audio.samples, 16000) - 660.0) < 3.0


def test_down_mix_is_the_channel_mean(tmp_path):
    rate = 16000
    left, right = _sine(rate, 300.0, 1.0), _sine(rate, 300.0, 1.0, phase=np.pi)  # opposite phase
    right = right * 0.5
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], 1), rate, subtype="FLOAT")
    x = load_audio(path).samples  # 16 kHz: no resampling, the mean exactly
    np.testing.assert_allclose(x, (left + right) / 2, atol=1e-7)


def test_arrays_int16_float_and_channels():
    rate = 22050
    sine = _sine(rate, 1000.0, 1.0)
    as_int16 = np.round(sine * 32767).astype(np.int16)
    a = load_audio_array(as_int16, rate)
    b = load_audio_array(np.stack([sine, sine], 1), rate)
    assert a.samples.dtype == np.float32 and abs(a.samples.size - 16000) <= 1
    np.testing.assert_allclose(a.samples, b.samples, atol=2e-4)
    c = load_audio_array(sine[::2].copy(), 11025)
    assert abs(_peak_frequency(c.samples, 16000) - 1000.0) < 2.0
    with pytest.raises(AudioInputError, match="<array>.*shaped"):
        load_audio_array(np.zeros((2, 3, 4), np.float32), 16000)
    with pytest.raises(AudioInputError, match="mic-1.*dtype"):
        load_audio_array(np.zeros(100, np.complex64), 16000, name="mic-1")


def test_16k_mono_is_passed_through_untouched(tmp_path):
    x = (0.1 * np.random.default_rng(4).standard_normal(8000)).astype(np.float32)
    path = tmp_path / "x.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    assert np.array_equal(load_audio(path).samples, x)


# ---- bad input -------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> Path:
    path = tmp_path / name
    sf.write(path, data, rate, subtype=subtype)
    return path


def test_empty_file(tmp_path):
    path = _write(tmp_path, "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(AudioInputError, match="empty.wav.*empty"):
        load_audio(path)


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_silent_file(tmp_path, subtype):
    path = _write(tmp_path, "silent.wav", np.zeros(16000, np.float32), subtype=subtype)
    with pytest.raises(AudioInputError, match="silent.wav.*silent"):
        load_audio(path)
    # dither-level noise (about 1 LSB of 16 bit) counts as silence too; the policy can accept it
    quiet = _write(tmp_path, "dither.wav", (3e-5 * np.sign(np.random.default_rng(0).standard_normal(16000))))
    with pytest.raises(AudioInputError, match="dither.wav"):
        load_audio(quiet)
    assert load_audio(quiet, AudioPolicy(silence_peak=None)).samples.size == 16000


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(tmp_path, bad):
    x = _sine(16000, 200.0, 0.5)
    x[1234] = bad
    path = _write(tmp_path, "broken.wav", x)
    with pytest.raises(AudioInputError, match=r"broken.wav: 1 NaN/Inf samples \(first at frame 1234"):
        load_audio(path)
    with pytest.raises(AudioInputError, match="NaN/Inf"):
        load_audio_array(x, 16000)


def test_over_long_input(tmp_path):
    path = _write(tmp_path, "long.wav", _sine(8000, 200.0, 3.0), rate=8000, subtype="PCM_16")
    with pytest.raises(AudioInputError, match="long.wav: 3.0 s is longer than the 2 s limit"):
        load_audio(path, AudioPolicy(max_seconds=2.0))
    assert load_audio(path).duration == pytest.approx(3.0, abs=1e-3)  # default limit: 10 minutes
    with pytest.raises(AudioInputError, match="longer"):
        load_audio_array(np.ones(16001, np.float32) * 0.1, 16000, AudioPolicy(max_seconds=1.0))


def test_clipped_float_file_policy(tmp_path):
    x = _sine(16000, 250.0, 1.0, amplitude=1.5)
    path = _write(tmp_path, "hot.wav", x)
    clipped = load_audio(path)
    assert clipped.clipped_samples == int((np.abs(x) > 1).sum()) > 0
    assert np.abs(clipped.samples).max() <= 1.0
    np.testing.assert_array_equal(clipped.samples, np.clip(x, -1, 1))
    with pytest.raises(AudioInputError, match="hot.wav.*outside \\[-1, 1\\]"):
        load_audio(path, AudioPolicy(out_of_range="error"))
    kept = load_audio(path, AudioPolicy(out_of_range="keep"))
    assert kept.clipped_samples == 0 and np.abs(kept.samples).max() > 1.4


def test_unreadable_and_missing_files(tmp_path):
    text = tmp_path / "notes.wav"
    text.write_text("definitely not RIFF")
    with pytest.raises(AudioInputError, match="notes.wav: not a readable audio file"):
        load_audio(text)
    with pytest.raises(AudioInputError, match="nothing.flac: no such file"):
        load_audio(tmp_path / "nothing.flac")
    with pytest.raises(AudioInputError, match="sample rate"):
        load_audio_array(np.ones(10, np.float32), 0)
