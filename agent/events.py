"""What a session tells the outside world, as typed events (transports map these onto their own conventions:
LiveKit's `lk.agent.state` attribute and `lk.transcription` streams, Realtime server events, telephony marks).

Times are on the session's clock (agent/clock.py). `turn` numbers the user turns of the session from 0.
"""

from __future__ import annotations

import asyncio
from collections import deque
import enum
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from agent.conversation import Message
    from agent.metrics import TurnMetrics
    from agent.session import Response

log = logging.getLogger(__name__)


class AgentState(str, enum.Enum):
    INITIALIZING = "initializing"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


@dataclass(frozen=True)
class StateChanged:
    old: AgentState
    new: AgentState
    at: float


@dataclass(frozen=True)
class UserSpeechStarted:
    turn: int
    at: float  # the VAD's onset
    item_id: str | None = None  # the user message the turn becomes if the VAD ends it


@dataclass(frozen=True)
class UserSpeechEnded:
    turn: int
    at: float  # end-of-turn decision
    offset: float  # end of the user's speech
    item_id: str | None = None


@dataclass(frozen=True)
class UserTranscript:
    """What SpeechGPT heard (its own ASR segment): interim while it is decoded, then final."""

    turn: int
    text: str
    final: bool
    item_id: str | None = None  # the user message transcribed
    delta: str = ""  # interim events: the text new in this one


@dataclass(frozen=True)
class AgentText:
    """The agent's text answer: `delta` is the new text, `text` all of it so far. The final event carries the
    text as heard when the reply was interrupted."""

    turn: int
    delta: str
    text: str
    final: bool
    response_id: str | None = None


@dataclass(frozen=True)
class ReplyAudioStarted:
    turn: int
    at: float  # the output's playout clock: when the first frame started playing


@dataclass(frozen=True)
class ReplyAudioFinished:
    turn: int
    at: float
    position: float  # seconds of reply audio played
    interrupted: bool


@dataclass(frozen=True)
class TurnCompleted:
    metrics: "TurnMetrics"


@dataclass(frozen=True)
class SessionError:
    """Something failed inside one stage; the session went back to listening and goes on."""

    stage: str  # "frame", "units", "prefill", "decode", "vocoder", "output", "prompt"
    message: str
    turn: int | None = None


@dataclass(frozen=True)
class AudioCommitted:
    """Audio became a user message (a manual commit, or a turn the VAD ended); an ItemAdded follows."""

    item_id: str
    previous_item_id: str | None
    at: float


@dataclass(frozen=True)
class ItemAdded:
    """A message entered the conversation (not a response's own: ResponseCreated carries that one)."""

    item: "Message"
    previous_item_id: str | None


@dataclass(frozen=True)
class ResponseCreated:
    """A response started; its assistant message is in the conversation (in progress) after previous_item_id."""

    response: "Response"
    previous_item_id: str | None


@dataclass(frozen=True)
class ResponseDone:
    """The response ended (response.status says how); nothing of it follows."""

    response: "Response"


SessionEvent = Union[StateChanged, UserSpeechStarted, UserSpeechEnded, UserTranscript, AgentText, ReplyAudioStarted,
                     ReplyAudioFinished, TurnCompleted, SessionError, AudioCommitted, ItemAdded, ResponseCreated,
                     ResponseDone]


HISTORY_EVENTS = 20000


class EventBus:
    """Callbacks (called on the event loop, in order) and async subscriptions to a session's events."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[SessionEvent], None]] = []
        self._queues: list[asyncio.Queue] = []
        # the latest events (tests, chat, debugging), bounded so that a day-long call does not grow without limit
        self.history: deque[SessionEvent] = deque(maxlen=HISTORY_EVENTS)
        self.keep_history = True

    def on(self, callback: Callable[[SessionEvent], None]) -> None:
        self._callbacks.append(callback)

    def emit(self, event: SessionEvent) -> None:
        if self.keep_history:
            self.history.append(event)
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception:  # a listener's bug must not break the session
                log.exception("session event listener failed on %s", type(event).__name__)
        for q in self._queues:
            q.put_nowait(event)

    def close(self) -> None:
        for q in self._queues:
            q.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[SessionEvent]:
        """Events from now on, until the session closes."""
        q: asyncio.Queue = asyncio.Queue()
        self._queues.append(q)
        try:
            while (event := await q.get()) is not None:
                yield event
        finally:
            self._queues.remove(q)
