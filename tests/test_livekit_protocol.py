"""The LiveKit transport's pure parts, without a server: captions and state as the publisher sends them, the worker's
availability decisions and status messages, token redaction, per-room metrics.

These fakes never start the SDK's FFI (the server tests need it started inside their network namespace).
"""

from __future__ import annotations

import argparse
import asyncio

from agent.events import AgentState, AgentText, StateChanged, UserTranscript
from agent.livekit.conventions import ATTR_AGENT_STATE, ATTR_SEGMENT_ID, ATTR_TRANSCRIBED_TRACK_ID, ATTR_TRANSCRIPTION_FINAL


class FakeWriter:
    def __init__(self, log, attributes, sender):
        self.attributes, self.sender, self.text, self.closed = dict(attributes), sender, "", False
        log.append(self)

    async def write(self, text):
        assert not self.closed
        self.text += text

    async def aclose(self, **_):
        self.closed = True


class FakeLocalParticipant:
    def __init__(self):
        self.streams: list[FakeWriter] = []
        self.attribute_calls: list[dict] = []

    async def set_attributes(self, attrs):
        self.attribute_calls.append(dict(attrs))

    async def stream_text(self, *, topic, attributes, sender_identity=None, **_):
        assert topic == "lk.transcription"
        return FakeWriter(self.streams, attributes, sender_identity)


class FakeRoom:
    def __init__(self):
        self.local_participant = FakeLocalParticipant()


def test_publisher_sends_state_and_interim_then_final_segments():
    from agent.livekit.publisher import RoomPublisher

    async def scenario():
        room = FakeRoom()
        pub = RoomPublisher(room, "r", lambda: "TR_agent")
        pub.user_identity, pub.user_track_sid = "alice", "TR_user"
        pub.start()
        on = pub.listener(1)
        on(StateChanged(AgentState.LISTENING, AgentState.THINKING, 1.0))
        on(UserTranscript(0, "canned", final=False))
        on(UserTranscript(0, "canned question", final=False))
        on(UserTranscript(0, "canned question alpha", final=True))
        for delta, text in (("Canned", "Canned"), (" answer", "Canned answer"), (" alpha.", "Canned answer alpha.")):
            on(AgentText(0, delta, text, final=False))
        on(StateChanged(AgentState.THINKING, AgentState.SPEAKING, 2.0))
        on(AgentText(0, "", "Canned", final=True))  # cut at a barge-in: what was heard
        on(StateChanged(AgentState.SPEAKING, AgentState.LISTENING, 3.0))
        await pub.drain()
        await pub.aclose()
        return room.local_participant

    lp = asyncio.run(scenario())
    assert [c[ATTR_AGENT_STATE] for c in lp.attribute_calls] == ["thinking", "speaking", "listening"]
    user = [w for w in lp.streams if w.attributes[ATTR_TRANSCRIBED_TRACK_ID] == "TR_user"]
    agent = [w for w in lp.streams if w.attributes[ATTR_TRANSCRIBED_TRACK_ID] == "TR_agent"]
    assert [(w.attributes[ATTR_TRANSCRIPTION_FINAL], w.text) for w in user] == [
        ("false", "canned question"), ("true", "canned question alpha")]
    assert [(w.attributes[ATTR_TRANSCRIPTION_FINAL], w.text) for w in agent] == [
        ("false", "Canned answer alpha."), ("true", "Canned")]
    assert len({w.attributes[ATTR_SEGMENT_ID] for w in user}) == 1
    assert len({w.attributes[ATTR_SEGMENT_ID] for w in agent}) == 1
    assert user[0].attributes[ATTR_SEGMENT_ID] != agent[0].attributes[ATTR_SEGMENT_ID]
    assert {w.sender for w in user} == {"alice"} and {w.sender for w in agent} == {None}
    assert all(w.closed for w in lp.streams)


def test_publisher_retries_attributes_that_failed():
    from agent.livekit import publisher as P

    class Flaky(FakeLocalParticipant):
        fails = 1

        async def set_attributes(self, attrs):
            if self.fails:
                self.fails -= 1
                raise RuntimeError("not connected")
            await super().set_attributes(attrs)

    async def scenario():
        room = FakeRoom()
        room.local_participant = Flaky()
        pub = P.RoomPublisher(room, "r", lambda: "TR")
        pub.start()
        pub.set_attributes({ATTR_AGENT_STATE: "listening"})
        for _ in range(40):  # the retry comes 1 s later
            await asyncio.sleep(0.05)
            if room.local_participant.attribute_calls:
                break
        else:
            await asyncio.sleep(1.2)
        await pub.drain()
        await pub.aclose()
        return room.local_participant.attribute_calls

    assert asyncio.run(scenario()) == [{ATTR_AGENT_STATE: "listening"}]


def _worker(max_sessions):
    from agent.livekit.worker import Worker

    args = argparse.Namespace(url="ws://10.0.0.1:7880", api_key="k", api_secret="s" * 32, worker_name="w",
                              max_sessions=max_sessions, agent_name="sg")
    sinks = argparse.Namespace(prometheus=None)
    worker = Worker(args, loader=None, sinks=sinks)
    sent = []

    async def send(message):
        sent.append(message)

    worker._send = send
    return worker, sent


def test_worker_accepts_up_to_max_sessions_and_reports_full():
    from livekit.protocol import agent as pa

    async def scenario():
        worker, sent = _worker(1)
        for job_id in ("AJ_1", "AJ_2"):
            await worker.on_availability(pa.AvailabilityRequest(job=pa.Job(id=job_id, room={"name": f"room-{job_id}"})))
        return worker, sent

    worker, sent = asyncio.run(scenario())
    answers = [m.availability for m in sent if m.HasField("availability")]
    assert [(a.job_id, a.available) for a in answers] == [("AJ_1", True), ("AJ_2", False)]
    assert answers[0].participant_identity == "agent-AJ_1" and answers[0].participant_attributes["speechgpt.worker"] == "w"
    status = [m.update_worker for m in sent if m.HasField("update_worker")][-1]
    assert status.status == pa.WS_FULL and status.load == 1.0 and status.job_count == 1


def test_a_draining_worker_takes_nothing():
    from livekit.protocol import agent as pa

    async def scenario():
        worker, sent = _worker(None)
        worker.draining = True
        await worker.on_availability(pa.AvailabilityRequest(job=pa.Job(id="AJ_9", room={"name": "r"})))
        await worker.send_status()
        return sent

    sent = asyncio.run(scenario())
    assert [m.availability.available for m in sent if m.HasField("availability")] == [False]
    status = [m.update_worker for m in sent if m.HasField("update_worker")][-1]
    assert status.status == pa.WS_FULL and status.draining


def test_tokens_never_reach_error_lines():
    from livekit import api

    from agent.livekit.room_agent import _describe_connect_error, redact

    jwt = api.AccessToken("k", "s" * 32).with_identity("a").with_grants(api.VideoGrants(room_join=True, room="r")).to_jwt()
    assert jwt not in redact(f"401 invalid token: {jwt}, error: bad signature")
    line = _describe_connect_error(RuntimeError(f"client error: 401 Unauthorized - invalid token: {jwt}"), "ws://h", "r")
    assert "refused the token" in line and jwt not in line and "\n" not in line


def test_room_metrics_lines_and_prometheus_are_labelled_by_room():
    from prometheus_client import generate_latest

    from agent.clock import SessionClock
    from agent.livekit.audio import SegmentReport
    from agent.livekit.metrics import RoomPrometheusExporter, turn_record
    from agent.metrics import TurnMetrics

    m = TurnMetrics(0, onset=1.0, last_voiced=2.0, final_eot=2.5, first_frame_handed=2.9, first_frame_played=2.91,
                    reply_s=1.5, heard_s=1.5)
    report = SegmentReport(2.91, 1.52, 1.5, False, 0, 100)
    record = turn_record("room-a", "alice", 1, m, report, SessionClock())
    assert record["room"] == "room-a" and record["participant"] == "alice" and record["session"] == 1
    assert record["transport"]["capture_s"] == m.intervals()["playout"]
    assert record["transport"]["queue_ms"] == 100 and record["turn"]["intervals"]["end_to_end"] is not None
    exporter = RoomPrometheusExporter()
    exporter.observe(record)
    exporter.observe(turn_record("room-b", "bob", 1, m, None, SessionClock()))
    text = generate_latest(exporter.registry).decode()
    assert 'speechgpt_room_turns_total{outcome="completed",room="room-a"} 1.0' in text
    assert 'room="room-b"' in text and 'interval="end_to_end",le=' in text
