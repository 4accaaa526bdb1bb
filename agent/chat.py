"""`speechgpt-rt chat`: a live session over the loopback transport, audio files as the user's turns.

The files are played one after the other as consecutive user turns, in real time (or on the fast clock with
`--fast`: the same timeline, without the idle waiting); each next file starts `--gap` seconds after the agent's
reply to the previous one has played. Writes one reply WAV per turn, a stereo `conversation.wav` (user left, agent
right, on the session's timeline: what a person in the room would have heard), `metrics.jsonl` (one line per turn),
and prints the transcript and answer of each turn and the per-turn metrics table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_MODEL_DIR = Path(".cache/tiny-bundle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="audio files, one user turn each (WAV/FLAC/OGG)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("out/chat"))
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help=f"release layout or converted bundle (default: the tiny bundle at {DEFAULT_MODEL_DIR}, made if missing)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--fast", action="store_true", help="virtual clock: the same timeline, as fast as compute allows")
    parser.add_argument("--single-turn", action="store_true", help="fresh context every turn (the original behaviour)")
    parser.add_argument("--seed", type=int, default=0, help="turn k samples with seed + k")
    parser.add_argument("--no-speculative", action="store_true", help="no speculative prefill while the user speaks")
    parser.add_argument("--no-preemptive", action="store_true", help="no preemptive reply at a tentative end of turn")
    parser.add_argument("--gap", type=float, default=0.5, help="silence after each reply before the next turn (s)")
    parser.add_argument("--json", type=Path, default=None, help="write every turn's metrics and a summary here")
    parser.add_argument("--prometheus-port", type=int, default=None, help="serve turn metrics for Prometheus on this port")


def _fail(message: str) -> int:
    print(f"speechgpt-rt chat: {message}", file=sys.stderr)
    return 2


def _check_args(args) -> tuple[list[np.ndarray], str | None]:
    """Everything a user can get wrong, before any model loads: (turn audio, or an error line)."""
    from agent.bundle import BundleError, resolve_bundle
    from streaming.audio_io import AudioInputError, load_audio

    turns = []
    for path in args.inputs:
        try:
            turns.append(load_audio(path).samples)
        except (AudioInputError, OSError) as exc:
            return [], str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    if args.model_dir != DEFAULT_MODEL_DIR or (args.model_dir / "tiny_bundle.json").is_file():
        try:
            resolve_bundle(args.model_dir)
        except (BundleError, OSError) as exc:
            return [], str(exc)
    if args.gap < 0:
        return [], f"--gap must be >= 0, got {args.gap}"
    if args.output_dir.exists() and not args.output_dir.is_dir():
        return [], f"{args.output_dir}: exists and is not a directory"
    return turns, None


async def converse(session, user_input, turns: list[np.ndarray], gap_s: float = 0.5, lead_s: float = 0.3,
                   max_wait_s: float = 60.0) -> None:
    """Drive a loopback session: lead silence, then each turn, waiting for the reply to it (and `gap_s`)."""

    async def drive() -> None:
        try:
            await user_input.silence(lead_s)
            for audio in turns:
                answered = len(session.turns)
                await user_input.play(audio)
                await user_input.silence_until(lambda: len(session.turns) > answered, max_wait_s)
                await user_input.silence(gap_s)
        finally:
            user_input.close()

    await asyncio.gather(session.run(), drive())


def write_outputs(out_dir: Path, session, user_input, output) -> list[Path]:
    import soundfile as sf

    from agent.loopback import render_timeline

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for turn, audio in sorted(session.replies.items()):
        path = out_dir / f"reply_{turn}.wav"
        sf.write(path, audio, 16000, subtype="FLOAT")
        written.append(path)
    pieces = user_input.timeline + output.timeline
    if pieces:
        start = min(p.start for p in pieces)
        end = max(p.end for p in pieces)
        stereo = np.stack([render_timeline(user_input.timeline, start, end), render_timeline(output.timeline, start, end)], 1)
        path = out_dir / "conversation.wav"
        sf.write(path, stereo, 16000, subtype="FLOAT")
        written.append(path)
    path = out_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(m.to_dict(), sort_keys=True) + "\n" for m in session.turns))
    written.append(path)
    return written


def summary(turns) -> dict:
    from agent.metrics import INTERVALS, percentile

    return {name: {f"p{q}": percentile([t.intervals()[name] for t in turns], q) for q in (50, 90, 99)} for name in INTERVALS}


def run(args) -> int:
    turns, problem = _check_args(args)
    if problem:
        return _fail(problem)
    return asyncio.run(_chat(args, turns))


async def _chat(args, turns: list[np.ndarray]) -> int:
    from agent.clock import SessionClock
    from agent.loopback import LoopbackInput, RecordingOutput
    from agent.metrics import LoopMonitor, MetricsLog, PrometheusExporter, format_table
    from agent.model import SpeechGPTModel
    from agent.session import SessionConfig
    from agent.events import TurnCompleted, UserTranscript
    from agent.tiny import TINY_NOTICE, make_tiny_bundle

    if not args.model_dir.exists() and args.model_dir == DEFAULT_MODEL_DIR:
        print(f"[chat] writing the tiny bundle to {args.model_dir} (once; a few seconds of format training)")
        make_tiny_bundle(args.model_dir, seed=0)
    model = SpeechGPTModel.load(args.model_dir, device=args.device)
    tiny = model.paths.is_tiny
    print(f"[chat] model loaded in {model.report.load_s:.1f} s (decode step {model.report.step_variant}, vocoder "
          f"{model.report.vocoder_backend}); {len(turns)} turn(s), {'fast' if args.fast else 'real-time'} clock")
    clock = SessionClock(fast=args.fast)
    user_input, output = LoopbackInput(clock), RecordingOutput(clock)
    config = SessionConfig(seed=args.seed, single_turn=args.single_turn, speculative_prefill=not args.no_speculative,
                           preemptive_reply=not args.no_preemptive)
    session = model.session(user_input, output, config, clock)
    exporter = PrometheusExporter(args.prometheus_port) if args.prometheus_port is not None else None
    jsonl = MetricsLog()

    def show(event) -> None:
        if isinstance(event, UserTranscript) and event.final:
            print(f"[turn {event.turn}] user (as SpeechGPT heard it): {event.text!r}")
        elif isinstance(event, TurnCompleted):
            m = event.metrics
            cut = " (interrupted: as heard)" if m.interrupted else ""
            print(f"[turn {m.turn}] agent{cut}: {m.text_answer!r}; {m.output_units} units, {m.reply_s:.2f} s of audio"
                  + (f"; errors: {m.errors}" if m.errors else ""))
            jsonl.write(m)
            if exporter is not None:
                exporter.observe(m)

    session.events.on(show)
    monitor = LoopMonitor()
    monitor.start()
    try:
        await converse(session, user_input, turns, gap_s=args.gap)
    finally:
        loop_stalls = monitor.stop()
        if exporter is not None:
            exporter.close()
    written = write_outputs(args.output_dir, session, user_input, output)
    print("\n" + format_table(session.turns))
    print(f"event loop: longest stall {loop_stalls['max_ms']:.1f} ms, p99 {loop_stalls['p99_ms']:.1f} ms "
          "(the loop only routes; model calls run on the session's worker threads)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"config": {k: str(v) for k, v in vars(args).items()}, "turns": [m.to_dict() for m in session.turns],
               "summary": summary(session.turns), "errors": session.error_count, "event_loop": loop_stalls}
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True))
        written.append(args.json)
    print("\n[chat] wrote " + ", ".join(str(p) for p in written))
    if tiny:
        print("\n" + "!" * 100)
        print(TINY_NOTICE)
        print("So the transcripts and answers above are canned sentences, and the reply audio is noise, not speech.")
        print("!" * 100)
    return 0 if session.turns and session.error_count == 0 else 1
