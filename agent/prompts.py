"""SpeechGPT's prompt format, exactly as the official inference code builds it.

Source of every string: the released `speechgpt/src/infer/cli_infer.py`, as described in docs/speechgpt-format.md,
System prompt; docs/speechgpt-format.md, Turn template; docs/speechgpt-format.md, Task wording.
The model was trained on these bytes; a changed space changes the token ids it sees.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

# Note the double space after "University." and the trailing newline: both are in the released prefix.
META_INSTRUCTION = (
    "You are an AI assistant whose name is SpeechGPT.\n"
    "- SpeechGPT is a intrinsic cross-modal conversational language model that is developed by Fudan University."
    "  SpeechGPT can understand and communicate fluently with human through speech or text chosen by the user.\n"
    "- It can perceive cross-modal inputs and generate cross-modal outputs.\n"
)

# A space before <eoh>, then ". ", and a trailing space after "[SpeechGPT]:" (the tokenizer keeps it as a lone "▁").
TURN_TEMPLATE = "[Human]: {question} <eoh>. [SpeechGPT]: "

SOSP, EOSP = "<sosp>", "<eosp>"
HUMAN, SPEECHGPT, EOH = "[Human]", "[SpeechGPT]", "<eoh>"
# Plain text (spelled with SentencePiece pieces), not vocabulary tokens.
EOA = "<eoa>"
TA_MARKER, UA_MARKER = "[ta]", "[ua]"

# The official preprocess splits the user string on this literal and substitutes audio files by their units.
INPUT_SEPARATOR = "is input:"

NUM_UNITS = 1000


class Task(str, enum.Enum):
    """What the user asks for; decides the question wording and what a well-formed answer looks like."""

    SPEECH = "speech"  # speech in -> chain of modality: transcript; [ta] text answer; [ua] units
    ASR = "asr"  # speech in -> transcript (plain text)
    TTS = "tts"  # text in -> units
    TEXT = "text"  # text in -> text answer


# The phrasings the SpeechGPT README uses for the cross-modal tasks.
ASR_INSTRUCTION = "Recognize this speech, this is input: "
TTS_INSTRUCTION = "Read this sentence aloud, this is input: "


def dedup_units(units: Iterable[int]) -> list[int]:
    """Collapse runs of identical units ("reduced units", what SpeechGPT reads and writes)."""
    out: list[int] = []
    for u in units:
        u = int(u)
        if not out or out[-1] != u:
            out.append(u)
    return out


def render_units(units: Sequence[int], dedup: bool = True) -> str:
    """`<sosp><u1><u2>...<eosp>`: no separators, consecutive duplicates removed by default."""
    seq = dedup_units(units) if dedup else [int(u) for u in units]
    for i, u in enumerate(seq):
        if not 0 <= u < NUM_UNITS:
            raise ValueError(f"unit at position {i} is {u}; expected 0 <= unit < {NUM_UNITS}")
    return SOSP + "".join(f"<{u}>" for u in seq) + EOSP


def build_prompt(question: str) -> str:
    """The full single-turn prompt: system prefix + turn template."""
    return META_INSTRUCTION + TURN_TEMPLATE.format(question=question)


def question_for(task: Task, *, units: Sequence[int] | None = None, text: str | None = None) -> str:
    """The `{question}` of the turn template for a task, as the official preprocess would produce it.

    The official code splits "...this is input: path.wav" on "is input:" and replaces the stripped path by
    its units, so the space after the colon disappears for speech inputs but stays for text inputs.
    """
    task = Task(task)
    if task in (Task.SPEECH, Task.ASR):
        if units is None or len(units) == 0:
            raise ValueError(f"task {task.value!r} needs speech units, got none")
        rendered = render_units(units)
        return rendered if task is Task.SPEECH else ASR_INSTRUCTION.rstrip(" ") + rendered
    if text is None or not text.strip():
        raise ValueError(f"task {task.value!r} needs a non-empty text input")
    return TTS_INSTRUCTION + text if task is Task.TTS else text


def prompt_for(task: Task, *, units: Sequence[int] | None = None, text: str | None = None) -> str:
    return build_prompt(question_for(task, units=units, text=text))


def render_answer(
    task: Task,
    *,
    transcript: str = "",
    text_answer: str = "",
    units: Sequence[int] = (),
) -> str:
    """A well-formed answer in the released training format (what the model is expected to write).

    Chain of modality: `{transcript}; [ta] {text answer}; [ua] <sosp>...<eosp><eoa>.` (the tiny bundle is trained
    on these; tests use them as golden outputs).
    """
    task = Task(task)
    if task is Task.SPEECH:
        return f"{transcript}; {TA_MARKER} {text_answer}; {UA_MARKER} {render_units(units)}{EOA}."
    # Cross-modal (stage-2) records end with "<eoa>" and no full stop.
    if task is Task.ASR:
        return f"{transcript}{EOA}"
    if task is Task.TTS:
        return f"{render_units(units)}{EOA}"
    return f"{text_answer}{EOA}"
