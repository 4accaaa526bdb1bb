"""`speechgpt-rt room` against a real livekit-server (v1.13.5, built by the fixture) in a private network namespace.

One server and one agent process (the tiny bundle, one model) for the module; the agent joins several rooms and each
test has its own. Test participants use the official SDK (tests/livekit_server.py) and know nothing of the agent's
code: they see only what any LiveKit frontend sees (tracks, the `lk.agent.state` attribute, `lk.transcription`
streams) plus the agent's per-room metrics file. Nothing here depends on how fast the machine is, except the one
bound the issue sets (the agent's audio stops within 250 ms of the barge-in decision, measured at the participant).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time

import pytest
from livekit_server import (
    REPO,
    AgentProcess,
    Participant,
    inside_netns,  # noqa: F401 - fixture
    metrics_lines,
    netns,  # noqa: F401 - fixture
    server_env,
    start_server,
    token,
    voiced_end,
    wait_until,
)

from streaming.audio_io import load_audio

pytestmark = pytest.mark.slow

QUESTION = load_audio("streaming/assets/question.wav").samples
FOLLOW_UP = load_audio("streaming/assets/follow_up.wav").samples
ROOMS = ["talk", "barge", "churn", "mute", "twin-a", "twin-b"]
BARGE_IN_BOUND_S = 0.25
READY_S = 120  # model load on a loaded 2-core machine
PROMETHEUS_PORT = 9464  # on the namespace's loopback


@pytest.fixture(scope="module")
def server(inside_netns, tmp_path_factory):
    srv = start_server(inside_netns, 7880, tmp_path_factory.mktemp("lk-room-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def agent(server, inside_netns, tiny_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("lk-room-agent")
    args = ["room", *sum((["--room", r] for r in ROOMS), []), "--model-dir", str(tiny_bundle), "--torch-threads", "1",
            "--metrics", str(work / "metrics.jsonl"), "--reconnect-timeout", "60", "--prometheus-port", str(PROMETHEUS_PORT)]
    proc = AgentProcess(inside_netns, args, server_env(server), work, "room-agent")
    proc.metrics = work / "metrics.jsonl"
    try:
        proc.wait_for_output("model loaded", READY_S)
        yield proc
    finally:
        proc.stop()
        print(proc.describe())


def run(coro):
    return asyncio.run(coro)


async def joined(server, room: str, identity: str) -> Participant:
    p = Participant(server.address.ws_url, token(server, identity, room), identity)
    await p.join()
    return p


async def wait_listening(p: Participant, timeout_s: float = READY_S) -> None:
    await p.silence_until(lambda: p.states and p.states[-1][2] == "listening" and p.agent() is not None, timeout_s,
                          "the agent to be listening")


def turns_of(agent, room: str, participant: str) -> list[dict]:
    return [r for r in metrics_lines(agent.metrics) if r["room"] == room and r["participant"] == participant]


def test_agent_answers_with_states_and_captions(server, agent):
    async def scenario():
        p = await joined(server, "talk", "alice")
        try:
            await wait_listening(p)
            since = time.time()
            start, _sent = await p.speak(QUESTION)
            speech_end = start + voiced_end(QUESTION)
            await p.silence_until(lambda: p.state_sequence(since)[-1:] == ["listening"] and p.loud(since), 30,
                                  "the reply to play out")
            await p.silence(0.5)
            return p, since, speech_end
        finally:
            await p.leave()

    p, since, speech_end = run(scenario())
    assert p.state_sequence()[-4:] == ["listening", "thinking", "speaking", "listening"]
    assert p.state_sequence(since) == ["thinking", "speaking", "listening"]
    loud = p.loud(since)
    assert loud, "no agent audio with energy arrived"
    assert not p.loud(since, speech_end), "the agent spoke while the user was speaking"
    assert loud[0].at > speech_end
    # captions: the user's on the user's track, the agent's on the agent's track, interim then final
    user_final = p.captions_of(p.user_track_sid(), final=True)
    agent_tracks = p.agent_track_sids()
    agent_final = [c for sid in agent_tracks for c in p.captions_of(sid, final=True)]
    assert len(user_final) == 1 and len(agent_final) == 1, [(c.attributes, c.text) for c in p.captions]
    user_interim = p.captions_of(p.user_track_sid(), final=False)
    agent_interim = [c for sid in agent_tracks for c in p.captions_of(sid, final=False)]
    assert user_interim and agent_interim
    assert {c.segment for c in user_interim} == {user_final[0].segment} != {agent_final[0].segment}
    assert {c.segment for c in agent_interim} == {agent_final[0].segment}
    assert user_final[0].sender == "alice"  # sent on the user's behalf, like LiveKit Agents
    assert agent_interim[0].opened < agent_final[0].opened
    # what the captions said is what the agent's metrics say it heard and answered
    turns = wait_until(lambda: turns_of(agent, "talk", "alice"), 10, "the turn's metrics line")
    assert len(turns) == 1
    turn = turns[0]["turn"]
    assert user_final[0].text == turn["transcript"] and user_final[0].text.startswith("canned question")
    assert agent_final[0].text == turn["text_answer"] and agent_final[0].text.startswith("Canned answer")
    assert not turn["interrupted"] and turn["heard_s"] == pytest.approx(turn["reply_s"])
    # the participant heard about as much loud audio as the agent says it played (10 ms frames)
    assert len(loud) * 0.01 == pytest.approx(turn["reply_s"], abs=0.3)
    # the same turn on the Prometheus endpoint, labelled by room
    import urllib.request

    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the env says
    with no_proxy.open(f"http://127.0.0.1:{PROMETHEUS_PORT}/metrics", timeout=5) as response:
        exposition = response.read().decode()
    assert 'speechgpt_room_turns_total{outcome="completed",room="talk"} 1.0' in exposition
    assert 'speechgpt_room_turn_interval_seconds_count{interval="end_to_end",room="talk"} 1.0' in exposition
    transport = turns[0]["transport"]
    assert transport["queue_ms"] == 100 and transport["underruns"] == turn["underruns"]  # a loaded machine may have some
    assert transport["captured_s"] >= turn["reply_s"] - 0.011 and transport["position_s"] == pytest.approx(turn["heard_s"])


def test_barge_in_stops_the_agent_and_the_next_turn_is_answered(server, agent):
    async def scenario():
        p = await joined(server, "barge", "bob")
        try:
            await wait_listening(p)
            since = time.time()
            await p.speak(QUESTION)
            await p.silence_until(lambda: p.loud(since), 30, "the agent's reply audio")
            barge_start, _ = await p.speak(FOLLOW_UP)  # over the agent's voice
            follow_end = barge_start + voiced_end(FOLLOW_UP)
            await p.silence_until(lambda: p.loud(follow_end) and p.state_sequence(follow_end)[-1:] == ["listening"],
                                  30, "the answer to the barge-in turn")
            await p.silence(0.5)
            return p, since, barge_start, follow_end
        finally:
            await p.leave()

    p, since, barge_start, follow_end = run(scenario())
    turns = wait_until(lambda: len(turns_of(agent, "barge", "bob")) >= 2 and turns_of(agent, "barge", "bob"),
                       10, "two turns of metrics")
    first, second = turns[0], turns[1]
    t0 = first["turn"]
    assert t0["interrupted"] and 0 < t0["heard_s"] < t0["reply_s"]
    decision = first["clock_origin_unix"] + t0["interrupted_at"]
    # the agent's audio of turn 0 as the participant received it: stops within the bound after the decision
    turn0_audio = p.loud(since, follow_end)
    assert turn0_audio and turn0_audio[0].at < decision
    last = turn0_audio[-1].at
    headroom = BARGE_IN_BOUND_S - (last - decision)
    print(f"barge-in: last agent audio {1e3 * (last - decision):.0f} ms after the decision "
          f"(bound {1e3 * BARGE_IN_BOUND_S:.0f} ms, headroom {1e3 * headroom:.0f} ms)")
    assert last - decision <= BARGE_IN_BOUND_S
    # the final caption of the interrupted answer is the text as heard: a word-prefix of the streamed interim text
    agent_tracks = p.agent_track_sids()
    finals = sorted((c for sid in agent_tracks for c in p.captions_of(sid, final=True)), key=lambda c: c.opened)
    interims = sorted((c for sid in agent_tracks for c in p.captions_of(sid, final=False)), key=lambda c: c.opened)
    assert len(finals) == 2
    cut = finals[0]
    full = [c for c in interims if c.segment == cut.segment]
    assert full and cut.text == t0["text_answer"]
    heard_words, all_words = cut.text.split(), full[-1].text.split()
    assert len(heard_words) < len(all_words) and all_words[:len(heard_words)] == heard_words
    # the barge-in speech is the next turn, answered in full, after it ended
    t1 = second["turn"]
    assert not t1["interrupted"] and t1["transcript"] and t1["output_units"] > 0
    assert finals[1].text == t1["text_answer"]
    assert p.loud(follow_end)[0].at > follow_end


def test_participant_leaving_mid_reply_and_the_next_one_served(server, agent):
    async def scenario():
        a = await joined(server, "churn", "carol")
        try:
            await wait_listening(a)
            since = time.time()
            await a.speak(QUESTION)
            await a.silence_until(lambda: a.loud(since), 30, "the agent's reply audio")
        finally:
            await a.leave()  # mid-reply
        left_at = time.time()
        b = await joined(server, "churn", "dave")
        try:
            await b.silence_until(lambda: b.agent() is not None and b.agent().attributes.get("speechgpt.serving") == "dave",
                                  15, "the agent to serve dave")
            assert b.agent().attributes.get("lk.agent.state") == "listening"
            since_b = time.time()
            start, _ = await b.speak(FOLLOW_UP)
            end = start + voiced_end(FOLLOW_UP)
            await b.silence_until(lambda: b.loud(end) and b.state_sequence(end)[-1:] == ["listening"], 30,
                                  "the answer to dave")
            return left_at, b, since_b, end
        finally:
            await b.leave()

    left_at, b, since_b, end = run(scenario())
    assert not b.loud(since_b, end)
    dave = wait_until(lambda: turns_of(agent, "churn", "dave"), 10, "dave's metrics")
    carol = turns_of(agent, "churn", "carol")
    assert dave[0]["session"] == 2 and not carol  # carol's reply was cut when she left: no completed turn
    assert dave[0]["turn"]["turn"] == 0 and dave[0]["turn"]["transcript"]  # a new conversation


def test_mute_ends_the_turn_and_unmute_goes_on(server, agent):
    async def scenario():
        p = await joined(server, "mute", "erin")
        try:
            await wait_listening(p)
            since = time.time()
            await p.speak(QUESTION)
            p.mute()  # at once: the end-of-turn silence is never sent
            await p.silence_until(lambda: p.loud(since) and p.state_sequence(since)[-1:] == ["listening"], 30,
                                  "the answer while muted")
            p.unmute()
            await p.silence(0.5)
            since2 = time.time()
            start, _ = await p.speak(FOLLOW_UP)
            await p.silence_until(lambda: p.loud(since2) and p.state_sequence(since2)[-1:] == ["listening"], 30,
                                  "the answer after unmuting")
            return p
        finally:
            await p.leave()

    run(scenario())
    turns = wait_until(lambda: len(turns_of(agent, "mute", "erin")) >= 2 and turns_of(agent, "mute", "erin"), 10,
                       "two turns")
    assert [t["session"] for t in turns] == [1, 1] and [t["turn"]["turn"] for t in turns] == [0, 1]
    assert all(not t["turn"]["interrupted"] for t in turns)


def test_two_rooms_served_by_one_process_at_once(server, agent):
    async def one(room: str, identity: str):
        p = await joined(server, room, identity)
        try:
            await wait_listening(p)
            since = time.time()
            start, _ = await p.speak(QUESTION)
            end = start + voiced_end(QUESTION)
            await p.silence_until(lambda: p.loud(end) and p.state_sequence(since)[-1:] == ["listening"], 40,
                                  f"the answer in {room}")
            return p, since, end
        finally:
            await p.leave()

    async def both():
        return await asyncio.gather(one("twin-a", "frank"), one("twin-b", "grace"))

    (pa, sa, ea), (pb, sb, eb) = run(both())
    assert abs(sa - sb) < 2.0  # they really talked at the same time
    for p, since, end, room, who in ((pa, sa, ea, "twin-a", "frank"), (pb, sb, eb, "twin-b", "grace")):
        assert not p.loud(since, end) and p.loud(end)
        turn = wait_until(lambda: turns_of(agent, room, who), 10, f"metrics of {room}")[0]["turn"]
        assert turn["transcript"] and not turn["interrupted"]
    # one process: both metrics lines come from the same file the one agent writes, with one model load
    assert agent.stdout().count("model loaded") == 1


def test_agent_rejoins_after_the_server_restarts(server, agent):
    joins_before = agent.stderr().count("joined room 'talk'")
    server.kill()  # a crash, not a polite shutdown
    time.sleep(1.0)
    server.start()

    async def scenario():
        p = await joined(server, "talk", "heidi")
        try:
            await wait_listening(p, 90)
            since = time.time()
            start, _ = await p.speak(QUESTION)
            end = start + voiced_end(QUESTION)
            await p.silence_until(lambda: p.loud(end) and p.state_sequence(since)[-1:] == ["listening"], 30,
                                  "an answer after the restart")
            return p
        finally:
            await p.leave()

    run(scenario())
    assert agent.proc.poll() is None
    assert wait_until(lambda: turns_of(agent, "talk", "heidi"), 10, "heidi's metrics")
    # back in the room either by the SDK's own full reconnect or by the agent's rejoin
    assert "reconnected" in agent.stderr() or agent.stderr().count("joined room 'talk'") > joins_before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_end_the_room_agent_cleanly(server, inside_netns, tiny_bundle, tmp_path, sig):
    args = ["room", "--room", f"sig-{sig.name}", "--model-dir", str(tiny_bundle), "--torch-threads", "1",
            "--metrics", str(tmp_path / "m.jsonl")]
    proc = AgentProcess(inside_netns, args, server_env(server), tmp_path, f"sig-{sig.name}")

    async def scenario():
        p = await joined(server, f"sig-{sig.name}", "ivan")
        try:
            await p.silence_until(lambda: p.agent() is not None, 30, "the agent in the room")
            proc.signal(sig)
            t0 = time.monotonic()
            await p.silence_until(lambda: any(who == "speechgpt-agent" for _, who in p.left), 30, "the agent to leave")
            return time.monotonic() - t0
        finally:
            await p.leave()

    try:
        run(scenario())
        assert proc.wait(30) == 0, proc.describe()
    finally:
        proc.stop()
    assert "stopping" in proc.stdout()


def test_the_default_token_carries_no_more_grants_than_needed():
    from livekit import api

    from agent.livekit.conventions import Credentials, agent_token

    claims = api.TokenVerifier("k", "s" * 32).verify(agent_token(Credentials("ws://x", "k", "s" * 32), "r", "a"))
    video = claims.video
    assert video.room_join and video.room == "r" and video.can_update_own_metadata
    assert video.can_publish_sources == ["microphone"]
    assert not (video.room_admin or video.room_create or video.room_list or video.room_record or video.agent)


# ---- failures: one line, non-zero exit, in bounded time --------------------------------------------------------
def _run_cli(ns, args, env, timeout_s):
    exe = str(REPO / ".venv" / "bin" / "speechgpt-rt")
    t0 = time.monotonic()
    proc = subprocess.run(ns.exec_prefix() + [exe, *args], env=env, capture_output=True, text=True, timeout=timeout_s)
    return proc, time.monotonic() - t0


def _last_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("speechgpt-rt ")]
    assert lines, stderr
    return lines[-1]


@pytest.fixture(scope="module")
def blackhole(inside_netns):
    """A TCP port in the namespace that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind((inside_netns.peer_ip, 7990))
    sock.listen(16)
    yield f"ws://{inside_netns.peer_ip}:7990"
    sock.close()


FAILURES = [("room", "wrong secret"), ("room", "bad token"), ("room", "refused"), ("room", "no answer"),
            ("worker", "wrong secret"), ("worker", "refused"), ("worker", "no answer")]  # a worker mints its token


@pytest.mark.parametrize("command,case", FAILURES)
def test_failures_are_one_line_and_bounded(server, inside_netns, blackhole, tiny_bundle, command, case):
    args = [command] + (["--room", "x"] if command == "room" else []) + ["--model-dir", str(tiny_bundle),
                                                                         "--connect-timeout", "4"]
    env = server_env(server)
    expect = {"wrong secret": "refused", "bad token": "refused", "refused": "unreachable", "no answer": "4 s"}[case]
    if case == "wrong secret":
        env["LIVEKIT_API_SECRET"] = "not-the-secret-" * 3
    elif case == "bad token":
        args += ["--token", "not.a.token"]
    elif case == "refused":
        env["LIVEKIT_URL"] = f"ws://{inside_netns.peer_ip}:7999"
        expect = "unreachable" if command == "room" else "cannot reach"
    else:
        env["LIVEKIT_URL"] = blackhole
    proc, took = _run_cli(inside_netns, args, env, 60)
    line = _last_line(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert expect in line and "eyJ" not in line, line  # says why, never echoes the token
    assert took < 30, f"{case}: took {took:.1f} s"
    assert "model loaded" not in proc.stdout  # it failed before loading anything


def test_missing_configuration_is_reported_before_anything(inside_netns):
    env = {"PATH": "/usr/bin:/bin"}
    proc, _ = _run_cli(inside_netns, ["room", "--room", "x"], env, 60)
    assert proc.returncode == 2 and "LIVEKIT_URL" in _last_line(proc.stderr)
    proc, _ = _run_cli(inside_netns, ["worker", "--url", "ws://10.0.0.1:1"], env, 60)
    assert proc.returncode == 2 and "LIVEKIT_API_KEY" in _last_line(proc.stderr)
