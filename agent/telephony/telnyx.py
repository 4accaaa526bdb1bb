"""Telnyx media streaming (bidirectional RTP mode): Twilio's events in snake_case, a codec chosen per call.

In:  connected, start{call_control_id, media_format{encoding, sample_rate, channels}, custom_parameters,
     client_state} with a top-level stream_id, media{track, chunk, timestamp, payload}, dtmf{digit}, mark{name}
     (echo), error{...}, stop. Media frames may arrive out of order: `chunk` orders them (call.py).
Out: media{payload}, mark{name}, clear (no stream id needed: the socket is the stream).
Codecs spoken here: PCMU and PCMA (8 kHz), L16 (big-endian, RTP byte order) at the announced rate; G.722, Opus
and AMR-WB are refused (the call closes with a reason: ask Telnyx for PCMU/PCMA/L16 instead).
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
    ProviderError,
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
from agent.telephony.codec import AudioFormat, encode

ENCODINGS = {"PCMU": "mulaw", "PCMA": "alaw", "L16": "l16be"}
G711_RATE = 8000
L16_RATES = (8000, 16000, 24000, 48000)


class TelnyxSerializer(Serializer):
    provider = "telnyx"

    def __init__(self) -> None:
        super().__init__()
        self.stream_id: str | None = None

    @classmethod
    def claims(cls, message: dict[str, Any]) -> bool | None:
        start = message.get("start")
        if "stream_id" in message or isinstance(start, dict) and "call_control_id" in start:
            return True
        if "streamSid" in message or "stream_sid" in message:
            return False
        return None

    def parse(self, message: str | bytes) -> list[CallEvent]:
        msg = parse_json(message, "telnyx")
        event = get(msg, "event", str, "message")
        if event == "media":
            media = get(msg, "media", dict, "media")
            track = media.get("track", "inbound")
            if track not in ("inbound", "inbound_track"):
                raise ProtocolError("other_track", f"media of track {track!r} (only the inbound track is heard)")
            samples = self._decode_payload(media.get("payload"))
            chunk = optional_int(media.get("chunk"))
            if chunk is None:
                chunk = optional_int(msg.get("sequence_number"))
            return [Media(samples, chunk, optional_int(media.get("timestamp")))]
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
        if event == "error":
            payload = msg.get("payload", msg.get("error", {}))
            return [ProviderError(str(payload)[:300])]
        raise ProtocolError("unknown_event", f"event {event[:40]!r}")

    def _start(self, msg: dict[str, Any]) -> Started:
        start = get(msg, "start", dict, "start")
        call_id = get(start, "call_control_id", str, "start")
        stream_id = msg.get("stream_id")
        if not isinstance(stream_id, str):
            raise ProtocolError("bad_message", "stream_id: expected a string")
        fmt = start.get("media_format", {})
        if not isinstance(fmt, dict):
            raise ProtocolError("bad_message", "start.media_format: expected an object")
        codec = str(fmt.get("encoding", "PCMU")).upper()
        rate = optional_int(fmt.get("sample_rate", G711_RATE))
        channels = optional_int(fmt.get("channels", 1))
        supported = codec in ENCODINGS and channels == 1 and (
            rate == G711_RATE if codec != "L16" else rate in L16_RATES)
        if not supported:
            raise ProtocolError("unsupported_codec", f"media_format {codec!r} at {fmt.get('sample_rate')!r} Hz x "
                                f"{fmt.get('channels')!r} (spoken here: PCMU/PCMA at 8000 Hz, L16 at "
                                f"{'/'.join(map(str, L16_RATES))} Hz, mono)", fatal=True)
        audio = AudioFormat(ENCODINGS[codec], rate)
        self._started(audio)
        self.stream_id = stream_id
        info = {key: str(start[key])[:512] for key in ("user_id", "client_state", "call_session_id") if key in start}
        info["codec"] = codec
        params = clean_parameters(start.get("custom_parameters"), "start.custom_parameters")
        return Started(call_id, stream_id, audio, params, info)

    def media(self, samples: np.ndarray) -> str:
        payload = base64.b64encode(encode(samples, self.format)).decode("ascii")
        return dumps({"event": "media", "media": {"payload": payload}})

    def mark(self, name: str) -> str:
        return dumps({"event": "mark", "mark": {"name": name}})

    def clear(self) -> str:
        return dumps({"event": "clear"})
