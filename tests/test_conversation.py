"""Prompts built segment by segment equal the tokenizer's ids of the whole prompt text; history and eviction."""

from __future__ import annotations

import random

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
