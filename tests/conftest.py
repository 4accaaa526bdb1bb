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
