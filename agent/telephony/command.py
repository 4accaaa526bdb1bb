"""`speechgpt-rt telephony`: the phone-call server (HTTP + WebSocket on one port; see agent/telephony/server.py).

Everything a user can get wrong (the model directory, the port, the public URL, the token variable, the prompts
file) is checked before the model loads and reported in one line with a non-zero exit. With `--server` no model
loads here: the calls' sessions run on a `speechgpt-rt serve` (agent/realtime/remote.py), probed before anything
else. The listening socket is
bound first and handed to the server once the model is loaded, so "port in use" never waits for a model load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

DEFAULT_MODEL_DIR = Path(".cache/tiny-bundle")
DEFAULT_TOKEN_ENV = "TWILIO_AUTH_TOKEN"
PROVIDERS = ("twilio", "telnyx", "vonage")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free port, printed at start)")
    from agent.realtime.remote import add_arguments as add_server_arguments

    parser.add_argument("--model-dir", type=Path, default=None,
                        help=f"release layout or converted bundle (default: the tiny bundle at {DEFAULT_MODEL_DIR}, made if missing)")
    add_server_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--public-url", default=None,
                        help="the URL providers reach this server at, e.g. https://bot.example.com (used in the TwiML "
                             "stream URL and to check signatures; default: from the request's Host header)")
    parser.add_argument("--auth-token-env", default=None, metavar="NAME",
                        help=f"environment variable holding the Twilio auth token; signatures are then required "
                             f"(default: {DEFAULT_TOKEN_ENV} if it is set)")
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated providers to serve (the others' paths answer 404)")
    parser.add_argument("--max-calls", type=int, default=16, help="concurrent calls; an upgrade past it gets 503")
    parser.add_argument("--prompts", type=Path, default=None,
                        help='JSON file {"name": "system prompt"}: a call picks one with the parameter prompt=name')
    parser.add_argument("--seed", type=int, default=0, help="turn k of a call samples with seed + k")
    parser.add_argument("--lead-ms", type=float, default=200.0, help="bot audio queued at the provider, at most")
    parser.add_argument("--prebuffer-ms", type=float, default=200.0, help="reply audio ready before the first chunk goes out")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: concurrency comes from the calls)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING...")


def _fail(message: str) -> int:
    print(f"speechgpt-rt telephony: {message}", file=sys.stderr)
    return 2


def _check_args(args) -> tuple[dict, str | None]:
    """Everything checkable before the model loads: (what run() needs, or an error line)."""
    from agent.bundle import BundleError, resolve_bundle
    from agent.realtime.remote import check_arguments
    from agent.telephony.server import check_public_url

    out: dict = {}
    problem = check_arguments(args, DEFAULT_MODEL_DIR)
    if problem:
        return out, problem
    if args.server is None and (args.model_dir != DEFAULT_MODEL_DIR or (args.model_dir / "tiny_bundle.json").is_file()):
        try:
            resolve_bundle(args.model_dir)
        except (BundleError, OSError) as exc:
            return out, str(exc)
    if args.public_url is not None:
        try:
            out["public_url"] = check_public_url(args.public_url)
        except ValueError as exc:
            return out, f"--public-url: {exc}"
    token_env = args.auth_token_env or DEFAULT_TOKEN_ENV
    token = os.environ.get(token_env, "")
    if args.auth_token_env is not None and not token:
        return out, f"--auth-token-env {token_env}: that environment variable is not set (or empty)"
    out["auth_token"] = token or None
    out["token_env"] = token_env
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        return out, f"--providers: expected some of {','.join(PROVIDERS)}, got {args.providers!r}"
    out["providers"] = providers
    if args.max_calls < 1:
        return out, f"--max-calls must be >= 1, got {args.max_calls}"
    if not (20 <= args.lead_ms <= 5000) or not (0 <= args.prebuffer_ms <= 10000):
        return out, f"--lead-ms must be in [20, 5000] and --prebuffer-ms in [0, 10000], got {args.lead_ms}, {args.prebuffer_ms}"
    if args.torch_threads < 1:
        return out, f"--torch-threads must be >= 1, got {args.torch_threads}"
    prompts: dict[str, str] = {}
    if args.prompts is not None:
        try:
            prompts = json.loads(args.prompts.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return out, f"--prompts {args.prompts}: {exc}"
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                    for k, v in prompts.items()):
            return out, f'--prompts {args.prompts}: expected a JSON object {{"name": "prompt text", ...}}'
    out["prompts"] = prompts
    if not (0 <= args.port <= 65535):
        return out, f"--port must be in 0..65535, got {args.port}"
    try:
        out["socket"] = _bind(args.host, args.port)
    except OSError as exc:
        return out, f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
    return out, None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers, not a live listener
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def run(args) -> int:
    from agent.realtime.remote import RemoteError, connect_model

    checked, problem = _check_args(args)
    if problem:
        if "socket" in checked:
            checked["socket"].close()
        return _fail(problem)
    checked["model"] = None
    if args.server is not None:  # before anything else: a model server that cannot be used fails in seconds
        try:
            checked["model"] = connect_model(args)
        except RemoteError as exc:
            checked["socket"].close()
            print(f"speechgpt-rt telephony: {exc}", file=sys.stderr)
            return 1
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_serve(args, checked))
    except KeyboardInterrupt:
        return 0
    finally:
        checked["socket"].close()


def _load_model(args):
    import torch

    from agent.model import SpeechGPTModel
    from agent.tiny import make_tiny_bundle

    if str(args.device) == "cpu":
        torch.set_num_threads(args.torch_threads)
    if not args.model_dir.exists() and args.model_dir == DEFAULT_MODEL_DIR:
        print(f"[telephony] writing the tiny bundle to {args.model_dir} (once; a few seconds of format training)")
        make_tiny_bundle(args.model_dir, seed=0)
    return SpeechGPTModel.load(args.model_dir, device=args.device)


async def _serve(args, checked: dict) -> int:
    from agent.session import SessionConfig
    from agent.telephony.output import PlayoutConfig
    from agent.telephony.server import ServerConfig, TelephonyServer

    model = checked["model"] or _load_model(args)
    config = ServerConfig(public_url=checked.get("public_url"), auth_token=checked["auth_token"],
                          providers=checked["providers"], max_calls=args.max_calls, prompts=checked["prompts"],
                          session=SessionConfig(seed=args.seed),
                          playout=PlayoutConfig(lead_s=args.lead_ms / 1000, prebuffer_s=args.prebuffer_ms / 1000))
    server = TelephonyServer(model, config)
    base = await server.start(sock=checked["socket"])
    ws = base.replace("http://", "ws://")
    if checked["model"] is not None:
        print(f"[telephony] model server {model.url} (session.created in {model.report.load_s * 1e3:.0f} ms); "
              f"listening on {base}", flush=True)
    else:
        print(f"[telephony] model loaded in {model.report.load_s:.1f} s; listening on {base}", flush=True)
    print(f"[telephony] media streams: {', '.join(f'{ws}/{p}' for p in config.providers)} (or {ws}/ detected)")
    if "twilio" in config.providers:
        public = checked.get("public_url") or "https://YOUR-PUBLIC-HOST"
        print(f"[telephony] Twilio: point the number's voice webhook at {public}/twilio/voice (POST)")
    if "vonage" in config.providers:
        print(f"[telephony] Vonage: answer URL {checked.get('public_url') or 'https://YOUR-PUBLIC-HOST'}/vonage/answer")
    if checked["auth_token"]:
        print(f"[telephony] X-Twilio-Signature required (token from ${checked['token_env']})")
    else:
        print(f"[telephony] no Twilio auth token (${checked['token_env']} unset): requests are NOT authenticated")
    if model.paths is not None and model.paths.is_tiny:
        print("[telephony] the tiny random-weight bundle: canned answers and noise audio (see README)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported
            pass
    await stop.wait()
    print("[telephony] shutting down", flush=True)
    await server.stop()
    stats = server.stats()
    print(f"[telephony] {stats['totals'].get('calls_started', 0)} call(s) served; problems: {stats['problems'] or 'none'}")
    return 0
