"""Telephony pieces without a model: codecs, the three serializers on messages written from the public schemas,
the reorder window, Twilio signatures, and the call output's pacing / marks / clear on a fast session clock (so
nothing here depends on how fast the machine is)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import warnings

import numpy as np
import pytest

from agent.clock import SessionClock
from agent.io import PlaybackFinished, PlaybackStarted
from agent.telephony.base import Cleared, Dtmf, MarkEchoed, Media, ProtocolError, Started, Stopped
from agent.telephony.call import MediaOrder
from agent.telephony.codec import AudioFormat, CodecError, decode, encode
from agent.telephony.output import CallOutput, PlayoutConfig
from agent.telephony.security import twilio_signature, url_variants, valid_twilio_signature
from agent.telephony.telnyx import TelnyxSerializer
from agent.telephony.twilio import TwilioSerializer
from agent.telephony.vonage import VonageSerializer
from streaming.frames import AudioFrame

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # noqa: F401  (the codec the package must use; importing it here proves it is installed)


@pytest.fixture
def rng(request):
    import zlib

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------- codec
def test_g711_known_code_words():
    """ITU-T G.711: mu-law codes silence as 0xFF (and 0x7F), A-law as 0xD5 (even bits inverted); the largest
    mu-law magnitude is 32124, A-law's 32256."""
    mulaw, alaw = AudioFormat("mulaw", 8000), AudioFormat("alaw", 8000)
    assert encode(np.zeros(3, np.int16), mulaw) == b"\xff\xff\xff"
    assert encode(np.zeros(2, np.int16), alaw) == b"\xd5\xd5"
    assert decode(b"\x00\x80\xff", mulaw).tolist() == [-32124, 32124, 0]
    assert decode(b"\xaa\x2a", alaw).tolist() == [32256, -32256]


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_g711_round_trip_error_is_logarithmic(rng, encoding):
    fmt = AudioFormat(encoding, 8000)
    x = (rng.standard_normal(4000) * 6000).clip(-32000, 32000).astype(np.int16)
    y = decode(encode(x, fmt), fmt)
    assert y.dtype == np.int16 and y.shape == x.shape
    big = np.abs(x.astype(np.int32)) > 1000
    rel = np.abs(y[big].astype(np.int32) - x[big]) / np.abs(x[big].astype(np.int32))
    assert rel.max() < 1 / 16  # 16 steps per segment: under one step of relative error
    assert np.abs(y[~big].astype(np.int32) - x[~big]).max() < 64  # finer steps near zero (64 at most up to 1000)


def test_l16_byte_orders(rng):
    x = rng.integers(-32768, 32767, 100).astype(np.int16)
    le, be = AudioFormat("l16le", 16000), AudioFormat("l16be", 8000)
    assert encode(x, le) == x.astype("<i2").tobytes() and encode(x, be) == x.astype(">i2").tobytes()
    assert np.array_equal(decode(encode(x, le), le), x) and np.array_equal(decode(encode(x, be), be), x)
    with pytest.raises(CodecError, match="whole number"):
        decode(b"\x01\x02\x03", le)
    with pytest.raises(CodecError, match="empty"):
        decode(b"", AudioFormat("mulaw", 8000))


# ---------------------------------------------------------------------------------------------- serializers
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


TWILIO_START = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ1",
                "start": {"accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
                          "customParameters": {"caller": "+1555", "prompt": "support"},
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}


def test_twilio_messages_both_ways():
    s = TwilioSerializer()
    (started,) = s.parse(json.dumps(TWILIO_START))
    assert isinstance(started, Started) and started.call_id == "CA1" and started.stream_id == "MZ1"
    assert started.parameters == {"caller": "+1555", "prompt": "support"} and started.format.sample_rate == 8000
    (media,) = s.parse(json.dumps({"event": "media", "sequenceNumber": "2", "streamSid": "MZ1", "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20", "payload": b64(b"\xff" * 160)}}))
    assert isinstance(media, Media) and media.chunk == 1 and media.samples.shape == (160,) and not media.samples.any()
    assert s.parse(json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": "7"}})) == [Dtmf("7")]
    assert s.parse(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": "1:3"}})) == [MarkEchoed("1:3")]
    assert s.parse(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {"callSid": "CA1"}})) == [Stopped("stop")]
    out = json.loads(s.media(np.zeros(160, np.int16)))
    assert out == {"event": "media", "streamSid": "MZ1", "media": {"payload": b64(b"\xff" * 160)}}
    assert json.loads(s.mark("1:1")) == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "1:1"}}
    assert json.loads(s.clear()) == {"event": "clear", "streamSid": "MZ1"}


def test_telnyx_messages_both_ways():
    s = TelnyxSerializer()
    (started,) = s.parse(json.dumps({"event": "start", "sequence_number": "1", "stream_id": "S1", "start": {
        "user_id": "u", "call_control_id": "v3:C1", "client_state": "aGk=", "custom_parameters": {"caller": "+1"},
        "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}))
    assert started.call_id == "v3:C1" and started.format.encoding == "alaw" and started.parameters == {"caller": "+1"}
    assert started.info["client_state"] == "aGk="
    (media,) = s.parse(json.dumps({"event": "media", "sequence_number": "3", "stream_id": "S1",
                                   "media": {"track": "inbound", "chunk": "2", "timestamp": "40",
                                             "payload": b64(b"\xd5" * 160)}}))
    assert media.chunk == 2 and np.abs(media.samples).max() == 8  # A-law has no zero: 0xD5 is +8
    assert s.parse(json.dumps({"event": "dtmf", "stream_id": "S1", "dtmf": {"digit": "#"}})) == [Dtmf("#")]
    assert json.loads(s.media(np.zeros(160, np.int16))) == {"event": "media", "media": {"payload": b64(b"\xd5" * 160)}}
    assert json.loads(s.clear()) == {"event": "clear"}
    l16 = TelnyxSerializer()
    (started,) = l16.parse(json.dumps({"event": "start", "stream_id": "S2", "start": {
        "call_control_id": "C2", "media_format": {"encoding": "L16", "sample_rate": 16000, "channels": 1}}}))
    assert started.format == AudioFormat("l16be", 16000)
    (media,) = l16.parse(json.dumps({"event": "media", "stream_id": "S2", "media": {
        "chunk": "1", "payload": b64(np.array([1, -2], ">i2").tobytes())}}))
    assert media.samples.tolist() == [1, -2]


@pytest.mark.parametrize("codec", ["G722", "OPUS", "AMR-WB"])
def test_telnyx_codecs_we_do_not_speak_end_the_call_with_a_reason(codec):
    with pytest.raises(ProtocolError) as err:
        TelnyxSerializer().parse(json.dumps({"event": "start", "stream_id": "S", "start": {
            "call_control_id": "C", "media_format": {"encoding": codec, "sample_rate": 16000, "channels": 1}}}))
    assert err.value.kind == "unsupported_codec" and err.value.fatal and codec in err.value.detail


def test_vonage_messages_both_ways():
    s = VonageSerializer()
    with pytest.raises(ProtocolError, match="media_before_start"):
        s.parse(b"\x00" * 640)
    (started,) = s.parse(json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                                     "caller": "+1555", "uuid": "U1"}))
    assert started.format == AudioFormat("l16le", 16000) and started.call_id == "U1"
    assert started.parameters == {"caller": "+1555", "uuid": "U1"}
    (media,) = s.parse(np.arange(320, dtype="<i2").tobytes())
    assert media.samples.tolist() == list(range(320)) and media.chunk is None
    assert s.parse(json.dumps({"event": "websocket:dtmf", "digit": "9", "duration": 250})) == [Dtmf("9", 250)]
    assert s.parse(json.dumps({"event": "websocket:notify", "payload": {"name": "2:end"}})) == [MarkEchoed("2:end")]
    assert s.parse(json.dumps({"event": "websocket:cleared"})) == [Cleared()]
    assert s.media(np.array([1, -1], np.int16)) == np.array([1, -1], "<i2").tobytes()
    assert json.loads(s.mark("2:1")) == {"action": "notify", "payload": {"name": "2:1"}}
    assert json.loads(s.clear()) == {"action": "clear"}
    with pytest.raises(ProtocolError) as err:
        VonageSerializer().parse(json.dumps({"event": "websocket:connected", "content-type": "audio/opus"}))
    assert err.value.kind == "unsupported_codec" and err.value.fatal


MALFORMED = [
    ("not json {", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"no_event": 1}', "bad_message"),
    ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "@@not base64@@"}}', "bad_base64"),
    ('{"event": "media", "streamSid": "MZ1", "media": {"payload": 12}}', "bad_message"),
    ('{"event": "media", "streamSid": "MZ1", "media": {"payload": ""}}', "bad_audio"),
    ('{"event": "media", "streamSid": "MZ1", "media": {"track": "outbound", "payload": "/w=="}}', "other_track"),
    ('{"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "X"}}', "bad_message"),
    ('{"event": "mark", "streamSid": "MZ1", "mark": {}}', "bad_message"),
    ('{"event": "surprise"}', "unknown_event"),
    (b"\x00\x01", "unexpected_binary"),
]


@pytest.mark.parametrize("message,kind", MALFORMED, ids=[k + str(i) for i, (_, k) in enumerate(MALFORMED)])
def test_malformed_twilio_messages_name_their_problem(message, kind):
    s = TwilioSerializer()
    s.parse(json.dumps(TWILIO_START))
    with pytest.raises(ProtocolError) as err:
        s.parse(message)
    assert err.value.kind == kind and not err.value.fatal


def test_twilio_media_before_start_second_start_and_a_wrong_codec():
    s = TwilioSerializer()
    with pytest.raises(ProtocolError, match="media_before_start"):
        s.parse(json.dumps({"event": "media", "media": {"payload": b64(b"\xff" * 160)}}))
    s.parse(json.dumps(TWILIO_START))
    with pytest.raises(ProtocolError, match="start_twice"):
        s.parse(json.dumps(TWILIO_START))
    bad = json.loads(json.dumps(TWILIO_START))
    bad["start"]["mediaFormat"]["encoding"] = "audio/x-alaw"
    with pytest.raises(ProtocolError) as err:
        TwilioSerializer().parse(json.dumps(bad))
    assert err.value.kind == "unsupported_codec" and err.value.fatal


def test_each_provider_claims_its_own_first_messages():
    twilio = TWILIO_START
    telnyx = {"event": "start", "stream_id": "S", "start": {"call_control_id": "C"}}
    vonage = {"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}
    claims = {cls.provider: [cls.claims(m) for m in (twilio, telnyx, vonage)]
              for cls in (TwilioSerializer, TelnyxSerializer, VonageSerializer)}
    assert claims["twilio"][0] and claims["telnyx"][1] and claims["vonage"][2]
    assert not any(claims["twilio"][1:]) and not claims["telnyx"][0] and not claims["telnyx"][2]
    assert not claims["vonage"][0] and not claims["vonage"][1]
    connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}  # says nothing either way
    assert all(cls.claims(connected) is None for cls in (TwilioSerializer, TelnyxSerializer, VonageSerializer))


# ---------------------------------------------------------------------------------------------- reorder window
def test_the_reorder_window_restores_order_and_names_what_it_dropped():
    order = MediaOrder(window=3)
    out = []
    for chunk in [2, 1, 4, 3, 6, 5, 7]:  # swapped pairs, from the first frame on
        out += order.push(chunk, chunk)
    assert out == [1, 2, 3, 4, 5, 6, 7] and not order.counts
    assert order.push(6, 6) == [] and order.counts["duplicate_media"] == 1
    order.push(9, 9)
    assert order.push(9, 9) == [] and order.counts["duplicate_media"] == 2  # a duplicate of a waiting frame
    out = []
    for chunk in [10, 11, 12]:  # 8 never comes: 9 waits for 3 more frames, then the gap is given up
        out += order.push(chunk, chunk)
        assert out == [] or chunk == 12
    assert out == [9, 10, 11, 12] and order.counts["lost_media"] == 1
    assert order.push(8, 8) == [] and order.counts["late_media"] == 1
    assert order.push(10_000, "restart") == ["restart"]  # a counter restart, not a 10k-frame gap
    assert order.push(None, "unnumbered") == ["unnumbered"]


# ---------------------------------------------------------------------------------------------- signatures
def reference_signature(token: str, url: str, params: dict[str, str]) -> str:
    """Twilio's documented algorithm, written out independently: URL + each (name + value) sorted by name."""
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def test_twilio_signatures():
    token, url = "12345", "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234", "From": "+12349013030",
              "To": "+18005551212"}
    sig = reference_signature(token, url, params)
    assert twilio_signature(token, url, params.items()) == sig
    assert valid_twilio_signature(token, url, params.items(), sig)
    assert not valid_twilio_signature(token, url, params.items(), None)
    assert not valid_twilio_signature("54321", url, params.items(), sig)
    assert not valid_twilio_signature(token, url, {**params, "Digits": "9"}.items(), sig)
    assert not valid_twilio_signature(token, url.replace("foo=1", "foo=2"), params.items(), sig)
    # the same URL with the default port spelled out passes, another port does not
    assert valid_twilio_signature(token, "https://mycompany.com:443/myapp.php?foo=1&bar=2", params.items(), sig)
    assert not valid_twilio_signature(token, "https://mycompany.com:8443/myapp.php?foo=1&bar=2", params.items(), sig)
    assert url_variants("wss://a.example/twilio") == ["wss://a.example/twilio", "wss://a.example:443/twilio"]


# ---------------------------------------------------------------------------------------------- call output
class FakeSocket:
    """The provider side of CallOutput on a fast clock: plays chunks back to back from arrival, echoes marks when
    the audio before them has played, drops everything on clear."""

    def __init__(self, clock: SessionClock, output_ref: list, echo_marks: bool = True):
        self.clock, self.output_ref, self.echo_marks = clock, output_ref, echo_marks
        self.log: list[tuple[float, str, object]] = []
        self.play_end = 0.0
        self.ahead: list[float] = []
        self.timers: list[asyncio.Task] = []

    async def send(self, message) -> None:
        now = self.clock.now()
        msg = json.loads(message)
        kind = msg["event"]
        self.log.append((now, kind, msg))
        if kind == "media":
            self.play_end = max(self.play_end, now) + len(base64.b64decode(msg["media"]["payload"])) / 8000
            self.ahead.append(self.play_end - now)
        elif kind == "mark" and self.echo_marks:
            self.timers.append(asyncio.get_running_loop().create_task(self._echo(msg["mark"]["name"], self.play_end)))
        elif kind == "clear":
            self.play_end = now
            for timer in self.timers:
                timer.cancel()

    async def _echo(self, name: str, at: float) -> None:
        await self.clock.sleep_until(at)
        self.output_ref[0].on_mark(name)


def started_twilio() -> TwilioSerializer:
    s = TwilioSerializer()
    s.parse(json.dumps(TWILIO_START))
    return s


def make_output(config: PlayoutConfig, echo_marks: bool = True):
    clock = SessionClock(fast=True)
    ref: list = []
    sock = FakeSocket(clock, ref, echo_marks)
    out = CallOutput(started_twilio(), sock.send, clock, config)
    ref.append(out)
    events = []
    out.on_playback(events.append)
    return out, sock, clock, events


async def feed(out: CallOutput, clock: SessionClock, seconds: float, rate_factor: float = 4.0, start: float = 0.0):
    """Hand the output `seconds` of 16 kHz noise in 20 ms frames, `rate_factor` x faster than real time."""
    rng = np.random.default_rng(0)
    for k in range(round(seconds / 0.02)):
        await clock.sleep_until(start + k * 0.02 / rate_factor)
        await out.capture_frame(AudioFrame((rng.standard_normal(320) * 0.1).astype(np.float32), 16000))


def test_playout_is_paced_marked_and_finishes_at_the_last_echo():
    async def main():
        cfg = PlayoutConfig(lead_s=0.1, prebuffer_s=0.06)
        out, sock, clock, events = make_output(cfg)
        await feed(out, clock, 1.0)
        out.flush()
        finished = await out.wait_for_playout()
        await out.aclose()
        return out, sock, clock, events, finished

    out, sock, clock, events, finished = asyncio.run(main())
    media = [(t, m) for t, k, m in sock.log if k == "media"]
    marks = [m["mark"]["name"] for _, k, m in sock.log if k == "mark"]
    assert len(media) == 50 and all(len(base64.b64decode(m["media"]["payload"])) == 160 for _, m in media)
    assert marks == [f"1:{k}" for k in range(1, 50)] + ["1:end"]  # one after each chunk, the end after the last
    assert max(sock.ahead) <= 0.1 + 0.02 + 1e-3  # never more than the lead (+ the chunk in flight) queued
    assert isinstance(events[0], PlaybackStarted) and isinstance(events[-1], PlaybackFinished)
    assert not finished.interrupted and finished.position == pytest.approx(1.0) and finished.underruns == 0
    assert finished.at == pytest.approx(sock.play_end, abs=1e-3)  # finished when the last audio had played
    assert media[0][0] >= 0.06 / 4 - 1e-6  # the first chunk waited for the prebuffer


def test_clear_sends_clear_at_once_and_reports_the_last_echoed_mark():
    async def main():
        out, sock, clock, events = make_output(PlayoutConfig(lead_s=0.2, prebuffer_s=0.0))
        feeder = asyncio.get_running_loop().create_task(feed(out, clock, 2.0, rate_factor=1.5))
        await clock.sleep_until(0.7)
        finished = out.clear_buffer()
        cleared_at = clock.now()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        feeder.cancel()
        await out.aclose()
        return out, sock, finished, cleared_at

    out, sock, finished, cleared_at = asyncio.run(main())
    kinds = [k for _, k, _ in sock.log]
    clear_at = [t for t, k, _ in sock.log if k == "clear"]
    assert kinds.count("clear") == 1 and clear_at[0] == pytest.approx(cleared_at, abs=1e-3)
    assert "media" not in kinds[kinds.index("clear"):]  # nothing of the cleared reply after the clear
    echoed = out.truncated_at[0]
    assert finished.interrupted and echoed is not None
    played_by_then = cleared_at - min(t for t, k, _ in sock.log if k == "media")
    assert finished.position == pytest.approx(int(echoed.split(":")[1]) * 0.02)
    assert played_by_then - 0.04 <= finished.position <= played_by_then + 1e-6  # heard, not sent
    assert out.clear_buffer() is None  # nothing playing any more


def test_slow_production_is_an_underrun_and_a_silent_provider_times_out():
    async def main():
        out, sock, clock, _ = make_output(PlayoutConfig(lead_s=0.1, prebuffer_s=0.0, mark_timeout_s=0.5),
                                          echo_marks=False)
        await feed(out, clock, 0.2, rate_factor=4.0)
        await clock.sleep_until(1.0)  # the session stalls for most of a second mid-reply
        await feed(out, clock, 0.2, rate_factor=4.0, start=1.0)
        out.flush()
        finished = await out.wait_for_playout()
        return out, finished, clock.now()

    out, finished, now = asyncio.run(main())
    assert finished.underruns == 1 and out.stats["underruns"] == 1
    assert out.stats["mark_timeouts"] == 1 and not finished.interrupted  # no echo came: finished by the watchdog
    assert finished.position == pytest.approx(0.4) and now >= 1.0 + 0.2 + 0.5 - 1e-3


# ---------------------------------------------------------------------------------------------- the server, no model
def serve_without_model(scenario, **config):
    """The server with no model behind it: enough for webhooks, upgrades, and calls that end before their start."""
    import aiohttp

    from agent.telephony.server import ServerConfig, TelephonyServer

    async def main():
        server = TelephonyServer(None, ServerConfig(**config))
        base = await server.start("127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                return await scenario(base, server, http)
        finally:
            await server.stop()

    return asyncio.run(main())


def test_the_twiml_webhook_returns_a_stream_url_and_parameters():
    import xml.etree.ElementTree as ET

    form = {"CallSid": "CA1", "From": "+15550100", "To": "+15550199", "AccountSid": "AC1"}

    async def scenario(base, server, http):
        async with http.post(base + "/twilio/voice?prompt=support", data=form) as r:
            public = (r.status, r.content_type, await r.text())
        return public

    status, content_type, body = serve_without_model(scenario, public_url="https://bot.example.com")
    assert status == 200 and content_type == "application/xml" and body.startswith('<?xml version="1.0"')
    root = ET.fromstring(body.split("?>", 1)[1])
    (stream,) = root.findall("./Connect/Stream")
    assert root.tag == "Response" and stream.get("url") == "wss://bot.example.com/twilio"
    assert {p.get("name"): p.get("value") for p in stream.findall("Parameter")} == {
        "prompt": "support", "caller": "+15550100", "called": "+15550199"}

    async def from_host(base, server, http):  # no public URL: the request's own host, ws:// for http://
        async with http.post(base + "/twilio/voice", data=form) as r:
            return base, await r.text()

    base, body = serve_without_model(from_host)
    stream = ET.fromstring(body.split("?>", 1)[1]).find("./Connect/Stream")
    assert stream.get("url") == base.replace("http://", "ws://") + "/twilio"


def test_signatures_are_required_when_a_token_is_set():
    import aiohttp

    token, public = "test-token-0123", "https://bot.example.com"
    form = {"CallSid": "CA1", "From": "+15550100", "To": "+15550199"}
    good = reference_signature(token, public + "/twilio/voice?x=1", form)

    async def scenario(base, server, http):
        statuses = {}
        for name, headers in [("missing", {}), ("bad", {"X-Twilio-Signature": "AAAA" + good[4:]}),
                              ("good", {"X-Twilio-Signature": good})]:
            async with http.post(base + "/twilio/voice?x=1", data=form, headers=headers) as r:
                statuses[name] = r.status
        async with http.post(base + "/twilio/voice?x=1", data={**form, "From": "+1999"},
                             headers={"X-Twilio-Signature": good}) as r:
            statuses["tampered"] = r.status
        for path, headers in [("/twilio", {}), ("/twilio", {"X-Twilio-Signature": good}), ("/", {})]:
            try:
                ws = await http.ws_connect(base.replace("http://", "ws://") + path, headers=headers)
                await ws.close()
                statuses[f"ws{path}{len(headers)}"] = 101
            except aiohttp.WSServerHandshakeError as exc:
                statuses[f"ws{path}{len(headers)}"] = exc.status
        return statuses, dict(server.totals)

    statuses, totals = serve_without_model(scenario, public_url=public, auth_token=token)
    assert statuses == {"missing": 403, "bad": 403, "good": 200, "tampered": 403, "ws/twilio0": 403,
                        "ws/twilio1": 403, "ws/0": 403}  # (the WebSocket's URL is not the webhook's)
    assert totals["signature_rejected"] == 6


def test_unknown_paths_404_and_left_out_providers_too():
    import aiohttp

    async def scenario(base, server, http):
        out = {}
        for method, path in [("GET", "/nope"), ("POST", "/twilio/voice"), ("GET", "/telnyx"),
                             ("GET", "/vonage/answer"), ("GET", "/healthz")]:
            async with http.request(method, base + path) as r:
                out[f"{method} {path}"] = r.status
        try:
            await http.ws_connect(base.replace("http://", "ws://") + "/vonage")
        except aiohttp.WSServerHandshakeError as exc:
            out["ws /vonage"] = exc.status
        return out

    assert serve_without_model(scenario, providers=("twilio",)) == {
        "GET /nope": 404, "POST /twilio/voice": 200, "GET /telnyx": 404, "GET /vonage/answer": 404,
        "GET /healthz": 200, "ws /vonage": 404}


def test_the_vonage_answer_webhook_returns_an_ncco():
    async def scenario(base, server, http):
        async with http.get(base + "/vonage/answer?from=447700900000&to=447700900001&uuid=U1&prompt=support") as r:
            return r.status, await r.json()

    status, ncco = serve_without_model(scenario, public_url="https://bot.example.com")
    (action,) = ncco
    (endpoint,) = action["endpoint"]
    assert status == 200 and action["action"] == "connect" and endpoint["type"] == "websocket"
    assert endpoint["uri"] == "wss://bot.example.com/vonage" and endpoint["content-type"] == "audio/l16;rate=16000"
    assert endpoint["headers"] == {"prompt": "support", "caller": "447700900000", "called": "447700900001", "uuid": "U1"}


def test_calls_that_cannot_go_on_are_closed_with_a_reason_and_the_server_goes_on():
    """Each of these ends its call before any session exists; the server serves the next one."""
    import aiohttp

    ws_start = dict(TWILIO_START)
    bad_codec = json.loads(json.dumps(TWILIO_START))
    bad_codec["start"]["mediaFormat"]["encoding"] = "audio/x-l16"

    async def closed(http, url, messages, binary=False):
        ws = await http.ws_connect(url)
        for m in messages:
            try:
                await (ws.send_bytes(m) if binary else ws.send_str(m))
            except (ConnectionError, RuntimeError):
                break
        async for _ in ws:
            pass
        return ws.close_code

    async def scenario(base, server, http):
        ws = base.replace("http://", "ws://")
        codes = {
            "bad codec": await closed(http, ws + "/twilio", [json.dumps({"event": "connected"}), json.dumps(bad_codec)]),
            "no start in time": await closed(http, ws + "/twilio", [json.dumps({"event": "connected"})]),
            "unknown provider": await closed(http, ws + "/", [json.dumps({"event": "connected"})] * 20),
            "too big": await closed(http, ws + "/twilio", ["x" * 5000]),
            "flood": await closed(http, ws + "/twilio", [json.dumps({"event": "connected"})] * 2000),
        }
        assert ws_start  # (unused: the fixture message stays intact)
        async with http.get(base + "/stats") as r:
            stats = await r.json()
        return codes, stats, list(server.finished)

    limits = __import__("agent.telephony.call", fromlist=["CallLimits"]).CallLimits(
        start_timeout_s=0.5, max_message_bytes=4096, messages_per_s=100, burst_messages=200, rate_close_after=100)
    codes, stats, finished = serve_without_model(scenario, limits=limits)
    assert codes == {"bad codec": 1003, "no start in time": 1008, "unknown provider": 1003, "too big": 1009,
                     "flood": 1008}
    assert stats["active_calls"] == 0 and len(finished) == 5
    assert stats["problems"]["unsupported_codec"] == 1 and stats["problems"]["rate_limited"] >= 100
    reasons = [s.reason for s in finished]
    assert "Twilio streams are audio/x-mulaw" in reasons[0] and "no start" in reasons[1]
    assert "could not tell the provider" in reasons[2] and "over 4096 bytes" in reasons[3]
    assert "messages/s" in reasons[4]


def test_past_max_calls_an_upgrade_gets_503():
    import aiohttp

    async def scenario(base, server, http):
        first = await http.ws_connect(base.replace("http://", "ws://") + "/twilio")
        try:
            await http.ws_connect(base.replace("http://", "ws://") + "/twilio")
            status = 101
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
        await first.close()
        return status, dict(server.totals)

    status, totals = serve_without_model(scenario, max_calls=1)
    assert status == 503 and totals["refused_busy"] == 1


# ---------------------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("case", ["model dir", "port in use", "public url", "token env", "prompts", "providers"])
def test_command_line_mistakes_get_one_line_before_any_model_loads(case, tmp_path, capsys, monkeypatch):
    import socket

    from agent.cli import main

    monkeypatch.delenv("SPEECHGPT_RT_TEST_TOKEN", raising=False)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    bad_prompts = tmp_path / "prompts.json"
    bad_prompts.write_text('["not", "an object"]')
    argv = {
        "model dir": ["--model-dir", str(tmp_path / "missing"), "--port", "0"],
        "port in use": ["--port", str(port), "--model-dir", str(tmp_path / "missing")],
        "public url": ["--port", "0", "--public-url", "ftp://x"],
        "token env": ["--port", "0", "--auth-token-env", "SPEECHGPT_RT_TEST_TOKEN"],
        "prompts": ["--port", "0", "--prompts", str(bad_prompts)],
        "providers": ["--port", "0", "--providers", "twilio,skype"],
    }[case]
    if case == "port in use":  # the port is checked even when the model dir is fine: swap in a real-looking one
        argv = ["--port", str(port)]
    import agent.model

    monkeypatch.setattr(agent.model.SpeechGPTModel, "load", lambda *a, **k: pytest.fail("the model loaded"))
    try:
        rc = main(["telephony", *argv])
    finally:
        busy.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("speechgpt-rt telephony: "), err
    assert "Traceback" not in err[0]
    expected = {"model dir": "missing", "port in use": "cannot listen", "public url": "--public-url",
                "token env": "SPEECHGPT_RT_TEST_TOKEN", "prompts": "expected a JSON object",
                "providers": "skype"}[case]
    assert expected in err[0]


def test_needed_prebuffer_is_the_least_that_plays_the_frames_back_to_back():
    from agent.telephony.output import needed_prebuffer

    def plays(arrivals, prebuffer):  # straightforward simulation: start once `prebuffer` is in, then real time
        start = next(t for t, h, d in arrivals if h + d >= prebuffer - 1e-9)
        return all(t <= start + h + 1e-9 for t, h, _ in arrivals)

    rng = np.random.default_rng(7)
    for _ in range(50):
        n = int(rng.integers(5, 80))
        gaps = rng.exponential(0.02, n) * rng.choice([0.2, 1.0, 3.0])
        arrivals = [(float(t), k * 0.02, 0.02) for k, t in enumerate(np.cumsum(gaps))]
        need = needed_prebuffer(arrivals)
        assert plays(arrivals, need)
        smaller = [k * 0.02 for k in range(1, n + 1) if k * 0.02 < need - 1e-9]
        assert not any(plays(arrivals, p) for p in smaller)  # and nothing less would do
    assert needed_prebuffer([(k * 0.02, k * 0.02, 0.02) for k in range(10)]) == pytest.approx(0.02)  # real time


def test_nothing_of_a_cleared_reply_goes_out_after_the_clear():
    """The clear overtakes the reply: a chunk or mark the sender was about to send when the barge-in came (its send
    in flight on a slow socket) is dropped, never sent after the clear."""

    async def main():
        clock = SessionClock(fast=True)
        log: list[str] = []
        gate = asyncio.Event()

        async def slow_send(message):
            kind = json.loads(message)["event"]
            if kind == "media" and not gate.is_set():
                await gate.wait()  # the first chunk's send hangs until the barge-in has happened
            log.append(kind)

        out = CallOutput(started_twilio(), slow_send, clock, PlayoutConfig(lead_s=0.1, prebuffer_s=0.0))
        await feed(out, clock, 0.4, rate_factor=8.0)
        for _ in range(10):
            await asyncio.sleep(0)
        finished = out.clear_buffer()  # the sender is stuck inside its first send
        await asyncio.sleep(0)
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        await out.aclose()
        return log, finished

    log, finished = asyncio.run(main())
    assert log[:2] == ["media", "clear"] and log.count("clear") == 1, log
    assert set(log[log.index("clear") + 1:]) <= set(), log  # no mark, no media of the cleared reply after it
    assert finished.interrupted and finished.position == 0.0  # no mark had come back: nothing known heard


def test_inbound_frames_keep_the_callers_timeline_through_a_stall():
    """A late burst (our loop stalled 0.4 s) stays contiguous; a gap of over a second moves the timeline on."""
    from agent.telephony.output import CallInput

    class Clock:
        t = 10.0

        def now(self):
            return self.t

    clock = Clock()
    mic = CallInput(clock)
    frame = AudioFrame(np.zeros(160, np.int16), 8000)
    stamps = []
    for k in range(5):
        clock.t = 10.0 + 0.02 * (k + 1)
        mic.push(frame)
    clock.t += 0.4  # stall: the next 20 frames arrive at once
    for _ in range(20):
        mic.push(frame)
    clock.t += 2.0  # the provider went quiet for 2 s
    mic.push(frame)

    async def drain():
        mic.close()
        return [f.timestamp async for f in mic]

    stamps = asyncio.run(drain())
    assert stamps[:25] == pytest.approx([10.0 + 0.02 * k for k in range(25)])  # no gap from the stall
    assert stamps[25] == pytest.approx(clock.t - 0.02) and mic.resyncs == 1
