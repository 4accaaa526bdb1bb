"""Reference text-side generator: transformers `LlamaForCausalLM` with SpeechGPT's sampling, exactly.

This is the correctness reference for the decode engine: straightforward HF forward passes with a growing cache,
HF 4.33's sampling order (min-new-tokens EOS ban -> temperature -> top-k -> top-p -> multinomial, over the full
vocabulary), fed by the protocol layer and parsed by the streaming parser.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from agent.bundle import BundlePaths
from agent.parser import AnswerDone, Event, ParsedResponse, ResponseParser
from agent.prompts import Task
from agent.tokenizer import SpeechGPTTokenizer
from kernels.checkpoint import LlamaArch, LlamaCheckpoint
from kernels.sampling import SPEECHGPT_SAMPLING, SamplingParams, sample_reference

SPEECHGPT_MAX_NEW_TOKENS = 2048


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    response: ParsedResponse
    events: list[Event] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.decode_s if self.decode_s > 0 else float("nan")


def build_hf_llama(arch: LlamaArch, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device):
    """A transformers LlamaForCausalLM for `arch` whose parameters are `state_dict`'s tensors (assigned, not copied,
    where dtype and device already match; no random initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "torch_dtype"})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    # Buffers that are not in the state dict (rotary inv_freq) were created on meta: rebuild them on the device.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(device).eval()


class ReferenceGenerator:
    def __init__(self, tokenizer: SpeechGPTTokenizer, model, device: str | torch.device = "cpu"):
        self.tokenizer = tokenizer
        self.model = model
        self.device = torch.device(device)
        self.max_positions = int(model.config.max_position_embeddings)

    @classmethod
    def from_bundle(cls, paths: BundlePaths, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "ReferenceGenerator":
        tokenizer = SpeechGPTTokenizer.from_dir(paths.tokenizer_dir)
        ckpt = LlamaCheckpoint(paths.llm_dir, paths.lora_dir)
        if ckpt.arch.vocab_size != tokenizer.vocab.vocab_size:
            raise ValueError(
                f"{paths.llm_dir / 'config.json'}: vocab_size {ckpt.arch.vocab_size} does not match the tokenizer's "
                f"{tokenizer.vocab.vocab_size} tokens"
            )
        model = build_hf_llama(ckpt.arch, ckpt.state_dict(torch.float32), dtype, device)
        return cls(tokenizer, model, device)

    def max_new_tokens_for(self, prompt_len: int, requested: int = SPEECHGPT_MAX_NEW_TOKENS) -> int:
        """SpeechGPT asks for 2048 new tokens; we also stop at the 2048-position context it was trained on."""
        return max(0, min(requested, self.max_positions - prompt_len))

    @torch.no_grad()
    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams = SPEECHGPT_SAMPLING,
        seed: int = 0,
        max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS,
        timing: dict | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids one at a time until EOS or the token budget."""
        from transformers import DynamicCache

        if not prompt_ids:
            raise ValueError("empty prompt")
        budget = self.max_new_tokens_for(len(prompt_ids), max_new_tokens)
        if budget == 0:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_positions}-position context")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        cache = DynamicCache()
        ids = torch.tensor([prompt_ids], device=self.device)
        t0 = time.perf_counter()
        # transformers >= 5.2x calls the cache argument `cache`; older 5.x (the GPU machines) `past_key_values`.
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        for step in range(budget):
            logits = self.model(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits[0, -1].float()
            token = int(sample_reference(logits.cpu(), params, step, gen))
            if timing is not None:
                now = time.perf_counter()
                if step == 0:
                    timing["prefill_s"] = now - t0  # prompt forward + first sample
                timing["decode_s"] = now - t0 - timing["prefill_s"]
            yield token
            if token == params.eos_id:
                return
            ids = torch.tensor([[token]], device=self.device)

    def generate(
        self,
        prompt: str | list[int],
        task: Task | str = Task.SPEECH,
        seed: int = 0,
        params: SamplingParams = SPEECHGPT_SAMPLING,
        max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS,
        stop_at_answer_end: bool = False,
    ) -> GenerationResult:
        """Generate and parse one answer. With `stop_at_answer_end` decoding stops at `<eoa>` (saves the final
        "." and EOS); the default runs to EOS like the official code."""
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        parser = ResponseParser(self.tokenizer, task)
        timing: dict = {}
        new_ids: list[int] = []
        events: list[Event] = []
        for token in self.stream(prompt_ids, params, seed, max_new_tokens, timing):
            new_ids.append(token)
            events += parser.feed(token)
            if parser.done and (stop_at_answer_end or token == params.eos_id):
                break
        if not parser.done:
            events += parser.finish("length")
        elif not any(isinstance(e, AnswerDone) for e in events):  # pragma: no cover - parser always ends with it
            raise AssertionError("parser finished without AnswerDone")
        return GenerationResult(
            prompt_ids, new_ids, parser.response, events, timing.get("prefill_s", 0.0), timing.get("decode_s", 0.0)
        )
