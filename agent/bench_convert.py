"""`speechgpt-rt bench-convert`: peak memory of `convert` on a synthetic 1B-shaped fp32 release checkpoint.

Writes a release layout whose LLM is a random 1B-shaped LLaMA saved like SpeechGPT-7B-cm (one fp32
pytorch_model.bin, rotary buffers included) next to the tiny bundle's speech files, then runs `speechgpt-rt convert`
in a fresh process and reports its peak anonymous memory (what the process itself allocates) and peak RSS (which
also counts pages of the mmap'd source file, reclaimable page cache), against the checkpoint and shard sizes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from agent.bundle import RELEASE_LLM, RELEASE_LORA
from kernels.checkpoint import LlamaArch

ARCH_1B = LlamaArch(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=16, num_kv_heads=16, vocab_size=33006)


def write_synthetic_release(out: Path, arch: LlamaArch, seed: int = 0) -> dict:
    from agent.tiny import make_tiny_bundle, release_rotary_buffers, write_tokenizer_files

    make_tiny_bundle(out, seed=seed, log=None)  # speech files, tokenizer and LoRA layout
    llm = out / RELEASE_LLM
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in arch.expected_shapes().items()}
    state |= release_rotary_buffers(arch)
    (llm / "config.json").write_text(json.dumps(arch.to_hf_config(), indent=2))
    torch.save(state, llm / "pytorch_model.bin")
    write_tokenizer_files(llm)
    # A LoRA adapter of the 1B shape (r 8 on q/v), like SpeechGPT-7B-com.
    lora = {}
    for n in range(arch.num_layers):
        for m in ("q_proj", "v_proj"):
            p = f"base_model.model.model.layers.{n}.self_attn.{m}"
            lora[p + ".lora_A.weight"] = torch.randn(8, arch.hidden_size, generator=g) * 0.01
            lora[p + ".lora_B.weight"] = torch.randn(arch.hidden_size, 8, generator=g) * 0.01
    torch.save(lora, out / RELEASE_LORA / "adapter_model.bin")
    largest = max(t.numel() * 4 for t in state.values())
    return {"checkpoint_bytes": (llm / "pytorch_model.bin").stat().st_size, "largest_tensor_fp32_bytes": largest}


def add_arguments(parser) -> None:
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/bench-convert"), help="scratch space (~7 GB)")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and output")


def run(args) -> int:
    src, dst = args.work_dir / "release-1b", args.work_dir / "converted-1b"
    shutil.rmtree(args.work_dir, ignore_errors=True)
    t0 = time.perf_counter()
    info = write_synthetic_release(src, ARCH_1B)
    print(f"synthetic 1B fp32 release written in {time.perf_counter() - t0:.0f}s: {info['checkpoint_bytes'] / 2**30:.2f} GiB")
    cmd = [sys.executable, "-m", "agent.cli", "convert", "--model-dir", str(src), "-o", str(dst),
           "--shard-gb", str(args.shard_gb), "--no-progress", "--no-onnx"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        print(res.stdout, res.stderr, file=sys.stderr)
        return res.returncode
    m = re.search(r"peak anonymous memory (\d+) MiB, peak RSS incl. mapped files (\d+) MiB", res.stdout)
    anon, rss = int(m.group(1)), int(m.group(2))
    shards = sorted(p.stat().st_size for p in (dst / "llm").glob("*.safetensors"))
    result = {
        "arch": ARCH_1B.__dict__, "params": ARCH_1B.num_params(), **info, "convert_seconds": elapsed,
        "shard_limit_bytes": int(args.shard_gb * 2**30), "largest_shard_bytes": shards[-1], "num_shards": len(shards),
        "peak_anon_MiB": anon, "peak_rss_MiB": rss,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    gib = 2**30
    print(f"convert: {elapsed:.0f}s; checkpoint {info['checkpoint_bytes'] / gib:.2f} GiB fp32 -> {len(shards)} fp16 shards "
          f"(largest {shards[-1] / gib:.2f} GiB); peak anonymous memory {anon / 1024:.2f} GiB, "
          f"peak RSS incl. the mmap'd source {rss / 1024:.2f} GiB")
    if not args.keep:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    return 0
