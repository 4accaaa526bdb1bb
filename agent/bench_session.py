"""`speechgpt-rt bench-session`: what speculative prefill and preemptive replies buy, side by side in one run.

The same user turns (the shipped espeak-ng speech by default) go through three sessions on the fast clock, one
after the other: both features on (the default), speculative prefill only, and neither. Per configuration it
prints P50/P90 of the end-of-turn work (decision -> prefill done), the response (decision -> first frame played)
and end to end (end of speech -> first frame played), the pipeline overhead (response minus the compute inside it),
how many question tokens the speculative prefill had in the cache and how many it had to roll back, and how often
the preemptive reply was kept and what it saved; then each figure's ratio to "neither".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = [ROOT / "tests/fixtures/speech" / n for n in ("en_us_table.wav", "en_us_fish.wav", "en_gb_slow.wav",
                                                                 "en_us_f3_fast.wav")] + \
                 [ROOT / "streaming/assets" / n for n in ("question.wav", "follow_up.wav")]
CONFIGS = {
    "full": dict(),
    "speculative_only": dict(preemptive_reply=False),
    "neither": dict(preemptive_reply=False, speculative_prefill=False),
}
FIGURES = ("eot_work", "response", "end_to_end", "overhead")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/tiny-bundle"))
    parser.add_argument("--inputs", type=Path, nargs="*", default=None, help="audio files (default: shipped speech)")
    parser.add_argument("--repeats", type=int, default=2, help="times the inputs are played (turns = files x repeats)")
    parser.add_argument("--single-turn", action="store_true")
    parser.add_argument("--json", type=Path, required=True)


def run(args) -> int:
    from agent.metrics import percentile
    from streaming.audio_io import AudioInputError, load_audio

    paths = args.inputs or DEFAULT_INPUTS
    try:
        turns = [load_audio(p).samples for p in paths] * max(1, args.repeats)
    except (AudioInputError, OSError) as exc:
        print(f"speechgpt-rt bench-session: {exc}")
        return 2
    from agent.model import SpeechGPTModel

    model = SpeechGPTModel.load(args.model_dir)
    result = {"inputs": [str(p) for p in paths], "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
              "turn_seconds": [round(len(t) / 16000, 2) for t in turns], "configs": {}}
    for name, overrides in CONFIGS.items():
        turns_metrics = asyncio.run(_one(model, turns, overrides, args.single_turn))
        row = {f: {f"p{q}": percentile([m.intervals()[f] for m in turns_metrics], q) for q in (50, 90)} for f in FIGURES}
        row["turns"] = len(turns_metrics)
        row["errors"] = sum(len(m.errors) for m in turns_metrics)
        row["speculative_tokens_mean"] = sum(m.speculative_tokens for m in turns_metrics) / max(1, len(turns_metrics))
        row["rollback_tokens_mean"] = sum(m.rollback_tokens for m in turns_metrics) / max(1, len(turns_metrics))
        row["eot_prefill_tokens_mean"] = sum(m.eot_prefill_tokens for m in turns_metrics) / max(1, len(turns_metrics))
        kept = [m for m in turns_metrics if m.preemptive == "kept"]
        row["preemptive_kept"] = len(kept)
        row["preemptive_discarded"] = sum(m.preemptive_discarded for m in turns_metrics)
        row["preemptive_saved_ms_p50"] = percentile([m.preemptive_saved_s for m in kept], 50) * 1e3 if kept else math.nan
        result["configs"][name] = row
    print(render(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return 0


async def _one(model, turns, overrides: dict, single_turn: bool):
    from agent.chat import converse
    from agent.clock import SessionClock
    from agent.loopback import LoopbackInput, RecordingOutput
    from agent.session import SessionConfig

    clock = SessionClock(fast=True)
    user, out = LoopbackInput(clock), RecordingOutput(clock)
    session = model.session(user, out, SessionConfig(single_turn=single_turn, **overrides), clock)
    await converse(session, user, turns)
    return session.turns


def render(result: dict) -> str:
    base = result["configs"]["neither"]
    lines = [f"{len(result['turn_seconds'])} turns of {min(result['turn_seconds'])}-{max(result['turn_seconds'])} s, fast clock",
             f"{'config':18s} " + " ".join(f"{f + ' p50/p90 ms':>26s}" for f in FIGURES)
             + "  spec tok  rolled  eot tok  kept  saved p50"]
    for name, row in result["configs"].items():
        cells = " ".join(f"{row[f]['p50'] * 1e3:12.1f} /{row[f]['p90'] * 1e3:10.1f}  " for f in FIGURES)
        lines.append(f"{name:18s} {cells}{row['speculative_tokens_mean']:9.1f} {row['rollback_tokens_mean']:7.1f} "
                     f"{row['eot_prefill_tokens_mean']:8.1f} {row['preemptive_kept']:5d} {row['preemptive_saved_ms_p50']:9.1f}")
    lines.append("ratio to 'neither' (P50; < 1 is faster):")
    for name, row in result["configs"].items():
        if name == "neither":
            continue
        ratios = []
        for f in FIGURES:
            a, b = row[f]["p50"], base[f]["p50"]
            ratios.append(f"{f} {a / b:.2f}x" if b and math.isfinite(a) and math.isfinite(b) and b > 0 else f"{f} -")
        lines.append(f"  {name:16s} " + ", ".join(ratios))
    return "\n".join(lines)
