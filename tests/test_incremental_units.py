"""Incremental unit extractor on the tiny HuBERT: exact finals, a stable prefix that only grows, right rollbacks."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.hubert import HOP, RECEPTIVE_FIELD, load_hubert, num_frames
from streaming.incremental_units import IncrementalConfig, IncrementalUnitExtractor, first_divergence
from streaming.kmeans import dedup_units, load_kmeans
from streaming.tiny_parts import write_tiny_hubert, write_tiny_kmeans
from streaming.units import UnitExtractor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


SPEECH_DIR = REPO / "tests" / "fixtures" / "speech"


def _read_wav16k(path: Path) -> np.ndarray | None:
    with wave.open(str(path)) as w:
        if w.getframerate() != 16000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
            return None
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def _speech_like(seed: int, seconds: float) -> np.ndarray:
    """Fallback when the espeak-ng fixtures are absent: voiced buzz with a moving formant, syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    buzz = sum(np.sin(k * phase) / k for k in range(1, 20))
    formant = np.sin(2 * np.pi * (500 + 400 * np.sin(2 * np.pi * 2.3 * t)) * t)
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    x = 0.1 * envelope * buzz * (0.6 + 0.4 * formant) + 0.002 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def _utterances() -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    labels = SPEECH_DIR / "labels.json"
    if labels.is_file():
        for name, info in json.loads(labels.read_text()).get("files", {}).items():
            if info.get("turns") and "noise" not in name:
                audio = _read_wav16k(SPEECH_DIR / name)
                if audio is not None:
                    found[name] = audio
    if not found:
        found = {f"synthetic-{i}": _speech_like(i, s) for i, s in enumerate((2.3, 3.1, 1.7))}
    return dict(sorted(found.items())[:3])


UTTERANCES = _utterances()


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> UnitExtractor:
    root = tmp_path_factory.mktemp("tiny")
    hubert = load_hubert(write_tiny_hubert(root / "hubert.pt", seed=42))
    kmeans = load_kmeans(write_tiny_kmeans(root / "km.bin", seed=42, dim=hubert.hidden_size))
    return UnitExtractor(hubert, kmeans)


def _pieces(audio: np.ndarray, chunking: str, seed: int) -> list[np.ndarray]:
    if chunking == "10ms":
        sizes = [160]
    elif chunking == "20ms":
        sizes = [320]
    else:  # random sizes from 1 sample to 0.25 s
        sizes = list(np.random.default_rng(seed).integers(1, 4000, size=audio.size // 10 + 10))
    out, i, k = [], 0, 0
    while i < audio.size:
        n = int(sizes[k % len(sizes)])
        out.append(audio[i:i + n])
        i, k = i + n, k + 1
    return out


def _stream(extractor, audio, config, chunking="20ms", seed=0):
    inc = IncrementalUnitExtractor(extractor, config)
    events = []
    for piece in _pieces(audio, chunking, seed):
        events += inc.push(piece)
    return inc, events


@pytest.mark.parametrize("name", list(UTTERANCES))
@pytest.mark.parametrize("chunking", ["10ms", "20ms", "random"])
def test_exact_final_equals_whole_utterance_extraction(extractor, name, chunking):
    audio = UTTERANCES[name]
    frame_units, reduced = extractor.extract(audio)
    seed = sum(map(ord, name + chunking))
    inc, events = _stream(extractor, audio, IncrementalConfig(), chunking, seed)
    assert events, "no provisional update while the user spoke"
    final = inc.end_of_turn()
    assert final.mode == "exact"
    assert final.frame_units.dtype == np.int64
    assert np.array_equal(final.frame_units, frame_units)
    assert np.array_equal(final.reduced_units, reduced)
    assert np.array_equal(inc.audio, audio)


@pytest.mark.parametrize("name", list(UTTERANCES))
@pytest.mark.parametrize("right_ms, frontend", [(0, "refresh"), (160, "running"), (320, "window"), (640, "refresh")])
def test_stable_prefix_only_grows_and_rollback_is_reported(extractor, name, right_ms, frontend):
    audio = UTTERANCES[name]
    config = IncrementalConfig(right_context_ms=right_ms, frontend=frontend)
    inc, events = _stream(extractor, audio, config, "random", seed=right_ms + len(name))
    stable_so_far = np.zeros(0, dtype=np.int64)
    for event in events:
        stable = event.reduced_units[: event.stable_count]
        assert np.array_equal(stable[: stable_so_far.size], stable_so_far), "a declared-stable unit was revised"
        assert np.array_equal(event.new_stable, stable[stable_so_far.size:])
        # stable frames are a prefix of the provisional frames, and dedup of them is the stable prefix
        assert np.array_equal(dedup_units(event.frame_units[: event.stable_frames]), stable)
        assert np.array_equal(dedup_units(event.frame_units), event.reduced_units)
        stable_so_far = stable
    _, reference_reduced = extractor.extract(audio)
    final = inc.end_of_turn()
    # independent check of the rollback report
    expected_rollback = 0
    while (expected_rollback < min(stable_so_far.size, reference_reduced.size)
           and stable_so_far[expected_rollback] == reference_reduced[expected_rollback]):
        expected_rollback += 1
    assert final.stable_count == stable_so_far.size
    assert final.rollback_index == expected_rollback
    assert final.revised_stable == stable_so_far.size - expected_rollback
    last = events[-1].reduced_units
    assert final.provisional_divergence == first_divergence(last, reference_reduced)
    frames = inc.stable_frame_units
    n = min(frames.size, final.frame_units.size)
    assert final.stable_frame_agreement == pytest.approx(float((frames[:n] == final.frame_units[:n]).mean()))


def test_lag_of_the_stable_prefix_is_bounded(extractor):
    audio = next(iter(UTTERANCES.values()))
    config = IncrementalConfig(hop_ms=200, right_context_ms=160)
    inc, events = _stream(extractor, audio, config, "10ms")
    assert len(events) >= audio.size // (16000 * 0.2) - 2
    bound = (config.right_context_ms + config.hop_ms) / 1000 + (RECEPTIVE_FIELD - HOP) / 16000 + 0.01
    for event in events:
        assert event.stable_lag_s <= bound
        assert event.record.kind == "hop" and event.record.total_s >= 0


@pytest.mark.parametrize("name", list(UTTERANCES)[:2])
def test_approximate_finalize_keeps_the_stable_prefix(extractor, name):
    audio = UTTERANCES[name]
    inc, events = _stream(extractor, audio, IncrementalConfig(finalize_mode="approximate"), "20ms")
    stable_frames = inc.stable_frame_units.copy()
    stable = inc.stable_reduced_units.copy()
    final = inc.end_of_turn()
    assert final.mode == "approximate"
    assert final.frame_units.size == num_frames(audio.size)
    assert np.array_equal(final.frame_units[: stable_frames.size], stable_frames)
    assert np.array_equal(final.reduced_units, dedup_units(final.frame_units))
    assert final.rollback_index == final.stable_count == stable.size and final.revised_stable == 0
    assert inc.records[-1].kind == "finalize-approximate"
    assert inc.records[-1].window_frames <= IncrementalConfig().left_frames + final.frame_units.size - stable_frames.size


def test_full_context_approximation_degenerates_to_the_reference(extractor):
    """One window over the whole turn: 'window' = the reference exactly, the running-statistics front ends = up to
    float rounding (the approximate finalize normalises with the turn's own statistics, never the prior)."""
    audio = next(iter(UTTERANCES.values()))
    frame_units, _ = extractor.extract(audio)
    wide = dict(hop_ms=60_000, left_context_ms=60_000, finalize_mode="approximate")
    inc, _ = _stream(extractor, audio, IncrementalConfig(frontend="window", **wide))
    assert np.array_equal(inc.end_of_turn().frame_units, frame_units)
    for frontend in ("running", "refresh"):
        inc = IncrementalUnitExtractor(extractor, IncrementalConfig(frontend=frontend, **wide))
        other = UTTERANCES[sorted(UTTERANCES)[-1]]
        inc.push(other)  # a previous turn: its statistics become the prior
        inc.end_of_turn()
        inc.reset()
        for piece in _pieces(audio, "20ms", 0):
            inc.push(piece)
        assert (inc.end_of_turn().frame_units == frame_units).mean() >= 0.97


def test_hundred_second_chunks_are_segments(extractor, monkeypatch):
    """With the chunk size shrunk to 0.5 s: exact final = reference (same chunking), completed chunks are
    precomputed during the turn and not recomputed at end of turn; approximate final has the reference grid."""
    monkeypatch.setattr(extractor.hubert, "max_chunk_samples", 8000)
    audio = UTTERANCES[sorted(UTTERANCES)[0]]
    frame_units, reduced = extractor.extract(audio)
    assert frame_units.size == extractor.hubert.num_frames(audio.size) < num_frames(audio.size)

    inc, events = _stream(extractor, audio, IncrementalConfig(hop_ms=100), "random", seed=3)
    closes = [r for r in inc.records if r.kind == "segment-close"]
    chunks = [r for r in inc.records if r.kind == "exact-chunk"]
    assert len(closes) == len(chunks) == audio.size // 8000
    calls = []
    original = extractor.hubert.chunk_features
    monkeypatch.setattr(extractor.hubert, "chunk_features", lambda chunk: calls.append(chunk.shape) or original(chunk))
    final = inc.end_of_turn()
    assert len(calls) == 1  # only the last, incomplete chunk
    assert np.array_equal(final.frame_units, frame_units) and np.array_equal(final.reduced_units, reduced)
    monkeypatch.setattr(extractor.hubert, "chunk_features", original)

    inc, _ = _stream(extractor, audio, IncrementalConfig(hop_ms=100, finalize_mode="approximate"), "20ms")
    approx = inc.end_of_turn()
    assert approx.frame_units.size == frame_units.size


def test_exact_finalize_does_no_pending_hop(extractor):
    audio = next(iter(UTTERANCES.values()))
    inc, _ = _stream(extractor, audio, IncrementalConfig(hop_ms=640))
    before = len(inc.records)
    inc.end_of_turn()
    assert [r.kind for r in inc.records[before:]] == ["finalize-exact"]


def test_short_and_broken_input_does_not_kill_the_turn(extractor):
    inc = IncrementalUnitExtractor(extractor)
    assert inc.push(np.zeros(100, np.float32)) == []
    final = inc.end_of_turn()
    assert final.frame_units.size == 0 and final.reduced_units.size == 0 and final.rollback_index == 0

    audio = next(iter(UTTERANCES.values())).copy()
    broken = audio.copy()
    broken[5000:5010] = np.nan
    inc, _ = _stream(extractor, broken, IncrementalConfig())
    assert inc.bad_samples == 10
    audio[5000:5010] = 0.0
    assert np.array_equal(inc.end_of_turn().frame_units, extractor.extract(audio)[0])
    with pytest.raises(RuntimeError, match="reset"):
        inc.push(audio[:10])
    inc.reset()
    assert inc.audio.size == 0
    with pytest.raises(ValueError, match="1-D"):
        inc.push(np.zeros((2, 10), np.float32))


def test_torch_input_and_records(extractor):
    audio = next(iter(UTTERANCES.values()))
    inc = IncrementalUnitExtractor(extractor, IncrementalConfig(hop_ms=160, frontend="running"))
    for i in range(0, audio.size, 480):
        inc.push(torch.from_numpy(audio[i:i + 480]))
    final = inc.end_of_turn("approximate")
    hops = [r for r in inc.records if r.kind == "hop"]
    assert hops and all(r.total_s >= r.encoder_s >= 0 for r in hops)
    assert sum(r.committed_frames for r in inc.records) == final.frame_units.size
    assert all(r.new_frames <= 8 + 20 for r in hops)  # CNN frames are computed once each, per hop


@pytest.mark.parametrize("bad", [dict(hop_ms=0), dict(hop_ms=30), dict(right_context_ms=-20), dict(frontend="x"),
                                 dict(finalize_mode="fast")])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        IncrementalConfig(**bad)


def test_refresh_recomputes_the_window_and_running_does_not(extractor):
    audio = next(iter(UTTERANCES.values()))
    for frontend in ("refresh", "running"):
        inc, _ = _stream(extractor, audio, IncrementalConfig(frontend=frontend))
        hops = [r for r in inc.records if r.kind == "hop"]
        if frontend == "refresh":
            assert all(r.new_frames == r.window_frames for r in hops)
        else:
            assert sum(r.new_frames for r in hops) == inc._segment.cnn_frames


def test_previous_turn_statistics_are_a_prior_for_provisional_units_only(extractor):
    names = sorted(UTTERANCES)
    first, second = UTTERANCES[names[0]], UTTERANCES[names[1]]
    reference = extractor.extract(second)[0]
    stable = {}
    for weight in (0.0, 1.0):
        inc = IncrementalUnitExtractor(extractor, IncrementalConfig(prior_weight_s=weight))
        inc.push(first)
        inc.end_of_turn()
        inc.reset()
        for piece in _pieces(second, "20ms", 1):
            inc.push(piece)
        stable[weight] = inc.stable_frame_units.copy()
        assert np.array_equal(inc.end_of_turn().frame_units, reference)  # exact finals never see the prior
    assert not np.array_equal(stable[0.0], stable[1.0])  # the prior was used
    inc = IncrementalUnitExtractor(extractor)
    with pytest.raises(ValueError, match="positive"):
        inc.set_stats_prior(0, torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="prior_weight_s"):
        IncrementalConfig(prior_weight_s=-1.0)


def test_runs_without_soundfile_soxr_sklearn_joblib(extractor, tmp_path):
    """The GPU machines lack soundfile/soxr (and maybe sklearn/joblib): the unit modules and the benchmark must
    import and run from the converted formats without them. The subprocess sees a copy of site-packages
    (symlinks) without those distributions, so even transformers' availability probes find nothing."""
    import os
    import subprocess
    import sys
    import sysconfig
    import textwrap

    from streaming.hubert import save_converted_hubert
    from streaming.kmeans import save_converted_kmeans

    save_converted_hubert(extractor.hubert.model, extractor.hubert.normalize, tmp_path / "hubert")
    save_converted_kmeans(extractor.kmeans, tmp_path / "km")
    audio = next(iter(UTTERANCES.values()))
    np.save(tmp_path / "audio.npy", audio)
    np.save(tmp_path / "expected.npy", extractor.extract(audio)[0])

    blocked = ("soundfile", "_soundfile", "soxr", "sklearn", "scikit_learn", "joblib", "webrtcvad", "_webrtcvad")
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(blocked) and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    stdlib = [p for p in sys.path if p and "site-packages" not in p and Path(p).is_dir() and Path(p) != REPO]
    script = textwrap.dedent(f"""
        import sys
        sys.path[:] = {[str(REPO)] + stdlib + [str(farm)]!r}
        for gone in ("soundfile", "soxr", "sklearn", "joblib"):
            try:
                __import__(gone)
                raise SystemExit(gone + " imported")
            except ImportError:
                pass
        import numpy as np, torch
        torch.set_num_threads(1)  # same as the parent: bitwise comparisons need the same kernels
        import streaming.bench_units, streaming.incremental_units
        from streaming.units import UnitExtractor
        from streaming.incremental_units import IncrementalUnitExtractor
        ex = UnitExtractor.from_files({str(tmp_path / 'hubert')!r}, {str(tmp_path / 'km')!r})
        audio = np.load({str(tmp_path / 'audio.npy')!r})
        inc = IncrementalUnitExtractor(ex)
        for i in range(0, audio.size, 320):
            inc.push(audio[i:i + 320])
        assert np.array_equal(inc.end_of_turn().frame_units, np.load({str(tmp_path / 'expected.npy')!r}))
        assert not any(m.split(".")[0] in ("soundfile", "soxr", "sklearn", "joblib") for m in sys.modules)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
