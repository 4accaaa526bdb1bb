"""`speechgpt-rt bench-telephony`: phone calls against a fake Twilio on 127.0.0.1, in real time.

For each number of concurrent calls in `--calls`, that many fake provider clients dial the server at once (the
worst case: every turn lines up), each speaking `--turns` questions (the shipped speech, G.711 at 8 kHz in real-time
20 ms frames) and listening like a provider: it plays the bot's audio at real time, echoes marks when their audio
has played, counts an underrun when a reply's audio runs dry before its end mark. Measured per reply, at the
fake provider: the caller's end of speech -> the first bot audio received (P50/P90), underruns, and the least audio
still queued when a chunk arrived (headroom); from the server: each reply's needed prebuffer (the least that would
have played it without an underrun, from when the session handed its frames). "Sustained" is the largest N of the sweep, counting
up from the first, at which every reply was answered with no underrun.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_MODEL_DIR = Path(".cache/tiny-bundle")
FRAME_S = 0.02


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="default: the tiny bundle (made if missing)")
    parser.add_argument("--calls", default="1,2,3,4,6", help="comma-separated numbers of concurrent calls to sweep")
    parser.add_argument("--turns", type=int, default=2, help="questions per call")
    parser.add_argument("--lead-ms", type=float, default=200.0)
    parser.add_argument("--prebuffer-ms", type=float, default=200.0)
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="the calls' model is a running `speechgpt-rt serve` at ws://HOST:PORT (as telephony --server)")


@dataclass
class Reply:
    speech_end: float
    first_audio: float | None = None
    audio_s: float = 0.0
    play_end: float = 0.0
    underruns: int = 0
    slack: list[float] = field(default_factory=list)
    ended: bool = False
    done: float | None = None


class FakeTwilio:
    """Just enough of Twilio's side of a media stream (docs/telephony.md) to measure a call."""

    def __init__(self, http, url: str, index: int):
        self.http, self.url, self.index = http, url, index
        self.replies: list[Reply] = []
        self.sid = f"MZbench{index}"
        self.seq = 0
        self.chunk = 0
        self._next: float | None = None
        self.ws = None

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(self.url)
        self._reader = asyncio.get_running_loop().create_task(self._receive())
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send({"event": "start", "streamSid": self.sid, "start": {
            "streamSid": self.sid, "callSid": f"CAbench{self.index}", "accountSid": "ACbench", "tracks": ["inbound"],
            "customParameters": {"bench": "1"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})

    async def _send(self, obj: dict) -> None:
        self.seq += 1
        obj["sequenceNumber"] = str(self.seq)
        await self.ws.send_str(json.dumps(obj))

    async def play(self, mulaw: bytes) -> list[float]:
        sent = []
        for i in range(0, len(mulaw), 160):
            now = time.perf_counter()
            if self._next is None or now - self._next > 0.1:
                self._next = now
            self._next += FRAME_S
            await asyncio.sleep(max(0.0, self._next - time.perf_counter()))
            self.chunk += 1
            await self._send({"event": "media", "streamSid": self.sid, "media": {
                "track": "inbound", "chunk": str(self.chunk), "timestamp": str(self.chunk * 20), "payload": base64.b64encode(mulaw[i:i + 160]).decode()}})
            sent.append(time.perf_counter())
        return sent

    async def silence(self, seconds: float) -> None:
        await self.play(b"\xff" * (round(seconds / FRAME_S) * 160))

    async def turn(self, mulaw: bytes, speech_end_s: float, max_wait_s: float = 30.0) -> Reply:
        sent = await self.play(mulaw)
        k = min(len(sent) - 1, int(speech_end_s / FRAME_S))
        reply = Reply(speech_end=sent[k] - ((k + 1) * FRAME_S - speech_end_s))
        self.replies.append(reply)
        deadline = time.perf_counter() + max_wait_s
        while reply.done is None and time.perf_counter() < deadline:
            await self.silence(FRAME_S)
        return reply

    async def hang_up(self) -> None:
        await self._send({"event": "stop", "streamSid": self.sid, "stop": {"callSid": f"CAbench{self.index}"}})
        await self.ws.close()
        await self._reader

    async def _receive(self) -> None:
        import aiohttp

        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            obj = json.loads(msg.data)
            now = time.perf_counter()
            reply = self.replies[-1] if self.replies else None
            if reply is None:
                continue
            if obj.get("event") == "media":
                duration = len(base64.b64decode(obj["media"]["payload"])) / 8000
                if reply.first_audio is None:
                    reply.first_audio, reply.play_end = now, now
                elif reply.play_end < now:
                    reply.underruns += 1
                else:
                    reply.slack.append((now, reply.play_end - now))
                reply.play_end = max(reply.play_end, now) + duration
                reply.audio_s += duration
            elif obj.get("event") == "mark":
                name = obj["mark"]["name"]
                delay = max(0.0, reply.play_end - now)
                asyncio.get_running_loop().call_later(delay, self._echo, name, reply)
                if name.endswith(":end"):
                    reply.ended = True
            elif obj.get("event") == "clear":
                reply.play_end = now

    def _echo(self, name: str, reply: Reply) -> None:
        if self.ws.closed:
            return
        if name.endswith(":end"):
            reply.done = time.perf_counter()
        asyncio.get_running_loop().create_task(self._send({"event": "mark", "streamSid": self.sid,
                                                           "mark": {"name": name}}))


def _clips():
    import soxr

    from streaming.audio_io import load_audio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    root = Path(__file__).resolve().parents[2] / "streaming" / "assets"
    clips = []
    for name in ("question.wav", "follow_up.wav"):
        samples = load_audio(root / name).samples
        voiced = np.nonzero(np.abs(samples) > 0.01)[0]
        pcm8 = soxr.resample(samples, 16000, 8000)
        pcm = np.clip(np.rint(pcm8 * 32768), -32768, 32767).astype(np.int16).tobytes()
        clips.append((audioop.lin2ulaw(pcm, 2), (voiced[-1] + 1) / 16000))
    return clips


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _level(server_url: str, server, n: int, turns: int, clips) -> dict:
    import aiohttp

    calls_before = len(server.finished)
    served: list = []
    server.on_call.append(served.append)
    async with aiohttp.ClientSession() as http:
        phones = [FakeTwilio(http, server_url.replace("http://", "ws://") + "/twilio", i) for i in range(n)]

        async def call(phone: FakeTwilio) -> None:
            await phone.connect()
            await phone.silence(0.3)
            for t in range(turns):
                mulaw, end = clips[t % len(clips)]
                await phone.turn(mulaw, end)
                await phone.silence(0.3)
            await phone.hang_up()

        await asyncio.gather(*[call(p) for p in phones])
    while server.calls:
        await asyncio.sleep(0.05)
    server.on_call.remove(served.append)
    turns = [m.intervals() for call in served for m in call.session.turns if not m.errors]
    stages = {name: _ms(_percentile([t[name] for t in turns if t.get(name) is not None], 50))
              for name in ("eot_wait", "eot_work", "first_unit", "vocoder", "handoff", "playout", "end_to_end")}
    replies = [r for p in phones for r in p.replies]
    latencies = [r.first_audio - r.speech_end for r in replies if r.first_audio is not None]
    answered = sum(1 for r in replies if r.done is not None)
    underruns = sum(r.underruns for r in replies)
    slack = [s for r in replies for t, s in r.slack if r.first_audio is not None and t >= r.first_audio + 0.2]
    summaries = list(server.finished)[calls_before:]
    session_underruns = sum(s.output.get("underruns", 0) for s in summaries)
    needed = [d for s in summaries for d in s.prebuffer_needed]
    return {"calls": n, "replies": len(replies), "answered": answered, "underruns": underruns,
            "session_underruns": session_underruns,
            "latency_p50_ms": _ms(_percentile(latencies, 50)), "latency_p90_ms": _ms(_percentile(latencies, 90)),
            "latency_max_ms": _ms(max(latencies) if latencies else None),
            "min_slack_ms": _ms(min(slack) if slack else None),
            "prebuffer_needed_max_ms": _ms(max(needed, default=None)),
            "prebuffer_needed_p90_ms": _ms(_percentile(needed, 90)),
            "session_p50_ms": stages,  # the server's own view of each turn (agent/metrics.py intervals)
            "latencies_ms": [round(x * 1e3, 1) for x in latencies]}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 1)


def run(args) -> int:
    from agent.bundle import BundleError, resolve_bundle

    try:
        levels = sorted({int(x) for x in args.calls.split(",") if x.strip()})
        if not levels or levels[0] < 1:
            raise ValueError
    except ValueError:
        print(f"speechgpt-rt bench-telephony: --calls: expected positive ints like 1,2,4, got {args.calls!r}", file=sys.stderr)
        return 2
    if args.server is None and (args.model_dir != DEFAULT_MODEL_DIR or args.model_dir.exists()):
        try:
            resolve_bundle(args.model_dir)
        except (BundleError, OSError) as exc:
            print(f"speechgpt-rt bench-telephony: {exc}", file=sys.stderr)
            return 2
    return asyncio.run(_bench(args, levels))


async def _bench(args, levels: list[int]) -> int:
    import os
    import platform

    import torch

    from agent.model import SpeechGPTModel
    from agent.telephony.output import PlayoutConfig
    from agent.telephony.server import ServerConfig, TelephonyServer
    from agent.tiny import make_tiny_bundle

    torch.set_num_threads(1)
    if args.server is not None:  # the sessions' turns then hold what the client measures (agent/realtime/remote.py)
        from agent.realtime.remote import RemoteError, RemoteModel, probe

        model = RemoteModel(args.server)
        try:
            await probe(model.url, model.api_key)
        except RemoteError as exc:
            print(f"speechgpt-rt bench-telephony: {exc}", file=sys.stderr)
            return 1
    else:
        if not args.model_dir.exists():
            make_tiny_bundle(args.model_dir, seed=0)
        model = SpeechGPTModel.load(args.model_dir)
    playout = PlayoutConfig(lead_s=args.lead_ms / 1000, prebuffer_s=args.prebuffer_ms / 1000)
    server = TelephonyServer(model, ServerConfig(playout=playout, max_calls=max(levels)))
    url = await server.start("127.0.0.1", 0)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    clips = _clips()
    results = []
    try:
        for n in levels:
            result = await _level(url, server, n, args.turns, clips)
            results.append(result)
            print(f"[bench-telephony] {n} call(s): first audio after end of speech p50 {result['latency_p50_ms']} ms, "
                  f"p90 {result['latency_p90_ms']} ms; answered {result['answered']}/{result['replies']}; underruns "
                  f"{result['underruns']} (server's count {result['session_underruns']}); min slack "
                  f"{result['min_slack_ms']} ms; prebuffer needed p90/max {result['prebuffer_needed_p90_ms']}/{result['prebuffer_needed_max_ms']} ms",
                  flush=True)
            print(f"[bench-telephony]   server-side P50 (ms): {result['session_p50_ms']}", flush=True)
    finally:
        await server.stop()
    sustained = 0
    for result in results:
        if result["answered"] == result["replies"] and result["underruns"] == 0 and result["session_underruns"] == 0:
            sustained = result["calls"]
        else:
            break
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n[bench-telephony] sustained without underruns: {sustained} concurrent call(s) "
          f"(lead {args.lead_ms:.0f} ms, prebuffer {args.prebuffer_ms:.0f} ms; {os.cpu_count()} CPUs"
          + (f"; 1-min load average {load_before[0]:.1f} before the sweep, {load[0]:.1f} after)" if load else ")"))
    print("\n| calls | P50 ms | P90 ms | max ms | answered | underruns | min slack ms | prebuffer needed p90 / max ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['calls']} | {r['latency_p50_ms']} | {r['latency_p90_ms']} | {r['latency_max_ms']} | "
              f"{r['answered']}/{r['replies']} | {r['underruns']} | {r['min_slack_ms']} | {r['prebuffer_needed_p90_ms']} / {r['prebuffer_needed_max_ms']} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_before": load_before,
                        "loadavg_after": load},
            "config": {"model_dir": str(args.model_dir), "server": args.server, "turns": args.turns, "lead_ms": args.lead_ms,
                       "prebuffer_ms": args.prebuffer_ms, "calls": levels},
            "levels": results, "sustained_calls": sustained}, indent=2))
    return 0

