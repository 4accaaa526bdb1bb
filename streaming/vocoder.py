"""The reference unit vocoder: fairseq's CodeHiFiGAN generator + duration predictor, in plain torch.

Facts (docs/speechgpt-format.md, Vocoder forward pass): unit embedding `dict` -> duration predictor (two k3 convs
with ReLU + LayerNorm, a linear projection to log(dur + 1)) -> `repeat_interleave` -> HiFi-GAN (conv_pre k7,
5 stages of leaky_relu(0.1) -> ConvTranspose1d -> average of three "1"-type residual blocks, final leaky_relu with
the DEFAULT slope 0.01, conv_post k7, tanh) -> 320 samples of 16 kHz audio per expanded frame.

The release checkpoint (`vocoder.pt` = fairseq `g_00500000`) stores weight-normed layers (weight_g / weight_v);
weight norm is folded once at load, so the module holds plain fp32 conv weights.

The pieces are kept separate because the streaming synthesizer drives them separately:
`predict_durations(units)`, `expand(units, durations)`, `generate(expanded_units)`; `synthesize(units)` is the
whole-utterance reference every fast path is compared against.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streaming.load_errors import unreadable_message
from streaming.vocoder_types import ReceptiveField, validate_units

log = logging.getLogger(__name__)

LRELU_SLOPE = 0.1  # inside the stages and the residual blocks
FINAL_LRELU_SLOPE = 0.01  # F.leaky_relu's default, used once before conv_post (fairseq calls it without a slope)

RELEASE_CHECKPOINT_NAMES = ("vocoder.pt", "g_00500000")
CONVERTED_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CONVERTED_FORMAT_TAG = "speechgpt-rt-vocoder"

# The release config.json (docs/speechgpt-format.md, Vocoder files), training-only fields included so written files
# look like the real one.
RELEASE_CONFIG: dict[str, Any] = {
    "resblock": "1",
    "num_gpus": 0,
    "batch_size": 16,
    "learning_rate": 0.0002,
    "adam_b1": 0.8,
    "adam_b2": 0.99,
    "lr_decay": 0.999,
    "seed": 1234,
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "segment_size": 8960,
    "code_hop_size": 320,
    "f0": False,
    "num_mels": 80,
    "num_freq": 1025,
    "n_fft": 1024,
    "hop_size": 256,
    "win_size": 1024,
    "dur_prediction_weight": 1.0,
    "dur_predictor_params": {
        "encoder_embed_dim": 128,
        "var_pred_hidden_dim": 128,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
    "fmin": 0,
    "fmax": 8000,
    "fmax_for_loss": None,
}


class VocoderConfigError(ValueError):
    """config.json cannot describe a vocoder this module implements."""


class VocoderCheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not match the architecture its config.json describes."""


# ----------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class VocoderConfig:
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    duration_hidden_dim: int
    duration_kernel_size: int
    sampling_rate: int
    code_hop_size: int
    # The parsed file as read, written back unchanged by save_converted (and tiny_parts.write_tiny_vocoder).
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_stages(self) -> int:
        return len(self.upsample_rates)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels after each upsampling stage."""
        return tuple(self.upsample_initial_channel // 2 ** (i + 1) for i in range(self.num_stages))

    @classmethod
    def from_json(cls, path: str | Path) -> "VocoderConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocoder config not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VocoderConfigError(unreadable_message(path, "JSON file", exc)) from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "VocoderConfig":
        if not isinstance(data, dict):
            raise VocoderConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")

        def need(name: str, container: dict[str, Any] = data, where: str = "") -> Any:
            if name not in container:
                raise VocoderConfigError(f"{source}: missing field {where}{name!r}")
            return container[name]

        def int_list(name: str) -> tuple[int, ...]:
            value = need(name)
            if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) and v > 0 for v in value):
                raise VocoderConfigError(
                    f"{source}: field {name!r} must be a non-empty list of positive ints, got {value!r}"
                )
            return tuple(int(v) for v in value)

        def pos_int(name: str, container: dict[str, Any] = data, where: str = "") -> int:
            value = need(name, container, where)
            if not _is_int(value) or value <= 0:
                raise VocoderConfigError(f"{source}: field {where}{name!r} must be a positive int, got {value!r}")
            return int(value)

        # Variants this implementation does not cover: say so instead of producing wrong audio.
        if str(data.get("resblock", "1")) != "1":
            raise VocoderConfigError(
                f"{source}: resblock {data.get('resblock')!r} is not supported (only the '1' resblock of the release)"
            )
        for unsupported in ("f0", "multispkr", "embedder_params"):
            if data.get(unsupported):
                raise VocoderConfigError(
                    f"{source}: {unsupported!r} = {data[unsupported]!r} is not supported: only the single-speaker, "
                    "unit-only vocoder (no F0 / speaker inputs) is implemented"
                )

        rates = int_list("upsample_rates")
        kernels = int_list("upsample_kernel_sizes")
        if len(rates) != len(kernels):
            raise VocoderConfigError(
                f"{source}: upsample_rates has {len(rates)} entries but upsample_kernel_sizes has {len(kernels)}"
            )
        for i, (u, k) in enumerate(zip(rates, kernels)):
            # output length = input length * u only when (k - u) is even and >= 0 (padding (k - u) / 2)
            if k < u or (k - u) % 2:
                raise VocoderConfigError(
                    f"{source}: upsample stage {i}: kernel {k} with rate {u} does not upsample exactly by {u} "
                    "(need kernel >= rate and kernel - rate even)"
                )
        initial = pos_int("upsample_initial_channel")
        if initial % 2 ** len(rates):
            raise VocoderConfigError(
                f"{source}: upsample_initial_channel {initial} is not divisible by 2**{len(rates)} "
                "(channels halve per stage)"
            )
        rb_kernels = int_list("resblock_kernel_sizes")
        dilations_raw = need("resblock_dilation_sizes")
        if (
            not isinstance(dilations_raw, (list, tuple))
            or len(dilations_raw) != len(rb_kernels)
            or not all(
                isinstance(d, (list, tuple)) and d and all(_is_int(x) and x > 0 for x in d) for d in dilations_raw
            )
        ):
            raise VocoderConfigError(
                f"{source}: resblock_dilation_sizes must be {len(rb_kernels)} non-empty lists of positive ints "
                f"(one per resblock kernel), got {dilations_raw!r}"
            )
        dilations = tuple(tuple(int(x) for x in d) for d in dilations_raw)
        for k in rb_kernels:
            if k % 2 == 0:
                raise VocoderConfigError(f"{source}: resblock kernel sizes must be odd, got {k}")

        num_embeddings = pos_int("num_embeddings")
        embedding_dim = pos_int("embedding_dim")
        model_in_dim = data.get("model_in_dim", embedding_dim)
        if model_in_dim != embedding_dim:
            raise VocoderConfigError(
                f"{source}: model_in_dim {model_in_dim!r} != embedding_dim {embedding_dim} (without F0/speaker inputs "
                "the generator input is the unit embedding)"
            )

        dur = data.get("dur_predictor_params")
        if not dur or not isinstance(dur, dict):
            raise VocoderConfigError(
                f"{source}: missing field 'dur_predictor_params': SpeechGPT emits deduplicated units, so the vocoder "
                "needs its duration predictor"
            )
        where = "dur_predictor_params."
        dur_in = pos_int("encoder_embed_dim", dur, where)
        if dur_in != embedding_dim:
            raise VocoderConfigError(
                f"{source}: dur_predictor_params.encoder_embed_dim {dur_in} != embedding_dim {embedding_dim}"
            )
        dur_hidden = pos_int("var_pred_hidden_dim", dur, where)
        dur_kernel = pos_int("var_pred_kernel_size", dur, where)
        if dur_kernel != 3:
            # fairseq's VariancePredictor pads its second conv by 1: any other kernel changes the sequence length
            raise VocoderConfigError(
                f"{source}: dur_predictor_params.var_pred_kernel_size must be 3 (fairseq pads conv2 by 1), "
                f"got {dur_kernel}"
            )

        sampling_rate = pos_int("sampling_rate")
        hop = math.prod(rates)
        code_hop = data.get("code_hop_size", hop)
        if code_hop != hop:
            raise VocoderConfigError(
                f"{source}: product of upsample_rates {list(rates)} is {hop} but code_hop_size is {code_hop!r}"
            )
        return cls(
            upsample_rates=rates,
            upsample_kernel_sizes=kernels,
            upsample_initial_channel=initial,
            resblock_kernel_sizes=rb_kernels,
            resblock_dilation_sizes=dilations,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            duration_hidden_dim=dur_hidden,
            duration_kernel_size=dur_kernel,
            sampling_rate=sampling_rate,
            code_hop_size=hop,
            raw=json.loads(json.dumps(data)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The release-format dict (the original file's fields when this config was read from one)."""
        if self.raw:
            return json.loads(json.dumps(self.raw))
        return {
            "resblock": "1",
            "upsample_rates": list(self.upsample_rates),
            "upsample_kernel_sizes": list(self.upsample_kernel_sizes),
            "upsample_initial_channel": self.upsample_initial_channel,
            "resblock_kernel_sizes": list(self.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in self.resblock_dilation_sizes],
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "model_in_dim": self.embedding_dim,
            "code_hop_size": self.code_hop_size,
            "f0": False,
            "dur_predictor_params": {
                "encoder_embed_dim": self.embedding_dim,
                "var_pred_hidden_dim": self.duration_hidden_dim,
                "var_pred_kernel_size": self.duration_kernel_size,
                "var_pred_dropout": 0.5,
            },
            "sampling_rate": self.sampling_rate,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------ receptive field


def receptive_field(config: VocoderConfig) -> ReceptiveField:
    """Back-propagate an index range through every generator layer, from one frame's samples to input frames."""
    frame = 10_000  # far from both ends: the pattern is translation invariant
    hop = config.code_hop_size
    lo, hi = frame * hop, frame * hop + hop - 1  # all samples of the frame
    lo, hi = lo - 3, hi + 3  # conv_post k7
    for stage in reversed(range(config.num_stages)):
        # MRF: every residual block sees the same input; each (convs1, convs2) pair widens by both half-widths
        widen = max(
            sum(d * (k - 1) // 2 + (k - 1) // 2 for d in dils)
            for k, dils in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)
        )
        lo, hi = lo - widen, hi + widen
        u, k = config.upsample_rates[stage], config.upsample_kernel_sizes[stage]
        pad = (k - u) // 2
        # ConvTranspose1d: output o gets input i when 0 <= o - (i*u - pad) <= k - 1
        lo, hi = -((-(lo - k + 1 + pad)) // u), (hi + pad) // u
    lo, hi = lo - 3, hi + 3  # conv_pre k7
    dur_half = (config.duration_kernel_size - 1) // 2
    return ReceptiveField(
        left_frames=frame - lo,
        right_frames=hi - frame,
        duration_left_units=2 * dur_half,
        duration_right_units=2 * dur_half,
    )


# ------------------------------------------------------------------------------------------------------- modules


class DurationPredictor(nn.Module):
    """fairseq's VariancePredictor at inference (dropout inert): (B, T, C) embeddings -> (B, T) log(dur + 1)."""

    def __init__(self, in_dim: int, hidden_dim: int, kernel_size: int) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2
        self.conv1 = nn.Sequential(nn.Conv1d(in_dim, hidden_dim, kernel_size, padding=padding), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden_dim)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden_dim, hidden_dim, kernel_size, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        x = self.ln1(self.conv1(embeddings.transpose(1, 2)).transpose(1, 2))
        x = self.ln2(self.conv2(x.transpose(1, 2)).transpose(1, 2))
        return self.proj(x).squeeze(2)


def durations_from_log(log_durations: torch.Tensor) -> torch.Tensor:
    """dur = max(1, round(exp(log_dur) - 1)); torch.round is half-to-even, as ONNX Round.

    Clamped in float before the cast (equal to fairseq's cast-then-clamp for these integral values) so the ONNX
    graph needs no integer Clip.
    """
    return torch.clamp(torch.round(torch.exp(log_durations) - 1.0), min=1.0).to(torch.int64)


class ResBlock1(nn.Module):
    """HiFi-GAN residual block "1": for each dilation, x += conv2(lrelu(conv1_dilated(lrelu(x))))."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            x = x + conv2(F.leaky_relu(conv1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


@dataclass(frozen=True)
class VocoderSource:
    kind: Literal["release", "converted", "random"]
    weights_path: str | None
    config_path: str | None


class UnitVocoder(nn.Module):
    """CodeHiFiGAN (single speaker, duration prediction) with weight norm folded. fp32, inference only."""

    def __init__(self, config: VocoderConfig) -> None:
        super().__init__()
        self.config = config
        self.source = VocoderSource("random", None, None)
        self.dict = nn.Embedding(config.num_embeddings, config.embedding_dim)
        self.dur_predictor = DurationPredictor(
            config.embedding_dim, config.duration_hidden_dim, config.duration_kernel_size
        )
        c0 = config.upsample_initial_channel
        self.conv_pre = nn.Conv1d(config.embedding_dim, c0, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            c_out = c0 // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_out * 2, c_out, k, u, padding=(k - u) // 2))
            for rk, dils in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(c_out, rk, dils))
        self.conv_post = nn.Conv1d(config.stage_channels[-1], 1, 7, padding=3)
        self.eval()
        self.requires_grad_(False)

    # names of the layers that carry weight norm in the release checkpoint
    def weight_normed_layers(self) -> list[str]:
        return [
            name
            for name, module in self.named_modules()
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and not name.startswith("dur_predictor.")
        ]

    @property
    def device(self) -> torch.device:
        return self.dict.weight.device

    @property
    def hop_size(self) -> int:
        return self.config.code_hop_size

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def receptive_field(self) -> ReceptiveField:
        return receptive_field(self.config)

    def _units_tensor(self, units: Any) -> torch.Tensor:
        if isinstance(units, torch.Tensor):
            array = units.detach().cpu().numpy()
        else:
            array = units
        return torch.from_numpy(validate_units(array, self.config.num_embeddings)).to(self.device)

    # ---- durations
    def log_durations(self, units: Any) -> torch.Tensor:
        """(T,) log(dur + 1) predictions for a unit sequence (zero padding at both ends, as the whole utterance)."""
        ids = self._units_tensor(units)
        with torch.inference_mode():
            return self.dur_predictor(self.dict(ids)[None])[0]

    def predict_durations(self, units: Any) -> torch.Tensor:
        """(T,) int64 frame counts per unit, each >= 1."""
        return durations_from_log(self.log_durations(units))

    @staticmethod
    def expand(units: Any, durations: Any) -> torch.Tensor:
        """Repeat unit i durations[i] times -> (sum(durations),) int64."""
        units_t = torch.as_tensor(np.asarray(units), dtype=torch.int64).reshape(-1)
        dur_t = torch.as_tensor(np.asarray(durations), dtype=torch.int64).reshape(-1).cpu()
        if units_t.shape != dur_t.shape:
            raise ValueError(f"expand: {units_t.numel()} units but {dur_t.numel()} durations")
        if dur_t.numel() and int(dur_t.min()) < 0:
            position = int(torch.nonzero(dur_t < 0)[0])
            raise ValueError(f"expand: negative duration {int(dur_t[position])} at position {position}")
        return torch.repeat_interleave(units_t.cpu(), dur_t)

    # ---- generator
    def embed(self, expanded_units: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, C, T) generator input."""
        return self.dict(expanded_units).transpose(1, 2)

    def generator_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) embedded frames -> (B, T * hop) audio."""
        x = self.conv_pre(x)
        num_kernels = len(self.config.resblock_kernel_sizes)
        for stage, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[stage * num_kernels : (stage + 1) * num_kernels]
            mrf = blocks[0](x)
            for block in blocks[1:]:
                mrf = mrf + block(x)
            x = mrf / num_kernels
        x = self.conv_post(F.leaky_relu(x, FINAL_LRELU_SLOPE))
        return torch.tanh(x).squeeze(1)

    def forward(self, expanded_units: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 expanded unit ids -> (B, T * hop) float audio. (The graph ONNX export traces.)"""
        return self.generator_from_features(self.embed(expanded_units))

    def generate(self, expanded_units: Any) -> torch.Tensor:
        """Generator on an already-expanded unit sequence: (T,) -> (T*hop,) or (B, T) -> (B, T*hop)."""
        if isinstance(expanded_units, torch.Tensor) and expanded_units.dim() == 2:
            for row in expanded_units:
                self._units_tensor(row)
            ids = expanded_units.to(self.device, torch.int64)
            squeeze = False
        else:
            ids = self._units_tensor(expanded_units)[None]
            squeeze = True
        with torch.inference_mode():
            audio = self(ids)
        return audio[0] if squeeze else audio

    def synthesize(self, units: Any) -> np.ndarray:
        """Whole utterance, as fairseq's CodeHiFiGANVocoder(x, dur_prediction=True): float32 (320 * sum(dur),)."""
        ids = self._units_tensor(units)
        durations = self.predict_durations(ids)
        expanded = self.expand(ids.cpu(), durations.cpu())
        return self.generate(expanded).float().cpu().numpy()


# --------------------------------------------------------------------------------------- checkpoints: release


def fold_weight_norm(weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    """W = g * v / ||v||, the norm over every dim but dim 0 (torch weight_norm's default dim=0, as fairseq).

    For ConvTranspose1d (weight [C_in, C_out, k]) dim 0 is the INPUT channel: that is what the release used.
    """
    dims = tuple(range(1, weight_v.dim()))
    norm = weight_v.norm(p=2, dim=dims, keepdim=True)
    return weight_v * (weight_g / norm)


def expected_release_shapes(config: VocoderConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the release `generator` state dict, with its shape."""
    model = UnitVocoder(config)
    normed = set(model.weight_normed_layers())
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if layer in normed and leaf == "weight":
            shapes[f"{layer}.weight_g"] = (tensor.shape[0],) + (1,) * (tensor.dim() - 1)
            shapes[f"{layer}.weight_v"] = tuple(tensor.shape)
        else:
            shapes[key] = tuple(tensor.shape)
    return shapes


def _normalise_release_keys(state: dict[str, Any]) -> dict[str, Any]:
    # torch.nn.utils.parametrizations.weight_norm names the same tensors original0 / original1
    renamed = {}
    for key, value in state.items():
        key = key.replace(".parametrizations.weight.original0", ".weight_g")
        key = key.replace(".parametrizations.weight.original1", ".weight_v")
        renamed[key] = value
    return renamed


def check_state_dict(
    state: dict[str, Any], expected: dict[str, tuple[int, ...]], source: str, what: str = "checkpoint"
) -> None:
    """Strict key/shape check; one error that lists every problem."""
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    for key in missing:
        problems.append(f"missing key {key!r} (expected shape {list(expected[key])})")
    for key in unexpected:
        shape = list(state[key].shape) if hasattr(state[key], "shape") else type(state[key]).__name__
        problems.append(f"unexpected key {key!r} (shape {shape})")
    for key, shape in expected.items():
        if key in state:
            value = state[key]
            if not isinstance(value, torch.Tensor):
                problems.append(f"key {key!r} is a {type(value).__name__}, not a tensor")
            elif tuple(value.shape) != shape:
                problems.append(f"key {key!r} has shape {list(value.shape)}, expected {list(shape)}")
            elif not value.is_floating_point():
                problems.append(f"key {key!r} has dtype {value.dtype}, expected a float tensor")
    if problems:
        listed = "\n  ".join(problems)
        raise VocoderCheckpointError(
            f"{source}: {what} does not match config.json ({len(problems)} problems):\n  {listed}"
        )


def fold_release_state_dict(state: dict[str, torch.Tensor], model: UnitVocoder) -> dict[str, torch.Tensor]:
    folded = {}
    for layer in model.weight_normed_layers():
        g = state[f"{layer}.weight_g"].float()
        v = state[f"{layer}.weight_v"].float()
        folded[f"{layer}.weight"] = fold_weight_norm(g, v)
    for key, value in state.items():
        if not key.endswith((".weight_g", ".weight_v")):
            folded[key] = value.float()
    return folded


def vocoder_from_release_state_dict(
    config: VocoderConfig, state: dict[str, Any], source: str = "state dict"
) -> UnitVocoder:
    state = _normalise_release_keys(state)
    check_state_dict(state, expected_release_shapes(config), source, "'generator' state dict")
    model = UnitVocoder(config)
    model.load_state_dict(fold_release_state_dict(state, model), strict=True)
    return model


def load_release_checkpoint(
    checkpoint_path: str | Path, config_path: str | Path, *, allow_unsafe_pickle: bool = False
) -> UnitVocoder:
    """fairseq `g_00500000` / SpeechGPT `vocoder.pt` + its config.json -> UnitVocoder (weight norm folded, fp32)."""
    checkpoint_path, config_path = Path(checkpoint_path), Path(config_path)
    config = VocoderConfig.from_json(config_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"vocoder checkpoint not found: {checkpoint_path}")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # how torch refuses a global outside the weights-only allow-list
        if not allow_unsafe_pickle:
            raise VocoderCheckpointError(
                f"{checkpoint_path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). "
                "The release g_00500000 holds only tensors; if you trust this file, pass allow_unsafe_pickle=True."
            ) from exc
        log.warning("%s: loading with weights_only=False (trusted by the caller)", checkpoint_path)
        try:
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as unsafe_exc:  # noqa: BLE001 - a broken file, whatever the reader said
            raise VocoderCheckpointError(
                unreadable_message(checkpoint_path, "torch checkpoint", unsafe_exc)
            ) from unsafe_exc
    except Exception as exc:  # noqa: BLE001 - EOFError (empty), RuntimeError (truncated zip)...: a broken file
        raise VocoderCheckpointError(unreadable_message(checkpoint_path, "torch checkpoint", exc)) from exc
    if not isinstance(checkpoint, dict) or "generator" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise VocoderCheckpointError(
            f"{checkpoint_path}: expected a dict with key 'generator' (fairseq CodeHiFiGAN checkpoint), found {found}"
        )
    state = checkpoint["generator"]
    if not isinstance(state, dict):
        raise VocoderCheckpointError(f"{checkpoint_path}: 'generator' is a {type(state).__name__}, not a state dict")
    model = vocoder_from_release_state_dict(config, dict(state), source=str(checkpoint_path))
    model.source = VocoderSource("release", str(checkpoint_path), str(config_path))
    return model


# ------------------------------------------------------------------------------------- checkpoints: converted


def save_converted(vocoder: UnitVocoder, out_dir: str | Path) -> Path:
    """Write `model.safetensors` (weight norm folded, fp32) + `config.json` (release field names). Returns out_dir."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vocoder.state_dict().items()}
    metadata = {"format": "pt", "producer": CONVERTED_FORMAT_TAG}
    save_file(tensors, str(out_dir / CONVERTED_WEIGHTS_NAME), metadata=metadata)
    config = vocoder.config.to_dict()
    config["speechgpt_rt"] = {"format": CONVERTED_FORMAT_TAG, "weight_norm": "folded", "version": 1}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def load_converted(weights_path: str | Path, config_path: str | Path) -> UnitVocoder:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, config_path = Path(weights_path), Path(config_path)
    config = VocoderConfig.from_json(config_path)
    if not weights_path.is_file():
        raise FileNotFoundError(f"converted vocoder weights not found: {weights_path}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise VocoderCheckpointError(unreadable_message(weights_path, "safetensors file", exc)) from exc
    model = UnitVocoder(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(state, expected, str(weights_path), "converted state dict")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.source = VocoderSource("converted", str(weights_path), str(config_path))
    return model


def resolve_vocoder_files(path: str | Path) -> tuple[Literal["release", "converted"], Path, Path]:
    """Find (kind, weights file, config.json) for a vocoder directory, a bundle with `vocoder/`, or a weights file.

    A directory holding both formats loads the converted one (no pickle, no weight-norm folding).
    """
    path = Path(path)
    if path.is_file():
        config = path.parent / CONFIG_NAME
        if not config.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} beside the vocoder weights")
        kind: Literal["release", "converted"] = "converted" if path.suffix == ".safetensors" else "release"
        return kind, path, config
    if not path.is_dir():
        raise FileNotFoundError(f"vocoder path not found: {path}")
    candidates = [path]
    if (path / "vocoder").is_dir():
        candidates.append(path / "vocoder")
    for directory in candidates:
        config = directory / CONFIG_NAME
        if not config.is_file():
            continue
        if (directory / CONVERTED_WEIGHTS_NAME).is_file():
            return "converted", directory / CONVERTED_WEIGHTS_NAME, config
        for name in RELEASE_CHECKPOINT_NAMES:
            if (directory / name).is_file():
                return "release", directory / name, config
    wanted = " or ".join([CONVERTED_WEIGHTS_NAME, *RELEASE_CHECKPOINT_NAMES])
    raise FileNotFoundError(
        f"{path}: no vocoder found (looked in {', '.join(str(c) for c in candidates)} for {CONFIG_NAME} + {wanted})"
    )


def load_vocoder(
    path: str | Path, device: str | torch.device = "cpu", *, allow_unsafe_pickle: bool = False
) -> UnitVocoder:
    """Load the release pair (vocoder.pt or g_00500000 + config.json) or a converted pair (model.safetensors +
    config.json). `vocoder.source.kind` says which was loaded ("release" / "converted")."""
    kind, weights, config = resolve_vocoder_files(path)
    if kind == "converted":
        model = load_converted(weights, config)
    else:
        model = load_release_checkpoint(weights, config, allow_unsafe_pickle=allow_unsafe_pickle)
    log.info("loaded %s vocoder from %s", kind, weights)
    return model.to(device)
