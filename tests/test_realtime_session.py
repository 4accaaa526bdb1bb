"""The Session's Realtime-style API on the tiny bundle: manual turns, items, responses, text-only output.

Each check compares with a straightforward reference (respond's generator on the same units and seed, the whole
utterance's units, whole-utterance vocoding, a fresh prefill of the whole prompt, the tokenizer's encoding of the
prompt text) or with what the session itself recorded. Nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.clock import SessionClock
from agent.conversation import Message
from agent.events import AudioCommitted, ItemAdded, ResponseCreated, ResponseDone, UserTranscript
from agent.loopback import RecordingOutput
from agent.prompts import Task, prompt_for
from agent.realtime.transport import PushInput
from agent.session import EmptyAudioBuffer, ResponseActive, ResponseOptions, SessionConfig, TurnDetection
from streaming.audio_io import load_audio
from streaming.frames import AudioFrame

ROOT = Path(__file__).resolve().parents[1]
QUESTION = load_audio(ROOT / "streaming/assets/question.wav").samples
FOLLOW_UP = load_audio(ROOT / "streaming/assets/follow_up.wav").samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_bundle):
    from agent.model import SpeechGPTModel

    return SpeechGPTModel.load(tiny_bundle)


@pytest.fixture(scope="module")
def generator(tiny_bundle):
    from agent.bundle import resolve_bundle
    from agent.engine_generator import EngineGenerator

    return EngineGenerator.from_bundle(resolve_bundle(tiny_bundle))


class Manual:
    """A session in manual turns over a push input and a recording output on a fast clock."""

    def __init__(self, model, config: SessionConfig | None = None):
        self.clock = SessionClock(fast=True)
        self.input = PushInput()
        self.output = RecordingOutput(self.clock)
        self.session = model.session(self.input, self.output, config or SessionConfig(), self.clock)
        self.session.set_turn_detection(None)
        self.position = 0.0

    async def say(self, samples: np.ndarray, frame: int = 320) -> None:
        for i in range(0, samples.shape[0], frame):
            piece = samples[i : i + frame]
            self.input.push(AudioFrame(piece, 16000, 1, self.position))
            self.position += piece.shape[0] / 16000
        await self.input.drained()

    async def respond(self, options: ResponseOptions | None = None):
        response = self.session.create_response(options)
        while self.session.active_response is response:
            await asyncio.sleep(0.01)
        return response

    def run(self, script) -> None:
        async def main():
            runner = asyncio.get_running_loop().create_task(self.session.run())
            try:
                await script(self)
            finally:
                self.input.close()
                await runner

        asyncio.run(main())


def test_a_manual_turn_answers_what_respond_answers(model, generator):
    """commit_audio() + create_response(): the units are the whole committed audio's, the tokens those respond's
    generator draws for them (seed 0), the audio the whole-utterance vocoding of the reply's units."""
    from streaming.vocoder import load_vocoder

    got = {}

    async def script(m: Manual):
        await m.say(QUESTION)
        got["buffered"] = m.session.input_buffer_s
        got["item"] = m.session.commit_audio(item_id="client_q1")
        got["response"] = await m.respond(ResponseOptions(metadata={"k": "v"}))

    m = Manual(model)
    m.run(script)
    session, item, response = m.session, got["item"], got["response"]
    assert got["buffered"] == pytest.approx(QUESTION.shape[0] / 16000, abs=1e-3)
    _, reduced = model.units.extract(QUESTION.astype(np.float32))
    assert session.records[0].units == [int(u) for u in reduced]
    prompt = prompt_for(Task.SPEECH, units=session.records[0].units)
    assert session.records[0].prompt == generator.tokenizer.encode(prompt)
    reference = generator.generate(prompt, seed=0, stop_at_answer_end=True)
    assert session.records[0].tokens == reference.new_ids
    vocoded = load_vocoder(model.paths.vocoder).synthesize(reference.response.units)
    assert np.abs(session.replies[0] - vocoded).max() <= 1e-5
    # the conversation: the question (now transcribed) and the answer, with the client's id kept
    assert [x.id for x in session.conversation.items] == ["client_q1", response.item.id]
    assert item.text == reference.response.transcript and item.units == session.records[0].units
    assert response.status == "completed" and response.item.text == reference.response.text_answer
    assert response.item.units == reference.response.units and response.item.audio_s == pytest.approx(
        session.replies[0].shape[0] / 16000)
    assert response.options.metadata == {"k": "v"} and response.question_id == "client_q1"
    u = response.usage
    assert u.input_tokens == len(session.records[0].prompt)
    assert u.input_audio_tokens == sum(1 for t in session.records[0].prompt if model.tokenizer.vocab.is_unit(t))
    assert u.output_tokens == len(reference.new_ids)
    assert u.output_audio_tokens == len(reference.response.units) and u.cached_tokens == 0
    kinds = [type(e) for e in session.events.history if isinstance(e, (AudioCommitted, ItemAdded, ResponseCreated,
                                                                         ResponseDone))]
    assert kinds == [AudioCommitted, ItemAdded, ResponseCreated, ResponseDone]
    finals = [e for e in session.events.history if isinstance(e, UserTranscript) and e.final]
    assert [(e.item_id, e.text) for e in finals] == [("client_q1", item.text)]


def test_commit_clear_and_their_refusals(model):
    got = {}

    async def script(m: Manual):
        await m.say(QUESTION[:1500])  # 94 ms
        with pytest.raises(EmptyAudioBuffer, match="94 ms"):
            m.session.commit_audio()
        with pytest.raises(EmptyAudioBuffer):
            m.session.commit_audio()  # the short audio was dropped: nothing is buffered
        await m.say(QUESTION[:8000])
        got["cleared"] = m.session.clear_audio()
        with pytest.raises(EmptyAudioBuffer):
            m.session.commit_audio()
        await m.say(QUESTION[:1600])  # exactly 100 ms
        got["item"] = m.session.commit_audio()
        m.session.set_turn_detection(TurnDetection())
        with pytest.raises(EmptyAudioBuffer, match="server VAD"):
            m.session.commit_audio()
        m.session.set_turn_detection(None)
        await asyncio.sleep(0)

    m = Manual(model)
    m.run(script)
    assert got["cleared"] == pytest.approx(0.5)
    assert got["item"].audio_s == pytest.approx(0.1) and len(m.session.conversation.items) == 1


def test_history_edits_invalidate_the_cache_from_the_change(model, generator):
    """Two manual turns (the second reuses the cache), then the first answer truncated: the third prompt is the
    edited conversation as text, the cache is kept only up to the truncated message, and its logits equal a fresh
    prefill of the whole prompt."""
    import torch

    got = {}

    async def script(m: Manual):
        await m.say(QUESTION)
        m.session.commit_audio()
        got["r1"] = await m.respond()
        await m.say(FOLLOW_UP)
        m.session.commit_audio()
        got["r2"] = await m.respond()
        got["kept"] = m.session.truncate_item(got["r1"].item.id, 0.3)
        got["text3"] = m.session.conversation.response_prompt_text()
        await m.say(QUESTION)
        m.session.commit_audio()
        got["r3"] = await m.respond()

    m = Manual(model)
    m.run(script)
    session = m.session
    r1, r2, r3 = got["r1"], got["r2"], got["r3"]
    assert got["kept"] == pytest.approx(0.3)
    record2, record3 = session.records[1], session.records[2]
    assert r2.usage.cached_tokens > len(session.conversation.builder.system_ids)  # turn 1 stayed in the cache
    # the truncated answer renders as heard
    assert r1.item.heard_text != r1.item.text and r1.item.status == "incomplete"
    assert len(r1.item.heard_units) < len(r1.item.units)
    assert f"[SpeechGPT]: {r1.item.heard_text}<eoa>" in session.conversation.response_prompt_text()
    # the cache: kept up to (at most) where turn 1's answer starts
    builder = session.conversation.builder
    q1 = session.conversation.get(r1.question_id)
    answer_start = len(builder.system_ids) + len(builder.tok.encode(builder.message_text(q1), add_bos=False))
    # (the heard text is a word prefix of the answer, so the cache may also keep the tokens the two share)
    heard_ids = builder.tok.encode(r1.item.heard_text, add_bos=False)
    assert answer_start <= r3.usage.cached_tokens <= answer_start + len(builder.opener_ids) + len(heard_ids)
    assert r3.usage.cached_tokens < len(record2.prompt)  # invalidated from the edited message on
    assert session.turns[2].rollback_tokens > 0
    fresh = model.new_engine()
    logits = fresh.prefill(record3.prompt, start_pos=0)
    torch.testing.assert_close(record3.logits, logits, rtol=1e-4, atol=1e-4)
    assert record3.prompt[: r3.usage.cached_tokens] == record2.prompt[: r3.usage.cached_tokens]


def test_text_only_output_stops_before_the_units(model):
    """output modalities ["text"]: the same tokens as a spoken answer up to the end of the text answer, no unit
    decoded, no audio; the assistant message is text."""
    got = {}

    async def script(m: Manual):
        await m.say(QUESTION)
        m.session.commit_audio()
        got["text"] = await m.respond(ResponseOptions(modalities=("text",)))

    m = Manual(model)
    m.run(script)
    spoken = Manual(model)

    async def spoken_script(s: Manual):
        await s.say(QUESTION)
        s.session.commit_audio()
        got["audio"] = await s.respond()

    spoken.run(spoken_script)
    text, audio = got["text"], got["audio"]
    tokens = m.session.records[0].tokens
    assert tokens == spoken.session.records[0].tokens[: len(tokens)]
    assert len(tokens) < len(spoken.session.records[0].tokens)
    assert text.usage.output_audio_tokens == 0 and 0 not in m.session.replies and m.output.segments == []
    assert text.status == "completed" and text.item.modality == "text" and text.item.units == []
    assert text.item.text == audio.item.text and text.item.text
    assert m.session.conversation.get(text.question_id).text == spoken.session.conversation.get(audio.question_id).text


def test_a_text_question_is_a_text_task(model, generator):
    """A user text message (LiveKit replays its history as text): SpeechGPT's text task, the official prompt."""
    got = {}

    async def script(m: Manual):
        m.session.add_item(Message("t1", "user", "text", text="What is the weather like?"))
        got["r"] = await m.respond(ResponseOptions(modalities=("text",)))

    m = Manual(model)
    m.run(script)
    prompt = prompt_for(Task.TEXT, text="What is the weather like?")
    assert m.session.records[0].prompt == generator.tokenizer.encode(prompt)
    reference = generator.generate(prompt, task=Task.TEXT, seed=0, stop_at_answer_end=True)
    n = len(m.session.records[0].tokens)
    assert m.session.records[0].tokens == reference.new_ids[:n]
    assert got["r"].item.text == reference.response.text_answer and got["r"].question_id == "t1"


def test_cancel_keeps_what_was_generated_and_one_response_at_a_time(model):
    got = {}

    async def script(m: Manual):
        await m.say(QUESTION)
        m.session.commit_audio()
        response = m.session.create_response()
        with pytest.raises(ResponseActive):
            m.session.create_response()
        while not m.output.playing:  # the first frame is out
            await asyncio.sleep(0.005)
        got["cancelled"] = m.session.cancel_response()
        got["again"] = m.session.cancel_response()
        got["response"] = response

    m = Manual(model)
    m.run(script)
    r = got["cancelled"]
    assert r is got["response"] and got["again"] is None
    assert r.status == "cancelled" and r.reason == "client_cancelled"
    assert r.item.status == "incomplete" and r.item.heard_s is None  # all of it, until a truncate says otherwise
    assert r.item.text and r.item.audio_s > 0
    assert r.item.heard_text == r.item.text


def test_server_vad_without_create_response_only_commits(model):
    """TurnDetection(create_response=False): the VAD's turn becomes a user message (its units those of the turn's
    audio), nothing is answered until create_response()."""
    from agent.loopback import LoopbackInput

    clock = SessionClock(fast=True)
    user, out = LoopbackInput(clock), RecordingOutput(clock)
    session = model.session(user, out, SessionConfig(), clock)
    session.set_turn_detection(TurnDetection(create_response=False))
    got = {}

    async def main():
        async def drive():
            await user.silence(0.3)
            await user.play(QUESTION)
            await user.silence_until(lambda: any(isinstance(e, AudioCommitted) for e in session.events.history), 10)
            await user.silence(0.5)
            got["before"] = len(session.turns)
            got["r"] = session.create_response()
            await user.silence_until(lambda: session.active_response is None, 30)
            user.close()

        await asyncio.gather(session.run(), drive())

    asyncio.run(main())
    assert got["before"] == 0
    items = session.conversation.items
    assert items[0].role == "user" and items[0].units and items[1] is got["r"].item
    assert got["r"].status == "completed" and got["r"].trigger == "client" and got["r"].question_id == items[0].id
    assert session.records[got["r"].turn].units == items[0].units
    assert items[0].text == session.turns[0].transcript


def test_vad_turns_are_responses_too(model):
    """The default VAD session: each turn is a committed user message and a response (trigger "turn_detection")
    whose events carry the item ids."""
    from agent.chat import converse
    from agent.loopback import LoopbackInput

    clock = SessionClock(fast=True)
    user, out = LoopbackInput(clock), RecordingOutput(clock)
    session = model.session(user, out, SessionConfig(), clock)
    asyncio.run(converse(session, user, [QUESTION, FOLLOW_UP]))
    done = [e.response for e in session.events.history if isinstance(e, ResponseDone)]
    assert [r.trigger for r in done] == ["turn_detection"] * 2 and all(r.status == "completed" for r in done)
    items = session.conversation.items
    assert [m.role for m in items] == ["user", "assistant"] * 2
    assert [r.item for r in done] == [items[1], items[3]] and [r.question_id for r in done] == [items[0].id, items[2].id]
    assert [m.text for m in items[::2]] == [t.transcript for t in session.turns]
    assert done[1].usage.cached_tokens > 0
