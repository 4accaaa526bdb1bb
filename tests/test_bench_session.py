"""bench-session runs its three configurations side by side and reports what each feature changed."""

from __future__ import annotations

import json
from pathlib import Path

from agent.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_session_side_by_side(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli_main(["bench-session", "--model-dir", str(tiny_bundle), "--inputs", str(ROOT / "streaming/assets/question.wav"),
                     "--repeats", "2", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    full, spec, neither = (doc["configs"][k] for k in ("full", "speculative_only", "neither"))
    assert full["turns"] == spec["turns"] == neither["turns"] == 2
    assert full["errors"] == spec["errors"] == neither["errors"] == 0
    assert full["preemptive_kept"] == 2 and spec["preemptive_kept"] == neither["preemptive_kept"] == 0
    assert full["eot_work"]["p50"] == 0.0  # a kept preemptive reply has prefilled before the decision
    assert neither["eot_work"]["p50"] > 0 and neither["eot_prefill_tokens_mean"] > spec["eot_prefill_tokens_mean"]
    text = capsys.readouterr().out
    assert "ratio to 'neither'" in text and "speculative_only" in text
