"""`speechgpt-rt worker` against a real livekit-server's agent dispatch (its own server for this module).

Two worker processes with `--max-sessions 1` register under one agent name; rooms get an agent only through explicit
dispatch (`AgentDispatchService` of livekit-api). The test participants use the official SDK only
(tests/livekit_server.py). Order matters inside the module (one server, two workers): answer, balance and refusal,
server restart and re-registration, drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from livekit_server import (
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
AGENT_NAME = "sg-test"
READY_S = 120


@pytest.fixture(scope="module")
def server(inside_netns, tmp_path_factory):
    srv = start_server(inside_netns, 7890, tmp_path_factory.mktemp("lk-worker-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def workers(server, inside_netns, tiny_bundle, tmp_path_factory):
    work = tmp_path_factory.mktemp("lk-workers")
    procs = []
    for name in ("w1", "w2"):
        args = ["worker", "--agent-name", AGENT_NAME, "--max-sessions", "1", "--worker-name", name,
                "--model-dir", str(tiny_bundle), "--torch-threads", "1", "--metrics", str(work / f"{name}.jsonl"),
                "--idle-timeout", "3", "--reconnect-timeout", "60"]
        proc = AgentProcess(inside_netns, args, server_env(server), work, name)
        proc.metrics = work / f"{name}.jsonl"
        procs.append(proc)
    try:
        for proc in procs:
            proc.wait_for_output("model loaded", READY_S)
            proc.wait_for_output("registered as", 10)
        yield {p.name: p for p in procs}
    finally:
        for proc in procs:
            proc.stop()
            print(proc.describe())


async def dispatch(server, room: str) -> str:
    from livekit import api

    a = server.address
    lk = api.LiveKitAPI(a.http_url, a.api_key, a.api_secret)
    try:
        d = await lk.agent_dispatch.create_dispatch(api.CreateAgentDispatchRequest(agent_name=AGENT_NAME, room=room))
        return d.id
    finally:
        await lk.aclose()


async def joined(server, room: str, identity: str) -> Participant:
    p = Participant(server.address.ws_url, token(server, identity, room), identity)
    await p.join()
    return p


async def wait_agent(p: Participant, timeout_s: float = 30) -> dict:
    await p.silence_until(lambda: p.agent() is not None and p.agent().attributes.get("lk.agent.state") == "listening",
                          timeout_s, "a dispatched agent, listening")
    return dict(p.agent().attributes)


async def converse(p: Participant) -> float:
    since = time.time()
    start, _ = await p.speak(QUESTION)
    end = start + voiced_end(QUESTION)
    await p.silence_until(lambda: p.loud(end) and p.state_sequence(since)[-1:] == ["listening"], 30, "the answer")
    assert not p.loud(since, end)
    return end


def all_turns(workers) -> list[dict]:
    return [r | {"worker": name} for name, w in workers.items() for r in metrics_lines(w.metrics)]


def test_dispatched_room_is_answered_and_a_second_room_goes_to_the_other_worker(server, workers):
    async def scenario():
        await dispatch(server, "job-1")
        p1 = await joined(server, "job-1", "kim")
        try:
            attrs1 = await wait_agent(p1)
            await converse(p1)
            # job-1 is running (kim is still there): its worker is full, so job-2 must go to the other one
            await dispatch(server, "job-2")
            p2 = await joined(server, "job-2", "lee")
            try:
                attrs2 = await wait_agent(p2)
                await converse(p2)
                # both workers full: a third dispatched room gets nobody
                await dispatch(server, "job-3")
                p3 = await joined(server, "job-3", "max")
                try:
                    await p3.silence(4.0)
                    third = p3.agent()
                finally:
                    await p3.leave()
            finally:
                await p2.leave()
        finally:
            await p1.leave()
        return attrs1, attrs2, third

    attrs1, attrs2, third = asyncio.run(scenario())
    assert attrs1["lk.agent_name"] == attrs2["lk.agent_name"] == AGENT_NAME
    assert {attrs1["speechgpt.worker"], attrs2["speechgpt.worker"]} == {"w1", "w2"}
    assert third is None
    # both reported themselves full (load 1.0), so the server did not even offer it: it says no worker could take it
    log = server.log_tail(1_000_000).splitlines()
    assert any("failed to send job request" in line and f'"agentName": "{AGENT_NAME}"' in line for line in log)
    rooms = {(t["room"], t["worker"]) for t in wait_until(lambda: len(all_turns(workers)) >= 2 and all_turns(workers),
                                                          10, "metrics of both jobs")}
    assert rooms == {("job-1", attrs1["speechgpt.worker"]), ("job-2", attrs2["speechgpt.worker"])}
    for w in workers.values():  # one model per process, loaded once
        assert w.stdout().count("model loaded") == 1


def test_workers_register_again_after_the_server_restarts(server, workers):
    for w in workers.values():  # the jobs above have ended (nobody left in their rooms)
        w.wait_for_output("done (JS_", 30, count=1)
    server.kill()
    time.sleep(1.0)
    server.start()
    for w in workers.values():
        w.wait_for_output("registration 2", 60)

    async def scenario():
        await dispatch(server, "job-after-restart")
        p = await joined(server, "job-after-restart", "ned")
        try:
            await wait_agent(p)
            await converse(p)
        finally:
            await p.leave()

    asyncio.run(scenario())
    assert any(t["room"] == "job-after-restart" for t in wait_until(lambda: all_turns(workers), 10, "metrics"))


def test_sigterm_drains_the_current_turn_then_exits(server, workers):
    async def scenario():
        await dispatch(server, "job-drain")
        p = await joined(server, "job-drain", "oli")
        try:
            attrs = await wait_agent(p)
            worker = workers[attrs["speechgpt.worker"]]
            since = time.time()
            await p.speak(QUESTION)
            await p.silence_until(lambda: p.loud(since), 30, "the reply to start")
            worker.signal(signal.SIGTERM)  # mid-reply
            agent_identity = p.agent().identity
            await p.silence_until(lambda: any(who == agent_identity for _, who in p.left), 40, "the agent to leave")
            return worker
        finally:
            await p.leave()

    worker = asyncio.run(scenario())
    assert worker.wait(30) == 0, worker.describe()
    assert "draining" in worker.stdout()
    turn = [t for t in metrics_lines(worker.metrics) if t["room"] == "job-drain"]
    assert len(turn) == 1 and not turn[0]["turn"]["interrupted"]  # the reply in progress played to the end
    assert turn[0]["turn"]["heard_s"] == pytest.approx(turn[0]["turn"]["reply_s"])
