"""`speechgpt-rt respond`: the whole-utterance pipeline, one question in, one reply out.

    audio -> 16 kHz mono -> mHuBERT L11 + k-means on the whole utterance -> reduced units -> official prompt
          -> text-side generator (SpeechGPT sampling) -> streaming parser -> unit vocoder over the whole unit
          answer -> WAV

The generator is our decode engine by default (`--generator engine`; on the CPU it draws the same tokens as the
reference for a seed) or the transformers reference (`--generator reference`). The other stages are the
references the streaming fast paths (incremental units, the chunked vocoder) are judged against.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agent.bundle import BundlePaths, resolve_bundle
from agent.parser import ParsedResponse
from agent.prompts import Task, prompt_for
from agent.generation import SPEECHGPT_MAX_NEW_TOKENS, TokenGenerator
from agent.tiny import TINY_NOTICE

AUDIO_TASKS = (Task.SPEECH, Task.ASR)


@dataclass
class RespondResult:
    task: Task
    input_units: list[int]
    response: ParsedResponse
    reply_wav: np.ndarray | None  # float32, 16 kHz
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    prompt_tokens: int = 0
    new_tokens: int = 0


GENERATORS = ("engine", "reference")


class RespondPipeline:
    """Loads the whole system from a model directory (release layout, tiny bundle or converted bundle).
    generator: "engine" (kernels.engine via agent.engine_generator) or "reference" (transformers);
    speech_mode: the engine's restricted head inside unit spans (ignored by the reference)."""

    def __init__(
        self,
        model_dir: Path | str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: str = "engine",
        speech_mode: bool = False,
    ):
        from streaming.units import UnitExtractor
        from streaming.vocoder import load_vocoder

        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        t0 = time.perf_counter()
        self.paths: BundlePaths = resolve_bundle(model_dir)
        self.generator: TokenGenerator
        if generator == "engine":
            from agent.engine_generator import EngineGenerator

            self.generator = EngineGenerator.from_bundle(self.paths, dtype=dtype, device=device, speech_mode=speech_mode)
            self.generator.warmup()  # CUDA graphs are captured at load, not during the first answer
        else:
            from agent.reference import ReferenceGenerator

            self.generator = ReferenceGenerator.from_bundle(self.paths, dtype=dtype, device=device)
        self.generator_name = generator
        self.generator_label = generator  # what the report prints: for the engine, also how its decode step runs
        if generator == "engine":
            eng = self.generator.engine
            how = "CUDA graphs" if eng.use_graphs else "eager"
            raced = ", fastest in the race at load" if eng.tune_report and "skipped" not in eng.tune_report else ""
            self.generator_label = f"engine (decode step {eng.step_variant.name}, {how}{raced})"
        self.tokenizer = self.generator.tokenizer
        self.units = UnitExtractor.from_files(self.paths.hubert, self.paths.kmeans, device)
        self.vocoder = load_vocoder(self.paths.vocoder, device)
        self.load_s = time.perf_counter() - t0

    def engine_info(self) -> dict | None:
        """How the decode engine runs (None for the reference generator): its step variant and, where the load-time
        race ran, what it measured."""
        if self.generator_name != "engine":
            return None
        eng = self.generator.engine
        return {"step_variant": eng.step_variant.name, "cuda_graphs": eng.use_graphs, "step_race": eng.tune_report}

    def respond(
        self,
        task: Task | str,
        *,
        audio: np.ndarray | None = None,
        text: str | None = None,
        seed: int = 0,
        max_new_tokens: int = SPEECHGPT_MAX_NEW_TOKENS,
    ) -> RespondResult:
        task = Task(task)
        timings: dict[str, float] = {}
        units: list[int] = []
        if task in AUDIO_TASKS:
            if audio is None:
                raise ValueError(f"mode {task.value!r} needs audio input")
            t0 = time.perf_counter()
            _, reduced = self.units.extract(audio)
            units = [int(u) for u in reduced]
            timings["units"] = time.perf_counter() - t0
        elif text is None:
            raise ValueError(f"mode {task.value!r} needs text input")
        prompt = prompt_for(task, units=units or None, text=text)
        t0 = time.perf_counter()
        gen = self.generator.generate(prompt, task=task, seed=seed, max_new_tokens=max_new_tokens)
        timings["prefill+decode"] = time.perf_counter() - t0
        wav = None
        if gen.response.units:
            t0 = time.perf_counter()
            wav = self.vocoder.synthesize(gen.response.units)
            timings["vocoder"] = time.perf_counter() - t0
        return RespondResult(task, units, gen.response, wav, timings, len(gen.prompt_ids), len(gen.new_ids))


def _read_text_input(value: str) -> str:
    p = Path(value)
    return p.read_text(encoding="utf-8").strip() if p.suffix == ".txt" and p.is_file() else value


def format_report(result: RespondResult, load_s: float, out_wav: Path | None, generator: str = "engine") -> str:
    r = result.response
    lines = [
        f"mode:          {result.task.value}",
        f"generator:     {generator}",
        f"input units:   {len(result.input_units)}" if result.task in AUDIO_TASKS else "input:         text",
        f"transcript:    {r.transcript!r}",
        f"text answer:   {r.text_answer!r}",
        f"unit answer:   {len(r.units)} units",
        f"tokens:        {result.prompt_tokens} prompt + {result.new_tokens} generated (ended by {r.end_reason})",
        f"issues:        {', '.join(i.value for i in r.issues) or 'none'}",
        f"reply audio:   {out_wav} ({result.reply_wav.shape[0] / 16000:.2f} s)" if out_wav is not None else "reply audio:   none (the answer has no unit span)",
        "",
        "stage             seconds",
        f"load              {load_s:8.3f}",
    ]
    for stage in ("units", "prefill+decode", "vocoder"):
        if stage in result.timings:
            lines.append(f"{stage:<17} {result.timings[stage]:8.3f}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("input", help="audio file (speech/asr modes) or text / a .txt file (tts/text modes)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="reply WAV to write (16 kHz mono)")
    parser.add_argument("--model-dir", type=Path, default=Path(".cache/tiny-bundle"),
                        help="release layout, tiny bundle or converted bundle (default: .cache/tiny-bundle)")
    parser.add_argument("--mode", choices=[t.value for t in Task], default="speech")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-new-tokens", type=int, default=SPEECHGPT_MAX_NEW_TOKENS)
    parser.add_argument("--generator", choices=GENERATORS, default="engine",
                        help="engine: our decode engine (default); reference: transformers LlamaForCausalLM")
    parser.add_argument("--speech-head", action="store_true",
                        help="engine only: score only unit/special rows inside unit spans (default: full vocabulary, like the original)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")


def run(args) -> int:
    import soundfile as sf

    from streaming.audio_io import load_audio

    task = Task(args.mode)
    dtype = torch.float32 if args.device == "cpu" else torch.float16
    pipeline = RespondPipeline(args.model_dir, args.device, dtype, args.generator, args.speech_head)
    if pipeline.paths.is_tiny:
        print(f"NOTE: {TINY_NOTICE}\n", file=sys.stderr)
    if task in AUDIO_TASKS:
        result = pipeline.respond(task, audio=load_audio(args.input).samples, seed=args.seed, max_new_tokens=args.max_new_tokens)
    else:
        result = pipeline.respond(task, text=_read_text_input(args.input), seed=args.seed, max_new_tokens=args.max_new_tokens)
    out_wav = None
    if result.reply_wav is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        sf.write(args.output, result.reply_wav, 16000, subtype="PCM_16")
        out_wav = args.output
    print(format_report(result, pipeline.load_s, out_wav, pipeline.generator_label))
    if args.json:
        r = result.response
        args.json.write_text(json.dumps({
            "mode": task.value, "input_units": result.input_units, "transcript": r.transcript, "text_answer": r.text_answer,
            "units": r.units, "issues": [i.value for i in r.issues], "end_reason": r.end_reason,
            "timings_s": {"load": pipeline.load_s, **result.timings}, "output": str(out_wav) if out_wav else None,
            "tiny_bundle": pipeline.paths.is_tiny, "generator": pipeline.generator_name,
            "engine": pipeline.engine_info(),
        }, indent=2))
    return 0
