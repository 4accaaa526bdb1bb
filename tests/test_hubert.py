"""fairseq HuBERT checkpoint -> transformers HubertModel: restricted loading, strict mapping, layer-11 features.

The reference for the mapping is an independent forward pass written here from fairseq's layer description
(conv stack with fp32 GroupNorm on layer 0, GELU, LayerNorm(C), projection, weight-norm positional conv with
SamePad, LayerNorm, post-LN blocks with hand-written attention), reading the raw fairseq state dict.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from streaming import hubert as H
from streaming.fairseq_pickle import UnpicklingRefused, load_fairseq_checkpoint, plain_data, is_standin
from streaming.tiny_parts import TinyHubertSpec, write_tiny_hubert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


SPEECH = REPO / "tests" / "fixtures" / "speech" / "en_us_fish.wav"


def _speech_or_noise(seed: int, seconds: float = 2.0) -> np.ndarray:
    if SPEECH.is_file():
        with wave.open(str(SPEECH)) as w:
            if w.getframerate() == 16000 and w.getsampwidth() == 2 and w.getnchannels() == 1:
                return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_hubert(tmp_path_factory.mktemp("hubert") / "tiny.pt", seed=1234)


@pytest.fixture(scope="module")
def reader(tiny_ckpt) -> H.HubertReader:
    return H.load_hubert(tiny_ckpt)


# ---------------------------------------------------------------------------------------------------------------
# Independent fairseq-style forward


def fairseq_layer11(sd: dict[str, torch.Tensor], cfg: dict, wave: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Layer-11 features [T, E] computed from the raw fairseq state dict, fp32, following fairseq's modules."""
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    x = wave.to(torch.float32)
    if normalize:
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)
    x = x.view(1, 1, -1)
    conv = H.parse_conv_feature_layers(cfg["conv_feature_layers"])
    for i, (dim, k, s) in enumerate(conv):
        x = F.conv1d(x, sd[f"feature_extractor.conv_layers.{i}.0.weight"], stride=s)
        if i == 0:  # Fp32GroupNorm(dim, dim): each channel normalised over time
            mean = x.mean(dim=2, keepdim=True)
            var = ((x - mean) ** 2).mean(dim=2, keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-5)
            x = x * sd["feature_extractor.conv_layers.0.2.weight"][None, :, None] + \
                sd["feature_extractor.conv_layers.0.2.bias"][None, :, None]
        x = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact GELU
    x = x[0].T  # [T, C]

    def layer_norm(t: torch.Tensor, prefix: str) -> torch.Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]

    def gelu(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))

    x = layer_norm(x, "layer_norm")
    x = x @ sd["post_extract_proj.weight"].T + sd["post_extract_proj.bias"]
    # positional conv: weight norm over dims (0, 1) for every tap (dim=2), "same" padding, drop last (k even)
    g, v = sd["encoder.pos_conv.0.weight_g"], sd["encoder.pos_conv.0.weight_v"]
    w = g * v / torch.sqrt((v ** 2).sum(dim=(0, 1), keepdim=True))
    k = w.shape[2]
    pos = F.conv1d(x.T[None], w, sd["encoder.pos_conv.0.bias"], padding=k // 2, groups=cfg["conv_pos_groups"])
    if k % 2 == 0:
        pos = pos[:, :, :-1]
    x = x + gelu(pos[0].T)
    x = layer_norm(x, "encoder.layer_norm")
    heads = cfg["encoder_attention_heads"]
    T, E = x.shape
    hd = E // heads
    for n in range(11):
        p = f"encoder.layers.{n}"
        q = (x @ sd[f"{p}.self_attn.q_proj.weight"].T + sd[f"{p}.self_attn.q_proj.bias"]) * hd ** -0.5
        kk = x @ sd[f"{p}.self_attn.k_proj.weight"].T + sd[f"{p}.self_attn.k_proj.bias"]
        vv = x @ sd[f"{p}.self_attn.v_proj.weight"].T + sd[f"{p}.self_attn.v_proj.bias"]
        q, kk, vv = (t.view(T, heads, hd).transpose(0, 1) for t in (q, kk, vv))
        scores = q @ kk.transpose(1, 2)
        probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
        probs = probs / probs.sum(-1, keepdim=True)
        attn = (probs @ vv).transpose(0, 1).reshape(T, E)
        attn = attn @ sd[f"{p}.self_attn.out_proj.weight"].T + sd[f"{p}.self_attn.out_proj.bias"]
        x = layer_norm(x + attn, f"{p}.self_attn_layer_norm")
        ff = gelu(x @ sd[f"{p}.fc1.weight"].T + sd[f"{p}.fc1.bias"]) @ sd[f"{p}.fc2.weight"].T + sd[f"{p}.fc2.bias"]
        x = layer_norm(x + ff, f"{p}.final_layer_norm")
    return x


@pytest.mark.parametrize("case", ["speech", "noise-1.3s", "noise-0.5s"])
def test_layer11_equals_independent_fairseq_forward(tiny_ckpt, reader, case):
    seed = {"speech": 11, "noise-1.3s": 12, "noise-0.5s": 13}[case]
    if case == "speech":
        wave16k = _speech_or_noise(seed)
    else:
        seconds = float(case.split("-")[1][:-1])
        wave16k = (0.2 * np.random.default_rng(seed).standard_normal(int(seconds * 16000))).astype(np.float32)
    state = load_fairseq_checkpoint(tiny_ckpt)
    cfg = plain_data(state["cfg"])["model"]
    expected = fairseq_layer11(state["model"], cfg, torch.from_numpy(wave16k), normalize=False)
    got = reader.features(wave16k)
    assert got.shape == expected.shape == (H.num_frames(wave16k.size), cfg["encoder_embed_dim"])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_weight_norm_fold_matches_parametrized_conv(tiny_ckpt):
    """The folded positional-conv weight gives the same output as transformers' own weight-norm parametrization."""
    from transformers import HubertModel

    state = load_fairseq_checkpoint(tiny_ckpt)["model"]
    settings = H.read_hubert_settings(load_fairseq_checkpoint(tiny_ckpt), "tiny")
    parametrized = HubertModel(settings.arch.hf_config()).eval()
    conv = parametrized.encoder.pos_conv_embed.conv
    conv.parametrizations.weight.original0.data.copy_(state["encoder.pos_conv.0.weight_g"])
    conv.parametrizations.weight.original1.data.copy_(state["encoder.pos_conv.0.weight_v"])
    conv.bias.data.copy_(state["encoder.pos_conv.0.bias"])
    folded = H.build_hf_hubert(settings.arch).encoder.pos_conv_embed
    folded.conv.weight.data.copy_(H.fold_weight_norm(state["encoder.pos_conv.0.weight_g"],
                                                     state["encoder.pos_conv.0.weight_v"]))
    folded.conv.bias.data.copy_(state["encoder.pos_conv.0.bias"])
    x = torch.randn(1, 57, settings.arch.embed_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), parametrized.encoder.pos_conv_embed(x), atol=1e-5, rtol=1e-5)
    assert not hasattr(folded.conv, "parametrizations")


@pytest.mark.parametrize("num_samples", [400, 719, 720, 721, 16000, 16001, 12345])
def test_frame_count(reader, num_samples):
    wave16k = (0.1 * np.random.default_rng(num_samples).standard_normal(num_samples)).astype(np.float32)
    assert reader.features(wave16k).shape[0] == (num_samples - 400) // 320 + 1 == H.num_frames(num_samples)


def test_too_short_input_is_refused(reader):
    with pytest.raises(ValueError, match="399 samples"):
        reader.features(np.zeros(399, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        reader.features(np.zeros((2, 1000), dtype=np.float32))


@pytest.mark.parametrize("tail", [0, 100, 399, 400, 1000])
def test_chunking_is_independent_chunks_concatenated(reader, monkeypatch, tail):
    chunk = 4800  # stands in for fairseq's 1,600,000 (both multiples of the 320-sample hop)
    monkeypatch.setattr(reader, "max_chunk_samples", chunk)
    n = 3 * chunk + tail
    wave16k = (0.1 * np.random.default_rng(tail).standard_normal(n)).astype(np.float32)
    got = reader.features(wave16k)
    parts = [wave16k[s:s + chunk] for s in range(0, n, chunk)]
    expected_frames = sum(H.num_frames(p.size) for p in parts)
    assert got.shape[0] == expected_frames == reader.num_frames(n)
    expected = torch.cat([reader.chunk_features(torch.from_numpy(p).view(1, -1)) for p in parts], dim=0)
    assert torch.equal(got, expected)
    # the chunking really changes something: one pass over the whole input has more frames / other values
    monkeypatch.setattr(reader, "max_chunk_samples", H.MAX_CHUNK_SAMPLES)
    whole = reader.features(wave16k)
    assert whole.shape[0] == H.num_frames(n) >= got.shape[0]
    assert not torch.allclose(whole[: 14], got[: 14], atol=1e-3)


def test_normalize_flag_is_honoured(tmp_path):
    raw = H.load_hubert(write_tiny_hubert(tmp_path / "raw.pt", seed=77, normalize=False))
    norm = H.load_hubert(write_tiny_hubert(tmp_path / "norm.pt", seed=77, normalize=True))
    assert (raw.normalize, norm.normalize) == (False, True)
    # quiet input: conv0 outputs have variance well under GroupNorm's eps, so normalising the waveform matters
    wave16k = (1e-3 * np.random.default_rng(77).standard_normal(16000) + 2e-4).astype(np.float32)
    t = torch.from_numpy(wave16k)
    by_hand = raw.features(F.layer_norm(t, t.shape))
    assert torch.equal(norm.features(wave16k), by_hand)
    assert (raw.features(wave16k) - by_hand).abs().max() > 1e-2


@pytest.mark.parametrize("cfg_format", ["dict", "dictconfig", "args"])
def test_cfg_formats_read_the_same(tmp_path, cfg_format):
    path = write_tiny_hubert(tmp_path / f"{cfg_format}.pt", seed=5, cfg_format=cfg_format)
    state = load_fairseq_checkpoint(path)
    settings = H.read_hubert_settings(state, str(path))
    spec = TinyHubertSpec()
    assert settings.arch == H.HubertArchitecture((spec.conv_channels,) * 7, spec.embed_dim, spec.ffn_dim,
                                                 spec.attention_heads, spec.encoder_layers, spec.conv_pos,
                                                 spec.conv_pos_groups)
    assert settings.normalize is False and settings.sample_rate == 16000
    # the fairseq objects came back as inert, readable data
    dictionary = state["task_state"]["dictionaries"][0]
    assert is_standin(dictionary, "fairseq.data.dictionary.Dictionary")
    assert dictionary.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and dictionary.indices["0"] == 4
    assert state["extra_state"]["metrics"]["default"]["loss"].val == 2.5
    wave16k = _speech_or_noise(5)
    reference = H.load_hubert(write_tiny_hubert(tmp_path / "ref.pt", seed=5, cfg_format="dict"))
    assert torch.equal(H.load_hubert(path).features(wave16k), reference.features(wave16k))


def test_tiny_writer_is_deterministic_and_cleans_up(tmp_path):
    a = load_fairseq_checkpoint(write_tiny_hubert(tmp_path / "a.pt", seed=9))
    b = load_fairseq_checkpoint(write_tiny_hubert(tmp_path / "b.pt", seed=9))
    c = load_fairseq_checkpoint(write_tiny_hubert(tmp_path / "c.pt", seed=10))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert plain_data(a["cfg"]) == plain_data(b["cfg"])
    assert not torch.equal(a["model"]["post_extract_proj.weight"], c["model"]["post_extract_proj.weight"])
    assert not any(name == "fairseq" or name.startswith(("fairseq.", "omegaconf")) for name in sys.modules)
    # release key names and container
    keys = set(a["model"])
    for key in ("encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v", "final_proj.weight",
                "label_embs_concat", "mask_emb", "feature_extractor.conv_layers.0.2.weight", "encoder.layers.11.fc1.weight"):
        assert key in keys
    assert {"cfg", "model", "task_state", "optimizer_history", "extra_state"} <= set(a)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"layer_norm_first": True}, "layer_norm_first"),
        ({"extractor_mode": "layer_norm"}, "extractor_mode"),
        ({"conv_bias": True}, "conv_bias"),
        ({"activation_fn": "relu"}, "activation_fn"),
        ({"conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 1"}, "conv_feature_layers"),
        ({"encoder_layers": 10}, "encoder_layers"),
        ({"_name": "wav2vec2"}, "wav2vec2"),
        ({"conv_feature_layers": "__import__('os').system('true')"}, "conv_feature_layers"),
    ],
)
def test_unsupported_variants_are_refused(tmp_path, override, field):
    path = write_tiny_hubert(tmp_path / "bad.pt", seed=3, cfg_format="dict", model_overrides=override)
    with pytest.raises(H.UnsupportedCheckpoint, match=field) as info:
        H.load_hubert(path)
    assert str(path) in str(info.value)


def test_base_size_claims_are_checked(tmp_path):
    """A 768-d checkpoint must carry every mHuBERT base value (ffn 3072, 12 heads, conv_pos 128/16, 512 conv)."""
    path = write_tiny_hubert(tmp_path / "fake_base.pt", seed=3, cfg_format="dict",
                               model_overrides={"encoder_embed_dim": 768, "encoder_ffn_embed_dim": 1024})
    with pytest.raises(H.UnsupportedCheckpoint, match="encoder_ffn_embed_dim=1024") as info:
        H.load_hubert(path)
    assert "conv channels" in str(info.value)


def test_mapping_reports_every_problem_in_one_error(tiny_ckpt):
    state = load_fairseq_checkpoint(tiny_ckpt)
    settings = H.read_hubert_settings(state, "tiny.pt")
    model = H.build_hf_hubert(settings.arch)
    sd = dict(state["model"])
    del sd["encoder.layers.3.fc1.bias"]
    sd["encoder.extra_thing.weight"] = torch.zeros(3)
    sd["post_extract_proj.weight"] = torch.zeros(5, 5)
    with pytest.raises(H.UnsupportedCheckpoint) as info:
        H.map_fairseq_state_dict(sd, settings.arch, H._expected_shapes(model), "tiny.pt")
    message = str(info.value)
    assert message.startswith("tiny.pt:")
    assert "missing checkpoint keys (1): encoder.layers.3.fc1.bias" in message
    assert "unexpected checkpoint keys (1): encoder.extra_thing.weight" in message
    assert "post_extract_proj.weight (5, 5) -> feature_projection.projection.weight" in message
    # the intact state dict fills every parameter exactly once, dropping only the pre-training heads + layer 11
    mapped = H.map_fairseq_state_dict(state["model"], settings.arch, H._expected_shapes(model), "tiny.pt")
    assert set(mapped) == set(model.state_dict())


def test_converted_format_gives_identical_features(reader, tmp_path):
    out = H.save_converted_hubert(reader.model, reader.normalize, tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    assert config[H.CONVERTED_KEY]["normalize"] is False and config["num_hidden_layers"] == 11
    converted = H.load_hubert(out)
    assert converted.normalize is False
    wave16k = _speech_or_noise(21)
    assert torch.equal(converted.features(wave16k), reader.features(wave16k))


# ---------------------------------------------------------------------------------------------------------------
# Restricted unpickling


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return self.target


def _evil_payloads(marker: Path):
    import builtins

    return {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (builtins.eval, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.Popen": (subprocess.Popen, (["touch", str(marker)],)),
        "builtins.getattr": (getattr, ("abc", "upper")),
        "torch.hub.load": (torch.hub.load, ("x/y", "z")),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "builtins.getattr",
                                  "torch.hub.load"])
def test_foreign_globals_are_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = _evil_payloads(marker)[name]
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": _Evil(payload)}, path)
    with pytest.raises(UnpicklingRefused) as info:
        load_fairseq_checkpoint(path)
    module, global_name = payload[0].__module__, payload[0].__name__
    assert f"{module}.{global_name}" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_raw_legacy_pickle_is_refused_too(tmp_path):
    """A non-zip (legacy torch.save / plain pickle) file goes through the same restricted unpickler."""
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(UnpicklingRefused, match=r"os\.system"):
        load_fairseq_checkpoint(path)
    assert not marker.exists()
    legacy = tmp_path / "legacy_ok.pt"
    torch.save({"model": {"w": torch.arange(3.0)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_fairseq_checkpoint(legacy)["model"]["w"], torch.arange(3.0))


def test_loads_in_a_subprocess_where_fairseq_cannot_be_imported(tiny_ckpt, reader, tmp_path):
    wave16k = _speech_or_noise(31)
    np.save(tmp_path / "wave.npy", wave16k)
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, json, sys
        class Block(importlib.abc.MetaPathFinder):  # make sure nothing can provide fairseq/omegaconf
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("fairseq", "omegaconf"):
                    raise ImportError("blocked: " + name)
                return None
        sys.meta_path.insert(0, Block())
        try:
            import fairseq
            raise SystemExit("fairseq imported")
        except ImportError:
            pass
        import numpy as np, torch
        torch.set_num_threads(1)  # same as this process: bitwise comparisons need the same kernels
        from streaming.hubert import load_hubert
        reader = load_hubert({str(tiny_ckpt)!r})
        feats = reader.features(np.load({str(tmp_path / 'wave.npy')!r}))
        torch.save(feats, {str(tmp_path / 'feats.pt')!r})
        print(json.dumps({{"fairseq_loaded": any(m.split(".")[0] in ("fairseq", "omegaconf") for m in sys.modules),
                          "normalize": reader.normalize}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"fairseq_loaded": False, "normalize": False}
    assert torch.equal(torch.load(tmp_path / "feats.pt"), reader.features(wave16k))


def test_pickle_module_protocol_names_are_mapped():
    """Protocol-2 pickles spell builtins `__builtin__`; they must resolve to the same allow-list."""
    data = pickle.dumps({"a": {1, 2}, "b": bytearray(b"x")}, protocol=2)
    from streaming.fairseq_pickle import restricted_pickle_module

    assert restricted_pickle_module("t").loads(data) == {"a": {1, 2}, "b": bytearray(b"x")}


def test_cfg_interpolations_are_resolved(tmp_path):
    """Pickled DictConfigs keep "${...}" interpolations; the loader resolves them like fairseq does."""
    path = write_tiny_hubert(tmp_path / "interp.pt", seed=4, cfg_format="dictconfig",
                               model_overrides={"conv_pos": "${model.encoder_attention_heads}",
                                                "encoder_layers": "${common.missing}"})
    state = load_fairseq_checkpoint(path)
    with pytest.raises(H.UnsupportedCheckpoint, match=r"cfg.model.encoder_layers='\$\{common.missing\}' is not an int"):
        H.read_hubert_settings(state, str(path))  # unresolvable: refused with the field named, not guessed
    from streaming.fairseq_pickle import resolve_interpolations

    cfg = resolve_interpolations(plain_data(state["cfg"]))
    assert cfg["model"]["conv_pos"] == TinyHubertSpec().attention_heads
    assert cfg["model"]["encoder_layers"] == "${common.missing}"
