"""The GA dialect of the OpenAI Realtime protocol as this server speaks it: the effective session, server events,
items, errors (docs/realtime.md).

Only GA event names are ever emitted, and only fields whose types the strictest client parser accepts: unknown or
unsupported `session.update` fields are accepted and dropped, never echoed. Every server event carries a fresh
`event_id`. Errors use OpenAI's codes where OpenAI has one (docs/realtime.md, Errors).
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent.realtime.audio import PCM, PROTOCOL_PCM_RATE, WireFormat

# error codes (docs/realtime.md, Errors)
ACTIVE_RESPONSE = "conversation_already_has_active_response"
CANCEL_NOT_ACTIVE = "response_cancel_not_active"
COMMIT_EMPTY = "input_audio_buffer_commit_empty"
RETRIEVE_INVALID = "item_retrieve_invalid_item_id"
DELETE_INVALID = "item_delete_invalid_item_id"
TRUNCATE_INVALID = "item_truncate_invalid_item_id"
CREATE_DUPLICATE = "item_create_duplicate_item_id"
CREATE_INVALID_PREVIOUS = "item_create_invalid_previous_item_id"
INVALID_API_KEY = "invalid_api_key"
SESSION_LIMIT = "session_limit_reached"
INVALID_JSON = "invalid_json"
INVALID_EVENT = "invalid_event"
UNKNOWN_EVENT = "unknown_event"
INVALID_VALUE = "invalid_value"
MISSING_PARAMETER = "missing_required_parameter"
EVENT_TOO_LARGE = "event_too_large"

SEMANTIC_SILENCE_S = {"low": 0.8, "medium": 0.5, "auto": 0.5, "high": 0.3}  # eagerness -> our end-of-turn silence


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ProtocolError(ValueError):
    """A client event this server refuses: answered with an `error` event, the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.code, self.message, self.param, self.type = code, message, param, type


def event(type: str, **fields: Any) -> dict:
    return {"type": type, "event_id": new_id("event"), **fields}


def error_event(err: ProtocolError, client_event_id: str | None = None) -> dict:
    return event("error", error={"type": err.type, "code": err.code, "message": err.message, "param": err.param,
                                 "event_id": client_event_id})


DEFAULT_SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
                      "create_response": True, "interrupt_response": True, "idle_timeout_ms": None}


def _number(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(INVALID_VALUE, f"{name}: expected a number, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(INVALID_VALUE, f"{name}: {value!r} outside [{low}, {high}]", name)
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(INVALID_VALUE, f"{name}: expected true or false, got {value!r}", name)
    return value


def parse_format(value: Any, name: str) -> WireFormat:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError(INVALID_VALUE, f"{name}: expected {{type: audio/pcm|audio/pcmu|audio/pcma}}, got {value!r}", name)
    try:
        rate = value.get("rate", PROTOCOL_PCM_RATE)
        return WireFormat(value["type"], int(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else rate)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(INVALID_VALUE, f"{name}: {exc}", name) from None


def parse_turn_detection(value: Any, name: str = "session.audio.input.turn_detection") -> dict | None:
    """null (manual turns), server_vad or semantic_vad, completed with the defaults."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(INVALID_VALUE, f"{name}: expected an object or null, got {value!r}", name)
    kind = value.get("type", "server_vad")
    if kind == "server_vad":
        out = dict(DEFAULT_SERVER_VAD)
        for key in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            if value.get(key) is not None:
                out[key] = _number(value[key], f"{name}.{key}", 0, 1 if key == "threshold" else 10_000)
        if value.get("idle_timeout_ms") is not None:
            out["idle_timeout_ms"] = _number(value["idle_timeout_ms"], f"{name}.idle_timeout_ms", 0)
    elif kind == "semantic_vad":
        eagerness = value.get("eagerness") or "auto"
        if eagerness not in SEMANTIC_SILENCE_S:
            raise ProtocolError(INVALID_VALUE, f"{name}.eagerness: expected one of {sorted(SEMANTIC_SILENCE_S)}, got {eagerness!r}",
                                f"{name}.eagerness")
        out = {"type": "semantic_vad", "eagerness": eagerness, "create_response": True, "interrupt_response": True}
    else:
        raise ProtocolError(INVALID_VALUE, f"{name}.type: expected server_vad or semantic_vad, got {kind!r}", f"{name}.type")
    for key in ("create_response", "interrupt_response"):
        if value.get(key) is not None:
            out[key] = _bool(value[key], f"{name}.{key}")
    return out


def turn_silence_s(detection: dict) -> float:
    """The end-of-turn silence our VAD waits for under this turn detection."""
    if detection["type"] == "semantic_vad":
        return SEMANTIC_SILENCE_S[detection["eagerness"]]
    return max(0.05, detection["silence_duration_ms"] / 1000)


def parse_modalities(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(m not in ("audio", "text") for m in value):
        raise ProtocolError(INVALID_VALUE, f"{name}: expected [\"audio\"] or [\"text\"], got {value!r}", name)
    return ("audio",) if "audio" in value else ("text",)


def parse_max_tokens(value: Any, name: str) -> int | str:
    if value == "inf":
        return "inf"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ProtocolError(INVALID_VALUE, f"{name}: expected an int in [1, 4096] or \"inf\", got {value!r}", name)
    return value


@dataclass
class RealtimeSessionState:
    """The effective session: what `session.created` / `session.updated` show, and what the server acts on."""

    id: str = field(default_factory=lambda: new_id("sess"))
    model: str = "speechgpt"
    instructions: str = ""
    output_modalities: tuple[str, ...] = ("audio",)
    input_format: WireFormat = field(default_factory=WireFormat)
    output_format: WireFormat = field(default_factory=WireFormat)
    transcription: dict | None = None
    noise_reduction: dict | None = None
    turn_detection: dict | None = field(default_factory=lambda: dict(DEFAULT_SERVER_VAD))
    voice: str = "alloy"
    speed: float = 1.0
    max_output_tokens: int | str = "inf"
    tools: list = field(default_factory=list)
    tool_choice: str = "auto"
    tracing: Any = None

    def to_dict(self) -> dict:
        out_format = self.output_format.to_dict()
        if self.output_format.type == PCM:
            out_format["rate"] = PROTOCOL_PCM_RATE  # we always send 24 kHz PCM
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "audio": {
                "input": {"format": self.input_format.to_dict(), "transcription": copy.deepcopy(self.transcription),
                          "noise_reduction": copy.deepcopy(self.noise_reduction),
                          "turn_detection": copy.deepcopy(self.turn_detection)},
                "output": {"format": out_format, "voice": self.voice, "speed": self.speed},
            },
            "tools": copy.deepcopy(self.tools), "tool_choice": self.tool_choice,
            "max_output_tokens": self.max_output_tokens, "tracing": copy.deepcopy(self.tracing),
        }

    def update(self, patch: Any) -> "RealtimeSessionState":
        """A new state with the fields present in `patch` changed (all checked first: a refused update changes
        nothing). Unknown fields are ignored."""
        if not isinstance(patch, dict):
            raise ProtocolError(INVALID_VALUE, f"session: expected an object, got {patch!r}", "session")
        new = copy.deepcopy(self)
        if patch.get("type") not in (None, "realtime"):
            raise ProtocolError(INVALID_VALUE, f"session.type: only \"realtime\" sessions are served, got {patch['type']!r}",
                                "session.type")
        if isinstance(patch.get("model"), str):
            new.model = patch["model"]
        if "instructions" in patch:
            value = patch["instructions"]
            if value is not None and not isinstance(value, str):
                raise ProtocolError(INVALID_VALUE, f"session.instructions: expected a string, got {value!r}", "session.instructions")
            new.instructions = value or ""
        if patch.get("output_modalities") is not None:
            new.output_modalities = parse_modalities(patch["output_modalities"], "session.output_modalities")
        if "max_output_tokens" in patch and patch["max_output_tokens"] is not None:
            new.max_output_tokens = parse_max_tokens(patch["max_output_tokens"], "session.max_output_tokens")
        if isinstance(patch.get("tools"), list):
            new.tools = patch["tools"]
        if patch.get("tool_choice") in ("auto", "none", "required"):
            new.tool_choice = patch["tool_choice"]
        if "tracing" in patch and (patch["tracing"] is None or patch["tracing"] == "auto" or isinstance(patch["tracing"], dict)):
            new.tracing = patch["tracing"]
        audio = patch.get("audio")
        if audio is not None and not isinstance(audio, dict):
            raise ProtocolError(INVALID_VALUE, f"session.audio: expected an object, got {audio!r}", "session.audio")
        audio_in = (audio or {}).get("input")
        if isinstance(audio_in, dict):
            if audio_in.get("format") is not None:
                new.input_format = parse_format(audio_in["format"], "session.audio.input.format")
            if "transcription" in audio_in:
                value = audio_in["transcription"]
                if value is not None and not isinstance(value, dict):
                    raise ProtocolError(INVALID_VALUE, f"session.audio.input.transcription: expected an object or null, "
                                        f"got {value!r}", "session.audio.input.transcription")
                new.transcription = None if value is None else {k: value[k] for k in ("model", "language", "prompt")
                                                                if isinstance(value.get(k), str)}
            if "noise_reduction" in audio_in:
                value = audio_in["noise_reduction"]
                ok = isinstance(value, dict) and value.get("type") in ("near_field", "far_field")
                new.noise_reduction = {"type": value["type"]} if ok else None  # accepted, not applied
            if "turn_detection" in audio_in:
                new.turn_detection = parse_turn_detection(audio_in["turn_detection"])
        audio_out = (audio or {}).get("output")
        if isinstance(audio_out, dict):
            if audio_out.get("format") is not None:
                new.output_format = parse_format(audio_out["format"], "session.audio.output.format")
            if isinstance(audio_out.get("voice"), str):
                new.voice = audio_out["voice"]
            if isinstance(audio_out.get("speed"), (int, float)) and not isinstance(audio_out["speed"], bool):
                new.speed = float(audio_out["speed"])
        return new


# ---- items ------------------------------------------------------------------------------------------------------
def item_dict(message, status: str | None = None) -> dict:
    """A conversation message as a GA `realtime.item` (audio bytes are never sent back)."""
    if message.role == "assistant":
        if message.modality == "audio":
            content = [{"type": "output_audio", "transcript": message.heard_text}]
        else:
            content = [{"type": "output_text", "text": message.heard_text}]
    elif message.role == "user" and message.modality == "audio":
        content = [{"type": "input_audio", "transcript": message.text}]
    else:
        content = [{"type": "input_text", "text": message.text or ""}]
    return {"id": message.id, "object": "realtime.item", "type": "message", "status": status or message.status,
            "role": message.role, "content": content}


def parse_item(item: Any) -> dict:
    """What a `conversation.item.create` asks for: {id, role, modality, text, audio (base64 or None)}."""
    if not isinstance(item, dict):
        raise ProtocolError(MISSING_PARAMETER, "conversation.item.create needs an item object", "item")
    kind = item.get("type", "message")
    if kind != "message":
        raise ProtocolError(INVALID_VALUE, f"item.type {kind!r} is not supported (SpeechGPT has no tools)", "item.type")
    role = item.get("role")
    if role not in ("user", "assistant", "system"):
        raise ProtocolError(INVALID_VALUE, f"item.role: expected user, assistant or system, got {role!r}", "item.role")
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not item_id or len(item_id) > 64):
        raise ProtocolError(INVALID_VALUE, f"item.id: expected a string of 1..64 characters, got {item_id!r}", "item.id")
    content = item.get("content") or []
    if not isinstance(content, list):
        raise ProtocolError(INVALID_VALUE, "item.content: expected a list", "item.content")
    texts, audio, modality = [], None, "text"
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise ProtocolError(INVALID_VALUE, f"item.content[{i}]: expected an object", f"item.content[{i}]")
        ptype = part.get("type")
        if ptype in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text") or ""))
        elif ptype in ("input_audio", "output_audio", "audio"):
            modality = "audio"
            if isinstance(part.get("transcript"), str):
                texts.append(part["transcript"])
            if role == "user" and isinstance(part.get("audio"), str):
                audio = part["audio"]
        elif ptype == "input_image":
            continue  # SpeechGPT reads no images: the part is dropped
        else:
            raise ProtocolError(INVALID_VALUE, f"item.content[{i}].type {ptype!r} is not supported", f"item.content[{i}].type")
    text = " ".join(t.strip() for t in texts if t.strip()) if texts else None
    if role == "user" and modality == "audio" and audio is not None:
        text = None  # the audio is the question (its transcript, if any, came from elsewhere)
    if role == "user" and text is None and audio is None:
        text = ""
    return {"id": item_id, "role": role, "modality": modality if role != "system" else "text", "text": text, "audio": audio}


# ---- responses --------------------------------------------------------------------------------------------------
def usage_dict(usage) -> dict:
    return {
        "total_tokens": usage.total_tokens, "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
        "input_token_details": {"text_tokens": usage.input_text_tokens, "audio_tokens": usage.input_audio_tokens,
                                "cached_tokens": usage.cached_tokens, "image_tokens": 0,
                                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0}},
        "output_token_details": {"text_tokens": usage.output_text_tokens, "audio_tokens": usage.output_audio_tokens},
    }


def status_details(response) -> dict | None:
    if response.status == "cancelled":
        return {"type": "cancelled", "reason": response.reason or "client_cancelled"}
    if response.status == "incomplete":
        return {"type": "incomplete", "reason": response.reason or "max_output_tokens"}
    if response.status == "failed":
        return {"type": "failed", "error": {"type": "server_error", "code": "server_error",
                                            "message": response.error or "the response failed"}}
    return None


def response_dict(response, state: RealtimeSessionState, metadata: dict | None, output: list[dict],
                  done: bool) -> dict:
    out = {
        "id": response.id, "object": "realtime.response", "status": response.status if done else "in_progress",
        "status_details": status_details(response) if done else None, "output": output,
        "conversation_id": "conv_" + state.id.split("_", 1)[-1], "output_modalities": list(response.options.modalities),
        "max_output_tokens": response.options.max_output_tokens or "inf",
        "audio": {"output": {"format": {"type": PCM, "rate": PROTOCOL_PCM_RATE} if state.output_format.type == PCM
                             else state.output_format.to_dict(), "voice": state.voice}},
        "metadata": metadata, "usage": usage_dict(response.usage) if done else None,
    }
    return out
