"""`TelephonyServer`: one aiohttp application, HTTP and WebSocket on one port; each WebSocket is one call.

Routes (a provider left out of `providers` has none of its routes: 404):
    GET  /twilio, /telnyx, /vonage   the providers' media-stream WebSockets (serializer chosen by the path)
    GET  /                           the same, the provider detected from its first messages
    POST /twilio/voice (or GET)      Twilio's voice webhook: TwiML <Connect><Stream url="wss://PUBLIC/twilio">
                                     with <Parameter>s (the caller, the callee, the webhook URL's query)
    GET  /vonage/answer (or POST)    Vonage's answer webhook: an NCCO connecting the call to wss://PUBLIC/vonage
    GET  /healthz, /stats            liveness; active calls and every counter as JSON

With a Twilio auth token, the Twilio webhook and the WebSocket upgrades on /twilio and / must carry a valid
`X-Twilio-Signature` (agent/telephony/security.py), else 403 before any upgrade. Past `max_calls` active calls an
upgrade gets 503. All calls share one loaded model; each has its own Session (agent/telephony/call.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from aiohttp import web

from agent.telephony.call import Call, CallLimits, CallSummary, new_call_name
from agent.telephony.output import PlayoutConfig
from agent.telephony.security import valid_twilio_signature
from agent.telephony.telnyx import TelnyxSerializer
from agent.telephony.twilio import TwilioSerializer
from agent.telephony.vonage import VonageSerializer

log = logging.getLogger(__name__)

SERIALIZERS = {"twilio": TwilioSerializer, "telnyx": TelnyxSerializer, "vonage": VonageSerializer}
MAX_WEBHOOK_PARAMETERS = 10  # query parameters of the webhook URL passed on as <Parameter>s / headers
MAX_WEBHOOK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerConfig:
    public_url: str | None = None  # how the provider reaches us, e.g. https://bot.example.com (None: from Host)
    auth_token: str | None = None  # Twilio auth token: signatures are checked when set
    providers: tuple[str, ...] = ("twilio", "telnyx", "vonage")
    max_calls: int = 16
    limits: CallLimits = field(default_factory=CallLimits)
    playout: PlayoutConfig = field(default_factory=PlayoutConfig)
    session: object = None  # agent.session.SessionConfig every call starts from (None: the defaults)
    prompts: dict[str, str] = field(default_factory=dict)  # name -> system prompt, chosen by the `prompt` parameter
    keep_event_history: bool = False  # sessions keep every event in memory (tests); off for long calls

    def __post_init__(self) -> None:
        unknown = [p for p in self.providers if p not in SERIALIZERS]
        if unknown or not self.providers:
            raise ValueError(f"ServerConfig.providers: expected some of {sorted(SERIALIZERS)}, got {self.providers!r}")
        if self.max_calls < 1:
            raise ValueError(f"ServerConfig.max_calls: expected >= 1, got {self.max_calls}")
        if self.public_url is not None:
            check_public_url(self.public_url)


def check_public_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError(f"public URL {url!r}: expected http(s)://HOST[:PORT] (the address the provider calls)")
    if parts.query or parts.fragment:
        raise ValueError(f"public URL {url!r}: no query or fragment, please")
    return url.rstrip("/")


class TelephonyServer:
    def __init__(self, model, config: ServerConfig | None = None):
        from agent.session import SessionConfig

        self.model = model
        self.config = config or ServerConfig()
        self.base_session = self.config.session or SessionConfig()
        self.calls: dict[str, Call] = {}
        self.finished: deque[CallSummary] = deque(maxlen=200)
        self.problems: Counter = Counter()
        self.totals: Counter = Counter()
        self.on_call: list[Callable[[Call], None]] = []  # called when a call's session starts (tests, metrics)
        # sessions are built off the event loop (a fork of the engine takes tens of ms), one at a time
        self._builder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="telephony-session")
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()

    # ---- pieces the calls use ------------------------------------------------------------------------------
    def enabled(self, provider: str) -> bool:
        return provider in self.config.providers

    @staticmethod
    def serializer_class(provider: str):
        return SERIALIZERS[provider]

    def serializer(self, provider: str):
        return SERIALIZERS[provider]()

    def session_config(self, parameters: dict[str, str]):
        """The SessionConfig of a call: the server's, with what the honoured parameters pick (docs/telephony.md):
        `prompt` (a name from the server's prompts), `seed` (an int). Returns (config, notes on bad values)."""
        changes, notes = {}, []
        name = parameters.get("prompt")
        if name is not None:
            if name in self.config.prompts:
                changes["system_prompt"] = self.config.prompts[name]
            else:
                notes.append(f"parameter prompt={name[:40]!r} names no configured prompt (known: "
                             f"{sorted(self.config.prompts)}); the default is used")
        seed = parameters.get("seed")
        if seed is not None:
            if seed.strip().lstrip("-").isdigit() and len(seed) < 12:
                changes["seed"] = int(seed)
            else:
                notes.append(f"parameter seed={seed[:20]!r} is not an int; ignored")
        return (replace(self.base_session, **changes) if changes else self.base_session), notes

    async def new_session(self, input, output, config, clock, name, attributes):
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(self._builder, lambda: self.model.session(
            input, output, config=config, clock=clock, name=name, attributes=attributes))
        session.events.keep_history = self.config.keep_event_history
        return session

    def call_started(self, call: Call) -> None:
        self.totals["calls_started"] += 1
        for hook in list(self.on_call):
            try:
                hook(call)
            except Exception:  # noqa: BLE001
                log.exception("on_call hook failed")

    def call_ended(self, call: Call, summary: CallSummary) -> None:
        self.calls.pop(call.name, None)
        self.finished.append(summary)
        self.totals["calls_ended"] += 1

    # ---- URLs ----------------------------------------------------------------------------------------------
    def base_urls(self, request: web.Request) -> tuple[str, str]:
        """(http base, ws base) the provider uses to reach us."""
        if self.config.public_url:
            base = check_public_url(self.config.public_url)
        else:
            proto = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
            base = f"{proto}://{host}"
        scheme, rest = base.split("://", 1)
        secure = scheme in ("https", "wss")
        return f"{'https' if secure else 'http'}://{rest}", f"{'wss' if secure else 'ws'}://{rest}"

    def _signed(self, request: web.Request, url: str, params: list[tuple[str, str]]) -> bool:
        token = self.config.auth_token
        if not token:
            return True
        ok = valid_twilio_signature(token, url, params, request.headers.get("X-Twilio-Signature"))
        if not ok:
            self.totals["signature_rejected"] += 1
            log.warning("refused %s %s: %s X-Twilio-Signature", request.method, request.path,
                        "bad" if "X-Twilio-Signature" in request.headers else "no")
        return ok

    # ---- handlers ------------------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
        routes = [web.get("/healthz", self._healthz), web.get("/stats", self._stats), web.get("/", self._websocket)]
        for provider in self.config.providers:
            routes.append(web.get(f"/{provider}", self._websocket))
        if self.enabled("twilio"):
            routes += [web.post("/twilio/voice", self._twilio_voice), web.get("/twilio/voice", self._twilio_voice)]
        if self.enabled("vonage"):
            routes += [web.get("/vonage/answer", self._vonage_answer), web.post("/vonage/answer", self._vonage_answer)]
        app.add_routes(routes)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def stats(self) -> dict:
        return {"active_calls": len(self.calls), "totals": dict(self.totals), "problems": dict(self.problems),
                "calls": [{"name": c.name, "provider": c.provider, "call_id": c.started.call_id if c.started else "",
                           "problems": dict(c.problems)} for c in self.calls.values()],
                "recent": [s.to_dict() for s in list(self.finished)[-20:]]}

    async def _twilio_voice(self, request: web.Request) -> web.Response:
        http_base, ws_base = self.base_urls(request)
        form = await request.post() if request.method == "POST" else {}
        params = [(k, v) for k, v in form.items() if isinstance(v, str)]
        if not self._signed(request, http_base + request.path_qs, params):
            return web.Response(status=403, text="invalid X-Twilio-Signature\n")
        values = dict(params)
        response = ET.Element("Response")
        stream = ET.SubElement(ET.SubElement(response, "Connect"), "Stream", url=f"{ws_base}/twilio")
        for name, value in self._webhook_parameters(request, values.get("From"), values.get("To")).items():
            ET.SubElement(stream, "Parameter", name=name, value=value)
        body = '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")
        self.totals["webhooks"] += 1
        return web.Response(text=body, content_type="application/xml")

    async def _vonage_answer(self, request: web.Request) -> web.Response:
        _, ws_base = self.base_urls(request)
        values = dict(request.query)
        if request.method == "POST" and request.can_read_body:
            try:
                body = await request.json()
                if isinstance(body, dict):
                    values.update({k: str(v) for k, v in body.items() if isinstance(v, (str, int))})
            except (json.JSONDecodeError, ValueError):
                pass
        headers = self._webhook_parameters(request, values.get("from"), values.get("to"))
        if values.get("uuid"):
            headers["uuid"] = str(values["uuid"])[:128]
        ncco = [{"action": "connect", "endpoint": [{"type": "websocket", "uri": f"{ws_base}/vonage",
                                                     "content-type": "audio/l16;rate=16000", "headers": headers}]}]
        self.totals["webhooks"] += 1
        return web.json_response(ncco)

    def _webhook_parameters(self, request: web.Request, caller: str | None, called: str | None) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in list(request.query.items())[:MAX_WEBHOOK_PARAMETERS]:
            if name not in ("from", "to", "uuid", "conversation_uuid"):
                out[name[:64]] = value[:256]
        if caller:
            out["caller"] = caller[:64]
        if called:
            out["called"] = called[:64]
        return out

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        provider = request.path.strip("/") or None
        if provider in (None, "twilio"):
            _, ws_base = self.base_urls(request)
            if not self._signed(request, ws_base + request.path_qs, []):
                return web.Response(status=403, text="invalid X-Twilio-Signature\n")
        if len(self.calls) >= self.config.max_calls:
            self.totals["refused_busy"] += 1
            return web.Response(status=503, text="too many calls\n")
        ws = web.WebSocketResponse(max_msg_size=self.config.limits.max_message_bytes, autoping=True)
        if not ws.can_prepare(request).ok:
            return web.Response(status=400, text="expected a WebSocket upgrade\n")
        await ws.prepare(request)
        call = Call(self, ws, provider, new_call_name())
        self.calls[call.name] = call
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await call.serve()
        finally:
            self._tasks.discard(task)
            self.calls.pop(call.name, None)
        return ws

    # ---- running -------------------------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0, sock: socket.socket | None = None) -> str:
        """Serve (on `sock` if given, else host:port); returns the base URL (http://host:port)."""
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock) if sock is not None else web.TCPSite(self._runner, host, port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        for call in list(self.calls.values()):
            if not call.ending:
                call.reason = "server shutdown"
                await call.ws.close(code=1001, message=b"server shutdown")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10.0)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._builder.shutdown(wait=False)

