"""`speechgpt-rt serve`: an OpenAI Realtime-compatible WebSocket server (GA dialect) over one loaded model.

    ws://HOST:PORT/v1/realtime[?model=NAME]   (also /realtime)

One SpeechGPTModel per process; one Session per connection (agent/realtime/connection.py). Authentication
(docs/realtime.md, Connecting): `Authorization: Bearer KEY`, the `openai-insecure-api-key.KEY` subprotocol (a browser
offers it with `realtime`, which is then selected) or an `api-key` header. With `--api-key-env NAME` the key must
equal that variable's value; without it any key, or none, is accepted (the clients insist on sending one: give them
any non-empty string). A wrong key, and a connection beyond `--max-sessions`, get an `error` event, then the socket
is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.realtime import protocol as P
from agent.realtime.connection import RealtimeConnection, ServerOptions

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(".cache/tiny-bundle")
PATHS = ("/v1/realtime", "/realtime")
KEY_PROTOCOL = "openai-insecure-api-key."
HARD_MAX_MESSAGE = 64 * 2**20  # aiohttp closes the socket beyond this; events up to max_event_bytes get an error


def client_key(request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if request.headers.get("api-key"):
        return request.headers["api-key"].strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(KEY_PROTOCOL):
            return proto[len(KEY_PROTOCOL):]
    return None


@dataclass
class RealtimeServer:
    """The aiohttp application around one model. `start()` binds (port 0: any free port), `stop()` ends it."""

    model: object
    options: ServerOptions = field(default_factory=ServerOptions)
    active: int = 0
    served: int = 0
    connections: list = field(default_factory=list)  # the live RealtimeConnections (for tests and benchmarks)

    def app(self):
        from aiohttp import web

        app = web.Application()
        for path in PATHS:
            app.router.add_get(path, self._handle)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        from aiohttp import web

        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _handle(self, request):
        from aiohttp import web

        ws = web.WebSocketResponse(protocols=("realtime",), max_msg_size=HARD_MAX_MESSAGE, autoping=True)
        await ws.prepare(request)
        key = client_key(request)
        if self.options.api_key is not None and key != self.options.api_key:
            await self._refuse(ws, P.ProtocolError(P.INVALID_API_KEY, "Incorrect API key provided.",
                                                   type="invalid_request_error"), 1008)
            return ws
        if self.options.max_sessions is not None and self.active >= self.options.max_sessions:
            await self._refuse(ws, P.ProtocolError(P.SESSION_LIMIT, f"this server serves at most "
                                                   f"{self.options.max_sessions} sessions at once; try again later",
                                                   type="server_error"), 1013)
            return ws
        from kernels.batch_engine import AdmissionRefused

        try:
            conn = RealtimeConnection(ws, self.model, self.options, request.query.get("model"),
                                      name=f"realtime-{self.served + 1}")
        except AdmissionRefused as exc:  # the batched engine cannot serve one more session in real time
            await self._refuse(ws, P.ProtocolError(P.SESSION_LIMIT, f"the model server is at capacity: {exc}; try again later",
                                                   type="server_error"), 1013)
            return ws
        self.active += 1
        self.served += 1
        self.connections.append(conn)
        try:
            await conn.run()
        finally:
            self.active -= 1
            self.connections.remove(conn)
            if not ws.closed:
                await ws.close()
        return ws

    async def _refuse(self, ws, err: P.ProtocolError, code: int) -> None:
        import json

        log.info("refused a connection: %s", err.message)
        await ws.send_str(json.dumps(P.error_event(err)))
        await ws.close(code=code, message=err.code.encode())


class ServerThread:
    """A RealtimeServer on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, model, options: ServerOptions | None = None, host: str = "127.0.0.1"):
        self.server = RealtimeServer(model, options or ServerOptions())
        self.host = host
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="realtime-server", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if not hasattr(self, "port"):
            raise RuntimeError(f"the Realtime server did not start: {getattr(self, 'error', 'timeout')}")

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.port = self.loop.run_until_complete(self.server.start(self.host, 0))
        except Exception as exc:  # noqa: BLE001 - reported by __init__
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1"

    def call(self, fn, timeout: float = 60):
        """Run fn() on the server's loop and return its result (to inspect sessions from a test)."""
        async def wrapped():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(60)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(60)


# ---- CLI ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help=f"release layout or converted bundle (default: the tiny bundle at {DEFAULT_MODEL_DIR}, made if missing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-sessions", type=int, default=None, help="connections served at once (beyond: refused)")
    parser.add_argument("--batched", action="store_true",
                        help="decode every connection's turns in one batched engine (one KV slot each, deadline scheduling, "
                             "admission control: a connection the measured step time cannot serve in real time is refused)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="the environment variable holding the key clients must send (default: any key)")
    parser.add_argument("--input-rate", type=int, choices=(24000, 16000), default=24000,
                        help="the real rate of inbound audio/pcm (16000: clients that send 16 kHz labelled as 24 kHz)")
    parser.add_argument("--model-name", default="speechgpt", help="session.model when the client names none")
    parser.add_argument("--honour-instructions", action="store_true",
                        help="use the client's instructions as SpeechGPT's system prompt (default: keep SpeechGPT's own)")
    parser.add_argument("--max-event-mib", type=float, default=16.0, help="larger client events are refused")
    parser.add_argument("--log-level", default="INFO")


def _fail(message: str) -> int:
    print(f"speechgpt-rt serve: {message}", file=sys.stderr)
    return 2


def check_args(args) -> tuple[ServerOptions | None, str | None]:
    """Everything a user can get wrong, before any model loads: (options, or an error line)."""
    from agent.bundle import BundleError, resolve_bundle

    if not 0 <= args.port <= 65535:
        return None, f"--port must be in 0..65535, got {args.port}"
    if args.max_sessions is not None and args.max_sessions < 1:
        return None, f"--max-sessions must be >= 1, got {args.max_sessions}"
    if args.max_event_mib <= 0:
        return None, f"--max-event-mib must be > 0, got {args.max_event_mib}"
    if args.device not in ("cpu", "cuda") and not str(args.device).startswith("cuda:"):
        return None, f"--device must be cpu or cuda, got {args.device!r}"
    if getattr(logging, str(args.log_level).upper(), None) is None:
        return None, f"--log-level: unknown level {args.log_level!r}"
    key = None
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env)
        if not key:
            return None, f"--api-key-env {args.api_key_env}: that environment variable is not set (or empty)"
    if args.model_dir != DEFAULT_MODEL_DIR or (args.model_dir / "tiny_bundle.json").is_file():
        try:
            resolve_bundle(args.model_dir)
        except (BundleError, OSError) as exc:
            return None, str(exc)
    return ServerOptions(model_name=args.model_name, input_rate=16000 if args.input_rate == 16000 else None,
                         api_key=key, max_sessions=args.max_sessions, max_event_bytes=int(args.max_event_mib * 2**20),
                         honour_instructions=args.honour_instructions), None


def run(args) -> int:
    options, problem = check_args(args)
    if problem:
        return _fail(problem)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.model import SpeechGPTModel

    if args.model_dir == DEFAULT_MODEL_DIR and not (args.model_dir / "tiny_bundle.json").is_file():
        from agent.tiny import make_tiny_bundle

        make_tiny_bundle(args.model_dir, seed=0)
    batch = None
    if args.batched:
        from kernels.batch_engine import BatchConfig

        batch = BatchConfig(max_sessions=args.max_sessions)
    model = SpeechGPTModel.load(args.model_dir, device=args.device, batch=batch)
    server = RealtimeServer(model, replace(options))

    async def main() -> None:
        port = await server.start(args.host, args.port)
        print(f"speechgpt-rt serve: ws://{args.host}:{port}/v1/realtime (model {args.model_dir}, "
              f"{'key from $' + args.api_key_env if options.api_key else 'any API key'}, "
              f"max sessions {options.max_sessions or 'unlimited'}"
              + (f", batched decoding over {model.report.batched_slots} KV slots" if model.batched is not None else "")
              + ")", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    return 0
