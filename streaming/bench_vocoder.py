"""`speechgpt-rt bench-vocoder`: the streaming unit vocoder at full size (release architecture, random weights).

Measured side by side in one run, per device (CPU with N threads; CUDA when torch sees a GPU):
- offline whole-utterance synthesis time -> real-time factor (RTF = compute seconds / audio seconds);
- exact streaming mode, units pushed one at a time, for several chunk sizes: RTF over the whole reply, and the
  first-chunk latency = wall time of the push() of the unit that releases the first audio (duration predictor +
  generator window + copies), with N = how many units had to arrive first;
- ONNX Runtime (CPUExecutionProvider / CUDAExecutionProvider with IOBinding and CUDA graphs) vs torch (eager, and
  CUDA graphs on the GPU), with the provider each session really ran on;
- low-latency mode: deviation from exact (SNR, max abs diff) and how many fewer units it waits for.

Runs on the GPU machines' own packages (torch, onnx, onnxruntime; no soundfile/soxr): heavy imports stay inside
functions. `--quick --device cuda` fits a short GPU window (export of the full model included).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CPU_RTF_TARGET = 0.1
GPU_FIRST_CHUNK_MS_TARGET = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when torch sees a GPU")
    parser.add_argument("--quick", action="store_true", help="fewer chunk sizes / repeats, a shorter utterance")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and onnxruntime intra-op)")
    parser.add_argument("--units", type=int, default=None, help="units in the test utterance (default 60, quick 50)")
    parser.add_argument("--chunk-frames", default=None,
                        help="comma-separated chunk sizes (default 4,8,16,32,64; quick 4,8)")
    parser.add_argument("--low-latency-right", default="0,4,8", help="right-context frames to try in low-latency mode")
    parser.add_argument("--crossfade-ms", type=float, default=5.0)
    parser.add_argument("--onnx-dir", type=Path, default=None, help="reuse an export of this same random model")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    parser.add_argument("--seed", type=int, default=0)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def _stream_once(synth: Any, units: np.ndarray) -> dict[str, Any]:
    """Push units one at a time, then flush; time every call."""
    synth.reset()
    call_ms: list[float] = []
    parts: list[np.ndarray] = []
    first_unit = None
    for i, u in enumerate(units):
        t0 = time.perf_counter()
        frames = synth.push(int(u))
        call_ms.append((time.perf_counter() - t0) * 1e3)
        if frames and first_unit is None:
            first_unit = i + 1
        parts += [f.samples for f in frames]
    t0 = time.perf_counter()
    frames = synth.flush()
    call_ms.append((time.perf_counter() - t0) * 1e3)
    parts += [f.samples for f in frames]
    audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return {
        "audio": audio,
        "total_ms": sum(call_ms),
        "first_unit": first_unit,
        "first_latency_ms": synth.timings[0].latency_ms if synth.timings else math.nan,
        "chunk_compute_ms": [t.compute_ms for t in synth.timings],
        "fixed_share": (sum(t.fixed_window for t in synth.timings) / len(synth.timings)) if synth.timings else 0.0,
    }


def _first_chunk_latencies(synth: Any, units: np.ndarray, repeats: int) -> list[float]:
    """Replay just the prefix that releases the first audio; the latency of that releasing push, each time."""
    samples = []
    for _ in range(repeats):
        synth.reset()
        for u in units:
            if synth.push(int(u)):
                break
        if synth.timings:
            samples.append(synth.timings[0].latency_ms)
    return samples


def _snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in __import__("os").getloadavg()]
    except OSError:
        return None


def _machine(devices: list[str]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": __import__("os").cpu_count(),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    if "cuda" in devices:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> int:
    import torch

    from streaming.synthesizer import OnnxBackend, StreamingSynthesizer, TorchBackend
    from streaming.tiny_parts import random_vocoder
    from streaming.vocoder import RELEASE_CONFIG
    from streaming.vocoder_onnx import export_vocoder, fixed_windows_for_chunks

    started = time.perf_counter()
    quick = bool(args.quick)
    n_units = args.units or (50 if quick else 60)
    chunks = [int(c) for c in (args.chunk_frames or ("4,8" if quick else "4,8,16,32,64")).split(",") if c.strip()]
    low_rights = [int(c) for c in str(args.low_latency_right).split(",") if c.strip()]
    repeats = 3 if quick else 5  # first-chunk latency samples per backend and chunk size
    rounds = 2 if quick else 3  # whole-reply streaming runs per backend and chunk size (median reported)
    load_before = _loadavg()
    cuda_ok = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_ok:
        print("bench-vocoder: --device cuda but torch sees no GPU")
        return 2
    devices = {"auto": ["cpu"] + (["cuda"] if cuda_ok else []), "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    torch.set_num_threads(args.threads)

    vocoder = random_vocoder(RELEASE_CONFIG, seed=args.seed)
    params = sum(p.numel() for p in vocoder.parameters())
    rng = np.random.default_rng(args.seed)
    units = rng.integers(0, 1000, n_units)
    t0 = time.perf_counter()
    reference = vocoder.synthesize(units)  # the whole-utterance reference, CPU fp32
    whole_cpu_ms = (time.perf_counter() - t0) * 1e3
    audio_s = reference.size / 16000
    durations = vocoder.predict_durations(units).numpy()
    expanded = np.repeat(units, durations)
    rf = vocoder.receptive_field

    # ---- ONNX export (timed: part of the GPU window budget)
    export_info: dict[str, Any] = {}
    onnx_dir = args.onnx_dir
    try:
        import onnxruntime  # noqa: F401

        ort_ok = True
    except ImportError:
        ort_ok = False
        export_info["error"] = "onnxruntime not installed"
    if ort_ok and onnx_dir is None:
        onnx_dir = Path(tempfile.mkdtemp(prefix="bench-vocoder-onnx-"))
        t0 = time.perf_counter()
        try:
            # fixed windows only matter for CUDA graphs
            fixed = chunks if "cuda" in devices else ()
            meta = export_vocoder(vocoder, onnx_dir, fixed_chunk_frames=fixed, exporter=args.exporter, verify=False)
            export_info = {"seconds": round(time.perf_counter() - t0, 2), "exporter": meta["exporter"],
                           "dir": str(onnx_dir),
                           "fixed_windows": [e["window_frames"] for e in meta["fixed_generators"]]}
        except Exception as exc:  # noqa: BLE001 - report and keep the torch rows
            export_info = {"error": f"{type(exc).__name__}: {exc}"}
            ort_ok = False
    print(f"full-size vocoder: {params / 1e6:.2f} M params, random weights; utterance {n_units} units -> "
          f"{expanded.size} frames = {audio_s:.2f} s; export: {export_info}")

    rows: list[dict[str, Any]] = []
    unavailable: list[dict[str, str]] = []
    low_latency: list[dict[str, Any]] = []
    for device in devices:
        graph_windows = fixed_windows_for_chunks(chunks, rf.left_frames, rf.right_frames)
        backends: list[tuple[str, Any]] = []
        try:
            backends.append(("torch", TorchBackend(vocoder, device, threads=args.threads if device == "cpu" else None,
                                                   cuda_graph_windows=graph_windows if device == "cuda" else ())))
        except Exception as exc:  # noqa: BLE001
            unavailable.append({"device": device, "backend": "torch", "reason": f"{type(exc).__name__}: {exc}"})
        if ort_ok:
            try:
                threads = args.threads if device == "cpu" else None
                backends.append(("onnx", OnnxBackend(onnx_dir, device, threads=threads)))
            except Exception as exc:  # noqa: BLE001 - e.g. no CUDAExecutionProvider: the torch row stands alone
                unavailable.append({"device": device, "backend": "onnx", "reason": f"{type(exc).__name__}: {exc}"})
        # offline: durations + one generator call on the whole utterance, after a warm-up call of the same shape
        # (oneDNN / cuDNN set-up per new shape); backends interleaved so load drifts hit all of them alike
        whole: dict[str, list[float]] = {name: [] for name, _ in backends}
        whole_diff: dict[str, float] = {}
        for name, backend in backends:
            whole_diff[name] = float(np.abs(backend.generate(expanded) - reference).max())
        for _ in range(rounds):
            for name, backend in backends:
                t0 = time.perf_counter()
                backend.durations(units)
                backend.generate(expanded)
                whole[name].append((time.perf_counter() - t0) * 1e3)
        for chunk in chunks:
            synths = {name: StreamingSynthesizer(backend, chunk_frames=chunk) for name, backend in backends}
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in synths}
            first: dict[str, list[float]] = {name: [] for name in synths}
            for synth in synths.values():
                _stream_once(synth, units[: min(n_units, 30)])  # warm-up: allocations, cuDNN, graph replays
            for _ in range(rounds):
                for name, synth in synths.items():
                    results[name].append(_stream_once(synth, units))
            for _ in range(repeats):
                for name, synth in synths.items():
                    first[name] += _first_chunk_latencies(synth, units, 1)
            for name, backend in backends:
                runs = results[name]
                audio = runs[0]["audio"]
                diff = float(np.abs(audio - reference).max()) if audio.shape == reference.shape else math.inf
                rtfs = [r["total_ms"] / 1e3 / audio_s for r in runs]
                row = {
                    "device": device,
                    "backend": name,
                    "provider": backend.provider,
                    "chunk_frames": chunk,
                    "rtf_exact": _median(rtfs),
                    "rtf_exact_runs": rtfs,
                    "rtf_offline": _median(whole[name]) / 1e3 / audio_s,
                    "rtf_offline_runs": [w / 1e3 / audio_s for w in whole[name]],
                    "first_chunk_ms_median": _median(first[name]),
                    "first_chunk_ms_min": min(first[name]) if first[name] else math.nan,
                    "first_chunk_ms_runs": first[name],
                    "first_audio_after_units": runs[0]["first_unit"],
                    "chunk_compute_ms_median": _median([c for r in runs for c in r["chunk_compute_ms"]]),
                    "fixed_window_share": runs[0]["fixed_share"],
                    "max_abs_diff_vs_whole_cpu": diff,
                    "offline_max_abs_diff_vs_cpu": whole_diff[name],
                    "details": backend.describe(),
                }
                rows.append(row)
                print(f"  {device:4} {name:5} F={chunk:<3} RTF {row['rtf_exact']:.3f}  first chunk "
                      f"{row['first_chunk_ms_median']:.2f} ms after unit {row['first_audio_after_units']}  "
                      f"max|diff| {diff:.1e}", flush=True)

        # low-latency deviation (backend independent): the fastest backend of the first device only
        if backends and not low_latency:
            name, backend = backends[-1]
            chunk = 8 if 8 in chunks else chunks[0]
            exact = _stream_once(StreamingSynthesizer(backend, chunk_frames=chunk), units)
            for right in low_rights:
                synth = StreamingSynthesizer(backend, chunk_frames=chunk, mode="low_latency",
                                             low_latency_right_frames=right, crossfade_ms=args.crossfade_ms)
                result = _stream_once(synth, units)
                low_latency.append({
                    "device": device, "backend": name, "chunk_frames": chunk, "right_frames": right,
                    "crossfade_ms": synth.crossfade_samples / 16, "snr_db": _snr_db(reference, result["audio"]),
                    "max_abs_diff": float(np.abs(result["audio"] - reference).max()),
                    "first_audio_after_units": result["first_unit"],
                    "exact_first_audio_after_units": exact["first_unit"],
                    "units_saved": (exact["first_unit"] or 0) - (result["first_unit"] or 0),
                    "rtf": result["total_ms"] / 1e3 / audio_s,
                    "exact_rtf": exact["total_ms"] / 1e3 / audio_s,
                })

    report = {
        "command": "speechgpt-rt bench-vocoder",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": _machine(devices),
        "model": {"parameters": params, "config": "release (docs/speechgpt-format.md, Vocoder files), random weights",
                  "units": n_units, "frames": int(expanded.size), "audio_s": audio_s,
                  "receptive_field": rf.to_dict()},
        "whole_utterance_torch_cpu_ms": whole_cpu_ms,
        "export": export_info,
        "rows": rows,
        "unavailable": unavailable,
        "low_latency": low_latency,
        "targets": {"cpu_exact_rtf_max": CPU_RTF_TARGET, "gpu_first_chunk_ms_max": GPU_FIRST_CHUNK_MS_TARGET},
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_before_after": [load_before, _loadavg()],
    }
    _print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


def _print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    where = machine.get("gpu") or machine["processor"]
    print(f"\nbench-vocoder  {report['date']}  {machine['platform']}  {where}  torch {machine['torch']}  "
          f"onnxruntime {machine.get('onnxruntime')}  threads {report['args']['threads']}")
    print(f"model {report['model']['parameters'] / 1e6:.2f} M params; utterance {report['model']['audio_s']:.2f} s; "
          f"export {report['export'].get('seconds', report['export'].get('error'))} s; "
          f"load average before/after {report['load_average_before_after']}")
    header = (f"{'device':6} {'backend':7} {'provider':22} {'F':>3} {'RTF exact':>9} {'RTF offline':>11} "
              f"{'1st chunk ms':>12} {'after unit':>10} {'chunk ms':>8} {'fixed':>5} {'max|diff|':>9} target")
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        if r["device"] == "cpu":
            verdict = "RTF<=0.1 " + ("yes" if r["rtf_exact"] <= CPU_RTF_TARGET else "no")
        else:
            verdict = "1st<=5ms " + ("yes" if r["first_chunk_ms_median"] <= GPU_FIRST_CHUNK_MS_TARGET else "no")
        print(f"{r['device']:6} {r['backend']:7} {r['provider']:22} {r['chunk_frames']:>3} {r['rtf_exact']:>9.3f} "
              f"{r['rtf_offline']:>11.3f} {r['first_chunk_ms_median']:>12.2f} {str(r['first_audio_after_units']):>10} "
              f"{r['chunk_compute_ms_median']:>8.2f} {r['fixed_window_share']:>5.2f} "
              f"{r['max_abs_diff_vs_whole_cpu']:>9.1e} {verdict}")
    for u in report["unavailable"]:
        print(f"{u['device']:6} {u['backend']:7} unavailable: {u['reason']}")
    # ratios measured side by side: torch time / onnx time for the same device and chunk size
    by_key = {(r["device"], r["backend"], r["chunk_frames"]): r for r in report["rows"]}
    ratio_lines = []
    for (device, backend, chunk), r in by_key.items():
        other = by_key.get((device, "onnx", chunk))
        if backend == "torch" and other:
            ratio_lines.append(f"  {device:4} F={chunk:<3} torch/onnx: RTF x{r['rtf_exact'] / other['rtf_exact']:.2f}, "
                               f"first chunk x{r['first_chunk_ms_median'] / other['first_chunk_ms_median']:.2f}")
    if ratio_lines:
        print("ratios (>1: onnxruntime faster)")
        print("\n".join(ratio_lines))
    if report["low_latency"]:
        print("low-latency mode vs exact (same backend, same units):")
        for l in report["low_latency"]:
            print(f"  F={l['chunk_frames']} right {l['right_frames']:>2} frames, crossfade {l['crossfade_ms']:.1f} ms: "
                  f"SNR {l['snr_db']:.1f} dB, max|diff| {l['max_abs_diff']:.3f}, first audio after unit "
                  f"{l['first_audio_after_units']} (exact {l['exact_first_audio_after_units']}, "
                  f"{l['units_saved']} units earlier), RTF {l['rtf']:.3f} (exact {l['exact_rtf']:.3f})")
    print(f"total {report['seconds']} s")
