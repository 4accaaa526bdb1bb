"""`speechgpt-rt serve` with the real client libraries: the OpenAI SDK's GA client, LiveKit Agents' OpenAI Realtime
plugin (its RealtimeSession driven directly) and Pipecat's GA event parser on every event the server sent them.

The clients live in their own virtual environment (agent/realtime/clients.py: built once, cached under .cache/);
each runs as a subprocess against one server on 127.0.0.1 that serves the module. Under CI (CI=true) a missing
client environment is a failure; elsewhere the tests skip, saying why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from agent.realtime.connection import ServerOptions
from agent.realtime.server import ServerThread
from streaming.audio_io import load_audio
from streaming.frames import AudioFrame, Resampler

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def client_python():
    from agent.realtime.clients import ClientEnvError, ensure_client_env

    try:
        return ensure_client_env(log=print)
    except ClientEnvError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: the Realtime client environment could not be built: {exc}")
        pytest.skip(f"the Realtime client environment could not be built (no PyPI?): {exc}")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """The shipped spoken question as raw 24 kHz PCM16 (what the clients send)."""
    q = load_audio(ROOT / "streaming/assets/question.wav").samples
    r = Resampler(24000, in_rate=16000)
    frames = r.push(AudioFrame(q, 16000, 1, 0.0)) + r.flush()
    path = tmp_path_factory.mktemp("speech") / "question_24k.pcm"
    path.write_bytes(np.concatenate([f.to_int16().samples for f in frames]).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def runs(tiny_bundle, client_python, speech, tmp_path_factory):
    """One server; the SDK and LiveKit programs run against it, one after the other. Their reports, and the
    server's event log of each connection."""
    from agent.model import SpeechGPTModel
    from agent.realtime.clients import run_driver

    logs = tmp_path_factory.mktemp("server-events")
    server = ServerThread(SpeechGPTModel.load(tiny_bundle), ServerOptions(event_log_dir=logs))
    out = tmp_path_factory.mktemp("reports")
    reports = {}
    try:
        for driver in ("openai_sdk", "livekit_plugin"):
            before = set(logs.iterdir())
            report = out / f"{driver}.json"
            done = run_driver(client_python, driver, ["--url", server.url, "--key", "any-non-empty-key",
                                                      "--audio", str(speech), "--out", str(report)])
            assert done.returncode == 0, f"{driver} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
            reports[driver] = (json.loads(report.read_text()), sorted(set(logs.iterdir()) - before))
    finally:
        server.close()
    return reports


def _events(paths) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()]


def test_openai_sdk(runs):
    report, logs = runs["openai_sdk"]
    assert report["session_id"].startswith("sess_") and report["created_turn_detection"] == "server_vad"
    assert report["updated"] == {"turn_detection": None, "transcription": "whisper-1", "instructions": "Be brief."}
    t1 = report["turn1"]
    assert t1["status"] == "completed" and t1["metadata"] == {"turn": "1"} == t1["created_metadata"]
    assert t1["audio_bytes"] > 24000 and t1["deltas"] > 5 and t1["transcript"]
    assert t1["input_transcript"] and t1["item"]["content"][0]["transcript"] == t1["transcript"]
    assert t1["usage"]["input_tokens"] > 0 and t1["usage"]["output_token_details"]["audio_tokens"] > 0
    t2 = report["turn2"]
    assert t2["status"] == "cancelled" and t2["reason"] == "client_cancelled" and t2["cancelled_at"] == t2["item_id"]
    assert 0 < t2["truncated_to_ms"] < 60_000  # clamped to the audio the item has
    assert t2["truncated_again_ms"] == 40
    assert t2["retrieved"]["status"] == "incomplete" and t2["retrieved"]["content"][0]["type"] == "output_audio"
    assert t2["retrieved"]["content"][0]["transcript"] == ""  # 40 ms heard: not one word of it
    assert t2["cancel_idle_code"] == "response_cancel_not_active"
    assert report["text_item_id"] == "sdk_text_q"
    assert report["text_response"]["status"] == "completed" and report["text_response"]["text"]
    assert report["text_response"]["audio_deltas"] == 0
    assert [e["code"] for e in report["errors"]] == ["response_cancel_not_active"]
    # what went over the wire: audio deltas 24 kHz PCM16, nothing of a response after its response.done
    events = _events(logs)
    done_ids = set()
    for e in events:
        if e["type"] == "response.done":
            done_ids.add(e["response"]["id"])
        assert e.get("response_id") not in done_ids, e["type"]


def test_livekit_agents_openai_plugin(runs):
    report, logs = runs["livekit_plugin"]
    manual, vad = report["manual"], report["server_vad"]
    assert manual["errors"] == [] and manual["speech_started"] == 0  # no server turn events in manual mode
    t1 = manual["turn1"]
    assert t1["user_initiated"] is True  # generate_reply returned: the metadata came back
    (m1,) = t1["messages"]
    assert m1["audio_frames"] > 5 and m1["audio_s"] > 0.3 and m1["text"]
    (m2,) = manual["turn2"]["messages"]
    assert m2["audio_frames"] >= 1 and m2["audio_s"] < m1["audio_s"]  # interrupted at its first frame
    assert manual["turn2"]["truncated"] == m2["id"]
    assert manual["transcripts"] and manual["transcripts"][-1][1]
    assert "lk_user_text" in manual["remote_ids_after_add"] and "lk_user_text" not in manual["remote_ids_after_delete"]
    (m3,) = manual["turn3"]["messages"]
    assert m3["text"]
    events = _events(logs)
    truncated = [e for e in events if e["type"] == "conversation.item.truncated"]
    assert [(e["item_id"], e["audio_end_ms"]) for e in truncated] == [(m2["id"], 100)]
    deleted = [e["item_id"] for e in events if e["type"] == "conversation.item.deleted"]
    assert deleted == ["lk_user_text"]
    created = [e for e in events if e["type"] == "response.created"]
    assert all(e["response"]["metadata"]["client_event_id"].startswith("response_create_") for e in created
               if e["response"]["metadata"])
    # server VAD: the plugin's default semantic_vad; the server detects the turn and answers on its own
    assert vad["errors"] == [] and vad["speech_started"] == 1
    gen = vad["generation"]
    assert gen["user_initiated"] is False
    (mv,) = gen["messages"]
    assert mv["audio_frames"] > 5 and mv["text"] and vad["transcripts"]


def test_pipecat_parses_every_event_the_server_sent(runs, client_python, tmp_path):
    """Pipecat's receive loop dies on the first server event its GA parser rejects and skips types it does not
    know: every event the server sent the two clients above must parse (and a beta-named event or a usage-less
    response.done must not: the check can fail)."""
    from agent.realtime.clients import run_driver

    logs = [p for _, paths in runs.values() for p in paths]
    report = tmp_path / "pipecat.json"
    done = run_driver(client_python, "pipecat_parse", ["--out", str(report), *map(str, logs)])
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["failures"] == []
    assert result["parsed"] == sum(len(p.read_text().splitlines()) for p in logs)
    for kind in ("session.created", "session.updated", "response.created", "response.output_audio.delta",
                 "response.done", "conversation.item.added", "input_audio_buffer.speech_started",
                 "conversation.item.truncated", "conversation.item.input_audio_transcription.completed",
                 "response.output_text.delta", "error"):
        assert result["types"].get(kind, 0) > 0, kind
    # the negative control
    bad = tmp_path / "bad.jsonl"
    done_event = next(json.loads(line) for p in logs for line in p.read_text().splitlines()
                      if json.loads(line)["type"] == "response.done")
    del done_event["response"]["usage"]
    bad.write_text(json.dumps({"type": "response.audio.delta", "event_id": "e1", "response_id": "r", "item_id": "i",
                               "output_index": 0, "content_index": 0, "delta": ""}) + "\n" + json.dumps(done_event) + "\n")
    report.unlink()
    done = run_driver(client_python, "pipecat_parse", ["--out", str(report), str(bad)])
    assert done.returncode == 0, done.stderr[-4000:]
    failures = json.loads(report.read_text())["failures"]
    assert [f["type"] for f in failures] == ["response.audio.delta", "response.done"]
