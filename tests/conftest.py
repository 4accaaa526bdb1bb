"""Shared test set-up.

Triton kernels run through the Triton interpreter on CPU-only machines (fp32/fp16, tiny shapes). The GPU tier
(`make gpu-check`) sets SPEECHGPT_RT_GPU_TIER=1 so the same tests launch compiled kernels on the device.
This must happen before anything imports triton.
"""

from __future__ import annotations

import os

GPU_TIER = os.environ.get("SPEECHGPT_RT_GPU_TIER") == "1"
if not GPU_TIER:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() and GPU_TIER:
        return
    skip = pytest.mark.skip(reason="GPU tier: runs under `make gpu-check` on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny random-weight bundle (release layout), written once per test session (or, for quick local
    iterations, one written before with `speechgpt-rt make-tiny DIR` and named by SPEECHGPT_RT_TINY_BUNDLE)."""
    from pathlib import Path

    from agent.tiny import make_tiny_bundle

    if os.environ.get("SPEECHGPT_RT_TINY_BUNDLE") and not os.environ.get("CI"):
        return Path(os.environ["SPEECHGPT_RT_TINY_BUNDLE"])

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle"), seed=0, log=None)


@pytest.fixture(scope="session")
def tiny_llm(tiny_bundle):
    """(tokenizer, arch, fp32 state dict with the LoRA merged) of the tiny bundle's LLM."""
    import torch

    from agent.bundle import resolve_bundle
    from agent.tokenizer import SpeechGPTTokenizer
    from kernels.checkpoint import LlamaCheckpoint

    paths = resolve_bundle(tiny_bundle)
    ckpt = LlamaCheckpoint(paths.llm_dir, paths.lora_dir)
    return SpeechGPTTokenizer.from_dir(paths.tokenizer_dir), ckpt.arch, ckpt.state_dict(torch.float32)


@pytest.fixture
def gen(request):
    """A fresh, reproducible torch.Generator per test case (seeded by its id); GPU-tier tests draw on the device."""
    import zlib

    import torch

    device = "cuda" if request.node.get_closest_marker("gpu") else "cpu"
    return torch.Generator(device=device).manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def no_tf32():
    """fp32 references must be fp32 on the GPU too, whatever another test set globally."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are op-overhead bound: one thread avoids OpenMP barrier stalls on a shared 2-core machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
