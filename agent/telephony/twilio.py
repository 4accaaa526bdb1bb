"""Twilio Media Streams (bidirectional, from `<Connect><Stream>`): JSON text frames, camelCase, G.711 mu-law 8 kHz.

In:  connected, start{streamSid, callSid, accountSid, tracks, customParameters, mediaFormat}, media{track, chunk,
     timestamp, payload}, dtmf{digit}, mark{name} (echo), stop.
Out: media{payload}, mark{name}, clear; each carries the call's streamSid.
The facts we rely on are in docs/telephony.md.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from agent.telephony.base import (
    CallEvent,
    Connected,
    Dtmf,
    MarkEchoed,
    Media,
    ProtocolError,
    Serializer,
    Started,
    Stopped,
    clean_parameters,
    dtmf_digit,
    dumps,
    get,
    optional_int,
    parse_json,
)
from agent.telephony.codec import MULAW_8K, encode

INBOUND_TRACKS = ("inbound", "inbound_track")


class TwilioSerializer(Serializer):
    provider = "twilio"

    def __init__(self) -> None:
        super().__init__()
        self.stream_sid: str | None = None

    @classmethod
    def claims(cls, message: dict[str, Any]) -> bool | None:
        start = message.get("start")
        if isinstance(start, dict) and "streamSid" in start and "callSid" in start:
            return True
        if "streamSid" in message:
            return True
        if "stream_id" in message or "stream_sid" in message:
            return False
        return None

    def parse(self, message: str | bytes) -> list[CallEvent]:
        msg = parse_json(message, "twilio")
        event = get(msg, "event", str, "message")
        if event == "media":
            media = get(msg, "media", dict, "media")
            track = media.get("track", "inbound")
            if track not in INBOUND_TRACKS:
                raise ProtocolError("other_track", f"media of track {track!r} (only the inbound track is heard)")
            samples = self._decode_payload(media.get("payload"))
            return [Media(samples, optional_int(media.get("chunk")), optional_int(media.get("timestamp")))]
        if event == "mark":
            return [MarkEchoed(get(get(msg, "mark", dict, "mark"), "name", str, "mark"))]
        if event == "dtmf":
            return [Dtmf(dtmf_digit(get(msg, "dtmf", dict, "dtmf").get("digit"), "dtmf.digit"))]
        if event == "start":
            return [self._start(msg)]
        if event == "stop":
            return [Stopped("stop")]
        if event == "connected":
            return [Connected()]
        raise ProtocolError("unknown_event", f"event {event[:40]!r}")

    def _start(self, msg: dict[str, Any]) -> Started:
        start = get(msg, "start", dict, "start")
        stream_sid = get(start, "streamSid", str, "start")
        call_sid = get(start, "callSid", str, "start")
        fmt = start.get("mediaFormat", {})
        if not isinstance(fmt, dict):
            raise ProtocolError("bad_message", "start.mediaFormat: expected an object")
        encoding, rate, channels = fmt.get("encoding", "audio/x-mulaw"), fmt.get("sampleRate", 8000), fmt.get("channels", 1)
        if encoding != "audio/x-mulaw" or optional_int(rate) != 8000 or optional_int(channels) != 1:
            raise ProtocolError("unsupported_codec", f"mediaFormat {encoding!r} at {rate!r} Hz x {channels!r} "
                                "(Twilio streams are audio/x-mulaw, 8000 Hz, mono)", fatal=True)
        self._started(MULAW_8K)
        self.stream_sid = stream_sid
        tracks = start.get("tracks")
        info = {"account_sid": str(start.get("accountSid", "")),
                "tracks": ",".join(map(str, tracks)) if isinstance(tracks, list) else ""}
        return Started(call_sid, stream_sid, MULAW_8K, clean_parameters(start.get("customParameters"),
                                                                         "start.customParameters"), info)

    def media(self, samples: np.ndarray) -> str:
        payload = base64.b64encode(encode(samples, MULAW_8K)).decode("ascii")
        return dumps({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    def mark(self, name: str) -> str:
        return dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def clear(self) -> str:
        return dumps({"event": "clear", "streamSid": self.stream_sid})
