"""The one small interface every provider's serializer implements, and the call events it produces.

A serializer turns one WebSocket message (text or binary) from the provider into call events (`parse`), and the
bot's audio chunks, marks and clear requests into the provider's messages (`media`, `mark`, `clear`). It owns the
call's wire format (codec, rate) once `start` (or Vonage's `websocket:connected`) announced it. It does no I/O and
keeps no timing: pacing, marks bookkeeping and the session live in agent/telephony/output.py and call.py, the
same for every provider. One file per provider (twilio.py, telnyx.py, vonage.py), after Pipecat's serializers/.

Anything malformed raises `ProtocolError(kind, detail)`; `fatal=True` means the call cannot go on (e.g. a codec
we cannot speak) and is closed with `close_code` and the detail as its reason. The call handler logs and counts
every other one and goes on with the next message.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import numpy as np

from agent.telephony.codec import AudioFormat, CodecError, decode

# WebSocket close codes (RFC 6455) the call handler uses
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003  # data we cannot accept (a codec we do not speak, an unknown provider)
CLOSE_POLICY = 1008  # a limit was broken (message rate, no start in time)
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

MAX_PARAMETERS = 32  # customParameters / headers kept per call
MAX_PARAMETER_CHARS = 512


class ProtocolError(ValueError):
    """A message the serializer cannot use. `kind` is the counter it goes to (see KINDS)."""

    def __init__(self, kind: str, detail: str, *, fatal: bool = False, close_code: int = CLOSE_UNSUPPORTED):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.fatal = fatal
        self.close_code = close_code


# what gets counted per call (and summed per server) when a message is not used
KINDS = (
    "bad_json",  # not JSON, or not a JSON object
    "bad_message",  # JSON without a field we need, or a field of the wrong type
    "bad_base64",
    "bad_audio",  # a payload the codec cannot decode (empty, odd length for 16-bit PCM)
    "unknown_event",
    "unexpected_binary",  # a binary frame from a provider that sends JSON text only
    "media_before_start",
    "start_twice",
    "duplicate_media",
    "late_media",  # arrived after its place in the stream was given up
    "lost_media",  # frames never seen (a gap the reorder window gave up on)
    "other_track",  # media of a track we do not listen to (the bot's own, with both_tracks)
    "unknown_mark",  # a mark echo whose name we never sent
    "unsupported_codec",
    "rate_limited",  # messages dropped over the per-call rate
    "input_overflow",  # frames dropped because the session fell behind
    "provider_error",  # the provider reported an error of its own
)


# ---- call events (provider -> bot) -----------------------------------------------------------------------
@dataclass(frozen=True)
class Connected:
    """The provider's hello (no call details yet)."""


@dataclass(frozen=True)
class Started:
    call_id: str  # Twilio callSid, Telnyx call_control_id, Vonage uuid header (or a generated id)
    stream_id: str  # Twilio streamSid, Telnyx stream_id
    format: AudioFormat
    parameters: dict[str, str] = field(default_factory=dict)  # customParameters / Vonage headers
    info: dict[str, str] = field(default_factory=dict)  # other call facts (account, tracks, client_state)


@dataclass(frozen=True)
class Media:
    samples: np.ndarray  # int16 mono at the call's rate
    chunk: int | None = None  # the provider's media counter (ordering), None when it has none
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class Dtmf:
    digit: str
    duration_ms: int | None = None


@dataclass(frozen=True)
class MarkEchoed:
    name: str


@dataclass(frozen=True)
class Cleared:
    """The provider acknowledged a clear (Vonage's websocket:cleared)."""


@dataclass(frozen=True)
class Stopped:
    reason: str = "stop"


@dataclass(frozen=True)
class ProviderError:
    detail: str


CallEvent = Union[Connected, Started, Media, Dtmf, MarkEchoed, Cleared, Stopped, ProviderError]

DTMF_DIGITS = frozenset("0123456789*#ABCD")


class Serializer(abc.ABC):
    provider: ClassVar[str]

    def __init__(self) -> None:
        self.format: AudioFormat | None = None  # known after start
        self.started = False

    @abc.abstractmethod
    def parse(self, message: str | bytes) -> list[CallEvent]:
        """One WebSocket message -> call events (raises ProtocolError)."""

    @abc.abstractmethod
    def media(self, samples: np.ndarray) -> str | bytes:
        """One chunk of bot audio (int16 mono at the call's rate) -> the message that plays it."""

    @abc.abstractmethod
    def mark(self, name: str) -> str | bytes:
        """Ask to be told when playout reaches this point."""

    @abc.abstractmethod
    def clear(self) -> str | bytes:
        """Drop every queued chunk of bot audio now."""

    @classmethod
    def claims(cls, message: dict[str, Any]) -> bool | None:
        """Auto-detection on `/`: True if this JSON message identifies the provider, False if it rules it out,
        None if it says nothing either way (e.g. a bare `connected`)."""
        return None

    # ---- helpers for the subclasses ----------------------------------------------------------------------
    def _started(self, fmt: AudioFormat) -> None:
        if self.started:
            raise ProtocolError("start_twice", "a second start on the same stream (ignored)")
        self.format = fmt
        self.started = True

    def _decode_payload(self, payload: Any) -> np.ndarray:
        if self.format is None:
            raise ProtocolError("media_before_start", "media before the stream's start (dropped)")
        if not isinstance(payload, str):
            raise ProtocolError("bad_message", f"media payload is {type(payload).__name__}, expected a base64 string")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError("bad_base64", f"media payload is not base64 ({exc})") from None
        try:
            return decode(data, self.format)
        except CodecError as exc:
            raise ProtocolError("bad_audio", str(exc)) from None


def parse_json(message: str | bytes, provider: str) -> dict[str, Any]:
    if isinstance(message, (bytes, bytearray)):
        raise ProtocolError("unexpected_binary", f"{provider} sends JSON text frames; got {len(message)} binary bytes")
    try:
        obj = json.loads(message)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"not JSON ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"a JSON {type(obj).__name__}, expected an object")
    return obj


def get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """A required field of the given type, or ProtocolError(bad_message)."""
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        got = "missing" if key not in obj else type(value).__name__
        raise ProtocolError("bad_message", f"{where}.{key}: expected {_type_name(kind)}, got {got}")
    return value


def optional_int(value: Any) -> int | None:
    """Providers send counters as strings ("12") or numbers; anything else is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        return int(value)
    return None


def clean_parameters(raw: Any, where: str) -> dict[str, str]:
    """customParameters-like maps: string keys, values made strings, bounded in count and length."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError("bad_message", f"{where}: expected an object of parameters, got {type(raw).__name__}")
    out: dict[str, str] = {}
    for key, value in list(raw.items())[:MAX_PARAMETERS]:
        if isinstance(value, (dict, list)):
            continue
        out[str(key)[:MAX_PARAMETER_CHARS]] = ("" if value is None else str(value))[:MAX_PARAMETER_CHARS]
    return out


def dtmf_digit(value: Any, where: str) -> str:
    if not isinstance(value, str) or value.upper() not in DTMF_DIGITS:
        raise ProtocolError("bad_message", f"{where}: {value!r} is not a DTMF digit (0-9, *, #, A-D)")
    return value.upper()


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", str: "a string", list: "a list", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))
