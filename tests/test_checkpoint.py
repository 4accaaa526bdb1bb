"""LLM checkpoint loading: release single-file fp32 .bin, shards, safetensors, LoRA merge, bad checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kernels import checkpoint as ck
from kernels.checkpoint import CheckpointError, LlamaArch, LlamaCheckpoint, LoraAdapter, load_llama, write_safetensors_shards

ARCH = LlamaArch(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=300)


def random_state(arch: LlamaArch, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in arch.expected_shapes().items()}


def write_config(d: Path, arch: LlamaArch = ARCH) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(arch.to_hf_config()))


def write_bin(d: Path, sd: dict, with_inv_freq: bool = True) -> None:
    write_config(d)
    sd = dict(sd)
    if with_inv_freq:
        for n in range(ARCH.num_layers):
            sd[f"model.layers.{n}.self_attn.rotary_emb.inv_freq"] = torch.ones(ARCH.head_dim // 2)
    torch.save(sd, d / "pytorch_model.bin")


def write_lora(d: Path, seed: int, r: int = 4, alpha: int = 8, modules=("q_proj", "v_proj")) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in range(ARCH.num_layers):
        for m in modules:
            p = f"base_model.model.model.layers.{n}.self_attn.{m}"
            sd[p + ".lora_A.weight"] = torch.randn(r, ARCH.hidden_size, generator=g)
            sd[p + ".lora_B.weight"] = torch.randn(ARCH.hidden_size, r, generator=g)
    torch.save(sd, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules), "fan_in_fan_out": False})
    )
    return sd


def test_single_file_fp32_bin_with_inv_freq(tmp_path, monkeypatch):
    sd = random_state(ARCH, 0)
    write_bin(tmp_path, sd)
    calls = []
    real_load = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real_load(*a, **kw)

    monkeypatch.setattr(ck.torch, "load", spy)
    arch, got = load_llama(tmp_path, dtype=torch.float16)
    assert arch == ARCH
    assert calls and all(c.get("mmap") and c.get("weights_only") for c in calls)
    assert set(got) == set(sd)
    for k in sd:
        assert got[k].dtype == torch.float16
        torch.testing.assert_close(got[k], sd[k].half(), rtol=0, atol=0)


def test_bf16_tensors_in_file_are_cast(tmp_path):
    sd = random_state(ARCH, 1)
    sd["model.norm.weight"] = sd["model.norm.weight"].bfloat16()
    write_bin(tmp_path, sd)
    _, got = load_llama(tmp_path, dtype=torch.float32)
    assert got["model.norm.weight"].dtype == torch.float32
    assert torch.equal(got["model.norm.weight"], sd["model.norm.weight"].float())


def test_sharded_bin(tmp_path):
    sd = random_state(ARCH, 2)
    write_config(tmp_path)
    names = sorted(sd)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        fn = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, tmp_path / fn)
        weight_map |= {k: fn for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, got = load_llama(tmp_path)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 20_000])
def test_safetensors_single_and_sharded(tmp_path, max_shard_bytes):
    sd = random_state(ARCH, 3)
    write_config(tmp_path)
    files = write_safetensors_shards(iter(sd.items()), tmp_path, max_shard_bytes=max_shard_bytes)
    assert (len(files) == 1) == (max_shard_bytes > 1 << 20)
    if len(files) > 1:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    _, got = load_llama(tmp_path)
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_lora_merge_equals_unmerged_computation(tmp_path):
    sd = random_state(ARCH, 4)
    write_bin(tmp_path / "base", sd)
    lora = write_lora(tmp_path / "lora", seed=5, r=4, alpha=8)
    _, merged = load_llama(tmp_path / "base", tmp_path / "lora", dtype=torch.float32)
    x = torch.randn(7, ARCH.hidden_size, generator=torch.Generator().manual_seed(6))
    scale = 8 / 4
    for n in range(ARCH.num_layers):
        for m in ("q_proj", "v_proj", "k_proj"):
            name = f"model.layers.{n}.self_attn.{m}.weight"
            p = f"base_model.model.model.layers.{n}.self_attn.{m}"
            expected = x @ sd[name].T
            if p + ".lora_A.weight" in lora:
                a, b = lora[p + ".lora_A.weight"], lora[p + ".lora_B.weight"]
                expected = expected + scale * (x @ a.T @ b.T)
            torch.testing.assert_close(x @ merged[name].T, expected, rtol=1e-5, atol=1e-4)
    # untouched weights are bit-identical
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])


def test_lora_reads_r_and_alpha_from_config(tmp_path):
    write_lora(tmp_path, seed=0, r=2, alpha=7)
    adapter = LoraAdapter.load(tmp_path)
    assert (adapter.r, adapter.alpha, adapter.scale) == (2, 7.0, 3.5)
    assert set(adapter.pairs) == {f"model.layers.{n}.self_attn.{m}_proj.weight" for n in range(2) for m in "qv"}


# ---- bad checkpoints ------------------------------------------------------------------------------------------


def test_missing_unexpected_and_mismatched_keys_are_all_listed(tmp_path):
    sd = random_state(ARCH, 7)
    del sd["model.layers.1.mlp.down_proj.weight"]
    del sd["lm_head.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 31)
    sd["model.extra.weight"] = torch.zeros(3)
    write_bin(tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        LlamaCheckpoint(tmp_path)
    msg = str(e.value)
    assert "missing (2): lm_head.weight, model.layers.1.mlp.down_proj.weight" in msg
    assert "unexpected (1): model.extra.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight: expected (32, 32), got (32, 31)" in msg
    assert "rotary_emb" not in msg  # ignored, not reported


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "config.json: missing"),
        (lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"hidden_size": 8})), "missing field"),
        (lambda d: write_config(d), "no weights found"),
        (lambda d: (write_config(d), (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "x.bin"}}))), "shard file\\(s\\) missing: x.bin"),
        (lambda d: (write_config(d), torch.save([1, 2, 3], d / "pytorch_model.bin")), "expected a state dict"),
        (lambda d: (write_config(d), (d / "pytorch_model.bin").write_bytes(b"garbage")), "cannot be read"),
        (lambda d: (write_config(d), (d / "model.safetensors").write_bytes(b"garbage")), "cannot be read as safetensors"),
    ],
)
def test_bad_model_dirs(tmp_path, setup, match):
    d = tmp_path / "m"
    d.mkdir()
    setup(d)
    with pytest.raises(CheckpointError, match=match):
        LlamaCheckpoint(d)


def test_pickle_with_code_is_refused(tmp_path):
    write_config(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"model.norm.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        LlamaCheckpoint(tmp_path)


def test_bad_lora_adapters(tmp_path):
    write_bin(tmp_path / "base", random_state(ARCH, 8))
    d = tmp_path / "lora"
    sd = write_lora(d, seed=1)
    del sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    sd["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    torch.save(sd, d / "adapter_model.bin")
    with pytest.raises(CheckpointError) as e:
        LlamaCheckpoint(tmp_path / "base", d)
    assert "unexpected key base_model.model.lm_head.lora_A.weight" in str(e.value)
    assert "model.layers.1.self_attn.v_proj.weight: lora_B missing" in str(e.value)

    sd = write_lora(d, seed=1, r=4)
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(31, 4)
    torch.save(sd, d / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"LoRA for model.layers.0.self_attn.q_proj.weight: A \(4, 32\), B \(31, 4\)"):
        LlamaCheckpoint(tmp_path / "base", d)

    (d / "adapter_config.json").write_text(json.dumps({"r": 0, "lora_alpha": 16}))
    with pytest.raises(CheckpointError, match="'r' must be a positive number"):
        LoraAdapter.load(d)


def test_architecture_checks():
    with pytest.raises(CheckpointError, match="hidden_act"):
        LlamaArch.from_hf_config({**ARCH.to_hf_config(), "hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="not divisible"):
        LlamaArch.from_hf_config({**ARCH.to_hf_config(), "num_attention_heads": 5})
    # LLaMA-7B has 6,738,415,616 parameters; SpeechGPT adds 1006 rows to the embedding and the head
    assert ck.SPEECHGPT_7B.num_params() == 6_738_415_616 + 2 * 1006 * 4096
