"""The conventions existing LiveKit frontends rely on (docs/livekit.md, Frontend conventions).

Pure data and small helpers; imports nothing from the SDK at module level, so it can be read without livekit.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from agent.events import AgentState

# Participant attribute that agent frontends read to show what the agent is doing.
ATTR_AGENT_STATE = "lk.agent.state"
AGENT_STATES = tuple(s.value for s in AgentState)  # initializing, listening, thinking, speaking

# Text streams carrying captions (user transcript and agent answer).
TOPIC_TRANSCRIPTION = "lk.transcription"
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_TRANSCRIBED_TRACK_ID = "lk.transcribed_track_id"
ATTR_TRANSCRIPTION_FINAL = "lk.transcription_final"

# Our own attributes (namespaced so they never collide with LiveKit's `lk.*`).
ATTR_SERVED = "speechgpt.serving"  # identity of the participant the agent listens to ("" when none)
ATTR_WORKER = "speechgpt.worker"  # worker name, set on agents that came through dispatch

AGENT_TRACK_NAME = "agent-voice"
OUTPUT_SAMPLE_RATE = 48000  # what the agent publishes
INPUT_SAMPLE_RATE = 16000  # what the Session takes (rtc.AudioStream resamples for us)


def segment_id(kind: str, room: str, session: int, turn: int) -> str:
    """Stable per room connection, session and turn: `kind` is "user" or "agent"."""
    return f"SG_{kind}_{room}_{session}_{turn}"


def transcription_attributes(segment: str, track_sid: str, final: bool) -> dict[str, str]:
    return {ATTR_SEGMENT_ID: segment, ATTR_TRANSCRIBED_TRACK_ID: track_sid,
            ATTR_TRANSCRIPTION_FINAL: "true" if final else "false"}


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str
    api_secret: str


def agent_grants(room: str):
    """What the agent's participant needs in a room, and no more: join that room, subscribe to the user, publish
    its voice (microphone only) and text streams, and update its own attributes (`lk.agent.state`; without
    `can_update_own_metadata` the server drops the update silently)."""
    from livekit import api

    return api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True, can_publish_data=True,
                           can_update_own_metadata=True, can_publish_sources=["microphone"])


def agent_token(creds: Credentials, room: str, identity: str, name: str | None = None,
                ttl: datetime.timedelta = datetime.timedelta(hours=6)) -> str:
    from livekit import api

    token = (api.AccessToken(creds.api_key, creds.api_secret).with_identity(identity).with_name(name or identity)
             .with_kind("agent").with_grants(agent_grants(room)).with_ttl(ttl))
    return token.to_jwt()


def worker_token(creds: Credentials) -> str:
    """The token a worker presents on the server's agent endpoint: the `agent` grant only."""
    from livekit import api

    return api.AccessToken(creds.api_key, creds.api_secret).with_grants(api.VideoGrants(agent=True)).to_jwt()


def http_url(url: str) -> str:
    """ws(s):// -> http(s):// (the server API is served on the same port)."""
    if url.startswith("ws://"):
        return "http://" + url[5:]
    if url.startswith("wss://"):
        return "https://" + url[6:]
    return url


def ws_url(url: str) -> str:
    if url.startswith("http://"):
        return "ws://" + url[7:]
    if url.startswith("https://"):
        return "wss://" + url[8:]
    return url
