"""The audio contracts every transport implements (after LiveKit Agents' `voice/io.py`).

- An input is an async iterator of `AudioFrame`s (any rate, size and channel count; the session validates and
  resamples). It ends when the stream ends.
- An output takes the agent's reply frames with `capture_frame`; `flush()` marks the end of a reply segment;
  `clear_buffer()` stops playback at once (barge-in); `wait_for_playout()` returns when the segment has played or
  was cleared. Playback events carry the position actually played (seconds into the segment) and whether it was
  interrupted, so the session can record the agent's turn as the user heard it.

Implementations: agent/loopback.py (a file/array input and a recording output on a session clock); LiveKit rooms
and telephony sockets implement the same two classes.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from streaming.frames import AudioFrame


@dataclass(frozen=True)
class PlaybackStarted:
    """The first frame of a segment started playing at `at` (session clock)."""

    at: float


@dataclass(frozen=True)
class PlaybackFinished:
    """A segment stopped: `position` seconds of it were played; `interrupted` when clear_buffer() cut it."""

    position: float
    interrupted: bool
    at: float  # session-clock time playback stopped
    underruns: int = 0  # times the output ran dry inside the segment before it was flushed


class AudioInput(abc.ABC):
    # True when frame timestamps are already on the session's clock (a loopback input made with that clock);
    # otherwise the session stamps frames itself, contiguously from their arrival.
    timestamps_on_session_clock: bool = False

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[AudioFrame]: ...

    async def aclose(self) -> None:
        """Stop producing frames (the iterator ends)."""


PlaybackListener = Callable[[PlaybackStarted | PlaybackFinished], None]


class AudioOutput(abc.ABC):
    """One reply segment at a time: capture_frame ... flush, then wait_for_playout; or clear_buffer to cut it."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._listeners: list[PlaybackListener] = []

    def on_playback(self, listener: PlaybackListener) -> None:
        self._listeners.append(listener)

    def remove_playback_listener(self, listener: PlaybackListener) -> None:
        """Stop telling `listener` (an output that outlives the session listening to it)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _emit(self, event: PlaybackStarted | PlaybackFinished) -> None:
        for listener in list(self._listeners):
            listener(event)

    @abc.abstractmethod
    async def capture_frame(self, frame: AudioFrame) -> None:
        """Queue a frame of the current segment for playout (the first one starts the segment)."""

    @abc.abstractmethod
    def flush(self) -> None:
        """No more frames in this segment: its playback finishes when the queued audio has played."""

    @abc.abstractmethod
    def clear_buffer(self) -> PlaybackFinished | None:
        """Stop now and drop what is queued; returns (and emits) the interrupted segment's PlaybackFinished, or
        None when nothing was playing."""

    @abc.abstractmethod
    async def wait_for_playout(self) -> PlaybackFinished:
        """Wait until the current segment has finished (played out after flush, or cleared)."""

    async def aclose(self) -> None:
        """Release the output (a no-op by default)."""
