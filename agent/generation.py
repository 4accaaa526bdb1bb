"""What every text-side generator shares: the token budget, and turning a token stream into a parsed answer.

A generator streams token ids for a prompt (`stream`); `generate` feeds them to the streaming parser and stops at
EOS (as the official code does) or at the end of the answer. Two implementations: `agent.reference.
ReferenceGenerator` (transformers, the correctness reference) and `agent.engine_generator.EngineGenerator` (our
decode engine, the fast path). Both draw the same tokens for a seed on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from agent.parser import AnswerDone, Event, ParsedResponse, ResponseParser
from agent.prompts import Task
from agent.tokenizer import SpeechGPTTokenizer
from kernels.checkpoint import LlamaCheckpoint
from kernels.sampling import SPEECHGPT_SAMPLING, SamplingParams

SPEECHGPT_MAX_NEW_TOKENS = 2048


def open_llm(paths) -> tuple[SpeechGPTTokenizer, LlamaCheckpoint]:
    """The tokenizer and the LLM checkpoint (LoRA attached) of a bundle, checked against each other: the LLM's
    embedding rows must be the tokenizer's ids (32000 pieces + 1000 units + 6 specials)."""
    tokenizer = SpeechGPTTokenizer.from_dir(paths.tokenizer_dir)
    ckpt = LlamaCheckpoint(paths.llm_dir, paths.lora_dir)
    if ckpt.arch.vocab_size != tokenizer.vocab.vocab_size:
        raise ValueError(
            f"{paths.llm_dir / 'config.json'}: vocab_size {ckpt.arch.vocab_size} does not match the tokenizer's "
            f"{tokenizer.vocab.vocab_size} tokens"
        )
    return tokenizer, ckpt


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


class TokenGenerator:
    """Base of the generators: subclasses set `tokenizer` and `max_positions` and implement `stream`."""

    tokenizer: SpeechGPTTokenizer
    max_positions: int

    def max_new_tokens_for(self, prompt_len: int, requested: int = SPEECHGPT_MAX_NEW_TOKENS) -> int:
        """SpeechGPT asks for 2048 new tokens; we also stop at the 2048-position context it was trained on."""
        return max(0, min(requested, self.max_positions - prompt_len))

    def _budget(self, prompt_ids: list[int], requested: int) -> int:
        """The new-token budget of a stream(), refusing prompts that leave none."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        budget = self.max_new_tokens_for(len(prompt_ids), requested)
        if budget == 0:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in the {self.max_positions}-position context")
        return budget

    def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams = SPEECHGPT_SAMPLING,
        seed: int = 0,
        max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS,
        timing: dict | None = None,
    ) -> Iterator[int]:
        """Yield sampled token ids until EOS or the budget; fill timing["prefill_s"] (prompt + first token) and
        timing["decode_s"] (the rest) as it goes."""
        raise NotImplementedError

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
        tokens = self.stream(prompt_ids, params, seed, max_new_tokens, timing)
        try:
            for token in tokens:
                new_ids.append(token)
                events += parser.feed(token)
                if parser.done and (stop_at_answer_end or token == params.eos_id):
                    break
        finally:
            tokens.close()  # an early stop releases the generator's resources now (the engine's decode lock)
        if not parser.done:
            events += parser.finish("length")
        elif not any(isinstance(e, AnswerDone) for e in events):  # pragma: no cover - parser always ends with it
            raise AssertionError("parser finished without AnswerDone")
        return GenerationResult(
            prompt_ids, new_ids, parser.response, events, timing.get("prefill_s", 0.0), timing.get("decode_s", 0.0)
        )
