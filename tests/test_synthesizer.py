"""Streaming synthesizer: exact mode == whole-utterance synthesis, frames, cancel, bad input, low-latency mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from streaming.frames import AudioFrame
from streaming.synthesizer import (
    OnnxBackend,
    StreamingSynthesizer,
    SynthesizerConfig,
    TorchBackend,
    frames_to_audio,
    make_backend,
)
from streaming.tiny_parts import write_tiny_vocoder
from streaming.vocoder import load_vocoder
from streaming.vocoder_onnx import export_vocoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vocoder")
    write_tiny_vocoder(path, seed=41)
    return load_vocoder(path)


@pytest.fixture(scope="module")
def onnx_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_vocoder(tiny, out, fixed_chunk_frames=(3, 8), verify=False)
    return out


@pytest.fixture(scope="module")
def backends(tiny, onnx_dir):
    return {
        "torch": TorchBackend(tiny, "cpu"),
        "onnx": OnnxBackend(onnx_dir, "cpu", threads=1),
        # fixed-window sessions on CPU: exercises the window placement used with CUDA graphs
        "onnx_fixed": OnnxBackend(onnx_dir, "cpu", threads=1, load_fixed=True),
    }


def arrivals(units: np.ndarray, pattern: str, rng: np.random.Generator) -> list:
    if pattern == "one":
        return [int(u) for u in units]
    if pattern == "all":
        return [units]
    cuts = np.sort(rng.choice(np.arange(1, units.size), size=min(units.size - 1, 4), replace=False)) if units.size > 1 else []
    return [part for part in np.split(units, cuts)]


CASES = [(n, p) for n in (1, 2, 3, 4, 9, 23, 70) for p in ("one", "burst", "all")]


@pytest.mark.parametrize("backend_name", ["torch", "onnx", "onnx_fixed"])
@pytest.mark.parametrize("length,pattern", CASES)
def test_exact_mode_equals_whole_utterance(tiny, backends, backend_name, length, pattern):
    rng = np.random.default_rng(hash((backend_name, length, pattern)) % 2**32)
    units = rng.integers(0, 1000, length)
    chunk = int(rng.choice([1, 3, 8, 16]))
    first = int(rng.choice([1, 2, chunk])) if rng.random() < 0.5 else None
    most = int(rng.choice([chunk, 2 * chunk, 64])) if rng.random() < 0.5 else None
    synth = StreamingSynthesizer(backends[backend_name], chunk_frames=chunk, first_chunk_frames=first,
                                 max_chunk_frames=most)
    audio = synth.synthesize_all(arrivals(units, pattern, rng))
    reference = tiny.synthesize(units)
    assert audio.shape == reference.shape, (chunk, first)
    assert float(np.abs(audio - reference).max()) <= TOL, (chunk, first)
    assert np.array_equal(synth.durations, tiny.predict_durations(units).numpy())
    assert synth.finished


class SentinelBackend:
    """A fake vocoder with the real receptive field and no float rounding: frame f's audio is the sum of the
    (id + 1)s of expanded frames [f-21, f+21] (zero padded at the window edges), unit i's duration comes from the
    ids of units [i-2, i+2]. Any chunk window short of that context changes the output by >= 1."""

    name, provider, sample_rate, hop_size, num_embeddings = "sentinel", "numpy", 16000, 320, 1000

    def __init__(self, fixed_windows=()):
        from streaming.vocoder_types import ReceptiveField

        self.receptive_field = ReceptiveField(21, 21, 2, 2)
        self.fixed_windows = tuple(fixed_windows)

    @staticmethod
    def _context_sums(ids: np.ndarray, half: int) -> np.ndarray:
        padded = np.concatenate([np.zeros(half), ids + 1.0, np.zeros(half)])
        return np.convolve(padded, np.ones(2 * half + 1), mode="valid")

    def durations(self, units):
        durations = 1 + self._context_sums(np.asarray(units), 2).astype(np.int64) % 3
        return np.log1p(durations).astype(np.float32), durations

    def generate(self, expanded):
        return np.repeat(self._context_sums(np.asarray(expanded), 21), 320).astype(np.float32)

    def describe(self):
        return {"backend": self.name}


@pytest.mark.parametrize("fixed", [(), (25, 29, 50)])
@pytest.mark.parametrize("mode", ["exact", "low_latency_full_context"])
def test_windows_cover_the_receptive_field(fixed, mode):
    backend = SentinelBackend(fixed)
    rng = np.random.default_rng(len(fixed) + len(mode))
    kwargs = {} if mode == "exact" else {"mode": "low_latency", "low_latency_right_frames": 21, "crossfade_ms": 0}
    for length in (1, 2, 3, 5, 8, 13, 30, 64):
        units = rng.integers(0, 1000, length)
        _, durations = backend.durations(units)
        reference = backend.generate(np.repeat(units, durations))
        for pattern in ("one", "burst", "all"):
            for chunk, most in ((1, None), (4, None), (8, None), (2, 16), (4, 64)):
                synth = StreamingSynthesizer(backend, chunk_frames=chunk, max_chunk_frames=most, **kwargs)
                audio = synth.synthesize_all(arrivals(units, pattern, rng))
                assert np.array_equal(audio, reference), (length, pattern, chunk)
                assert not fixed or length < 30 or any(t.fixed_window for t in synth.timings)


def test_max_chunk_frames_merges_ready_frames(tiny, backends):
    units = np.random.default_rng(5).integers(0, 1000, 40)
    synth = StreamingSynthesizer(backends["torch"], chunk_frames=4, max_chunk_frames=32)
    audio = synth.synthesize_all([units])  # all at once: everything is ready, so big windows
    sizes = [t.end_frame - t.start_frame for t in synth.timings]
    assert sizes[0] == 4 and max(sizes) == 32
    assert float(np.abs(audio - tiny.synthesize(units)).max()) <= TOL


def test_fixed_windows_are_used(tiny, backends):
    units = np.random.default_rng(3).integers(0, 1000, 60)
    synth = StreamingSynthesizer(backends["onnx_fixed"], chunk_frames=8)
    audio = synth.synthesize_all([int(u) for u in units])
    assert sum(t.fixed_window for t in synth.timings) >= len(synth.timings) // 2
    assert {t.window_frames for t in synth.timings if t.fixed_window} <= {24, 29, 45, 50}
    assert float(np.abs(audio - tiny.synthesize(units)).max()) <= TOL


def test_audio_is_released_as_soon_as_context_allows(tiny, backends):
    """Chunk [a, b) is out once b + 21 frames are final (2 units after their unit), never later."""
    units = np.random.default_rng(4).integers(0, 1000, 50)
    durations = tiny.predict_durations(units).numpy()
    synth = StreamingSynthesizer(backends["torch"], chunk_frames=4)
    for i, u in enumerate(units):
        synth.push(int(u))
        final_units = max(0, i + 1 - 2)
        frames_final = int(durations[:final_units].sum())
        ready = frames_final - 21
        assert synth.frames_emitted == (ready // 4 * 4 if ready > 0 else 0)


@pytest.mark.parametrize("frame_ms,fmt", [(10, "float32"), (20, "float32"), (10, "int16"), (20, "int16")])
def test_frames_are_exact_size_with_monotone_timestamps(tiny, backends, frame_ms, fmt):
    units = np.random.default_rng(frame_ms + len(fmt)).integers(0, 1000, 25)
    synth = StreamingSynthesizer(backends["onnx"], chunk_frames=5, frame_ms=frame_ms, sample_format=fmt)
    frames: list[AudioFrame] = []
    for u in units:
        frames += synth.push(int(u))
    frames += synth.flush()
    size = 16 * frame_ms
    assert all(isinstance(f, AudioFrame) for f in frames)
    assert all(f.samples.shape == (size,) and f.sample_rate == 16000 and f.channels == 1 for f in frames)
    assert all(f.samples.dtype == np.dtype(fmt) for f in frames)
    assert [f.timestamp for f in frames] == [i * size / 16000 for i in range(len(frames))]
    reference = tiny.synthesize(units)
    assert len(frames) * size == reference.size
    if fmt == "int16":
        expected = np.clip(np.rint(reference.astype(np.float64) * 32768.0), -32768, 32767)  # frames.py's scale
        assert np.abs(np.concatenate([f.samples for f in frames]).astype(np.float64) - expected).max() <= 1
    else:
        assert float(np.abs(frames_to_audio(frames) - reference).max()) <= TOL


class CancellingBackend:
    """Wraps a backend; calls synth.cancel() from inside the k-th generator call (as another thread would)."""

    def __init__(self, inner, cancel_at: int) -> None:
        self.inner, self.cancel_at, self.calls, self.synth = inner, cancel_at, 0, None
        for name in ("name", "provider", "sample_rate", "hop_size", "num_embeddings", "receptive_field", "fixed_windows"):
            setattr(self, name, getattr(inner, name))

    def durations(self, units):
        return self.inner.durations(units)

    def generate(self, expanded):
        self.calls += 1
        if self.calls == self.cancel_at:
            self.synth.cancel()
        return self.inner.generate(expanded)

    def describe(self):
        return self.inner.describe()


@pytest.mark.parametrize("cancel_at", [1, 3])
def test_cancel_mid_stream_stops_within_one_chunk(tiny, backends, cancel_at):
    units = np.random.default_rng(cancel_at).integers(0, 1000, 80)
    backend = CancellingBackend(backends["torch"], cancel_at)
    synth = StreamingSynthesizer(backend, chunk_frames=4)
    backend.synth = synth
    out: list[AudioFrame] = []
    # a burst that releases many chunks at once: the cancel lands inside the push
    out += synth.push(units[:60])
    calls_at_cancel = backend.calls
    assert synth.cancelled and calls_at_cancel == cancel_at  # the in-flight chunk was the last one computed
    assert len(out) == (cancel_at - 1) * 4  # chunks finished before the cancel; the in-flight one is dropped
    out_after = synth.push(units[60:]) + synth.flush()
    assert out_after == [] and backend.calls == calls_at_cancel
    # what was emitted is exact
    reference = tiny.synthesize(units)
    if out:
        emitted = frames_to_audio(out)
        assert float(np.abs(emitted - reference[: emitted.size]).max()) <= TOL
    # reset() starts a new reply that is exact again
    synth.reset()
    backend.cancel_at = -1
    audio = synth.synthesize_all([units[:10]])
    assert float(np.abs(audio - tiny.synthesize(units[:10])).max()) <= TOL


def test_cancel_between_pushes(backends):
    synth = StreamingSynthesizer(backends["onnx"], chunk_frames=2)
    rng = np.random.default_rng(7)
    got = []
    while not got:
        got = synth.push(int(rng.integers(0, 1000)))
    synth.cancel()
    assert synth.push([1, 2, 3] * 20) == [] and synth.flush() == []


@pytest.mark.parametrize("bad,value,position", [(-1, "-1", 5), (1000, "1000", 5), (12345, "12345", 5)])
def test_bad_unit_ids_raise_and_leave_state_intact(tiny, backends, bad, value, position):
    units = np.random.default_rng(9).integers(0, 1000, 30)
    synth = StreamingSynthesizer(backends["torch"], chunk_frames=4)
    frames = synth.push(units[:5])
    with pytest.raises(ValueError, match=rf"unit id {value} at position {position}"):
        synth.push(bad)
    with pytest.raises(ValueError, match=rf"unit id {value} at position {position + 2}"):
        synth.push([1, 2, bad, 3])  # a burst with a bad id is rejected whole
    with pytest.raises(ValueError, match="not an integer"):
        synth.push([0.5])
    for u in units[5:]:
        frames += synth.push(int(u))
    frames += synth.flush()
    assert float(np.abs(frames_to_audio(frames) - tiny.synthesize(units)).max()) <= TOL


class BrokenBackend(CancellingBackend):
    """Returns NaNs on the 2nd generator call and a wrong-length array on the 3rd."""

    def generate(self, expanded):
        self.calls += 1
        audio = self.inner.generate(expanded)
        if self.calls == 2:
            return np.full_like(audio, np.nan)
        if self.calls == 3:
            return audio[:-5]
        return audio


def test_malformed_generator_output_is_reported_not_fatal(tiny, backends):
    units = np.random.default_rng(15).integers(0, 1000, 40)
    backend = BrokenBackend(backends["torch"], cancel_at=-1)
    synth = StreamingSynthesizer(backend, chunk_frames=4)
    audio = synth.synthesize_all([int(u) for u in units])
    reference = tiny.synthesize(units)
    assert audio.shape == reference.shape and len(synth.errors) == 2
    bad = [synth.timings[1], synth.timings[2]]
    for t in bad:
        assert not audio[t.start_frame * 320 : t.end_frame * 320].any()  # silence where the output was broken
    good = np.ones(audio.size, bool)
    for t in bad:
        good[t.start_frame * 320 : t.end_frame * 320] = False
    assert float(np.abs(audio[good] - reference[good]).max()) <= TOL
    assert synth.stats()["errors"] == synth.errors


def test_push_after_flush_needs_reset(backends):
    synth = StreamingSynthesizer(backends["torch"])
    synth.push([1, 2, 3])
    synth.flush()
    with pytest.raises(RuntimeError, match="reset"):
        synth.push(4)
    synth.reset()
    assert synth.units_received == 0


def test_config_errors(backends):
    with pytest.raises(ValueError, match="frame_ms"):
        StreamingSynthesizer(backends["torch"], frame_ms=30)
    with pytest.raises(ValueError, match="chunk_frames"):
        StreamingSynthesizer(backends["torch"], chunk_frames=0)
    with pytest.raises(ValueError, match="max_chunk_frames"):
        StreamingSynthesizer(backends["torch"], chunk_frames=8, max_chunk_frames=4)
    with pytest.raises(ValueError, match="mode"):
        StreamingSynthesizer(backends["torch"], mode="fast")
    with pytest.raises(ValueError, match="low_latency_right_frames"):
        StreamingSynthesizer(backends["torch"], mode="low_latency", low_latency_right_frames=30)


def test_low_latency_with_full_context_and_no_crossfade_is_exact(tiny, backends):
    units = np.random.default_rng(11).integers(0, 1000, 40)
    synth = StreamingSynthesizer(backends["torch"], mode="low_latency", low_latency_right_frames=21, crossfade_ms=0,
                                 chunk_frames=4)
    audio = synth.synthesize_all([int(u) for u in units])
    assert float(np.abs(audio - tiny.synthesize(units)).max()) <= TOL


def test_low_latency_releases_audio_earlier_and_stays_close(tiny, backends):
    units = np.random.default_rng(12).integers(0, 1000, 60)
    reference = tiny.synthesize(units)

    def run(**kwargs):
        synth = StreamingSynthesizer(backends["torch"], chunk_frames=4, **kwargs)
        frames, first_unit = [], None
        for i, u in enumerate(units):
            new = synth.push(int(u))
            if new and first_unit is None:
                first_unit = i + 1
            frames += new
        frames += synth.flush()
        return frames_to_audio(frames), first_unit, synth

    exact, exact_first, _ = run()
    low, low_first, synth = run(mode="low_latency", low_latency_right_frames=4, crossfade_ms=5)
    assert exact.shape == low.shape == reference.shape
    assert low_first < exact_first
    assert synth.crossfade_samples == 80
    diff = low - reference
    assert float(np.abs(diff).max()) > TOL  # it is an approximation
    snr = 10 * np.log10(np.sum(reference**2) / np.sum(diff**2))
    print(f"low-latency (4 frames right context, 5 ms crossfade) vs exact: SNR {snr:.1f} dB")
    assert snr > 3.0


def test_async_stream_matches_and_cancels(tiny, backends):
    units = np.random.default_rng(13).integers(0, 1000, 30)

    async def unit_source(items):
        for item in items:
            await asyncio.sleep(0)
            yield item

    async def collect(synth, items):
        return [frame async for frame in synth.astream(unit_source(items))]

    synth = StreamingSynthesizer(backends["onnx"], chunk_frames=4)
    frames = asyncio.run(collect(synth, [int(u) for u in units]))
    assert float(np.abs(frames_to_audio(frames) - tiny.synthesize(units)).max()) <= TOL

    async def cancel_after_first_frame(synth):
        got = []
        async for frame in synth.astream(unit_source([int(u) for u in units])):
            got.append(frame)
            synth.cancel()
        return got

    synth = StreamingSynthesizer(backends["onnx"], chunk_frames=4)
    got = asyncio.run(cancel_after_first_frame(synth))
    assert 1 <= len(got) <= 4  # the rest of the chunk already in hand at most, then nothing


def test_timing_records(backends):
    units = np.random.default_rng(14).integers(0, 1000, 40)
    synth = StreamingSynthesizer(backends["onnx"], chunk_frames=6)
    frames = []
    first_audio_at = None
    for i, u in enumerate(units):
        new = synth.push(int(u))
        if new and first_audio_at is None:
            first_audio_at = i + 1
        frames += new
    frames += synth.flush()
    stats = synth.stats()
    assert stats["chunks"] == len(synth.timings) > 0
    assert stats["first_audio_units"] == first_audio_at
    assert stats["audio_s"] == pytest.approx(len(frames) * 0.02)
    assert stats["first_audio_latency_ms"] >= synth.timings[0].compute_ms > 0
    assert stats["provider"] == "CPUExecutionProvider"
    assert [t.start_frame for t in synth.timings[1:]] == [t.end_frame for t in synth.timings[:-1]]
    assert all(t.window_start <= t.start_frame and t.end_frame <= t.window_start + t.window_frames for t in synth.timings)


def test_make_backend_selection(tiny, onnx_dir):
    assert make_backend(tiny, backend="torch", device="cpu").provider == "torch-cpu"
    onnx = make_backend(tiny, onnx_dir=onnx_dir, backend="auto", device="cpu")
    assert onnx.name == "onnx" and onnx.provider == "CPUExecutionProvider" and "CPU" in onnx.selection
    assert make_backend(tiny, backend="auto", device="cpu").name == "torch"
    with pytest.raises(ValueError, match="backend"):
        make_backend(tiny, backend="tensorrt")


def test_synthesizer_config_object(backends):
    config = SynthesizerConfig(chunk_frames=12, frame_ms=10)
    synth = StreamingSynthesizer(backends["torch"], config, sample_format="int16")
    assert synth.config.chunk_frames == 12 and synth.config.sample_format == "int16" and synth.frame_samples == 160


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["torch_cuda", "onnx_cuda"])
def test_exact_mode_on_cuda(tiny, onnx_dir, kind):
    """GPU tier: exact streaming on CUDA (CUDA graphs / IOBinding on the fixed windows) == whole utterance."""
    if kind == "torch_cuda":
        backend = TorchBackend(tiny, "cuda", cuda_graph_windows=(24, 29, 45, 50))
        assert backend.fixed_windows == (24, 29, 45, 50), backend.notes
    else:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider")
        backend = OnnxBackend(onnx_dir, "cuda")
        assert backend.provider == "CUDAExecutionProvider"
        print("onnxruntime CUDA:", backend.describe())
    rng = np.random.default_rng(77)
    for length in (1, 4, 23, 70):
        units = rng.integers(0, 1000, length)
        _, durations = backend.durations(units)
        assert np.array_equal(durations, tiny.predict_durations(units).numpy())
        whole_same_device = backend.generate(np.repeat(units, durations))
        for pattern in ("one", "burst", "all"):
            for chunk in (3, 8):
                synth = StreamingSynthesizer(backend, chunk_frames=chunk)
                audio = synth.synthesize_all(arrivals(units, pattern, rng))
                assert audio.shape == whole_same_device.shape
                assert float(np.abs(audio - whole_same_device).max()) <= TOL
                assert float(np.abs(audio - tiny.synthesize(units)).max()) <= 1e-4
                if length == 70:
                    assert any(t.fixed_window for t in synth.timings)


def test_synthesizer_and_onnx_runtime_import_without_torch():
    """The ONNX serving path must not need torch, and importing the synthesizer must not pull in either vocoder."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        "import streaming.synthesizer\n"
        "loaded = sorted(m for m in ('streaming.vocoder', 'streaming.vocoder_onnx') if m in sys.modules)\n"
        "assert not loaded, f'import streaming.synthesizer loaded {loaded}'\n"
        "import streaming.vocoder_onnx\n"
        "assert 'streaming.vocoder' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _streaming_imports() -> dict[str, set[str]]:
    """streaming module -> the streaming modules it imports anywhere in its source (module level or in functions)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "streaming"
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        name = f"streaming.{path.stem}"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name.startswith("streaming."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "streaming":
                    targets.update(f"streaming.{alias.name}" for alias in node.names)
                elif node.module.startswith("streaming."):
                    targets.add(node.module)
        graph[name] = targets - {name, "streaming.__init__"}
    return graph


def test_streaming_modules_import_each_other_without_cycles():
    """Lazy imports included: a cycle (as synthesizer <-> vocoder once was) means the layering is wrong."""
    graph = _streaming_imports()
    assert "streaming.synthesizer" not in graph["streaming.vocoder"]
    assert "streaming.vocoder_onnx" not in graph["streaming.vocoder"]
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_runtime_modules_do_not_import_the_tiny_writers():
    """Random-weight writers and fake fairseq classes are for make-tiny, tests and benchmarks only."""
    graph = _streaming_imports()
    importers = sorted(module for module, targets in graph.items() if "streaming.tiny_parts" in targets)
    assert all(module.startswith("streaming.bench_") for module in importers), importers
