"""Fixtures for the LiveKit tests: a real livekit-server in a private network namespace, agent processes in it, and
test participants written with the official SDK (independent of the agent code under test).

- `netns` (session scope): builds the pinned server when missing (`go install`, cached under .cache/go), creates
  the namespace with its veth pair, starts the livekit FFI with its threads inside the namespace, and always
  deletes the namespace at the end. The calling (main) thread is moved in for the LiveKit modules only
  (`inside_netns`, module scope) and back out after them.
- `start_server(ns, port)`: one server per test module.
- `AgentProcess`: `speechgpt-rt room|worker ...` inside the namespace, output captured, stopped by signal.
- `Participant`: joins a room, speaks a 16 kHz array in real time through a 48 kHz microphone track, and records
  what it receives (the agent's audio frames with arrival times and energy, attribute changes, caption streams).

Under CI=true a namespace or server that cannot be made fails the tests; elsewhere they are skipped with the reason.
Times compared across processes use time.time() (one machine, one clock); local intervals use time.monotonic().
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CI = os.environ.get("CI", "").lower() == "true"
sys.path.insert(0, str(REPO))

from agent.livekit.devserver import DevServer, DevServerError, NetNamespace, ensure_server_binary  # noqa: E402

ENERGY_THRESHOLD = 100.0  # mean |int16| of a 10 ms frame: the agent's voice is far above, WebRTC silence is 0


def unavailable(reason: str):
    """CI must not skip: the namespace and the server are part of the test environment there."""
    if CI:
        pytest.fail(f"LiveKit test environment: {reason}", pytrace=False)
    pytest.skip(f"LiveKit test environment: {reason}")


# Each test module imports the fixture, so pytest makes one session-scoped instance per module: they share this one
# namespace (the SDK's threads can live in only one), the last to finish deletes it.
_SHARED: dict = {"ns": None, "users": 0}


@pytest.fixture(scope="session")
def netns():
    from livekit.rtc._ffi_client import FfiClient

    if _SHARED["ns"] is None:
        if FfiClient._instance is not None:  # noqa: SLF001
            unavailable("livekit's FFI was started outside the test namespace by an earlier test; its network "
                        "threads would talk from the host namespace (run the LiveKit tests in a pytest process of "
                        "their own)")
        try:
            binary = ensure_server_binary(log=lambda m: print(m, file=sys.stderr, flush=True))
        except DevServerError as exc:
            unavailable(str(exc))
        ns = NetNamespace()
        try:
            ns.create()
        except DevServerError as exc:
            unavailable(str(exc))
        try:
            ns.enter()
            try:
                FfiClient.instance  # noqa: B018 - the SDK's runtime threads start here, inside the namespace
            finally:
                ns.exit()
        except BaseException:
            ns.delete()
            raise
        ns.binary = binary
        _SHARED["ns"] = ns
    _SHARED["users"] += 1
    try:
        yield _SHARED["ns"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["ns"].exit()
            _SHARED["ns"].delete()
            _SHARED["ns"] = None


@pytest.fixture(scope="module")
def inside_netns(netns):
    """The test thread talks from inside the namespace (its sockets, and the processes it starts)."""
    netns.enter()
    try:
        yield netns
    finally:
        netns.exit()


def start_server(ns: NetNamespace, port: int, workdir: Path) -> DevServer:
    server = DevServer(ns, ns.binary, port=port, workdir=workdir)
    try:
        return server.start()
    except DevServerError as exc:
        server.stop()
        unavailable(str(exc))


def token(server: DevServer, identity: str, room: str, **grants) -> str:
    from livekit import api

    a = server.address
    video = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True, **grants)
    return api.AccessToken(a.api_key, a.api_secret).with_identity(identity).with_grants(video).to_jwt()


def server_env(server: DevServer, **overrides) -> dict[str, str]:
    a = server.address
    env = dict(os.environ, LIVEKIT_URL=a.ws_url, LIVEKIT_API_KEY=a.api_key, LIVEKIT_API_SECRET=a.api_secret,
               PYTHONUNBUFFERED="1")
    env.update(overrides)
    return env


# ---- agent processes ------------------------------------------------------------------------------------------
class AgentProcess:
    """`speechgpt-rt ARGS` inside the namespace; stdout and stderr go to files under `workdir`."""

    def __init__(self, ns: NetNamespace, args: list[str], env: dict[str, str], workdir: Path, name: str):
        self.ns = ns
        self.args = args
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self.name = name
        exe = str(REPO / ".venv" / "bin" / "speechgpt-rt")
        if not Path(exe).exists():
            exe = str(Path(sys.executable).with_name("speechgpt-rt"))
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(ns.exec_prefix() + [exe, *args], env=env, cwd=REPO, stdout=out, stderr=err)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        return (f"{self.name} (exit {self.proc.poll()}):\n--- stdout\n{self.stdout()[-3000:]}\n"
                f"--- stderr\n{self.stderr()[-4000:]}")

    def wait_for_output(self, text: str, timeout_s: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stdout().count(text) >= count:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{text!r} (x{count}) not printed within {timeout_s:.0f} s by {self.describe()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def metrics_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate, timeout_s: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ---- test participants --------------------------------------------------------------------------------------
@dataclass
class Caption:
    sender: str
    attributes: dict[str, str]
    opened: float  # time.time() when the stream's header arrived
    closed: float | None = None
    text: str = ""

    @property
    def segment(self) -> str:
        return self.attributes.get("lk.segment_id", "")

    @property
    def final(self) -> bool:
        return self.attributes.get("lk.transcription_final") == "true"


@dataclass
class Received:
    at: float  # time.time() of arrival
    energy: float  # mean |int16|


@dataclass
class Participant:
    """One user in a room, on the official SDK (see the module doc). Use inside a running event loop."""

    url: str
    token: str
    identity: str
    room: object = None
    source: object = None
    track: object = None
    publication: object = None
    frames: list[Received] = field(default_factory=list)
    states: list[tuple[float, str, str]] = field(default_factory=list)  # (time, agent identity, state)
    captions: list[Caption] = field(default_factory=list)
    left: list[tuple[float, str]] = field(default_factory=list)
    muted: bool = False
    _tasks: list = field(default_factory=list)
    _streams: list = field(default_factory=list)

    async def join(self, timeout_s: float = 20.0) -> "Participant":
        from livekit import rtc

        self.room = room = rtc.Room()
        room.register_text_stream_handler("lk.transcription", self._on_caption)
        room.on("participant_attributes_changed", self._on_attributes)
        room.on("track_subscribed", self._on_track)
        room.on("participant_disconnected", lambda p: self.left.append((time.time(), p.identity)))
        room.on("participant_connected", lambda p: self._on_attributes(dict(p.attributes), p))
        await asyncio.wait_for(room.connect(self.url, self.token), timeout_s)
        for p in room.remote_participants.values():  # attributes already set before we came
            if "lk.agent.state" in p.attributes:
                self.states.append((time.time(), p.identity, p.attributes["lk.agent.state"]))
        self.source = rtc.AudioSource(48000, 1, queue_size_ms=50)
        self.track = rtc.LocalAudioTrack.create_audio_track("microphone", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        self.publication = await asyncio.wait_for(room.local_participant.publish_track(self.track, options), timeout_s)
        return self

    def _on_attributes(self, changed: dict, participant) -> None:
        if "lk.agent.state" in changed:
            self.states.append((time.time(), participant.identity, changed["lk.agent.state"]))

    def _on_caption(self, reader, sender: str) -> None:
        caption = Caption(sender, dict(reader.info.attributes or {}), time.time())
        self.captions.append(caption)

        async def read() -> None:
            async for chunk in reader:
                caption.text += chunk
            caption.closed = time.time()

        self._tasks.append(asyncio.ensure_future(read()))

    def _on_track(self, track, publication, participant) -> None:
        from livekit import rtc

        if track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        stream = rtc.AudioStream(track, sample_rate=16000, num_channels=1)
        self._streams.append(stream)

        async def read() -> None:
            async for event in stream:
                x = np.frombuffer(event.frame.data, np.int16)
                self.frames.append(Received(time.time(), float(np.abs(x.astype(np.float32)).mean())))

        self._tasks.append(asyncio.ensure_future(read()))

    # ---- speaking ---------------------------------------------------------------------------------------------
    async def speak(self, samples16k: np.ndarray) -> tuple[float, float]:
        """Send mono 16 kHz float32 audio in real time; returns time.time() when it started and when its last
        sample left the source queue."""
        import soxr
        from livekit import rtc

        audio = soxr.resample(np.asarray(samples16k, np.float32), 16000, 48000)
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        pcm = np.concatenate([pcm, np.zeros(-len(pcm) % 480, np.int16)])
        start = time.time()
        for i in range(0, len(pcm), 480):
            if self.muted:
                await asyncio.sleep(0.01)
                continue
            await self.source.capture_frame(rtc.AudioFrame(pcm[i:i + 480].tobytes(), 48000, 1, 480))
        return start, time.time() + self.source.queued_duration

    async def silence(self, seconds: float) -> None:
        await self.speak(np.zeros(int(seconds * 16000), np.float32))

    async def silence_until(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.identity}: timed out after {timeout_s:.0f} s waiting for {what}; states "
                                     f"{[s for _, _, s in self.states]}, captions {[(c.segment, c.text) for c in self.captions]}")
            await self.silence(0.1)

    def mute(self) -> None:
        self.muted = True
        self.track.mute()

    def unmute(self) -> None:
        self.muted = False
        self.track.unmute()

    # ---- what was received -----------------------------------------------------------------------------------
    def state_sequence(self, since: float = 0.0) -> list[str]:
        out: list[str] = []
        for t, _who, state in self.states:
            if t >= since and (not out or out[-1] != state):
                out.append(state)
        return out

    def loud(self, since: float = 0.0, until: float = float("inf")) -> list[Received]:
        return [f for f in self.frames if since <= f.at < until and f.energy > ENERGY_THRESHOLD]

    def agent(self):
        from livekit import rtc

        for p in self.room.remote_participants.values():
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
                return p
        return None

    def user_track_sid(self) -> str:
        return self.publication.sid

    def agent_track_sids(self) -> set[str]:
        agent = self.agent()
        return set(agent.track_publications) if agent is not None else set()

    def captions_of(self, track_sid: str, final: bool | None = None) -> list[Caption]:
        """Caption streams naming `track_sid` as the transcribed track (finished ones only)."""
        return [c for c in self.captions if c.attributes.get("lk.transcribed_track_id") == track_sid
                and c.closed is not None and (final is None or c.final == final)]

    async def leave(self) -> None:
        for stream in self._streams:
            try:
                await asyncio.wait_for(stream.aclose(), 2)
            except Exception:  # noqa: BLE001 - the track may be gone already
                pass
        if self.room is not None:
            await asyncio.wait_for(self.room.disconnect(), 10)
        for task in self._tasks:
            task.cancel()
        await asyncio.sleep(0)


def voiced_end(samples: np.ndarray, rate: int = 16000) -> float:
    """Seconds into `samples` where the last 20 ms frame louder than -40 dBFS ends (the end of the speech)."""
    n = rate // 50
    frames = samples[: len(samples) // n * n].reshape(-1, n)
    rms = np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1))
    voiced = np.nonzero(rms > 10 ** (-40 / 20))[0]
    return float((voiced[-1] + 1) * n / rate) if voiced.size else 0.0
