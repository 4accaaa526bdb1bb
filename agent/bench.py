"""`speechgpt-rt bench`: where every millisecond of a turn goes, heard on the listening side, next to the original.

Replays utterances (the shipped espeak-ng speech by default) as the user's turns through full streaming sessions at
real-time pace on the fast clock (the same timeline as real time, idle waits skipped), N sessions at once, and
records each turn's metrics (agent/metrics.py) plus the first audio the listening side received (the loopback
output's playout clock). `--baseline` runs the same utterances through the original SpeechGPT way in the same run:
whole-utterance units, transformers decoding (to EOS, or to the end of the answer, where ours stops too),
whole-utterance vocoding, nothing streamed; its time to first audio after the end-of-turn decision is all of that
compute. `--fixed-lengths T,A,U` makes every answer (ours and
the baseline's) exactly T transcript, A text-answer and U unit tokens, so that random weights give a realistic,
repeatable workload (the tokens are scripted; the model still runs every step).

Output: a table (P50/P90/P99 per interval), a JSON (every turn's raw timestamps, the configuration, the machine,
validated against agent/assets/bench_schema.json by the tests), and a PNG (per-turn waterfall of the stages, and
the CDF of time to first audio, ours vs baseline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = [ROOT / "streaming/assets/question.wav", ROOT / "tests/fixtures/speech/en_us_table.wav",
                  ROOT / "tests/fixtures/speech/en_gb_slow.wav"]
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DEFAULT_FIXED_LENGTHS = (20, 30, 150)  # about a 3 s turn: its transcript, a one-sentence answer, ~3 s of units
# the waterfall's stages: (label, start field, end field)
STAGES = (("end-of-turn wait", "last_voiced", "final_eot"), ("units", "final_eot", "final_units_ready"),
          ("prefill", "final_units_ready", "prefill_done"), ("decode to first unit", "prefill_done", "first_unit"),
          ("vocoder", "first_unit", "first_vocoder_audio"), ("hand-off + playout", "first_vocoder_audio", "first_frame_played"))


class BenchInputError(ValueError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", type=Path, default=None, help="a release layout or converted bundle")
    parser.add_argument("--config", choices=("tiny",), default="tiny",
                        help="without --model-dir: the tiny bundle (written to .cache/tiny-bundle if missing)")
    parser.add_argument("--inputs", nargs="+", type=Path, default=None, help="audio files or directories of them")
    parser.add_argument("--transport", choices=("loopback",), default="loopback")
    parser.add_argument("--concurrency", default="1", help="sessions at once; a list such as 1,2,4 runs each")
    parser.add_argument("--turns", type=int, default=None, help="turns per session (default: one per input)")
    parser.add_argument("--fixed-lengths", default=None, metavar="T,A,U",
                        help=f"force transcript/text/unit answer lengths (e.g. {','.join(map(str, DEFAULT_FIXED_LENGTHS))})")
    parser.add_argument("--baseline", action="store_true", help="also run the original pipeline on the same inputs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batched", action="store_true",
                        help="every session's decode steps batched in one engine (kernels.batch_engine), not an engine each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None, help="PNG: waterfall per turn and CDF of time to first audio")


def parse_concurrency(value: str) -> list[int]:
    try:
        levels = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        levels = []
    if not levels or any(n < 1 for n in levels):
        raise BenchInputError(f"--concurrency: expected positive integers such as 1 or 1,2,4, got {value!r}")
    return levels


def parse_fixed_lengths(value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    try:
        t, a, u = (int(v) for v in value.split(","))
    except ValueError:
        raise BenchInputError(f"--fixed-lengths: expected T,A,U (three integers), got {value!r}") from None
    if t < 1 or a < 1 or u < 1:
        raise BenchInputError(f"--fixed-lengths: every length must be >= 1, got {value!r}")
    return t, a, u


def collect_inputs(paths: list[Path] | None) -> list[tuple[str, np.ndarray]]:
    """(name, 16 kHz mono float32) per utterance; directories contribute their audio files, sorted."""
    from streaming.audio_io import AudioInputError, load_audio

    files: list[Path] = []
    for path in paths or DEFAULT_INPUTS:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise BenchInputError(f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this directory")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise BenchInputError(f"{path}: no such file or directory")
    out = []
    for f in files:
        try:
            out.append((f.name, load_audio(f).samples))
        except (AudioInputError, OSError) as exc:
            raise BenchInputError(str(exc) if str(f) in str(exc) else f"{f}: {exc}") from None
    return out


def scripted_answer(tokenizer, lengths: tuple[int, int, int], seed: int) -> list[int]:
    """A well-formed chain-of-modality answer with exactly T transcript, A text-answer and U unit tokens."""
    t, a, u = lengths
    rng = np.random.default_rng(seed)
    words = tokenizer.encode("the quick brown fox jumps over a lazy dog while seven silver fish swim south", add_bos=False)
    text = lambda n: [int(words[i % len(words)]) for i in range(n)]  # noqa: E731
    units = [int(x) for x in rng.integers(0, 1000, u)]
    for i in range(1, u):  # reduced units never repeat
        if units[i] == units[i - 1]:
            units[i] = (units[i] + 1) % 1000
    v = tokenizer.vocab
    return (text(t) + tokenizer.encode("; [ta]", add_bos=False) + text(a) + tokenizer.encode("; [ua]", add_bos=False)
            + [v.sosp] + tokenizer.encode_units(units) + [v.eosp] + tokenizer.encode("<eoa>.", add_bos=False) + [v.eos])


def machine_info(device: str) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cpu": _cpu_model(), "cores": _cores(), "device": device}
    for name in ("triton", "transformers", "onnxruntime", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is just not reported
            info[name] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


async def _run_level(model, utterances, turns: int, n: int, seed: int, forced, progress) -> list[dict]:
    """n sessions at once, each playing `turns` utterances as consecutive turns; one row per answered turn."""
    from agent.chat import converse
    from agent.clock import SessionClock
    from agent.events import TurnCompleted
    from agent.loopback import LoopbackInput, RecordingOutput
    from agent.session import SessionConfig

    rows: list[dict] = []

    async def one(k: int) -> None:
        clock = SessionClock(fast=True)
        user, out = LoopbackInput(clock), RecordingOutput(clock)
        session = model.session(user, out, SessionConfig(seed=seed + 1000 * k), clock, name=f"bench-{n}-{k}")
        if forced is not None:
            session.engine.set_forced_tokens(forced)
        session.events.on(lambda e: progress() if isinstance(e, TurnCompleted) else None)
        audio = [utterances[(k + i) % len(utterances)][1] for i in range(turns)]
        await converse(session, user, audio)
        for m in session.turns:
            rows.append({"session": k, "concurrency": n, "input": utterances[(k + m.turn) % len(utterances)][0],
                         **m.to_dict()})

    await asyncio.gather(*(one(k) for k in range(n)))
    return rows


def run_baseline(paths, utterances, seed: int, forced, device: str, progress) -> list[dict]:
    """The original behaviour per utterance: whole-utterance units -> transformers decoding -> whole-utterance vocoding;
    first audio = when all of it is done (counted from the end-of-turn decision)."""
    from agent.parser import ResponseParser
    from agent.prompts import Task, prompt_for
    from agent.reference import ReferenceGenerator
    from streaming.units import UnitExtractor
    from streaming.vocoder import load_vocoder

    generator = ReferenceGenerator.from_bundle(paths, device=device)
    units_x = UnitExtractor.from_files(paths.hubert, paths.kmeans, device)
    vocoder = load_vocoder(paths.vocoder, device)
    rows = []
    for i, (name, audio) in enumerate(utterances):
        t0 = time.perf_counter()
        _, reduced = units_x.extract(audio)
        t_units = time.perf_counter()
        prompt = generator.tokenizer.encode(prompt_for(Task.SPEECH, units=[int(u) for u in reduced]))
        parser = ResponseParser(generator.tokenizer, Task.SPEECH)
        ids = []
        stream = generator.stream(prompt, seed=seed + i, **({"forced": forced} if forced is not None else {}))
        for token in stream:  # to EOS, or to the end of the answer as ours stops (the tiny LLM seldom writes EOS)
            ids.append(token)
            parser.feed(token)
            if parser.done:
                break
        stream.close()
        t_llm = time.perf_counter()
        answer = parser.response
        wav = vocoder.synthesize(answer.units) if answer.units else np.zeros(0, np.float32)
        t_voc = time.perf_counter()
        rows.append({"input": name, "units_s": t_units - t0, "llm_s": t_llm - t_units, "vocoder_s": t_voc - t_llm,
                     "first_audio_after_decision_s": t_voc - t0, "new_tokens": len(ids), "output_units": len(answer.units),
                     "reply_s": len(wav) / 16000})
        progress()
    return rows


def summarize(values) -> dict:
    from agent.metrics import percentile

    vals = [v for v in values if v is not None and math.isfinite(v)]
    return {f"p{q}": (percentile(vals, q) if vals else None) for q in (50, 90, 99)} | {"n": len(vals)}


def build_report(rows, baseline, levels, args_dict, machine) -> dict:
    from agent.metrics import INTERVALS

    report = {"schema": "speechgpt-rt-bench/1", "config": args_dict, "machine": machine, "turns": rows,
              "levels": {}, "baseline": None}
    for n in levels:
        mine = [r for r in rows if r["concurrency"] == n]
        report["levels"][str(n)] = {
            "intervals": {name: summarize([r["intervals"][name] for r in mine]) for name in INTERVALS},
            "underruns": sum(r["underruns"] for r in mine),
            "turns": len(mine),
            "errors": sum(len(r["errors"]) for r in mine),
        }
    if baseline is not None:
        ours = report["levels"][str(levels[0])]["intervals"]["response"]
        theirs = summarize([b["first_audio_after_decision_s"] for b in baseline])
        report["baseline"] = {"turns": baseline, "first_audio_after_decision": theirs,
                              "ratio": {q: (ours[q] / theirs[q] if ours[q] and theirs[q] else None) for q in ("p50", "p90", "p99")}}
    return report


def render(report: dict) -> str:
    from agent.metrics import INTERVALS

    lines = []
    for n, level in report["levels"].items():
        lines.append(f"concurrency {n}: {level['turns']} turns, {level['underruns']} underruns, {level['errors']} errors")
        lines.append(f"  {'interval':12s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s}")
        for name in INTERVALS:
            s = level["intervals"][name]
            if s["n"]:
                lines.append(f"  {name:12s} " + " ".join(f"{s[q] * 1e3:9.1f}" for q in ("p50", "p90", "p99")))
    b = report["baseline"]
    if b is not None:
        s, r = b["first_audio_after_decision"], b["ratio"]
        lines.append("baseline (whole-utterance units, transformers decoding, whole-utterance vocoder, nothing streamed):")
        lines.append("  first audio after the decision  " + " ".join(f"{q} {s[q] * 1e3:.1f} ms" for q in ("p50", "p90", "p99")))
        lines.append("  ours / baseline (response)      " + " ".join(f"{q} {r[q]:.3f}x" for q in ("p50", "p90", "p99") if r[q]))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["turns"] if r["concurrency"] == int(next(iter(report["levels"])))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.35 * len(rows) + 1.5)))
    colors = plt.cm.tab10.colors
    for i, r in enumerate(rows):
        base = r["last_voiced"]
        for j, (label, a, b) in enumerate(STAGES):
            ta, tb = r.get(a), r.get(b)
            if ta is None or tb is None or base is None:
                continue
            ta, tb = max(ta, r["final_eot"]) if j else ta, max(tb, r["final_eot"])
            ax1.barh(i, (tb - ta) * 1e3, left=(ta - base) * 1e3, color=colors[j], label=label if i == 0 else None)
    ax1.set_yticks(range(len(rows)), [f"s{r['session']} t{r['turn']}" for r in rows])
    ax1.invert_yaxis()
    ax1.set_xlabel("ms after the end of the user's speech")
    ax1.set_title("where each turn's time goes (to the first frame played)")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    for label, values in (("ours", [r["intervals"]["response"] for r in rows]),
                          ("baseline", [b["first_audio_after_decision_s"] for b in (report["baseline"] or {}).get("turns", [])])):
        vals = np.sort([v * 1e3 for v in values if v is not None])
        if vals.size:
            ax2.step(vals, np.arange(1, vals.size + 1) / vals.size, where="post", label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("time to first audio after the end-of-turn decision (ms, log scale)")
    ax2.set_ylabel("fraction of turns")
    ax2.set_title("CDF: ours vs the original pipeline")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    try:
        levels = parse_concurrency(args.concurrency)
        lengths = parse_fixed_lengths(args.fixed_lengths)
        utterances = collect_inputs(args.inputs)
        if args.turns is not None and args.turns < 1:
            raise BenchInputError(f"--turns must be >= 1, got {args.turns}")
        if args.model_dir is not None:
            from agent.bundle import BundleError, resolve_bundle

            try:
                resolve_bundle(args.model_dir)
            except (BundleError, OSError) as exc:
                raise BenchInputError(str(exc)) from None
    except BenchInputError as exc:
        print(f"speechgpt-rt bench: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from agent.bundle import resolve_bundle
    from agent.model import SpeechGPTModel

    model_dir = args.model_dir
    if model_dir is None:
        from agent.tiny import make_tiny_bundle

        model_dir = Path(".cache/tiny-bundle")
        if not (model_dir / "tiny_bundle.json").is_file():
            make_tiny_bundle(model_dir, seed=0)
    batch = None
    if args.batched:
        from kernels.batch_engine import BatchConfig

        # admission off: the benchmark measures what the asked-for load does to latency, it never refuses it
        batch = BatchConfig(max_sessions=max(levels), admission=False)
    model = SpeechGPTModel.load(model_dir, device=args.device, batch=batch)
    forced = scripted_answer(model.tokenizer, lengths, args.seed) if lengths else None
    turns = args.turns or len(utterances)
    total = sum(levels) * turns + (len(utterances) if args.baseline else 0)
    bar = tqdm(total=total, desc="bench", unit="turn", file=sys.stderr)
    rows = []
    for n in levels:
        rows += asyncio.run(_run_level(model, utterances, turns, n, args.seed, forced, lambda: bar.update(1)))
    baseline = run_baseline(resolve_bundle(model_dir), utterances, args.seed, forced, args.device,
                            lambda: bar.update(1)) if args.baseline else None
    bar.close()
    args_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args_dict["inputs"] = [name for name, _ in utterances]
    report = build_report(rows, baseline, levels, args_dict, machine_info(args.device))
    print(render(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=lambda o: None))
    if args.plot is not None:
        plot(report, args.plot)
    if model.paths.is_tiny:
        print("(tiny random-weight bundle: canned answers, noise audio; the timings are what they measure)")
    return 0 if all(level["errors"] == 0 for level in report["levels"].values()) else 1
