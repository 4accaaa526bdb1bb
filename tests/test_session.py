"""The Session over the fast-clock loopback transport, on the tiny bundle and the espeak-ng speech fixtures.

Every check compares the session with a straightforward reference run of the same parts (respond's generator on the
same final units and seed, whole-utterance vocoding, a fresh prefill of the whole prompt, the same session with a
feature off) or with the timeline the session itself recorded; nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.chat import converse
from agent.clock import SessionClock
from agent.events import AgentState, AgentText, SessionError, StateChanged, UserSpeechEnded, UserTranscript
from agent.loopback import LoopbackInput, RecordingOutput
from agent.session import SessionConfig, heard_text, units_heard
from streaming.audio_io import load_audio

ROOT = Path(__file__).resolve().parents[1]
QUESTION = load_audio(ROOT / "streaming/assets/question.wav").samples
FOLLOW_UP = load_audio(ROOT / "streaming/assets/follow_up.wav").samples
TABLE = load_audio(ROOT / "tests/fixtures/speech/en_us_table.wav").samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_bundle):
    from agent.model import SpeechGPTModel

    return SpeechGPTModel.load(tiny_bundle)


def new_session(model, config: SessionConfig | None = None):
    clock = SessionClock(fast=True)
    user, out = LoopbackInput(clock), RecordingOutput(clock)
    return model.session(user, out, config or SessionConfig(), clock), user, out


def chat(model, turns, config: SessionConfig | None = None):
    session, user, out = new_session(model, config)
    asyncio.run(converse(session, user, turns))
    return session, user, out


NO_SPEC = SessionConfig(speculative_prefill=False, preemptive_reply=False)


@pytest.fixture(scope="module")
def plain(model):
    """Two turns with neither speculative prefill nor preemptive replies: the reference timeline."""
    return chat(model, [QUESTION, FOLLOW_UP], NO_SPEC)


@pytest.fixture(scope="module")
def full(model):
    """The same two turns with every feature on (the defaults)."""
    return chat(model, [QUESTION, FOLLOW_UP])


def tokens_of(session) -> list[list[int]]:
    return [session.records[t.turn].tokens for t in session.turns]


def test_a_two_turn_conversation(full):
    session, user, out = full
    assert [t.turn for t in session.turns] == [0, 1] and session.error_count == 0
    states = [e.new for e in session.events.history if isinstance(e, StateChanged)]
    assert states == [AgentState.LISTENING] + [AgentState.THINKING, AgentState.SPEAKING, AgentState.LISTENING] * 2
    for m in session.turns:
        assert m.transcript.startswith("canned question") and m.text_answer.startswith("Canned answer")
        assert not m.interrupted and m.output_units > 0 and m.heard_s == pytest.approx(m.reply_s)
        assert m.last_voiced <= m.final_eot <= m.first_frame_handed <= m.first_frame_played
        finals = [e for e in session.events.history if isinstance(e, UserTranscript) and e.turn == m.turn and e.final]
        assert [e.text for e in finals] == [m.transcript]
        answers = [e for e in session.events.history if isinstance(e, AgentText) and e.turn == m.turn]
        assert answers[-1].final and answers[-1].text == m.text_answer
        assert "".join(e.delta for e in answers) == m.text_answer  # the deltas add up to the answer
    # what was played is on the timeline once, after each decision, and nothing overlaps the next user turn
    assert len(out.segments) == 2
    for m, segment in zip(session.turns, out.segments):
        assert segment[0].start >= m.final_eot
    assert session.conversation.turns[0].transcript == session.turns[0].transcript


def test_tokens_and_audio_equal_respond_on_the_same_units(model, full, tiny_bundle):
    """Turn 0 (an empty history) draws what respond's generator draws for the same units and seed, and its reply
    audio is the whole-utterance vocoding of its units."""
    from agent.engine_generator import EngineGenerator
    from agent.bundle import resolve_bundle
    from agent.prompts import Task, prompt_for
    from streaming.vocoder import load_vocoder

    session, _, _ = full
    record = session.records[0]
    paths = resolve_bundle(tiny_bundle)
    generator = EngineGenerator.from_bundle(paths)
    prompt = prompt_for(Task.SPEECH, units=record.units)
    assert record.prompt == generator.tokenizer.encode(prompt)
    result = generator.generate(prompt, seed=0, stop_at_answer_end=True)
    assert record.tokens == result.new_ids
    assert session.turns[0].text_answer == result.response.text_answer
    reference = load_vocoder(paths.vocoder).synthesize(result.response.units)
    reply = session.replies[0]
    assert reply.shape == reference.shape
    assert np.abs(reply - reference).max() <= 1e-5


def test_speculative_prefill_and_preemptive_reply_change_nothing_but_time(plain, full):
    assert tokens_of(full[0]) == tokens_of(plain[0])
    assert [t.text_answer for t in full[0].turns] == [t.text_answer for t in plain[0].turns]
    for m in full[0].turns:
        assert m.preemptive == "kept" and m.preemptive_saved_s > 0
        assert m.tentative_eot < m.final_eot and m.prefill_done < m.final_eot
    for m in plain[0].turns:
        assert m.preemptive == "none" and m.speculative_tokens == 0
        assert m.prefill_done >= m.final_eot
    assert plain[0].turns[0].rollback_tokens == 0  # (turn 1 drops turn 0's spoken answer for its text form)


def _stable_units_from(final_units: list[int], shift: int):
    """A stand-in for the incremental extractor's push: it reports the turn's true final units (optionally
    shifted, to force provisional units that change) as stable, a few at a time."""
    from streaming.incremental_units import ProvisionalUnits

    state = {"calls": 0}

    def push(real_push):
        def fake(samples):
            real_push(samples)
            state["calls"] += 1
            n = min(len(final_units), 4 * state["calls"])
            units = np.array([(u + shift) % 1000 for u in final_units[:n]], dtype=np.int64)
            return [ProvisionalUnits(units, n, units[-4:], units, n, 0.0, 0.0, None)]
        return fake

    return push


@pytest.mark.parametrize("shift", [0, 7], ids=["stable-units-right", "stable-units-wrong"])
def test_speculative_prefill_reuses_or_rolls_back_the_cache(model, plain, shift):
    """With provisional units that equal the final ones the end of turn prefills only the tail; with units that
    differ the cache is rolled back; either way the tokens equal a session without speculation."""
    final_units = plain[0].records[0].units
    session, user, out = new_session(model, SessionConfig(preemptive_reply=False))
    session.units.push = _stable_units_from(final_units, shift)(session.units.push)
    asyncio.run(converse(session, user, [QUESTION]))
    m = session.turns[0]
    assert session.records[0].tokens == plain[0].records[0].tokens
    if shift == 0:
        assert m.speculative_tokens == len(final_units) and m.rollback_tokens == 0
        assert m.eot_prefill_tokens == len(session.conversation.builder.tail_ids)
    else:
        assert m.speculative_tokens == 0 and m.rollback_tokens > 0
        assert m.eot_prefill_tokens == len(final_units) + len(session.conversation.builder.tail_ids)


def test_a_preemptive_reply_is_discarded_when_the_user_goes_on(model):
    """A 0.3 s pause inside the turn (longer than the tentative 0.2 s, shorter than the 0.5 s end of turn): the
    preemptive reply is thrown away, the whole turn is answered, and nothing was shown or played before the end."""
    # both files carry 0.3 s of silence around the speech: keep 0.15 s of each
    audio = np.concatenate([QUESTION[:-2400], FOLLOW_UP[2400:]])
    session, user, out = chat(model, [audio])
    assert len(session.turns) == 1
    m = session.turns[0]
    assert m.preemptive_discarded >= 1
    ended = [e for e in session.events.history if isinstance(e, UserSpeechEnded)]
    assert len(ended) == 1
    history = session.events.history
    first_shown = min(i for i, e in enumerate(history) if isinstance(e, (UserTranscript, AgentText)))
    assert history.index(ended[0]) < first_shown
    assert out.segments[0][0].start >= m.final_eot
    # the units are those of the whole turn, not of the part before the pause
    alone = chat(model, [QUESTION], NO_SPEC)[0]
    assert len(session.records[0].units) > len(alone.records[0].units)


def test_turn_two_reuses_the_cache_and_matches_a_fresh_prefill(model, plain):
    import torch

    session = plain[0]
    m, record = session.turns[1], session.records[1]
    history = session.conversation.builder.system_ids
    assert record.prompt[: len(history)] == history
    assert m.eot_prefill_tokens < m.prompt_tokens  # the system prompt was not prefilled again
    fresh = model.new_engine()
    logits = fresh.prefill(record.prompt, start_pos=0)
    torch.testing.assert_close(record.logits, logits, rtol=1e-4, atol=1e-4)
    assert int(record.logits.argmax()) == int(logits.argmax())
    # and the prompt is the conversation as text: turn 0 as heard, then turn 1's units
    from agent.conversation import Conversation

    conv = Conversation(session.conversation.builder)
    conv.add(session.conversation.turns[0])
    assert record.prompt == session.model.tokenizer.encode(conv.prompt_text(record.units))


def test_eviction_keeps_the_prompt_in_the_context(model, plain):
    session = plain[0]
    builder = session.conversation.builder
    no_history = len(builder.system_ids) + len(builder.head_ids) + len(plain[0].records[1].units) + len(builder.tail_ids)
    reserve = session.engine.max_seq - no_history - 1  # room for turn 1's question, not for turn 0 in the history
    evicting = chat(model, [QUESTION, FOLLOW_UP], replace(NO_SPEC, reserve_tokens=reserve))[0]
    m = evicting.turns[1]
    assert m.evicted_turns == 1 and m.prompt_tokens == no_history
    assert m.prompt_tokens + reserve <= evicting.engine.max_seq
    assert m.output_units > 0 and not m.errors


async def _barge_in_conversation(session, user, interruption: np.ndarray):
    """The question; once the reply is playing, `interruption` after 0.3 s; then silence until it is all over."""

    async def drive():
        await user.silence(0.3)
        await user.play(QUESTION)
        await user.silence_until(lambda: session.state == AgentState.SPEAKING, 30)
        await user.silence(0.3)
        await user.play(interruption)
        await user.silence_until(lambda: session.state == AgentState.LISTENING and session._listening is None, 30)
        await user.silence(3.0)
        user.close()

    await asyncio.gather(session.run(), drive())


def test_barge_in_silences_the_output_and_keeps_what_was_heard(model, plain):
    session, user, out = new_session(model)
    asyncio.run(_barge_in_conversation(session, user, FOLLOW_UP))
    first, second = session.turns
    assert first.interrupted and first.interrupted_at is not None
    assert 0 < first.heard_s < first.reply_s
    # silent within one output frame of the decision: nothing of the first reply plays after it
    assert max(p.end for p in out.segments[0]) <= first.interrupted_at + 0.020 + 1e-9
    assert sum(p.samples.shape[0] for p in out.segments[0]) / 16000 == pytest.approx(first.heard_s, abs=1e-6)
    # the history holds the turn as heard, cut by the documented rule
    past = session.conversation.turns[0]
    full_answer = plain[0].turns[0].text_answer
    assert past.interrupted and past.text_answer == first.text_answer
    from agent.parser import parse_ids

    reply_units = parse_ids(session.model.tokenizer, session.records[0].tokens).units
    _, durations = session.model.vocoder_backend.durations(np.array(reply_units))
    heard = units_heard(durations, first.heard_s, 0.02)
    assert 0 < heard < len(reply_units)
    assert first.text_answer == heard_text(full_answer, heard, len(reply_units))
    assert len(first.text_answer.split()) < len(full_answer.split())
    # the interrupting turn is answered
    assert not second.interrupted and second.output_units > 0 and second.heard_s == pytest.approx(second.reply_s)


def test_a_false_interruption_does_not_stop_the_reply(model, plain):
    blip = QUESTION[round(0.5 * 16000) : round(0.85 * 16000)]  # 0.35 s of speech: a turn, but under 0.5 s
    session, user, out = new_session(model)
    asyncio.run(_barge_in_conversation(session, user, blip))
    assert len(session.turns) == 1
    m = session.turns[0]
    assert not m.interrupted and m.heard_s == pytest.approx(m.reply_s)
    assert session.records[0].tokens == plain[0].records[0].tokens


def test_the_heard_text_rule():
    assert heard_text("one two three four", 2, 4) == "one two"
    assert heard_text("one two three four", 0, 4) == ""
    assert heard_text("one two three", 9, 3) == "one two three"
    durations = np.array([2, 3, 1])  # frames of 20 ms: units start at 0, 40, 100 ms
    assert [units_heard(durations, t, 0.02) for t in (0.0, 0.01, 0.04, 0.041, 0.2)] == [0, 1, 1, 2, 3]


def two_conversations(model):
    """Two sessions at once on one model: two turns (question, follow-up) and one turn (table)."""
    async def both():
        a, ua, _ = new_session(model, NO_SPEC)
        b, ub, _ = new_session(model, NO_SPEC)
        await asyncio.gather(converse(a, ua, [QUESTION, FOLLOW_UP]), converse(b, ub, [TABLE]))
        return a, b

    return asyncio.run(both())


def test_two_sessions_at_once_each_answer_as_alone(model, plain):
    a, b = two_conversations(model)
    b_alone = chat(model, [TABLE], NO_SPEC)[0]
    assert tokens_of(a) == tokens_of(plain[0])
    assert tokens_of(b) == tokens_of(b_alone)
    assert np.array_equal(b.replies[0], b_alone.replies[0])


@pytest.mark.parametrize("stage", ["vocoder", "decode", "units"])
def test_a_failing_stage_is_reported_and_the_next_turn_answered(model, plain, stage):
    session, user, out = new_session(model, NO_SPEC)
    calls = {"n": 0}

    def once(real):
        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError(f"injected {stage} fault")
            return real(*args, **kwargs)
        return broken

    if stage == "vocoder":
        session.synth.push = once(session.synth.push)
    elif stage == "decode":
        session.engine.decode = once(session.engine.decode)
    else:
        session.model.units.extract = once(session.model.units.extract)
    try:
        asyncio.run(converse(session, user, [QUESTION, FOLLOW_UP]))
    finally:
        if stage == "units":
            del session.model.units.extract  # the model is shared by the module's tests
    first, second = session.turns
    assert first.errors and f"injected {stage} fault" in first.errors[0]
    errors = [e for e in session.events.history if isinstance(e, SessionError)]
    assert len(errors) == 1 and errors[0].stage == stage and errors[0].turn == 0
    assert not second.errors and second.output_units > 0
    assert session.state == AgentState.LISTENING


def test_malformed_frames_are_counted_and_the_session_goes_on(model):
    session, user, out = new_session(model, NO_SPEC)

    from streaming.frames import AudioFrame

    async def drive():
        await user.silence(0.3)
        user._queue.put_nowait(AudioFrame(np.full(320, np.nan, np.float32), 16000, 1, user.position))  # NaN samples
        user._queue.put_nowait(AudioFrame(np.zeros(0, np.float32), 16000, 1, user.position))  # empty
        await user.play(QUESTION)
        await user.silence_until(lambda: len(session.turns) > 0, 30)
        user.close()

    async def both():
        await asyncio.gather(session.run(), drive())

    asyncio.run(both())
    assert session.rejected_frames >= 1
    assert len(session.turns) == 1 and session.turns[0].output_units > 0


def test_single_turn_gives_every_turn_the_original_prompt(model, tiny_bundle):
    """single_turn=True: each turn's prompt is exactly the official single-turn prompt of its units, and its tokens
    are what respond's generator draws for it (with the turn's seed)."""
    from agent.bundle import resolve_bundle
    from agent.engine_generator import EngineGenerator
    from agent.prompts import Task, prompt_for

    session = chat(model, [QUESTION, FOLLOW_UP], SessionConfig(single_turn=True, seed=5))[0]
    generator = EngineGenerator.from_bundle(resolve_bundle(tiny_bundle))
    for m in session.turns:
        record = session.records[m.turn]
        prompt = prompt_for(Task.SPEECH, units=record.units)
        assert record.prompt == generator.tokenizer.encode(prompt)
        assert record.tokens == generator.generate(prompt, seed=5 + m.turn, stop_at_answer_end=True).new_ids
    assert session.conversation.turns == []


def test_sessions_on_the_batched_engine_answer_as_on_their_own_engines(tiny_bundle, model, plain):
    """The same two conversations with batching on (one scheduler stepping both sessions' decodes together, each in
    its own KV slot, transformers' draw): the tokens of every turn and the reply audio equal the per-session engines'
    (plain: a fork each); each session's slot is returned when it closes."""
    from agent.model import SpeechGPTModel
    from kernels.batch_engine import BatchConfig

    batched = SpeechGPTModel.load(tiny_bundle, batch=BatchConfig(max_sessions=2, cpu_draw="hf", admission=False))

    a, b = two_conversations(batched)
    b_alone = chat(model, [TABLE], NO_SPEC)[0]
    assert tokens_of(a) == tokens_of(plain[0])
    assert tokens_of(b) == tokens_of(b_alone)
    assert np.array_equal(b.replies[0], b_alone.replies[0])
    assert batched.report.batched_slots == 2 and batched.batched.cache.free_slots == 2
    assert any(len(step.slots) == 2 for step in batched.batched.steps)  # the two sessions shared decode steps
    batched.batched.close()
