"""`speechgpt-rt serve` through a plain aiohttp WebSocket client: the GA lifecycle, protocol edge cases, errors the
clients survive, authentication, admission, audio formats, server VAD and the CLI.

One server (one loaded tiny model) serves the module; every wait has a generous timeout and nothing is timed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.realtime import audio as A
from agent.realtime.connection import ServerOptions
from agent.realtime.server import ServerThread
from streaming.audio_io import load_audio
from streaming.frames import AudioFrame, Resampler

ROOT = Path(__file__).resolve().parents[1]
QUESTION = load_audio(ROOT / "streaming/assets/question.wav").samples
KEY = "test-key"
WAIT = 120.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pcm(samples16k: np.ndarray, rate: int = 24000) -> bytes:
    if rate == 16000:
        return AudioFrame(samples16k.astype(np.float32), 16000).to_bytes()
    r = Resampler(rate, in_rate=16000)
    frames = r.push(AudioFrame(samples16k.astype(np.float32), 16000, 1, 0.0)) + r.flush()
    return np.concatenate([f.to_int16().samples for f in frames]).astype("<i2").tobytes()


QUESTION_24K = pcm(QUESTION)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    from agent.model import SpeechGPTModel

    return SpeechGPTModel.load(tiny_bundle)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    s = ServerThread(model, ServerOptions(api_key=KEY, max_sessions=2, max_event_bytes=2**20,
                                          event_log_dir=tmp_path_factory.mktemp("events")))
    yield s
    s.close()


class Client:
    def __init__(self, ws):
        self.ws = ws
        self.seen: list[dict] = []

    async def send(self, **event) -> None:
        await self.ws.send_str(json.dumps(event))

    async def recv(self, timeout: float = WAIT) -> dict:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg.type.name != "TEXT":
            raise ConnectionError(f"socket ended: {msg.type.name} {self.ws.close_code}")
        event = json.loads(msg.data)
        self.seen.append(event)
        return event

    async def until(self, kind: str, timeout: float = WAIT) -> dict:
        while True:
            event = await self.recv(timeout)
            if event["type"] == kind:
                return event

    async def since(self, kind: str) -> list[dict]:
        start = len(self.seen)
        await self.until(kind)
        return self.seen[start:]

    async def manual(self, **session) -> None:
        await self.send(type="session.update", session={"audio": {"input": {"turn_detection": None}}, **session})
        await self.until("session.updated")

    async def append(self, data: bytes, chunk: int = 4800) -> None:
        for i in range(0, len(data), chunk):
            await self.send(type="input_audio_buffer.append", audio=base64.b64encode(data[i : i + chunk]).decode())


async def connect(server, key: str | None = KEY, protocols=(), path="/realtime", query="?model=rt-test"):
    import aiohttp

    http = aiohttp.ClientSession()
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    ws = await http.ws_connect(server.url + path + query, headers=headers, protocols=protocols)
    ws._http = http  # closed with the socket below
    return Client(ws)


async def close(client: Client) -> None:
    await client.ws.close()
    await client.ws._http.close()


async def until_idle(server, limit_s: float = 60.0) -> None:
    """Wait (bounded) until the earlier tests' connections have closed on the server: the module's server admits
    two sessions, and a test's first connection must not find them both still closing."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while server.call(lambda: server.server.active) > 0 and loop.time() < end:
        await asyncio.sleep(0.05)


def run(server, script, **kwargs):
    async def main():
        await until_idle(server)
        client = await connect(server, **kwargs)
        try:
            created = await client.until("session.created")
            return await script(client, created)
        finally:
            await close(client)

    return asyncio.run(main())


def test_a_manual_turn_in_ga_order(server):
    async def script(c: Client, created):
        assert created["session"]["model"] == "rt-test" and created["session"]["id"].startswith("sess_")
        await c.manual()
        await c.append(QUESTION_24K)
        await c.send(type="input_audio_buffer.commit", event_id="commit_1")
        await c.send(type="response.create", event_id="create_1", response={"metadata": {"client_event_id": "create_1"}})
        events = await c.since("response.done")
        await c.send(type="session.update", session={})  # anything after response.done of that response?
        tail = await c.since("session.updated")
        return events, tail

    events, tail = run(server, script)
    kinds = [e["type"] for e in events]
    assert all(isinstance(e["event_id"], str) and e["event_id"] for e in events)
    assert kinds[:3] == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    lifecycle = [k for k in kinds if k.startswith("response.") and not k.endswith(".delta")]
    assert lifecycle == ["response.created", "response.output_item.added", "response.content_part.added",
                         "response.output_audio.done", "response.output_audio_transcript.done",
                         "response.content_part.done", "response.output_item.done", "response.done"]
    created = kinds.index("response.created")
    assert kinds[created + 2] == "conversation.item.added"  # the assistant item, between output_item.added and the part
    assert kinds[-3:] == ["response.output_item.done", "conversation.item.done", "response.done"]
    first_delta = kinds.index("response.output_audio.delta")
    assert kinds.index("response.content_part.added") < first_delta < kinds.index("response.output_audio.done")
    created_ev, done = events[created], events[-1]["response"]
    assert created_ev["response"]["metadata"] == {"client_event_id": "create_1"} == done["metadata"]
    assert created_ev["response"]["status"] == "in_progress" and created_ev["response"]["status_details"] is None
    assert done["status"] == "completed" and done["status_details"] is None and done["object"] == "realtime.response"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"]["audio_tokens"] > 0 and usage["output_token_details"]["audio_tokens"] > 0
    deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
    audio = b"".join(base64.b64decode(e["delta"]) for e in deltas)
    assert all(len(base64.b64decode(e["delta"])) % 2 == 0 and len(e["delta"]) < 2**20 for e in deltas)
    assert len(audio) > 0 and all(e["output_index"] == 0 and e["content_index"] == 0 for e in deltas)
    transcript = "".join(e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta")
    assert transcript and transcript == next(e for e in events if e["type"] == "response.output_audio_transcript.done")["transcript"]
    item = done["output"][0]
    assert item["status"] == "completed" and item["content"] == [{"type": "output_audio", "transcript": transcript}]
    assert not any(e["type"].startswith("response.") for e in tail)  # nothing of it after response.done
    user_item = events[1]["item"]
    assert user_item["role"] == "user" and user_item["content"][0]["type"] == "input_audio"
    assert events[0]["item_id"] == user_item["id"] and events[0]["previous_item_id"] is None


def test_second_create_and_idle_cancel_are_the_errors_clients_ignore(server):
    async def script(c: Client, _):
        await c.manual()
        await c.append(QUESTION_24K)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create")
        await c.send(type="response.create", event_id="second")
        events = await c.since("response.done")
        await c.send(type="response.cancel", event_id="idle_cancel")
        err = await c.until("error")
        await c.send(type="response.cancel", event_id="idle_cancel_2", response_id="resp_unknown")
        err2 = await c.until("error")
        return events, err, err2

    events, idle, unknown = run(server, script)
    errors = [e for e in events if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "conversation_already_has_active_response"
    assert errors[0]["error"]["event_id"] == "second"
    assert events[-1]["response"]["status"] == "completed"  # the first response went on
    assert idle["error"]["code"] == "response_cancel_not_active" and idle["error"]["event_id"] == "idle_cancel"
    assert idle["error"]["message"].startswith("Cancellation failed")
    assert unknown["error"]["code"] == "response_cancel_not_active"


def test_cancel_then_truncate_beyond_the_audio_is_clamped(server):
    async def script(c: Client, _):
        await c.manual()
        await c.append(QUESTION_24K)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create")
        await c.until("response.output_audio.delta")
        await c.send(type="response.cancel")
        events = await c.since("response.done")
        done = events[-1]["response"]
        item_id = done["output"][0]["id"]
        sent = sum(len(base64.b64decode(e["delta"])) for e in c.seen if e["type"] == "response.output_audio.delta")
        await c.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=10**7)
        beyond = await c.until("conversation.item.truncated")
        await c.send(type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=0)
        zero = await c.until("conversation.item.truncated")
        await c.send(type="conversation.item.retrieve", item_id=item_id)
        retrieved = await c.until("conversation.item.retrieved")
        for kind in ("truncate", "delete", "retrieve"):
            await c.send(type=f"conversation.item.{kind}", item_id="nope", content_index=0, audio_end_ms=5, event_id=kind)
        errors = [await c.until("error") for _ in range(3)]
        return done, sent, beyond, zero, retrieved, errors

    done, sent_bytes, beyond, zero, retrieved, errors = run(server, script)
    assert done["status"] == "cancelled" and done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["output"][0]["status"] == "incomplete" and done["output"][0]["content"][0]["transcript"]
    sent_ms = sent_bytes / 2 / 24000 * 1000
    assert 0 < beyond["audio_end_ms"] <= sent_ms + 25  # clamped to what the item has (16 kHz frames vs 24 kHz bytes)
    assert zero["audio_end_ms"] == 0
    assert retrieved["item"]["content"] == [{"type": "output_audio", "transcript": ""}]  # nothing heard: no text
    assert [(e["error"]["code"], e["error"]["event_id"]) for e in errors] == [
        ("item_truncate_invalid_item_id", "truncate"), ("item_delete_invalid_item_id", "delete"),
        ("item_retrieve_invalid_item_id", "retrieve")]


def test_commit_under_100_ms_and_clear(server):
    async def script(c: Client, _):
        await c.manual()
        await c.append(QUESTION_24K[: 2 * 2000])  # 83 ms
        await c.send(type="input_audio_buffer.commit", event_id="short")
        err = await c.until("error")
        await c.append(QUESTION_24K[: 2 * 12000])
        await c.send(type="input_audio_buffer.clear")
        await c.until("input_audio_buffer.cleared")
        await c.send(type="input_audio_buffer.commit", event_id="after_clear")
        err2 = await c.until("error")
        return err, err2

    err, err2 = run(server, script)
    assert err["error"]["code"] == "input_audio_buffer_commit_empty" and err["error"]["event_id"] == "short"
    assert err2["error"]["code"] == "input_audio_buffer_commit_empty" and err2["error"]["event_id"] == "after_clear"


def test_malformed_input_gets_an_error_and_the_session_goes_on(server):
    async def script(c: Client, _):
        codes = []
        await c.ws.send_str("{not json")
        codes.append((await c.until("error"))["error"])
        await c.ws.send_str("[1, 2]")
        codes.append((await c.until("error"))["error"])
        await c.send(type="response.audio.delta", event_id="beta")  # a beta name
        codes.append((await c.until("error"))["error"])
        await c.send(type="input_audio_buffer.append", audio="###not base64###", event_id="b64")
        codes.append((await c.until("error"))["error"])
        await c.send(type="input_audio_buffer.append", audio=base64.b64encode(b"\x01\x02\x03").decode(), event_id="odd")
        codes.append((await c.until("error"))["error"])
        await c.send(type="input_audio_buffer.append", audio="A" * (2**20 + 16), event_id="big")
        codes.append((await c.until("error"))["error"])
        await c.ws.send_bytes(b"\x00\x01")
        codes.append((await c.until("error"))["error"])
        await c.send(type="session.update", session={"type": "transcription"}, event_id="mode")
        codes.append((await c.until("error"))["error"])
        await c.send(type="session.update", session={"instructions": "still here"})
        updated = await c.until("session.updated")
        return codes, updated

    errors, updated = run(server, script)
    assert [e["code"] for e in errors] == ["invalid_json", "invalid_event", "unknown_event", "invalid_value",
                                           "invalid_value", "event_too_large", "invalid_event", "invalid_value"]
    assert [e["event_id"] for e in errors] == [None, None, "beta", "b64", "odd", None, None, "mode"]
    assert updated["session"]["instructions"] == "still here"


def test_session_update_answers_the_full_effective_session(server):
    async def script(c: Client, created):
        await c.send(type="session.update", session={"type": "realtime", "instructions": "x", "tracing": None,
                                                     "unknown": {"a": 1}, "audio": {"output": {"voice": "marin"}}})
        first = await c.until("session.updated")
        await c.send(type="session.update", session={"output_modalities": ["text"]})
        second = await c.until("session.updated")
        return created["session"], first["session"], second["session"]

    created, first, second = run(server, script)
    assert set(first) == set(created) and "unknown" not in first
    assert first["audio"]["output"]["voice"] == "marin" and first["instructions"] == "x"
    assert second["instructions"] == "x" and second["output_modalities"] == ["text"]  # partial: the rest is kept
    assert second["audio"]["input"] == created["audio"]["input"]


def test_text_items_and_a_text_only_answer(server):
    async def script(c: Client, _):
        await c.manual()
        await c.send(type="conversation.item.create", previous_item_id="root",
                     item={"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]})
        a = await c.until("conversation.item.added")
        await c.send(type="conversation.item.create", event_id="dup",
                     item={"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]})
        dup = await c.until("error")
        await c.send(type="conversation.item.create", previous_item_id="missing", event_id="prev",
                     item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]})
        prev = await c.until("error")
        await c.send(type="response.create", response={"output_modalities": ["text"]})
        events = await c.since("response.done")
        return a, dup, prev, events

    added, dup, prev, events = run(server, script)
    assert added["item"]["id"] == "u1" and added["previous_item_id"] is None
    assert dup["error"]["code"] == "item_create_duplicate_item_id" and dup["error"]["event_id"] == "dup"
    assert prev["error"]["code"] == "item_create_invalid_previous_item_id"
    kinds = [e["type"] for e in events]
    assert "response.output_audio.delta" not in kinds and "response.output_text.done" in kinds
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    done = events[-1]["response"]
    assert text and done["output"][0]["content"] == [{"type": "output_text", "text": text}]
    assert done["usage"]["output_token_details"]["audio_tokens"] == 0


def test_truncate_invalidates_the_cache_from_the_cut(server):
    """After turn 1's answer is truncated, turn 3 finds in the cache what precedes that answer's text and nothing
    after it (untruncated, the whole answer would have been found there)."""

    def boundaries(r1):
        conv = next(c for c in server.server.connections if c.state.model == "rt-test").session.conversation
        builder, answer = conv.builder, conv.get(r1["output"][0]["id"])
        before = len(builder.system_ids) + len(builder.message_ids(conv.get(conv.previous_id(answer.id))))
        whole = builder.tok.encode(f" [SpeechGPT]: {answer.text}<eoa>", add_bos=False)
        return before, before + len(whole), answer.heard_text, answer.text

    async def script(c: Client, _):
        await c.manual()
        done = []
        for _ in range(2):
            await c.append(QUESTION_24K)
            await c.send(type="input_audio_buffer.commit")
            await c.send(type="response.create")
            done.append((await c.until("response.done"))["response"])
        await c.send(type="conversation.item.truncate", item_id=done[0]["output"][0]["id"], content_index=0,
                     audio_end_ms=200)
        await c.until("conversation.item.truncated")
        await c.append(QUESTION_24K)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create")
        done.append((await c.until("response.done"))["response"])
        return done, server.call(lambda: boundaries(done[0]))

    (r1, r2, r3), (answer_start, answer_end, heard, text) = run(server, script)
    cached = [r["usage"]["input_token_details"]["cached_tokens"] for r in (r1, r2, r3)]
    assert heard != text
    assert cached[0] == 0 and cached[1] > 0  # turn 2 reused the system prompt and turn 1's head
    assert answer_start <= cached[2] < answer_end  # kept up to the cut answer, not beyond
    assert all(r["status"] == "completed" for r in (r1, r2, r3))


def test_wrong_or_missing_key_is_refused_with_an_error(server):
    async def attempt(**kwargs):
        c = await connect(server, **kwargs)
        try:
            first = await c.recv()
            end = await asyncio.wait_for(c.ws.receive(), WAIT)
            return first, end.type.name, c.ws.close_code
        finally:
            await close(c)

    for kwargs in ({"key": "wrong"}, {"key": None}):
        first, end, code = asyncio.run(attempt(**kwargs))
        assert first["type"] == "error" and first["error"]["code"] == "invalid_api_key"
        assert end in ("CLOSE", "CLOSED", "CLOSING") and code == 1008


def test_browser_subprotocols_select_realtime(server):
    async def main():
        c = await connect(server, key=None, protocols=("realtime", f"openai-insecure-api-key.{KEY}"), path="",
                          query="/realtime")
        try:
            created = await c.recv()
            return created["type"], c.ws.protocol
        finally:
            await close(c)

    kind, protocol = asyncio.run(main())
    assert kind == "session.created" and protocol == "realtime"


def test_max_sessions_beyond_are_refused(server):
    async def main():
        await until_idle(server)
        a, b = await connect(server), await connect(server)
        try:
            await a.until("session.created")
            await b.until("session.created")
            c = await connect(server)
            first = await c.recv()
            end = await asyncio.wait_for(c.ws.receive(), WAIT)
            code = c.ws.close_code
            await close(c)
        finally:
            await close(a)
            await close(b)
        while server.call(lambda: server.server.active) > 0:
            await asyncio.sleep(0.05)
        d = await connect(server)
        try:
            again = await d.recv()
        finally:
            await close(d)
        return first, end.type.name, code, again

    first, end, code, again = asyncio.run(main())
    assert first["type"] == "error" and first["error"]["code"] == "session_limit_reached"
    assert code == 1013 and again["type"] == "session.created"


def test_g711_in_and_out(server):
    """audio/pcmu both ways: the question as 8 kHz mu-law in, the answer as 8 kHz mu-law out, as long as the
    reply audio the session made."""
    q8 = Resampler(8000, in_rate=16000)
    frames = q8.push(AudioFrame(QUESTION.astype(np.float32), 16000, 1, 0.0)) + q8.flush()
    ulaw = A.ulaw_encode(np.concatenate([f.to_int16().samples for f in frames]))

    async def script(c: Client, _):
        await c.manual(audio={"input": {"turn_detection": None, "format": {"type": "audio/pcmu"}},
                              "output": {"format": {"type": "audio/pcmu"}}})
        await c.append(ulaw, chunk=800)
        await c.send(type="input_audio_buffer.commit")
        await c.send(type="response.create")
        events = await c.since("response.done")
        return events

    events = run(server, script)
    assert events[-1]["response"]["status"] == "completed"
    audio = b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")
    speech = A.ulaw_decode(audio).astype(np.float32)
    assert len(audio) > 8000 * 0.3 and np.abs(speech).max() > 100  # 8 kHz mu-law bytes of a reply, not silence
    assert events[-1]["response"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}


def test_input_rate_16000_reads_mislabelled_audio_at_its_real_rate(model):
    """--input-rate 16000: 16 kHz PCM labelled 24 kHz (Pipecat's default pipeline) is read at 16 kHz: the committed
    audio lasts what the speech lasts and its units are exactly the whole utterance's."""
    sixteen = ServerThread(model, ServerOptions(input_rate=16000))
    data = pcm(QUESTION, 16000)

    def committed(item_id):
        message = sixteen.server.connections[0].session.conversation.get(item_id)
        return message.audio_s, list(message.units)

    try:
        async def script(c: Client, _):
            await c.manual()
            await c.append(data, chunk=3200)
            await c.send(type="input_audio_buffer.commit")
            item_id = (await c.until("input_audio_buffer.committed"))["item_id"]
            await c.send(type="response.create")
            await c.until("response.done")
            return sixteen.call(lambda: committed(item_id))

        audio_s, units = run(sixteen, script, key="anything")
    finally:
        sixteen.close()
    assert audio_s == pytest.approx(QUESTION.shape[0] / 16000, abs=1e-3)
    heard = AudioFrame.from_bytes(data, 16000).to_float32().samples
    _, reduced = model.units.extract(heard)
    assert units == [int(u) for u in reduced]


def test_server_vad_turn(server):
    """Server VAD (the session's default): speech then silence appended faster than real time; the turn is
    detected, committed under the id announced at speech_started, transcribed, and answered."""
    silence = bytes(2 * 24000)

    async def script(c: Client, _):
        await c.send(type="session.update", session={"audio": {"input": {"transcription": {"model": "any"}}}})
        await c.until("session.updated")
        await c.append(silence[: 2 * 7200] + QUESTION_24K + silence)
        return await c.since("response.done")

    events = run(server, script)
    kinds = [e["type"] for e in events]
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    committed = events[kinds.index("input_audio_buffer.committed")]
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert 200 <= started["audio_start_ms"] < stopped["audio_end_ms"] <= 300 + len(QUESTION_24K) / 48
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    transcribed = events[kinds.index("conversation.item.input_audio_transcription.completed")]
    assert transcribed["item_id"] == committed["item_id"] and transcribed["transcript"]
    assert events[-1]["response"]["status"] == "completed" and "response.output_audio.delta" in kinds
    assert events[-1]["response"]["metadata"] is None


def test_cli_mistakes_are_one_line_before_any_model_loads(monkeypatch, capsys, tmp_path):
    from agent import cli
    from agent.model import SpeechGPTModel

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a CLI mistake")

    monkeypatch.setattr(SpeechGPTModel, "load", no_load)
    monkeypatch.delenv("SPEECHGPT_TEST_UNSET_KEY", raising=False)
    for argv, words in [(["serve", "--port", "70000"], "--port"),
                        (["serve", "--max-sessions", "0"], "--max-sessions"),
                        (["serve", "--api-key-env", "SPEECHGPT_TEST_UNSET_KEY"], "SPEECHGPT_TEST_UNSET_KEY"),
                        (["serve", "--model-dir", str(tmp_path / "nope")], "nope"),
                        (["serve", "--device", "tpu"], "--device")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("speechgpt-rt serve: ") and words in err[0], err
        assert "Traceback" not in err[0]


@pytest.mark.slow
def test_the_serve_command_serves(tiny_bundle, tmp_path):
    env = {**os.environ, "RT_TEST_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--port", "0", "--model-dir", str(tiny_bundle),
                             "--api-key-env", "RT_TEST_KEY", "--max-sessions", "1", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("speechgpt-rt serve: ws://127.0.0.1:"), banner + proc.stderr.read()
        port = int(banner.split("ws://127.0.0.1:")[1].split("/")[0])

        class At:
            url = f"ws://127.0.0.1:{port}/v1"

        async def main():
            c = await connect(At, key="k1")
            try:
                return await c.recv()
            finally:
                await close(c)

        assert asyncio.run(main())["type"] == "session.created"
    finally:
        proc.terminate()
        proc.wait(60)


def test_a_batched_model_server_answers_and_refuses_beyond_its_slots(tiny_bundle):
    """serve --batched: each connection's session decodes in a slot of one batched engine; with every slot taken a
    new connection gets an error naming the engine's reason and close code 1013; once a session closes its slot
    serves the next connection."""
    from agent.model import SpeechGPTModel
    from kernels.batch_engine import BatchConfig

    model = SpeechGPTModel.load(tiny_bundle, batch=BatchConfig(max_sessions=1, admission=False))
    server = ServerThread(model, ServerOptions())

    async def main():
        a = await connect(server, key="k")
        try:
            await a.until("session.created")
            await a.manual()
            await a.append(QUESTION_24K)
            await a.send(type="input_audio_buffer.commit")
            await a.send(type="response.create")
            answered = await a.since("response.done")
            b = await connect(server, key="k")
            refused = await b.recv()
            await asyncio.wait_for(b.ws.receive(), WAIT)
            code = b.ws.close_code
            await close(b)
        finally:
            await close(a)
        while model.batched.cache.free_slots < 1:
            await asyncio.sleep(0.05)
        c = await connect(server, key="k")
        try:
            again = await c.recv()
        finally:
            await close(c)
        return answered, refused, code, again

    try:
        answered, refused, code, again = asyncio.run(main())
    finally:
        server.close()
        model.batched.close()
    assert answered[-1]["response"]["status"] == "completed"
    assert any(e["type"] == "response.output_audio.delta" for e in answered)
    assert refused["type"] == "error" and refused["error"]["code"] == "session_limit_reached"
    assert "all 1 KV slots are in use" in refused["error"]["message"] and code == 1013
    assert again["type"] == "session.created"
    assert any(step.slots for step in model.batched.steps)  # the answer was decoded by the batched engine
