"""The streaming response parser, fed one token id at a time."""

from __future__ import annotations

import random

import pytest

from agent.parser import (
    AnswerDone,
    Issue,
    IssueNoticed,
    ResponseParser,
    Segment,
    SegmentDone,
    TextDelta,
    Unit,
    UnitSpanEnded,
    UnitSpanStarted,
    parse_ids,
)
from agent.prompts import Task, render_answer
from agent.tiny import write_tokenizer_files
from agent.tokenizer import SpeechGPTTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SpeechGPTTokenizer:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return SpeechGPTTokenizer.from_dir(d)


def feed_all(tok, text_or_ids, task=Task.SPEECH, eos=True):
    ids = tok.encode(text_or_ids, add_bos=False) if isinstance(text_or_ids, str) else list(text_or_ids)
    if eos:
        ids.append(tok.eos_id)
    parser = ResponseParser(tok, task)
    events = []
    for i in ids:
        events += parser.feed(i)
    if not parser.done:
        events += parser.finish("length")
    return parser.response, events


def deltas(events, segment):
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.segment is segment)


def test_well_formed_chain_of_modality(tok):
    text = render_answer(
        Task.SPEECH, transcript="what is the capital of france", text_answer="The capital of France is Paris.", units=[5, 5, 17, 999, 0]
    )
    r, events = feed_all(tok, text)
    assert r.transcript == "what is the capital of france"
    assert r.text_answer == "The capital of France is Paris."
    assert r.units == [5, 17, 999, 0]
    assert r.issues == [] and r.well_formed and r.end_reason == "eoa"
    assert deltas(events, Segment.TRANSCRIPT) == r.transcript
    assert deltas(events, Segment.TEXT_ANSWER) == r.text_answer
    kinds = [type(e) for e in events if not isinstance(e, TextDelta)]
    assert kinds == [SegmentDone, SegmentDone, UnitSpanStarted, Unit, Unit, Unit, Unit, UnitSpanEnded, AnswerDone]
    assert [e.unit for e in events if isinstance(e, Unit)] == [5, 17, 999, 0]
    assert [e.index for e in events if isinstance(e, Unit)] == [0, 1, 2, 3]


def test_events_arrive_as_tokens_arrive(tok):
    """The transcript is released before [ta] is complete; units come one per token."""
    text = render_answer(Task.SPEECH, transcript="hello there", text_answer="hi", units=[1, 2, 3])
    ids = tok.encode(text, add_bos=False)
    parser = ResponseParser(tok, Task.SPEECH)
    per_token = [parser.feed(i) for i in ids]
    first_delta = next(k for k, evs in enumerate(per_token) if any(isinstance(e, TextDelta) for e in evs))
    assert first_delta == 0  # "▁hello" is released at once
    sosp = ids.index(tok.vocab.sosp)
    for k in (sosp + 1, sosp + 2, sosp + 3):
        assert [type(e) for e in per_token[k]] == [Unit]
    assert parser.done  # <eoa> ends the answer before EOS arrives
    assert parser.feed(tok.eos_id) == []


@pytest.mark.parametrize("task", [Task.ASR, Task.TEXT, Task.TTS])
def test_single_modality_answers(tok, task):
    text = render_answer(task, transcript="what time is it", text_answer="It is noon.", units=[3, 4, 4, 5])
    r, events = feed_all(tok, text, task)
    assert r.issues == [] and r.end_reason == "eoa"
    if task is Task.ASR:
        assert (r.transcript, r.text_answer, r.units) == ("what time is it", "", [])
    elif task is Task.TEXT:
        assert (r.transcript, r.text_answer, r.units) == ("", "It is noon.", [])
    else:
        assert (r.transcript, r.text_answer, r.units) == ("", "", [3, 4, 5])


def test_answer_ending_at_eos_without_eoa(tok):
    r, _ = feed_all(tok, "Just text, no end marker", Task.TEXT)
    assert r.text_answer == "Just text, no end marker" and r.end_reason == "eos" and r.issues == []


def test_marker_split_and_semicolons_in_text(tok):
    """A ';' that is not followed by a marker is text; held-back text is released later."""
    r, events = feed_all(tok, "a; b;c ; [ta] x; y; [ua] <sosp><1><eosp><eoa>.")
    assert r.transcript == "a; b;c"
    assert r.text_answer == "x; y"
    assert deltas(events, Segment.TRANSCRIPT) == r.transcript and deltas(events, Segment.TEXT_ANSWER) == r.text_answer
    assert r.issues == []


@pytest.mark.parametrize(
    "text, task, issues, check",
    [
        # no [ua]: the text answer is all there is (nothing to vocode)
        ("hi; [ta] hello there<eoa>.", Task.SPEECH, [Issue.MISSING_UNIT_ANSWER], lambda r: r.text_answer == "hello there"),
        # no [ta]: text before [ua] is the transcript
        ("hi; [ua] <sosp><1><2><eosp><eoa>", Task.SPEECH, [Issue.MISSING_TEXT_ANSWER], lambda r: r.transcript == "hi" and r.units == [1, 2]),
        # <sosp> without [ua]
        ("hi; [ta] yo <sosp><1><eosp><eoa>", Task.SPEECH, [Issue.MISSING_UA_MARKER], lambda r: r.text_answer == "yo" and r.units == [1]),
        # units after [ua] without <sosp>
        ("hi; [ta] yo; [ua] <7><8><eosp><eoa>", Task.SPEECH, [Issue.MISSING_SOSP], lambda r: r.units == [7, 8]),
        # unterminated unit span (EOS inside)
        ("hi; [ta] yo; [ua] <sosp><1><2>", Task.SPEECH, [Issue.UNTERMINATED_UNIT_SPAN], lambda r: r.units == [1, 2] and r.end_reason == "eos"),
        # <eoa> written inside the span
        ("hi; [ta] yo; [ua] <sosp><1><eoa>.", Task.SPEECH, [Issue.UNTERMINATED_UNIT_SPAN], lambda r: r.units == [1] and r.end_reason == "eoa"),
        # leaked specials in the text are dropped
        ("hi [Human] there; [ta] yo<eoh>; [ua] <sosp><1><eosp><eoa>", Task.SPEECH, [Issue.LEAKED_MARKER], lambda r: r.transcript == "hi there" and r.text_answer == "yo"),
        # a second [ta] is a leaked marker
        ("hi; [ta] yo [ta] man; [ua] <sosp><1><eosp><eoa>", Task.SPEECH, [Issue.LEAKED_MARKER], lambda r: r.text_answer == "yo man"),
        # stray unit ids in text are dropped
        ("hi<5> there; [ta] yo; [ua] <sosp><1><eosp><eoa>", Task.SPEECH, [Issue.STRAY_UNIT], lambda r: r.transcript == "hi there" and r.units == [1]),
        # text inside a unit span is dropped
        ("hi; [ta] yo; [ua] <sosp><1> junk <2><eosp><eoa>", Task.SPEECH, [Issue.UNEXPECTED_TEXT], lambda r: r.units == [1, 2] and "junk" in r.dropped_text),
        # <eosp> outside any span
        ("hello<eosp> world<eoa>", Task.TEXT, [Issue.LEAKED_MARKER], lambda r: r.text_answer == "hello world"),
        # text between <eosp> and <eoa>
        ("<sosp><1><eosp> extra words<eoa>", Task.TTS, [Issue.UNEXPECTED_TEXT], lambda r: r.units == [1]),
    ],
)
def test_malformed_outputs_never_raise(tok, text, task, issues, check):
    r, events = feed_all(tok, text, task)
    assert r.issues == issues, r
    assert check(r), r
    done = events[-1]
    assert isinstance(done, AnswerDone) and done.issues == tuple(issues)
    # each issue is also attached to the event of the token where it was noticed
    noticed = {i for e in events[:-1] for i in e.issues}
    assert set(issues) <= noticed | set(done.issues)


def test_empty_answer_and_truncation(tok):
    r, _ = feed_all(tok, [], Task.SPEECH)
    assert Issue.EMPTY_ANSWER in r.issues and r.end_reason == "eos"
    r, events = feed_all(tok, "hello; [ta] partial answ", Task.SPEECH, eos=False)
    assert r.end_reason == "length" and Issue.TRUNCATED in r.issues
    assert r.text_answer == "partial answ"
    r, _ = feed_all(tok, [tok.vocab.bos, 40000, -3], Task.TEXT)
    assert r.issues == [Issue.LEAKED_MARKER, Issue.INVALID_TOKEN, Issue.EMPTY_ANSWER]


def test_issue_only_tokens_produce_an_event(tok):
    parser = ResponseParser(tok, Task.SPEECH)
    assert parser.feed(tok.vocab.unit_id(3)) == [IssueNoticed((Issue.STRAY_UNIT,))]


def test_random_token_soup_never_raises(tok):
    rng = random.Random(0)
    v = tok.vocab
    pool = list(range(3, 200)) + [v.sosp, v.eosp, v.human, v.eoh, v.eos, v.bos] + [v.unit_id(u) for u in range(20)]
    for trial in range(200):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 60))]
        r = parse_ids(tok, ids, rng.choice(list(Task)))
        assert r.end_reason in ("eos", "eoa", "length")
