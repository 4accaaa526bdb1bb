"""Where each model file lives: the release layout (what users download) and our converted bundle.

Release layout (also what `speechgpt-rt make-tiny` writes, with tiny random weights):

    MODEL_DIR/
      SpeechGPT-7B-cm/        HF LLaMA dir: config.json, pytorch_model.bin (or shards / safetensors),
                              tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json
      SpeechGPT-7B-com/       LoRA adapter: adapter_config.json, adapter_model.bin (+ tokenizer copies)
      speech2unit/mhubert_base_vp_en_es_fr_it3.pt              fairseq mHuBERT checkpoint
      speech2unit/mhubert_base_vp_en_es_fr_it3_L11_km1000.bin  joblib sklearn k-means
      vocoder/vocoder.pt      (or g_00500000)                  unit HiFi-GAN generator
      vocoder/config.json

Converted bundle (`speechgpt-rt convert`): no pickle anywhere, loads fast:

    BUNDLE/
      bundle.json             {"format": "speechgpt-rt-bundle", "version": 1, ...}
      llm/                    config.json, model.safetensors (fp16, LoRA merged; or shards + index), tokenizer files
      hubert/                 config.json (HF HubertConfig + our "speechgpt_rt" block), model.safetensors
      kmeans/centers.npy
      vocoder/                config.json, model.safetensors (weight norm folded), onnx/ (exported vocoder)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RELEASE_LLM = "SpeechGPT-7B-cm"
RELEASE_LORA = "SpeechGPT-7B-com"
RELEASE_HUBERT = "speech2unit/mhubert_base_vp_en_es_fr_it3.pt"
RELEASE_KMEANS = "speech2unit/mhubert_base_vp_en_es_fr_it3_L11_km1000.bin"
RELEASE_VOCODER_DIR = "vocoder"

BUNDLE_FORMAT = "speechgpt-rt-bundle"
BUNDLE_VERSION = 1
TINY_MARKER = "tiny_bundle.json"


class BundleError(ValueError):
    """A model directory is not a release layout or a converted bundle; the message lists what is missing."""


@dataclass(frozen=True)
class BundlePaths:
    kind: str  # "release" or "converted"
    root: Path
    llm_dir: Path
    lora_dir: Path | None  # None in a converted bundle (merged already)
    tokenizer_dir: Path
    hubert: Path  # fairseq .pt file, or converted directory
    kmeans: Path  # joblib .bin, or centers.npy
    vocoder: Path  # directory holding config.json + vocoder.pt / g_00500000 / model.safetensors
    tiny: dict | None  # the tiny bundle's marker (seed, ...) when this is a random-weight bundle

    @property
    def is_tiny(self) -> bool:
        return self.tiny is not None


def resolve_bundle(model_dir: Path | str) -> BundlePaths:
    root = Path(model_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: model directory does not exist (make one with `speechgpt-rt make-tiny {root}`)")
    tiny = None
    if (root / TINY_MARKER).is_file():
        tiny = json.loads((root / TINY_MARKER).read_text())
    if (root / "bundle.json").is_file():
        meta = json.loads((root / "bundle.json").read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{root / 'bundle.json'}: format is {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        if meta.get("version") != BUNDLE_VERSION:
            raise BundleError(f"{root / 'bundle.json'}: version {meta.get('version')!r}, this build reads {BUNDLE_VERSION}")
        paths = BundlePaths(
            kind="converted",
            root=root,
            llm_dir=root / "llm",
            lora_dir=None,
            tokenizer_dir=root / "llm",
            hubert=root / "hubert",
            kmeans=root / "kmeans" / "centers.npy",
            vocoder=root / "vocoder",
            tiny=meta.get("tiny", tiny),
        )
        required = [paths.llm_dir / "config.json", paths.hubert / "config.json", paths.kmeans, paths.vocoder / "config.json"]
    else:
        paths = BundlePaths(
            kind="release",
            root=root,
            llm_dir=root / RELEASE_LLM,
            lora_dir=root / RELEASE_LORA,
            tokenizer_dir=root / RELEASE_LLM,
            hubert=root / RELEASE_HUBERT,
            kmeans=root / RELEASE_KMEANS,
            vocoder=root / RELEASE_VOCODER_DIR,
            tiny=tiny,
        )
        required = [
            paths.llm_dir / "config.json",
            paths.llm_dir / "tokenizer.model",
            paths.llm_dir / "added_tokens.json",
            paths.lora_dir / "adapter_config.json",
            paths.hubert,
            paths.kmeans,
            paths.vocoder / "config.json",
        ]
    missing = [str(p.relative_to(root)) for p in required if not p.exists()]
    if missing:
        raise BundleError(
            f"{root}: not a complete {paths.kind} layout; missing: {', '.join(missing)} "
            f"(see README 'Model files' for the expected layout)"
        )
    return paths
