"""`speechgpt-rt bench-realtime`: commit -> first audio, through the Realtime server vs in-process, side by side.

The same spoken question (the shipped `question.wav` by default) is asked `--turns` times in a row in manual turns:
- in-process: a Session over a push input and the Realtime output (no socket): from `commit_audio()` to the first
  reply frame handed to the output;
- through the server: the OpenAI SDK's GA client in the client environment (agent/realtime/clients.py), against
  a server in this process on 127.0.0.1: from sending `input_audio_buffer.commit` (then `response.create`) to the
  first `response.output_audio.delta` received; once with one connection and once per `--connections` count, all
  connections asking at once.
In-process and one-connection runs alternate (`--rounds`), so a busy machine weighs on both alike; the first turn
of every session is a warm-up and not counted. Prints P50/P90 per row and the protocol's share (server minus in-process, at P50); writes everything to --json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_INPUT = ROOT / "streaming/assets/question.wav"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/tiny-bundle"))
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="the spoken question (any audio file)")
    parser.add_argument("--turns", type=int, default=10, help="questions measured per session / connection (one more "
                        "is asked first, to warm up, and not counted)")
    parser.add_argument("--rounds", type=int, default=3, help="in-process and one-connection runs, alternating")
    parser.add_argument("--connections", type=int, nargs="*", default=[2, 4], help="concurrent connection counts")
    parser.add_argument("--json", type=Path, required=True)


def _fail(message: str) -> int:
    print(f"speechgpt-rt bench-realtime: {message}", file=sys.stderr)
    return 2


def run(args) -> int:
    from streaming.audio_io import AudioInputError, load_audio

    if args.turns < 1 or args.rounds < 1 or any(c < 1 for c in args.connections):
        return _fail("--turns, --rounds and --connections must be >= 1")
    try:
        question = load_audio(args.input).samples
    except (AudioInputError, OSError) as exc:
        return _fail(str(exc))
    from agent.realtime.clients import ClientEnvError, ensure_client_env

    try:
        python = ensure_client_env(log=lambda m: print(f"[bench-realtime] {m}"))
    except ClientEnvError as exc:
        return _fail(f"the client environment could not be built: {exc}")
    from agent.model import SpeechGPTModel
    from agent.realtime.clients import run_driver
    from agent.realtime.server import ServerThread

    model = SpeechGPTModel.load(args.model_dir)
    result = {"machine": platform.processor() or platform.machine(), "input": str(args.input), "turns": args.turns,
              "rounds": args.rounds, "question_s": round(question.shape[0] / 16000, 2), "load_average_before":
              os.getloadavg(), "rows": {"in_process": {"connections": 1, "latencies_s": []},
                                        "server_1": {"connections": 1, "latencies_s": []}}}
    server = ServerThread(model)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            speech = Path(tmp) / "question_24k.pcm"
            speech.write_bytes(_pcm24(question))

            def through_server(n: int) -> list[list[float]]:
                out = Path(tmp) / f"bench_{n}.json"
                done = run_driver(python, "openai_sdk", ["--url", server.url, "--audio", str(speech), "--out", str(out),
                                                         "--mode", "bench", "--turns", str(args.turns + 1),
                                                         "--connections", str(n)], timeout_s=3600)
                if done.returncode != 0:
                    raise RuntimeError(f"the SDK client failed with {n} connection(s):\n{done.stderr[-3000:]}")
                return [conn[1:] for conn in json.loads(out.read_text())["latencies_s"]]  # the first turn warms up

            # in-process and one connection alternate round by round, so both see the same machine
            for _ in range(args.rounds):
                result["rows"]["in_process"]["latencies_s"].append(asyncio.run(_in_process(model, question, args.turns + 1))[1:])
                result["rows"]["server_1"]["latencies_s"] += through_server(1)
            for n in args.connections:
                result["rows"][f"server_{n}"] = {"connections": n, "latencies_s": through_server(n)}
    except RuntimeError as exc:
        return _fail(str(exc))
    finally:
        server.close()
    result["load_average_after"] = os.getloadavg()
    for row in result["rows"].values():
        flat = [x for conn in row["latencies_s"] for x in conn]
        row["count"] = len(flat)
        row["p50_ms"], row["p90_ms"] = (float(np.percentile(flat, q) * 1e3) for q in (50, 90))
    base, one = result["rows"]["in_process"], result["rows"]["server_1"]
    result["protocol_share_p50_ms"] = one["p50_ms"] - base["p50_ms"]
    print(render(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


def _pcm24(samples16k: np.ndarray) -> bytes:
    from streaming.frames import AudioFrame, Resampler

    r = Resampler(24000, in_rate=16000)
    frames = r.push(AudioFrame(samples16k.astype(np.float32), 16000, 1, 0.0)) + r.flush()
    return np.concatenate([f.to_int16().samples for f in frames]).astype("<i2").tobytes()


async def _in_process(model, question: np.ndarray, turns: int) -> list[float]:
    """The same manual turns on a Session with the Realtime output and no socket: commit -> first frame handed."""
    from agent.clock import SessionClock
    from agent.events import ResponseDone
    from agent.realtime.transport import PushInput, RealtimeOutput
    from streaming.frames import AudioFrame

    clock = SessionClock()
    first: list[float] = []
    state = {"t": None}

    def on_frame(_frame) -> None:
        if state["t"] is not None:
            first.append(time.perf_counter() - state["t"])
            state["t"] = None

    push = PushInput()
    session = model.session(push, RealtimeOutput(clock, on_frame, lambda: None, lambda: None), clock=clock)
    session.set_turn_detection(None)
    session.events.keep_history = False
    runner = asyncio.get_running_loop().create_task(session.run())
    position = 0.0
    for _ in range(turns):
        for i in range(0, question.shape[0], 2400):  # 100 ms appends, like the SDK client's
            piece = question[i : i + 2400]
            push.push(AudioFrame(piece.astype(np.float32), 16000, 1, position))
            position += piece.shape[0] / 16000
        await push.drained()
        done = asyncio.Event()
        state["t"] = time.perf_counter()
        session.commit_audio()
        response = session.create_response()
        session.events.on(lambda e, r=response, d=done: d.set() if isinstance(e, ResponseDone) and e.response is r else None)
        await done.wait()
    push.close()
    await runner
    return first


def render(result: dict) -> str:
    lines = [f"commit -> first audio, {result['turns']} turns of a {result['question_s']} s question per session "
             f"(after one warm-up turn), {result['rounds']} alternating rounds; load average "
             f"{result['load_average_before'][0]:.1f} -> {result['load_average_after'][0]:.1f}",
             f"{'row':14s} {'connections':>11s} {'turns':>6s} {'p50 ms':>9s} {'p90 ms':>9s}"]
    for name, row in result["rows"].items():
        lines.append(f"{name:14s} {row['connections']:11d} {row['count']:6d} {row['p50_ms']:9.1f} {row['p90_ms']:9.1f}")
    lines.append(f"protocol share at P50 (server_1 - in_process): {result['protocol_share_p50_ms']:.1f} ms")
    return "\n".join(lines)
