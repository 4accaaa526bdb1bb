"""The reference unit vocoder (streaming/vocoder.py) against an independent implementation of the description in
docs/speechgpt-format.md, Vocoder forward pass.

The reference below is written from the description alone: it reads the RAW release state dict (weight_g /
weight_v), folds weight norm itself, and runs the network with its own F.conv1d / F.conv_transpose1d calls in
float64. Each test draws fresh random inputs from its own seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streaming.vocoder import (
    FINAL_LRELU_SLOPE,
    RELEASE_CONFIG,
    UnitVocoder,
    VocoderCheckpointError,
    VocoderConfig,
    VocoderConfigError,
    durations_from_log,
    load_vocoder,
    receptive_field,
    save_converted,
)
from streaming.tiny_parts import tiny_release_config, write_tiny_vocoder

HOP = 320


# ------------------------------------------------------------------------------------ independent reference


def ref_weight(raw: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """Fold weight norm from the raw g / v tensors: W = g * v / ||v|| over all dims but 0."""
    g = raw[f"{layer}.weight_g"].double()
    v = raw[f"{layer}.weight_v"].double()
    norm = torch.sqrt((v**2).sum(dim=tuple(range(1, v.dim())), keepdim=True))
    return g * v / norm


def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # x: (T, C), normalised over C, eps 1e-5 (torch.nn.LayerNorm default, as fairseq's VariancePredictor)
    mean = x.mean(dim=1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.double() + bias.double()


def ref_durations(raw: dict[str, torch.Tensor], units: np.ndarray) -> np.ndarray:
    emb = raw["dict.weight"].double()[torch.as_tensor(units)]  # (T, C)
    p = "dur_predictor."
    h = F.conv1d(emb.T[None], raw[p + "conv1.0.weight"].double(), raw[p + "conv1.0.bias"].double(), padding=1)[0].T
    h = ref_layer_norm(torch.relu(h), raw[p + "ln1.weight"], raw[p + "ln1.bias"])
    h = F.conv1d(h.T[None], raw[p + "conv2.0.weight"].double(), raw[p + "conv2.0.bias"].double(), padding=1)[0].T
    h = ref_layer_norm(torch.relu(h), raw[p + "ln2.weight"], raw[p + "ln2.bias"])
    log_dur = (h @ raw[p + "proj.weight"].double().T + raw[p + "proj.bias"].double())[:, 0].numpy()
    # numpy's round is half-to-even, as torch.round / ONNX Round
    return np.maximum(np.round(np.exp(log_dur) - 1.0), 1).astype(np.int64)


def ref_generator(raw: dict[str, torch.Tensor], cfg: dict, expanded: np.ndarray) -> np.ndarray:
    x = raw["dict.weight"].double()[torch.as_tensor(expanded)].T[None]  # (1, C, T)
    x = F.conv1d(x, ref_weight(raw, "conv_pre"), raw["conv_pre.bias"].double(), padding=3)
    kernels, dilations = cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"]
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        x = F.leaky_relu(x, 0.1)
        x = F.conv_transpose1d(x, ref_weight(raw, f"ups.{i}"), raw[f"ups.{i}.bias"].double(), stride=u, padding=(k - u) // 2)
        total = torch.zeros_like(x)
        for j, (rk, dils) in enumerate(zip(kernels, dilations)):
            name = f"resblocks.{i * len(kernels) + j}"
            y = x
            for m, d in enumerate(dils):
                t = F.leaky_relu(y, 0.1)
                t = F.conv1d(t, ref_weight(raw, f"{name}.convs1.{m}"), raw[f"{name}.convs1.{m}.bias"].double(),
                             dilation=d, padding=d * (rk - 1) // 2)
                t = F.leaky_relu(t, 0.1)
                t = F.conv1d(t, ref_weight(raw, f"{name}.convs2.{m}"), raw[f"{name}.convs2.{m}.bias"].double(),
                             padding=(rk - 1) // 2)
                y = y + t
            total = total + y
        x = total / len(kernels)
    x = F.leaky_relu(x, 0.01)
    x = F.conv1d(x, ref_weight(raw, "conv_post"), raw["conv_post.bias"].double(), padding=3)
    return torch.tanh(x)[0, 0].numpy()


# ----------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_vocoder")
    write_tiny_vocoder(path, seed=11)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> UnitVocoder:
    return load_vocoder(tiny_dir)


@pytest.fixture(scope="module")
def raw_state(tiny_dir) -> dict[str, torch.Tensor]:
    return torch.load(tiny_dir / "vocoder.pt", weights_only=True)["generator"]


@pytest.fixture(scope="module")
def raw_config(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


# -------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed,length", [(1, 1), (2, 3), (3, 17), (4, 60)])
def test_synthesize_matches_independent_reference(tiny, raw_state, raw_config, seed, length):
    rng = np.random.default_rng(seed)
    units = rng.integers(0, 1000, length)
    durations = ref_durations(raw_state, units)
    assert np.array_equal(tiny.predict_durations(units).numpy(), durations)
    expected = ref_generator(raw_state, raw_config, np.repeat(units, durations))
    got = tiny.synthesize(units)
    assert got.dtype == np.float32
    assert got.shape == (HOP * int(durations.sum()),)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_generate_with_random_durations_matches_reference(tiny, raw_state, raw_config, seed):
    rng = np.random.default_rng(seed)
    units = rng.integers(0, 1000, int(rng.integers(1, 30)))
    durations = rng.integers(1, 6, units.size)
    expanded = tiny.expand(units, durations)
    assert expanded.tolist() == np.repeat(units, durations).tolist()
    got = tiny.generate(expanded).numpy()
    assert got.shape == (HOP * int(durations.sum()),)
    np.testing.assert_allclose(got, ref_generator(raw_state, raw_config, expanded.numpy()), atol=1e-5, rtol=0)


def test_expand_then_embed_equals_embed_then_expand(tiny):
    rng = np.random.default_rng(8)
    units = torch.as_tensor(rng.integers(0, 1000, 12))
    durations = torch.as_tensor(rng.integers(1, 5, 12))
    with torch.inference_mode():
        embedded_first = torch.repeat_interleave(tiny.dict(units)[None].transpose(1, 2), durations, dim=2)
        a = tiny.generator_from_features(embedded_first)[0]
    b = tiny.generate(tiny.expand(units, durations))
    assert torch.equal(a, b)


def _float32_bias_for(target: float) -> float:
    """A float32 b with float32 exp(b) - 1 == target exactly (searched around log(target + 1))."""
    start = np.float32(math.log(target + 1.0))
    candidates = [start]
    up = down = start
    for _ in range(64):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        candidates += [up, down]
    for b in candidates:
        if (torch.exp(torch.full((8,), b, dtype=torch.float32)) - 1.0).tolist() == [target] * 8:
            return float(b)
    pytest.fail(f"no float32 log duration gives exactly {target}")


def test_duration_rounding_is_half_to_even(tiny):
    # the .5 values float32 exp can produce exactly; 8.5 and 10.5 tell half-to-even (8, 10) from half-up (9, 11)
    targets = [0.5, 1.5, 3.5, 5.5, 7.5, 8.5, 10.5]
    log_durations = torch.tensor([_float32_bias_for(t) for t in targets], dtype=torch.float32)
    assert (torch.exp(log_durations) - 1.0).tolist() == targets  # the .5 cases really are hit
    assert durations_from_log(log_durations).tolist() == [1, 2, 4, 6, 8, 8, 10]  # 0.5 -> 0 -> clamped to 1

    # end to end through the module: a constant log duration from the projection bias
    model = UnitVocoder(tiny.config)
    model.load_state_dict(tiny.state_dict())
    model.dur_predictor.proj.weight.zero_()
    for target, expected in [(8.5, 8), (10.5, 10), (3.5, 4)]:
        model.dur_predictor.proj.bias.fill_(_float32_bias_for(target))
        assert model.predict_durations([1, 2, 3, 4]).tolist() == [expected] * 4


def test_final_leaky_relu_uses_default_slope(tiny):
    """The input of conv_post is leaky_relu(MRF output, 0.01), not 0.1 (the classic porting bug)."""
    captured = {}
    num_kernels = len(tiny.config.resblock_kernel_sizes)
    last = list(tiny.resblocks)[-num_kernels:]
    handles = [block.register_forward_hook(lambda m, i, o, j=j: captured.__setitem__(j, o)) for j, block in enumerate(last)]
    handles.append(tiny.conv_post.register_forward_hook(lambda m, i, o: captured.__setitem__("post_in", i[0])))
    try:
        tiny.generate(torch.as_tensor(np.random.default_rng(9).integers(0, 1000, 20)))
    finally:
        for h in handles:
            h.remove()
    mrf = sum(captured[j] for j in range(num_kernels)) / num_kernels
    assert (mrf < 0).any(), "no negative activations: the slope would not matter"
    torch.testing.assert_close(captured["post_in"], F.leaky_relu(mrf, 0.01))
    assert not torch.allclose(captured["post_in"], F.leaky_relu(mrf, 0.1))
    assert FINAL_LRELU_SLOPE == 0.01


@pytest.mark.parametrize("length", [1, 2, 9])
def test_output_length_is_hop_times_total_duration(tiny, length):
    units = np.random.default_rng(100 + length).integers(0, 1000, length)
    durations = tiny.predict_durations(units)
    assert durations.dtype == torch.int64 and int(durations.min()) >= 1
    assert tiny.synthesize(units).shape == (HOP * int(durations.sum()),)


def test_receptive_field_is_21_frames_and_2_units(tiny):
    for config in (tiny.config, VocoderConfig.from_dict(RELEASE_CONFIG)):
        rf = receptive_field(config)
        assert (rf.left_frames, rf.right_frames, rf.duration_left_units, rf.duration_right_units) == (21, 21, 2, 2)


def test_receptive_field_matches_gradient_support(tiny):
    """Which input frames move the audio of frame f: exactly [f-21, f+21]; durations of unit i: [i-2, i+2]."""
    frames, f = 80, 40
    features = torch.randn(1, tiny.config.embedding_dim, frames, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    model = UnitVocoder(tiny.config).double()
    model.load_state_dict(tiny.state_dict())
    features.requires_grad_(True)
    audio = model.generator_from_features(features)[0]
    audio[HOP * f : HOP * (f + 1)].sum().backward()
    support = torch.nonzero(features.grad.abs().sum(dim=1)[0] > 0).flatten()
    assert (int(support.min()), int(support.max())) == (f - 21, f + 21)

    emb = torch.randn(1, 30, tiny.config.embedding_dim, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    emb.requires_grad_(True)
    model.dur_predictor(emb)[0, 15].backward()
    support = torch.nonzero(emb.grad.abs().sum(dim=2)[0] > 0).flatten()
    assert support.tolist() == [13, 14, 15, 16, 17]


@pytest.mark.parametrize(
    "bad,value,position",
    [([3, -1, 5], "-1", "position 1"), ([0, 1, 2, 1000], "1000", "position 3"), ([7, 2000], "2000", "position 1")],
)
def test_bad_unit_ids_raise(tiny, bad, value, position):
    with pytest.raises(ValueError, match=rf"{value}.*{position}"):
        tiny.synthesize(bad)
    with pytest.raises(ValueError, match=rf"{value}.*{position}"):
        tiny.predict_durations(bad)


def test_empty_and_non_integer_units_raise(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.synthesize([])
    with pytest.raises(ValueError, match="1.5.*position 1"):
        tiny.synthesize([1, 1.5])


# ------------------------------------------------------------------------------------------ checkpoints


def _write_release(directory: Path, checkpoint, config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, directory / "vocoder.pt")
    (directory / "config.json").write_text(json.dumps(config or tiny_release_config()))
    return directory


def test_missing_key_is_named(tmp_path, raw_state):
    state = dict(raw_state)
    del state["resblocks.4.convs1.2.weight_v"]
    path = _write_release(tmp_path / "v", {"generator": state})
    with pytest.raises(VocoderCheckpointError, match=r"resblocks\.4\.convs1\.2\.weight_v") as info:
        load_vocoder(path)
    assert str(path / "vocoder.pt") in str(info.value)


def test_wrong_shape_and_unexpected_keys_listed_together(tmp_path, raw_state):
    state = dict(raw_state)
    state["conv_pre.weight_g"] = torch.ones(7, 1, 1)
    state["ups.1.bias"] = torch.zeros(3)
    state["spkr.weight"] = torch.zeros(2, 2)
    del state["dur_predictor.proj.bias"]
    path = _write_release(tmp_path / "v", {"generator": state})
    with pytest.raises(VocoderCheckpointError) as info:
        load_vocoder(path)
    message = str(info.value)
    for key in ("conv_pre.weight_g", "ups.1.bias", "spkr.weight", "dur_predictor.proj.bias", "4 problems"):
        assert key in message


def test_checkpoint_without_generator_key(tmp_path, raw_state):
    path = _write_release(tmp_path / "v", {"model": dict(raw_state)})
    with pytest.raises(VocoderCheckpointError, match="'generator'"):
        load_vocoder(path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"code_hop_size": 256}, "code_hop_size"),
        ({"resblock": "2"}, "resblock"),
        ({"f0": True}, "'f0'"),
        ({"multispkr": "from_input_file"}, "multispkr"),
        ({"upsample_kernel_sizes": [11, 8, 8, 4]}, "upsample_kernel_sizes"),
        ({"dur_predictor_params": None}, "dur_predictor_params"),
    ],
)
def test_config_validation(change, match):
    config = tiny_release_config()
    config.update(change)
    with pytest.raises(VocoderConfigError, match=match):
        VocoderConfig.from_dict(config, source="my/config.json")


def test_config_missing_field_is_named(tmp_path):
    config = tiny_release_config()
    del config["upsample_rates"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(VocoderConfigError, match=r"config\.json.*upsample_rates"):
        VocoderConfig.from_json(tmp_path / "config.json")


def test_tiny_writer_is_deterministic_and_loads(tmp_path):
    write_tiny_vocoder(tmp_path / "a", seed=5)
    write_tiny_vocoder(tmp_path / "b", seed=5)
    write_tiny_vocoder(tmp_path / "c", seed=6)
    a = torch.load(tmp_path / "a" / "vocoder.pt", weights_only=True)["generator"]
    b = torch.load(tmp_path / "b" / "vocoder.pt", weights_only=True)["generator"]
    c = torch.load(tmp_path / "c" / "vocoder.pt", weights_only=True)["generator"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(k.endswith(".weight_g") for k in a) and any(k.endswith(".weight_v") for k in a)
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    assert (tmp_path / "a" / "vocoder.pt").read_bytes() == (tmp_path / "b" / "vocoder.pt").read_bytes()
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["upsample_rates"] == [5, 4, 4, 2, 2] and config["num_embeddings"] == 1000
    model = load_vocoder(tmp_path / "a")
    assert model.source.kind == "release"
    durations = model.predict_durations(np.random.default_rng(3).integers(0, 1000, 200))
    assert len(set(durations.tolist())) >= 3, "the tiny duration predictor should give varied durations"


def test_release_file_names_and_bundle_dir(tmp_path, tiny_dir, tiny):
    bundle = tmp_path / "bundle"
    (bundle / "vocoder").mkdir(parents=True)
    (bundle / "vocoder" / "g_00500000").write_bytes((tiny_dir / "vocoder.pt").read_bytes())
    (bundle / "vocoder" / "config.json").write_bytes((tiny_dir / "config.json").read_bytes())
    model = load_vocoder(bundle)
    assert model.source.kind == "release" and model.source.weights_path.endswith("g_00500000")
    units = [5, 6, 7, 999, 0]
    assert np.array_equal(model.synthesize(units), tiny.synthesize(units))


def test_parametrization_key_names_are_accepted(tmp_path, raw_state, tiny):
    renamed = {
        k.replace(".weight_g", ".parametrizations.weight.original0").replace(".weight_v", ".parametrizations.weight.original1"): v
        for k, v in raw_state.items()
    }
    model = load_vocoder(_write_release(tmp_path / "v", {"generator": renamed}))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny.state_dict().items())


def test_converted_round_trip_is_identical(tmp_path, tiny):
    out = save_converted(tiny, tmp_path / "converted")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = load_vocoder(out)
    assert loaded.source.kind == "converted"
    assert loaded.config == tiny.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny.state_dict().items())
    units = np.random.default_rng(21).integers(0, 1000, 25)
    assert np.array_equal(loaded.synthesize(units), tiny.synthesize(units))
    # a directory with both formats loads the converted one, and says so
    (out / "vocoder.pt").write_bytes(b"not read")
    assert load_vocoder(out).source.kind == "converted"


def test_converted_wrong_shape_is_named(tmp_path, tiny):
    from safetensors.torch import save_file

    out = save_converted(tiny, tmp_path / "converted")
    state = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    state["conv_post.weight"] = torch.zeros(1, 3, 7)
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(VocoderCheckpointError, match=r"conv_post\.weight.*\[1, 3, 7\]"):
        load_vocoder(out)
