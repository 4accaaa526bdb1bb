"""Every loader in streaming/ names a broken file: an empty file and a truncated copy of a valid tiny one.

The valid files come from the tiny bundle (release formats) and from converting them (safetensors, centers.npy,
ONNX). Each case copies the valid input, breaks one file and expects a ValueError whose message carries that
file's path, its size and what the reader said, instead of torch's bare "Ran out of input".
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from agent.bundle import RELEASE_HUBERT, RELEASE_KMEANS, RELEASE_VOCODER_DIR
from streaming.fairseq_pickle import load_fairseq_checkpoint
from streaming.hubert import load_hubert, save_converted_hubert
from streaming.kmeans import load_kmeans, save_converted_kmeans
from streaming.load_errors import UnreadableFile
from streaming.vocoder import VocoderCheckpointError, VocoderConfigError, load_vocoder, save_converted
from streaming.vocoder_onnx import METADATA_NAME, OnnxVocoderRuntime, export_vocoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def valid(tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    """name -> a valid file or directory of each format a streaming loader reads."""
    out = tmp_path_factory.mktemp("valid")
    hubert_pt = tiny_bundle / RELEASE_HUBERT
    hubert = load_hubert(hubert_pt)
    vocoder = load_vocoder(tiny_bundle / RELEASE_VOCODER_DIR)
    export_vocoder(vocoder, out / "onnx", fixed_chunk_frames=(), verify=False)
    return {
        "hubert_pt": hubert_pt,
        "hubert_converted": save_converted_hubert(hubert.model, hubert.normalize, out / "hubert"),
        "kmeans_bin": tiny_bundle / RELEASE_KMEANS,
        "kmeans_npy": save_converted_kmeans(load_kmeans(tiny_bundle / RELEASE_KMEANS), out / "kmeans"),
        "vocoder_release": tiny_bundle / RELEASE_VOCODER_DIR,
        "vocoder_converted": save_converted(vocoder, out / "vocoder"),
        "onnx": out / "onnx",
    }


def _onnx_runtime(path: Path) -> OnnxVocoderRuntime:
    return OnnxVocoderRuntime(path, device="cpu", load_fixed=False)


# (case id, entry of `valid`, file to break inside it or "" for the entry itself, loader, expected error class)
CASES: list[tuple[str, str, str, Callable[[Path], object], type]] = [
    ("fairseq_checkpoint", "hubert_pt", "", load_fairseq_checkpoint, UnreadableFile),
    ("hubert_pt", "hubert_pt", "", load_hubert, UnreadableFile),
    ("hubert_converted_weights", "hubert_converted", "model.safetensors", load_hubert, UnreadableFile),
    ("hubert_converted_config", "hubert_converted", "config.json", load_hubert, UnreadableFile),
    ("kmeans_joblib", "kmeans_bin", "", load_kmeans, UnreadableFile),
    ("kmeans_centers_npy", "kmeans_npy", "", load_kmeans, UnreadableFile),
    ("vocoder_release_weights", "vocoder_release", "vocoder.pt", load_vocoder, VocoderCheckpointError),
    ("vocoder_release_config", "vocoder_release", "config.json", load_vocoder, VocoderConfigError),
    ("vocoder_converted_weights", "vocoder_converted", "model.safetensors", load_vocoder, VocoderCheckpointError),
    ("vocoder_converted_config", "vocoder_converted", "config.json", load_vocoder, VocoderConfigError),
    ("onnx_duration_predictor", "onnx", "duration_predictor.onnx", _onnx_runtime, UnreadableFile),
    ("onnx_generator", "onnx", "generator.onnx", _onnx_runtime, UnreadableFile),
    ("onnx_metadata", "onnx", METADATA_NAME, _onnx_runtime, UnreadableFile),
]


@pytest.mark.parametrize("damage", ["empty", "truncated"])
@pytest.mark.parametrize(("entry", "inside", "loader", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_file_is_named(valid, tmp_path, damage, entry, inside, loader, error):
    source = valid[entry]
    copy = tmp_path / source.name
    if source.is_dir():
        shutil.copytree(source, copy)
    else:
        shutil.copyfile(source, copy)
    broken = copy / inside if inside else copy
    data = broken.read_bytes()
    assert len(data) > 16, f"{broken} is too small to truncate meaningfully"
    kept = b"" if damage == "empty" else data[: len(data) // 2]
    broken.write_bytes(kept)

    with pytest.raises(error) as info:
        loader(copy)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(broken) in message, message
    assert re.search(rf"truncated or empty file\? {len(kept)} bytes\)", message), message


def test_valid_copies_still_load(valid):
    """The fixture's files are loadable: the broken copies fail because of the damage, not the format."""
    assert load_fairseq_checkpoint(valid["hubert_pt"])["model"]
    assert load_hubert(valid["hubert_converted"]).hidden_size > 0
    assert load_kmeans(valid["kmeans_npy"]).num_units == load_kmeans(valid["kmeans_bin"]).num_units
    assert load_vocoder(valid["vocoder_release"]).source.kind == "release"
    assert load_vocoder(valid["vocoder_converted"]).source.kind == "converted"
    assert _onnx_runtime(valid["onnx"]).provider == "CPUExecutionProvider"


def test_vocoder_checkpoint_with_a_foreign_global_still_asks_for_trust(valid, tmp_path):
    """An intact file that torch's weights-only reader refuses is not called broken: the message offers the
    allow_unsafe_pickle escape, and with it the file is read (and then checked like any other)."""
    shutil.copytree(valid["vocoder_release"], tmp_path / "vocoder")
    checkpoint = tmp_path / "vocoder" / "vocoder.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["args"] = argparse.Namespace(seed=1)  # what a training script might have pickled beside the weights
    torch.save(state, checkpoint)
    with pytest.raises(VocoderCheckpointError, match="allow_unsafe_pickle") as info:
        load_vocoder(tmp_path / "vocoder")
    assert "truncated" not in str(info.value)
    assert load_vocoder(tmp_path / "vocoder", allow_unsafe_pickle=True).source.kind == "release"
