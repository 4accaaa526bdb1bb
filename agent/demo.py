"""`speechgpt-rt demo` (what `make demo` runs): the whole pipeline, on our decode engine, on a real spoken question.

Makes the tiny bundle if it is missing, answers the shipped recording (espeak-ng speech, text in question.txt) and
writes the reply WAV. With the tiny bundle the weights are random and the LLM only learned the answer format, so
the printed answer is canned and the reply audio is noise; the point is that every stage runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.bundle import resolve_bundle

ASSETS = Path(__file__).resolve().parent.parent / "streaming" / "assets"
QUESTION_WAV = ASSETS / "question.wav"
QUESTION_TXT = ASSETS / "question.txt"

REAL_CHECKPOINTS_HINT = """\
To run the real SpeechGPT instead, lay out the released files as README.md "Model files" describes and run
  speechgpt-rt respond YOUR.wav -o reply.wav --model-dir /path/to/speechgpt-release --device cuda
(or convert them once with `speechgpt-rt convert` and point --model-dir at the converted bundle)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=Path(".cache/tiny-bundle"), help="tiny bundle (made here if missing)")
    parser.add_argument("--output", type=Path, default=Path("out/demo_reply.wav"))
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from agent import respond
    from agent.tiny import TINY_NOTICE, make_tiny_bundle

    if not (args.bundle / "tiny_bundle.json").is_file():
        print(f"[demo] writing the tiny bundle to {args.bundle} (once; a few seconds of format training)")
        make_tiny_bundle(args.bundle, seed=0)
    paths = resolve_bundle(args.bundle)
    question = QUESTION_TXT.read_text(encoding="utf-8").strip()
    print(f"[demo] question audio: {QUESTION_WAV.name} (espeak-ng speech of: {question!r})")
    code = respond.run(argparse.Namespace(
        input=str(QUESTION_WAV), output=args.output, model_dir=args.bundle, mode="speech", seed=args.seed,
        device="cpu", max_new_tokens=respond.SPEECHGPT_MAX_NEW_TOKENS, json=None, generator="engine", speech_head=False,
    ))
    if paths.is_tiny:
        print("\n" + "!" * 100)
        print(TINY_NOTICE)
        print(f"So the transcript and answer above are canned sentences, and {args.output} is noise, not speech.")
        print("!" * 100)
    print("\n" + REAL_CHECKPOINTS_HINT)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speechgpt-rt demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
