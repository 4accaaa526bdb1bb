"""The fast text-side generator: SpeechGPT's LLM on our decode engine (kernels.engine.DecodeEngine).

Same interface and, on the CPU in fp32, the same tokens for a seed as `agent.reference.ReferenceGenerator` (the
engine's CPU path runs the torch reference ops and draws like HF's multinomial). On CUDA it is the fast path:
graph-replayed decode steps on our Triton kernels, graph-replayed prefill buckets.

`speech_mode=True` switches the engine's restricted head on: inside a unit span only unit and special rows are
scored (faster, and the same distribution as masking the full logits); the default samples over the full
vocabulary exactly like the original code.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from agent.bundle import BundlePaths
from agent.generation import SPEECHGPT_MAX_NEW_TOKENS, TokenGenerator, open_llm
from agent.tokenizer import SpeechGPTTokenizer
from kernels.engine import DecodeEngine
from kernels.model import LlamaWeights
from kernels.sampling import SPEECHGPT_SAMPLING, SamplingParams

__all__ = ["EngineGenerator"]


class EngineGenerator(TokenGenerator):
    def __init__(self, tokenizer: SpeechGPTTokenizer, engine: DecodeEngine, speech_mode: bool = False):
        self.tokenizer = tokenizer
        self.engine = engine
        self.speech_mode = speech_mode
        self.max_positions = engine.max_seq

    @classmethod
    def from_bundle(
        cls,
        paths: BundlePaths,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        speech_mode: bool = False,
        **engine_kw,
    ) -> "EngineGenerator":
        """Load the LLM (release layout with the LoRA merged, or a converted bundle) onto the engine. On CUDA the
        GEMV and fused-kernel tile choices are measured at load (`gemv="auto"`) unless engine_kw says otherwise."""
        tokenizer, ckpt = open_llm(paths)
        vocab = tokenizer.vocab
        engine_kw.setdefault("gemv", "auto" if str(device).startswith("cuda") else "torch")
        engine = DecodeEngine(
            LlamaWeights.from_checkpoint(ckpt, dtype, device),
            unit_rows_start=vocab.speech_rows[0],
            unit_span_ids=(vocab.sosp, vocab.eosp),
            **engine_kw,
        )
        return cls(tokenizer, engine, speech_mode)

    def warmup(self, params: SamplingParams = SPEECHGPT_SAMPLING) -> float:
        """Capture the CUDA graphs a turn needs (every prefill bucket, the decode step for these sampling settings)
        now, so the first turn does not pay for it, after racing the engine's decode step variants (DecodeEngine.
        tune_step; the choice is in engine.tune_report); returns the seconds spent. A no-op on the CPU."""
        t0 = time.perf_counter()
        self.engine.warmup_prefill()
        self.engine.warmup(params, self.speech_mode)
        return time.perf_counter() - t0

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams = SPEECHGPT_SAMPLING,
        seed: int = 0,
        max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS,
        timing: dict | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids until EOS or the budget. Closing the iterator early (barge-in, or a caller that
        has what it needs) cancels the decode and frees the engine for the next call."""
        budget = self._budget(prompt_ids, max_new_tokens)
        t0 = time.perf_counter()
        self.engine.prefill(prompt_ids, start_pos=0)
        decode = self.engine.decode(params, seed=seed, max_new_tokens=budget, speech_mode=self.speech_mode)
        try:
            for step, token in enumerate(decode):
                if timing is not None:
                    now = time.perf_counter()
                    if step == 0:
                        timing["prefill_s"] = now - t0  # prompt prefill + first token, like the reference
                    timing["decode_s"] = now - t0 - timing["prefill_s"]
                yield token
        finally:
            decode.close()
