"""`speechgpt-rt room`: join one or more LiveKit rooms and serve them with one loaded model.

    speechgpt-rt room --url ws://HOST:7880 --room NAME [--room NAME2 ...] [--identity ID] [--token T]
                      [--participant ID] [--model-dir DIR | --server ws://HOST:PORT] [--max-sessions N]
                      [--metrics OUT.jsonl] [--prometheus-port P]

The URL and credentials come from the flags or from LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET (a
`--token` replaces the key and secret, for one room). The process joins first and loads the model while it sits
in the room as `initializing`, so a join that cannot succeed fails in seconds, before any model loads, with one
line on stderr and exit code 1 (2 for bad arguments). With `--server` the model is a running `speechgpt-rt serve`
(agent/realtime/remote.py), checked before anything else: a model server that cannot be used fails the same way.
SIGINT/SIGTERM: the sessions close, the agent leaves every room, the metrics are flushed, exit 0. A room lost for
good (the server gone longer than --reconnect-timeout): exit 1 with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

DEFAULT_IDENTITY = "speechgpt-agent"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `room` and `worker`."""
    from agent.chat import DEFAULT_MODEL_DIR
    from agent.realtime.remote import add_arguments as add_server_arguments

    parser.add_argument("--url", default=None, help="server URL, ws://HOST:PORT (default: $LIVEKIT_URL)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"release layout or converted bundle (default: the tiny bundle at {DEFAULT_MODEL_DIR}, made if missing)")
    add_server_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-sessions", type=int, default=None, help="the most sessions this process runs at once")
    parser.add_argument("--queue-ms", type=int, default=100, help="AudioSource queue of the agent's voice (ms)")
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds a join may take before it fails")
    parser.add_argument("--reconnect-timeout", type=float, default=60.0,
                        help="seconds to keep trying when the server is lost, before giving up")
    parser.add_argument("--seed", type=int, default=0, help="turn k of a session samples with seed + k")
    parser.add_argument("--metrics", type=Path, default=None, help="append per-room turn metrics here (JSON lines)")
    parser.add_argument("--prometheus-port", type=int, default=None, help="serve per-room metrics for Prometheus")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--log-level", default="INFO", help="logging level of the agent's own messages")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--room", action="append", required=True, metavar="NAME",
                        help="room to join (repeat for several rooms; one session per room)")
    parser.add_argument("--identity", default=DEFAULT_IDENTITY, help=f"the agent's identity (default {DEFAULT_IDENTITY})")
    parser.add_argument("--token", default=None, help="a ready access token (one room; replaces key and secret)")
    parser.add_argument("--api-key", default=None, help="default: $LIVEKIT_API_KEY")
    parser.add_argument("--api-secret", default=None, help="default: $LIVEKIT_API_SECRET")
    parser.add_argument("--participant", default=None, help="identity to serve (default: the first remote participant)")
    add_common_arguments(parser)


def fail(command: str, message: str, code: int = 1) -> int:
    # one write: the SDK logs from other threads and must not land in the middle of the line
    sys.stderr.write(f"speechgpt-rt {command}: {message}\n")
    sys.stderr.flush()
    return code


class RedactTokens(logging.Filter):
    """The SDK logs a refused token in full: never let a credential reach the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        from agent.livekit.room_agent import redact

        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(level: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactTokens())
    logging.getLogger("agent").setLevel(getattr(logging, str(level).upper(), logging.INFO))


def check_common(args) -> str | None:
    from agent.bundle import BundleError, resolve_bundle
    from agent.chat import DEFAULT_MODEL_DIR
    from agent.realtime.remote import check_arguments

    problem = check_arguments(args, DEFAULT_MODEL_DIR)
    if problem:
        return problem
    args.url = args.url or os.environ.get("LIVEKIT_URL")
    if not args.url:
        return "no server URL: pass --url or set LIVEKIT_URL"
    if not args.url.startswith(("ws://", "wss://", "http://", "https://")):
        return f"--url must start with ws://, wss://, http:// or https://, got {args.url!r}"
    if args.max_sessions is not None and args.max_sessions < 1:
        return f"--max-sessions must be >= 1, got {args.max_sessions}"
    if args.queue_ms < 10:
        return f"--queue-ms must be >= 10, got {args.queue_ms}"
    if args.connect_timeout <= 0 or args.reconnect_timeout < 0:
        return "--connect-timeout must be > 0 and --reconnect-timeout >= 0"
    if args.server is None and (args.model_dir != DEFAULT_MODEL_DIR or (args.model_dir / "tiny_bundle.json").is_file()):
        try:
            resolve_bundle(args.model_dir)
        except (BundleError, OSError) as exc:
            return str(exc)
    return None


def connect_server(args) -> str | None:
    """With --server: probe the model server before anything else (args.remote_model, or a line saying why not)."""
    from agent.realtime.remote import RemoteError, connect_model

    args.remote_model = None
    if args.server is None:
        return None
    try:
        args.remote_model = connect_model(args)
    except RemoteError as exc:
        return str(exc)
    return None


class ModelLoader:
    """Loads the one model of the process on a daemon thread (so a failed join can exit at once) and hands it to
    every room through an awaitable."""

    def __init__(self, args, log_prefix: str):
        self.args = args
        self.prefix = log_prefix
        self.future: asyncio.Future | None = None
        self.load_s: float | None = None

    def start(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        self.future = loop.create_future()

        def load() -> None:
            try:
                model = self._load()
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(_set_exception, self.future, exc)
                return
            loop.call_soon_threadsafe(_set_result, self.future, model)

        threading.Thread(target=load, name="model-load", daemon=True).start()
        return self.future

    def _load(self):
        remote = getattr(self.args, "remote_model", None)
        if remote is not None:  # --server: nothing loads here
            print(f"[{self.prefix}] model server {remote.url} (session.created in {remote.report.load_s * 1e3:.0f} ms)",
                  flush=True)
            return remote
        import torch

        from agent.chat import DEFAULT_MODEL_DIR
        from agent.model import SpeechGPTModel
        from agent.tiny import make_tiny_bundle

        args = self.args
        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        t0 = time.perf_counter()
        if not args.model_dir.exists() and args.model_dir == DEFAULT_MODEL_DIR:
            print(f"[{self.prefix}] writing the tiny bundle to {args.model_dir} (once)", flush=True)
            make_tiny_bundle(args.model_dir, seed=0)
        model = SpeechGPTModel.load(args.model_dir, device=args.device)
        self.load_s = time.perf_counter() - t0
        print(f"[{self.prefix}] model loaded in {self.load_s:.1f} s ({args.model_dir}; "
              f"decode step {model.report.step_variant}, vocoder {model.report.vocoder_backend})", flush=True)
        return model

    async def wait(self):
        return await asyncio.shield(self.future)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class MetricsSinks:
    def __init__(self, args, prefix: str):
        from agent.livekit.metrics import RoomMetricsLog, RoomPrometheusExporter

        self.prefix = prefix
        self.log = RoomMetricsLog(args.metrics) if args.metrics is not None else None
        self.prometheus = RoomPrometheusExporter(args.prometheus_port) if args.prometheus_port is not None else None

    def on_turn(self, agent, session_index: int, participant: str, metrics, report) -> None:
        from agent.livekit.metrics import turn_record

        record = turn_record(agent.config.room, participant, session_index, metrics, report, agent.clock)
        if self.log is not None:
            self.log.write(record)
        if self.prometheus is not None:
            self.prometheus.observe(record)
        cut = " (interrupted: as heard)" if metrics.interrupted else ""
        e2e = metrics.intervals().get("end_to_end")
        print(f"[{self.prefix} {agent.config.room}] turn {metrics.turn} of {participant}: heard {metrics.transcript!r}; "
              f"answered{cut} {metrics.text_answer!r}" + (f"; end to end {e2e * 1e3:.0f} ms" if e2e is not None else "")
              + (f"; errors {metrics.errors}" if metrics.errors else ""), flush=True)

    def on_sessions(self, room: str, n: int) -> None:
        if self.prometheus is not None:
            self.prometheus.set_sessions(room, n)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.prometheus is not None:
            self.prometheus.close()


def install_stop_handlers(stop: asyncio.Event) -> list[int]:
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    return installed


def run(args) -> int:
    setup_logging(args.log_level)
    problem = check_common(args)
    if problem is None:
        if args.token and len(args.room) > 1:
            problem = "--token is for one room; give LIVEKIT_API_KEY / LIVEKIT_API_SECRET to join several"
        elif not args.token:
            args.api_key = args.api_key or os.environ.get("LIVEKIT_API_KEY")
            args.api_secret = args.api_secret or os.environ.get("LIVEKIT_API_SECRET")
            if not (args.api_key and args.api_secret):
                problem = "no credentials: pass --token, or set LIVEKIT_API_KEY and LIVEKIT_API_SECRET"
        if problem is None and len(set(args.room)) != len(args.room):
            problem = "a room is named twice"
        if problem is None and args.max_sessions is not None and len(args.room) > args.max_sessions:
            problem = f"{len(args.room)} rooms but --max-sessions {args.max_sessions} (one session per room)"
    if problem:
        return fail("room", problem, 2)
    problem = connect_server(args)
    if problem:
        return fail("room", problem)
    return asyncio.run(_serve(args))


async def _serve(args) -> int:
    from agent.livekit.conventions import Credentials, agent_token, ws_url
    from agent.livekit.room_agent import JoinError, RoomAgent, RoomAgentConfig

    url = ws_url(args.url)
    stop = asyncio.Event()
    install_stop_handlers(stop)
    loader = ModelLoader(args, "room")  # started once every room is joined: a failed join exits at once
    sinks = MetricsSinks(args, "room")
    agents: list[RoomAgent] = []
    for name in args.room:
        if args.token:
            token = args.token
        else:
            creds = Credentials(url, args.api_key, args.api_secret)
            token = (lambda room=name: agent_token(creds, room, args.identity))
        cfg = RoomAgentConfig(url=url, room=name, token=token, participant=args.participant, queue_ms=args.queue_ms,
                              connect_timeout_s=args.connect_timeout, reconnect_timeout_s=args.reconnect_timeout,
                              seed=args.seed)
        agents.append(RoomAgent(loader.wait, cfg, on_turn=sinks.on_turn))
        agents[-1].on_sessions = sinks.on_sessions
    code = 0
    try:
        results = await asyncio.gather(*(a.connect() for a in agents), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for a, r in zip(agents, results):
                if not isinstance(r, BaseException):
                    await a.stop()
                    await a._shutdown()
            first = errors[0]
            return fail("room", str(first) if isinstance(first, JoinError) else f"{type(first).__name__}: {first}")
        for a in agents:
            print(f"[room] joined {a.config.room!r} at {url} as {args.identity!r}", flush=True)
        loader.start()
        runs = [asyncio.create_task(a.run()) for a in agents]
        stopper = asyncio.create_task(stop.wait())
        load_failed = asyncio.ensure_future(_load_failure(loader))
        pending = set(runs) | {stopper, load_failed}
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                print("[room] stopping: leaving the room(s)", flush=True)
                break
            if load_failed in done and load_failed.result() is not None:
                code = fail("room", f"could not load the model: {load_failed.result()}")
                break
            finished = [t for t in done if t in runs]
            problems = [t.result() for t in finished if t.exception() is None and t.result()]
            problems += [f"{type(t.exception()).__name__}: {t.exception()}" for t in finished if t.exception()]
            if problems:
                code = fail("room", problems[0])
                break
            if all(t.done() for t in runs):
                break
        for a in agents:
            await a.stop()
        await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 20.0)
        stopper.cancel()
        load_failed.cancel()
        return code
    finally:
        sinks.close()


async def _load_failure(loader: ModelLoader) -> str | None:
    try:
        await loader.wait()
        await asyncio.Event().wait()  # loaded: never report
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None
