"""VAD turn detector on real speech (espeak-ng fixtures with known boundaries, see tests/fixtures/speech)."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from streaming.frames import AudioFrame, BadFrameError, Resampler, float32_to_int16
from streaming.vad import (
    FrameRejected,
    Interruption,
    SilenceContext,
    SpeechAudio,
    SpeechEnded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    VadConfig,
    VadDetector,
    vad_cost_per_frame,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "speech"
LABELS = json.loads((FIXTURES / "labels.json").read_text())
TOLERANCE_S = 0.060
SPEECH_FILES = [name for name, lab in LABELS["files"].items() if lab["turns"]]
SINGLE_TURN_FILES = [name for name in SPEECH_FILES if len(LABELS["files"][name]["turns"]) == 1]


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def load(name: str) -> tuple[np.ndarray, int, list[list[float]]]:
    import soundfile as sf

    if name in LABELS["files"]:
        path, label = FIXTURES / name, LABELS["files"][name]
    else:
        path, label = REPO / name, LABELS["assets"][name]
    audio, rate = sf.read(path, dtype="int16")
    assert rate == label["sample_rate"] == 16000 and audio.ndim == 1
    return audio, rate, label["turns"]


def pieces_of(total: int, rate: int, piece: float | str, rng: np.random.Generator | None = None):
    """(start, end) sample ranges: fixed `piece` seconds, or "random" sizes from 1 sample to 45 ms."""
    if piece == "random":
        out, i = [], 0
        while i < total:
            n = int(rng.integers(1, int(0.045 * rate) + 1))
            out.append((i, min(total, i + n)))
            i += n
        return out
    step = max(1, round(piece * rate))
    return [(i, min(total, i + step)) for i in range(0, total, step)]


def run(detector: VadDetector, audio: np.ndarray, rate: int, *, piece: float | str = 0.02, base: float = 0.0,
        rng: np.random.Generator | None = None, before_piece=None, flush: bool = True) -> list:
    channels = 1 if audio.ndim == 1 else audio.shape[1]
    events = []
    for a, b in pieces_of(len(audio), rate, piece, rng):
        if before_piece is not None:
            before_piece(detector, a / rate)
        events += detector.push(AudioFrame(audio[a:b], rate, channels, base + a / rate))
    if flush:
        events += detector.flush()
    return events


def turns_of(events: list) -> list[tuple[SpeechStarted, SpeechEnded]]:
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(starts) == len(ends), "every SpeechStarted must be closed by a SpeechEnded"
    return list(zip(starts, ends))


def assert_turns_match(events: list, labels: list[list[float]], base: float = 0.0) -> None:
    turns = turns_of(events)
    assert len(turns) == len(labels), [(s.onset, e.offset) for s, e in turns]
    for (start, end), (onset, offset) in zip(turns, labels):
        assert abs(start.onset - (base + onset)) <= TOLERANCE_S, ("onset", start.onset - base, onset)
        assert abs(end.offset - (base + offset)) <= TOLERANCE_S, ("offset", end.offset - base, offset)
        assert start.onset <= start.detected_at <= end.decided_at


def to_rate(audio: np.ndarray, rate: int) -> np.ndarray:
    """16 kHz int16 fixture -> float32 at `rate` through the project's resampler."""
    x = audio.astype(np.float32) / 32768.0
    if rate == 16000:
        return x
    resampler = Resampler(rate)
    parts = resampler.push(AudioFrame(x, 16000)) + resampler.flush()
    return np.concatenate([p.samples for p in parts])


# ---- accuracy on real speech ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SPEECH_FILES + list(LABELS["assets"]))
def test_fixture_boundaries_within_tolerance(name):
    audio, rate, labels = load(name)
    events = run(VadDetector(), audio, rate)
    assert_turns_match(events, labels)
    for _, end in turns_of(events):
        if len(audio) / rate - end.offset > 0.55:
            assert end.reason == "silence"
            assert 0.5 - 1e-9 <= end.decided_at - end.offset <= 0.5 + 0.02 + 1e-9
        else:  # the demo question has only 0.3 s of silence after it: the stream ends first
            assert end.reason == "stream_end"


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_every_mode_and_frame_size(aggressiveness, frame_ms):
    config = VadConfig(aggressiveness=aggressiveness, frame_ms=frame_ms)
    for name in ("en_us_f3_fast.wav", "en_us_table_noise.wav", "two_turns.wav"):
        audio, rate, labels = load(name)
        assert_turns_match(run(VadDetector(config), audio, rate), labels)


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
def test_noise_and_silence_give_no_turn(aggressiveness):
    config = VadConfig(aggressiveness=aggressiveness)
    noise, rate, _ = load("noise_only.wav")
    rng = rng_for("quiet", aggressiveness)
    inputs = [
        noise,
        np.zeros(3 * rate, np.int16),
        float32_to_int16(rng.standard_normal(3 * rate).astype(np.float32) * 10 ** (-60 / 20)),
        np.concatenate([np.zeros(rate, np.int16), noise]),  # noise starting after digital silence
    ]
    for audio in inputs:
        assert run(VadDetector(config), audio, rate) == []


def brown_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    walk = np.cumsum(rng.standard_normal(n))
    walk -= np.convolve(walk, np.ones(200) / 200, mode="same")  # keep it from drifting off
    return walk / walk.std()


@pytest.mark.parametrize("aggressiveness", [0, 1, 2, 3])
@pytest.mark.parametrize("frame_ms", [20, 30])
def test_noise_starting_after_digital_silence_gives_no_turn(aggressiveness, frame_ms):
    """webrtcvad calls the first 70-180 ms of any sound speech; the warm-up and the energy gate absorb it."""
    config = VadConfig(aggressiveness=aggressiveness, frame_ms=frame_ms)
    for kind in ("white", "brown"):
        for level_db in (-70, -60, -50, -40):
            rng = rng_for("late-noise", aggressiveness, frame_ms, kind, level_db)
            noise = rng.standard_normal(2 * 16000) if kind == "white" else brown_noise(rng, 2 * 16000)
            audio = np.concatenate([np.zeros(16000), noise * 10 ** (level_db / 20)]).astype(np.float32)
            assert run(VadDetector(config), audio, 16000) == [], (kind, level_db)


def test_two_turn_file_gives_two_turns():
    audio, rate, labels = load("two_turns.wav")
    events = run(VadDetector(), audio, rate)
    assert_turns_match(events, labels)
    (_, first_end), (second_start, _) = turns_of(events)
    assert first_end.decided_at < second_start.onset  # the first turn was closed inside the 1.2 s gap


def test_short_sounds_do_not_start_a_turn():
    """min_speech_s: a cut of real speech shorter than ~100 ms is not a turn; 200 ms is."""
    speech, rate, _ = load("en_us_table.wav")
    rng = rng_for("blips")
    for length_ms, expect in [(20, 0), (40, 0), (60, 0), (80, 0), (100, 0), (200, 1)]:
        bed = rng.standard_normal(3 * rate) * 10 ** (-60 / 20) * 32768
        n = length_ms * rate // 1000
        bed[2 * rate:2 * rate + n] += speech[rate:rate + n]
        events = run(VadDetector(), np.clip(bed, -32768, 32767).astype(np.int16), rate)
        assert len(turns_of(events)) == expect, length_ms


# ---- any piece size, any rate, stereo ------------------------------------------------------------------------------
@pytest.mark.parametrize("piece", [0.007, 0.033, 0.001, "random"])
def test_odd_piece_sizes_and_audio_continuity(piece):
    rng = rng_for("pieces", piece)
    for name in ("en_us_fish.wav", "two_turns.wav"):
        audio, rate, labels = load(name)
        events = run(VadDetector(), audio, rate, piece=piece, rng=rng, base=5.0)
        assert_turns_match(events, labels, base=5.0)
        # pre-roll + SpeechAudio are exactly the input samples from onset - pre_roll to the end decision
        x = audio.astype(np.float32) / 32768.0
        current: list[AudioFrame] = []
        for event in events:
            if isinstance(event, SpeechStarted):
                assert event.pre_roll is not None
                assert event.pre_roll.duration == pytest.approx(0.3, abs=1 / rate)
                assert event.pre_roll.end_time == pytest.approx(event.onset, abs=1 / rate)
                current = [event.pre_roll]
            elif isinstance(event, SpeechAudio):
                f = event.frame
                assert f.sample_rate == 16000 and f.channels == 1 and f.samples.dtype == np.float32
                assert f.timestamp == pytest.approx(current[-1].end_time, abs=1e-6)  # contiguous
                current.append(f)
            elif isinstance(event, SpeechEnded):
                got = np.concatenate([f.samples for f in current])
                first = round((current[0].timestamp - 5.0) * rate)
                np.testing.assert_array_equal(got, x[first:first + len(got)])
                assert current[-1].end_time == pytest.approx(event.decided_at, abs=1e-6)


@pytest.mark.parametrize("rate, channels", [(8000, 1), (16000, 1), (24000, 1), (44100, 1), (48000, 1),
                                            (48000, 2), (44100, 2), (8000, 2)])
def test_every_input_rate_and_stereo(rate, channels):
    rng = rng_for("rates", rate, channels)
    for name in ("en_us_table.wav", "two_turns.wav"):
        audio16, _, labels = load(name)
        x = to_rate(audio16, rate)
        if channels == 2:
            x = np.stack([x, 0.5 * x], axis=1)  # speech in both channels, one quieter
        if rng.integers(2):
            x = float32_to_int16(x)
        events = run(VadDetector(), x, rate, piece="random", rng=rng, base=1000.0)
        assert_turns_match(events, labels, base=1000.0)
        assert all(e.frame.sample_rate == 16000 for e in events if isinstance(e, SpeechAudio))


# ---- bad frames ----------------------------------------------------------------------------------------------------
BAD_FRAMES = [
    (AudioFrame(np.zeros(320, np.float64), 16000), "samples.dtype"),
    (AudioFrame(np.zeros(320, np.int32), 16000), "samples.dtype"),
    (AudioFrame(np.full(320, np.nan, np.float32), 16000), "non-finite samples"),
    (AudioFrame(np.array([np.inf] * 320, np.float32), 16000), "non-finite samples"),
    (AudioFrame(np.zeros(0, np.int16), 16000), "num_samples"),
    (AudioFrame(np.zeros((320, 2), np.int16), 16000, 2), "channels"),
    (AudioFrame(np.zeros(960, np.int16), 48000), "sample_rate"),
    (AudioFrame(np.full(320, 20000.0, np.float32), 16000), "max |sample|"),
    (b"\x00" * 640, "type"),
]


def test_bad_frames_are_reported_and_the_detector_goes_on():
    audio, rate, labels = load("en_us_table.wav")
    clean = [e for e in run(VadDetector(), audio, rate) if not isinstance(e, FrameRejected)]
    detector = VadDetector()
    events, k = [], 0
    for a in range(0, len(audio), 320):
        bad, field = BAD_FRAMES[k % len(BAD_FRAMES)]
        k += 1
        rejected = detector.push(bad)
        assert len(rejected) == 1 and isinstance(rejected[0], FrameRejected)
        assert isinstance(rejected[0].error, BadFrameError) and rejected[0].error.field == field
        events += detector.push(AudioFrame(audio[a:a + 320], rate, 1, a / rate))
    events += detector.flush()
    assert detector.rejected_frames == k
    assert_turns_match(events, labels)
    assert [(type(e), getattr(e, "onset", None), getattr(e, "offset", None)) for e in events if
            not isinstance(e, SpeechAudio)] == [(type(e), getattr(e, "onset", None), getattr(e, "offset", None))
                                                 for e in clean if not isinstance(e, SpeechAudio)]
    got = np.concatenate([e.frame.samples for e in events if isinstance(e, SpeechAudio)])
    want = np.concatenate([e.frame.samples for e in clean if isinstance(e, SpeechAudio)])
    np.testing.assert_array_equal(got, want)


def test_a_frozen_clock_is_reported():
    """A producer that leaves every timestamp at 0 gets FrameRejected, not a turn that never ends."""
    audio, rate, _ = load("en_us_table.wav")
    detector = VadDetector()
    events = [e for a in range(0, len(audio), 320) for e in detector.push(AudioFrame(audio[a:a + 320], rate))]
    rejected = [e for e in events if isinstance(e, FrameRejected)]
    assert len(rejected) > 0.9 * (len(audio) / 320) and rejected[0].error.field == "timestamp"
    # small backwards jitter is fine
    jitter = rng_for("jitter").uniform(-0.004, 0.004, size=len(range(0, len(audio), 320)))
    detector = VadDetector()
    events = [e for k, a in enumerate(range(0, len(audio), 320))
              for e in detector.push(AudioFrame(audio[a:a + 320], rate, 1, a / rate + jitter[k]))]
    assert not any(isinstance(e, FrameRejected) for e in events)
    assert_turns_match(events + detector.flush(), LABELS["files"]["en_us_table.wav"]["turns"])


def test_bad_frames_can_raise_instead():
    audio, rate, labels = load("en_us_table.wav")
    detector = VadDetector(VadConfig(raise_on_bad_frame=True))
    events = []
    for a in range(0, len(audio), 320):
        with pytest.raises(BadFrameError):
            detector.push(AudioFrame(np.full(320, np.nan, np.float32), 16000, 1, a / rate))
        events += detector.push(AudioFrame(audio[a:a + 320], rate, 1, a / rate))
    events += detector.flush()
    assert_turns_match(events, labels)


# ---- end of turn, max turn, flush ----------------------------------------------------------------------------------
@pytest.mark.parametrize("silence", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("frame_ms", [10, 30])
def test_end_of_turn_silence_is_respected(silence, frame_ms):
    audio, rate, labels = load("en_us_table.wav")
    audio = np.concatenate([audio, np.zeros(rate, np.int16)])
    events = run(VadDetector(VadConfig(end_of_turn_silence_s=silence, frame_ms=frame_ms)), audio, rate)
    ((start, end),) = turns_of(events)
    assert end.reason == "silence"
    assert silence - 1e-9 <= end.decided_at - end.offset <= silence + frame_ms / 1000 + 1e-9
    assert abs(end.offset - labels[0][1]) <= TOLERANCE_S


def test_a_long_end_silence_joins_the_two_turns():
    audio, rate, labels = load("two_turns.wav")
    audio = np.concatenate([audio, np.zeros(rate, np.int16)])
    events = run(VadDetector(VadConfig(end_of_turn_silence_s=1.5)), audio, rate)
    assert_turns_match(events, [[labels[0][0], labels[1][1]]])
    events = run(VadDetector(VadConfig(end_of_turn_silence_s=1.0)), audio, rate)
    assert_turns_match(events, labels)


def test_tentative_end_of_turn_pauses_and_resumes():
    """A pause inside the turn gives SpeechPaused then SpeechResumed; the final pause gives SpeechPaused with the
    offset SpeechEnded then reports, pause_silence_s after it."""
    audio, rate, labels = load("two_turns.wav")
    audio = np.concatenate([audio, np.zeros(rate, np.int16)])
    events = run(VadDetector(VadConfig(end_of_turn_silence_s=1.5, pause_silence_s=0.2)), audio, rate)
    marks = [e for e in events if isinstance(e, (SpeechStarted, SpeechPaused, SpeechResumed, SpeechEnded))]
    assert [type(e) for e in marks] == [SpeechStarted, SpeechPaused, SpeechResumed, SpeechPaused, SpeechEnded]
    _, first_pause, resumed, last_pause, end = marks
    assert abs(first_pause.offset - labels[0][1]) <= TOLERANCE_S
    assert 0.2 - 1e-9 <= first_pause.detected_at - first_pause.offset <= 0.2 + 0.02 + 1e-9
    assert first_pause.detected_at < resumed.detected_at < last_pause.offset
    assert last_pause.offset == end.offset and last_pause.detected_at < end.decided_at
    # off by default, and a pause as long as the end-of-turn silence never fires on its own
    assert not any(isinstance(e, (SpeechPaused, SpeechResumed)) for e in run(VadDetector(), audio, rate))
    events = run(VadDetector(VadConfig(end_of_turn_silence_s=0.5, pause_silence_s=0.5)), audio, rate)
    assert not any(isinstance(e, SpeechPaused) for e in events) and len(turns_of(events)) == 2


def test_max_turn_length_forces_an_end():
    audio, rate, labels = load("en_gb_slow.wav")
    events = run(VadDetector(VadConfig(max_turn_s=1.0)), audio, rate)
    turns = turns_of(events)
    assert len(turns) >= 2
    start, end = turns[0]
    assert end.reason == "max_turn"
    assert 1.0 - 1e-9 <= end.decided_at - start.onset <= 1.0 + 0.02 + 1e-9
    assert abs(start.onset - labels[0][0]) <= TOLERANCE_S
    assert turns[1][0].onset >= end.decided_at - 1e-9  # the speaker went on: a new turn
    assert turns[-1][1].reason == "silence"
    assert abs(turns[-1][1].offset - labels[0][1]) <= TOLERANCE_S


def test_flush_closes_an_open_turn_and_resets():
    audio, rate, labels = load("en_us_table.wav")
    detector = VadDetector()
    events = run(detector, audio[: int(1.5 * rate)], rate)
    ((start, end),) = turns_of(events)
    assert end.reason == "stream_end" and end.decided_at == pytest.approx(1.5, abs=0.02)
    assert abs(start.onset - labels[0][0]) <= TOLERANCE_S
    # after flush the detector takes a new stream, at another rate
    x = to_rate(audio, 48000)
    assert_turns_match(run(detector, x, 48000, base=100.0), labels, base=100.0)


# ---- interruption --------------------------------------------------------------------------------------------------
def interruptions(events: list) -> list[Interruption]:
    return [e for e in events if isinstance(e, Interruption)]


def test_no_interruption_while_the_agent_is_silent():
    audio, rate, _ = load("en_us_table.wav")
    assert interruptions(run(VadDetector(), audio, rate)) == []


@pytest.mark.parametrize("minimum", [0.5, 1.2])
def test_interruption_after_the_minimum_duration(minimum):
    audio, rate, _ = load("en_us_table.wav")
    detector = VadDetector(VadConfig(min_interruption_s=minimum))
    detector.set_agent_speaking(True)
    events = run(detector, audio, rate)
    ((start, _),) = turns_of(events)
    (interruption,) = interruptions(events)
    assert interruption.onset == start.onset
    assert interruption.speech_s >= minimum - 1e-9
    assert start.onset + minimum <= interruption.detected_at <= start.onset + minimum + 0.4
    assert events.index(start) < events.index(interruption)


def test_interruption_counts_only_while_the_agent_speaks():
    audio, rate, _ = load("en_us_table.wav")
    onset = LABELS["files"]["en_us_table.wav"]["onset_s"]

    def agent_stops_early(detector, t):  # agent stops 0.3 s into the user's speech: no barge-in
        detector.set_agent_speaking(t < onset + 0.3)

    assert interruptions(run(VadDetector(), audio, rate, before_piece=agent_stops_early)) == []

    def agent_starts_late(detector, t):  # agent speaks 0.3 s, pauses, and speaks again from 1 s into the speech
        detector.set_agent_speaking(t < onset + 0.3 or t >= onset + 1.0)

    (late,) = interruptions(run(VadDetector(), audio, rate, before_piece=agent_starts_late))
    assert late.detected_at >= onset + 1.0 + 0.5 - 1e-9

    detector = VadDetector(VadConfig(min_interruption_s=0.0))
    detector.set_agent_speaking(True)
    events = run(detector, audio, rate)
    (immediate,) = interruptions(events)
    assert immediate.detected_at == turns_of(events)[0][0].detected_at


# ---- the turn-model seam -------------------------------------------------------------------------------------------
def test_turn_model_can_end_a_turn_early():
    audio, rate, labels = load("en_us_f3_fast.wav")
    default = turns_of(run(VadDetector(), audio, rate))
    seen: list[SilenceContext] = []

    def end_now(context: SilenceContext) -> float:
        seen.append(context)
        return 0.0

    events = run(VadDetector(turn_model=end_now), audio, rate)
    start, end = turns_of(events)[-1]
    assert end.reason == "turn_model"
    assert end.decided_at < default[-1][1].decided_at - 0.3
    assert end.decided_at - end.offset < 0.1
    assert abs(end.offset - labels[0][1]) <= TOLERANCE_S
    context = seen[-1]
    assert context.onset == start.onset and context.default_wait_s == 0.5
    assert context.onset < context.silence_start <= context.now
    assert context.audio.dtype == np.float32
    assert len(context.audio) == pytest.approx((context.now - context.onset) * 16000, abs=2)


def test_turn_model_can_extend_a_turn():
    audio, rate, labels = load("two_turns.wav")
    audio = np.concatenate([audio, np.zeros(3 * rate, np.int16)])
    events = run(VadDetector(turn_model=lambda context: 2.0), audio, rate)
    ((start, end),) = turns_of(events)
    assert end.reason == "turn_model"
    assert 2.0 - 1e-9 <= end.decided_at - end.offset <= 2.02 + 1e-9
    assert abs(start.onset - labels[0][0]) <= TOLERANCE_S and abs(end.offset - labels[1][1]) <= TOLERANCE_S


@pytest.mark.parametrize("answer", ["raise", "nan", -1.0, "text", None, True])
def test_a_broken_turn_model_falls_back_to_the_default(answer):
    audio, rate, _ = load("two_turns.wav")

    def model(context):
        if answer == "raise":
            raise RuntimeError("model crashed")
        return float("nan") if answer == "nan" else answer

    plain = [(s.onset, e.offset, e.decided_at) for s, e in turns_of(run(VadDetector(), audio, rate))]
    broken = turns_of(run(VadDetector(turn_model=model), audio, rate))
    assert [(s.onset, e.offset, e.decided_at) for s, e in broken] == plain
    assert all(e.reason == "silence" for _, e in broken)


# ---- config and the cost probe -------------------------------------------------------------------------------------
def test_config_defaults_and_validation_of_the_pause():
    assert VadConfig().pause_silence_s is None
    for bad in (-0.1, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="pause_silence_s"):
            VadConfig(pause_silence_s=bad)


def test_config_defaults_and_validation():
    config = VadConfig()
    assert (config.aggressiveness, config.frame_ms, config.pre_roll_s, config.end_of_turn_silence_s,
            config.min_interruption_s) == (2, 20, 0.3, 0.5, 0.5)
    assert (config.min_speech_frames, config.onset_window_frames) == (6, 15)  # N of M
    for bad in [dict(aggressiveness=4), dict(frame_ms=25), dict(end_of_turn_silence_s=-1.0),
                dict(min_speech_s=0.5, onset_window_s=0.3), dict(max_turn_s=0), dict(pre_roll_s=math.nan),
                dict(resample_quality="best")]:
        with pytest.raises(ValueError) as info:
            VadConfig(**bad)
        assert next(iter(bad)) in str(info.value)


def test_pre_roll_is_optional():
    audio, rate, labels = load("en_us_table.wav")
    events = run(VadDetector(VadConfig(pre_roll_s=0.0)), audio, rate)
    ((start, _),) = turns_of(events)
    assert start.pre_roll is None
    first_audio = next(e for e in events if isinstance(e, SpeechAudio))
    assert first_audio.frame.timestamp == pytest.approx(start.onset, abs=1e-6)


def test_vad_cost_per_frame_is_measured():
    cost = vad_cost_per_frame(num_frames=50)
    assert isinstance(cost, float) and 0 < cost < 1
