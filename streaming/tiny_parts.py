"""The tiny bundle's speech parts: random-weight mHuBERT, k-means and vocoder files in the release formats.

`agent/tiny.py` (`speechgpt-rt make-tiny`) writes the whole tiny bundle and calls the writers here for its
streaming parts; tests build their own small files with them and the vocoder benchmark draws a full-size random
vocoder. Nothing in the runtime modules imports this one: loaders must work on real release files, and the fake
fairseq / omegaconf classes that the tiny HuBERT checkpoint pickles exist only while it is being written.

- mHuBERT: `write_tiny_hubert` (a fairseq-format `.pt`, fairseq key names, `TinyHubertSpec` widths).
- k-means: `write_tiny_kmeans` (a real joblib dump of an sklearn MiniBatchKMeans; writing needs scikit-learn).
- vocoder: `write_tiny_vocoder` (`vocoder.pt` + `config.json`), `random_vocoder` (in memory, any config).
"""

from __future__ import annotations

import json
import math
import sys
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streaming.hubert import CONV_GEOMETRY, SAMPLE_RATE
from streaming.kmeans import NUM_UNITS
from streaming.vocoder import (
    CONFIG_NAME,
    RELEASE_CONFIG,
    UnitVocoder,
    VocoderConfig,
    VocoderSource,
    expected_release_shapes,
    vocoder_from_release_state_dict,
)

# ----------------------------------------------------------------------------------------------------------------
# mHuBERT: a tiny checkpoint in the release format (fairseq pickle, fairseq key names)


@contextmanager
def _fake_modules(names: list[str]):
    """Temporarily register empty modules under `names` so pickle can reference classes defined "in" them."""
    if "fairseq" in sys.modules and not getattr(sys.modules["fairseq"], "__speechgpt_rt_fake__", False):
        raise RuntimeError("a real fairseq module is imported; this project must not use fairseq")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            mod = types.ModuleType(n)
            mod.__speechgpt_rt_fake__ = True
            sys.modules[n] = mod
        yield {n: sys.modules[n] for n in names}
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


def _fake_classes(mods: dict[str, types.ModuleType]) -> dict[str, type]:
    """Minimal look-alikes of the fairseq/omegaconf classes a real checkpoint pickles (state only, no behaviour)."""

    def place(cls: type, module: str) -> type:
        cls.__module__ = module
        cls.__qualname__ = cls.__name__
        setattr(mods[module], cls.__name__, cls)
        return cls

    class Dictionary:  # fairseq.data.dictionary.Dictionary: specials first, then symbols
        def __init__(self, symbols: list[str]):
            self.bos_word, self.unk_word, self.pad_word, self.eos_word = "<s>", "<unk>", "<pad>", "</s>"
            self.symbols = ["<s>", "<pad>", "</s>", "<unk>"] + list(symbols)
            self.count = [1, 1, 1, 1] + [1] * len(symbols)
            self.indices = {s: i for i, s in enumerate(self.symbols)}
            self.bos_index, self.pad_index, self.eos_index, self.unk_index = 0, 1, 2, 3
            self.nspecial = 4
            self.add_special_symbols = []

    class AverageMeter:  # fairseq.logging.meters.AverageMeter
        def __init__(self, val: float, count: int):
            self.val, self.sum, self.count, self.round = val, val * count, count, 3

    class Metadata:  # omegaconf.base.Metadata / ContainerMetadata (dataclasses)
        def __init__(self, **kw: Any):
            self.__dict__.update(kw)

    class ContainerMetadata(Metadata):
        pass

    class _Node:
        def __init__(self, value: Any, parent: Any):
            self.__dict__["_val"] = value
            self.__dict__["_parent"] = parent
            self.__dict__["_metadata"] = Metadata(ref_type=typing.Any, object_type=None, optional=True, key=None,
                                                  flags={})

    class AnyNode(_Node):
        pass

    class BooleanNode(_Node):
        pass

    class IntegerNode(_Node):
        pass

    class FloatNode(_Node):
        pass

    class StringNode(_Node):
        pass

    def node(value: Any, parent: Any) -> Any:
        if isinstance(value, dict):
            return DictConfig(value, parent)
        if isinstance(value, (list, tuple)):
            return ListConfig(list(value), parent)
        kind = {bool: BooleanNode, int: IntegerNode, float: FloatNode, str: StringNode}.get(type(value), AnyNode)
        return kind(value, parent)

    class DictConfig:  # omegaconf.dictconfig.DictConfig: children live in _content
        def __init__(self, content: dict, parent: Any = None):
            self.__dict__["_parent"] = parent
            self.__dict__["_metadata"] = ContainerMetadata(ref_type=typing.Any, object_type=dict, optional=True,
                                                           key=None, flags={}, key_type=typing.Any,
                                                           element_type=typing.Any)
            self.__dict__["_content"] = {k: node(v, self) for k, v in content.items()}

        def __getstate__(self) -> dict:
            return dict(self.__dict__)

    class ListConfig:
        def __init__(self, content: list, parent: Any = None):
            self.__dict__["_parent"] = parent
            self.__dict__["_metadata"] = ContainerMetadata(ref_type=typing.Any, object_type=list, optional=True,
                                                           key=None, flags={}, key_type=int, element_type=typing.Any)
            self.__dict__["_content"] = [node(v, self) for v in content]

        def __getstate__(self) -> dict:
            return dict(self.__dict__)

    return {
        "Dictionary": place(Dictionary, "fairseq.data.dictionary"),
        "AverageMeter": place(AverageMeter, "fairseq.logging.meters"),
        "Metadata": place(Metadata, "omegaconf.base"),
        "ContainerMetadata": place(ContainerMetadata, "omegaconf.base"),
        **{c.__name__: place(c, "omegaconf.nodes") for c in (AnyNode, BooleanNode, IntegerNode, FloatNode, StringNode)},
        "DictConfig": place(DictConfig, "omegaconf.dictconfig"),
        "ListConfig": place(ListConfig, "omegaconf.listconfig"),
    }


_FAKE_MODULES = ["fairseq", "fairseq.data", "fairseq.data.dictionary", "fairseq.logging", "fairseq.logging.meters",
                 "omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.dictconfig", "omegaconf.listconfig"]


@dataclass(frozen=True)
class TinyHubertSpec:
    """Shape of a tiny test checkpoint. Conv kernel/stride stay the real ones; only widths/depth shrink."""

    conv_channels: int = 32
    embed_dim: int = 64
    ffn_dim: int = 128
    attention_heads: int = 4
    encoder_layers: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    final_dim: int = 16
    num_labels: int = 20
    query_key_gain: float = 1.0  # x e^-0.5 init scale of q/k projections
    attention_output_gain: float = 0.3  # x e^-0.5 init scale of the attention output projection


def tiny_fairseq_state_dict(spec: TinyHubertSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random fairseq-named HuBERT weights (deterministic for `seed`), scaled so activations stay O(1) and
    layer-11 features still vary from frame to frame."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    c, e, f = spec.conv_channels, spec.embed_dim, spec.ffn_dim
    sd: dict[str, torch.Tensor] = {}
    in_ch = 1
    for i, (k, _) in enumerate(CONV_GEOMETRY):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = randn(c, in_ch, k, scale=(in_ch * k) ** -0.5)
        in_ch = c
    sd["feature_extractor.conv_layers.0.2.weight"] = 1.0 + randn(c, scale=0.1)
    sd["feature_extractor.conv_layers.0.2.bias"] = randn(c, scale=0.1)
    sd["post_extract_proj.weight"] = randn(e, c, scale=c ** -0.5)
    sd["post_extract_proj.bias"] = randn(e, scale=0.02)
    sd["layer_norm.weight"] = 1.0 + randn(c, scale=0.1)
    sd["layer_norm.bias"] = randn(c, scale=0.1)
    sd["mask_emb"] = randn(e)
    sd["encoder.pos_conv.0.bias"] = randn(e, scale=0.02)
    sd["encoder.pos_conv.0.weight_g"] = 0.5 + torch.rand(1, 1, spec.conv_pos, generator=gen)
    sd["encoder.pos_conv.0.weight_v"] = randn(e, e // spec.conv_pos_groups, spec.conv_pos)
    sd["encoder.layer_norm.weight"] = 1.0 + randn(e, scale=0.1)
    sd["encoder.layer_norm.bias"] = randn(e, scale=0.1)
    for n in range(spec.encoder_layers):
        p = f"encoder.layers.{n}"
        # A damped attention output: with plain random weights 11 blocks of near-uniform attention average every
        # frame into the same vector and all frames get one unit.
        gains = {"q": spec.query_key_gain, "k": spec.query_key_gain, "v": 1.0, "out": spec.attention_output_gain}
        for proj, gain in gains.items():
            sd[f"{p}.self_attn.{proj}_proj.weight"] = randn(e, e, scale=gain * e ** -0.5)
            sd[f"{p}.self_attn.{proj}_proj.bias"] = randn(e, scale=0.02)
        sd[f"{p}.self_attn_layer_norm.weight"] = 1.0 + randn(e, scale=0.1)
        sd[f"{p}.self_attn_layer_norm.bias"] = randn(e, scale=0.1)
        sd[f"{p}.fc1.weight"] = randn(f, e, scale=e ** -0.5)
        sd[f"{p}.fc1.bias"] = randn(f, scale=0.02)
        sd[f"{p}.fc2.weight"] = randn(e, f, scale=f ** -0.5)
        sd[f"{p}.fc2.bias"] = randn(e, scale=0.02)
        sd[f"{p}.final_layer_norm.weight"] = 1.0 + randn(e, scale=0.1)
        sd[f"{p}.final_layer_norm.bias"] = randn(e, scale=0.1)
    sd["final_proj.weight"] = randn(spec.final_dim, e, scale=e ** -0.5)
    sd["final_proj.bias"] = randn(spec.final_dim, scale=0.02)
    sd["label_embs_concat"] = randn(spec.num_labels + 4, spec.final_dim)
    return sd


def tiny_model_cfg(spec: TinyHubertSpec) -> dict[str, Any]:
    """cfg.model of the tiny checkpoint: fairseq HubertConfig field names, base values except the widths."""
    conv = f"[({spec.conv_channels},10,5)] + [({spec.conv_channels},3,2)] * 4 + [({spec.conv_channels},2,2)] * 2"
    return {
        "_name": "hubert", "label_rate": 50.0, "extractor_mode": "default",
        "encoder_layers": spec.encoder_layers, "encoder_embed_dim": spec.embed_dim,
        "encoder_ffn_embed_dim": spec.ffn_dim, "encoder_attention_heads": spec.attention_heads,
        "activation_fn": "gelu", "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05, "dropout_input": 0.1, "dropout_features": 0.1, "final_dim": spec.final_dim,
        "untie_final_proj": True, "layer_norm_first": False, "conv_feature_layers": conv, "conv_bias": False,
        "logit_temp": 0.1, "target_glu": False, "feature_grad_mult": 0.1, "mask_length": 10, "mask_prob": 0.8,
        "mask_selection": "static", "mask_other": 0.0, "no_mask_overlap": False, "mask_min_space": 1,
        "mask_channel_length": 10, "mask_channel_prob": 0.0, "conv_pos": spec.conv_pos,
        "conv_pos_groups": spec.conv_pos_groups, "latent_temp": [2.0, 0.5, 0.999995], "skip_masked": False,
        "skip_nomask": False, "checkpoint_activations": False, "required_seq_len_multiple": 2,
    }


def write_tiny_hubert(
    path: str | Path,
    seed: int,
    *,
    spec: TinyHubertSpec = TinyHubertSpec(),
    normalize: bool = False,
    cfg_format: typing.Literal["dict", "dictconfig", "args"] = "dictconfig",
    model_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a fairseq-format mHuBERT-shaped checkpoint with random weights, deterministic for `seed`.

    Same container and key names as the release file: {'args', 'cfg', 'model', 'optimizer_history',
    'extra_state', 'task_state', 'criterion'}; `task_state` holds a pickled `fairseq.data.dictionary.Dictionary`
    and `extra_state` fairseq meters, so loading it needs the stand-ins. `cfg_format`: "dictconfig" pickles
    cfg as omegaconf containers (older fairseq), "dict" as plain dicts (fairseq >= 0.10 `to_container`),
    "args" as a legacy `argparse.Namespace` under 'args' with cfg None. `model_overrides` changes cfg.model
    fields only (the weights keep the spec's shapes): for tests of refused variants and mismatches.
    """
    import argparse

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = {**tiny_model_cfg(spec), **(model_overrides or {})}
    task_cfg = {"_name": "hubert_pretraining", "data": "/data/voxpopuli", "fine_tuning": False, "labels": ["km"],
                "label_dir": None, "label_rate": 50.0, "sample_rate": SAMPLE_RATE, "normalize": bool(normalize),
                "enable_padding": False, "max_keep_size": None, "max_sample_size": 250000,
                "min_sample_size": 32000, "single_target": False, "random_crop": True, "pad_audio": False}
    full_cfg = {"_name": None, "common": {"fp16": True, "log_interval": 200, "seed": 1337},
                "checkpoint": {"save_dir": "checkpoints", "no_save_optimizer_state": False},
                "model": model_cfg, "task": task_cfg,
                "criterion": {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0},
                "optimizer": {"_name": "adam", "adam_betas": "(0.9,0.98)", "lr": [0.0005]}}
    weights = tiny_fairseq_state_dict(spec, seed)
    with _fake_modules(_FAKE_MODULES) as mods:
        fake = _fake_classes(mods)
        dictionary = fake["Dictionary"]([str(i) for i in range(spec.num_labels)])
        if cfg_format == "dictconfig":
            cfg, args = fake["DictConfig"](full_cfg), None
        elif cfg_format == "dict":
            cfg, args = full_cfg, None
        elif cfg_format == "args":
            flat = {k: v for k, v in {**task_cfg, **model_cfg}.items() if not k.startswith("_")}
            cfg, args = None, argparse.Namespace(arch="hubert", task="hubert_pretraining", **flat)
        else:
            raise ValueError(f"cfg_format must be 'dict', 'dictconfig' or 'args', got {cfg_format!r}")
        state = {
            "args": args,
            "cfg": cfg,
            "model": weights,
            "criterion": None,
            "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 400000}],
            "task_state": {"dictionaries": [dictionary]},
            "extra_state": {"metrics": {"default": {"loss": fake["AverageMeter"](2.5, 100)}},
                            "previous_training_time": np.float64(12345.5),
                            "train_iterator": {"epoch": 10, "iterations_in_epoch": 0, "shuffle": True}},
        }
        torch.save(state, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# k-means: a joblib-pickled MiniBatchKMeans, as fairseq's learn_kmeans.py saves it


def tiny_centers(seed: int, dim: int, n_clusters: int = NUM_UNITS) -> np.ndarray:
    """Deterministic float32 centres, N(0, 0.3^2) per dimension: small next to post-LN features (norm ~ sqrt(dim)),
    so the nearest centre is decided by the feature's direction and a tiny model's frames spread over many units."""
    return (0.3 * np.random.default_rng(seed).standard_normal((n_clusters, dim))).astype(np.float32)


def write_tiny_kmeans(path: str | Path, seed: int, dim: int, n_clusters: int = NUM_UNITS) -> Path:
    """A real `joblib.dump` of a fitted sklearn `MiniBatchKMeans` (as fairseq's learn_kmeans.py saves it) whose
    `cluster_centers_` are then set to `tiny_centers(seed, dim)`. Needs scikit-learn + joblib (writing only)."""
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(seed)
    data = rng.standard_normal((2 * n_clusters + 48, dim)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=n_clusters, init="random", max_iter=2, batch_size=1024, compute_labels=False,
                         tol=0.0, max_no_improvement=100, init_size=None, n_init=1, reassignment_ratio=0.0,
                         random_state=seed)
    km.fit(data)
    km.cluster_centers_ = tiny_centers(seed, dim, n_clusters)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(km, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Vocoder: the release config.json / vocoder.pt pair with random weights


def tiny_release_config() -> dict[str, Any]:
    """A small config in the release format: same rates/kernels (hop 320, same receptive field), fewer channels."""
    cfg = json.loads(json.dumps(RELEASE_CONFIG))
    cfg.update(upsample_initial_channel=32, embedding_dim=32, model_in_dim=32)
    cfg["dur_predictor_params"].update(encoder_embed_dim=32, var_pred_hidden_dim=32)
    return cfg


def random_release_state_dict(config: VocoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the release layout (weight_g / weight_v), scaled so the audio is neither
    silent nor saturated, with a duration predictor biased to give durations of about 1..4 frames."""
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_release_shapes(config)

    def normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def uniform(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float32)

    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):  # fixed order: the same seed gives the same tensors
        shape = shapes[key]
        if key == "dict.weight":
            state[key] = normal(shape, 1.0)
        elif key.endswith(".weight_v"):
            state[key] = normal(shape, 1.0)
        elif key.endswith(".weight_g"):
            if key.startswith("ups."):
                # ConvTranspose norm is per input channel: each output sample sums ~C_in*k/u taps
                stage = int(key.split(".")[1])
                u = config.upsample_rates[stage]
                state[key] = uniform(shape, 0.8, 1.2) * math.sqrt(u)
            elif key.startswith("conv_post."):
                state[key] = uniform(shape, 0.8, 1.2)
            else:
                state[key] = uniform(shape, 0.6, 1.0)
        elif key.startswith("dur_predictor.") and key.endswith(("ln1.weight", "ln2.weight")):
            state[key] = uniform(shape, 0.8, 1.2)
        elif key.startswith("dur_predictor.") and key.endswith(("ln1.bias", "ln2.bias")):
            state[key] = normal(shape, 0.1)
        elif key == "dur_predictor.proj.weight":
            state[key] = normal(shape, 0.35 / math.sqrt(shape[1]))
        elif key == "dur_predictor.proj.bias":
            state[key] = torch.full(shape, math.log(1.0 + 2.2))  # exp(log_dur) - 1 around 2.2 -> 1..4 frames
        elif key.startswith("dur_predictor.") and key.endswith(".weight"):
            state[key] = normal(shape, 1.0 / math.sqrt(shape[1] * shape[2]))
        elif key.endswith(".bias"):
            state[key] = normal(shape, 0.02)
        else:
            raise AssertionError(f"no init rule for {key}")
    return state


def random_vocoder(config: VocoderConfig | dict[str, Any], seed: int = 0) -> UnitVocoder:
    """A UnitVocoder with random weights (e.g. the full-size release architecture for benchmarks)."""
    if isinstance(config, dict):
        config = VocoderConfig.from_dict(config)
    state = random_release_state_dict(config, seed)
    model = vocoder_from_release_state_dict(config, state, source=f"random(seed={seed})")
    model.source = VocoderSource("random", None, None)
    return model


def write_tiny_vocoder(out_dir: Path, seed: int = 0, config: dict[str, Any] | None = None) -> None:
    """Write `config.json` + `vocoder.pt` ({'generator': weight-normed state dict}) exactly in the release format."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = config if config is not None else tiny_release_config()
    parsed = VocoderConfig.from_dict(raw, source="tiny config")
    state = random_release_state_dict(parsed, seed)
    torch.save({"generator": state}, out_dir / "vocoder.pt")
    (out_dir / CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
