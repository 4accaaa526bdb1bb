"""The tiny bundle, the `respond` pipeline (engine and reference generators), `convert`, the CLI and packaging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from agent.bundle import BundleError, resolve_bundle
from agent.cli import main as cli_main
from agent.convert import convert
from agent.prompts import Task
from agent.respond import RespondPipeline
from agent.tiny import TinyTrainConfig, train_tiny_llm, write_tokenizer_files
from agent.tokenizer import SpeechGPTTokenizer

ROOT = Path(__file__).resolve().parent.parent
QUESTION = ROOT / "streaming/assets/question.wav"


@pytest.fixture(scope="module")
def pipeline(tiny_bundle) -> RespondPipeline:
    return RespondPipeline(tiny_bundle)


@pytest.fixture(scope="module")
def question() -> np.ndarray:
    from streaming.audio_io import load_audio

    return load_audio(QUESTION).samples


# ---- the tiny bundle ------------------------------------------------------------------------------------------


def test_tiny_bundle_has_the_release_layout_and_formats(tiny_bundle):
    paths = resolve_bundle(tiny_bundle)
    assert paths.kind == "release" and paths.is_tiny
    llm = paths.llm_dir
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["vocab_size"] == 33006 and cfg["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in llm.glob("*.bin")) == ["pytorch_model.bin"]  # one file, like the release
    sd = torch.load(llm / "pytorch_model.bin", weights_only=True, mmap=True)
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert any(k.endswith("rotary_emb.inv_freq") for k in sd)
    assert sd["model.embed_tokens.weight"].shape[0] == 33006 and sd["lm_head.weight"].shape[0] == 33006
    tok = SpeechGPTTokenizer.from_dir(llm)
    assert tok.sp.get_piece_size() == 32000 and tok.vocab.unit_base == 32000 and tok.vocab.eos_marker == 33005
    for name in ("special_tokens_map.json", "tokenizer_config.json", "added_tokens.json", "tokenizer.model"):
        assert (llm / name).is_file() and (paths.lora_dir / name).is_file()
    adapter = json.loads((paths.lora_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (8, 16, ["q_proj", "v_proj"])
    lora = torch.load(paths.lora_dir / "adapter_model.bin", weights_only=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in lora
    assert paths.hubert.suffix == ".pt" and paths.kmeans.suffix == ".bin"
    assert (paths.vocoder / "config.json").is_file() and (paths.vocoder / "vocoder.pt").is_file()


def test_tiny_llm_training_is_deterministic(tmp_path):
    write_tokenizer_files(tmp_path)
    tok = SpeechGPTTokenizer.from_dir(tmp_path)
    cfg = TinyTrainConfig(steps=4, batch_size=2, max_input_units=20)
    a, _ = train_tiny_llm(tok, seed=3, cfg=cfg, log=None)
    b, _ = train_tiny_llm(tok, seed=3, cfg=cfg, log=None)
    c, _ = train_tiny_llm(tok, seed=4, cfg=cfg, log=None)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_lora_merge_restores_the_trained_model(tiny_bundle, tiny_llm):
    """The bundle splits the trained q/v weights into base + LoRA: base alone differs, merged equals trained."""
    from kernels.checkpoint import LlamaCheckpoint

    paths = resolve_bundle(tiny_bundle)
    base = LlamaCheckpoint(paths.llm_dir).state_dict()
    merged = tiny_llm[2]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[name], merged[name])
    assert torch.equal(base["model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"])


# ---- respond ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(Task))
def test_respond_every_mode_end_to_end(pipeline, question, task):
    kw = {"audio": question} if task in (Task.SPEECH, Task.ASR) else {"text": "Read me something, please."}
    a = pipeline.respond(task, seed=1, **kw)
    b = pipeline.respond(task, seed=1, **kw)
    assert a.response == b.response  # deterministic for a seed
    assert a.response.end_reason in ("eos", "eoa")
    if task in (Task.SPEECH, Task.ASR):
        assert len(a.input_units) > 20 and "units" in a.timings
    if task is Task.SPEECH:
        # the tiny LLM was trained on this format: every stage must be reached
        assert a.response.transcript and a.response.text_answer and a.response.units
        assert a.response.well_formed
    if a.response.units:
        durations = pipeline.vocoder.predict_durations(a.response.units)
        assert a.reply_wav.shape == (320 * int(durations.sum()),)
        np.testing.assert_array_equal(a.reply_wav, b.reply_wav)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_engine_pipeline_equals_reference_pipeline(pipeline, tiny_bundle, question, seed):
    """The default generator (our decode engine, CPU path) draws the same tokens as the transformers reference for
    a seed, in every mode: same answer, same reply audio."""
    assert pipeline.generator_name == "engine" and pipeline.generator_label == "engine (decode step fused, eager)"
    reference = _reference_pipeline(tiny_bundle)
    for task in Task:
        kw = {"audio": question} if task in (Task.SPEECH, Task.ASR) else {"text": "Say something short."}
        a, b = pipeline.respond(task, seed=seed, **kw), reference.respond(task, seed=seed, **kw)
        assert (a.response, a.new_tokens) == (b.response, b.new_tokens), task
        if a.reply_wav is not None:
            np.testing.assert_array_equal(a.reply_wav, b.reply_wav)


_REFERENCE: dict = {}


def _reference_pipeline(bundle) -> RespondPipeline:
    if bundle not in _REFERENCE:
        _REFERENCE[bundle] = RespondPipeline(bundle, generator="reference")
    return _REFERENCE[bundle]


def test_both_generators_refuse_prompts_without_room(pipeline, tiny_bundle):
    for gen in (pipeline.generator, _reference_pipeline(tiny_bundle).generator):
        with pytest.raises(ValueError, match="empty prompt"):
            next(gen.stream([]))
        with pytest.raises(ValueError, match="prompt of 2048 tokens leaves no room in the 2048-position context"):
            next(gen.stream([1] * 2048))


def test_engine_stream_closed_early_frees_the_engine(pipeline, question):
    gen = pipeline.generator
    prompt = gen.tokenizer.encode("[Human]: hi <eoh> [SpeechGPT]: ")
    first = gen.stream(prompt, seed=0)
    got = [next(first) for _ in range(3)]
    first.close()  # abandon mid-answer (barge-in): the engine's decode lock must be released
    again = list(gen.stream(prompt, seed=0, max_new_tokens=3))
    assert again == got
    with pytest.raises(ValueError, match="generator must be"):
        RespondPipeline(pipeline.paths.root, generator="vllm")


def test_respond_resamples_and_downmixes(pipeline, question, tmp_path):
    import soxr

    from streaming.audio_io import load_audio

    base = pipeline.respond(Task.ASR, audio=question, seed=0).input_units
    for rate, channels in ((8000, 1), (44100, 1), (48000, 2)):
        x = soxr.resample(question, 16000, rate)
        if channels == 2:
            x = np.stack([x, x], axis=1)
        path = tmp_path / f"q_{rate}_{channels}.wav"
        sf.write(path, x, rate, subtype="PCM_16")
        audio = load_audio(path)
        assert audio.source_sample_rate == rate and audio.source_channels == channels
        assert abs(audio.duration - len(question) / 16000) < 0.01
        units = pipeline.respond(Task.ASR, audio=audio.samples, seed=0).input_units
        assert abs(len(units) - len(base)) <= 0.25 * len(base)  # resampling may flip a few units, not the length


def test_respond_cli_writes_wav_and_json(tiny_bundle, tmp_path):
    out = tmp_path / "reply.wav"
    js = tmp_path / "reply.json"
    code = cli_main(["respond", str(QUESTION), "-o", str(out), "--model-dir", str(tiny_bundle), "--seed", "2", "--json", str(js)])
    assert code == 0
    data = json.loads(js.read_text())
    assert data["tiny_bundle"] and data["units"] and set(data["timings_s"]) >= {"load", "units", "prefill+decode", "vocoder"}
    assert data["engine"] == {"step_variant": "fused", "cuda_graphs": False, "step_race": None}  # no race on the CPU
    wav, sr = sf.read(out)
    assert sr == 16000 and wav.ndim == 1 and len(wav) > 0


# ---- convert -----------------------------------------------------------------------------------------------------


def test_convert_gives_identical_results(tiny_bundle, pipeline, question, tmp_path):
    out = tmp_path / "converted"
    meta = convert(Path(tiny_bundle), out, dtype=torch.float32, progress=False, log=lambda *_: None)
    assert meta["llm"]["lora_merged"] and (out / "bundle.json").is_file()
    conv = RespondPipeline(out)
    assert conv.paths.kind == "converted" and conv.paths.is_tiny
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickle anywhere
    for task in (Task.SPEECH, Task.TTS):
        kw = {"audio": question} if task is Task.SPEECH else {"text": "Hello."}
        a, b = pipeline.respond(task, seed=3, **kw), conv.respond(task, seed=3, **kw)
        assert a.input_units == b.input_units and a.response == b.response
        if a.reply_wav is not None:
            np.testing.assert_array_equal(a.reply_wav, b.reply_wav)
    with pytest.raises(BundleError, match="already a converted bundle"):
        convert(out, tmp_path / "again", progress=False, log=lambda *_: None)
    with pytest.raises(BundleError, match="not empty"):
        convert(Path(tiny_bundle), out, progress=False, log=lambda *_: None)


def test_default_fp16_conversion_loads(tiny_bundle, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "fp16"
    convert(Path(tiny_bundle), out, progress=False, onnx=False, log=lambda *_: None)
    with safe_open(str(out / "llm/model.safetensors"), framework="pt") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "F16"
    assert RespondPipeline(out).respond(Task.TEXT, text="Hi.", seed=0).response.end_reason in ("eos", "eoa")


def test_bundle_errors_name_what_is_missing(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        resolve_bundle(tmp_path / "nope")
    (tmp_path / "SpeechGPT-7B-cm").mkdir()
    with pytest.raises(BundleError, match="SpeechGPT-7B-cm/config.json.*speech2unit/mhubert_base_vp_en_es_fr_it3.pt"):
        resolve_bundle(tmp_path)


# ---- CLI and packaging -----------------------------------------------------------------------------------------


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("make-tiny", "respond", "convert", "bench-decode", "bench-units", "bench-vocoder", "export-vocoder", "demo", "chat"):
        assert name in out
    assert cli_main(["frobnicate"]) == 2


def test_transformers_does_not_mistake_our_kernels_package():
    """transformers probes for the Hugging Face `kernels` library by import name; ours must not pass for it."""
    code = (
        "import kernels, transformers\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from transformers.integrations import hub_kernels\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "assert kernels.__file__.endswith('kernels/__init__.py'), kernels.__file__\n"
        "assert not is_kernels_available()\n"
        "m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))\n"
        "print('ok', type(m).__name__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "ok LlamaForCausalLM" in res.stdout, res.stderr
    # The version transformers reads for "kernels" is our distribution's; keep it outside the range it accepts.
    from transformers.utils import import_utils

    _, version = import_utils._is_package_available("kernels", return_version=True)
    from packaging.version import Version

    assert version == "N/A" or Version(version) < Version(import_utils.KERNELS_MIN_VERSION)
