"""Prompts built segment by segment equal the tokenizer's ids of the whole prompt text; history and eviction."""

from __future__ import annotations

import random

import numpy as np

import pytest

from agent.conversation import Conversation, PastTurn, PromptBuilder, PromptTooLong
from agent.prompts import Task, prompt_for
from agent.tokenizer import SpeechGPTTokenizer


@pytest.fixture(scope="module")
def builder(tiny_bundle):
    return PromptBuilder(SpeechGPTTokenizer.from_dir(tiny_bundle / "SpeechGPT-7B-cm"))


def test_single_turn_prompt_equals_the_official_prompt(builder):
    rng = random.Random(0)
    for n in (1, 2, 7, 120):
        units = [rng.randrange(1000) for _ in range(n)]
        conv = Conversation(builder)
        ids = conv.prompt_ids(units)
        assert ids == builder.tok.encode(prompt_for(Task.SPEECH, units=units))
        assert ids == builder.tok.encode(conv.prompt_text(units))
        assert ids[: len(conv.question_prefix_ids(units))] == conv.question_prefix_ids(units)


@pytest.mark.parametrize("transcript, answer", [
    ("what is the weather like", "It is sunny."),
    ("  spaces around  ", "  an answer, with; [ta] marker-like text "),
    ("", ""),
    ("ünïcödé — and <0> a unit-looking text", "Answer with </s> and <s> inside."),
])
def test_multi_turn_prompt_equals_the_encoded_text(builder, transcript, answer):
    conv = Conversation(builder)
    conv.add(PastTurn("first question", "First answer."))
    conv.add(PastTurn(transcript, answer))
    units = [5, 5, 9, 3]
    assert conv.prompt_ids(units) == builder.tok.encode(conv.prompt_text(units))


def test_single_turn_keeps_no_history(builder):
    conv = Conversation(builder, single_turn=True)
    conv.add(PastTurn("question", "Answer."))
    assert conv.prompt_ids([1, 2]) == builder.tok.encode(prompt_for(Task.SPEECH, units=[1, 2]))


def test_eviction_keeps_the_prompt_within_the_context(builder):
    conv = Conversation(builder, max_positions=400, reserve_tokens=100)
    for i in range(12):
        conv.add(PastTurn(f"question number {i} about something long enough", f"Answer number {i} which is also long."))
    ids = conv.prompt_ids(list(range(50)))
    assert len(ids) + 100 <= 400
    assert conv.evicted > 0 and len(conv.turns) == 12 - conv.evicted
    assert conv.turns[-1].transcript.startswith("question number 11")  # the newest turns stay
    assert ids == builder.tok.encode(conv.prompt_text(list(range(50))))
    # one more turn would not have fit without the evicted ones
    assert len(ids) + len(builder.past_turn_ids(PastTurn("question number 0 about something long enough",
                                                           "Answer number 0 which is also long."))) + 100 > 400 or conv.evicted == 1


def test_a_question_too_long_for_the_context_is_refused(builder):
    conv = Conversation(builder, max_positions=200, reserve_tokens=64)
    with pytest.raises(PromptTooLong, match="200-position context"):
        conv.prompt_ids(list(range(100)))


# ---- the history as messages (the Realtime server's conversation items) ------------------------------------------
from agent.conversation import ROOT, DuplicateItem, Message, UnknownItem  # noqa: E402
from agent.prompts import EOA, META_INSTRUCTION  # noqa: E402

TEXTS = ["what is the weather like", "  spaces around  ", "", "ünïcödé — and <0> a unit-looking text",
         "Answer with </s> and <s> inside.", "It is sunny. [ta] marker-like; [ua] text", "<sosp> <eoh>. [Human]"]


def _random_messages(rng: random.Random, n: int) -> list[Message]:
    out = []
    for i in range(n):
        role = rng.choice(["user", "user", "assistant", "system"])
        if role == "user" and rng.random() < 0.4:
            units = [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
            text = rng.choice(TEXTS) if rng.random() < 0.5 else None  # transcribed, or still units
            out.append(Message(f"m{i}", "user", "audio", text=text, units=units))
        else:
            out.append(Message(f"m{i}", role, "text", text=rng.choice(TEXTS)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_any_message_sequence_renders_to_the_ids_of_its_text(builder, seed):
    """Messages in any order (user text, user audio as units or transcript, assistant, system; consecutive
    same-role messages too): the prompt built segment by segment equals encoding the whole prompt text."""
    rng = random.Random(1000 + seed)
    conv = Conversation(builder)
    for m in _random_messages(rng, rng.randrange(1, 9)):
        conv.insert(m)
    ids = conv.response_prompt_ids()
    assert ids == builder.tok.encode(conv.response_prompt_text())
    instructions = "You are a pirate.\n"
    assert conv.response_prompt_ids(instructions) == builder.tok.encode(conv.response_prompt_text(instructions))


def test_past_turns_and_messages_render_alike(builder):
    """A PastTurn is a user message (its transcript) and the assistant's answer; a spoken question is a user audio
    message followed by the answer's opener: both give the same ids as the pair API."""
    units = [5, 5, 9, 3]
    pairs = Conversation(builder)
    pairs.add(PastTurn("first question", "First answer."))
    messages = Conversation(builder)
    messages.insert(Message("u0", "user", "audio", text="first question", units=[1]))
    messages.insert(Message("a0", "assistant", "audio", text="First answer."))
    messages.insert(Message("u1", "user", "audio", units=units))
    assert messages.response_prompt_ids() == pairs.prompt_ids(units)
    assert builder.close_ids + builder.opener_ids == builder.tail_ids
    assert messages.response_task() is Task.SPEECH and messages.question().id == "u1"


def test_a_text_only_history_asks_a_text_question(builder):
    """LiveKit replays its chat context as text items: the last user text is SpeechGPT's text task."""
    conv = Conversation(builder)
    conv.insert(Message("u0", "user", "text", text="Hello there"))
    conv.insert(Message("a0", "assistant", "text", text="Hi."))
    conv.insert(Message("u1", "user", "text", text="What is the capital of France?"))
    assert conv.response_task() is Task.TEXT
    text = conv.response_prompt_text()
    assert text.endswith("[Human]: What is the capital of France? <eoh>. [SpeechGPT]: ")
    assert conv.response_prompt_ids() == builder.tok.encode(text)
    single = Conversation(builder, single_turn=True)
    for m in conv.items:
        single.insert(m)
    assert single.response_prompt_ids() == builder.tok.encode(prompt_for(Task.TEXT, text="What is the capital of France?"))


def test_insert_after_root_and_after_an_item_delete_and_errors(builder):
    conv = Conversation(builder)
    assert conv.insert(Message("b", "user", "text", text="b")) is None
    assert conv.insert(Message("a", "user", "text", text="a"), ROOT) is None
    assert conv.insert(Message("c", "assistant", "text", text="c."), "a") == "a"
    assert [m.id for m in conv.items] == ["a", "c", "b"] and conv.previous_id("b") == "c"
    with pytest.raises(DuplicateItem):
        conv.insert(Message("a", "user", "text", text="again"))
    with pytest.raises(UnknownItem, match="previous item"):
        conv.insert(Message("d", "user", "text", text="d"), "nope")
    assert conv.delete("c").id == "c" and [m.id for m in conv.items] == ["a", "b"]
    with pytest.raises(UnknownItem):
        conv.delete("c")


def test_truncate_cuts_units_and_text_by_the_barge_in_rule(builder):
    from agent.session import heard_text, units_heard

    answer = "one two three four five six"
    durations = [3, 2, 5, 1, 4, 5]  # frames of 20 ms: 400 ms in all
    m = Message("a", "assistant", "audio", text=answer, units=[1, 2, 3, 4, 5, 6], durations=durations, audio_s=0.4)
    conv = Conversation(builder)
    conv.insert(Message("u", "user", "text", text="count"))
    conv.insert(m)
    before = conv.response_prompt_ids()
    assert conv.truncate("a", 0.11) == pytest.approx(0.11)
    heard = units_heard(np.array(durations), 0.11, 0.02)
    assert m.heard_units == [1, 2, 3][:heard] and m.heard_text == heard_text(answer, heard, 6)
    assert m.status == "incomplete" and 0 < len(m.heard_text.split()) < 6
    after = conv.response_prompt_ids()
    assert after == builder.tok.encode(conv.response_prompt_text())
    first_change = next(i for i, (x, y) in enumerate(zip(before, after)) if x != y)
    assert first_change >= len(builder.system_ids) + len(builder.tok.encode("[Human]: count <eoh>.", add_bos=False))
    assert conv.truncate("a", 99.0) == pytest.approx(0.4)  # clamped to the audio it has
    assert m.heard_text == answer
    assert conv.truncate("a", -1.0) == 0.0 and m.heard_text == "" and m.heard_units == []
    text_only = Message("t", "assistant", "text", text="no audio here")
    conv.insert(text_only)
    assert conv.truncate("t", 0.5) == 0.0 and text_only.heard_text == "no audio here"  # nothing to cut


def test_pending_audio_is_waited_for_not_rendered(builder):
    conv = Conversation(builder)
    conv.insert(Message("u", "user", "audio"))
    assert conv.items[0].pending
    assert conv.history_ids() == builder.system_ids  # (speculative prefixes skip it)
    with pytest.raises(ValueError, match="no units"):
        conv.response_prompt_ids()
    conv.items[0].units = [7, 8]
    assert conv.response_prompt_ids() == builder.tok.encode(META_INSTRUCTION + "[Human]: <sosp><7><8><eosp> <eoh>. [SpeechGPT]: ")


def test_eviction_of_exchanges_keeps_the_question(builder):
    conv = Conversation(builder, max_positions=300, reserve_tokens=100)
    for i in range(8):
        conv.insert(Message(f"u{i}", "user", "text", text=f"question number {i} about something long enough"))
        conv.insert(Message(f"a{i}", "assistant", "text", text=f"Answer number {i} which is also long.{EOA}"[:-len(EOA)]))
    conv.insert(Message("q", "user", "audio", units=list(range(40))))
    ids = conv.response_prompt_ids()
    assert len(ids) + 100 <= 300 and conv.evicted > 0
    assert conv.items[-1].in_context and conv.items[-2].in_context  # the newest exchange and the question stay
    assert not conv.items[0].in_context and len(conv.items) == 17  # evicted messages are kept, out of the context
    assert ids == builder.tok.encode(conv.response_prompt_text())
    assert len(conv.turns) == 8 - conv.evicted + 1
