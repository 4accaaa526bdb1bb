"""Vonage Voice API WebSockets (NCCO `connect` to a `websocket` endpoint): BINARY 16-bit linear PCM both ways,
JSON text for control.

In:  first `{"event": "websocket:connected", "content-type": "audio/l16;rate=16000", ...headers}` (the NCCO
     endpoint's headers arrive as its other keys: our parameters), then binary frames of little-endian int16
     audio (640 bytes per 20 ms at 16 kHz), `websocket:dtmf{digit, duration}`, `websocket:notify{payload}` (the
     echo of a notify we sent, once the audio queued before it has played), `websocket:cleared`. There is no
     stop message: the socket closing ends the call.
Out: binary audio frames, `{"action": "notify", "payload": {"name": ...}}` as our mark, `{"action": "clear"}`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from agent.telephony.base import (
    CallEvent,
    Cleared,
    Dtmf,
    MarkEchoed,
    Media,
    ProtocolError,
    ProviderError,
    Serializer,
    Started,
    clean_parameters,
    dtmf_digit,
    dumps,
    get,
    optional_int,
    parse_json,
)
from agent.telephony.codec import AudioFormat, CodecError, decode, encode

RATES = (8000, 16000, 24000)
_CONTENT_TYPE = re.compile(r"^\s*audio/l16\s*;\s*rate\s*=\s*(\d+)\s*$", re.IGNORECASE)


class VonageSerializer(Serializer):
    provider = "vonage"

    @classmethod
    def claims(cls, message: dict[str, Any]) -> bool | None:
        event = message.get("event")
        if isinstance(event, str) and event.startswith("websocket:"):
            return True
        return False if "start" in message else None

    def parse(self, message: str | bytes) -> list[CallEvent]:
        if isinstance(message, (bytes, bytearray)):
            if self.format is None:
                raise ProtocolError("media_before_start", "audio before websocket:connected (dropped)")
            try:
                return [Media(decode(bytes(message), self.format))]
            except CodecError as exc:
                raise ProtocolError("bad_audio", str(exc)) from None
        msg = parse_json(message, "vonage")
        event = get(msg, "event", str, "message")
        if event == "websocket:connected":
            return [self._connected(msg)]
        if event == "websocket:dtmf":
            digit = msg.get("digit")
            if digit is None and isinstance(msg.get("dtmf"), dict):
                digit = msg["dtmf"].get("digit")
            return [Dtmf(dtmf_digit(digit, "websocket:dtmf.digit"), optional_int(msg.get("duration")))]
        if event == "websocket:notify":
            payload = get(msg, "payload", dict, "websocket:notify")
            return [MarkEchoed(get(payload, "name", str, "websocket:notify.payload"))]
        if event == "websocket:cleared":
            return [Cleared()]
        if event == "websocket:error":
            return [ProviderError(str(msg)[:300])]
        raise ProtocolError("unknown_event", f"event {event[:40]!r}")

    def _connected(self, msg: dict[str, Any]) -> Started:
        content_type = msg.get("content-type", "audio/l16;rate=16000")
        match = _CONTENT_TYPE.match(content_type) if isinstance(content_type, str) else None
        rate = int(match.group(1)) if match else None
        if rate not in RATES:
            raise ProtocolError("unsupported_codec", f"content-type {content_type!r} (spoken here: audio/l16;rate="
                                f"{'|'.join(map(str, RATES))})", fatal=True)
        fmt = AudioFormat("l16le", rate)
        self._started(fmt)
        params = clean_parameters({k: v for k, v in msg.items() if k not in ("event", "content-type")},
                                  "websocket:connected")
        call_id = params.get("uuid") or params.get("call_uuid") or params.get("conversation_uuid") or ""
        return Started(call_id, "", fmt, params, {"content_type": str(content_type)})

    def media(self, samples: np.ndarray) -> bytes:
        return encode(samples, self.format)

    def mark(self, name: str) -> str:
        return dumps({"action": "notify", "payload": {"name": name}})

    def clear(self) -> str:
        return dumps({"action": "clear"})
