"""`speechgpt-rt convert`: release files -> a deployment bundle that loads fast and holds no pickle.

    LLM      SpeechGPT-7B-cm + the -com LoRA merged in fp32 -> fp16 safetensors shards (+ tokenizer files)
    HuBERT   fairseq mHuBERT .pt -> transformers HubertModel safetensors + config (11 layers, normalize flag kept)
    k-means  joblib sklearn .bin -> centers.npy
    vocoder  g_00500000 / vocoder.pt -> safetensors (weight norm folded) + config, and the ONNX export

The LLM goes through one tensor at a time and one shard is held in memory at a time, so peak memory stays near
one shard (default 2 GiB) plus what the mmap'd source file keeps in the page cache (reclaimable).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from agent.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, BundleError, resolve_bundle

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")


class PeakMemory:
    """Samples this process's anonymous resident memory (RssAnon) and total RSS from /proc while running."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_anon_kb = 0
        self.peak_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmRSS"):
                    fields[key] = int(value.split()[0])
        return fields.get("RssAnon", 0), fields.get("VmRSS", 0)

    def _poll(self) -> None:
        while not self._stop.is_set():
            anon, rss = self._read()
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if Path("/proc/self/status").is_file():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def convert_llm(llm_dir: Path, lora_dir: Path | None, out_dir: Path, dtype: torch.dtype, shard_bytes: int, progress: bool = True) -> dict:
    from tqdm import tqdm

    from kernels.checkpoint import LlamaCheckpoint, write_safetensors_shards

    ckpt = LlamaCheckpoint(llm_dir, lora_dir)
    total = ckpt.arch.num_params() * torch.finfo(dtype).bits // 8
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=total, unit="B", unit_scale=True, desc="LLM -> safetensors", disable=not progress, file=sys.stderr) as bar:
        files = write_safetensors_shards(ckpt.tensors(dtype), out_dir, max_shard_bytes=shard_bytes, progress=bar.update)
    ckpt.files.release()
    config = ckpt.arch.to_hf_config()
    config["torch_dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        src = llm_dir / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
    return {"files": [f.name for f in files], "lora_merged": lora_dir is not None, "dtype": config["torch_dtype"]}


def convert(model_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float16, shard_bytes: int = 2 << 30,
            onnx: bool = True, progress: bool = True, log=print) -> dict:
    from streaming.hubert import load_hubert, save_converted_hubert
    from streaming.kmeans import load_kmeans, save_converted_kmeans
    from streaming.vocoder import load_vocoder, save_converted

    paths = resolve_bundle(model_dir)
    if paths.kind != "release":
        raise BundleError(f"{model_dir}: already a converted bundle; convert reads the release layout")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BundleError(f"{out_dir}: exists and is not empty; choose a new output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "source": str(paths.root), "steps": {}}
    if paths.tiny:
        meta["tiny"] = paths.tiny

    t0 = time.perf_counter()
    meta["llm"] = convert_llm(paths.llm_dir, paths.lora_dir, out_dir / "llm", dtype, shard_bytes, progress)
    meta["steps"]["llm_s"] = time.perf_counter() - t0
    log(f"[convert] LLM done in {meta['steps']['llm_s']:.1f}s")

    t0 = time.perf_counter()
    hubert = load_hubert(paths.hubert)
    save_converted_hubert(hubert.model, hubert.normalize, out_dir / "hubert")
    meta["hubert"] = {"normalize": hubert.normalize, "hidden_size": hubert.hidden_size}
    kmeans = load_kmeans(paths.kmeans)
    save_converted_kmeans(kmeans, out_dir / "kmeans")
    meta["steps"]["units_s"] = time.perf_counter() - t0
    log(f"[convert] HuBERT and k-means done in {meta['steps']['units_s']:.1f}s")

    t0 = time.perf_counter()
    vocoder = load_vocoder(paths.vocoder)
    save_converted(vocoder, out_dir / "vocoder")
    if onnx:
        from streaming.vocoder_onnx import export_vocoder

        meta["vocoder_onnx"] = export_vocoder(vocoder, out_dir / "vocoder" / "onnx")
    meta["steps"]["vocoder_s"] = time.perf_counter() - t0
    log(f"[convert] vocoder done in {meta['steps']['vocoder_s']:.1f}s")
    meta["versions"] = {"torch": torch.__version__}
    (out_dir / "bundle.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def add_arguments(parser) -> None:
    parser.add_argument("--model-dir", type=Path, required=True, help="release layout (see README 'Model files')")
    parser.add_argument("-o", "--output", type=Path, required=True, help="new directory for the converted bundle")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="LLM weight dtype (default fp16, as released)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest LLM safetensors shard, GiB")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export of the vocoder")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        convert(args.model_dir, args.output, dtype, int(args.shard_gb * (1 << 30)), onnx=not args.no_onnx, progress=not args.no_progress)
        elapsed = time.perf_counter() - t0
    print(f"converted {args.model_dir} -> {args.output} in {elapsed:.1f}s; "
          f"peak anonymous memory {mem.peak_anon_kb / 1024:.0f} MiB, peak RSS incl. mapped files {mem.peak_rss_kb / 1024:.0f} MiB")
    return 0
