"""The unit vocoder in ONNX: export (`speechgpt-rt export-vocoder`) and an ONNX Runtime runner.

Exported files (all self-contained: weights inside each .onnx, no .onnx.data):
- `duration_predictor.onnx`: units (1, T) int64 -> log_durations (1, T) float32, durations (1, T) int64.
- `generator.onnx`: expanded_units (1, W) int64 -> audio (1, W * hop) float32, W dynamic. The expansion
  (repeat_interleave) stays outside the graph: the embedding is per position, so expand-then-embed is the same.
- `generator_w{W}.onnx`: the same graph with W fixed, for CUDA-graph capture (static shapes, reused buffers).
  For each chunk size F two windows: F + left + right frames (steady state) and F + right (utterance start).
- `vocoder_onnx.json`: receptive field, hop, sample rate, window sizes, file names, versions.

This module imports only numpy/json (and the numpy-only `streaming.vocoder_types`) at load time: a process that
serves the exported model needs onnxruntime and numpy, not torch (torch is imported inside the export functions).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from streaming.load_errors import unreadable
from streaming.vocoder_types import ReceptiveField

log = logging.getLogger(__name__)

METADATA_NAME = "vocoder_onnx.json"
FORMAT_TAG = "speechgpt-rt-vocoder-onnx"
DURATION_FILE = "duration_predictor.onnx"
GENERATOR_FILE = "generator.onnx"
DEFAULT_FIXED_CHUNKS = (4, 8, 16, 32)
OPSET = 18
FRAMES_DIM = "frames"  # name of the dynamic time axis of the generator input
UNITS_DIM = "units"


# ------------------------------------------------------------------------------------------------------ export


def _fixed_file(window: int) -> str:
    return f"generator_w{window}.onnx"


def fixed_windows_for_chunks(chunk_frames: Sequence[int], left: int, right: int) -> list[int]:
    """Window sizes that let chunks of F frames run with a static shape: F + left + right and F + right."""
    windows = set()
    for f in chunk_frames:
        if int(f) <= 0:
            raise ValueError(f"chunk sizes must be positive, got {f}")
        windows.update((int(f) + left + right, int(f) + right))
    return sorted(windows)


def _pick_exporter(exporter: str) -> str:
    import importlib.util

    if exporter == "auto":
        return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    return exporter


def _export_module(module: Any, example: Any, path: Path, input_name: str, output_names: list[str], dim_name: str,
                   exporter: str) -> str:
    """Export one module with a dynamic axis 1 on its single input; returns the exporter that worked."""
    import warnings

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    # the dynamo exporter logs one warning per missing optional torchvision op: noise for this model
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    if exporter == "dynamo":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=True,
                    external_data=False,
                    input_names=[input_name],
                    output_names=output_names,
                    dynamic_shapes={input_name: {1: torch.export.Dim(dim_name, min=1, max=1 << 20)}},
                    opset_version=OPSET,
                    verbose=False,
                )
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - the legacy exporter is the documented fallback
            log.warning("dynamo ONNX export of %s failed (%s: %s); retrying with the TorchScript exporter",
                        path.name, type(exc).__name__, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=output_names,
            dynamic_axes={input_name: {1: dim_name}, **{name: {1: f"{name}_{dim_name}"} for name in output_names}},
            opset_version=OPSET,
        )
    return "torchscript"


def _external_data_files(path: Path) -> list[str]:
    """Names of external data files an .onnx file refers to (empty when self-contained)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    files = set()
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(entry.value)
    return sorted(files)


def _make_self_contained(path: Path) -> None:
    """If the exporter wrote weights beside the model, pull them back in (the model is far below 2 GB)."""
    import onnx

    data_files = _external_data_files(path)
    if not data_files:
        return
    model = onnx.load(str(path), load_external_data=True)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for name in data_files:
        (path.parent / name).unlink(missing_ok=True)


def _write_fixed_variant(dynamic_path: Path, out_path: Path, window: int, hop: int) -> None:
    """The dynamic generator graph with its time axis set to `window` frames (output window * hop samples)."""
    import onnx

    model = onnx.load(str(dynamic_path))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    in_dim = inp.type.tensor_type.shape.dim[1]
    in_dim.Clear()
    in_dim.dim_value = window
    out_dim = out.type.tensor_type.shape.dim[1]
    out_dim.Clear()
    out_dim.dim_value = window * hop
    # intermediate annotations may carry the symbolic axis; ORT infers the static shapes itself
    del model.graph.value_info[:]
    onnx.save_model(model, str(out_path), save_as_external_data=False)


def export_vocoder(
    vocoder: Any,
    out_dir: str | Path,
    *,
    fixed_chunk_frames: Sequence[int] = DEFAULT_FIXED_CHUNKS,
    exporter: str = "auto",
    verify: bool = True,
) -> dict[str, Any]:
    """Export a `streaming.vocoder.UnitVocoder` to ONNX files + `vocoder_onnx.json` in out_dir; returns the metadata.

    The `convert` command calls this. `verify` runs each file once in ONNX Runtime (CPU) against torch.
    """
    import copy

    import onnx
    import torch
    from torch import nn

    from streaming.vocoder import durations_from_log

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = copy.deepcopy(vocoder).to("cpu").float().eval()
    config = model.config
    rf = model.receptive_field
    chosen = _pick_exporter(exporter)

    class DurationGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dict = model.dict
            self.dur_predictor = model.dur_predictor

        def forward(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            log_durations = self.dur_predictor(self.dict(units))
            return log_durations, durations_from_log(log_durations)

    example_units = torch.arange(16, dtype=torch.int64)[None] % config.num_embeddings
    example_frames = torch.arange(64, dtype=torch.int64)[None] % config.num_embeddings
    used = {}
    with torch.no_grad():
        used["duration_predictor"] = _export_module(
            DurationGraph().eval(), example_units, out_dir / DURATION_FILE, "units",
            ["log_durations", "durations"], UNITS_DIM, chosen,
        )
        used["generator"] = _export_module(
            model, example_frames, out_dir / GENERATOR_FILE, "expanded_units", ["audio"], FRAMES_DIM, chosen,
        )
    for name in (DURATION_FILE, GENERATOR_FILE):
        _make_self_contained(out_dir / name)
        onnx.checker.check_model(str(out_dir / name))

    windows = fixed_windows_for_chunks(fixed_chunk_frames, rf.left_frames, rf.right_frames)
    fixed = []
    for window in windows:
        _write_fixed_variant(out_dir / GENERATOR_FILE, out_dir / _fixed_file(window), window, config.code_hop_size)
        fixed.append({"window_frames": window, "file": _fixed_file(window)})

    try:
        import onnxscript

        onnxscript_version = onnxscript.__version__
    except ImportError:
        onnxscript_version = None
    source = getattr(vocoder, "source", None)
    metadata: dict[str, Any] = {
        "format": FORMAT_TAG,
        "version": 1,
        "sample_rate": config.sampling_rate,
        "hop_size": config.code_hop_size,
        "num_embeddings": config.num_embeddings,
        "receptive_field": rf.to_dict(),
        "duration_predictor": {"file": DURATION_FILE, "input": "units", "outputs": ["log_durations", "durations"]},
        "generator": {"file": GENERATOR_FILE, "input": "expanded_units", "output": "audio", "dynamic_axis": FRAMES_DIM},
        "fixed_generators": fixed,
        "fixed_chunk_frames": sorted({int(f) for f in fixed_chunk_frames}),
        "exporter": used,
        "opset": OPSET,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxscript_version": onnxscript_version,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "source": None if source is None else {"kind": source.kind, "weights": source.weights_path,
                                               "config": source.config_path},
        "config": config.to_dict(),
        "export_seconds": None,
    }
    (out_dir / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    if verify:
        metadata["verification"] = verify_export(model, out_dir, fixed_window=windows[0] if windows else None)
    metadata["export_seconds"] = round(time.perf_counter() - started, 3)
    (out_dir / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def verify_export(
    vocoder: Any, out_dir: str | Path, fixed_window: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Max abs difference ONNX Runtime (CPU) vs torch on random inputs, per exported file."""
    import torch

    rng = np.random.default_rng(seed)
    runtime = OnnxVocoderRuntime(out_dir, device="cpu", load_fixed=False)
    n = vocoder.config.num_embeddings
    units = rng.integers(0, n, 37)
    frames = rng.integers(0, n, 70)
    with torch.inference_mode():
        ref_log = vocoder.log_durations(units).numpy()
        ref_audio = vocoder.generate(frames).numpy()
    log_dur, durations = runtime.durations(units)
    result = {
        "duration_log_max_abs_diff": float(np.abs(log_dur - ref_log).max()),
        "durations_equal": bool(np.array_equal(durations, vocoder.predict_durations(units).numpy())),
        "generator_max_abs_diff": float(np.abs(runtime.generate(frames) - ref_audio).max()),
    }
    if fixed_window is not None:
        import onnxruntime as ort

        path = str(Path(out_dir) / _fixed_file(fixed_window))
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        window = rng.integers(0, n, fixed_window)
        got = session.run(None, {"expanded_units": window[None]})[0][0]
        with torch.inference_mode():
            ref = vocoder.generate(window).numpy()
        result[f"generator_w{fixed_window}_max_abs_diff"] = float(np.abs(got - ref).max())
    return result


# ----------------------------------------------------------------------------------------------------- runtime


def resolve_onnx_dir(path: str | Path) -> Path:
    """The export directory for a path that is one, or a vocoder / bundle directory holding `onnx/` inside."""
    path = Path(path)
    for candidate in (path, path / "onnx", path / "vocoder" / "onnx"):
        if (candidate / METADATA_NAME).is_file():
            return candidate
    return path  # read_metadata names what is missing


def read_metadata(onnx_dir: str | Path) -> dict[str, Any]:
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no {METADATA_NAME} (run `speechgpt-rt export-vocoder` first)")
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise unreadable(path, "JSON file", exc) from exc
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    if metadata.get("format") != FORMAT_TAG:
        raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT_TAG!r}")
    files = [metadata["duration_predictor"]["file"], metadata["generator"]["file"]]
    files += [entry["file"] for entry in metadata.get("fixed_generators", [])]
    missing = [name for name in files if not (onnx_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{onnx_dir}: files named in {METADATA_NAME} are missing: {missing}")
    return metadata


def _is_model_load_error(exc: BaseException) -> bool:
    """onnxruntime could not parse the .onnx file itself (as opposed to a provider or option problem)."""
    # onnxruntime's exception classes live in its compiled module; its messages for unparsable files are stable
    return type(exc).__name__ in ("InvalidProtobuf", "NoModel") or "Load model from" in str(exc)


@dataclass
class _FixedSession:
    window: int
    session: Any
    binding: Any = None
    input_value: Any = None  # OrtValue on the device (CUDA graphs need fixed addresses)
    output_value: Any = None
    cuda_graph: bool = False


@dataclass
class OnnxVocoderRuntime:
    """ONNX Runtime sessions for the exported vocoder.

    device "cuda": CUDAExecutionProvider with IOBinding (output stays on the GPU until one copy back); fixed-window
    generators get their own sessions with CUDA graphs (`enable_cuda_graph`) when the provider allows it.
    device "cpu": CPUExecutionProvider, `intra_op_threads` threads, dynamic generator only.
    The provider actually used is read back from every session (onnxruntime-gpu silently falls back to CPU).
    """

    onnx_dir: str | Path
    device: str = "cpu"
    intra_op_threads: int | None = None
    use_cuda_graph: bool = True
    load_fixed: bool | None = None  # default: on CUDA only
    device_id: int = 0
    metadata: dict[str, Any] = field(init=False)
    receptive_field: ReceptiveField = field(init=False)
    providers: dict[str, list[str]] = field(init=False, default_factory=dict)
    notes: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.onnx_dir = resolve_onnx_dir(self.onnx_dir)
        self.metadata = read_metadata(self.onnx_dir)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                f"(available: {ort.get_available_providers()})"
            )
        self.receptive_field = ReceptiveField.from_dict(self.metadata.get("receptive_field"),
                                                        source=str(self.onnx_dir / METADATA_NAME))
        self.hop_size = int(self.metadata["hop_size"])
        self.sample_rate = int(self.metadata["sample_rate"])
        self.num_embeddings = int(self.metadata["num_embeddings"])
        self._duration = self._session(self.metadata["duration_predictor"]["file"], "duration_predictor")
        self._generator = self._session(self.metadata["generator"]["file"], "generator")
        self._fixed: dict[int, _FixedSession] = {}
        self._output_via_ortvalue = True
        load_fixed = self.device == "cuda" if self.load_fixed is None else self.load_fixed
        if load_fixed:
            for entry in self.metadata.get("fixed_generators", []):
                window = int(entry["window_frames"])
                self._fixed[window] = self._fixed_session(window, entry["file"])

    # ---- sessions
    def _session_options(self) -> Any:
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.intra_op_threads:
            options.intra_op_num_threads = int(self.intra_op_threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the CUDA-missing fallback is detected and reported below, not logged twice
        return options

    def _providers(self, cuda_graph: bool = False, fixed_shape: bool = False, tuned: bool = True) -> list[Any]:
        if self.device == "cpu":
            return ["CPUExecutionProvider"]
        cuda_options: dict[str, str] = {"device_id": str(self.device_id)}
        if tuned:
            cuda_options.update({
                "use_tf32": "0",  # fp32 stays fp32 (TF32 convolutions would be ~1e-3 off)
                # an exhaustive cuDNN search per new input shape would stall the dynamic windows; fixed ones search once
                "cudnn_conv_algo_search": "EXHAUSTIVE" if fixed_shape else "HEURISTIC",
            })
        if cuda_graph:
            cuda_options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]

    def _session(self, file_name: str, key: str, cuda_graph: bool = False, fixed_shape: bool = False) -> Any:
        path = str(self.onnx_dir / file_name)
        try:
            session = self._ort.InferenceSession(
                path, sess_options=self._session_options(), providers=self._providers(cuda_graph, fixed_shape)
            )
        except Exception as exc:  # noqa: BLE001 - an older provider may reject an option: retry with defaults
            if _is_model_load_error(exc):  # a broken file stays broken with other provider options
                raise unreadable(path, "ONNX model", exc) from exc
            if self.device == "cpu":
                raise
            self.notes.append(f"{key}: CUDA options rejected ({type(exc).__name__}: {exc}); provider defaults used")
            session = self._ort.InferenceSession(
                path, sess_options=self._session_options(),
                providers=self._providers(cuda_graph, fixed_shape, tuned=False),
            )
        self.providers[key] = list(session.get_providers())
        if self.device == "cuda" and self.providers[key][0] != "CUDAExecutionProvider":
            raise RuntimeError(
                f"{file_name}: CUDAExecutionProvider was requested but the session runs on {self.providers[key]} "
                "(no usable GPU / CUDA libraries for onnxruntime)"
            )
        return session

    def _fixed_session(self, window: int, file_name: str) -> _FixedSession:
        key = f"generator_w{window}"
        if self.device == "cpu":
            return _FixedSession(window, self._session(file_name, key))
        if self.use_cuda_graph:
            try:
                fixed = self._bind_fixed(window, self._session(file_name, key, cuda_graph=True, fixed_shape=True),
                                         cuda_graph=True)
                for _ in range(3):  # the first runs warm up (cuDNN search, allocations) and capture the graph
                    fixed.session.run_with_iobinding(fixed.binding)
                self._read_fixed_output(fixed)
                return fixed
            except Exception as exc:  # noqa: BLE001 - fall back to plain CUDA for this window, and say why
                self.notes.append(f"{key}: CUDA graph unavailable ({type(exc).__name__}: {exc}); plain CUDA instead")
        return self._bind_fixed(window, self._session(file_name, key, fixed_shape=True), cuda_graph=False)

    def _bind_fixed(self, window: int, session: Any, cuda_graph: bool) -> _FixedSession:
        ort = self._ort
        input_value = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, window), np.int64), "cuda", self.device_id)
        output_value = ort.OrtValue.ortvalue_from_shape_and_type(
            [1, window * self.hop_size], np.float32, "cuda", self.device_id
        )
        binding = session.io_binding()
        binding.bind_ortvalue_input("expanded_units", input_value)
        binding.bind_ortvalue_output("audio", output_value)
        return _FixedSession(window, session, binding, input_value, output_value, cuda_graph)

    def _read_fixed_output(self, fixed: _FixedSession) -> np.ndarray:
        if self._output_via_ortvalue:
            try:
                return fixed.output_value.numpy()[0]
            except Exception:  # noqa: BLE001 - builds without device->host OrtValue.numpy(): copy via the binding
                self._output_via_ortvalue = False
        return fixed.binding.copy_outputs_to_cpu()[0][0]

    # ---- public
    @property
    def provider(self) -> str:
        return self.providers["generator"][0]

    @property
    def fixed_windows(self) -> tuple[int, ...]:
        return tuple(sorted(self._fixed))

    @property
    def cuda_graph_windows(self) -> tuple[int, ...]:
        return tuple(sorted(w for w, f in self._fixed.items() if f.cuda_graph))

    def durations(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T,) int64 units -> ((T,) float32 log durations, (T,) int64 durations)."""
        feed = {"units": np.ascontiguousarray(units, dtype=np.int64).reshape(1, -1)}
        log_durations, durations = self._duration.run(None, feed)
        return log_durations[0], durations[0].astype(np.int64, copy=False)

    def generate(self, expanded_units: np.ndarray) -> np.ndarray:
        """(W,) int64 expanded units -> (W * hop,) float32 audio."""
        ids = np.ascontiguousarray(expanded_units, dtype=np.int64).reshape(1, -1)
        fixed = self._fixed.get(ids.shape[1])
        if fixed is not None and fixed.binding is not None:
            fixed.input_value.update_inplace(ids)
            fixed.session.run_with_iobinding(fixed.binding)
            return self._read_fixed_output(fixed)
        if fixed is not None:
            return fixed.session.run(None, {"expanded_units": ids})[0][0]
        if self.device == "cuda":
            binding = self._generator.io_binding()
            binding.bind_cpu_input("expanded_units", ids)
            binding.bind_output("audio", "cuda", self.device_id)
            self._generator.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0][0]
        return self._generator.run(None, {"expanded_units": ids})[0][0]


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", required=True, type=Path,
                        help="vocoder directory (release vocoder.pt/g_00500000 or converted model.safetensors, with "
                             "config.json) or a bundle directory containing vocoder/")
    parser.add_argument("-o", "--out-dir", required=True, type=Path, help="where the .onnx files and metadata go")
    parser.add_argument("--chunk-frames", default=",".join(str(f) for f in DEFAULT_FIXED_CHUNKS),
                        help="chunk sizes (frames) that get fixed-window generator variants, comma separated "
                             "(empty: none)")
    parser.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")


def run(args: argparse.Namespace) -> int:
    from streaming.vocoder import load_vocoder

    try:
        chunks = [int(x) for x in str(args.chunk_frames).split(",") if x.strip()]
    except ValueError:
        print(f"export-vocoder: --chunk-frames must be comma-separated ints, got {args.chunk_frames!r}")
        return 2
    try:
        vocoder = load_vocoder(args.model_dir)
    except (FileNotFoundError, ValueError) as exc:  # config / checkpoint problems name the file and the field
        print(f"export-vocoder: {exc}", file=sys.stderr)
        return 2
    print(f"loaded {vocoder.source.kind} vocoder: {vocoder.source.weights_path}")
    metadata = export_vocoder(vocoder, args.out_dir, fixed_chunk_frames=chunks, exporter=args.exporter,
                              verify=not args.no_verify)
    files = [metadata["duration_predictor"]["file"], metadata["generator"]["file"]]
    files += [entry["file"] for entry in metadata["fixed_generators"]]
    print(f"exported to {args.out_dir} in {metadata['export_seconds']} s with {metadata['exporter']}: "
          f"{', '.join(files)}")
    if "verification" in metadata:
        print("verification (ONNX Runtime CPU vs torch): " + json.dumps(metadata["verification"]))
    return 0
