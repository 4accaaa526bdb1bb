"""The decode kernels build for Hopper (sm_90) here, without a GPU, in the shape the GPU needs (kernels/sm90_build.py):
16-byte weight loads, no spills in the GEMVs, and with programmatic dependent launch only the first weight tile is
requested before griddepcontrol.wait. Catches compile errors in GPU-only paths (bf16, PDL) before GPU time is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kernels.sm90_build", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_builds_plain_and_with_pdl(report):
    names = set(report["kernels"])
    for base in ("norm_qkv_rope", "norm_gate_up_silu", "gemv_residual", "decode_attention_split", "decode_attention_combine",
                 "decode_attention_one_launch", "decode_attention_one_launch_l2_prefetch"):
        for tag in ("plain", "pdl"):
            assert any(n.startswith(base) and n.endswith("/" + tag) for n in names), (base, tag)


def test_gemv_family_streams_weights_in_16_byte_loads_without_spills(report):
    for name, r in report["kernels"].items():
        if r["v4_loads_per_weight_tile"] is None:
            continue
        assert r["load_widths"].get("v4.b32", 0) >= r["v4_loads_per_weight_tile"], (name, r)
        assert r["spills"] == 0, (name, r)


def test_pdl_waits_after_the_first_weight_tile_only(report):
    for name, r in report["kernels"].items():
        if name.endswith("/plain") or "/" not in name:
            assert not r["pdl_wait"], name
            continue
        assert r["pdl_wait"] and r["trigger_after_wait"], (name, r)
        expected = r["v4_loads_per_weight_tile"] or 0  # attention reads nothing before the wait
        assert r["loads_before_wait"] == expected, (name, r)


def test_one_launch_attention_publishes_its_partials_before_the_last_split_reads_them(report):
    """The arrival counter is the only synchronisation between a head's splits: it must be an acq_rel atomic at GPU
    scope, issued after a CTA barrier that follows the partial stores (the atomic runs in one thread: without the
    barrier the other threads' stores could still be in flight), and the merge must read the partials at L2."""
    for name, tag in (("decode_attention_one_launch", "plain"), ("decode_attention_one_launch", "pdl"),
                      ("decode_attention_one_launch_l2_prefetch", "plain"), ("decode_attention_one_launch_l2_prefetch", "pdl")):
        r = report["kernels"][f"{name}/{tag}"]
        atom = r["atomic"]
        assert ".acq_rel" in atom["op"] and ".gpu" in atom["op"] and ".add" in atom["op"], atom
        assert atom["barrier_after_last_store"], atom
        assert atom["loads_after"] > 0 and atom["loads_after_bypass_l1"] == atom["loads_after"], atom
    for name, r in report["kernels"].items():
        if not name.startswith("decode_attention_one_launch"):
            assert "atomic" not in r, name


def test_l2_prefetch_mode_issues_bulk_prefetches_before_waiting(report):
    """The prefetch mode's point is to keep DRAM busy while attention runs: its bulk L2 prefetches are in the kernel,
    issued before griddepcontrol.wait under PDL (the weights do not depend on the previous kernel), and no other
    kernel prefetches."""
    for name, r in report["kernels"].items():
        if name.startswith("decode_attention_one_launch_l2_prefetch/"):
            assert r["l2_prefetches"] >= 1, (name, r)
            if name.endswith("/pdl"):
                assert r["l2_prefetch_before_wait"] and r["loads_before_wait"] == 0, (name, r)
        else:
            assert r["l2_prefetches"] == 0, name
