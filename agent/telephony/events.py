"""Call events a telephony session publishes on its `session.events` bus, next to the session's own
(agent/events.py). Times are on the session's clock."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CallStarted:
    provider: str  # "twilio" | "telnyx" | "vonage"
    call_id: str
    stream_id: str
    parameters: dict[str, str]  # customParameters (Twilio, Telnyx) or the endpoint headers (Vonage)
    at: float


@dataclass(frozen=True)
class DtmfReceived:
    digit: str  # 0-9, *, #, A-D
    at: float
    duration_ms: int | None = None  # Vonage reports it; Twilio and Telnyx do not


@dataclass(frozen=True)
class CallProblem:
    """A message from the provider that was not used (logged and counted; the call goes on unless `fatal`)."""

    kind: str  # one of agent.telephony.base.KINDS
    detail: str
    at: float
    fatal: bool = False


@dataclass(frozen=True)
class CallEnded:
    reason: str  # "stop", "hangup" (socket closed), "session", or what closed it ("rate limit", a bad codec...)
    at: float
    problems: dict[str, int] = field(default_factory=dict)
