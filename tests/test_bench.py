"""`speechgpt-rt bench` on the tiny bundle: schema-valid JSON, ordered non-negative intervals, the baseline's
ratios, a readable PNG, exact fixed lengths, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
INPUTS = [ROOT / "streaming/assets/question.wav", ROOT / "tests/fixtures/speech/en_us_fish.wav"]
LENGTHS = (6, 5, 30)


@pytest.fixture(scope="module")
def bench_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = cli_main(["bench", "--model-dir", str(tiny_bundle), "--inputs", *map(str, INPUTS), "--turns", "2",
                     "--baseline", "--fixed-lengths", ",".join(map(str, LENGTHS)), "--json", str(out / "bench.json"),
                     "--plot", str(out / "bench.png")])
    return code, json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_bench_json_follows_the_schema(bench_run):
    import jsonschema

    code, report, _ = bench_run
    assert code == 0
    schema = json.loads((ROOT / "agent/assets/bench_schema.json").read_text())
    jsonschema.validate(report, schema)
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    assert len(report["turns"]) == 2 and report["levels"]["1"]["errors"] == 0


def test_every_interval_is_non_negative_and_in_order(bench_run):
    _, report, _ = bench_run
    order = ("last_voiced", "final_eot", "first_frame_handed", "first_frame_played")
    for row in report["turns"]:
        times = [row[k] for k in order]
        assert times == sorted(times), times
        assert row["final_units_ready"] <= row["prefill_done"] <= row["first_unit"] <= row["first_vocoder_audio"]
        assert all(v is None or v >= 0 for v in row["intervals"].values())
        assert row["intervals"]["end_to_end"] == pytest.approx(row["first_frame_played"] - row["last_voiced"])


def test_baseline_ratios_are_reported(bench_run):
    _, report, _ = bench_run
    b = report["baseline"]
    assert len(b["turns"]) == len(INPUTS)
    for q in ("p50", "p90", "p99"):
        assert b["ratio"][q] == pytest.approx(report["levels"]["1"]["intervals"]["response"][q]
                                              / b["first_audio_after_decision"][q])


def test_fixed_lengths_are_exact_for_ours_and_the_baseline(bench_run, tiny_bundle):
    from agent.bench import scripted_answer
    from agent.parser import parse_ids
    from agent.tokenizer import SpeechGPTTokenizer

    _, report, _ = bench_run
    tok = SpeechGPTTokenizer.from_dir(tiny_bundle / "SpeechGPT-7B-cm")
    script = parse_ids(tok, scripted_answer(tok, LENGTHS, 0))
    assert len(tok.encode(script.transcript, add_bos=False)) == LENGTHS[0]
    assert len(script.units) == LENGTHS[2]
    for row in report["turns"]:
        assert row["transcript"] == script.transcript and row["text_answer"] == script.text_answer
        assert row["output_units"] == LENGTHS[2]
    for row in report["baseline"]["turns"]:
        assert row["output_units"] == LENGTHS[2]


def test_the_plot_is_a_png(bench_run):
    _, _, png = bench_run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] in (3, 4)


def test_bad_inputs_get_one_line_and_a_non_zero_exit(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not a wav file at all")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cases = [(["--inputs", str(tmp_path / "missing.wav")], "missing.wav"), (["--inputs", str(bad)], "noise.wav"),
             (["--inputs", str(empty)], "empty_dir"), (["--concurrency", "0"], "--concurrency"),
             (["--fixed-lengths", "1,2"], "--fixed-lengths")]
    for args, needle in cases:
        res = subprocess.run([sys.executable, "-m", "agent.cli", "bench", *args, "--json", str(tmp_path / "x.json")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
