"""ONNX export of the unit vocoder: files, metadata, ONNX Runtime vs torch, a fresh process without torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agent.cli import main as cli_main
from streaming.tiny_parts import write_tiny_vocoder
from streaming.vocoder import load_vocoder, save_converted
from streaming.vocoder_onnx import (
    METADATA_NAME,
    OnnxVocoderRuntime,
    export_vocoder,
    read_metadata,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vocoder")
    write_tiny_vocoder(path, seed=23)
    return load_vocoder(path)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    export_vocoder(tiny, out, fixed_chunk_frames=(4, 8))
    return out


@pytest.fixture(scope="module")
def runtime(exported) -> OnnxVocoderRuntime:
    return OnnxVocoderRuntime(exported, device="cpu", intra_op_threads=1, load_fixed=True)


def test_metadata_and_files(exported):
    meta = json.loads((exported / METADATA_NAME).read_text())
    assert meta["receptive_field"] == {"left_frames": 21, "right_frames": 21, "duration_left_units": 2,
                                       "duration_right_units": 2}
    assert (meta["hop_size"], meta["sample_rate"], meta["num_embeddings"]) == (320, 16000, 1000)
    assert sorted(e["window_frames"] for e in meta["fixed_generators"]) == [25, 29, 46, 50]  # F+21, F+42
    assert meta["torch_version"] == torch.__version__ and meta["onnx_version"] == onnx.__version__
    verification = meta["verification"]
    assert verification["durations_equal"] and verification["generator_max_abs_diff"] <= 1e-5
    # self-contained: every file listed exists, holds its weights, and nothing else is needed
    names = [meta["duration_predictor"]["file"], meta["generator"]["file"]] + [e["file"] for e in meta["fixed_generators"]]
    assert sorted(p.name for p in exported.iterdir()) == sorted(names + [METADATA_NAME])
    for name in names:
        model = onnx.load(str(exported / name), load_external_data=False)
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), name
    fixed = onnx.load(str(exported / "generator_w50.onnx"))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 50
    assert fixed.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 50 * 320


def test_duration_graph_uses_onnx_round_half_to_even(exported):
    ops = {node.op_type for node in onnx.load(str(exported / "duration_predictor.onnx")).graph.node}
    assert "Round" in ops  # ONNX Round is half-to-even, like torch.round
    # and ONNX Runtime implements it so
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Round", ["x"], ["y"])], "round",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([0.5, 1.5, 2.5, 3.5, 4.5, -0.5], dtype=np.float32)
    assert session.run(None, {"x": x})[0].tolist() == [0.0, 2.0, 2.0, 4.0, 4.0, -0.0]


@pytest.mark.parametrize("length", [1, 2, 5, 37, 200])
def test_duration_predictor_matches_torch(tiny, runtime, length):
    units = np.random.default_rng(1000 + length).integers(0, 1000, length)
    log_dur, durations = runtime.durations(units)
    assert log_dur.shape == (length,) and durations.dtype == np.int64
    np.testing.assert_allclose(log_dur, tiny.log_durations(units).numpy(), atol=1e-5, rtol=0)
    assert np.array_equal(durations, tiny.predict_durations(units).numpy())


@pytest.mark.parametrize("frames", [1, 7, 25, 50, 151])
def test_generator_matches_torch(tiny, runtime, frames):
    expanded = np.random.default_rng(2000 + frames).integers(0, 1000, frames)
    audio = runtime.generate(expanded)  # 25 / 50 run on the fixed-window sessions
    assert audio.shape == (frames * 320,) and audio.dtype == np.float32
    np.testing.assert_allclose(audio, tiny.generate(expanded).numpy(), atol=1e-5, rtol=0)


def test_runtime_reports_cpu_provider(runtime):
    assert runtime.provider == "CPUExecutionProvider"
    assert all(p[0] == "CPUExecutionProvider" for p in runtime.providers.values())
    assert runtime.fixed_windows == (25, 29, 46, 50)


def test_runtime_receptive_field_is_the_torch_dataclass(tiny, runtime):
    assert type(runtime.receptive_field) is type(tiny.receptive_field)
    assert runtime.receptive_field == tiny.receptive_field


def test_bad_receptive_field_in_metadata_is_named(exported, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in exported.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    meta = json.loads((copy / METADATA_NAME).read_text())
    meta["receptive_field"]["right_frames"] = "21"
    (copy / METADATA_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"vocoder_onnx\.json: receptive_field\.right_frames must be an int"):
        OnnxVocoderRuntime(copy, device="cpu", load_fixed=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU fallback detection")
def test_cuda_request_without_gpu_is_reported(exported):
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        OnnxVocoderRuntime(exported, device="cuda")


def test_missing_file_is_named(exported, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in exported.iterdir():
        if path.name != "generator.onnx":
            (copy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="generator.onnx"):
        read_metadata(copy)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import onnxruntime as ort

    onnx_dir, io_path = Path(sys.argv[1]), sys.argv[2]
    meta = json.loads((onnx_dir / "vocoder_onnx.json").read_text())
    data = np.load(io_path + ".in.npz")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    dur = ort.InferenceSession(str(onnx_dir / meta["duration_predictor"]["file"]), opts, providers=["CPUExecutionProvider"])
    gen = ort.InferenceSession(str(onnx_dir / meta["generator"]["file"]), opts, providers=["CPUExecutionProvider"])
    units = data["units"][None]
    log_dur, durations = dur.run(None, {meta["duration_predictor"]["input"]: units})
    expanded = np.repeat(units[0], durations[0])[None]
    audio = gen.run(None, {meta["generator"]["input"]: expanded})[0][0]
    np.savez(io_path + ".out.npz", durations=durations[0], audio=audio)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "streaming", "agent"))
    print(json.dumps({"loaded": loaded, "provider": gen.get_providers()[0]}))
    """
)


def test_exported_model_runs_in_fresh_process_without_torch(tiny, exported, tmp_path):
    units = np.random.default_rng(31).integers(0, 1000, 40)
    io_path = str(tmp_path / "io")
    np.savez(io_path + ".in.npz", units=units)
    script = tmp_path / "run_exported.py"
    script.write_text(FRESH_PROCESS_SCRIPT)
    # -I: isolated mode, the repo is not on sys.path: only the exported files can be used
    result = subprocess.run([sys.executable, "-I", str(script), str(exported), io_path], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["provider"] == "CPUExecutionProvider"
    out = np.load(io_path + ".out.npz")
    assert np.array_equal(out["durations"], tiny.predict_durations(units).numpy())
    np.testing.assert_allclose(out["audio"], tiny.synthesize(units), atol=1e-5, rtol=0)


def test_streaming_synthesizer_on_onnx_needs_no_torch(tiny, exported, tmp_path):
    """The project's own ONNX path (synthesizer + runtime) in a fresh process: torch never imported."""
    units = np.random.default_rng(32).integers(0, 1000, 30)
    code = textwrap.dedent(
        f"""
        import sys, json
        import numpy as np
        from streaming.synthesizer import OnnxBackend, StreamingSynthesizer
        synth = StreamingSynthesizer(OnnxBackend({str(exported)!r}, threads=1), chunk_frames=5)
        audio = synth.synthesize_all([int(u) for u in {units.tolist()!r}])
        np.save({str(tmp_path / "audio.npy")!r}, audio)
        print(json.dumps({{"torch": "torch" in sys.modules}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"torch": False}
    np.testing.assert_allclose(np.load(tmp_path / "audio.npy"), tiny.synthesize(units), atol=1e-5, rtol=0)


def test_cli_export_from_bundle_with_converted_vocoder(tiny, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    save_converted(tiny, bundle / "vocoder")
    out = bundle / "vocoder" / "onnx"  # where the converted bundle keeps it
    rc = cli_main(["export-vocoder", "--model-dir", str(bundle), "-o", str(out), "--chunk-frames", "8",
                   "--exporter", "torchscript"])
    assert rc == 0
    assert "loaded converted vocoder" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["exporter"] == {"duration_predictor": "torchscript", "generator": "torchscript"}
    assert meta["source"]["kind"] == "converted"
    assert sorted(e["window_frames"] for e in meta["fixed_generators"]) == [29, 50]
    runtime = OnnxVocoderRuntime(bundle, load_fixed=True)  # found from the bundle root
    assert runtime.onnx_dir == out
    expanded = np.random.default_rng(33).integers(0, 1000, 29)
    np.testing.assert_allclose(runtime.generate(expanded), tiny.generate(expanded).numpy(), atol=1e-5, rtol=0)


def test_cli_export_names_a_missing_vocoder(tmp_path, capsys):
    rc = cli_main(["export-vocoder", "--model-dir", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")])
    assert rc == 2
    assert "nowhere" in capsys.readouterr().err
