"""`speechgpt-rt make-tiny OUT_DIR [--seed N]`: a tiny bundle in the release file formats.

Our machines cannot download the real checkpoints, so tests and the demo run on a bundle that has the release's
layout, vocabulary and file formats but tiny random weights. A purely random LLM almost never writes a well-formed
answer, so the tiny LLM is trained for a few seconds on synthetic sequences in the exact prompt and answer format
(random input units, a handful of canned sentences, canned unit answers). It then walks every stage of the pipeline
deterministically for a seed - and has learned nothing else: its "answers" are canned, its speech is noise.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agent.bundle import RELEASE_HUBERT, RELEASE_KMEANS, RELEASE_LLM, RELEASE_LORA, RELEASE_VOCODER_DIR, TINY_MARKER
from agent.prompts import NUM_UNITS, Task, dedup_units, prompt_for, render_answer
from kernels.checkpoint import LlamaArch

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_MODEL = ASSETS / "tiny_tokenizer.model"
TOKENIZER_TEMPLATES = ASSETS / "tiny_tokenizer"

TINY_LLM = LlamaArch(
    hidden_size=128,
    intermediate_size=344,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    vocab_size=33006,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
)

# Canned content. The tiny model learns the answer *format*; these strings are all it can say. They are worded so
# that nobody mistakes them for recognition or understanding.
TINY_QUESTIONS = (
    "canned question alpha",
    "canned question bravo",
    "canned question charlie",
    "canned question delta",
)
TINY_ANSWERS = (
    "Canned answer alpha.",
    "Canned answer bravo.",
    "Canned answer charlie.",
    "Canned answer delta.",
)

# Filler words for the text inputs of the TTS and text-chat examples, so the tiny model keys on the task wording
# (which it can see) rather than on one of four memorised inputs.
_FILLER = (
    "today is a sunny day the weather what how why where when please tell me about again music coffee train "
    "city river mountain book friend time world model answer question hello thank you"
).split()

TINY_NOTICE = (
    "This is a TINY RANDOM-WEIGHT bundle written by `speechgpt-rt make-tiny`. It has the release's file formats, "
    "vocabulary and layout, but its weights are random; the LLM was trained for a few seconds on synthetic "
    "sequences in SpeechGPT's prompt/answer format only, so its answers are canned sentences and its speech is noise."
)


@dataclass(frozen=True)
class TinyTrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-2
    max_input_units: int = 120
    negatives: int = 1024  # random vocabulary rows per step in the sampled softmax


def write_tokenizer_files(out_dir: Path) -> None:
    """tokenizer.model, added_tokens.json, special_tokens_map.json, tokenizer_config.json as the release has them
    (the three JSON files are what transformers 4.33.1 saved after SpeechGPT's vocabulary extension)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TOKENIZER_MODEL, out_dir / "tokenizer.model")
    for name in ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER_TEMPLATES / name, out_dir / name)


def _unit_answers(rng: random.Random) -> list[list[int]]:
    """One fixed unit sequence per canned answer (~45 reduced units per second of speech)."""
    out = []
    for _ in TINY_ANSWERS:
        n = rng.randint(24, 40)
        out.append(dedup_units(rng.randrange(NUM_UNITS) for _ in range(n)))
    return out


def synthetic_example(tokenizer, rng: random.Random, unit_answers: list[list[int]], max_input_units: int) -> tuple[list[int], int]:
    """(token ids, prompt length) of one training sequence: an official prompt and a well-formed answer + EOS."""
    task = rng.choice([Task.SPEECH, Task.ASR, Task.TTS, Task.TEXT])
    k = rng.randrange(len(TINY_ANSWERS))
    if task in (Task.SPEECH, Task.ASR):
        n = rng.randint(3, max_input_units)
        units = dedup_units(rng.randrange(NUM_UNITS) for _ in range(n))
        prompt = prompt_for(task, units=units)
    else:
        words = " ".join(rng.choice(_FILLER) for _ in range(rng.randint(2, 9)))
        text = words.capitalize() + ("." if task is Task.TTS else "?")
        prompt = prompt_for(task, text=text)
    answer = render_answer(task, transcript=TINY_QUESTIONS[k], text_answer=TINY_ANSWERS[k], units=unit_answers[k])
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode(answer, add_bos=False) + [tokenizer.eos_id]
    return prompt_ids + answer_ids, len(prompt_ids)


def train_tiny_llm(tokenizer, seed: int, cfg: TinyTrainConfig = TinyTrainConfig(), log=print):
    """A tiny LlamaForCausalLM trained on the answer format. Deterministic for a seed on a given machine."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    unit_answers = _unit_answers(rng)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLM.to_hf_config()))
    model.train()
    g = torch.Generator().manual_seed(seed)
    vocab = TINY_LLM.vocab_size
    speech_rows = torch.arange(tokenizer.vocab.unit_base, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        batch = [synthetic_example(tokenizer, rng, unit_answers, cfg.max_input_units) for _ in range(cfg.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attn = torch.zeros(len(batch), width, dtype=torch.long)
        target = torch.full((len(batch), width), -100, dtype=torch.long)
        for b, (seq, plen) in enumerate(batch):
            ids[b, : len(seq)] = torch.tensor(seq)
            attn[b, : len(seq)] = 1
            target[b, plen - 1 : len(seq) - 1] = torch.tensor(seq[plen:])  # predict the answer and EOS only
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        sel = target != -100
        # Sampled softmax over the targets, every unit/special row and fresh random negatives: the full
        # 33006-way head would cost ~15x more per step; untouched rows keep their small random logits.
        cand = torch.unique(torch.cat([target[sel], speech_rows, torch.randint(0, vocab, (cfg.negatives,), generator=g)]))
        logits = hidden[sel] @ model.lm_head.weight[cand].T
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.searchsorted(cand, target[sel]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == cfg.steps - 1):
            log(f"  tiny LLM step {step:4d}/{cfg.steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()
    return model, unit_answers


def release_rotary_buffers(arch: LlamaArch) -> dict[str, torch.Tensor]:
    """The `rotary_emb.inv_freq` buffers transformers 4.29 (the release) saved in every layer; loaders must ignore them."""
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim))
    return {f"model.layers.{n}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for n in range(arch.num_layers)}


def split_lora(state: dict[str, torch.Tensor], seed: int, r: int = 8, alpha: int = 16) -> tuple[dict, dict]:
    """Split trained q/v weights into base + LoRA so that merging the adapter gives back the trained model."""
    g = torch.Generator().manual_seed(seed + 1)
    base = dict(state)
    adapter = {}
    scale = alpha / r
    for name in list(state):
        if not (name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.v_proj.weight")):
            continue
        w = state[name]
        a = torch.randn(r, w.shape[1], generator=g) * 0.05
        b = torch.randn(w.shape[0], r, generator=g) * 0.05
        base[name] = (w.double() - scale * (b.double() @ a.double())).float()
        prefix = "base_model.model." + name.removesuffix(".weight")
        adapter[prefix + ".lora_A.weight"] = a
        adapter[prefix + ".lora_B.weight"] = b
    return base, adapter


def write_tiny_llm(out_dir: Path, seed: int, cfg: TinyTrainConfig = TinyTrainConfig(), log=print) -> None:
    from agent.tokenizer import SpeechGPTTokenizer

    llm_dir, lora_dir = out_dir / RELEASE_LLM, out_dir / RELEASE_LORA
    write_tokenizer_files(llm_dir)
    tokenizer = SpeechGPTTokenizer.from_dir(llm_dir)
    model, _ = train_tiny_llm(tokenizer, seed, cfg, log=log)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    base, adapter = split_lora(state, seed)
    base |= release_rotary_buffers(TINY_LLM)
    (llm_dir / "config.json").write_text(json.dumps(TINY_LLM.to_hf_config(), indent=2) + "\n")
    (llm_dir / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    torch.save(base, llm_dir / "pytorch_model.bin")

    write_tokenizer_files(lora_dir)
    (lora_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "fnlp/SpeechGPT-7B-cm",
                "bias": "none",
                "enable_lora": None,
                "fan_in_fan_out": False,
                "inference_mode": True,
                "lora_alpha": 16,
                "lora_dropout": 0.05,
                "merge_weights": False,
                "modules_to_save": None,
                "peft_type": "LORA",
                "r": 8,
                "target_modules": ["q_proj", "v_proj"],
                "task_type": "CAUSAL_LM",
            },
            indent=2,
        )
        + "\n"
    )
    torch.save(adapter, lora_dir / "adapter_model.bin")


def make_tiny_bundle(out_dir: Path | str, seed: int = 0, log=print) -> Path:
    """Write every file of the tiny bundle (release layout) into out_dir."""
    from streaming.tiny_parts import TinyHubertSpec, write_tiny_hubert, write_tiny_kmeans, write_tiny_vocoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_tiny_llm(out, seed, log=log)
    hubert_path = out / RELEASE_HUBERT
    hubert_path.parent.mkdir(parents=True, exist_ok=True)
    spec = TinyHubertSpec()
    write_tiny_hubert(hubert_path, seed, spec=spec)
    write_tiny_kmeans(out / RELEASE_KMEANS, seed, spec.embed_dim)
    write_tiny_vocoder(out / RELEASE_VOCODER_DIR, seed)
    (out / TINY_MARKER).write_text(json.dumps({"seed": seed, "notice": TINY_NOTICE}, indent=2) + "\n")
    (out / "README.txt").write_text(TINY_NOTICE + "\n")
    if log:
        log(f"tiny bundle written to {out} in {time.perf_counter() - t0:.1f}s")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", type=Path, help="directory to write the bundle into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the bundle is deterministic for a seed)")


def run(args) -> int:
    make_tiny_bundle(args.out_dir, args.seed)
    print(TINY_NOTICE)
    return 0
