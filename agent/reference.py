"""Reference text-side generator: transformers `LlamaForCausalLM` with SpeechGPT's sampling, exactly.

This is the correctness reference for the decode engine: straightforward HF forward passes with a growing cache,
HF 4.33's sampling order (min-new-tokens EOS ban -> temperature -> top-k -> top-p -> multinomial, over the full
vocabulary), fed by the protocol layer and parsed by the streaming parser.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator, Sequence

import torch

from agent.bundle import BundlePaths
from agent.generation import SPEECHGPT_MAX_NEW_TOKENS, GenerationResult, TokenGenerator, open_llm
from agent.tokenizer import SpeechGPTTokenizer
from kernels.hf_reference import build_hf_llama
from kernels.sampling import SPEECHGPT_SAMPLING, SamplingParams, sample_reference

__all__ = ["SPEECHGPT_MAX_NEW_TOKENS", "SPEECHGPT_SAMPLING", "GenerationResult", "ReferenceGenerator", "build_hf_llama"]


class ReferenceGenerator(TokenGenerator):
    """transformers LlamaForCausalLM, a growing DynamicCache, HF 4.33 sampling on the CPU."""

    def __init__(self, tokenizer: SpeechGPTTokenizer, model, device: str | torch.device = "cpu"):
        self.tokenizer = tokenizer
        self.model = model
        self.device = torch.device(device)
        self.max_positions = int(model.config.max_position_embeddings)

    @classmethod
    def from_bundle(cls, paths: BundlePaths, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "ReferenceGenerator":
        tokenizer, ckpt = open_llm(paths)
        model = build_hf_llama(ckpt.arch, ckpt.state_dict(torch.float32), dtype, device)
        return cls(tokenizer, model, device)

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams = SPEECHGPT_SAMPLING,
        seed: int = 0,
        max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS,
        timing: dict | None = None,
        forced: Sequence[int] | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids one at a time until EOS or the token budget. `forced`: these tokens instead of
        samples, one per step (benchmarks: a fixed workload whatever the weights; the model runs every step)."""
        from transformers import DynamicCache

        budget = self._budget(prompt_ids, max_new_tokens)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cache = DynamicCache()
        ids = torch.tensor([prompt_ids], device=self.device)
        t0 = time.perf_counter()
        # transformers >= 5.2x calls the cache argument `cache`; older 5.x (the GPU machines) `past_key_values`.
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if forced is not None:
            budget = min(budget, len(forced))
        for step in range(budget):
            logits = self.model(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits[0, -1].float()
            token = int(sample_reference(logits.cpu(), params, step, gen)) if forced is None else int(forced[step])
            if timing is not None:
                now = time.perf_counter()
                if step == 0:
                    timing["prefill_s"] = now - t0  # prompt forward + first sample
                timing["decode_s"] = now - t0 - timing["prefill_s"]
            yield token
            if token == params.eos_id:
                return
            ids = torch.tensor([[token]], device=self.device)
