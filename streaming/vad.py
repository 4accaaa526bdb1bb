"""Turn detection on webrtcvad: frames in, SpeechStarted / SpeechAudio / Interruption / SpeechEnded out.

Pipeline per input frame (any rate, any size, int16 or float32, mono or multi-channel):
    validate -> down-mix to float32 mono -> soxr to 16 kHz -> exact `frame_ms` frames -> webrtcvad -> turn logic.

Decisions (and why):
- A frame is "heard" when webrtcvad calls it voiced AND one of its 10 ms blocks is at least
  `boundary_margin_db` above the noise floor (and above -70 dBFS). The energy gate removes webrtcvad's
  hangover (it keeps saying "voiced" for up to ~150 ms after any sound, so a 20 ms click would otherwise
  count as 100+ ms of speech) and its false positives on steady noise at the floor level.
- Smoothing, N of M: a turn starts when at least N = ceil(min_speech_s / frame) of the last
  M = round(onset_window_s / frame) frames are heard (defaults: 6 of 15 frames of 20 ms, i.e. 120 ms of speech
  within 300 ms; measured: cut speech of <= 100 ms never starts a turn, 160 ms always does). Counting over a
  window, not a run, rides over the holes inside words (stop closures, one-frame misses); isolated blips
  never reach N. In a turn's trailing silence the same rule (N heard frames since the silence began, within
  the last M) resumes the turn.
- Warm-up: a fresh webrtcvad calls its first ~70-180 ms of any non-silent audio speech while its noise model
  settles (measured: white and brown noise from -96 to -40 dBFS, all modes and frame sizes; digital silence
  does not start the settling). So the first `warmup_s` of non-silent audio can never start a turn on its own;
  its heard frames still count when placing an onset that continues past it.
- Noise floor: the 10th percentile of the 10 ms block energies heard outside turns over the last 2 s (the
  quietest block so far when speech starts at once). 9 dB above it was the best margin on white and brown
  noise at -60..-40 dBFS.
- Boundaries: the onset is placed by walking back from the N-of-M trigger through heard frames (bridging
  gaps of up to 100 ms), then in 10 ms blocks to the first block above the threshold (up to 100 ms further
  back); the offset is the end of the last block above the threshold at or before the last heard frame
  (searching 300 ms back), extended forward over up to 80 ms for a weak final fricative webrtcvad missed.
  Both walks bridge quiet gaps of up to 50 ms (stop closures). The threshold is max(noise floor +
  `boundary_margin_db`, loudest block of the turn - `boundary_range_db`, -70 dBFS): the second term keeps a
  synthesiser's or room's faint tail 40 dB under the speech out of the turn. `refine_boundaries=False`
  reports the heard frames' edges instead (webrtcvad's raw edges were 20-200 ms late on the fixtures).
- End of turn: decided at the first frame whose end is at least the end-of-turn silence after the offset
  (so `decided_at - offset` is in [silence, silence + one frame], or later when the silence asked for is
  shorter than the time taken to notice the silence: one frame past the last heard frame). A `TurnModel`,
  consulted each time silence starts, can shorten or extend that wait for this pause.
- Audio: `SpeechStarted.pre_roll` is the audio just before the onset; from the onset on, every sample of
  the turn, including its pauses and the trailing silence up to `decided_at`, arrives in `SpeechAudio`
  events (16 kHz mono float32, contiguous), so the unit extractor sees the turn exactly once.
- Tentative end of turn (`pause_silence_s`, off by default): once the offset is final and that much silence
  follows it, `SpeechPaused` (an agent may start its reply); speech resuming in the same turn gives
  `SpeechResumed`, and otherwise the `SpeechEnded` that follows carries the same offset.
- Interruption: while `set_agent_speaking(True)` is in effect, heard time inside a turn is added up; once it
  reaches `min_interruption_s`, one `Interruption` is emitted for that turn. Stopping the agent resets the count.
- Bad frames (wrong dtype/width, NaN/Inf, zero length, channel or sample-rate change, a timestamp equal to
  the previous frame's or more than 0.1 s before its end): `push` returns `[FrameRejected(error)]` for that
  frame and changes nothing else, so the stream goes on with the next frame. With
  `VadConfig(raise_on_bad_frame=True)` it raises the `BadFrameError` instead, again leaving the detector
  usable. `reset()` starts a new stream (new format or clock).
- Long turns: at `max_turn_s` after the onset the turn is ended (reason "max_turn"); if the user keeps
  talking, a new turn starts under the usual onset rule.

webrtcvad and soxr are imported when a detector is built, not at module import (the GPU machines lack them).
"""

from __future__ import annotations

import logging
import math
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Union

import numpy as np

from streaming.frames import (
    AudioFrame,
    BadFrameError,
    FrameValidator,
    Rechunker,
    Resampler,
    RESAMPLER_QUALITIES,
    float32_to_int16,
)

logger = logging.getLogger(__name__)

VAD_SAMPLE_RATE = 16000  # webrtcvad runs here; SpeechAudio is delivered here (what the unit extractor takes)
BLOCK_S = 0.010  # energy block for boundary placement
BLOCK_SAMPLES = int(VAD_SAMPLE_RATE * BLOCK_S)
SILENT_DB = -100.0  # energy of a block of digital zeros
ABSOLUTE_THRESHOLD_DB = -70.0  # nothing quieter than this counts as speech when placing boundaries
FLOOR_WINDOW_S = 2.0  # the noise floor is measured over the last 2 s of non-speech heard outside turns...
FLOOR_PERCENTILE = 10.0  # ...as this percentile of the 10 ms block energies...
FLOOR_MIN_BLOCKS = 10  # ...once there are at least this many blocks of it
ONSET_SEARCH_BACK_S = 0.10  # how far before the first heard frame the onset may move
OFFSET_SEARCH_BACK_S = 0.30  # how far before the last heard frame the offset may move
OFFSET_SEARCH_FORWARD_S = 0.08  # how far after it (a weak final fricative webrtcvad dropped)
MAX_BLOCK_GAP_S = 0.05  # quiet gaps bridged when walking a boundary (stop closures)
MAX_BACKWARD_JUMP_S = 0.1  # input timestamps may overlap this much (jitter); more is a bad frame
ONSET_BRIDGE_S = 0.1  # unheard frames bridged when walking back from the N-of-M trigger to the first heard frame


@dataclass(frozen=True)
class VadConfig:
    """Turn-detector settings. Times in seconds."""

    aggressiveness: int = 2  # webrtcvad mode 0 (least) .. 3 (most aggressive about calling audio non-speech)
    frame_ms: int = 20  # webrtcvad frame: 10, 20 or 30 ms
    pre_roll_s: float = 0.3  # audio kept before the onset, delivered with SpeechStarted
    min_speech_s: float = 0.12  # voiced time within `onset_window_s` needed to start (or resume) a turn
    onset_window_s: float = 0.3  # the ring of recent decisions the N-of-M rule looks at
    end_of_turn_silence_s: float = 0.5  # silence after the offset that ends a turn (TurnModel may change it)
    # silence after the offset that makes a tentative end of turn (SpeechPaused; SpeechResumed if speech comes
    # back before the end): lets an agent start its reply early. None = no tentative ends.
    pause_silence_s: float | None = None
    max_turn_s: float = 30.0  # a turn is ended this long after its onset
    min_interruption_s: float = 0.5  # voiced time while the agent speaks before Interruption fires
    warmup_s: float = 0.2  # first non-silent audio that cannot start a turn alone (webrtcvad settling)
    energy_gate: bool = True  # a webrtcvad "voiced" frame counts only with a block above the noise threshold
    refine_boundaries: bool = True  # place onset/offset with block energy (see module doc)
    boundary_margin_db: float = 9.0  # block energy above the noise floor that counts as sound
    boundary_range_db: float = 40.0  # ...and no more than this below the turn's loudest block
    resample_quality: str = "HQ"  # soxr quality to reach 16 kHz
    raise_on_bad_frame: bool = False  # False: FrameRejected event; True: raise BadFrameError

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"VadConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.aggressiveness not in (0, 1, 2, 3) or isinstance(self.aggressiveness, bool):
            bad("aggressiveness", "0, 1, 2 or 3")
        if self.frame_ms not in (10, 20, 30) or isinstance(self.frame_ms, bool):
            bad("frame_ms", "10, 20 or 30")
        for name in ("pre_roll_s", "end_of_turn_silence_s", "min_interruption_s", "warmup_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                bad(name, "a finite number >= 0")
        if self.pause_silence_s is not None and not (
            isinstance(self.pause_silence_s, (int, float)) and math.isfinite(self.pause_silence_s) and self.pause_silence_s >= 0
        ):
            bad("pause_silence_s", "None or a finite number >= 0")
        for name in ("min_speech_s", "onset_window_s", "max_turn_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                bad(name, "a finite number > 0")
        if self.min_speech_frames > self.onset_window_frames:
            bad("min_speech_s", f"<= onset_window_s ({self.onset_window_s})")
        for name in ("boundary_margin_db", "boundary_range_db"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "a finite number")
        if self.resample_quality not in RESAMPLER_QUALITIES:
            bad("resample_quality", f"one of {RESAMPLER_QUALITIES}")

    @property
    def frame_s(self) -> float:
        return self.frame_ms / 1000.0

    @property
    def onset_window_frames(self) -> int:
        """M of the N-of-M rule."""
        return max(1, round(self.onset_window_s / self.frame_s))

    @property
    def min_speech_frames(self) -> int:
        """N of the N-of-M rule."""
        return max(1, math.ceil(self.min_speech_s / self.frame_s - 1e-9))

    @property
    def warmup_frames(self) -> int:
        return math.ceil(self.warmup_s / self.frame_s - 1e-9)


# ---- events ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechStarted:
    """A turn began at `onset` (stream time); it was detected at `detected_at` (end of the deciding frame).

    `pre_roll` is the audio in [onset - pre_roll_s, onset) (16 kHz mono float32; shorter at the stream start,
    None when there is none). The audio from the onset on follows in SpeechAudio events."""

    onset: float
    detected_at: float
    pre_roll: AudioFrame | None


@dataclass(frozen=True)
class SpeechAudio:
    """Audio of the current turn, 16 kHz mono float32, contiguous from the onset to the end decision."""

    frame: AudioFrame


@dataclass(frozen=True)
class SpeechEnded:
    """The turn [onset, offset] ended; the end was decided at `decided_at` (offset + the silence waited).

    reason: "silence" (end-of-turn silence), "turn_model" (the TurnModel changed the wait), "max_turn",
    or "stream_end" (flush)."""

    onset: float
    offset: float
    decided_at: float
    reason: str

    @property
    def duration(self) -> float:
        return self.offset - self.onset

    @property
    def silence_waited(self) -> float:
        return self.decided_at - self.offset


@dataclass(frozen=True)
class SpeechPaused:
    """A tentative end of turn: `pause_silence_s` of silence after `offset` (final as placed), noticed at
    `detected_at`. Either SpeechEnded follows with this same offset, or SpeechResumed does."""

    onset: float
    offset: float
    detected_at: float


@dataclass(frozen=True)
class SpeechResumed:
    """Speech came back after a SpeechPaused, inside the same turn (detected at the end of `detected_at`'s frame)."""

    onset: float
    detected_at: float


@dataclass(frozen=True)
class Interruption:
    """The user has spoken for `speech_s` (>= min_interruption_s) while the agent was speaking (barge-in)."""

    onset: float
    detected_at: float
    speech_s: float


@dataclass(frozen=True)
class FrameRejected:
    """A bad input frame was dropped; the detector goes on with the next frame."""

    error: BadFrameError
    timestamp: float | None


VadEvent = Union[SpeechStarted, SpeechAudio, SpeechPaused, SpeechResumed, SpeechEnded, Interruption, FrameRejected]


# ---- the seam for a smarter turn model ----------------------------------------------------------------------
@dataclass(frozen=True)
class SilenceContext:
    """What a TurnModel sees when silence starts inside a turn."""

    onset: float
    silence_start: float  # the offset as placed so far
    now: float  # end of the frame where the silence was noticed
    speech_s: float  # voiced time in the turn so far
    default_wait_s: float  # config.end_of_turn_silence_s
    audio: np.ndarray  # the turn so far, 16 kHz mono float32, from the onset to `now`


class TurnModel(Protocol):
    """Consulted each time silence starts inside a turn. Returns how long (seconds after `silence_start`) to
    wait before ending the turn: 0 ends it now, more extends it, None keeps `default_wait_s`. Speech resuming
    cancels the wait as usual. An exception or an invalid value is logged and the default is used."""

    def __call__(self, context: SilenceContext) -> float | None: ...


# ---- the detector -------------------------------------------------------------------------------------------
@dataclass
class _FrameRecord:
    t0: float
    t1: float
    samples: np.ndarray  # 16 kHz mono float32
    heard: bool  # webrtcvad's decision, energy-gated
    voiced: bool  # ...and not in the warm-up: what the N-of-M rule counts
    agent_speaking: bool
    block_db: np.ndarray  # energy of each 10 ms block
    quietest_db: float  # block_db.min()


@dataclass
class _Turn:
    onset: float
    last_voiced_end: float  # end of webrtcvad's last voiced frame (raw offset)
    voiced_s: float = 0.0
    peak_db: float = SILENT_DB  # loudest 10 ms block since the onset
    interrupt_s: float = 0.0
    interrupted: bool = False
    trailing: bool = False
    offset: float = 0.0  # placed offset while trailing
    offset_final: bool = False
    wait_s: float = 0.0
    wait_reason: str = "silence"
    paused: bool = False  # a SpeechPaused was emitted for the current silence
    audio: list[np.ndarray] = field(default_factory=list)


class VadDetector:
    """Streaming turn detector. Feed `push(frame)`; read the returned events. See the module doc."""

    def __init__(self, config: VadConfig | None = None, turn_model: TurnModel | Callable | None = None) -> None:
        self.config = config or VadConfig()
        self.turn_model = turn_model
        self._agent_speaking = False
        self.rejected_frames = 0
        self.reset()

    # -- public ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new stream (any rate/channels); the agent-speaking flag is kept."""
        import webrtcvad  # lazy: not on the GPU machines

        cfg = self.config
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self._validator = FrameValidator(max_backward_s=MAX_BACKWARD_JUMP_S)
        self._resampler = Resampler(VAD_SAMPLE_RATE, quality=cfg.resample_quality)
        self._rechunker = Rechunker(cfg.frame_ms)
        self._warm_frames = 0
        self._warmup_frames = cfg.warmup_frames
        history_s = cfg.pre_roll_s + cfg.onset_window_s + cfg.warmup_s + OFFSET_SEARCH_BACK_S + 0.5
        self._history: deque[_FrameRecord] = deque(maxlen=math.ceil(history_s / cfg.frame_s) + 2)
        self._floor_window: deque[float] = deque(maxlen=round(FLOOR_WINDOW_S / BLOCK_S))
        self._floor_db: float | None = None  # cache of the percentile, cleared when the window changes
        self._ring: deque[tuple[float, bool]] = deque(maxlen=cfg.onset_window_frames)
        self._barrier = -math.inf  # frames starting before this belong to an earlier turn
        self._turn: _Turn | None = None
        self._last_t1: float | None = None

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    @property
    def agent_speaking(self) -> bool:
        return self._agent_speaking

    def set_agent_speaking(self, speaking: bool) -> None:
        """Whether the agent is playing audio now; applies to the frames pushed from now on."""
        self._agent_speaking = bool(speaking)
        if not speaking and self._turn is not None:
            self._turn.interrupt_s = 0.0

    def push(self, frame: AudioFrame) -> list[VadEvent]:
        try:
            frame = self._validator.check(frame)
        except BadFrameError as err:
            self.rejected_frames += 1
            if self.config.raise_on_bad_frame:
                raise
            return [FrameRejected(err, err.timestamp)]
        events: list[VadEvent] = []
        for piece in self._resampler.push(frame.to_float32_mono()):
            for vad_frame in self._rechunker.push(piece):
                self._process(vad_frame, events)
        return events

    def flush(self) -> list[VadEvent]:
        """End of stream: drain the resampler, close an open turn (reason "stream_end"), then reset."""
        events: list[VadEvent] = []
        for piece in self._resampler.flush():
            for vad_frame in self._rechunker.push(piece):
                self._process(vad_frame, events)
        # a partial last frame (< frame_ms) is dropped: webrtcvad takes whole frames only
        turn = self._turn
        if turn is not None and self._last_t1 is not None:
            if turn.trailing:
                offset = turn.offset
            else:
                offset = self._place_offset(turn, self._last_t1) if self.config.refine_boundaries else self._last_t1
            events.append(SpeechEnded(turn.onset, offset, self._last_t1, "stream_end"))
        self.reset()
        return events

    # -- per 16 kHz frame --------------------------------------------------------------------------------------------
    def _process(self, frame: AudioFrame, events: list[VadEvent]) -> None:
        cfg = self.config
        samples = frame.samples
        t0 = frame.timestamp
        t1 = t0 + cfg.frame_s
        self._last_t1 = t1
        pcm16 = float32_to_int16(samples)
        raw = bool(self._vad.is_speech(pcm16.tobytes(), VAD_SAMPLE_RATE))
        blocks = samples.reshape(-1, BLOCK_SAMPLES).astype(np.float64)
        block_db = np.maximum(10.0 * np.log10(np.mean(blocks * blocks, axis=1) + 1e-12), SILENT_DB)
        quietest = float(block_db.min())
        if self._turn is None and not raw:
            # the floor is learnt from what webrtcvad calls non-speech; digital zeros are "no signal", not noise
            sounding = block_db[block_db > SILENT_DB]
            if sounding.size:
                self._floor_window.extend(sounding.tolist())
                self._floor_db = None
        heard = raw and (not cfg.energy_gate or float(block_db.max()) >= self._gate_db())
        voiced = heard
        if self._warm_frames < self._warmup_frames and pcm16.any():
            self._warm_frames += 1
            voiced = False
        record = _FrameRecord(t0, t1, samples, heard, voiced, self._agent_speaking, block_db, quietest)
        self._history.append(record)
        self._ring.append((t0, voiced))

        turn = self._turn
        if turn is None:
            if self._voiced_in_ring(self._barrier) >= cfg.min_speech_frames:
                self._start_turn(t1, events)
            return

        events.append(SpeechAudio(frame))
        turn.peak_db = max(turn.peak_db, float(block_db.max()))
        if self.turn_model is not None:
            turn.audio.append(samples)
        self._count_interruption(turn, record, t1, events)
        if voiced:
            turn.voiced_s += cfg.frame_s
        if not turn.trailing:
            if voiced:
                turn.last_voiced_end = t1
            else:
                self._start_trailing(turn, t1)
        elif voiced and self._voiced_in_ring(turn.last_voiced_end) >= cfg.min_speech_frames:
            turn.trailing = False  # speech resumed
            turn.last_voiced_end = t1
            if turn.paused:
                turn.paused = False
                events.append(SpeechResumed(turn.onset, t1))
        elif not turn.offset_final:
            self._update_offset(turn, t1)

        ending = turn.trailing and t1 - turn.offset >= turn.wait_s - 1e-9
        if (turn.trailing and not turn.paused and not ending and cfg.pause_silence_s is not None and turn.offset_final
                and t1 - turn.offset >= cfg.pause_silence_s - 1e-9):
            turn.paused = True
            events.append(SpeechPaused(turn.onset, turn.offset, t1))
        if ending:
            self._end_turn(turn.offset, t1, turn.wait_reason, turn.last_voiced_end, events)
        elif t1 - turn.onset >= cfg.max_turn_s - 1e-9:
            offset = turn.offset if turn.trailing else t1
            self._end_turn(offset, t1, "max_turn", t1, events)

    def _voiced_in_ring(self, since: float) -> int:
        return sum(1 for start, voiced in self._ring if voiced and start >= since - 1e-9)

    def _start_turn(self, now: float, events: list[VadEvent]) -> None:
        cfg = self.config
        history = list(self._history)
        first_voiced = next(start for start, voiced in self._ring if voiced and start >= self._barrier - 1e-9)
        # walk back through heard frames (warm-up ones included), bridging stop closures of up to ONSET_BRIDGE_S
        i = next(k for k, rec in enumerate(history) if abs(rec.t0 - first_voiced) < 1e-9)
        max_gap = round(ONSET_BRIDGE_S / cfg.frame_s)
        earliest, k, gap = i, i - 1, 0
        while k >= 0 and history[k].t0 >= self._barrier - 1e-9:
            if history[k].heard:
                earliest, gap = k, 0
            else:
                gap += 1
                if gap > max_gap:
                    break
            k -= 1
        onset = history[earliest].t0
        if cfg.refine_boundaries:
            onset = self._place_onset(history, onset, now)
        turn = _Turn(onset=onset, last_voiced_end=now)
        self._turn = turn
        pre_roll = self._slice(history, onset - cfg.pre_roll_s, onset) if cfg.pre_roll_s > 0 else None
        events.append(SpeechStarted(onset, now, pre_roll))
        catch_up = self._slice(history, onset, now)
        if catch_up is not None:
            events.append(SpeechAudio(catch_up))
            if self.turn_model is not None:
                turn.audio.append(catch_up.samples)
        for rec in history:
            if rec.t1 > onset + 1e-9:
                turn.peak_db = max(turn.peak_db, float(rec.block_db.max()))
                if rec.voiced:
                    turn.voiced_s += cfg.frame_s
                self._count_interruption(turn, rec, now, events)

    def _count_interruption(self, turn: _Turn, rec: _FrameRecord, now: float, events: list[VadEvent]) -> None:
        if not rec.agent_speaking:
            turn.interrupt_s = 0.0
            return
        if rec.voiced:
            turn.interrupt_s += self.config.frame_s
        if not turn.interrupted and turn.interrupt_s >= self.config.min_interruption_s - 1e-9 and (
            rec.voiced or self.config.min_interruption_s == 0
        ):
            turn.interrupted = True
            events.append(Interruption(turn.onset, now, turn.interrupt_s))

    def _start_trailing(self, turn: _Turn, now: float) -> None:
        cfg = self.config
        turn.trailing = True
        turn.offset_final = False
        self._update_offset(turn, now)
        turn.wait_s, turn.wait_reason = cfg.end_of_turn_silence_s, "silence"
        if self.turn_model is None:
            return
        audio = np.concatenate(turn.audio) if turn.audio else np.zeros(0, np.float32)
        context = SilenceContext(turn.onset, turn.offset, now, turn.voiced_s, cfg.end_of_turn_silence_s, audio)
        try:
            wait = self.turn_model(context)
        except Exception:  # a broken turn model must not kill the session
            logger.exception("turn model failed; using the default end-of-turn silence")
            return
        if wait is None:
            return
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not math.isfinite(wait) or wait < 0:
            logger.warning("turn model returned %r (expected seconds >= 0 or None); using the default", wait)
            return
        if float(wait) != cfg.end_of_turn_silence_s:
            turn.wait_s, turn.wait_reason = float(wait), "turn_model"

    def _update_offset(self, turn: _Turn, now: float) -> None:
        if not self.config.refine_boundaries:
            turn.offset, turn.offset_final = turn.last_voiced_end, True
            return
        turn.offset = self._place_offset(turn, now)
        turn.offset_final = now >= turn.last_voiced_end + OFFSET_SEARCH_FORWARD_S - 1e-9

    def _end_turn(self, offset: float, decided_at: float, reason: str, barrier: float,
                  events: list[VadEvent]) -> None:
        turn = self._turn
        events.append(SpeechEnded(turn.onset, max(offset, turn.onset), decided_at, reason))
        self._turn = None
        self._barrier = barrier

    # -- boundary placement ------------------------------------------------------------------------------------------
    def _noise_floor_db(self) -> float:
        if self._floor_db is None:
            if len(self._floor_window) < FLOOR_MIN_BLOCKS:
                # not enough non-speech heard yet (stream start, speech right after digital silence):
                # the quietest block heard so far is the best guess
                return min((rec.quietest_db for rec in self._history), default=SILENT_DB)
            window = np.fromiter(self._floor_window, float, len(self._floor_window))
            self._floor_db = float(np.percentile(window, FLOOR_PERCENTILE))
        return self._floor_db

    def _gate_db(self) -> float:
        return max(self._noise_floor_db() + self.config.boundary_margin_db, ABSOLUTE_THRESHOLD_DB)

    def _threshold_db(self, peak_db: float) -> float:
        floor = self._noise_floor_db()
        cfg = self.config
        return max(floor + cfg.boundary_margin_db, peak_db - cfg.boundary_range_db, ABSOLUTE_THRESHOLD_DB)

    @staticmethod
    def _blocks(history: list[_FrameRecord]) -> tuple[np.ndarray, np.ndarray]:
        frame_starts = np.fromiter((rec.t0 for rec in history), float, len(history))
        offsets = BLOCK_S * np.arange(len(history[0].block_db))  # every frame has the same number of blocks
        starts = (frame_starts[:, None] + offsets[None, :]).ravel()
        energies = np.concatenate([rec.block_db for rec in history])
        return starts, energies

    def _place_onset(self, history: list[_FrameRecord], raw_onset: float, now: float) -> float:
        starts, energies = self._blocks(history)
        peak = float(energies[starts >= raw_onset - 1e-9].max(initial=SILENT_DB))
        loud = energies >= self._threshold_db(peak)
        candidates = np.flatnonzero(loud & (starts >= raw_onset - 1e-9) & (starts < now - 1e-9))
        if len(candidates) == 0:
            return raw_onset  # webrtcvad hears speech the energy cannot separate from the floor: trust it
        first = int(candidates[0])
        earliest = max(raw_onset - ONSET_SEARCH_BACK_S, self._barrier)
        best, gap, k = first, 0, first - 1
        max_gap = round(MAX_BLOCK_GAP_S / BLOCK_S)
        while k >= 0 and starts[k] >= earliest - 1e-9:
            if loud[k]:
                best, gap = k, 0
            else:
                gap += 1
                if gap > max_gap:
                    break
            k -= 1
        return float(starts[best])

    def _place_offset(self, turn: _Turn, now: float) -> float:
        history = list(self._history)
        starts, energies = self._blocks(history)
        ends = starts + BLOCK_S
        loud = energies >= self._threshold_db(turn.peak_db)
        raw = turn.last_voiced_end
        lowest = max(raw - OFFSET_SEARCH_BACK_S, turn.onset)
        before = np.flatnonzero(loud & (starts >= lowest - 1e-9) & (ends <= raw + 1e-9))
        if len(before) == 0:
            return raw
        best = int(before[-1])
        limit = min(raw + OFFSET_SEARCH_FORWARD_S, now)
        gap, k = 0, best + 1
        max_gap = round(MAX_BLOCK_GAP_S / BLOCK_S)
        while k < len(starts) and ends[k] <= limit + 1e-9:
            if loud[k]:
                best, gap = k, 0
            else:
                gap += 1
                if gap > max_gap:
                    break
            k += 1
        return float(ends[best])

    @staticmethod
    def _slice(history: list[_FrameRecord], start: float, end: float) -> AudioFrame | None:
        pieces: list[np.ndarray] = []
        first_ts: float | None = None
        for rec in history:
            if rec.t1 <= start + 1e-9 or rec.t0 >= end - 1e-9:
                continue
            n = rec.samples.shape[0]
            i0 = max(0, round((start - rec.t0) * VAD_SAMPLE_RATE))
            i1 = min(n, round((end - rec.t0) * VAD_SAMPLE_RATE))
            if i1 <= i0:
                continue
            if first_ts is None:
                first_ts = rec.t0 + i0 / VAD_SAMPLE_RATE
            pieces.append(rec.samples[i0:i1])
        if not pieces:
            return None
        return AudioFrame(np.concatenate(pieces).astype(np.float32, copy=False), VAD_SAMPLE_RATE, 1, first_ts)


# ---- cost measurement for the unit-benchmark engineer ---------------------------------------------------------------
_QUESTION_WAV = Path(__file__).resolve().parent / "assets" / "question.wav"


def _benchmark_audio() -> np.ndarray:
    """The demo question (real speech with silence around it) as int16, or seeded noise bursts without it."""
    try:
        with wave.open(str(_QUESTION_WAV), "rb") as wav:
            if wav.getframerate() == VAD_SAMPLE_RATE and wav.getnchannels() == 1 and wav.getsampwidth() == 2:
                return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.int16)
    except (OSError, wave.Error):
        pass
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(VAD_SAMPLE_RATE * 2) * 300
    audio[VAD_SAMPLE_RATE // 2: VAD_SAMPLE_RATE] *= 30
    return np.clip(audio, -32768, 32767).astype(np.int16)


def vad_cost_per_frame(num_frames: int = 1000, *, config: VadConfig | None = None,
                       sample_rate: int = VAD_SAMPLE_RATE) -> float:
    """Seconds of CPU wall time per `frame_ms` input frame through the whole detector (validation, resampling
    when `sample_rate` != 16 kHz, rechunking, webrtcvad, turn logic, events), measured on looped real speech."""
    config = config or VadConfig()
    audio = _benchmark_audio()
    if sample_rate != VAD_SAMPLE_RATE:
        resampler = Resampler(sample_rate)
        parts = resampler.push(AudioFrame(audio, VAD_SAMPLE_RATE)) + resampler.flush()
        audio = np.concatenate([p.samples for p in parts])
    step = sample_rate * config.frame_ms // 1000
    reps = math.ceil(num_frames * step / len(audio)) + 1
    audio = np.tile(audio, reps)
    frames = [AudioFrame(audio[i * step:(i + 1) * step], sample_rate, 1, i * config.frame_s)
              for i in range(num_frames)]
    detector = VadDetector(config)
    start = time.perf_counter()
    for frame in frames:
        detector.push(frame)
    return (time.perf_counter() - start) / num_frames
