"""Audio frames: validation, conversions, the rechunker and the streaming resampler."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from streaming.frames import (
    AudioFrame,
    BadFrameError,
    FrameValidator,
    Rechunker,
    Resampler,
    downmix,
    float32_to_int16,
    int16_to_float32,
)

RATES = [8000, 16000, 22050, 24000, 44100, 48000]


def rng_for(*key: object) -> np.random.Generator:
    """A fresh generator per test and parameter case, stable across runs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def random_pcm(rng: np.random.Generator, n: int, channels: int, dtype: str) -> np.ndarray:
    x = rng.uniform(-0.9, 0.9, size=(n, channels) if channels > 1 else (n,)).astype(np.float32)
    return float32_to_int16(x) if dtype == "int16" else x


def split_random(rng: np.random.Generator, total: int, max_piece: int) -> list[tuple[int, int]]:
    cuts, i = [], 0
    while i < total:
        n = int(rng.integers(1, max_piece + 1))
        cuts.append((i, min(total, i + n)))
        i += n
    return cuts


# ---- AudioFrame validation ------------------------------------------------------------------------------------
GOOD = np.zeros(160, np.int16)


@pytest.mark.parametrize(
    "frame, field",
    [
        (AudioFrame(np.zeros(160, np.float64), 16000), "samples.dtype"),
        (AudioFrame(np.zeros(160, np.int32), 16000), "samples.dtype"),
        (AudioFrame(np.zeros(160, np.int8), 16000), "samples.dtype"),
        (AudioFrame(np.full(160, np.nan, np.float32), 16000), "non-finite samples"),
        (AudioFrame(np.array([0.0, np.inf] * 80, np.float32), 16000), "non-finite samples"),
        (AudioFrame(np.zeros(0, np.int16), 16000), "num_samples"),
        (AudioFrame(np.zeros((160, 2), np.int16), 16000, channels=1), "samples.shape[1]"),
        (AudioFrame(np.zeros(160, np.int16), 16000, channels=2), "channels"),
        (AudioFrame(np.zeros((160, 2, 1), np.int16), 16000, channels=2), "samples.ndim"),
        (AudioFrame(np.full(160, 1000.0, np.float32), 16000), "max |sample|"),
        (AudioFrame(GOOD, 0), "sample_rate"),
        (AudioFrame(GOOD, 16000.5), "sample_rate"),
        (AudioFrame(GOOD, 16000, channels=0), "channels"),
        (AudioFrame(GOOD, 16000, timestamp=float("nan")), "timestamp"),
        (AudioFrame([0] * 160, 16000), "samples"),
    ],
)
def test_bad_frames_raise_with_what_was_expected(frame, field):
    with pytest.raises(BadFrameError) as info:
        frame.validate()
    err = info.value
    assert err.field == field
    assert "expected" in str(err) and "got" in str(err)
    assert isinstance(err, ValueError)  # callers catching ValueError keep working


def test_good_frames_validate():
    for samples, channels in [(np.zeros(160, np.int16), 1), (np.zeros((160, 2), np.float32), 2),
                              (np.zeros((160, 1), np.float32), 1)]:
        frame = AudioFrame(samples, 16000, channels, 12.5)
        assert frame.validate() is frame


def test_from_bytes_checks_width_and_round_trips():
    rng = rng_for("bytes")
    pcm = random_pcm(rng, 480, 2, "int16")
    frame = AudioFrame.from_bytes(pcm.astype("<i2").tobytes(), 48000, channels=2, timestamp=3.0)
    assert frame.samples.shape == (480, 2) and frame.samples.dtype == np.int16
    np.testing.assert_array_equal(frame.samples, pcm)
    assert frame.to_bytes() == pcm.astype("<i2").tobytes()
    with pytest.raises(BadFrameError) as info:
        AudioFrame.from_bytes(b"\x00" * 7, 16000)
    assert info.value.field == "len(data)"
    with pytest.raises(BadFrameError) as info:
        AudioFrame.from_bytes(b"\x00" * 6, 16000, channels=2)  # 3 samples cannot be split in 2 channels
    assert info.value.field == "len(data)"
    with pytest.raises(BadFrameError) as info:
        AudioFrame.from_bytes(b"\x00" * 12, 16000, sample_width=3)
    assert info.value.field == "sample_width"
    with pytest.raises(BadFrameError):
        AudioFrame.from_bytes(b"", 16000)


def test_from_pcm_interleaved_and_shape():
    interleaved = np.arange(20, dtype=np.int16)
    frame = AudioFrame.from_pcm(interleaved, 8000, channels=2)
    assert frame.samples.shape == (10, 2) and frame.channels == 2
    np.testing.assert_array_equal(frame.samples[:, 1], np.arange(1, 20, 2))
    assert AudioFrame.from_pcm(np.zeros((10, 3), np.float32), 8000).channels == 3
    with pytest.raises(BadFrameError):
        AudioFrame.from_pcm(np.zeros(21, np.int16), 8000, channels=2)
    with pytest.raises(BadFrameError):
        AudioFrame.from_pcm(np.zeros(20, np.float64), 8000)


def test_conversions():
    every_int16 = np.arange(-32768, 32768, dtype=np.int16)
    as_float = int16_to_float32(every_int16)
    assert as_float.dtype == np.float32 and as_float.min() == -1.0 and as_float.max() < 1.0
    np.testing.assert_array_equal(float32_to_int16(as_float), every_int16)  # exact round trip
    np.testing.assert_array_equal(float32_to_int16(np.array([1.5, -1.5, 0.5], np.float32)),
                                  np.array([32767, -32768, 16384], np.int16))  # clipped, rounded

    rng = rng_for("conversions")
    stereo = random_pcm(rng, 441, 2, "float32")
    frame = AudioFrame(stereo, 44100, 2, 7.25)
    mono = frame.to_mono()
    assert mono.channels == 1 and mono.samples.shape == (441,) and mono.timestamp == 7.25
    np.testing.assert_allclose(mono.samples, stereo.mean(axis=1), atol=1e-7)
    stereo16 = float32_to_int16(stereo)
    fm = AudioFrame(stereo16, 44100, 2).to_float32_mono()
    assert fm.samples.dtype == np.float32 and fm.channels == 1
    np.testing.assert_allclose(fm.samples, stereo16.astype(np.float64).mean(axis=1) / 32768, atol=1e-6)
    assert downmix(stereo16).dtype == np.int16
    assert frame.to_int16().to_float32().samples.dtype == np.float32
    assert frame.duration == pytest.approx(0.01) and frame.end_time == pytest.approx(7.26)


def test_livekit_frame_round_trip():
    pytest.importorskip("livekit.rtc")
    rng = rng_for("livekit")
    frame = AudioFrame(random_pcm(rng, 480, 2, "int16"), 48000, 2, 1.5)
    lk = frame.to_livekit()
    assert lk.sample_rate == 48000 and lk.num_channels == 2 and lk.samples_per_channel == 480
    back = AudioFrame.from_livekit(lk, timestamp=1.5)
    np.testing.assert_array_equal(back.samples, frame.samples)


def test_validator_rejects_format_changes_and_keeps_the_stream():
    validator = FrameValidator()
    validator.check(AudioFrame(GOOD, 16000))
    with pytest.raises(BadFrameError) as info:
        validator.check(AudioFrame(np.zeros(480, np.int16), 48000, timestamp=0.01))
    assert (info.value.field, info.value.expected, info.value.got) == ("sample_rate", 16000, 48000)
    with pytest.raises(BadFrameError) as info:
        validator.check(AudioFrame(np.zeros((160, 2), np.int16), 16000, 2))
    assert info.value.field == "channels"
    validator.check(AudioFrame(GOOD, 16000))  # the stream goes on
    with pytest.raises(BadFrameError):
        validator.check("not a frame")
    validator.reset()
    validator.check(AudioFrame(np.zeros(480, np.int16), 48000))  # a new stream may have a new rate

    clocked = FrameValidator(max_backward_s=0.005)
    clocked.check(AudioFrame(GOOD, 16000, 1, 1.0))
    clocked.check(AudioFrame(GOOD, 16000, 1, 1.006))  # 4 ms overlap: jitter
    with pytest.raises(BadFrameError) as info:
        clocked.check(AudioFrame(GOOD, 16000, 1, 1.0))
    assert info.value.field == "timestamp"
    with pytest.raises(BadFrameError) as info:
        clocked.check(AudioFrame(GOOD, 16000, 1, 1.006))  # same timestamp again: frozen clock
    assert "did not advance" in str(info.value)
    clocked.check(AudioFrame(GOOD, 16000, 1, 1.016))


# ---- Rechunker ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate, frame_ms", [(r, ms) for r in RATES for ms in (10, 20, 30) if r * ms % 1000 == 0])
@pytest.mark.parametrize("channels, dtype", [(1, "int16"), (2, "float32")])
def test_rechunker_conserves_samples_and_timestamps(rate, frame_ms, channels, dtype):
    rng = rng_for("rechunk", rate, frame_ms, channels, dtype)
    total = int(rate * 0.37) + int(rng.integers(0, 100))
    pcm = random_pcm(rng, total, channels, dtype)
    base = float(rng.uniform(0, 1000))
    chunker = Rechunker(frame_ms)
    size = rate * frame_ms // 1000
    out = []
    for a, b in split_random(rng, total, max_piece=int(rate * 0.045)):
        out += chunker.push(AudioFrame(pcm[a:b], rate, channels, base + a / rate))
    tail = chunker.flush()
    assert all(f.num_samples == size for f in out)
    assert len(tail) == (1 if total % size else 0)
    joined = np.concatenate([f.samples for f in out + tail])
    np.testing.assert_array_equal(joined, pcm)  # every sample, in order, untouched
    for k, f in enumerate(out + tail):
        assert f.timestamp == pytest.approx(base + k * size / rate, abs=1e-9)
        assert f.sample_rate == rate and f.channels == channels and f.samples.dtype == np.dtype(dtype)


def test_rechunker_takes_each_sample_time_from_its_own_piece():
    """Jittered and gapped input timestamps: a frame's time is that of the piece holding its first sample."""
    rng = rng_for("jitter")
    rate, size = 16000, 320
    pieces, t, truth = [], 50.0, []  # truth: capture time of every input sample
    for _ in range(60):
        n = int(rng.integers(1, 700))
        pieces.append(AudioFrame(random_pcm(rng, n, 1, "int16"), rate, 1, t))
        truth.extend(t + np.arange(n) / rate)
        t += n / rate + float(rng.choice([0.0, 0.0, 0.003, -0.001, 0.25]))  # jitter and a few gaps
    chunker = Rechunker(frame_samples=size)
    out = [f for p in pieces for f in chunker.push(p)]
    assert len(out) == len(truth) // size
    for k, f in enumerate(out):
        assert f.timestamp == pytest.approx(truth[k * size], abs=1e-9)


def test_rechunker_bad_frame_does_not_disturb_the_stream():
    rng = rng_for("rechunk-bad")
    pcm = random_pcm(rng, 1600, 1, "int16")
    clean, dirty = Rechunker(10), Rechunker(10)
    want = [f for i in range(0, 1600, 70) for f in clean.push(AudioFrame(pcm[i:i + 70], 16000, 1, i / 16000))]
    got, errors = [], []
    bad = [AudioFrame(np.zeros(70, np.float64), 16000), AudioFrame(np.zeros(0, np.int16), 16000),
           AudioFrame(np.zeros(210, np.int16), 48000), AudioFrame(np.full(70, np.nan, np.float32), 16000),
           AudioFrame(np.zeros((70, 2), np.int16), 16000, 2)]
    for k, i in enumerate(range(0, 1600, 70)):
        try:
            got += dirty.push(bad[k % len(bad)])
        except BadFrameError as err:
            errors.append(err)
        got += dirty.push(AudioFrame(pcm[i:i + 70], 16000, 1, i / 16000))
    assert len(errors) == len(range(0, 1600, 70))
    assert [f.timestamp for f in got] == [f.timestamp for f in want]
    np.testing.assert_array_equal(np.concatenate([f.samples for f in got]),
                                  np.concatenate([f.samples for f in want]))


def test_rechunker_rejects_rates_without_whole_frames_and_pads_on_request():
    with pytest.raises(BadFrameError) as info:
        Rechunker(10).push(AudioFrame(np.zeros(100, np.int16), 11025))
    assert info.value.field == "sample_rate"
    chunker = Rechunker(20)
    assert chunker.push(AudioFrame(np.ones(100, np.int16), 16000, 1, 2.0)) == []
    (tail,) = chunker.flush(pad=True)
    assert tail.num_samples == 320 and tail.timestamp == 2.0 and tail.samples[100:].sum() == 0
    with pytest.raises(ValueError):
        Rechunker(None)


# ---- Resampler ---------------------------------------------------------------------------------------------------
def sine_frequency(x: np.ndarray, rate: int) -> float:
    """Frequency of the strongest component, refined by parabolic interpolation of the windowed spectrum."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=8 * len(x)))
    k = int(np.argmax(spectrum))
    a, b, c = np.log(spectrum[k - 1:k + 2] + 1e-30)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * rate / (8 * len(x))


def resample_stream(frames: list[AudioFrame], out_rate: int, quality: str = "HQ") -> list[AudioFrame]:
    resampler = Resampler(out_rate, quality=quality)
    out = [g for f in frames for g in resampler.push(f)]
    return out + resampler.flush()


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])
def test_resampler_round_trip_keeps_frequency_phase_and_timestamps(rate):
    rng = rng_for("resample", rate)
    freq = float(rng.uniform(300, 3000))
    phase = float(rng.uniform(0, 2 * math.pi))
    base = float(rng.uniform(0, 100))
    n = int(rate * 0.6)
    x = (0.5 * np.sin(2 * math.pi * freq * np.arange(n) / rate + phase)).astype(np.float32)
    pieces = [AudioFrame(x[a:b], rate, 1, base + a / rate) for a, b in split_random(rng, n, int(rate * 0.03))]
    down = resample_stream(pieces, 16000)
    up = resample_stream(down, rate)
    for frames, fr in ((down, 16000), (up, rate)):
        total = sum(f.num_samples for f in frames)
        assert abs(total - n * fr / rate) <= 1
        # timestamps continue exactly where the previous frame ended
        for prev, cur in zip(frames, frames[1:]):
            assert cur.timestamp == pytest.approx(prev.end_time, abs=1e-6)
        assert frames[0].timestamp == pytest.approx(base, abs=1e-9)
        y = np.concatenate([f.samples for f in frames])
        # the delay is accounted for: each output sample matches the sine at its own timestamp
        t = frames[0].timestamp - base + np.arange(len(y)) / fr
        expected = 0.5 * np.sin(2 * math.pi * freq * t + phase)
        middle = slice(int(0.05 * fr), len(y) - int(0.05 * fr))
        assert np.max(np.abs(y[middle] - expected[middle])) < 0.01
        assert sine_frequency(y[middle], fr) == pytest.approx(freq, rel=2e-3)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resampler_equals_one_shot_soxr(rate):
    soxr = pytest.importorskip("soxr")
    rng = rng_for("oneshot", rate)
    x = (rng.standard_normal(rate // 2) * 0.1).astype(np.float32)
    pieces = [AudioFrame(x[a:b], rate, 1, a / rate) for a, b in split_random(rng, len(x), rate // 25)]
    y = np.concatenate([f.samples for f in resample_stream(pieces, 16000)])
    np.testing.assert_allclose(y, soxr.resample(x, rate, 16000, quality="HQ"), atol=1e-6)


def test_resampler_keeps_channels_dtype_and_maps_gapped_timestamps():
    rng = rng_for("resample-stereo")
    rate = 48000
    stereo = random_pcm(rng, 4800, 2, "int16")
    # two bursts 1 s apart in capture time: output frames after the gap carry the later clock
    first = [AudioFrame(stereo[i:i + 480], rate, 2, 10.0 + i / rate) for i in range(0, 2400, 480)]
    second = [AudioFrame(stereo[i:i + 480], rate, 2, 11.0 + (i - 2400) / rate) for i in range(2400, 4800, 480)]
    out = resample_stream(first + second, 16000)
    assert all(f.channels == 2 and f.samples.shape[1] == 2 and f.samples.dtype == np.int16 for f in out)
    assert sum(f.num_samples for f in out) == 1600
    start_out = 0
    for f in out:
        start_in = start_out * 3  # input sample index of its first sample (48 kHz -> 16 kHz)
        start_out += f.num_samples
        expected = 10.0 + start_in / rate if start_in < 2400 else 11.0 + (start_in - 2400) / rate
        assert f.timestamp == pytest.approx(expected, abs=1e-9)


def test_resampler_latency_and_passthrough():
    resampler = Resampler(16000)
    frame = AudioFrame(np.zeros(160, np.int16), 16000, 1, 4.0)
    assert resampler.push(frame) == [frame]
    with pytest.raises(BadFrameError):
        resampler.push(AudioFrame(np.zeros(480, np.int16), 48000))
    down = Resampler(16000)
    for i in range(10):
        down.push(AudioFrame(np.zeros(80, np.float32), 8000, 1, i * 0.01))
    assert 0.0 <= down.latency_s <= 0.2
    with pytest.raises(ValueError):
        Resampler(16000, quality="best")
