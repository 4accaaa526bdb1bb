"""`speechgpt-rt chat` end to end on the tiny bundle (fast clock), its input checks, and the metrics outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
QUESTION = ROOT / "streaming/assets/question.wav"
FOLLOW_UP = ROOT / "streaming/assets/follow_up.wav"


@pytest.fixture(scope="module")
def chat_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat")
    code = cli_main(["chat", str(QUESTION), str(FOLLOW_UP), "-o", str(out), "--model-dir", str(tiny_bundle), "--fast",
                     "--json", str(out / "run.json")])
    return code, out


def test_chat_writes_replies_conversation_and_metrics(chat_run, capsys):
    code, out = chat_run
    assert code == 0
    for name in ("reply_0.wav", "reply_1.wav", "conversation.wav", "metrics.jsonl", "run.json"):
        assert (out / name).is_file(), name
    conversation, rate = sf.read(out / "conversation.wav")
    assert rate == 16000 and conversation.ndim == 2 and conversation.shape[1] == 2
    user, agent = conversation[:, 0], conversation[:, 1]
    question, _ = sf.read(QUESTION)
    assert np.abs(user).max() > 0.1 and np.abs(agent).max() > 0
    # on one timeline: the agent speaks only once the user has finished the question
    first_agent = int(np.flatnonzero(np.abs(agent) > 0)[0])
    assert first_agent > len(question) // 2
    reply, _ = sf.read(out / "reply_0.wav")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["turn"] for m in lines] == [0, 1]
    assert lines[0]["reply_s"] == pytest.approx(len(reply) / 16000)
    doc = json.loads((out / "run.json").read_text())
    assert doc["errors"] == 0 and len(doc["turns"]) == 2
    assert doc["summary"]["end_to_end"]["p50"] > 0


def test_chat_input_mistakes_get_one_line_before_models_load(tmp_path, tiny_bundle):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    cases = [
        ([str(tmp_path / "missing.wav")], "missing.wav"),
        ([str(empty)], "empty.wav"),
        ([str(QUESTION), "--model-dir", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for args, needle in cases:
        res = subprocess.run([sys.executable, "-m", "agent.cli", "chat", *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr
        assert "model loaded" not in res.stdout


def test_prometheus_endpoint_serves_turn_metrics():
    import socket

    from agent.metrics import PrometheusExporter, TurnMetrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = PrometheusExporter(port)
    try:
        m = TurnMetrics(0, last_voiced=1.0, final_eot=1.5, first_frame_played=1.75, new_tokens=12, preemptive="kept")
        exporter.observe(m)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        exporter.close()
    assert 'speechgpt_turn_interval_seconds_count{interval="end_to_end"} 1.0' in body
    assert 'speechgpt_preemptive_total{result="kept"} 1.0' in body
    assert 'speechgpt_tokens_total{kind="generated"} 12.0' in body
