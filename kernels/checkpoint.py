"""Loading the SpeechGPT LLM from the files users have: HF LLaMA directories and the -com LoRA adapter.

Accepted layouts of a model directory (the first that exists wins):
  model.safetensors | model.safetensors.index.json (+ shards) | pytorch_model.bin | pytorch_model.bin.index.json
The release's SpeechGPT-7B-cm is one ~27 GB mostly-fp32 `pytorch_model.bin`: it is opened with mmap and
weights_only, every tensor is cast on its own as it is handed out, so the process never holds two full copies.
`rotary_emb.inv_freq` buffers (written by transformers 4.29) are ignored: RoPE is recomputed in fp32.

The LoRA adapter (SpeechGPT-7B-com, peft 0.3.0 key names) is merged in fp32: W + (alpha / r) * B @ A.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORED_KEY_RE = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file or directory is not what it should be; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------------------
# Architecture


@dataclass(frozen=True)
class LlamaArch:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise CheckpointError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_attention_heads {self.num_heads} is not divisible by num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "LlamaArch":
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise CheckpointError(f"{source}: missing field(s) {', '.join(missing)}")
        arch = cfg.get("architectures") or ["LlamaForCausalLM"]
        if "LlamaForCausalLM" not in arch:
            raise CheckpointError(f"{source}: architectures is {arch}, expected LlamaForCausalLM")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act is {cfg['hidden_act']!r}, expected 'silu'")
        scaling = cfg.get("rope_scaling")
        if scaling not in (None, {}) and (scaling or {}).get("rope_type", scaling.get("type")) not in (None, "default"):
            raise CheckpointError(f"{source}: rope_scaling {scaling} is not supported (SpeechGPT uses none)")
        rope = cfg.get("rope_parameters") or {}
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_config_json(cls, path: Path | str) -> "LlamaArch":
        path = Path(path)
        return cls.from_hf_config(_read_json(path, "a LLaMA model directory needs config.json"), str(path))

    def to_hf_config(self) -> dict:
        """config.json content in the release's style (transformers 4.29 field names)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            **({"num_key_value_heads": self.num_kv_heads} if self.num_kv_heads != self.num_heads else {}),
            **({"rope_theta": self.rope_theta} if self.rope_theta != 10000.0 else {}),
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float16",
            "transformers_version": "4.29.0.dev0",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i, v, kv = self.hidden_size, self.intermediate_size, self.vocab_size, self.kv_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            shapes |= {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())


# The released SpeechGPT-7B-cm config (docs/speechgpt-format.md, LLM checkpoint).
SPEECHGPT_7B = LlamaArch(
    hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32, vocab_size=33006
)


# ---------------------------------------------------------------------------------------------------------------
# Weight files


def _read_json(path: Path, needed_because: str):
    """A required JSON file's contents; CheckpointError naming the file if it is missing or not JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {needed_because}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _torch_load(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as e:
        if mmap and "mmap" in str(e):  # legacy (pre-zip) serialization cannot be memory-mapped
            return _torch_load(path, mmap=False)
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({e})") from None
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


class _WeightFiles:
    """Names, shapes and lazily-read tensors of one model directory's weight files."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        self.kind, self.files = self._discover(model_dir)
        self._bin_cache: dict[Path, dict[str, torch.Tensor]] = {}
        self.key_file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for f in self.files:
            for name, shape, dtype in self._list(f):
                if name in self.key_file:
                    raise CheckpointError(f"{f}: tensor {name!r} also appears in {self.key_file[name]}")
                self.key_file[name], self.shapes[name], self.dtypes[name] = f, shape, dtype

    @staticmethod
    def _discover(d: Path) -> tuple[str, list[Path]]:
        if not d.is_dir():
            raise CheckpointError(f"{d}: not a directory")
        for name, kind in ((SAFETENSORS_SINGLE, "safetensors"), (SAFETENSORS_INDEX, "safetensors"), (BIN_SINGLE, "bin"), (BIN_INDEX, "bin")):
            p = d / name
            if not p.is_file():
                continue
            if not name.endswith(".index.json"):
                return kind, [p]
            try:
                index = json.loads(p.read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise CheckpointError(f"{p}: not a valid shard index (needs a 'weight_map' object): {e}") from None
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(f"{p}: shard file(s) missing: {', '.join(missing)}")
            return kind, [d / s for s in shards]
        raise CheckpointError(
            f"{d}: no weights found; expected one of {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE}, {BIN_INDEX}"
        )

    def _list(self, f: Path) -> Iterator[tuple[str, tuple[int, ...], str]]:
        if self.kind == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        sl = sf.get_slice(k)
                        yield k, tuple(sl.get_shape()), str(sl.get_dtype())
            except Exception as e:
                raise CheckpointError(f"{f}: cannot be read as safetensors ({e})") from None
        else:
            sd = self._bin(f)
            for k, t in sd.items():
                yield k, tuple(t.shape), str(t.dtype).removeprefix("torch.")

    def _bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bin_cache:
            self._bin_cache[f] = _torch_load(f)
        return self._bin_cache[f]

    def get(self, name: str) -> torch.Tensor:
        f = self.key_file[name]
        if self.kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return sf.get_tensor(name)
        return self._bin(f)[name]

    def release(self) -> None:
        self._bin_cache.clear()


# ---------------------------------------------------------------------------------------------------------------
# LoRA


_LORA_KEY_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"\.lora_([AB])(?:\.default)?\.weight$"
)


@dataclass
class LoraAdapter:
    """A peft LoRA adapter for the LLaMA projections (SpeechGPT-7B-com: r 8, alpha 16, q_proj and v_proj)."""

    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool
    target_modules: list[str]
    # base weight name ("model.layers.3.self_attn.q_proj.weight") -> (A [r, in], B [out, r]) in fp32
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, adapter_dir: Path | str) -> "LoraAdapter":
        d = Path(adapter_dir)
        cfg_path = d / "adapter_config.json"
        cfg = _read_json(cfg_path, "a LoRA adapter directory needs adapter_config.json")
        for k in ("r", "lora_alpha"):
            if not isinstance(cfg.get(k), (int, float)) or cfg[k] <= 0:
                raise CheckpointError(f"{cfg_path}: field {k!r} must be a positive number, got {cfg.get(k)!r}")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{cfg_path}: peft_type is {cfg['peft_type']!r}, expected 'LORA'")
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]

        if (d / "adapter_model.safetensors").is_file():
            from safetensors.torch import load_file

            weights_file = d / "adapter_model.safetensors"
            sd = load_file(str(weights_file))
        elif (d / "adapter_model.bin").is_file():
            weights_file = d / "adapter_model.bin"
            sd = _torch_load(weights_file, mmap=False)
        else:
            raise CheckpointError(f"{d}: no adapter_model.bin or adapter_model.safetensors")

        halves: dict[str, dict[str, torch.Tensor]] = {}
        unexpected = []
        for k, t in sd.items():
            m = _LORA_KEY_RE.match(k)
            if not m:
                unexpected.append(k)
                continue
            layer, block, module, ab = m.groups()
            if targets and module not in targets:
                unexpected.append(f"{k} (module {module} not in target_modules {targets})")
                continue
            halves.setdefault(f"model.layers.{layer}.{block}.{module}.weight", {})[ab] = t.float()
        problems = [f"unexpected key {k}" for k in unexpected]
        pairs = {}
        for base, ab in sorted(halves.items()):
            if set(ab) != {"A", "B"}:
                problems.append(f"{base}: lora_{'B' if 'A' in ab else 'A'} missing")
                continue
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                problems.append(f"{base}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match r={r}")
                continue
            pairs[base] = (a, b)
        if not pairs and not problems:
            problems.append("no LoRA weights found")
        if problems:
            raise CheckpointError(f"{weights_file}: " + "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else ""))
        return cls(r, alpha, scale, bool(cfg.get("fan_in_fan_out", False)), list(targets), pairs, str(weights_file))

    def delta(self, name: str) -> torch.Tensor | None:
        """scale * B @ A in fp32 for a base weight, or None if the adapter does not touch it."""
        if name not in self.pairs:
            return None
        a, b = self.pairs[name]
        d = self.scale * (b @ a)
        return d.T if self.fan_in_fan_out else d

    def check_against(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        problems = []
        for name, (a, b) in self.pairs.items():
            if name not in shapes:
                problems.append(f"LoRA targets {name}, which the base model does not have")
                continue
            out, inp = shapes[name]
            if self.fan_in_fan_out:
                out, inp = inp, out
            if a.shape[1] != inp or b.shape[0] != out:
                problems.append(f"LoRA for {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit weight {shapes[name]}")
        return problems


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint


class LlamaCheckpoint:
    """A validated LLaMA checkpoint (optionally with a LoRA adapter to merge) that hands out tensors one by one."""

    def __init__(self, model_dir: Path | str, lora_dir: Path | str | None = None):
        self.dir = Path(model_dir)
        self.arch = LlamaArch.from_config_json(self.dir / "config.json")
        self.files = _WeightFiles(self.dir)
        self.lora = LoraAdapter.load(lora_dir) if lora_dir is not None else None
        self._validate()

    def _validate(self) -> None:
        expected = self.arch.expected_shapes()
        got = {k: s for k, s in self.files.shapes.items() if not IGNORED_KEY_RE.match(k)}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        mismatched = [f"{k}: expected {expected[k]}, got {got[k]}" for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
        problems = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                problems.append(f"{title} ({len(items)}): " + ", ".join(shown))
        if self.lora is not None:
            problems += self.lora.check_against(expected)
        if problems:
            raise CheckpointError(f"{self.dir}: checkpoint does not match config.json ({self.files.kind} weights):\n  " + "\n  ".join(problems))

    @property
    def names(self) -> list[str]:
        return list(self.arch.expected_shapes())

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One weight, LoRA merged in fp32 where the adapter touches it, cast to `dtype`."""
        raw = self.files.get(name)
        delta = self.lora.delta(name) if self.lora is not None else None
        if delta is None:
            return raw.to(dtype=dtype, copy=True) if raw.dtype == dtype else raw.to(dtype)
        return (raw.float() + delta).to(dtype)

    def tensors(self, dtype: torch.dtype = torch.float16) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name, dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        sd = dict(self.tensors(dtype))
        self.files.release()
        return sd


def load_llama(model_dir: Path | str, lora_dir: Path | str | None = None, dtype: torch.dtype = torch.float32) -> tuple[LlamaArch, dict[str, torch.Tensor]]:
    ckpt = LlamaCheckpoint(model_dir, lora_dir)
    return ckpt.arch, ckpt.state_dict(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_safetensors_shards(
    tensors: Iterator[tuple[str, torch.Tensor]],
    out_dir: Path,
    max_shard_bytes: int = 2 << 30,
    progress=None,
) -> list[Path]:
    """Write tensors as safetensors shards of at most `max_shard_bytes` (one shard in memory at a time).

    A single shard is named model.safetensors; several get model-0000i-of-0000n.safetensors and an index.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, size
        if not shard:
            return
        p = out_dir / f"model-part{len(written) + 1:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(p), metadata={"format": "pt"})
        written.append((p, list(shard)))
        shard, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
        if progress is not None:
            progress(nbytes)
    flush()

    if len(written) == 1:
        final = out_dir / SAFETENSORS_SINGLE
        written[0][0].replace(final)
        return [final]
    n = len(written)
    weight_map, paths = {}, []
    for i, (p, names) in enumerate(written, 1):
        final = out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
        p.replace(final)
        paths.append(final)
        weight_map.update({k: final.name for k in names})
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths
