"""mHuBERT layer-11 features: the fairseq checkpoint mapped onto transformers `HubertModel`, fp32, no fairseq.

Facts (docs/speechgpt-format.md, mHuBERT checkpoint; docs/speechgpt-format.md, Unit extraction rules): fairseq
HuBERT base = conv front end [(512,10,5)] + [(512,3,2)]*4 + [(512,2,2)]*2 with GroupNorm on conv layer 0 only
("default" extractor mode, no conv bias), GELU; LayerNorm(512) + Linear(512->768); encoder
x + GELU(SamePad(weight-normed grouped conv, k=128)) -> LayerNorm -> post-LN blocks. Layer 11 (1-based) is the
output of the 11th block, with no final norm, so a `HubertModel` built with `num_hidden_layers=11` returns it as
`last_hidden_state`. The official reader splits the (optionally layer-normed) waveform into independent 100 s
chunks (1,600,000 samples) and concatenates their features; it never pads or batches.

Frame geometry: receptive field 400 samples, hop 320; frames = floor((L - 400) / 320) + 1.

Heavy imports (transformers, safetensors) happen inside functions: importing this module costs only torch.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from streaming.fairseq_pickle import load_fairseq_checkpoint, plain_data, resolve_interpolations
from streaming.load_errors import unreadable

SAMPLE_RATE = 16000
OUTPUT_LAYER = 11  # fairseq output_layer=11: the 11th transformer block's output
MAX_CHUNK_SAMPLES = 1_600_000  # fairseq dump_hubert_feature.py max_chunk (100 s)
RECEPTIVE_FIELD = 400
HOP = 320
# (kernel, stride) of the 7 conv layers; channels may differ (tiny test models), the geometry may not.
CONV_GEOMETRY: tuple[tuple[int, int], ...] = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))
MHUBERT_CONV_FEATURE_LAYERS = "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"

# fairseq HubertConfig / HubertPretrainingConfig defaults, used only when a legacy `args` lacks a field.
FAIRSEQ_HUBERT_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": MHUBERT_CONV_FEATURE_LAYERS,
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
}
FAIRSEQ_TASK_DEFAULTS: dict[str, Any] = {"normalize": False, "sample_rate": 16000}

# The released mHuBERT base (mhubert_base_vp_en_es_fr_it3.pt): enforced whenever a checkpoint claims 768-d.
MHUBERT_BASE_VALUES: dict[str, Any] = {
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "conv_pos": 128,
    "conv_pos_groups": 16,
}


def num_frames(num_samples: int) -> int:
    """Frames the conv front end yields for `num_samples` samples (0 below one receptive field)."""
    return 0 if num_samples < RECEPTIVE_FIELD else (num_samples - RECEPTIVE_FIELD) // HOP + 1


class UnsupportedCheckpoint(ValueError):
    """The checkpoint is a HuBERT variant this loader does not implement (or not HuBERT at all)."""


# ----------------------------------------------------------------------------------------------------------------
# Architecture from the checkpoint's cfg


def parse_conv_feature_layers(spec: Any, source: str = "<cfg>") -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string (a Python expression fairseq eval()s) parsed WITHOUT eval.

    Accepted grammar: list/tuple literals of ints combined with `+` and `* int`.
    """
    if isinstance(spec, (list, tuple)):
        value = spec
    else:
        try:
            tree = ast.parse(str(spec), mode="eval")
        except SyntaxError as exc:
            raise UnsupportedCheckpoint(f"{source}: conv_feature_layers {spec!r} is not a list expression") from exc

        def ev(node: ast.AST) -> Any:
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, ast.List):
                return [ev(e) for e in node.elts]
            if isinstance(node, ast.Tuple):
                return tuple(ev(e) for e in node.elts)
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
                left, right = ev(node.left), ev(node.right)
                return left + right if isinstance(node.op, ast.Add) else left * right
            raise UnsupportedCheckpoint(f"{source}: conv_feature_layers {spec!r}: unsupported syntax {ast.dump(node)}")

        value = ev(tree)
    layers = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 3 and all(isinstance(v, int) for v in item)):
            raise UnsupportedCheckpoint(f"{source}: conv_feature_layers entry {item!r} is not (dim, kernel, stride)")
        layers.append(tuple(item))
    return layers


@dataclass(frozen=True)
class HubertArchitecture:
    """The fairseq HuBERT settings this loader supports, read from a checkpoint's cfg."""

    conv_dims: tuple[int, ...]
    embed_dim: int
    ffn_dim: int
    attention_heads: int
    encoder_layers: int
    conv_pos: int
    conv_pos_groups: int
    layer_norm_eps: float = 1e-5

    def hf_config(self, num_hidden_layers: int = OUTPUT_LAYER):
        from transformers import HubertConfig

        return HubertConfig(
            hidden_size=self.embed_dim,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=self.attention_heads,
            intermediate_size=self.ffn_dim,
            hidden_act="gelu",
            hidden_dropout=0.0,
            activation_dropout=0.0,
            attention_dropout=0.0,
            feat_proj_dropout=0.0,
            final_dropout=0.0,
            layerdrop=0.0,
            layer_norm_eps=self.layer_norm_eps,
            feat_extract_norm="group",
            feat_extract_activation="gelu",
            conv_dim=list(self.conv_dims),
            conv_kernel=[k for k, _ in CONV_GEOMETRY],
            conv_stride=[s for _, s in CONV_GEOMETRY],
            conv_bias=False,
            num_conv_pos_embeddings=self.conv_pos,
            num_conv_pos_embedding_groups=self.conv_pos_groups,
            do_stable_layer_norm=False,
            feat_proj_layer_norm=True,
            mask_time_prob=0.0,
            mask_feature_prob=0.0,
            apply_spec_augment=False,
        )


MHUBERT_BASE_ARCH = HubertArchitecture(
    conv_dims=(512,) * 7, embed_dim=768, ffn_dim=3072, attention_heads=12, encoder_layers=12, conv_pos=128,
    conv_pos_groups=16,
)


@dataclass(frozen=True)
class FairseqHubertSettings:
    arch: HubertArchitecture
    normalize: bool
    sample_rate: int
    model_cfg: dict
    task_cfg: dict


def _model_and_task_cfg(state: dict, source: str) -> tuple[dict, dict]:
    cfg = state.get("cfg")
    if cfg is not None:
        cfg = resolve_interpolations(plain_data(cfg))
        if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
            raise UnsupportedCheckpoint(f"{source}: cfg has no 'model' section (got {type(cfg).__name__})")
        task = cfg.get("task") if isinstance(cfg.get("task"), dict) else {}
        return cfg["model"], task
    args = state.get("args")
    if args is not None:
        args = plain_data(args)
        if not isinstance(args, dict):
            raise UnsupportedCheckpoint(f"{source}: legacy 'args' is not a Namespace/dict")
        return args, args  # legacy Namespace: model and task fields share one namespace
    raise UnsupportedCheckpoint(f"{source}: checkpoint has neither 'cfg' nor legacy 'args'")


def read_hubert_settings(state: dict, source: str = "<checkpoint>") -> FairseqHubertSettings:
    """Read and check `cfg.model` / `cfg.task` (or legacy `args`); refuse variants this loader does not implement."""
    model_cfg, task_cfg = _model_and_task_cfg(state, source)

    def get(cfg: dict, key: str, defaults: dict) -> Any:
        return cfg[key] if cfg.get(key) is not None else defaults[key]

    def section(cfg: dict) -> str:
        return "task" if cfg is task_cfg and cfg is not model_cfg else "model"

    def get_int(cfg: dict, key: str, defaults: dict) -> int:
        value = get(cfg, key, defaults)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
            raise UnsupportedCheckpoint(f"{source}: cfg.{section(cfg)}.{key}={value!r} is not an integer")
        return int(value)

    def get_bool(cfg: dict, key: str, defaults: dict) -> bool:
        value = get(cfg, key, defaults)
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UnsupportedCheckpoint(f"{source}: cfg.{section(cfg)}.{key}={value!r} is not a boolean")

    name = model_cfg.get("_name", model_cfg.get("arch"))
    if name is not None and not str(name).startswith("hubert"):
        raise UnsupportedCheckpoint(f"{source}: model is {name!r}, expected a fairseq 'hubert' pre-training model")

    problems = []
    extractor_mode = str(get(model_cfg, "extractor_mode", FAIRSEQ_HUBERT_DEFAULTS))
    if extractor_mode != "default":
        problems.append(f"extractor_mode={extractor_mode!r} (only 'default': GroupNorm on conv layer 0)")
    if get_bool(model_cfg, "conv_bias", FAIRSEQ_HUBERT_DEFAULTS):
        problems.append("conv_bias=True (only conv layers without bias)")
    if get_bool(model_cfg, "layer_norm_first", FAIRSEQ_HUBERT_DEFAULTS):
        problems.append("layer_norm_first=True (only the post-LN encoder of HuBERT base)")
    activation = str(get(model_cfg, "activation_fn", FAIRSEQ_HUBERT_DEFAULTS))
    if activation != "gelu":
        problems.append(f"activation_fn={activation!r} (only 'gelu')")
    # fields of newer fairseq encoders; absent in HuBERT base checkpoints, refused when they change the model
    if str(model_cfg.get("layer_type", "transformer")) != "transformer":
        problems.append(f"layer_type={model_cfg.get('layer_type')!r} (only 'transformer')")
    if int(model_cfg.get("pos_conv_depth", 1) or 1) != 1:
        problems.append(f"pos_conv_depth={model_cfg.get('pos_conv_depth')} (only 1)")
    if bool(model_cfg.get("conv_pos_batch_norm", False)):
        problems.append("conv_pos_batch_norm=True (only the weight-normed positional conv)")

    conv_layers = parse_conv_feature_layers(get(model_cfg, "conv_feature_layers", FAIRSEQ_HUBERT_DEFAULTS), source)
    geometry = tuple((k, s) for _, k, s in conv_layers)
    if geometry != CONV_GEOMETRY:
        problems.append(f"conv_feature_layers geometry {geometry} (only the 400-sample/320-hop {CONV_GEOMETRY})")

    embed = get_int(model_cfg, "encoder_embed_dim", FAIRSEQ_HUBERT_DEFAULTS)
    arch_values = {
        "encoder_embed_dim": embed,
        "encoder_ffn_embed_dim": get_int(model_cfg, "encoder_ffn_embed_dim", FAIRSEQ_HUBERT_DEFAULTS),
        "encoder_attention_heads": get_int(model_cfg, "encoder_attention_heads", FAIRSEQ_HUBERT_DEFAULTS),
        "conv_pos": get_int(model_cfg, "conv_pos", FAIRSEQ_HUBERT_DEFAULTS),
        "conv_pos_groups": get_int(model_cfg, "conv_pos_groups", FAIRSEQ_HUBERT_DEFAULTS),
    }
    if embed == MHUBERT_BASE_VALUES["encoder_embed_dim"]:  # claims to be the real base model: all values must match
        for key, expected in MHUBERT_BASE_VALUES.items():
            if arch_values[key] != expected:
                problems.append(f"{key}={arch_values[key]} (mHuBERT base has {expected})")
        if any(d != 512 for d, _, _ in conv_layers):
            problems.append(f"conv channels {[d for d, _, _ in conv_layers]} (mHuBERT base has 512)")
    if embed % arch_values["encoder_attention_heads"] or embed % arch_values["conv_pos_groups"]:
        problems.append(f"encoder_embed_dim={embed} not divisible by heads/conv_pos_groups")
    layers = get_int(model_cfg, "encoder_layers", FAIRSEQ_HUBERT_DEFAULTS)
    if layers < OUTPUT_LAYER:
        problems.append(f"encoder_layers={layers} (layer {OUTPUT_LAYER} is needed)")

    sample_rate = get_int(task_cfg, "sample_rate", FAIRSEQ_TASK_DEFAULTS)
    if sample_rate != SAMPLE_RATE:
        problems.append(f"task sample_rate={sample_rate} (only {SAMPLE_RATE})")
    normalize = get_bool(task_cfg, "normalize", FAIRSEQ_TASK_DEFAULTS)

    if problems:
        raise UnsupportedCheckpoint(f"{source}: unsupported HuBERT variant: " + "; ".join(problems))
    arch = HubertArchitecture(
        conv_dims=tuple(d for d, _, _ in conv_layers),
        embed_dim=embed,
        ffn_dim=arch_values["encoder_ffn_embed_dim"],
        attention_heads=arch_values["encoder_attention_heads"],
        encoder_layers=layers,
        conv_pos=arch_values["conv_pos"],
        conv_pos_groups=arch_values["conv_pos_groups"],
    )
    return FairseqHubertSettings(arch, normalize, sample_rate, model_cfg, task_cfg)


# ----------------------------------------------------------------------------------------------------------------
# Strict key mapping fairseq -> transformers


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """W = g * v / ||v||, the norm taken over every dim except `dim` (torch/fairseq weight_norm semantics)."""
    if hasattr(torch, "_weight_norm"):  # the exact kernel weight_norm uses at forward time
        return torch._weight_norm(weight_v, weight_g, dim)
    dims = [d for d in range(weight_v.dim()) if d != dim]
    return weight_v * (weight_g / weight_v.norm(dim=dims, keepdim=True))


def mapping_table(arch: HubertArchitecture, num_layers: int = OUTPUT_LAYER) -> dict[str, tuple[str, ...]]:
    """HF parameter name -> fairseq source key(s). A 2-tuple (g, v) means "fold this weight norm"."""
    table: dict[str, tuple[str, ...]] = {}
    fe = "feature_extractor.conv_layers"
    for i in range(len(arch.conv_dims)):
        table[f"{fe}.{i}.conv.weight"] = (f"{fe}.{i}.0.weight",)
    table[f"{fe}.0.layer_norm.weight"] = (f"{fe}.0.2.weight",)  # Fp32GroupNorm (512 groups) of layer 0
    table[f"{fe}.0.layer_norm.bias"] = (f"{fe}.0.2.bias",)
    table["feature_projection.layer_norm.weight"] = ("layer_norm.weight",)
    table["feature_projection.layer_norm.bias"] = ("layer_norm.bias",)
    table["feature_projection.projection.weight"] = ("post_extract_proj.weight",)
    table["feature_projection.projection.bias"] = ("post_extract_proj.bias",)
    table["encoder.pos_conv_embed.conv.weight"] = ("encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v")
    table["encoder.pos_conv_embed.conv.bias"] = ("encoder.pos_conv.0.bias",)
    table["encoder.layer_norm.weight"] = ("encoder.layer_norm.weight",)
    table["encoder.layer_norm.bias"] = ("encoder.layer_norm.bias",)
    for n in range(num_layers):
        src, dst = f"encoder.layers.{n}", f"encoder.layers.{n}"
        pairs = [(f"self_attn.{p}_proj", f"attention.{p}_proj") for p in ("q", "k", "v", "out")]
        pairs += [("self_attn_layer_norm", "layer_norm"), ("fc1", "feed_forward.intermediate_dense"),
                  ("fc2", "feed_forward.output_dense"), ("final_layer_norm", "final_layer_norm")]
        for s, d in pairs:
            for p in ("weight", "bias"):
                table[f"{dst}.{d}.{p}"] = (f"{src}.{s}.{p}",)
    return table


def _dropped_by_design(key: str, arch: HubertArchitecture, num_layers: int) -> bool:
    """Checkpoint keys that are deliberately not mapped: pre-training heads and blocks after the output layer."""
    if key in ("mask_emb", "label_embs_concat") or key.startswith("final_proj."):
        return True
    if key.startswith("encoder.layers."):
        index = key.split(".")[2]
        return index.isdigit() and num_layers <= int(index) < arch.encoder_layers
    return False


# Newer torch/fairseq save weight norm as a parametrization: accept those names for the positional conv too.
_POS_CONV_ALIASES = {
    "encoder.pos_conv.0.weight_g": "encoder.pos_conv.0.parametrizations.weight.original0",
    "encoder.pos_conv.0.weight_v": "encoder.pos_conv.0.parametrizations.weight.original1",
}


def map_fairseq_state_dict(
    fairseq_state: dict[str, torch.Tensor],
    arch: HubertArchitecture,
    expected: dict[str, torch.Size],
    source: str = "<checkpoint>",
    num_layers: int = OUTPUT_LAYER,
) -> dict[str, torch.Tensor]:
    """Map a fairseq HuBERT state dict onto HF names with a strict table.

    `expected` holds the HF model's parameter shapes. Every HF parameter must be filled exactly once, every
    checkpoint key must be used or dropped by design, shapes must agree; otherwise ONE error lists all problems.
    """
    table = mapping_table(arch, num_layers)
    state = dict(fairseq_state)
    for canonical, alias in _POS_CONV_ALIASES.items():
        if canonical not in state and alias in state:
            state[canonical] = state.pop(alias)

    missing, mismatched, unmapped_targets = [], [], []
    explained: set[str] = set()  # HF keys already reported through a missing or mismatched source
    fill_count: Counter[str] = Counter()
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    unmapped_targets = [k for k in expected if k not in table]
    for hf_key, sources in table.items():
        if hf_key not in expected:
            unmapped_targets.append(f"{hf_key} (mapping target absent from the model)")
            continue
        absent = [s for s in sources if s not in state]
        if absent:
            missing.extend(absent)
            explained.add(hf_key)
            continue
        used.update(sources)
        tensors = [state[s].detach().to(torch.float32) for s in sources]
        value = fold_weight_norm(tensors[0], tensors[1], dim=2) if len(sources) == 2 else tensors[0]
        if tuple(value.shape) != tuple(expected[hf_key]):
            mismatched.append(f"{' + '.join(sources)} {tuple(value.shape)} -> {hf_key} {tuple(expected[hf_key])}")
            explained.add(hf_key)
            continue
        out[hf_key] = value.contiguous()
        fill_count[hf_key] += 1
    unexpected = sorted(k for k in state if k not in used and not _dropped_by_design(k, arch, num_layers))
    not_once = [k for k in expected if fill_count[k] != 1 and k not in explained and k in table]
    if missing or unexpected or mismatched or unmapped_targets or not_once:
        parts = []
        for label, items in (("missing checkpoint keys", missing), ("unexpected checkpoint keys", unexpected),
                             ("shape mismatches", mismatched), ("HF parameters without a mapping", unmapped_targets),
                             ("HF parameters not filled exactly once", not_once)):
            if items:
                parts.append(f"{label} ({len(items)}): " + ", ".join(items))
        raise UnsupportedCheckpoint(f"{source}: fairseq -> transformers HuBERT mapping failed: " + "; ".join(parts))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The HF model with a plain (folded) positional conv


def build_hf_hubert(arch: HubertArchitecture, num_hidden_layers: int = OUTPUT_LAYER):
    """A `HubertModel` in eval mode whose positional conv carries a plain weight (no weight-norm parametrization)."""
    from transformers import HubertModel

    model = HubertModel(arch.hf_config(num_hidden_layers))
    conv = model.encoder.pos_conv_embed.conv
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(conv, "weight"):
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    elif hasattr(conv, "weight_g"):  # old-style weight_norm hook
        torch.nn.utils.remove_weight_norm(conv)
    return model.eval().to(torch.float32)


def _expected_shapes(model) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


class HubertReader:
    """Whole-utterance layer-11 features, the official way: optional waveform layer norm, 100 s chunks, fp32."""

    def __init__(self, model, normalize: bool, device: str | torch.device = "cpu", source: str = "<model>"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.normalize = bool(normalize)
        self.max_chunk_samples = MAX_CHUNK_SAMPLES
        self.source = source

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def prepare(self, wave16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """16 kHz mono waveform -> float32 [1, N] on the device, layer-normed over the whole input if the
        checkpoint's task says `normalize`."""
        # Always a fresh copy: same values in a torch-allocated (aligned) buffer, whatever the caller passed, so
        # two calls on equal audio run identical kernels on identical memory layouts (bitwise-equal features).
        if torch.is_tensor(wave16k):
            x = wave16k.detach().to(dtype=torch.float32).clone()
        else:
            x = torch.tensor(np.asarray(wave16k, dtype=np.float32))
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D 16 kHz mono waveform, got shape {tuple(x.shape)}")
        if x.numel() < RECEPTIVE_FIELD:
            raise ValueError(f"waveform has {x.numel()} samples: at least {RECEPTIVE_FIELD} (25 ms) are needed")
        x = x.to(device=self.device, dtype=torch.float32)
        if self.normalize:
            x = F.layer_norm(x, x.shape)
        return x.view(1, -1)

    @torch.inference_mode()
    def chunk_features(self, chunk: torch.Tensor) -> torch.Tensor:
        """Features [T, E] of one independent chunk [1, n] (no padding). A chunk under 400 samples gives 0 frames
        (fairseq would fail on such a tail; we keep the frames of the full chunks)."""
        if chunk.shape[-1] < RECEPTIVE_FIELD:
            return torch.zeros(0, self.hidden_size, device=self.device)
        return self.model(chunk).last_hidden_state[0]

    def chunk_starts(self, num_samples: int) -> range:
        return range(0, num_samples, self.max_chunk_samples)

    @torch.inference_mode()
    def features(self, wave16k: np.ndarray | torch.Tensor,
                 chunk_cache: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Layer-11 features [T, E] of a whole utterance. `chunk_cache` maps chunk start -> features already
        computed for that exact chunk (the incremental extractor precomputes closed 100 s chunks)."""
        x = self.prepare(wave16k)
        feats = []
        for start in self.chunk_starts(x.shape[1]):
            if chunk_cache is not None and start in chunk_cache:
                feats.append(chunk_cache[start])
            else:
                feats.append(self.chunk_features(x[:, start:start + self.max_chunk_samples]))
        return torch.cat(feats, dim=0)

    def num_frames(self, num_samples: int) -> int:
        """Frames of a whole utterance including the 100 s chunking."""
        return sum(num_frames(min(self.max_chunk_samples, num_samples - s)) for s in self.chunk_starts(num_samples))


# ----------------------------------------------------------------------------------------------------------------
# Loading and converting


def load_fairseq_hubert(path: str | Path, device: str | torch.device = "cpu") -> HubertReader:
    """fairseq `.pt` -> `HubertReader` (layers 0..10, fp32). fairseq is not needed."""
    path = Path(path)
    state = load_fairseq_checkpoint(path)
    settings = read_hubert_settings(state, str(path))
    if not isinstance(state.get("model"), dict):
        raise UnsupportedCheckpoint(f"{path}: checkpoint has no 'model' state dict")
    model = build_hf_hubert(settings.arch)
    mapped = map_fairseq_state_dict(state["model"], settings.arch, _expected_shapes(model), str(path))
    model.load_state_dict(mapped, strict=True)
    return HubertReader(model, settings.normalize, device, source=str(path))


CONVERTED_KEY = "speechgpt_rt"  # our section in config.json


def save_converted_hubert(model, normalize: bool, out_dir: str | Path) -> Path:
    """Write `model.safetensors` + `config.json` (HF HubertConfig + our section with the normalize flag)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conv = model.encoder.pos_conv_embed.conv
    if hasattr(conv, "parametrizations") or hasattr(conv, "weight_g"):
        raise ValueError("save_converted_hubert expects the positional conv weight folded (use build_hf_hubert)")
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config[CONVERTED_KEY] = {
        "format_version": 1,
        "normalize": bool(normalize),
        "output_layer": OUTPUT_LAYER,
        "pos_conv_weight_norm": "folded",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return out_dir


def load_converted_hubert(path: str | Path, device: str | torch.device = "cpu") -> HubertReader:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    config_path, weights_path = path / "config.json", path / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing from the converted HuBERT directory")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise unreadable(config_path, "JSON file", exc) from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    ours = config.get(CONVERTED_KEY)
    if not isinstance(ours, dict) or "normalize" not in ours:
        raise ValueError(f"{config_path}: no '{CONVERTED_KEY}.normalize' entry (not written by save_converted_hubert)")
    try:
        arch = HubertArchitecture(
            conv_dims=tuple(config["conv_dim"]),
            embed_dim=config["hidden_size"],
            ffn_dim=config["intermediate_size"],
            attention_heads=config["num_attention_heads"],
            encoder_layers=config["num_hidden_layers"],
            conv_pos=config["num_conv_pos_embeddings"],
            conv_pos_groups=config["num_conv_pos_embedding_groups"],
            layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        )
    except KeyError as exc:
        raise ValueError(f"{config_path}: missing field {exc}") from exc
    geometry = tuple(zip(config.get("conv_kernel", ()), config.get("conv_stride", ())))
    if geometry != CONV_GEOMETRY or config.get("feat_extract_norm") != "group" or config.get("do_stable_layer_norm"):
        raise UnsupportedCheckpoint(f"{config_path}: not a group-norm post-LN HuBERT with the 400/320 front end")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:  # SafetensorError is no ValueError and does not name the file
        raise unreadable(weights_path, "safetensors file", exc) from exc
    model = build_hf_hubert(arch, num_hidden_layers=config["num_hidden_layers"])
    expected = _expected_shapes(model)
    problems = sorted(set(expected) ^ set(state))
    problems += [f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in expected
                 if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if problems:
        raise ValueError(f"{weights_path}: weights do not match config.json: " + ", ".join(problems))
    model.load_state_dict(state, strict=True)
    return HubertReader(model, bool(ours["normalize"]), device, source=str(path))


def load_hubert(path: str | Path, device: str | torch.device = "cpu") -> HubertReader:
    """Either a fairseq `.pt` checkpoint or a directory written by `save_converted_hubert`."""
    path = Path(path)
    if path.is_dir():
        return load_converted_hubert(path, device)
    if path.is_file():
        return load_fairseq_hubert(path, device)
    raise FileNotFoundError(f"{path}: no HuBERT checkpoint (.pt) or converted directory here")
