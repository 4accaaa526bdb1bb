"""bench-decode on the CPU at the tiny shape: the side-by-side rows, ratios and JSON it promises, and the markdown
report a GPU session pastes into BENCHMARKS.md. Not timing assertions: the numbers are whatever this machine does."""

from __future__ import annotations

import json

import pytest

from kernels import bench_decode as bd


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    res = bd.benchmark("tiny", "cpu", "fp32", [64, 2048], 4, ["engine", "unfused", "fused+1attn", "hf"], gemv="torch",
                       json_path=path, log=lambda *a: None)
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    return res


def test_every_method_at_every_context_with_ratios(result):
    got = {(r["method"], r["requested_context"]) for r in result["results"]}
    for ctx in (64, 2048):
        for method in ("engine", "engine_eager", "engine[unfused]", "engine[fused+1attn]", "hf_eager"):
            assert (method, ctx) in got
        assert set(result["ratios"][str(ctx)]) == {"engine_eager_over_engine", "engine[unfused]_over_engine",
                                                   "engine[fused+1attn]_over_engine", "hf_eager_over_engine"}
    at_end = next(r for r in result["results"] if r["method"] == "engine" and r["requested_context"] == 2048)
    assert at_end["context"] == 2048 - 4 - 1  # shortened so that the steps fit the window
    assert all(r["ms_median"] > 0 and r["steps"] == 4 for r in result["results"])
    assert result["step_variant"] == "fused" and not result["errors"]
    assert result["cpu_compile"] and result["cpu_compile_s"] > 0  # on the CPU `engine` runs the compiled layers
    assert set(result["prefill_ms"]) == {"128", "512", "1024"}


def test_unknown_methods_are_refused():
    with pytest.raises(ValueError, match=r"unknown methods \['pdl'\]; known: engine, variants, compile, hf, fused, "):
        bd.benchmark("tiny", "cpu", "fp32", [64], 2, ["engine", "pdl"], gemv="torch", log=lambda *a: None)


def test_markdown_report(result):
    res = json.loads(json.dumps(result))
    # What a GPU run adds: the race and a profile (synthetic numbers; the rendering is under test).
    res["tune"] = {"position": 256, "steps": 8, "chosen": "fused+pdl", "variants": {
        "fused": {"admitted": True, "us_per_step": 3600.0, "check": "first-step relative L2 vs unfused: 0.05 (bound 0.3)"},
        "fused+pdl": {"admitted": True, "us_per_step": 3400.0, "check": "max |logit - fused's| = 0 over 8 steps (must be 0)"},
        "fused+1attn": {"admitted": False, "why": "failed the check: max |logit - fused's| = 0.5 over 8 steps (must be 0)"}}}
    res["profile"] = {"fused+pdl": {"context": 256, "step_us": 3400.0, "kernel_us": 3300.0, "idle_us": 100.0,
                                    "kernels_per_step": 194, "top": [{"kernel": "_gemv_residual_kernel", "us_per_step": 900.0, "calls_per_step": 64}]}}
    md = bd.markdown_report(res)
    lines = md.splitlines()
    assert lines[0].startswith("bench-decode: tiny fp32 on **")
    assert any(line.startswith("| 64 | ") for line in lines) and any(line.startswith("| 2048 (2043) | ") for line in lines)
    assert "chosen: **fused+pdl**" in md and "| fused+1attn | - | no | failed the check" in md
    assert "| unfused | " in md and "| fused+1attn | " in md  # the per-variant table
    assert "3400 us per step = 3300 us of kernels (194 launches) + 100 us idle" in md
    assert "| _gemv_residual_kernel | 900.0 | 64 |" in md
    assert "`engine_eager` is the same engine on the eager reference ops" in md and "ctx 2048: " in md
    assert md.count("\n| ") >= 8


def test_batched_rows_side_by_side_with_the_batch1_engine(tmp_path, capsys):
    """bench-decode --batch: a row per (context, B) with the batched step, the batch-1 engine's time for the same B
    tokens and their ratio, the JSON as printed, a markdown table; a bad batch size is one line, exit 2."""
    import argparse

    from kernels.bench_batch import batch_benchmark, markdown_table

    path = tmp_path / "batch.json"
    res = batch_benchmark("tiny", "cpu", __import__("torch").float32, [1, 3], [16, 40], steps=2, rounds=2, json_path=path,
                          log=lambda *a: None)
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    assert [(r["context"], r["batch"]) for r in res["rows"]] == [(16, 1), (16, 3), (40, 1), (40, 3)]
    for r in res["rows"]:
        assert r["step_ms"] > 0 and r["tok_s"] == pytest.approx(1000 * r["batch"] / r["step_ms"])
        assert r["speedup"] == pytest.approx(r["in_turn_ms"] / r["step_ms"]) and r["pct_spec"] is None
    table = markdown_table(res)
    assert table.count("\n| 40 | 3 | ") == 1 and res["cpu_draw"] == "kept"
    parser = argparse.ArgumentParser()
    bd.add_arguments(parser)
    assert bd.run(parser.parse_args(["--device", "cpu", "--config", "tiny", "--batch", "0", "--json", str(path)])) == 2
    assert "--batch sizes must be >= 1" in capsys.readouterr().err
