"""`speechgpt-rt bench-livekit`: conversations through a real LiveKit server, measured at the participant.

    speechgpt-rt bench-livekit [--rooms 1,2,4] [--turns 4] [--model-dir DIR] [--json OUT.json]

Needs root, iproute2 and Go (it builds the pinned livekit-server once, like the tests) and runs everything in a
private network namespace (agent/livekit/devserver.py). For each level N: one `speechgpt-rt room` process joins N
rooms (one model), and N participants, one per room, each hold `--turns` turns at the same time (the shipped
question and follow-up, alternately, in real time; the next turn starts `--gap` s after the reply played out).
Per turn:
    participant latency   end of the user's speech as the participant sent it (the voiced end of the file, when
                          that audio left the participant's source queue) -> the first agent audio frame with energy
                          the participant receives
    session intervals     from the agent's per-room metrics: end_to_end (VAD offset -> first frame captured into
                          the SDK), response, eot_wait, first_unit, vocoder
    transport share       participant latency - the session's end_to_end: network, the SDK's queues, jitter buffer
CPU per room: the agent process's CPU time during the conversations / wall time / N (1.0 = one core).
Sustained rooms: the largest N whose turns all played without an underrun (the agent's source queue never ran dry
inside a reply) and were all answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENERGY = 100.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from agent.chat import DEFAULT_MODEL_DIR

    parser.add_argument("--rooms", default="1,2,4", help="concurrency levels: rooms served at once by one process")
    parser.add_argument("--turns", type=int, default=4, help="turns per room and level")
    parser.add_argument("--gap", type=float, default=0.5, help="silence after each reply before the next turn (s)")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--queue-ms", type=int, default=100, help="the agent's AudioSource queue (ms)")
    parser.add_argument("--json", type=Path, default=None)


def _voiced_end(samples: np.ndarray, rate: int = 16000) -> float:
    n = rate // 50
    frames = samples[: len(samples) // n * n].reshape(-1, n)
    voiced = np.nonzero(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) > 0.01)[0]
    return float((voiced[-1] + 1) * n / rate) if voiced.size else 0.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _User:
    """A participant on the official SDK: speaks in real time, notes when agent audio with energy arrives."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.loud: list[float] = []
        self.state = ""
        self._tasks: list = []
        self._streams: list = []

    async def join(self) -> None:
        from livekit import rtc

        self.room = rtc.Room()
        self.room.on("track_subscribed", self._on_track)
        self.room.on("participant_attributes_changed", self._on_attrs)
        self.room.on("participant_connected", lambda p: self._on_attrs(dict(p.attributes), p))
        await asyncio.wait_for(self.room.connect(self.url, self.token), 20)
        for p in self.room.remote_participants.values():
            self._on_attrs(dict(p.attributes), p)
        self.source = rtc.AudioSource(48000, 1, queue_size_ms=50)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self.source)
        await self.room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))

    def _on_attrs(self, changed: dict, participant) -> None:
        if "lk.agent.state" in changed:
            self.state = changed["lk.agent.state"]

    def _on_track(self, track, publication, participant) -> None:
        from livekit import rtc

        if track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        stream = rtc.AudioStream(track, sample_rate=16000, num_channels=1)
        self._streams.append(stream)

        async def read() -> None:
            async for ev in stream:
                if np.abs(np.frombuffer(ev.frame.data, np.int16).astype(np.float32)).mean() > ENERGY:
                    self.loud.append(time.time())

        self._tasks.append(asyncio.ensure_future(read()))

    async def speak(self, samples16k: np.ndarray, voiced_end_s: float) -> float:
        """Returns time.time() when the voiced end of `samples16k` left the source queue."""
        import soxr
        from livekit import rtc

        pcm = (np.clip(soxr.resample(samples16k.astype(np.float32), 16000, 48000), -1, 1) * 32767).astype(np.int16)
        pcm = np.concatenate([pcm, np.zeros(-len(pcm) % 480, np.int16)])
        end_frame = int(voiced_end_s * 100)
        sent_end = 0.0
        for k, i in enumerate(range(0, len(pcm), 480)):
            await self.source.capture_frame(rtc.AudioFrame(pcm[i:i + 480].tobytes(), 48000, 1, 480))
            if k == end_frame - 1:
                sent_end = time.time() + self.source.queued_duration
        return sent_end

    async def silence_until(self, predicate, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        quiet = np.zeros(1600, np.float32)
        while not predicate():
            if time.monotonic() > deadline:
                return False
            await self.speak(quiet, 0.0)
        return True

    async def leave(self) -> None:
        for s in self._streams:
            try:
                await asyncio.wait_for(s.aclose(), 2)
            except Exception:  # noqa: BLE001
                pass
        await asyncio.wait_for(self.room.disconnect(), 10)
        for t in self._tasks:
            t.cancel()


async def _converse(user: _User, turns: list[np.ndarray], gap: float) -> list[dict]:
    await user.silence_until(lambda: user.state == "listening", 180)
    out = []
    for audio in turns:
        end = await user.speak(audio, _voiced_end(audio))
        answered = await user.silence_until(lambda: any(t > end for t in user.loud) and user.state == "listening", 40)
        first = next((t for t in user.loud if t > end), None)
        out.append({"speech_end_unix": end, "first_audio_unix": first, "answered": answered,
                    "latency_s": None if first is None else first - end})
        if gap > 0:
            await user.silence_until(lambda: False, gap)  # a pause before the next turn
    return out


def _level(ns, server, args, n: int, work: Path, log) -> dict:
    from livekit import api

    from agent.livekit.devserver import REPO
    from streaming.audio_io import load_audio

    rooms = [f"bench-{n}-{k}" for k in range(n)]
    metrics = work / f"metrics-{n}.jsonl"
    a = server.address
    env = dict(os.environ, LIVEKIT_URL=a.ws_url, LIVEKIT_API_KEY=a.api_key, LIVEKIT_API_SECRET=a.api_secret)
    exe = str(Path(sys.executable).with_name("speechgpt-rt"))
    cmd = ns.exec_prefix() + [exe, "room", *sum((["--room", r] for r in rooms), []), "--model-dir", str(args.model_dir),
                              "--torch-threads", str(args.torch_threads), "--metrics", str(metrics),
                              "--queue-ms", str(args.queue_ms)]
    out = open(work / f"agent-{n}.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    question = load_audio(REPO / "streaming/assets/question.wav").samples
    follow = load_audio(REPO / "streaming/assets/follow_up.wav").samples
    turns = [question if k % 2 == 0 else follow for k in range(args.turns)]

    def tok(room: str, identity: str) -> str:
        grant = api.VideoGrants(room_join=True, room=room)
        return api.AccessToken(a.api_key, a.api_secret).with_identity(identity).with_grants(grant).to_jwt()

    async def run_all():
        users = [_User(a.ws_url, tok(r, f"user-{k}")) for k, r in enumerate(rooms)]
        await asyncio.gather(*(u.join() for u in users))
        await asyncio.gather(*(u.silence_until(lambda u=u: u.state == "listening", 180) for u in users))
        cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        results = await asyncio.gather(*(_converse(u, turns, args.gap) for u in users))
        cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
        await asyncio.gather(*(u.leave() for u in users))
        return results, cpu

    try:
        results, cpu = asyncio.run(run_all())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()
    lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    per_turn = []
    for k, room in enumerate(rooms):
        agent_turns = [ln for ln in lines if ln["room"] == room]
        for j, measured in enumerate(results[k]):
            record = agent_turns[j] if j < len(agent_turns) else None
            iv = record["turn"]["intervals"] if record else {}
            per_turn.append(measured | {"room": room, "turn": j, "session": {x: iv.get(x) for x in (
                "eot_wait", "response", "end_to_end", "first_unit", "vocoder")},
                "underruns": record["transport"]["underruns"] if record else None,
                "interrupted": record["turn"]["interrupted"] if record else None})
    from agent.metrics import percentile

    lat = [t["latency_s"] for t in per_turn if t["latency_s"] is not None]
    e2e = [t["session"]["end_to_end"] for t in per_turn if t["session"]["end_to_end"] is not None]
    share = [t["latency_s"] - t["session"]["end_to_end"] for t in per_turn
             if t["latency_s"] is not None and t["session"]["end_to_end"] is not None]
    summary = {
        "rooms": n, "turns": len(per_turn), "answered": sum(bool(t["answered"]) for t in per_turn),
        "underruns": sum(t["underruns"] or 0 for t in per_turn),
        "missing_metrics": sum(t["underruns"] is None for t in per_turn),
        "participant_latency_p50": percentile(lat, 50), "participant_latency_p90": percentile(lat, 90),
        "session_end_to_end_p50": percentile(e2e, 50), "session_end_to_end_p90": percentile(e2e, 90),
        "session_response_p50": percentile([t["session"]["response"] for t in per_turn], 50),
        "session_eot_wait_p50": percentile([t["session"]["eot_wait"] for t in per_turn], 50),
        "transport_share_p50": percentile(share, 50), "transport_share_p90": percentile(share, 90),
        "agent_cpu_cores": cpu, "agent_cpu_per_room": cpu / n,
    }
    summary["sustained"] = (summary["answered"] == summary["turns"] and summary["underruns"] == 0
                            and summary["missing_metrics"] == 0)
    log(f"[bench-livekit] {n} room(s): participant P50 {summary['participant_latency_p50'] * 1e3:.0f} ms, "
        f"session end_to_end P50 {summary['session_end_to_end_p50'] * 1e3:.0f} ms, CPU/room {cpu / n:.2f} core, "
        f"underruns {summary['underruns']}, answered {summary['answered']}/{summary['turns']}")
    return {"summary": summary, "turns": per_turn}


def _table(levels: list[dict]) -> str:
    head = ("rooms", "turns", "participant P50/P90 ms", "session end_to_end P50/P90 ms", "transport share P50/P90 ms",
            "session response P50 ms", "eot_wait P50 ms", "agent CPU/room (cores)", "underruns", "answered")
    rows = []
    for lv in levels:
        s = lv["summary"]
        ms = lambda v: "-" if v is None or v != v else f"{v * 1e3:.0f}"  # noqa: E731
        rows.append((str(s["rooms"]), str(s["turns"]),
                     f"{ms(s['participant_latency_p50'])} / {ms(s['participant_latency_p90'])}",
                     f"{ms(s['session_end_to_end_p50'])} / {ms(s['session_end_to_end_p90'])}",
                     f"{ms(s['transport_share_p50'])} / {ms(s['transport_share_p90'])}",
                     ms(s["session_response_p50"]), ms(s["session_eot_wait_p50"]), f"{s['agent_cpu_per_room']:.2f}",
                     str(s["underruns"]), f"{s['answered']}/{s['turns']}"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run(args) -> int:
    from agent.livekit.devserver import DevServer, DevServerError, NetNamespace, ensure_server_binary

    try:
        levels = sorted({int(x) for x in str(args.rooms).split(",") if x.strip()})
    except ValueError:
        print(f"speechgpt-rt bench-livekit: --rooms must be comma-separated integers, got {args.rooms!r}",
              file=sys.stderr)
        return 2
    if not levels or levels[0] < 1 or args.turns < 1:
        print("speechgpt-rt bench-livekit: --rooms values and --turns must be >= 1", file=sys.stderr)
        return 2
    from livekit.rtc._ffi_client import FfiClient

    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        binary = ensure_server_binary(log=log)
        ns = NetNamespace().create()
    except DevServerError as exc:
        print(f"speechgpt-rt bench-livekit: {exc}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-livekit-"))
    results = []
    server = None
    try:
        ns.enter()  # this thread and the SDK's threads (started next) talk from inside the namespace
        FfiClient.instance  # noqa: B018
        server = DevServer(ns, binary, port=7880, workdir=work).start()
        for n in levels:
            results.append(_level(ns, server, args, n, work, log))
    except DevServerError as exc:
        print(f"speechgpt-rt bench-livekit: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        ns.exit()
        ns.delete()
    sustained = [lv["summary"]["rooms"] for lv in results if lv["summary"]["sustained"]]
    table = _table(results)
    print("\n" + table)
    best = max((n for n in sustained if all(m in sustained for m in levels if m <= n)), default=0)
    print(f"\nrooms one process sustains without underruns (of the levels tried): {best}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"levels": results, "sustained_rooms": best, "table": table,
                                         "config": {k: str(v) for k, v in vars(args).items()}}, indent=2))
        print(f"[bench-livekit] wrote {args.json}")
    return 0
