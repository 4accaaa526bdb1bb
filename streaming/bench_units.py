"""`speechgpt-rt bench-units`: the incremental unit extractor measured side by side with whole-utterance extraction.

Model: the full hubert-base architecture (768 / 3072 / 12 heads, conv 512, 11 blocks used) with RANDOM weights
(the real checkpoint cannot be downloaded here), fp32; k-means 1000 centres fitted (Lloyd, torch) on that
model's features of the speech fixtures. Timings are real; agreement numbers only indicate how a random network
reacts to missing context, not how mHuBERT does.

Sections (per device: the CPU with `--threads` torch threads, and CUDA when available):
  hops       per-hop compute time and real-time factor while a turn streams in (20 ms pieces)
  finalize   end-of-turn unit work for 1/3/5/10 s turns: whole-utterance extraction vs exact vs approximate
  agreement  provisional (stable) units vs final units for each right context, on the speech fixtures
  vad        VAD cost per frame (`streaming.vad.vad_cost_per_frame`), when that module and webrtcvad exist

Only torch/numpy/transformers are needed (no soundfile, soxr, sklearn): fixtures are read with `wave`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import wave
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = REPO / "tests" / "fixtures" / "speech"
ASSET_WAV = REPO / "streaming" / "assets" / "question.wav"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_out", type=Path, default=None, help="write all results here (JSON)")
    parser.add_argument("--quick", action="store_true",
                        help="short run for a GPU window (< 60 s): CUDA only if present, fewer turns/contexts/repeats")
    parser.add_argument("--devices", default="auto", help="comma list of cpu,cuda (default: cpu + cuda if present)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per turn length (default 3, quick 1)")
    parser.add_argument("--turns", default=None, help="turn lengths in seconds (default 1,3,5,10; quick 1,5)")
    parser.add_argument("--right-ms", default=None, help="right contexts for agreement (default 0,80,160,320,640)")
    parser.add_argument("--hop-ms", type=int, default=320)
    parser.add_argument("--left-ms", type=int, default=1280)
    parser.add_argument("--default-right-ms", type=int, default=320, help="right context for hops/finalize")
    parser.add_argument("--frontend", default="refresh", choices=["refresh", "running", "window"],
                        help="front end for the finalize rows and the right-context sweep")
    parser.add_argument("--seed", type=int, default=0)


# ---------------------------------------------------------------------------------------------------------------
# inputs


def _read_wav16k(path: Path) -> np.ndarray | None:
    try:
        with wave.open(str(path)) as w:
            if w.getframerate() != 16000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
                return None
            return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    except (OSError, wave.Error):
        return None


def _speech_like(seed: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.7 * t)) / 16000
    buzz = sum(np.sin(k * phase) / k for k in range(1, 20))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 0.5
    return (0.1 * envelope * buzz + 0.002 * rng.standard_normal(t.size)).astype(np.float32)


def speech_fixtures(limit: int | None = None) -> tuple[list[tuple[str, np.ndarray]], bool]:
    """(name, 16 kHz audio) of the real-speech fixtures (espeak-ng), or synthetic speech-like audio if absent."""
    found: list[tuple[str, np.ndarray]] = []
    labels = SPEECH_DIR / "labels.json"
    if labels.is_file():
        for name, info in sorted(json.loads(labels.read_text()).get("files", {}).items()):
            if info.get("turns") and "noise" not in name:
                audio = _read_wav16k(SPEECH_DIR / name)
                if audio is not None:
                    found.append((name, audio))
    if ASSET_WAV.is_file():
        audio = _read_wav16k(ASSET_WAV)
        if audio is not None:
            found.append((ASSET_WAV.name, audio))
    synthetic = not found
    if synthetic:
        found = [(f"synthetic-{i}", _speech_like(i, s)) for i, s in enumerate((2.4, 3.0, 1.8, 2.6))]
    return (found[:limit] if limit else found), synthetic


def turn_audio(fixtures: list[tuple[str, np.ndarray]], seconds: float) -> np.ndarray:
    """`seconds` of speech made by concatenating the fixtures (looped)."""
    need = int(round(seconds * 16000))
    parts, total, i = [], 0, 0
    while total < need:
        part = fixtures[i % len(fixtures)][1]
        parts.append(part)
        total += part.size
        i += 1
    return np.concatenate(parts)[:need].copy()


# ---------------------------------------------------------------------------------------------------------------
# model


def build_extractor(device: str, seed: int, fixtures: list[tuple[str, np.ndarray]]):
    import torch

    from streaming.hubert import MHUBERT_BASE_ARCH, HubertReader, build_hf_hubert
    from streaming.kmeans import KMeansQuantizer
    from streaming.units import UnitExtractor

    torch.manual_seed(seed)
    model = build_hf_hubert(MHUBERT_BASE_ARCH)  # random weights, transformers' own init
    hubert = HubertReader(model, normalize=False, device=device, source="random hubert-base")
    centers = fit_centers(hubert, fixtures, seed)
    return UnitExtractor(hubert, KMeansQuantizer(centers, device, source="k-means on random-model features"))


def fit_centers(hubert, fixtures, seed: int, k: int = 1000, iterations: int = 10) -> np.ndarray:
    """Lloyd k-means (k=1000) on the random model's features of the fixtures, plus noisy copies for more frames."""
    import torch

    rng = np.random.default_rng(seed)
    feats = []
    for _, audio in fixtures:
        feats.append(hubert.features(audio))
        noisy = audio + (0.003 * rng.standard_normal(audio.size)).astype(np.float32)
        feats.append(hubert.features(noisy))
        feats.append(hubert.features(0.5 * audio))
    x = torch.cat(feats).float()
    while x.shape[0] < 2 * k:  # too few frames: jittered copies
        x = torch.cat([x, x + 0.05 * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
                       .to(x.device)])
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    for _ in range(iterations):
        d = (x ** 2).sum(1, keepdim=True) - 2 * x @ centers.T + (centers ** 2).sum(1)[None]
        labels = d.argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        used = counts > 0
        centers[used] = sums[used] / counts[used, None]
    return centers.cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# measurements


def _stream(extractor, audio: np.ndarray, config, piece: int = 320):
    from streaming.incremental_units import IncrementalUnitExtractor

    inc = IncrementalUnitExtractor(extractor, config)
    for i in range(0, audio.size, piece):
        inc.push(audio[i:i + piece])
    return inc


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def measure_hops(extractor, fixtures, seconds: float, config, frontends=("running", "window")) -> list[dict]:
    from dataclasses import replace

    audio = turn_audio(fixtures, seconds)
    rows = []
    for frontend in frontends:
        cfg = replace(config, frontend=frontend)
        inc = _stream(extractor, audio, cfg)
        hops = [r for r in inc.records if r.kind == "hop"]
        compute = [r.total_s for r in hops]
        rows.append({
            "frontend": frontend,
            "turn_s": seconds,
            "hop_ms": cfg.hop_ms, "left_ms": cfg.left_context_ms, "right_ms": cfg.right_context_ms,
            "hops": len(hops),
            "hop_compute_ms_p50": 1000 * _pct(compute, 50),
            "hop_compute_ms_p90": 1000 * _pct(compute, 90),
            "hop_compute_ms_max": 1000 * max(compute) if compute else float("nan"),
            "frontend_ms_p50": 1000 * _pct([r.frontend_s for r in hops], 50),
            "encoder_ms_p50": 1000 * _pct([r.encoder_s for r in hops], 50),
            "kmeans_ms_p50": 1000 * _pct([r.kmeans_s for r in hops], 50),
            "rtf": sum(compute) / seconds,
            "window_frames_p50": _pct([r.window_frames for r in hops], 50),
        })
    return rows


def measure_finalize(extractor, fixtures, turns: list[float], config, repeats: int) -> list[dict]:
    from dataclasses import replace

    rows = []
    extractor.extract_detailed(turn_audio(fixtures, 1.0))  # warm-up
    for seconds in turns:
        audio = turn_audio(fixtures, seconds)
        whole, exact, approx = [], [], []
        identical = True
        whole_units = None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = extractor.extract_detailed(audio)
            whole.append(time.perf_counter() - t0)
            whole_units = result.frame_units
            inc = _stream(extractor, audio, replace(config, finalize_mode="exact"))
            final = inc.end_of_turn()
            exact.append(final.record.total_s)
            identical &= bool(np.array_equal(final.frame_units, whole_units))
            inc = _stream(extractor, audio, replace(config, finalize_mode="approximate"))
            final_a = inc.end_of_turn()
            approx.append(final_a.record.total_s)
        w, e, a = statistics.median(whole), statistics.median(exact), statistics.median(approx)
        rows.append({
            "turn_s": seconds,
            "frames": int(whole_units.size),
            "whole_ms": 1000 * w,
            "exact_ms": 1000 * e,
            "approx_ms": 1000 * a,
            "exact_over_whole": e / w,
            "approx_over_whole": a / w,
            "exact_over_whole_min": min(exact) / min(whole),
            "approx_over_whole_min": min(approx) / min(whole),
            "approx_window_frames": final_a.record.window_frames,
            "approx_new_cnn_frames": final_a.record.new_frames,
            "exact_identical_to_whole": identical,
            "repeats": repeats,
            "whole_ms_all": [1000 * v for v in whole],
            "exact_ms_all": [1000 * v for v in exact],
            "approx_ms_all": [1000 * v for v in approx],
        })
    return rows


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Levenshtein distance between two unit sequences."""
    a, b = list(map(int, a)), list(map(int, b))
    if not a or not b:
        return max(len(a), len(b))
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y))
        previous = current
    return previous[-1]


def measure_agreement(extractor, fixtures, rights: list[int], config, extra_rows: bool) -> list[dict]:
    """Stable (committed) units and approximate finals vs the reference, summed over the fixtures.

    Rows: the default front end for every right context; with `extra_rows`, at the default right context also the
    other front ends and the default one with the previous turn's statistics as prior (the previous fixture in
    the list plays the previous turn)."""
    from dataclasses import replace

    from streaming.incremental_units import IncrementalUnitExtractor, first_divergence
    from streaming.kmeans import dedup_units

    references = {name: extractor.extract(audio) for name, audio in fixtures}
    cases = [(config.frontend, r, False) for r in rights]
    if extra_rows:
        cases += [(f, config.right_context_ms, False) for f in ("running", "refresh", "window") if f != config.frontend]
        cases.append((config.frontend, config.right_context_ms, True))
    rows = []
    for frontend, right, with_prior in cases:
        cfg = replace(config, right_context_ms=right, frontend=frontend, finalize_mode="approximate")
        agree = frames = 0
        stable_edits = stable_len = 0
        kept = stable_total = 0
        approx_agree = approx_frames = approx_edits = approx_len = 0
        for index, (name, audio) in enumerate(fixtures):
            ref_frames, ref_reduced = references[name]
            inc = IncrementalUnitExtractor(extractor, cfg)
            if with_prior:
                inc.push(fixtures[index - 1][1])
                inc.end_of_turn()
                inc.reset()
            for i in range(0, audio.size, 320):
                inc.push(audio[i:i + 320])
            stable_frames, stable = inc.stable_frame_units, inc.stable_reduced_units
            n = stable_frames.size
            agree += int((stable_frames == ref_frames[:n]).sum())
            frames += n
            ref_prefix = dedup_units(ref_frames[:n])
            stable_edits += edit_distance(stable, ref_prefix)
            stable_len += ref_prefix.size
            kept += first_divergence(stable, ref_reduced)
            stable_total += stable.size
            final = inc.end_of_turn()
            approx_agree += int((final.frame_units == ref_frames).sum())
            approx_frames += ref_frames.size
            approx_edits += edit_distance(final.reduced_units, ref_reduced)
            approx_len += ref_reduced.size
        rows.append({
            "frontend": frontend + (" + prior" if with_prior else ""),
            "right_ms": right,
            "stable_frames": frames,
            "stable_frame_agreement": agree / max(frames, 1),
            "stable_unit_edit_rate": stable_edits / max(stable_len, 1),
            "stable_units_kept_after_rollback": kept / max(stable_total, 1),
            "approx_final_frame_agreement": approx_agree / max(approx_frames, 1),
            "approx_final_unit_edit_rate": approx_edits / max(approx_len, 1),
        })
    return rows


def measure_vad() -> dict:
    try:
        from streaming import vad
    except Exception as exc:  # noqa: BLE001 - another engineer's module; any failure just skips the row
        return {"skipped": f"streaming.vad not importable ({type(exc).__name__}: {exc})"}
    cost = getattr(vad, "vad_cost_per_frame", None)
    if cost is None:
        return {"skipped": "streaming.vad has no vad_cost_per_frame()"}
    try:
        frame_ms = int(getattr(vad, "VadConfig")().frame_ms)
        per_frame = cost(1000)
    except Exception as exc:  # noqa: BLE001 - e.g. webrtcvad/soxr missing on the GPU machines
        return {"skipped": f"vad_cost_per_frame failed ({type(exc).__name__}: {exc})"}
    return {"frame_ms": frame_ms, "us_per_frame": 1e6 * per_frame, "rtf": per_frame / (frame_ms / 1000)}


# ---------------------------------------------------------------------------------------------------------------
# report


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(row[key], fmt) if isinstance(row[key], (int, float)) and fmt else str(row[key])
                              for key, _, fmt in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages: CPU timings on a shared machine are only as good as this is low."""
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def render(result: dict) -> str:
    lines = []
    for dev in result["devices"]:
        lines.append(f"\n## {dev['device']} ({dev['device_name']}; torch threads {dev['threads']}; "
                     f"attention {dev['attn_implementation']}; load average before/after "
                     f"{dev['load_average_before']} / {dev['load_average_after']})")
        lines.append(f"\nper-hop compute while streaming ({dev['hops'][0]['turn_s']:.0f} s turn, 20 ms pieces):\n")
        lines.append(_table(dev["hops"], [
            ("frontend", "frontend", ""), ("hop_ms", "hop ms", "d"), ("left_ms", "L ms", "d"),
            ("right_ms", "R ms", "d"),
            ("hops", "hops", "d"), ("hop_compute_ms_p50", "p50 ms", ".1f"), ("hop_compute_ms_p90", "p90 ms", ".1f"),
            ("frontend_ms_p50", "CNN p50", ".1f"), ("encoder_ms_p50", "encoder p50", ".1f"),
            ("window_frames_p50", "window frames", ".0f"), ("rtf", "RTF", ".3f")]))
        lines.append("\nend-of-turn unit work (median of repeats; exact = reference, bit for bit):\n")
        lines.append(_table(dev["finalize"], [
            ("turn_s", "turn s", ".0f"), ("frames", "frames", "d"), ("whole_ms", "whole-utterance ms", ".1f"),
            ("exact_ms", "exact ms", ".1f"), ("approx_ms", "approx ms", ".1f"),
            ("exact_over_whole", "exact/whole", ".2f"), ("approx_over_whole", "approx/whole", ".2f"),
            ("approx_window_frames", "approx window", "d"), ("exact_identical_to_whole", "exact identical", "")]))
        lines.append("\nprovisional vs final units (random weights: indicative only):\n")
        lines.append(_table(dev["agreement"], [
            ("frontend", "frontend", ""), ("right_ms", "R ms", "d"), ("stable_frames", "stable frames", "d"),
            ("stable_frame_agreement", "stable frame agreement", ".3f"),
            ("stable_unit_edit_rate", "stable unit edit rate", ".3f"),
            ("stable_units_kept_after_rollback", "prefix kept after rollback", ".3f"),
            ("approx_final_frame_agreement", "approx final frame agr.", ".3f"),
            ("approx_final_unit_edit_rate", "approx final unit edit", ".3f")]))
        target = dev.get("target_5s")
        if target:
            lines.append(f"\ntarget (5 s turn): approx/whole = {target['approx_over_whole']:.2f} (<= 0.33: "
                         f"{target['approx_ok']}), exact/whole = {target['exact_over_whole']:.2f}")
    vad = result.get("vad", {})
    if "skipped" in vad:
        lines.append(f"\nVAD: skipped ({vad['skipped']})")
    elif vad:
        lines.append(f"\nVAD: {vad['us_per_frame']:.1f} us per {vad['frame_ms']} ms frame (RTF {vad['rtf']:.5f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from streaming.incremental_units import IncrementalConfig

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    if args.devices == "auto":
        devices = (["cuda"] if cuda else ["cpu"]) if args.quick else (["cpu"] + (["cuda"] if cuda else []))
    else:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if "cuda" in devices and not cuda:
            print("bench-units: CUDA requested but not available; skipping it")
            devices = [d for d in devices if d != "cuda"]
    turns = [float(v) for v in (args.turns or ("1,5" if args.quick else "1,3,5,10")).split(",")]
    rights = [int(v) for v in (args.right_ms or ("0,320" if args.quick else "0,80,160,320,640")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    fixtures, synthetic = speech_fixtures(limit=3 if args.quick else None)
    config = IncrementalConfig(hop_ms=args.hop_ms, left_context_ms=args.left_ms,
                               right_context_ms=args.default_right_ms, frontend=args.frontend)

    result: dict = {
        "command": "speechgpt-rt bench-units" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": "hubert-base architecture (768/3072/12 heads, conv 512), random weights, 11 blocks, fp32",
        "fixtures": [name for name, _ in fixtures],
        "fixtures_synthetic": synthetic,
        "config": asdict(config),
        "devices": [],
    }
    try:
        import transformers

        result["machine"]["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    for device in devices:
        t0 = time.perf_counter()
        extractor = build_extractor(device, args.seed, fixtures)
        name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or "cpu")
        dev: dict = {"device": device, "device_name": name, "threads": torch.get_num_threads(),
                     "load_average_before": _load_average(),
                     "attn_implementation": getattr(extractor.hubert.model.config, "_attn_implementation", "?")}
        hop_seconds = 5.0 if args.quick else 10.0
        dev["hops"] = measure_hops(extractor, fixtures, hop_seconds, config,
                                   frontends=(config.frontend,) if args.quick else ("refresh", "running", "window"))
        dev["finalize"] = measure_finalize(extractor, fixtures, turns, config, repeats)
        dev["agreement"] = measure_agreement(extractor, fixtures, rights, config, extra_rows=not args.quick)
        five = [r for r in dev["finalize"] if r["turn_s"] == 5.0]
        if five:
            dev["target_5s"] = {"approx_over_whole": five[0]["approx_over_whole"],
                                "approx_ok": five[0]["approx_over_whole"] <= 1 / 3,
                                "exact_over_whole": five[0]["exact_over_whole"]}
        dev["seconds"] = time.perf_counter() - t0
        dev["load_average_after"] = _load_average()
        result["devices"].append(dev)
        del extractor
    result["vad"] = measure_vad()
    text = render(result)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2, default=float))
        print(f"\nwrote {args.json_out}")
    return 0
