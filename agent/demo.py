"""`speechgpt-rt demo` (what `make demo` runs): a live two-turn conversation on the embedded default.

Makes the tiny bundle if it is missing, then runs `chat` on the shipped spoken question and a follow-up
(streaming/assets: espeak-ng speech, texts in the .txt files next to them), in real time: VAD-gated turns,
speculative prefill, preemptive replies, streaming answers. It prints what SpeechGPT heard and answered per turn and
the per-turn metrics table, and writes the reply WAVs and a stereo conversation.wav. With the tiny bundle the
weights are random and the LLM only learned the answer format, so the answers are canned and the audio is noise;
the point is that every stage runs, live.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "streaming" / "assets"
QUESTION_WAV = ASSETS / "question.wav"
FOLLOW_UP_WAV = ASSETS / "follow_up.wav"

REAL_CHECKPOINTS_HINT = """\
To talk to the real SpeechGPT instead, lay out the released files as README.md "Model files" describes and run
  speechgpt-rt chat YOUR.wav [MORE.wav ...] --model-dir /path/to/speechgpt-release --device cuda
(or convert them once with `speechgpt-rt convert` and point --model-dir at the converted bundle)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=Path(".cache/tiny-bundle"), help="tiny bundle (made here if missing)")
    parser.add_argument("--output-dir", type=Path, default=Path("out/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="virtual clock instead of real time")


def run(args) -> int:
    from agent import chat
    from agent.tiny import make_tiny_bundle

    if not (args.bundle / "tiny_bundle.json").is_file():
        print(f"[demo] writing the tiny bundle to {args.bundle} (once; a few seconds of format training)")
        make_tiny_bundle(args.bundle, seed=0)
    for wav in (QUESTION_WAV, FOLLOW_UP_WAV):
        text = wav.with_suffix(".txt").read_text(encoding="utf-8").strip()
        print(f"[demo] user turn: {wav.name} (espeak-ng speech of: {text!r})")
    parser = argparse.ArgumentParser()
    chat.add_arguments(parser)
    argv = [str(QUESTION_WAV), str(FOLLOW_UP_WAV), "-o", str(args.output_dir), "--model-dir", str(args.bundle),
            "--seed", str(args.seed)] + (["--fast"] if args.fast else [])
    code = chat.run(parser.parse_args(argv))
    print("\n" + REAL_CHECKPOINTS_HINT)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechgpt-rt demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
