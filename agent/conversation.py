"""A conversation as token ids: SpeechGPT's prompt built segment by segment, and the history of past turns.

The slow LLaMA tokenizer the checkpoints were trained with splits text at vocabulary tokens and encodes each chunk
on its own (docs/speechgpt-format.md, "Tokenizer rules"). Every segment boundary used here sits next to a vocabulary
token (`[Human]`, `<sosp>`, `<eosp>`), so encoding the segments one by one and concatenating them gives exactly the
ids of the whole prompt text (tested on the official prompts). That is what lets a session prefill the system prompt
once, the question's units while the user is still speaking, and the template tail at the end of the turn, and
units never go int -> text -> ids.

Layout of a prompt (one row per segment):

    BOS + system prompt                          once per conversation
    [Human]: {transcript} <eoh>. [SpeechGPT]: {text answer}<eoa>     each past turn, as text
    [Human]: <sosp>                              the current turn's head
    <u> <u> ...                                  the question's units (speculatively prefilled)
    <eosp> <eoh>. [SpeechGPT]:␣                  the template tail

Past turns enter the history as text (the transcript SpeechGPT wrote, and the text answer as far as the user heard
it), not as units: SpeechGPT was only trained on single turns, and text keeps the 2048-position context for the
question at hand. Eviction: when a new prompt would leave fewer than `reserve_tokens` positions for the answer, the
oldest past turns are dropped, whole, until it fits (the system prompt is always kept).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.prompts import EOA, EOH, EOSP, HUMAN, META_INSTRUCTION, SOSP, SPEECHGPT, TURN_TEMPLATE, dedup_units, render_units
from agent.tokenizer import SpeechGPTTokenizer

# The template around the question, split where a vocabulary token lets the tokenizer split: "[Human]: " + <sosp>
# and <eosp> + " <eoh>. [SpeechGPT]: ".
_HEAD, _TAIL = TURN_TEMPLATE.split("{question}")


class PromptTooLong(ValueError):
    """The current question alone does not leave room for an answer in the context."""


@dataclass(frozen=True)
class PastTurn:
    transcript: str  # what SpeechGPT heard the user say (its own ASR segment)
    text_answer: str  # the agent's text answer, cut to what was heard when interrupted
    interrupted: bool = False


class PromptBuilder:
    """Token ids of each prompt segment (see the module doc)."""

    def __init__(self, tokenizer: SpeechGPTTokenizer, system_prompt: str = META_INSTRUCTION):
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        self.system_prompt = system_prompt
        # The system text is always followed by [Human], which strips its trailing whitespace (tokenizer rule 3).
        self.system_ids: list[int] = tokenizer.encode(system_prompt.rstrip())
        self.head_ids: list[int] = tokenizer.encode(_HEAD + SOSP, add_bos=False)  # [Human] ▁: <sosp>
        self.tail_ids: list[int] = tokenizer.encode(EOSP + _TAIL, add_bos=False)  # <eosp> <eoh> ▁. [SpeechGPT] ▁: ▁
        if self.head_ids[0] != dict(self.vocab.added_tokens)[HUMAN] or self.head_ids[-1] != self.vocab.sosp:
            raise AssertionError(f"unexpected turn head ids {self.head_ids}")  # pragma: no cover - template constant

    def unit_ids(self, units: Sequence[int]) -> list[int]:
        """Units -> vocabulary ids, consecutive repeats collapsed like the official rendering (checked to be units)."""
        return self.tok.encode_units(dedup_units(units))

    def past_turn_ids(self, turn: PastTurn) -> list[int]:
        return self.tok.encode(self.past_turn_text(turn), add_bos=False)

    @staticmethod
    def past_turn_text(turn: PastTurn) -> str:
        return f"{HUMAN}: {turn.transcript.strip()} {EOH}. {SPEECHGPT}: {turn.text_answer.strip()}{EOA}"


@dataclass
class Conversation:
    """The history of one conversation and the prompts it gives. `single_turn` reproduces the original behaviour:
    every prompt is the system prompt and the current question only."""

    builder: PromptBuilder
    max_positions: int = 2048
    reserve_tokens: int = 512  # positions kept free for the answer (older turns are evicted to keep them)
    single_turn: bool = False
    turns: list[PastTurn] = field(default_factory=list)
    evicted: int = 0  # past turns dropped so far
    _turn_ids: list[list[int]] = field(default_factory=list, repr=False)

    def add(self, turn: PastTurn) -> None:
        if self.single_turn:
            return
        self.turns.append(turn)
        self._turn_ids.append(self.builder.past_turn_ids(turn))

    def history_ids(self) -> list[int]:
        """BOS + system prompt + every past turn still in the history."""
        ids = list(self.builder.system_ids)
        for turn_ids in self._turn_ids:
            ids += turn_ids
        return ids

    def question_prefix_ids(self, units: Sequence[int]) -> list[int]:
        """What may be prefilled while the user speaks: history + turn head + the units known so far."""
        return self.history_ids() + self.builder.head_ids + self.builder.unit_ids(units)

    def prompt_ids(self, units: Sequence[int]) -> list[int]:
        """The whole prompt for a spoken question, after evicting old turns if the answer would not fit."""
        question = self.builder.head_ids + self.builder.unit_ids(units) + self.builder.tail_ids
        fixed = len(self.builder.system_ids) + len(question)
        if fixed + self.reserve_tokens > self.max_positions:
            raise PromptTooLong(
                f"a question of {len(units)} units makes a {fixed}-token prompt: with {self.reserve_tokens} positions "
                f"reserved for the answer it does not fit the {self.max_positions}-position context"
            )
        while self._turn_ids and fixed + sum(map(len, self._turn_ids)) + self.reserve_tokens > self.max_positions:
            self.turns.pop(0)
            self._turn_ids.pop(0)
            self.evicted += 1
        return self.history_ids() + question

    def prompt_text(self, units: Sequence[int]) -> str:
        """The same prompt as text (what the official code would tokenize), for tests and logs."""
        past = "".join(PromptBuilder.past_turn_text(t) for t in self.turns)
        return self.builder.system_prompt + past + TURN_TEMPLATE.format(question=render_units(units))
