"""The model behind a running `speechgpt-rt serve`: `RemoteModel`, what `room`, `worker` and `telephony` use with
`--server ws://HOST:PORT` instead of loading SpeechGPT in-process (CPU workers, one GPU model server).

`RemoteModel` has the surface the transports touch on `SpeechGPTModel` (`session(input, output, config, clock, name,
attributes)`, `report`); each session is a `RemoteSession` (agent/realtime/remote_session.py): one Realtime
WebSocket per conversation, in server_vad mode, as LiveKit Agents' OpenAI plugin drives a Realtime server.

`probe()` checks, before a command does anything else, that the URL answers at its Realtime path with
`session.created` (and that the key is accepted), so a `--server` pointing at a dead port or at something that is not
our server fails in seconds with one line (README.md, Realtime server: Remote model).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from agent.realtime.audio import PROTOCOL_PCM_RATE
from streaming.frames import AudioFrame, BadFrameError, Resampler

PLACEHOLDER_KEY = "speechgpt-rt"  # a server without --api-key-env takes any non-empty key
CONNECT_TIMEOUT_S = 5.0
REALTIME_PATH = "/v1/realtime"
ERROR_REFUSED_KEY = "invalid_api_key"
ERROR_FULL = "session_limit_reached"


class RemoteError(RuntimeError):
    """The model server cannot be used; str() is one line saying why."""


def realtime_url(url: str) -> str:
    """ws(s)://HOST:PORT[/v1[/realtime]] (http(s) taken as ws(s)) -> the Realtime WebSocket URL; ValueError
    naming the problem otherwise."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"--server: expected ws://HOST:PORT (a running speechgpt-rt serve), got {url!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ValueError(f"--server: bad port in {url!r}") from None
    path = parts.path.rstrip("/")
    if not path.endswith("/realtime"):
        path = (path if path.endswith("/v1") else path + "/v1") + "/realtime"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@dataclass(frozen=True)
class RemoteReport:
    """What `SpeechGPTModel.report` says, for a model behind a server (the transports print it)."""

    load_s: float  # the probe: connecting and getting session.created
    server: str
    device: str = "remote"
    step_variant: str = "remote"
    vocoder_backend: str = "remote"


async def open_socket(http, url: str, api_key: str, timeout_s: float):
    """A connected WebSocket that has received `session.created`: (ws, that event). RemoteError (one line)."""
    import aiohttp

    try:
        ws = await asyncio.wait_for(http.ws_connect(url, headers={"Authorization": f"Bearer {api_key}"},
                                                    heartbeat=10.0, max_msg_size=64 * 2**20), timeout_s)
    except asyncio.TimeoutError:
        raise RemoteError(f"model server {url}: no answer within {timeout_s:g} s") from None
    except aiohttp.WSServerHandshakeError as exc:
        hint = " (not a speechgpt-rt serve Realtime path?)" if exc.status in (400, 404, 405) else ""
        raise RemoteError(f"model server {url}: HTTP {exc.status} {exc.message}{hint}") from None
    except aiohttp.ClientConnectorError as exc:
        why = ("connection refused (is `speechgpt-rt serve` running there?)"
               if isinstance(exc.os_error, ConnectionRefusedError) else exc.os_error.strerror or str(exc.os_error))
        raise RemoteError(f"cannot reach the model server at {url}: {why}") from None
    except (aiohttp.ClientError, OSError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise RemoteError(f"cannot reach the model server at {url}: {text}") from None
    try:
        msg = await asyncio.wait_for(ws.receive(), timeout_s)
    except asyncio.TimeoutError:
        await ws.close()
        raise RemoteError(f"model server {url}: no session.created within {timeout_s:g} s") from None
    first = _first_event(msg)
    if first is None:
        await ws.close()
        raise RemoteError(f"model server {url}: the connection closed before session.created "
                          f"(code {ws.close_code}; not a Realtime server?)")
    if first.get("type") == "error":
        await ws.close()
        err = first.get("error") or {}
        if err.get("code") == ERROR_REFUSED_KEY:
            raise RemoteError(f"model server {url} refused the API key (give the server's key with --api-key-env NAME)")
        raise RemoteError(f"model server {url}: {err.get('code')}: {err.get('message')}")
    if first.get("type") != "session.created":
        await ws.close()
        raise RemoteError(f"model server {url}: expected session.created first, got {str(first.get('type'))[:60]!r}")
    return ws, first


def _first_event(msg) -> dict | None:
    import aiohttp

    if msg.type != aiohttp.WSMsgType.TEXT:
        return None
    try:
        event = json.loads(msg.data)
    except ValueError:
        return {"type": "<not JSON>"}
    return event if isinstance(event, dict) else {"type": "<not an object>"}


async def probe(url: str, api_key: str, timeout_s: float = CONNECT_TIMEOUT_S) -> float:
    """Connect once and hang up: seconds it took; RemoteError (one line) when the server cannot be used. A server
    that is full (--max-sessions) counts as up: it accepted the key, and sessions may free up later."""
    import aiohttp

    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        try:
            ws, _ = await open_socket(http, url, api_key, timeout_s)
        except RemoteError as exc:
            if ERROR_FULL in str(exc):
                return time.perf_counter() - t0
            raise
        await ws.close()
    return time.perf_counter() - t0


class RemoteModel:
    """Duck-typed `SpeechGPTModel` whose sessions run on a Realtime server (see the module doc)."""

    paths = None  # no bundle in this process

    def __init__(self, url: str, api_key: str | None = None, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 report: RemoteReport | None = None):
        self.url = realtime_url(url)
        self.api_key = api_key or PLACEHOLDER_KEY
        self.connect_timeout_s = connect_timeout_s
        self.report = report or RemoteReport(0.0, self.url)
        self.device = "remote"
        self._sessions = 0
        self._failures = 0  # connection failures in a row: the next session backs off before connecting

    def session(self, input, output, config=None, clock=None, name: str | None = None,
                attributes: dict[str, str] | None = None):
        from agent.realtime.remote_session import RemoteSession

        self._sessions += 1
        return RemoteSession(self, input, output, config, clock, name=name or f"remote-{self._sessions}",
                             attributes=attributes)

    def retry_delay(self) -> float:
        """Seconds a new session waits before connecting: 0, then 0.5, 1, 2 ... 10 after failures in a row (a
        transport that starts a new session as soon as one ends must not hammer a server that is down)."""
        return 0.0 if self._failures == 0 else min(10.0, 0.5 * 2 ** (self._failures - 1))

    def connected(self, ok: bool) -> None:
        self._failures = 0 if ok else self._failures + 1


class UplinkAudio:
    """The transport's frames -> 24 kHz mono frames on the session clock (for `input_audio_buffer.append`), and the
    server's stream positions (what its `audio_start_ms` / `audio_end_ms` count: audio appended so far) back onto
    the session clock, through the timestamps of the audio sent there."""

    def __init__(self, clock, timestamps_on_session_clock: bool):
        self.clock = clock
        self.stamped = timestamps_on_session_clock
        self.sent_s = 0.0
        self._next_ts: float | None = None
        self._resampler: Resampler | None = None
        self._positions: deque[tuple[float, float]] = deque(maxlen=3000)  # (stream s, session time) per chunk

    def push(self, frame: AudioFrame) -> list[AudioFrame]:
        """BadFrameError for a frame that is not usable audio."""
        if not isinstance(frame, AudioFrame):
            raise BadFrameError("not an AudioFrame", field="type", expected="AudioFrame", got=type(frame).__name__)
        frame = frame.validate().to_float32_mono()
        if not self.stamped:
            frame = self._stamp(frame)
        if self._resampler is None or self._resampler.in_rate != frame.sample_rate:
            self._resampler = Resampler(PROTOCOL_PCM_RATE, in_rate=frame.sample_rate)  # a new stream rate
        return self._resampler.push(frame)

    def _stamp(self, frame: AudioFrame) -> AudioFrame:
        """Contiguous session times for transports on another clock (as agent.session.Session stamps them)."""
        arrival = self.clock.now() - frame.duration
        ts = self._next_ts if self._next_ts is not None and abs(arrival - self._next_ts) < 0.25 else arrival
        self._next_ts = ts + frame.duration
        return replace(frame, timestamp=ts)

    def record(self, samples: int, timestamp: float) -> None:
        """`samples` at 24 kHz starting at session time `timestamp` are being appended."""
        self._positions.append((self.sent_s, timestamp))
        self.sent_s += samples / PROTOCOL_PCM_RATE

    def at(self, ms) -> float | None:
        """A server stream position (ms) -> session time (None when unknown)."""
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not self._positions:
            return None
        s = ms / 1000
        best = self._positions[0]
        for pos in reversed(self._positions):
            if pos[0] <= s:
                best = pos
                break
        return best[1] + (s - best[0])


# ---- the commands' flags ----------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """`--server` and `--api-key-env` for room, worker and telephony."""
    parser.add_argument("--server", default=None, metavar="URL",
                        help="use the model of a running `speechgpt-rt serve` at ws://HOST:PORT instead of loading "
                             "one in this process (not with --model-dir)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="with --server: the environment variable holding the model server's API key "
                             "(default: a placeholder key, for a server that takes any)")


def check_arguments(args, default_model_dir) -> str | None:
    """One line when --server is misused; fills in args.model_dir's default otherwise (its flag defaults to None,
    so that an explicit --model-dir next to --server can be told apart)."""
    if args.server is not None:
        if args.model_dir is not None:
            return "--server and --model-dir exclude each other: the model is either remote or loaded here"
        try:
            args.server = realtime_url(args.server)
        except ValueError as exc:
            return str(exc)
        if args.api_key_env is not None and not os.environ.get(args.api_key_env):
            return f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty)"
    elif args.api_key_env is not None:
        return "--api-key-env is the model server's key: it goes with --server"
    if args.model_dir is None:
        args.model_dir = default_model_dir
    return None


def connect_model(args) -> RemoteModel:
    """Probe args.server (already checked) and return its RemoteModel; RemoteError (one line) if it is unusable.
    Runs its own event loop: call it before the command's."""
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    model = RemoteModel(args.server, key)
    load_s = asyncio.run(probe(model.url, model.api_key, model.connect_timeout_s))
    model.report = RemoteReport(load_s, model.url)
    return model
