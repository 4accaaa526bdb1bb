"""What a process loads once and every conversation shares: `SpeechGPTModel`, with a `session()` factory.

Per process: the LLM weights on the decode engine with every load-time decision (GEMV and fused-kernel configs,
the step-variant race), the tokenizer, mHuBERT + k-means, and the vocoder backend. Per conversation (`Session`):
its own KV cache, CUDA graphs and sampler state (`DecodeEngine.fork()` over the shared weights), its own VAD,
incremental unit extractor and streaming synthesizer. The split follows LiveKit Agents' RealtimeModel /
RealtimeSession: one heavy object, many light sessions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agent.bundle import BundlePaths, resolve_bundle
from agent.tokenizer import SpeechGPTTokenizer
from kernels.engine import DecodeEngine


@dataclass(frozen=True)
class LoadReport:
    load_s: float
    warmup_s: float
    device: str
    step_variant: str
    vocoder_backend: str
    batched_slots: int | None = None  # sessions' KV slots of the batched engine (None: one engine fork per session)


class SpeechGPTModel:
    def __init__(self, paths: BundlePaths, tokenizer: SpeechGPTTokenizer, engine: DecodeEngine, units, vocoder_backend,
                 device: str = "cpu", report: LoadReport | None = None, batched=None):
        self.paths = paths
        self.tokenizer = tokenizer
        self.engine = engine  # the template each session forks; never decodes itself
        self.units = units  # streaming.units.UnitExtractor (stateless between calls)
        self.vocoder_backend = vocoder_backend  # streaming.synthesizer.VocoderBackend
        self.device = device
        self.report = report
        self.batched = batched  # kernels.batch_engine.BatchedEngine: every session's decode steps batched together
        self._sessions = 0

    @classmethod
    def load(cls, model_dir: Path | str, device: str = "cpu", dtype: torch.dtype | None = None,
             vocoder_backend: str = "auto", warmup: bool = True, batch=None) -> "SpeechGPTModel":
        """Load a release layout, a converted bundle or the tiny bundle. On CUDA the engine measures its kernels
        and races its step variants here, once (fp16 there by default, fp32 on the CPU). batch: a
        kernels.batch_engine.BatchConfig = sessions decode in one batched engine (one KV slot each, admission
        control) instead of one engine fork each."""
        from agent.engine_generator import EngineGenerator
        from streaming.synthesizer import make_backend
        from streaming.units import UnitExtractor
        from streaming.vocoder import load_vocoder

        t0 = time.perf_counter()
        paths = resolve_bundle(model_dir)
        if dtype is None:
            dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
        generator = EngineGenerator.from_bundle(paths, dtype=dtype, device=device)
        units = UnitExtractor.from_files(paths.hubert, paths.kmeans, device)
        onnx_dir = paths.vocoder / "onnx"  # a converted bundle carries the ONNX export
        backend = make_backend(load_vocoder(paths.vocoder, device), backend=vocoder_backend,
                               device="cuda" if str(device).startswith("cuda") else "cpu",
                               onnx_dir=onnx_dir if onnx_dir.is_dir() else None)
        load_s = time.perf_counter() - t0
        warmup_s = generator.warmup() if warmup else 0.0
        engine = generator.engine
        batched = None
        if batch is not None:
            from dataclasses import replace

            from kernels.batch_engine import BatchedEngine

            batched = BatchedEngine(engine.model.w, unit_rows_start=engine.model.unit_rows_start,
                                    unit_span_ids=(engine.sosp_id, engine.eosp_id),
                                    config=replace(batch, max_seq=batch.max_seq or engine.max_seq))
        report = LoadReport(load_s, warmup_s, str(device), engine.step_variant.name, getattr(backend, "name", "?"),
                            batched.cache.slots if batched is not None else None)
        return cls(paths, generator.tokenizer, engine, units, backend, str(device), report, batched)

    def new_engine(self):
        """A decode engine for one more conversation: a fork (own KV cache and graphs, shared weights and tuning), or
        with batching a slot of the batched engine (raises kernels.batch_engine.AdmissionRefused when it is full)."""
        if self.batched is not None:
            return self.batched.open_slot()
        return self.engine.fork()

    def session(self, input, output, config=None, clock=None, name: str | None = None,
                attributes: dict[str, str] | None = None):
        """A conversation over `input` / `output` (agent.io contracts). Run it with `await session.run()`.
        `attributes`: what the transport knows of the conversation (a caller id, a room name), kept on the session."""
        from agent.session import Session

        self._sessions += 1
        return Session(self, input, output, config, clock, name=name or f"session-{self._sessions}", attributes=attributes)
