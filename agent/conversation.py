"""A conversation as token ids: SpeechGPT's prompt built segment by segment, and the history as messages.

The slow LLaMA tokenizer the checkpoints were trained with splits text at vocabulary tokens and encodes each chunk
on its own (docs/speechgpt-format.md, "Tokenizer rules"). Every segment boundary used here sits next to a vocabulary
token (`[Human]`, `[SpeechGPT]`, `<sosp>`, `<eosp>`), so encoding the segments one by one and concatenating them
gives exactly the ids of the whole prompt text (tested on the official prompts and on random message sequences).
That is what lets a session prefill the system prompt once, the question's units while the user is still speaking,
and the template tail at the end of the turn, and units never go int -> text -> ids.

The history is a list of messages (`Message`, with ids: what a Realtime client calls conversation items): user
messages (typed text, or audio: its units until SpeechGPT has written its transcript), assistant messages (the text
answer, and the units spoken, cut to what was heard) and system messages (kept, never rendered: SpeechGPT was
trained on one fixed system prompt). One row per segment of a prompt:

    BOS + system prompt                          once per conversation
    [Human]: {transcript or text} <eoh>.         a user message, as text
    [Human]: <sosp> <u> <u> ... <eosp> <eoh>.    a user audio message not transcribed yet (the question, typically)
     [SpeechGPT]: {text answer}<eoa>             an assistant message, as heard
     [SpeechGPT]:␣                               the opener of the answer being generated

A past turn (`PastTurn`, a user message and the assistant's answer) is therefore
`[Human]: {transcript} <eoh>. [SpeechGPT]: {text answer}<eoa>`, and a spoken question is the turn template with its
units; the segments `[Human]: <sosp>` (turn head), the units, and `<eosp> <eoh>. [SpeechGPT]:␣` (template tail) are
the same ids as that question's message segment followed by the opener.

Past turns enter the history as text (the transcript SpeechGPT wrote, and the text answer as far as the user heard
it), not as units: SpeechGPT was only trained on single turns, and text keeps the 2048-position context for the
question at hand. Eviction: when a new prompt would leave fewer than `reserve_tokens` positions for the answer, the
oldest exchanges (a user message and what follows it up to the next user message) leave the context, whole, until
it fits; the system prompt and the exchange being answered always stay. Evicted messages stay in `items` (a client
may still retrieve them) but never re-enter the prompt.

Editing the history (insert, delete, truncate) changes the rendered ids from the first edited message on; a session
keeps its KV cache up to the common prefix of what it holds and the next prompt (agent/session.py), so an edit
invalidates the cache exactly from the change.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agent.prompts import (
    EOA,
    EOH,
    EOSP,
    HUMAN,
    META_INSTRUCTION,
    SOSP,
    SPEECHGPT,
    TTS_INSTRUCTION,
    TURN_TEMPLATE,
    Task,
    dedup_units,
    render_units,
)
from agent.tokenizer import SpeechGPTTokenizer

# The template around the question, split where a vocabulary token lets the tokenizer split: "[Human]: " + <sosp>
# and <eosp> + " <eoh>. [SpeechGPT]: ".
_HEAD, _TAIL = TURN_TEMPLATE.split("{question}")
# The template tail split once more, before [SpeechGPT]: what closes a user message, and the answer's opener.
_CLOSE, _OPENER = _TAIL[: _TAIL.index(SPEECHGPT) - 1], _TAIL[_TAIL.index(SPEECHGPT) - 1 :]  # " <eoh>.", " [SpeechGPT]: "

ROLES = ("user", "assistant", "system")
STATUSES = ("in_progress", "completed", "incomplete")
# `insert(previous_item_id=ROOT)` puts a message first; APPEND (the default) puts it last.
ROOT = "root"
APPEND = None


class PromptTooLong(ValueError):
    """The current question alone does not leave room for an answer in the context."""


class UnknownItem(KeyError):
    """No message with that id in the conversation."""

    def __init__(self, item_id: str, what: str = "item"):
        super().__init__(item_id)
        self.item_id = item_id
        self.what = what

    def __str__(self) -> str:
        return f"no {self.what} with id {self.item_id!r} in the conversation"


class DuplicateItem(ValueError):
    """A message with that id is already in the conversation."""


def heard_text(text: str, units_heard: int, units_total: int) -> str:
    """The text answer cut at the word matching the fraction of its units that was played (agent/session.py,
    module doc: units with any audio played count as heard; the word count kept is that fraction, rounded)."""
    words = text.split()
    if units_total <= 0 or units_heard <= 0:
        return ""
    keep = round(len(words) * min(1.0, units_heard / units_total))
    return " ".join(words[:keep])


def units_heard(durations: np.ndarray, position_s: float, frame_s: float) -> int:
    """Units whose audio had started by `position_s` (durations in vocoder frames of `frame_s`)."""
    durations = np.asarray(durations)
    if position_s <= 0 or durations.size == 0:
        return 0
    starts = np.concatenate([[0], np.cumsum(durations)[:-1]]) * frame_s
    return int(np.count_nonzero(starts < position_s - 1e-9))


def new_item_id(prefix: str = "item") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class PastTurn:
    transcript: str  # what SpeechGPT heard the user say (its own ASR segment)
    text_answer: str  # the agent's text answer, cut to what was heard when interrupted
    interrupted: bool = False


@dataclass(eq=False)
class Message:
    """One conversation item.

    user, modality "text": `text` is what the user typed.
    user, modality "audio": `units` are the reduced units of the audio (None while they are being extracted);
        `text` is SpeechGPT's transcript of it once a reply has written one (None before: the units are rendered).
    assistant: `text` is the whole text answer generated and `units` the whole unit answer (with the vocoder's
        `durations`, frames of `frame_s`); `audio_s` is the reply audio produced. `heard_s`, when set (barge-in,
        truncation), is how much of that audio was played: the message then renders, and reads through
        `heard_text` / `heard_units`, as cut by the barge-in rule (`heard_text` and `units_heard` above).
    system: kept and retrievable, never rendered (SpeechGPT knows one system prompt).
    """

    id: str
    role: str
    modality: str = "text"  # "text" or "audio"
    text: str | None = None
    units: list[int] | None = None
    durations: list[int] | None = None
    frame_s: float = 0.02
    audio_s: float = 0.0
    heard_s: float | None = None
    status: str = "completed"
    in_context: bool = True  # False once evicted
    response_id: str | None = None  # the response that wrote an assistant message

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Message.role: expected one of {ROLES}, got {self.role!r}")
        if self.modality not in ("text", "audio"):
            raise ValueError(f"Message.modality: expected 'text' or 'audio', got {self.modality!r}")
        if self.status not in STATUSES:
            raise ValueError(f"Message.status: expected one of {STATUSES}, got {self.status!r}")
        if self.role == "user" and self.modality == "text" and self.text is None:
            raise ValueError(f"Message {self.id!r}: a user text message needs text")

    @property
    def pending(self) -> bool:
        """A user audio message whose units are still being extracted (it cannot be rendered yet)."""
        return self.role == "user" and self.modality == "audio" and self.text is None and self.units is None

    @property
    def units_heard(self) -> int:
        units = self.units or []
        if self.heard_s is None:
            return len(units)
        if not self.durations:
            return 0
        return units_heard(np.asarray(self.durations), self.heard_s, self.frame_s)

    @property
    def heard_units(self) -> list[int]:
        return list((self.units or [])[: self.units_heard])

    @property
    def heard_text(self) -> str:
        text = self.text or ""
        if self.role != "assistant" or self.heard_s is None:
            return text
        return heard_text(text, self.units_heard, len(self.units or []))

    @property
    def heard_audio_s(self) -> float:
        return self.audio_s if self.heard_s is None else min(self.audio_s, self.heard_s)


class PromptBuilder:
    """Token ids of each prompt segment (see the module doc)."""

    def __init__(self, tokenizer: SpeechGPTTokenizer, system_prompt: str = META_INSTRUCTION):
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        self.system_prompt = system_prompt
        # The system text is always followed by [Human], which strips its trailing whitespace (tokenizer rule 3).
        self.system_ids: list[int] = self.system_ids_for(system_prompt)
        self.head_ids: list[int] = tokenizer.encode(_HEAD + SOSP, add_bos=False)  # [Human] ▁: <sosp>
        self.tail_ids: list[int] = tokenizer.encode(EOSP + _TAIL, add_bos=False)  # <eosp> <eoh> ▁. [SpeechGPT] ▁: ▁
        self.close_ids: list[int] = tokenizer.encode(EOSP + _CLOSE, add_bos=False)  # <eosp> <eoh> ▁.
        self.opener_ids: list[int] = tokenizer.encode(_OPENER, add_bos=False)  # [SpeechGPT] ▁: ▁
        if self.head_ids[0] != dict(self.vocab.added_tokens)[HUMAN] or self.head_ids[-1] != self.vocab.sosp:
            raise AssertionError(f"unexpected turn head ids {self.head_ids}")  # pragma: no cover - template constant
        if self.close_ids + self.opener_ids != self.tail_ids:
            raise AssertionError(f"template tail {self.tail_ids} != close {self.close_ids} + opener {self.opener_ids}")  # pragma: no cover

    def system_ids_for(self, system_prompt: str) -> list[int]:
        return self.tok.encode(system_prompt.rstrip())

    def unit_ids(self, units: Sequence[int]) -> list[int]:
        """Units -> vocabulary ids, consecutive repeats collapsed like the official rendering (checked to be units)."""
        return self.tok.encode_units(dedup_units(units))

    def past_turn_ids(self, turn: PastTurn) -> list[int]:
        return self.tok.encode(self.past_turn_text(turn), add_bos=False)

    @staticmethod
    def past_turn_text(turn: PastTurn) -> str:
        return f"{HUMAN}: {turn.transcript.strip()} {EOH}. {SPEECHGPT}: {turn.text_answer.strip()}{EOA}"

    # ---- messages -------------------------------------------------------------------------------------------
    @staticmethod
    def message_text(message: Message) -> str:
        """The segment of a rendered message (empty for system messages)."""
        if message.role == "system":
            return ""
        if message.role == "assistant":
            return f" {SPEECHGPT}: {message.heard_text.strip()}{EOA}"
        if message.text is not None:
            return f"{HUMAN}: {message.text.strip()}{_CLOSE}"
        if message.units is None:
            raise ValueError(f"message {message.id!r}: its units are not extracted yet")
        return f"{HUMAN}: {render_units(message.units)}{_CLOSE}"

    def message_ids(self, message: Message) -> list[int]:
        if message.role == "user" and message.text is None:
            if message.units is None:
                raise ValueError(f"message {message.id!r}: its units are not extracted yet")
            return self.head_ids + self.unit_ids(message.units) + self.close_ids
        text = self.message_text(message)
        return self.tok.encode(text, add_bos=False) if text else []

    def tts_prompt_ids(self, text: str) -> list[int]:
        """The official single-turn text-to-speech prompt ("Read this sentence aloud, this is input: ...")."""
        return self.tok.encode(META_INSTRUCTION + TURN_TEMPLATE.format(question=TTS_INSTRUCTION + text.strip()))


@dataclass
class Conversation:
    """The history of one conversation and the prompts it gives. `single_turn` reproduces the original behaviour:
    every prompt is the system prompt and the current question only."""

    builder: PromptBuilder
    max_positions: int = 2048
    reserve_tokens: int = 512  # positions kept free for the answer (older turns are evicted to keep them)
    single_turn: bool = False
    items: list[Message] = field(default_factory=list)
    evicted: int = 0  # exchanges dropped from the context so far
    _ids_cache: dict = field(default_factory=dict, repr=False)

    # ---- past turns (the VAD session's view) ----------------------------------------------------------------
    def add(self, turn: PastTurn) -> None:
        """A past turn: its user message (the transcript) and the assistant's answer (as heard)."""
        if self.single_turn:
            return
        self.items.append(Message(new_item_id(), "user", "audio", text=turn.transcript, units=[]))
        self.items.append(Message(new_item_id(), "assistant", "text", text=turn.text_answer,
                                  status="incomplete" if turn.interrupted else "completed"))

    @property
    def turns(self) -> list[PastTurn]:
        """The exchanges in the context as past turns (a user message and the assistant's answer after it)."""
        out = []
        if self.single_turn:
            return out
        for group in self._groups(self._rendered()):
            users = [m for m in group if m.role == "user"]
            answers = [m for m in group if m.role == "assistant"]
            if users:
                out.append(PastTurn(users[0].text or "", " ".join(m.heard_text for m in answers).strip(),
                                    any(m.status == "incomplete" for m in answers)))
        return out

    # ---- items ----------------------------------------------------------------------------------------------
    def get(self, item_id: str) -> Message:
        for m in self.items:
            if m.id == item_id:
                return m
        raise UnknownItem(item_id)

    def __contains__(self, item_id: str) -> bool:
        return any(m.id == item_id for m in self.items)

    def previous_id(self, item_id: str) -> str | None:
        """The id of the message before `item_id` (None for the first)."""
        i = self._index(item_id)
        return self.items[i - 1].id if i > 0 else None

    def insert(self, message: Message, previous_item_id: str | None = APPEND) -> str | None:
        """Put a message after `previous_item_id` (APPEND: last; ROOT: first). Returns the id now before it."""
        if message.id in self:
            raise DuplicateItem(f"an item with id {message.id!r} is already in the conversation")
        if previous_item_id is APPEND:
            self.items.append(message)
        elif previous_item_id == ROOT:
            self.items.insert(0, message)
        else:
            self.items.insert(self._index(previous_item_id, "previous item") + 1, message)
        return self.previous_id(message.id)

    def delete(self, item_id: str) -> Message:
        return self.items.pop(self._index(item_id))

    def truncate(self, item_id: str, audio_end_s: float) -> float:
        """Cut an assistant message's audio (and so its units and text) to `audio_end_s`, clamped to the audio it
        has; returns the position kept. Messages without audio are left as they are (0.0)."""
        m = self.get(item_id)
        if m.role != "assistant" or m.audio_s <= 0:
            return 0.0
        kept = float(min(max(0.0, audio_end_s), m.audio_s))
        m.heard_s = kept
        m.status = "incomplete"
        return kept

    def _index(self, item_id: str, what: str = "item") -> int:
        for i, m in enumerate(self.items):
            if m.id == item_id:
                return i
        raise UnknownItem(item_id, what)

    # ---- rendering ------------------------------------------------------------------------------------------
    def _rendered(self, skip_pending: bool = True) -> list[Message]:
        """Messages that enter the prompt: in the context, finished (an in-progress answer is not history yet), and
        renderable (a user audio message enters once its units are known)."""
        return [m for m in self.items if m.in_context and m.status != "in_progress" and m.role != "system"
                and not (skip_pending and m.pending)]

    @staticmethod
    def _groups(messages: list[Message]) -> list[list[Message]]:
        """Exchanges: each user message opens one (what comes before the first user message is one too)."""
        groups: list[list[Message]] = []
        for m in messages:
            if m.role == "user" or not groups:
                groups.append([])
            groups[-1].append(m)
        return groups

    def _ids(self, message: Message) -> list[int]:
        key = (message.role, self.builder.message_text(message) if not (message.role == "user" and message.text is None)
               else tuple(dedup_units(message.units or ())))
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = self._ids_cache[key] = self.builder.message_ids(message)
        return ids

    def history_ids(self) -> list[int]:
        """BOS + system prompt + every message in the context."""
        if self.single_turn:
            return list(self.builder.system_ids)
        ids = list(self.builder.system_ids)
        for m in self._rendered():
            ids += self._ids(m)
        return ids

    def question_prefix_ids(self, units: Sequence[int]) -> list[int]:
        """What may be prefilled while the user speaks: history + turn head + the units known so far."""
        return self.history_ids() + self.builder.head_ids + self.builder.unit_ids(units)

    def prompt_ids(self, units: Sequence[int]) -> list[int]:
        """The whole prompt for a spoken question not in the history yet, after evicting old turns if the answer
        would not fit."""
        question = self.builder.head_ids + self.builder.unit_ids(units) + self.builder.tail_ids
        fixed = len(self.builder.system_ids) + len(question)
        if fixed + self.reserve_tokens > self.max_positions:
            raise PromptTooLong(
                f"a question of {len(units)} units makes a {fixed}-token prompt: with {self.reserve_tokens} positions "
                f"reserved for the answer it does not fit the {self.max_positions}-position context"
            )
        if not self.single_turn:
            self._evict(self._groups(self._rendered()), fixed)
        return self.history_ids() + question

    def response_prompt_ids(self, system_prompt: str | None = None) -> list[int]:
        """The prompt for an answer to the conversation as it stands (the question is the last exchange: its user
        message and what follows), after evicting old exchanges if the answer would not fit. `system_prompt`
        replaces the builder's for this prompt."""
        system = self.builder.system_ids if system_prompt is None else self.builder.system_ids_for(system_prompt)
        messages = self._rendered(skip_pending=False)
        if any(m.pending for m in messages):
            raise ValueError("a user audio message still has no units: wait for them before building the prompt")
        groups = self._groups(messages)
        question = groups[-1] if groups and groups[-1][0].role == "user" else []
        if self.single_turn:
            groups = [question] if question else []
        question_ids = [t for m in question for t in self._ids(m)] + self.builder.opener_ids
        fixed = len(system) + len(question_ids)
        if fixed + self.reserve_tokens > self.max_positions:
            raise PromptTooLong(
                f"the question makes a {fixed}-token prompt: with {self.reserve_tokens} positions reserved for the "
                f"answer it does not fit the {self.max_positions}-position context"
            )
        past = groups[:-1] if question else groups
        self._evict(past, fixed)
        ids = list(system)
        for group in past:
            if group[0].in_context:
                for m in group:
                    ids += self._ids(m)
        return ids + question_ids

    def _evict(self, groups: list[list[Message]], fixed: int) -> None:
        """Take the oldest exchanges of `groups` out of the context until `fixed` + them + the reserve fits."""
        sizes = [sum(len(self._ids(m)) for m in g) for g in groups]
        total = sum(sizes)
        for group, size in zip(groups, sizes):
            if fixed + total + self.reserve_tokens <= self.max_positions:
                break
            for m in group:
                m.in_context = False
            total -= size
            self.evicted += 1

    def response_task(self) -> Task:
        """What the answer to the conversation as it stands is: chain of modality for a spoken question (the last
        user message in the context is audio not transcribed yet), a text answer otherwise."""
        users = [m for m in self._rendered() if m.role == "user"]
        if users and users[-1].modality == "audio" and users[-1].text is None:
            return Task.SPEECH
        return Task.TEXT

    def question(self) -> Message | None:
        """The user message an answer would answer (the last user message in the context)."""
        users = [m for m in self._rendered() if m.role == "user"]
        return users[-1] if users else None

    def prompt_text(self, units: Sequence[int]) -> str:
        """The same prompt as `prompt_ids` as text (what the official code would tokenize), for tests and logs."""
        past = "" if self.single_turn else "".join(self.builder.message_text(m) for m in self._rendered())
        return self.builder.system_prompt + past + TURN_TEMPLATE.format(question=render_units(units))

    def response_prompt_text(self, system_prompt: str | None = None) -> str:
        """`response_prompt_ids` as text (call it after the ids, which may evict), for tests and logs."""
        messages = self._rendered()
        if self.single_turn:
            question = self.question()
            groups = self._groups(messages)
            messages = groups[-1] if question is not None and groups and groups[-1][0] is question else []
        system = self.builder.system_prompt if system_prompt is None else system_prompt
        return system + "".join(self.builder.message_text(m) for m in messages) + _OPENER
