"""`--server`: the transports' model behind a running `speechgpt-rt serve` (agent/realtime/remote.py).

A real server (the Realtime server on one loaded tiny model, in a thread) is driven by `RemoteSession`s over the
loopback transport in real time: a spoken turn comes back as the same events the in-process Session gives, a
barge-in truncates the assistant item on the server to what was played, a server that goes away ends the session
with an error event. The commands' `--server` handling (a dead URL fails in one line before anything loads) and a
phone call through `speechgpt-rt telephony --server` (a fake Twilio client) close it. Every wait is bounded and
generous; nothing is timed.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.clock import SessionClock
from agent.events import (AgentState, AgentText, ReplyAudioFinished, ReplyAudioStarted, SessionError, StateChanged,
                          TurnCompleted, UserSpeechEnded, UserSpeechStarted, UserTranscript)
from agent.loopback import LoopbackInput, RecordingOutput
from agent.realtime.connection import ServerOptions
from agent.realtime.remote import RemoteError, RemoteModel, probe, realtime_url
from agent.realtime.server import ServerThread
from streaming.audio_io import load_audio

ROOT = Path(__file__).resolve().parents[1]
QUESTION = load_audio(ROOT / "streaming/assets/question.wav").samples
KEY = "remote-test-key"
WAIT_S = 90.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tiny_bundle):
    from agent.model import SpeechGPTModel

    return SpeechGPTModel.load(tiny_bundle)


@pytest.fixture(scope="module")
def server(model):
    s = ServerThread(model, ServerOptions(api_key=KEY))
    yield s
    s.close()


class HoldingOutput(RecordingOutput):
    """A RecordingOutput whose first segment never finishes playing by itself (a listener with a long buffer): a
    barge-in always finds it playing, however late the server's speech_started comes on a loaded machine."""

    def flush(self) -> None:
        seg = self._segment
        if seg is not None and len(self.segments) == 1:  # the first answer (cleared before or after its flush)
            seg.flushed = True  # no finisher: only clear_buffer() ends it
            return
        super().flush()


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_items(server, session_id: str) -> list:
    """The conversation items of one live connection, read on the server's loop."""
    return server.call(lambda: [m for c in server.server.connections if c.state.id == session_id
                                for m in c.session.conversation.items])


async def converse(session, mic: LoopbackInput, user) -> None:
    """Run the session and the user's script; the microphone closes when the script is done."""
    async def script():
        try:
            await user()
        finally:
            mic.close()

    await asyncio.wait_for(asyncio.gather(session.run(), script()), WAIT_S * 2)


def test_realtime_url_forms():
    assert realtime_url("ws://h:1") == "ws://h:1/v1/realtime"
    assert realtime_url("http://h:1/v1") == "ws://h:1/v1/realtime"
    assert realtime_url("wss://h/v1/realtime/") == "wss://h/v1/realtime"
    for bad in ("h:1", "ftp://h:1", "ws://:1", "ws://h:port"):
        with pytest.raises(ValueError, match="--server"):
            realtime_url(bad)


def test_a_spoken_turn_comes_back_as_session_events(server):
    remote = RemoteModel(server.url, KEY)

    async def main():
        clock = SessionClock()
        mic, speaker = LoopbackInput(clock), RecordingOutput(clock)
        session = remote.session(mic, speaker, clock=clock, name="remote-turn", attributes={"room": "r1"})

        async def user():
            await mic.silence(0.3)
            await mic.play(QUESTION)
            await mic.silence_until(lambda: len(session.turns) > 0 or session.error_count > 0, WAIT_S)
            seen["items"] = server_items(server, session.session_id)  # before the socket closes

        await converse(session, mic, user)
        return session, speaker

    seen: dict = {}
    session, speaker = asyncio.run(main())
    events = list(session.events.history)
    assert not [e for e in events if isinstance(e, SessionError)], events
    assert session.attributes == {"room": "r1"} and len(session.turns) == 1
    kinds = [type(e) for e in events if not isinstance(e, StateChanged)]
    for kind in (UserSpeechStarted, UserSpeechEnded, UserTranscript, AgentText, ReplyAudioStarted,
                 ReplyAudioFinished, TurnCompleted):
        assert kind in kinds, (kind.__name__, kinds)
    assert kinds.index(UserSpeechStarted) < kinds.index(UserSpeechEnded) < kinds.index(ReplyAudioStarted) \
        < kinds.index(ReplyAudioFinished) < kinds.index(TurnCompleted)
    heard = [e for e in events if isinstance(e, UserTranscript) and e.final]
    answer = [e for e in events if isinstance(e, AgentText) and e.final]
    deltas = "".join(e.delta for e in events if isinstance(e, AgentText) and not e.final)
    assert len(heard) == 1 and heard[0].text.strip() and heard[0].turn == 0
    assert len(answer) == 1 and answer[0].text.strip() and answer[0].text == deltas
    # the reply audio: 16 kHz frames played on the transport's output (RecordingOutput refuses any other rate)
    assert len(speaker.segments) == 1 and not speaker.finished[0].interrupted
    played = sum(p.samples.shape[0] for p in speaker.segments[0])
    assert played > 16000 * 0.2 and played % 320 == 0
    m = session.turns[0]
    assert m.transcript == heard[0].text and m.text_answer == answer[0].text and not m.errors
    assert m.reply_s == pytest.approx(played / 16000) and m.heard_s == pytest.approx(played / 16000)
    assert m.onset < m.last_voiced < m.final_eot <= m.first_frame_handed <= m.first_frame_played
    assert m.intervals()["end_to_end"] is not None and m.new_tokens > 0 and m.output_units > 0
    assert m.intervals()["overhead"] is None and m.to_dict()["intervals"]["response"] is not None  # no compute here
    states = [e.new for e in events if isinstance(e, StateChanged)]
    assert states[:4] == [AgentState.LISTENING, AgentState.THINKING, AgentState.SPEAKING, AgentState.LISTENING], states
    # what the server heard and answered is what the client reports
    user = [i for i in seen["items"] if i.role == "user"]
    agent = [i for i in seen["items"] if i.role == "assistant"]
    assert [i.id for i in user] == [heard[0].item_id] and user[0].text == heard[0].text
    assert len(agent) == 1 and agent[0].text == answer[0].text and agent[0].heard_s is None


def test_barge_in_truncates_the_answer_on_the_server_to_what_was_played(server):
    remote = RemoteModel(server.url, KEY)
    seen: dict = {}

    async def main():
        clock = SessionClock()
        mic, speaker = LoopbackInput(clock), HoldingOutput(clock)
        session = remote.session(mic, speaker, clock=clock, name="remote-barge-in")
        started = asyncio.Event()
        session.events.on(lambda e: started.set() if isinstance(e, ReplyAudioStarted) else None)

        async def user():
            await mic.silence(0.3)
            await mic.play(QUESTION)
            assert await mic.silence_until(started.is_set, WAIT_S), "no reply audio"
            await mic.silence(0.3)  # some of the answer is heard, then the user speaks over it
            await mic.play(QUESTION)
            assert await mic.silence_until(lambda: len(session.turns) >= 2 or session.error_count > 0, WAIT_S)
            seen["items"] = server_items(server, session.session_id)  # before the socket closes

        await converse(session, mic, user)
        return session, speaker

    session, speaker = asyncio.run(main())
    assert not [e for e in session.events.history if isinstance(e, SessionError)]
    cut = speaker.finished[0]
    assert cut.interrupted and 0 < cut.position
    first = session.turns[0]
    assert first.interrupted and first.heard_s == cut.position and first.interrupted_at is not None
    assert first.heard_s < first.reply_s or first.reply_s == pytest.approx(first.heard_s)
    # on the server: the first assistant item was truncated at the position the client played
    answers = [m for m in seen["items"] if m.role == "assistant"]
    assert answers and answers[0].heard_s == pytest.approx(round(cut.position * 1000) / 1000, abs=1e-6)
    assert answers[0].status == "incomplete"
    # the final text is the server's text as heard (a prefix of all that was generated)
    final = [e for e in session.events.history if isinstance(e, AgentText) and e.final and e.turn == first.turn]
    assert final[0].text == answers[0].heard_text and first.text_answer == answers[0].heard_text
    assert len(session.turns) >= 2  # the interrupting question was answered too


def test_a_server_that_goes_away_ends_the_session_with_an_error(model):
    own = ServerThread(model, ServerOptions())  # no key: the placeholder key is accepted
    remote = RemoteModel(own.url)
    try:
        async def main():
            clock = SessionClock()
            mic, speaker = LoopbackInput(clock), RecordingOutput(clock)
            session = remote.session(mic, speaker, clock=clock)
            run = asyncio.ensure_future(session.run())
            assert await mic.silence_until(lambda: session.state == AgentState.LISTENING or run.done(), WAIT_S)
            await asyncio.to_thread(own.close)  # the server stops while the caller is on
            ended = await mic.silence_until(run.done, WAIT_S)  # the microphone is still open
            mic.close()
            await asyncio.wait_for(run, WAIT_S)
            return session, ended

        session, ended = asyncio.run(main())
    finally:
        own.close()
    assert ended, "the session did not end when the server went away"
    errors = [e for e in session.events.history if isinstance(e, SessionError)]
    assert len(errors) == 1 and errors[0].stage == "server" and "went away" in errors[0].message, errors

    async def again():  # a new session finds nobody there: an error event, no exception
        clock = SessionClock()
        mic, speaker = LoopbackInput(clock), RecordingOutput(clock)
        session = remote.session(mic, speaker, clock=clock)
        await asyncio.wait_for(session.run(), WAIT_S)
        return session

    session = asyncio.run(again())
    errors = [e for e in session.events.history if isinstance(e, SessionError)]
    assert len(errors) == 1 and "cannot reach the model server" in errors[0].message, errors
    assert remote.retry_delay() > 0  # the next session backs off


def test_probe_says_what_is_wrong_in_one_line(server):
    asyncio.run(probe(realtime_url(server.url), KEY))  # up, key accepted
    with pytest.raises(RemoteError, match="refused the API key") as wrong:
        asyncio.run(probe(realtime_url(server.url), "not-the-key"))
    dead = f"ws://127.0.0.1:{dead_port()}"
    with pytest.raises(RemoteError, match="cannot reach the model server") as refused:
        asyncio.run(probe(realtime_url(dead), KEY))
    for exc in (wrong, refused):
        assert "\n" not in str(exc.value)


# ---- the commands ---------------------------------------------------------------------------------------------
COMMANDS = {
    "room": ["room", "--url", "ws://127.0.0.1:9", "--room", "r1", "--token", "t"],
    "worker": ["worker", "--url", "ws://127.0.0.1:9", "--api-key", "k", "--api-secret", "s" * 32],
    "telephony": ["telephony", "--port", "0"],
}


@pytest.fixture
def no_model_load(monkeypatch):
    from agent.model import SpeechGPTModel

    def refuse(*args, **kwargs):
        raise AssertionError("no model may load with --server")

    monkeypatch.setattr(SpeechGPTModel, "load", classmethod(lambda cls, *a, **k: refuse()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_dead_server_fails_the_command_in_one_line_before_anything_loads(command, no_model_load, capsys):
    from agent.cli import main

    url = f"ws://127.0.0.1:{dead_port()}"
    code = main(COMMANDS[command] + ["--server", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith(f"speechgpt-rt {command}: ") and "cannot reach the model server" in err[0], err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_server_mistakes_are_one_line(command, no_model_load, capsys, tmp_path):
    from agent.cli import main

    cases = [(["--server", "ws://127.0.0.1:9", "--model-dir", str(tmp_path)], "exclude each other"),
             (["--server", "127.0.0.1:9"], "expected ws://HOST:PORT"),
             (["--api-key-env", "SPEECHGPT_RT_TEST_KEY"], "goes with --server"),
             (["--server", "ws://127.0.0.1:9", "--api-key-env", "SPEECHGPT_RT_UNSET_KEY_VARIABLE"], "not set")]
    for extra, words in cases:
        code = main(COMMANDS[command] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (extra, err)


@pytest.mark.parametrize("command", ["room", "worker"])
def test_room_and_worker_go_on_past_a_live_server_without_loading_a_model(command, server, no_model_load, capsys,
                                                                          monkeypatch):
    """The probe passes (key from --api-key-env), then the command goes on to LiveKit: here a dead LiveKit URL,
    so it ends with that one line, and nothing loaded (LiveKit rooms themselves: tests/test_livekit_*.py)."""
    from agent.cli import main

    monkeypatch.setenv("SPEECHGPT_RT_TEST_KEY", KEY)
    args = [a if a != "ws://127.0.0.1:9" else f"ws://127.0.0.1:{dead_port()}" for a in COMMANDS[command]]
    code = main(args + ["--server", server.url, "--api-key-env", "SPEECHGPT_RT_TEST_KEY", "--connect-timeout", "3",
                        "--reconnect-timeout", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"speechgpt-rt {command}: "), err
    assert "model server" not in err[0] and "API key" not in err[0], err


def test_a_phone_call_through_telephony_server(server, tmp_path):
    """`speechgpt-rt telephony --server` (its own process, no model) answers a fake Twilio caller with bot audio
    that the model server made."""
    import aiohttp

    from test_telephony import FakeProvider

    env = dict(os.environ, SPEECHGPT_RT_TEST_KEY=KEY, PYTHONUNBUFFERED="1")
    env.pop("TWILIO_AUTH_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "telephony", "--port", "0", "--server", server.url,
                             "--api-key-env", "SPEECHGPT_RT_TEST_KEY", "--providers", "twilio"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    output: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [output.put(x) for x in proc.stdout] + [output.put("")], daemon=True).start()
    try:
        lines = []
        while True:
            line = output.get(timeout=WAIT_S)  # bounded: a hung start fails the test instead of hanging it
            assert line, "telephony exited: " + "".join(lines)
            lines.append(line)
            if "listening on " in line:
                base = line.split("listening on ")[1].split()[0].rstrip(";,")
                break
        assert any("model server" in x for x in lines) and not any("model loaded" in x for x in lines), lines

        async def call():
            async with aiohttp.ClientSession() as http:
                phone = await FakeProvider(http, base, "twilio", {"caller": "+15550100"}).connect()
                await phone.silence(0.3)
                await phone.say(QUESTION)
                answered = await phone.silence_until(lambda: phone.finished_replies() >= 1, WAIT_S)
                await phone.stop()
                return phone, answered

        phone, answered = asyncio.run(call())
        assert answered, "the caller got no reply"
        assert phone.playouts[0].audio_s > 0.2 and not phone.violations
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
