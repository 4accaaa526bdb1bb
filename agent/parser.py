"""Streaming parser for SpeechGPT answers, driven by token ids.

A well-formed chain-of-modality answer reads

    {transcript}; [ta] {text answer}; [ua] <sosp><u><u>...<eosp><eoa>.</s>

where `<sosp>`, `<eosp>` and the units are vocabulary tokens and `[ta]`, `[ua]`, `<eoa>` are plain text spelled
with SentencePiece pieces. ASR answers are a transcript, TTS answers a unit span, text answers plain text, each
ending with `<eoa>` and/or EOS.

`ResponseParser.feed(token_id)` returns the events that token completes. Text is released as soon as it can no
longer be part of a marker. Malformed outputs never raise; each fallback is documented on `Issue` and the issue is
attached to the event where it was noticed and to the final `AnswerDone`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from agent.prompts import EOA, TA_MARKER, UA_MARKER, Task
from agent.tokenizer import SpeechGPTTokenizer


class Segment(str, enum.Enum):
    TRANSCRIPT = "transcript"  # what the user said (chain of modality, ASR)
    TEXT_ANSWER = "text_answer"  # the answer as text (chain of modality, text chat)


class Issue(str, enum.Enum):
    """What was off in a model output, and what the parser did about it."""

    MISSING_TEXT_ANSWER = "missing_text_answer"  # speech task without "[ta]": text before "[ua]"/units is the transcript
    MISSING_UA_MARKER = "missing_ua_marker"  # <sosp> without "[ua]" before it: the span is still taken as the unit answer
    MISSING_UNIT_ANSWER = "missing_unit_answer"  # speech/TTS task without any unit: text only, nothing to vocode
    MISSING_SOSP = "missing_sosp"  # units after "[ua]" without <sosp>: the span is opened implicitly
    UNTERMINATED_UNIT_SPAN = "unterminated_unit_span"  # no <eosp> before the end: units so far are kept
    LEAKED_MARKER = "leaked_marker"  # a special token, BOS/UNK or a repeated marker where none belongs: dropped
    STRAY_UNIT = "stray_unit"  # a unit id outside a unit span: dropped from the text
    UNEXPECTED_TEXT = "unexpected_text"  # text inside a unit span or between "[ua]"/<eosp> and <eoa>: dropped
    INVALID_TOKEN = "invalid_token"  # an id outside the vocabulary: dropped
    EMPTY_ANSWER = "empty_answer"  # nothing usable before the end
    TRUNCATED = "truncated"  # the stream ended (length limit, cancel) before <eoa> or EOS


@dataclass(frozen=True)
class TextDelta:
    segment: Segment
    text: str
    issues: tuple[Issue, ...] = ()


@dataclass(frozen=True)
class SegmentDone:
    segment: Segment
    text: str
    issues: tuple[Issue, ...] = ()


@dataclass(frozen=True)
class UnitSpanStarted:
    issues: tuple[Issue, ...] = ()


@dataclass(frozen=True)
class Unit:
    unit: int
    index: int  # position in the unit answer
    issues: tuple[Issue, ...] = ()


@dataclass(frozen=True)
class UnitSpanEnded:
    count: int
    issues: tuple[Issue, ...] = ()


@dataclass
class ParsedResponse:
    transcript: str = ""
    text_answer: str = ""
    units: list[int] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)  # every issue, in order of appearance, without repeats
    end_reason: str | None = None  # "eos", "eoa", "length", "cancelled", ...
    dropped_text: str = ""  # text the parser threw away (for debugging)

    @property
    def has_speech(self) -> bool:
        return bool(self.units)

    @property
    def well_formed(self) -> bool:
        return not self.issues


@dataclass(frozen=True)
class AnswerDone:
    reason: str
    response: ParsedResponse
    issues: tuple[Issue, ...] = ()


Event = TextDelta | SegmentDone | UnitSpanStarted | Unit | UnitSpanEnded | AnswerDone

_MARKERS = (TA_MARKER, UA_MARKER, EOA)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in _MARKERS))
# A suffix that may still grow into "; [ta]", "[ua]", "<eoa>" (or is whitespace that a marker would swallow).
_PARTIALS = sorted({m[:i] for m in _MARKERS for i in range(len(m))}, key=len, reverse=True)
_HOLDBACK_RE = re.compile(r"\s*(?:;\s*)?(?:" + "|".join(re.escape(p) for p in _PARTIALS) + r")\Z")


class _Phase(enum.Enum):
    TEXT = 1  # reading transcript / text answer
    AWAIT_UNITS = 2  # after "[ua]", before <sosp>
    UNITS = 3  # unit span open
    AFTER_UNITS = 4  # unit span closed, waiting for <eoa> / EOS
    DONE = 5


class ResponseParser:
    """Incremental parser over generated token ids (the prompt is not fed)."""

    def __init__(self, tokenizer: SpeechGPTTokenizer, task: Task | str = Task.SPEECH):
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        self.task = Task(task)
        self.response = ParsedResponse()
        self._phase = _Phase.TEXT
        lead = Segment.TRANSCRIPT if self.task in (Task.SPEECH, Task.ASR) else Segment.TEXT_ANSWER
        self._segment: Segment | None = lead
        self._closed: set[Segment] = set()
        self._seen: set[str] = set()  # markers seen
        self._detok = tokenizer.detokenizer()
        self._buf = ""  # decoded text not yet assigned
        self._events: list[Event] = []
        self._pending_issues: list[Issue] = []

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    # ---- public API -----------------------------------------------------------------------------------------

    def feed(self, token_id: int) -> list[Event]:
        if self.done:
            return []
        self._events = []
        t = int(token_id)
        v = self.vocab
        if not 0 <= t < v.vocab_size:
            self._issue(Issue.INVALID_TOKEN)
        elif t == v.eos:
            self._finish("eos")
        elif v.is_unit(t):
            self._on_unit(t - v.unit_base)
        elif t == v.sosp:
            self._on_sosp()
        elif t == v.eosp:
            self._on_eosp()
        elif v.is_added(t) or t in (v.bos, v.unk):
            self._issue(Issue.LEAKED_MARKER)
        else:
            self._on_text(self._detok.push(t))
        return self._flush_events()

    def finish(self, reason: str = "length") -> list[Event]:
        """End of stream without EOS (length limit, cancel): closes whatever is open."""
        if self.done:
            return []
        self._events = []
        self._finish(reason)
        return self._flush_events()

    # ---- token handlers -------------------------------------------------------------------------------------

    def _on_unit(self, unit: int) -> None:
        if self._phase is _Phase.AWAIT_UNITS:
            self._issue(Issue.MISSING_SOSP)
            self._open_span()
        if self._phase is _Phase.UNITS:
            self.response.units.append(unit)
            self._emit(Unit(unit, len(self.response.units) - 1))
        else:
            self._issue(Issue.STRAY_UNIT)

    def _on_sosp(self) -> None:
        if self._phase is _Phase.UNITS or self._phase is _Phase.AFTER_UNITS:
            self._issue(Issue.LEAKED_MARKER)
            return
        self._drain_text(final=True)
        if self.done:
            return
        if self._phase is _Phase.TEXT:
            if self.task is Task.SPEECH:
                self._issue(Issue.MISSING_UA_MARKER)
                if TA_MARKER not in self._seen:
                    self._issue(Issue.MISSING_TEXT_ANSWER)
            self._close_segment()
        self._open_span()

    def _on_eosp(self) -> None:
        if self._phase is not _Phase.UNITS:
            self._issue(Issue.LEAKED_MARKER)
            return
        self._phase = _Phase.AFTER_UNITS
        self._emit(UnitSpanEnded(len(self.response.units)))
        self._detok = self.tok.detokenizer()
        self._buf = ""

    def _on_text(self, delta: str) -> None:
        self._buf += delta
        self._drain_text(final=False)

    # ---- text and markers -----------------------------------------------------------------------------------

    def _drain_text(self, final: bool) -> None:
        """Assign buffered text to segments, acting on markers; keep back what may become a marker."""
        if final:
            self._buf += self._detok.flush()
        while not self.done:
            m = _MARKER_RE.search(self._buf)
            if m is None:
                break
            before, self._buf = self._buf[: m.start()], self._buf[m.end() :]
            before = before.rstrip()
            if before.endswith(";"):
                before = before[:-1].rstrip()
            self._take_text(before)
            self._on_marker(m.group(0))
        if self.done:
            return
        if final:
            keep = 0
        else:
            hold = _HOLDBACK_RE.search(self._buf[-64:])
            keep = len(hold.group(0)) if hold else 0
        cut = len(self._buf) - keep
        self._take_text(self._buf[:cut])
        self._buf = self._buf[cut:]

    def _take_text(self, text: str) -> None:
        if not text:
            return
        if self._phase is _Phase.TEXT and self._segment is not None:
            current = self._segment_text(self._segment)
            if not current:
                text = text.lstrip()
            if text:
                self._set_segment_text(self._segment, current + text)
                self._emit(TextDelta(self._segment, text))
        elif text.strip():
            self.response.dropped_text += text
            self._issue(Issue.UNEXPECTED_TEXT)

    def _on_marker(self, marker: str) -> None:
        if marker == EOA:
            self._buf = ""  # what follows <eoa> (the "." of the CoM format) is outside the answer
            self._finish("eoa", drain=False)
            return
        if self._phase is not _Phase.TEXT or marker in self._seen:
            self._issue(Issue.LEAKED_MARKER)
            return
        self._seen.add(marker)
        if marker == TA_MARKER:
            if self._segment is Segment.TRANSCRIPT:
                self._close_segment()
                self._segment = Segment.TEXT_ANSWER
            else:  # "[ta]" in a text answer: keep reading the same answer
                self._issue(Issue.LEAKED_MARKER)
        else:  # "[ua]"
            if self.task is Task.SPEECH and TA_MARKER not in self._seen:
                self._issue(Issue.MISSING_TEXT_ANSWER)
            self._close_segment()
            self._phase = _Phase.AWAIT_UNITS

    # ---- state changes --------------------------------------------------------------------------------------

    def _open_span(self) -> None:
        self._phase = _Phase.UNITS
        self._emit(UnitSpanStarted())
        self._detok = self.tok.detokenizer()  # text inside the span is only scanned for "<eoa>"
        self._buf = ""

    def _close_segment(self) -> None:
        seg = self._segment
        if seg is not None and seg not in self._closed:
            self._closed.add(seg)
            self._emit(SegmentDone(seg, self._segment_text(seg)))
        self._segment = None

    def _finish(self, reason: str, drain: bool = True) -> None:
        if drain:
            self._drain_text(final=True)
            if self.done:  # the flushed text held "<eoa>"
                return
        if self._phase is _Phase.UNITS:
            self._issue(Issue.UNTERMINATED_UNIT_SPAN)
            self._emit(UnitSpanEnded(len(self.response.units)))
        self._close_segment()
        r = self.response
        if reason not in ("eos", "eoa"):
            self._issue(Issue.TRUNCATED)
        if self.task is Task.SPEECH and TA_MARKER not in self._seen:
            self._issue(Issue.MISSING_TEXT_ANSWER)
        if self.task in (Task.SPEECH, Task.TTS) and not r.units:
            self._issue(Issue.MISSING_UNIT_ANSWER)
        if not (r.transcript or r.text_answer or r.units):
            self._issue(Issue.EMPTY_ANSWER)
        r.end_reason = reason
        self._phase = _Phase.DONE
        self._emit(AnswerDone(reason, r, tuple(r.issues)))

    # ---- helpers --------------------------------------------------------------------------------------------

    def _segment_text(self, seg: Segment) -> str:
        return self.response.transcript if seg is Segment.TRANSCRIPT else self.response.text_answer

    def _set_segment_text(self, seg: Segment, text: str) -> None:
        if seg is Segment.TRANSCRIPT:
            self.response.transcript = text
        else:
            self.response.text_answer = text

    def _issue(self, issue: Issue) -> None:
        self._pending_issues.append(issue)
        if issue not in self.response.issues:
            self.response.issues.append(issue)

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _flush_events(self) -> list[Event]:
        """Attach the issues noticed while handling this token to its events (or to a bare issue-only delta)."""
        events, issues = self._events, tuple(dict.fromkeys(self._pending_issues))
        self._events, self._pending_issues = [], []
        if issues:
            if events:
                events = [_with_issues(e, issues) for e in events]
            else:
                events = [IssueNoticed(issues)]
        return events


@dataclass(frozen=True)
class IssueNoticed:
    """A token produced no output but something was off (e.g. a dropped stray unit)."""

    issues: tuple[Issue, ...]


def _with_issues(event: Event, issues: tuple[Issue, ...]) -> Event:
    merged = tuple(dict.fromkeys(event.issues + issues))
    return type(event)(**{**event.__dict__, "issues": merged})


def parse_ids(tokenizer: SpeechGPTTokenizer, ids: list[int], task: Task | str = Task.SPEECH) -> ParsedResponse:
    """Parse a complete generated id sequence (without the prompt)."""
    parser = ResponseParser(tokenizer, task)
    for t in ids:
        parser.feed(t)
        if parser.done:
            break
    if not parser.done:
        parser.finish("length")
    return parser.response
