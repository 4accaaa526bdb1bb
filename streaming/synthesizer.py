"""Streaming unit-to-speech: chunked unit HiFi-GAN whose output equals whole-utterance synthesis.

Units arrive one by one (or in bursts) while the LLM decodes. Facts that make exact chunking possible
(docs/speechgpt-format.md, Vocoder receptive field): a unit's duration depends on units [i-2, i+2]; an audio frame
depends on expanded frames [f-21, f+21]. So, in exact mode:
- a unit's duration is final once 2 more units arrived (or at `flush()`);
- frames [a, b) are generated from the window [a-21, b+21) (clipped at the real start / end) and cropped.
Both windows reproduce the whole utterance's zero padding only at the real ends, so the audio equals
`UnitVocoder.synthesize(all_units)` up to float rounding (tested at <= 1e-5).

Low-latency mode keeps the exact durations (2 units of lookahead, cheap) but gives the generator only
`low_latency_right_frames` of right context and hides the seam with a short crossfade: less waiting for units,
audio that deviates slightly from exact (measured by `speechgpt-rt bench-vocoder`).

Backends (one small interface, `VocoderBackend`): ONNX Runtime (CUDA + IOBinding + CUDA graphs for fixed windows,
or CPU) and torch (CPU or CUDA). This module imports neither torch nor onnxruntime at load time, so a process that
serves the exported ONNX model runs without torch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator, Literal, Protocol, Sequence

import numpy as np

from streaming.frames import AudioFrame, float32_to_int16, int16_to_float32
from streaming.vocoder_types import ReceptiveField, validate_units

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- backends


class VocoderBackend(Protocol):
    """What the streaming synthesizer needs from a vocoder runtime. Arrays in, arrays out, batch 1."""

    name: str  # "onnx" | "torch"
    provider: str  # what actually runs, e.g. "CUDAExecutionProvider", "CPUExecutionProvider", "torch-cuda"
    sample_rate: int
    hop_size: int
    num_embeddings: int
    receptive_field: ReceptiveField
    fixed_windows: tuple[int, ...]  # window lengths (frames) with a faster static-shape path

    def durations(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T,) int64 units -> ((T,) float32 log durations, (T,) int64 durations >= 1)."""
        ...

    def generate(self, expanded_units: np.ndarray) -> np.ndarray:
        """(W,) int64 expanded units -> (W * hop,) float32 audio."""
        ...

    def describe(self) -> dict[str, Any]: ...


class TorchBackend:
    """The reference `UnitVocoder` module on CPU or CUDA (eager; optional CUDA graphs for fixed windows)."""

    name = "torch"

    def __init__(
        self,
        vocoder: Any,
        device: str | None = None,
        *,
        threads: int | None = None,
        cuda_graph_windows: Sequence[int] = (),
        allow_tf32: bool = False,
    ) -> None:
        import torch

        self._torch = torch
        if device is None or device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(int(threads))  # process-wide, as torch has it
        self.device = torch.device(device)
        if self.device.type == "cuda" and not allow_tf32:
            # fp32 means fp32: cuDNN would otherwise run these convolutions in TF32 (~1e-3 off). Process-wide flag.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        if vocoder.device != self.device:
            import copy

            vocoder = copy.deepcopy(vocoder)  # leave the caller's module where it is
        self.vocoder = vocoder.to(self.device).float().eval()
        config = vocoder.config
        self.sample_rate = config.sampling_rate
        self.hop_size = config.code_hop_size
        self.num_embeddings = config.num_embeddings
        self.receptive_field = vocoder.receptive_field
        self.provider = f"torch-{self.device.type}"
        self.notes: list[str] = []
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        if self.device.type == "cuda":
            for window in sorted(set(int(w) for w in cuda_graph_windows)):
                try:
                    self._graphs[window] = self._capture(window)
                except Exception as exc:  # noqa: BLE001 - eager still works; say why the graph did not
                    self.notes.append(f"torch CUDA graph w{window} unavailable ({type(exc).__name__}: {exc})")
        self.fixed_windows = tuple(sorted(self._graphs))

    def _capture(self, window: int) -> tuple[Any, Any, Any]:
        torch = self._torch
        static_in = torch.zeros(1, window, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.vocoder(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.vocoder(static_in)
        return graph, static_in, static_out

    def durations(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from streaming.vocoder import durations_from_log

        torch = self._torch
        with torch.inference_mode():
            ids = torch.from_numpy(np.ascontiguousarray(units, dtype=np.int64)).to(self.device)[None]
            log_dur = self.vocoder.dur_predictor(self.vocoder.dict(ids))
            return log_dur[0].float().cpu().numpy(), durations_from_log(log_dur)[0].cpu().numpy()

    def generate(self, expanded_units: np.ndarray) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(np.ascontiguousarray(expanded_units, dtype=np.int64))[None]
        with torch.inference_mode():
            captured = self._graphs.get(ids.shape[1])
            if captured is not None:
                graph, static_in, static_out = captured
                static_in.copy_(ids, non_blocking=True)
                graph.replay()
                return static_out[0].cpu().numpy()
            return self.vocoder(ids.to(self.device))[0].float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "provider": self.provider, "fixed_windows": list(self.fixed_windows),
                "cuda_graph_windows": list(self.fixed_windows), "notes": list(self.notes)}


class OnnxBackend:
    """`streaming.vocoder_onnx.OnnxVocoderRuntime` behind the backend interface."""

    name = "onnx"

    def __init__(self, onnx_dir: str | Path, device: str = "cpu", *, threads: int | None = None,
                 use_cuda_graph: bool = True, load_fixed: bool | None = None) -> None:
        from streaming.vocoder_onnx import OnnxVocoderRuntime

        self.runtime = OnnxVocoderRuntime(onnx_dir, device=device, intra_op_threads=threads,
                                          use_cuda_graph=use_cuda_graph, load_fixed=load_fixed)
        self.receptive_field = self.runtime.receptive_field
        self.sample_rate = self.runtime.sample_rate
        self.hop_size = self.runtime.hop_size
        self.num_embeddings = self.runtime.num_embeddings
        self.provider = self.runtime.provider
        self.fixed_windows = self.runtime.fixed_windows
        self.notes = self.runtime.notes

    def durations(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.runtime.durations(units)

    def generate(self, expanded_units: np.ndarray) -> np.ndarray:
        return self.runtime.generate(expanded_units)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "provider": self.provider, "session_providers": dict(self.runtime.providers),
                "fixed_windows": list(self.fixed_windows),
                "cuda_graph_windows": list(self.runtime.cuda_graph_windows), "notes": list(self.notes)}


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def make_backend(
    vocoder: Any = None,
    *,
    onnx_dir: str | Path | None = None,
    backend: Literal["auto", "onnx", "torch"] = "auto",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    threads: int | None = None,
    use_cuda_graph: bool = True,
    cuda_graph_windows: Sequence[int] = (),
) -> VocoderBackend:
    """Pick a runtime. `vocoder`: a UnitVocoder or a path `load_vocoder` accepts; `onnx_dir`: an export.

    auto: on CUDA, ONNX Runtime's CUDA provider if it exists and a session really runs on it, else torch CUDA;
    on CPU, ONNX Runtime if an export is given, else torch. `backend.selection` says what was chosen and why.
    backend="onnx" without `onnx_dir` exports `vocoder` to a temporary directory first (seconds).
    """
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"backend must be auto, onnx or torch, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if isinstance(vocoder, (str, Path)):
        from streaming.vocoder import load_vocoder

        vocoder = load_vocoder(vocoder)
    if device == "auto":
        device = "cuda" if _torch_cuda_available() else "cpu"

    def onnx_backend() -> OnnxBackend:
        nonlocal onnx_dir
        if onnx_dir is None:
            if vocoder is None:
                raise ValueError("backend 'onnx' needs onnx_dir (an export) or a vocoder to export")
            from streaming.vocoder_onnx import export_vocoder

            onnx_dir = tempfile.mkdtemp(prefix="speechgpt-rt-vocoder-onnx-")
            export_vocoder(vocoder, onnx_dir, verify=False)
        return OnnxBackend(onnx_dir, device=device, threads=threads, use_cuda_graph=use_cuda_graph)

    def torch_backend() -> TorchBackend:
        if vocoder is None:
            raise ValueError("backend 'torch' needs a vocoder (UnitVocoder or its path)")
        return TorchBackend(vocoder, device, threads=threads,
                            cuda_graph_windows=cuda_graph_windows if use_cuda_graph else ())

    chosen: Any
    if backend == "onnx":
        chosen, reason = onnx_backend(), "requested"
    elif backend == "torch":
        chosen, reason = torch_backend(), "requested"
    elif device == "cuda":
        reason = ""
        chosen = None
        if _ort_has_cuda() and (onnx_dir is not None or vocoder is not None):
            try:
                chosen, reason = onnx_backend(), "auto: onnxruntime CUDA provider in use"
            except Exception as exc:  # noqa: BLE001 - the torch CUDA fallback is the plan for this case
                reason = f"auto: onnxruntime CUDA unusable ({type(exc).__name__}: {exc}); torch CUDA instead"
        else:
            reason = "auto: onnxruntime has no CUDAExecutionProvider; torch CUDA instead"
        if chosen is None:
            chosen = torch_backend()
    else:
        if onnx_dir is not None:
            chosen, reason = onnx_backend(), "auto: CPU with an ONNX export"
        else:
            chosen, reason = torch_backend(), "auto: CPU without an ONNX export"
    chosen.selection = reason
    log.info("vocoder backend: %s on %s (%s)", chosen.name, chosen.provider, reason)
    return chosen


# ------------------------------------------------------------------------------------------------- synthesizer


@dataclass(frozen=True)
class SynthesizerConfig:
    mode: Literal["exact", "low_latency"] = "exact"
    chunk_frames: int = 8  # expanded frames (20 ms each) per generator call in steady state
    first_chunk_frames: int | None = None  # a smaller first chunk for earlier first audio (default chunk_frames)
    # when more than chunk_frames are ready at once (a burst, or compute fell behind), take up to this many in one
    # window: fewer context recomputations (cheaper on CPU). Default chunk_frames: fixed sizes for CUDA graphs.
    max_chunk_frames: int | None = None
    frame_ms: int = 20  # AudioFrame length: 10 or 20 ms
    sample_format: Literal["float32", "int16"] = "float32"
    low_latency_right_frames: int = 4  # generator right context in low-latency mode (exact needs 21)
    crossfade_ms: float = 5.0  # low-latency only: raised-cosine crossfade at chunk seams

    def validate(self, right_frames: int, hop: int, sample_rate: int) -> None:
        if self.mode not in ("exact", "low_latency"):
            raise ValueError(f"mode must be 'exact' or 'low_latency', got {self.mode!r}")
        if self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.first_chunk_frames is not None and self.first_chunk_frames < 1:
            raise ValueError(f"first_chunk_frames must be >= 1, got {self.first_chunk_frames}")
        if self.max_chunk_frames is not None and self.max_chunk_frames < self.chunk_frames:
            raise ValueError(
                f"max_chunk_frames ({self.max_chunk_frames}) must be >= chunk_frames ({self.chunk_frames})"
            )
        if self.frame_ms not in (10, 20):
            raise ValueError(f"frame_ms must be 10 or 20, got {self.frame_ms}")
        if hop % (sample_rate * self.frame_ms // 1000):
            raise ValueError(f"frame_ms {self.frame_ms} does not divide the vocoder hop of {hop} samples")
        if self.sample_format not in ("float32", "int16"):
            raise ValueError(f"sample_format must be 'float32' or 'int16', got {self.sample_format!r}")
        if not 0 <= self.low_latency_right_frames <= right_frames:
            raise ValueError(
                f"low_latency_right_frames must be in [0, {right_frames}], got {self.low_latency_right_frames}"
            )
        if self.crossfade_ms < 0:
            raise ValueError(f"crossfade_ms must be >= 0, got {self.crossfade_ms}")


@dataclass(frozen=True)
class ChunkTiming:
    index: int
    start_frame: int  # emitted expanded frames [start_frame, end_frame)
    end_frame: int
    window_start: int  # generator input window
    window_frames: int
    fixed_window: bool  # ran on a static-shape path (CUDA graph / fixed session)
    compute_ms: float  # generator call
    latency_ms: float  # from the start of the push()/flush() call that released this chunk to its audio being ready
    units_received: int  # units pushed when the chunk was released
    since_first_unit_ms: float  # from the first push() of the reply to this chunk's audio being ready


class StreamingSynthesizer:
    """Units in, `AudioFrame`s out, for one reply at a time.

    A plain synchronous object: `push(units)` / `flush()` return the frames that became ready (`push_iter` /
    `flush_iter` yield them chunk by chunk), `cancel()` may be called from another thread or task (barge-in),
    `reset()` starts the next reply. Frames carry `timestamp` = sample offset / sample rate from the reply start.
    """

    def __init__(self, backend: VocoderBackend, config: SynthesizerConfig | None = None, **overrides: Any) -> None:
        config = replace(config or SynthesizerConfig(), **overrides)
        rf = backend.receptive_field
        config.validate(rf.right_frames, backend.hop_size, backend.sample_rate)
        self.backend = backend
        self.config = config
        self.hop = backend.hop_size
        self.sample_rate = backend.sample_rate
        self.left = rf.left_frames
        self.right = rf.right_frames if config.mode == "exact" else config.low_latency_right_frames
        self.dur_left = rf.duration_left_units
        self.dur_right = rf.duration_right_units
        self.frame_samples = self.sample_rate * config.frame_ms // 1000
        crossfade = int(round(config.crossfade_ms * self.sample_rate / 1000)) if config.mode == "low_latency" else 0
        self.crossfade_samples = min(crossfade, self.right * self.hop)
        ramp = (np.arange(self.crossfade_samples) + 0.5) / max(1, self.crossfade_samples)
        self._fade_in = (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)  # raised cosine, 0 -> 1
        self._lock = threading.Lock()  # one producer at a time; cancel() does not take it
        self.reset()

    # ---- state
    def reset(self) -> None:
        """Forget the current reply (after flush or cancel) and start a new one."""
        self._units = np.zeros(0, dtype=np.int64)
        self._durations_final = 0  # units whose duration is final
        self._final_durations = np.zeros(0, dtype=np.int64)
        self._expanded = np.zeros(256, dtype=np.int64)
        self._frames_known = 0  # expanded frames of final units
        self._emitted = 0  # expanded frames already turned into audio
        self._samples_out = 0
        self._tail: np.ndarray | None = None  # low-latency: audio past the last seam, for the crossfade
        self._flushed = False
        self._cancelled = False
        self._first_push_t: float | None = None
        self.timings: list[ChunkTiming] = []
        self.duration_calls_ms: list[float] = []
        self.errors: list[str] = []  # malformed model outputs that were reported and worked around

    def cancel(self) -> None:
        """Barge-in: stop now. The chunk being computed (if any) is dropped; nothing is emitted until reset()."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        return self._flushed and self._emitted == self._frames_known

    @property
    def units_received(self) -> int:
        return int(self._units.size)

    @property
    def frames_emitted(self) -> int:
        return self._emitted

    @property
    def durations(self) -> np.ndarray:
        """Final durations so far (all of them after flush)."""
        return self._final_durations.copy()

    # ---- producing
    def push(self, units: int | Sequence[int] | np.ndarray) -> list[AudioFrame]:
        """Add units (one id or a burst); returns the frames that became final."""
        return [frame for chunk in self.push_iter(units) for frame in chunk]

    def flush(self) -> list[AudioFrame]:
        """End of the unit span: every remaining frame."""
        return [frame for chunk in self.flush_iter() for frame in chunk]

    def push_iter(self, units: int | Sequence[int] | np.ndarray) -> Iterator[list[AudioFrame]]:
        """Register units now; the returned iterator computes the released chunks one by one (frames per chunk)."""
        started = time.perf_counter()
        ids = validate_units(units, self.backend.num_embeddings, allow_empty=True, offset=int(self._units.size))
        if self._cancelled:
            return iter(())
        if self._flushed:
            raise RuntimeError("push() after flush(): call reset() to start the next reply")
        if self._first_push_t is None:
            self._first_push_t = started
        self._units = np.concatenate([self._units, ids])
        return self._produce(started)

    def flush_iter(self) -> Iterator[list[AudioFrame]]:
        started = time.perf_counter()
        if self._cancelled or self._flushed:
            self._flushed = True
            return iter(())
        self._flushed = True
        if self._first_push_t is None:
            self._first_push_t = started
        return self._produce(started)

    def _produce(self, started: float) -> Iterator[list[AudioFrame]]:
        first = True
        while not self._cancelled:
            # one producer at a time (cancel() needs no lock); the lock is not held while the caller has the frames
            if not self._lock.acquire(blocking=False):
                raise RuntimeError("StreamingSynthesizer used from two producers at once")
            try:
                if first:
                    self._finalize_durations()
                    first = False
                chunk = self._next_chunk()
                frames = None if chunk is None else self._run_chunk(*chunk, started)
            finally:
                self._lock.release()
            if frames is None or self._cancelled:  # cancelled while the chunk was computed: drop it
                return
            yield frames

    def _finalize_durations(self) -> None:
        n = int(self._units.size)
        final_upto = n if self._flushed else max(0, n - self.dur_right)
        if final_upto <= self._durations_final:
            return
        # unit i needs units [i - dur_left, i + dur_right]; the window's own edges are padded, so start it
        # dur_left units early and keep everything to the right (extra right context changes nothing)
        window_start = max(0, self._durations_final - self.dur_left)
        t0 = time.perf_counter()
        _, durations = self.backend.durations(self._units[window_start:n])
        self.duration_calls_ms.append((time.perf_counter() - t0) * 1e3)
        new = np.asarray(durations[self._durations_final - window_start : final_upto - window_start], dtype=np.int64)
        if new.shape != (final_upto - self._durations_final,) or (new.size and int(new.min()) < 1):
            # a malformed model output must not end the reply: report it, fall back to one frame per unit
            self._report(f"duration predictor returned {new.tolist()[:8]} for {final_upto - self._durations_final} "
                         "units (need one duration >= 1 each); using 1")
            new = np.ones(final_upto - self._durations_final, dtype=np.int64)
        self._final_durations = np.concatenate([self._final_durations, new])
        expanded = np.repeat(self._units[self._durations_final : final_upto], new)
        needed = self._frames_known + expanded.size
        if needed > self._expanded.size:
            grown = np.zeros(max(needed, 2 * self._expanded.size), dtype=np.int64)
            grown[: self._frames_known] = self._expanded[: self._frames_known]
            self._expanded = grown
        self._expanded[self._frames_known : needed] = expanded
        self._frames_known = needed
        self._durations_final = final_upto

    def _next_chunk(self) -> tuple[int, int] | None:
        """Frames [a, b) to emit next, or None when more units are needed."""
        a, total = self._emitted, self._frames_known
        done = self._flushed  # all durations are final after flush
        ready_end = total if done else total - self.right
        if ready_end <= a:
            return None
        if not self.timings:  # the first chunk stays small: it sets the time to first audio
            target = limit = self.config.first_chunk_frames or self.config.chunk_frames
        else:
            target = self.config.chunk_frames
            limit = self.config.max_chunk_frames or target
        if not done and ready_end - a < target:
            return None
        return a, min(a + limit, ready_end)

    def _window(self, a: int, b: int) -> tuple[int, int, bool]:
        """Generator input [start, end) for frames [a, b): [a-left, b+right) clipped to the known frames, grown to a
        fixed window size when one fits inside the known frames (extra context never changes the cropped audio)."""
        total = self._frames_known
        start, end = max(0, a - self.left), min(total, b + self.right)
        for window in sorted(self.backend.fixed_windows):
            if window >= end - start and window <= total:
                fixed_start = min(start, total - window)
                return fixed_start, fixed_start + window, True
        return start, end, False

    def _run_chunk(self, a: int, b: int, started: float) -> list[AudioFrame]:
        start, end, fixed = self._window(a, b)
        t0 = time.perf_counter()
        audio = self.backend.generate(self._expanded[start:end])
        t1 = time.perf_counter()
        expected = (end - start) * self.hop
        finite = isinstance(audio, np.ndarray) and bool(np.all(np.isfinite(audio)))
        if getattr(audio, "shape", None) != (expected,) or not finite:
            # a malformed model output must not end the reply: report it, keep the timeline with silence
            self._report(f"generator returned shape {getattr(audio, 'shape', None)} (all finite: {finite}) for "
                         f"{end - start} frames, expected ({expected},); frames [{a}, {b}) replaced by silence")
            audio = np.zeros(expected, dtype=np.float32)
        hop = self.hop
        out = np.array(audio[(a - start) * hop : (b - start) * hop], dtype=np.float32)
        if self.crossfade_samples:
            c = self.crossfade_samples
            if self._tail is not None:
                n = min(c, out.size, self._tail.size)
                out[:n] = self._tail[:n] * (1.0 - self._fade_in[:n]) + out[:n] * self._fade_in[:n]
            # audio just past b from this window, to fade out of at the next seam
            tail_end = min((b - start) * hop + c, audio.size)
            self._tail = None
            if b < self._frames_known:
                self._tail = np.array(audio[(b - start) * hop : tail_end], dtype=np.float32)
        frames = self._to_frames(out)
        self._emitted = b
        done_t = time.perf_counter()
        self.timings.append(
            ChunkTiming(
                index=len(self.timings),
                start_frame=a,
                end_frame=b,
                window_start=start,
                window_frames=end - start,
                fixed_window=fixed,
                compute_ms=(t1 - t0) * 1e3,
                latency_ms=(done_t - started) * 1e3,
                units_received=int(self._units.size),
                since_first_unit_ms=(done_t - (self._first_push_t or started)) * 1e3,
            )
        )
        return frames

    def _report(self, message: str) -> None:
        self.errors.append(message)
        log.error("streaming synthesizer: %s", message)

    def _to_frames(self, audio: np.ndarray) -> list[AudioFrame]:
        if self.config.sample_format == "int16":
            audio = float32_to_int16(audio)  # the project's one int16 convention (frames.py)
        n = self.frame_samples
        frames = []
        for offset in range(0, audio.size, n):
            frames.append(AudioFrame(samples=audio[offset : offset + n], sample_rate=self.sample_rate, channels=1,
                                     timestamp=(self._samples_out + offset) / self.sample_rate))
        self._samples_out += audio.size
        return frames

    # ---- convenience
    def synthesize_all(self, units: Iterable[int | Sequence[int]]) -> np.ndarray:
        """Push each item, flush, return the concatenated audio (float32). For tests and offline use."""
        frames: list[AudioFrame] = []
        for item in units:
            frames += self.push(item)
        frames += self.flush()
        return frames_to_audio(frames)

    async def astream(
        self, units: AsyncIterable[int | Sequence[int]], *, in_thread: bool = True
    ) -> AsyncIterator[AudioFrame]:
        """Async helper: consume units from an async iterable, yield frames as chunks complete. Generator work runs
        in a worker thread (`asyncio.to_thread`) so the event loop stays free; `cancel()` stops the stream."""

        async def drain(chunks: Iterator[list[AudioFrame]]) -> AsyncIterator[AudioFrame]:
            while True:
                chunk = await asyncio.to_thread(next, chunks, None) if in_thread else next(chunks, None)
                if chunk is None or self._cancelled:
                    return
                for frame in chunk:
                    yield frame

        async for item in units:
            if self._cancelled:
                return
            async for frame in drain(self.push_iter(item)):
                yield frame
        if not self._cancelled:
            async for frame in drain(self.flush_iter()):
                yield frame

    def stats(self) -> dict[str, Any]:
        """Timing summary for metrics: per-chunk compute, first-audio latency, real-time factor."""
        compute = [t.compute_ms for t in self.timings]
        audio_s = self._samples_out / self.sample_rate
        total_ms = sum(compute) + sum(self.duration_calls_ms)
        first = self.timings[0] if self.timings else None
        return {
            "mode": self.config.mode,
            "chunk_frames": self.config.chunk_frames,
            "backend": self.backend.name,
            "provider": self.backend.provider,
            "chunks": len(self.timings),
            "audio_s": audio_s,
            "compute_ms_total": total_ms,
            "rtf": (total_ms / 1e3 / audio_s) if audio_s else math.nan,
            "chunk_compute_ms_median": float(np.median(compute)) if compute else math.nan,
            "chunk_compute_ms_p90": float(np.percentile(compute, 90)) if compute else math.nan,
            "duration_calls": len(self.duration_calls_ms),
            "duration_ms_median": float(np.median(self.duration_calls_ms)) if self.duration_calls_ms else math.nan,
            "first_audio_latency_ms": first.latency_ms if first else math.nan,
            "first_audio_units": first.units_received if first else None,
            "time_to_first_audio_ms": first.since_first_unit_ms if first else math.nan,
            "errors": list(self.errors),
        }


def frames_to_audio(frames: Sequence[AudioFrame]) -> np.ndarray:
    """Concatenate frames to one float32 waveform (int16 frames scaled to [-1, 1])."""
    if not frames:
        return np.zeros(0, dtype=np.float32)
    parts = [int16_to_float32(f.samples) if f.samples.dtype == np.int16 else f.samples for f in frames]
    return np.concatenate(parts).astype(np.float32, copy=False)
