"""The tokenizer against golden ids from the real transformers 4.33.1 slow LlamaTokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from agent.prompts import META_INSTRUCTION, Task, build_prompt, prompt_for, render_units
from agent.tiny import write_tokenizer_files
from agent.tokenizer import SpeechGPTTokenizer
from agent.vocab import VocabError

GOLDEN = json.loads((Path(__file__).parent / "fixtures/tokenizer/golden_llama_slow_4_33_1.json").read_text())


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SpeechGPTTokenizer:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(d)
    return SpeechGPTTokenizer.from_dir(d)


@pytest.mark.parametrize("case", GOLDEN["encode"], ids=[c["name"] for c in GOLDEN["encode"]])
def test_encode_matches_transformers_4_33(tok, case):
    assert tok.encode(case["text"]) == case["input_ids"]
    assert tok.tokenize(case["text"]) == case["tokens"]


@pytest.mark.parametrize("case", GOLDEN["decode"], ids=[c["name"] for c in GOLDEN["decode"]])
def test_decode_matches_transformers_4_33(tok, case):
    assert tok.decode(case["ids"]) == case["decode"]
    assert tok.decode(case["ids"], skip_special_tokens=True) == case["decode_skip_special_tokens"]
    assert tok.decode(case["ids"], spaces_between_special_tokens=False) == case["decode_spaces_between_special_tokens_false"]


def test_prompt_edge_rules(tok):
    """The prompt-edge cases of docs/speechgpt-format.md, Tokenizer rules, spelled out (the goldens cover them too;
    this says what each rule does)."""
    units = [12, 7, 7, 999, 0]
    prompt = prompt_for(Task.SPEECH, units=units)
    assert prompt == META_INSTRUCTION + "[Human]: <sosp><12><7><999><0><eosp> <eoh>. [SpeechGPT]: "
    pieces = tok.tokenize(prompt)
    v = tok.vocab
    ids = tok.encode(prompt)
    assert ids[0] == v.bos and v.eos not in ids
    # the system prompt's trailing newline is stripped before [Human]
    i = pieces.index("[Human]")
    assert pieces[i - 1] != "<0x0A>"
    # ": " before <sosp> becomes ":" ; "<eosp> <eoh>" loses its space ; ". " before [SpeechGPT] becomes "."
    assert pieces[i + 1 : i + 3] == ["▁:", "<sosp>"]
    j = pieces.index("<eosp>")
    assert pieces[j + 1 : j + 4] == ["<eoh>", "▁.", "[SpeechGPT]"]
    # the trailing space after "[SpeechGPT]:" survives as a lone piece
    assert pieces[-2:] == ["▁:", "▁"]
    assert GOLDEN["official_prompt_tails"]["prompt_speech"]["input_ids"] == ids[-5:]


def test_unit_and_special_ids(tok):
    v = tok.vocab
    assert (v.unit_base, v.sosp, v.eosp, v.human, v.speechgpt, v.eoh, v.eos_marker) == (32000, 33000, 33001, 33002, 33003, 33004, 33005)
    assert (v.bos, v.eos, v.unk, v.vocab_size) == (1, 2, 0, 33006)
    assert tok.encode(render_units([0, 5, 5, 999]), add_bos=False) == [33000, 32000, 32005, 32999, 33001]
    for u in random.Random(0).sample(range(1000), 50):
        assert v.unit_of(v.unit_id(u)) == u
        assert tok.id_to_token(v.unit_id(u)) == f"<{u}>"
    with pytest.raises(ValueError, match="out of range"):
        v.unit_id(1000)


def test_prompt_sizes_and_templates():
    assert META_INSTRUCTION.count("University.  SpeechGPT") == 1 and META_INSTRUCTION.endswith("\n")
    assert build_prompt("hi").endswith("[Human]: hi <eoh>. [SpeechGPT]: ")
    assert prompt_for(Task.ASR, units=[1]).endswith("[Human]: Recognize this speech, this is input:<sosp><1><eosp> <eoh>. [SpeechGPT]: ")
    assert "Read this sentence aloud, this is input: Hi there." in prompt_for(Task.TTS, text="Hi there.")
    with pytest.raises(ValueError, match="needs speech units"):
        prompt_for(Task.SPEECH, units=[])
    with pytest.raises(ValueError, match="position 1 is 1000"):
        render_units([1, 1000])


def test_incremental_detokenizer_round_trip(tok):
    rng = random.Random(1)
    texts = [
        "Hello world. The capital of France is Paris.",
        "  leading spaces, trailing  ",
        "unicode: é ü 中文 😀 and tabs\tand\nnewlines",
        "digits 12345 and 3.14; [ta] markers as text",
    ]
    for text in texts:
        ids = tok.sp.encode(text)
        detok = tok.detokenizer()
        out = "".join(detok.push(i) for i in ids) + detok.flush()
        assert out == tok.sp.decode(ids)
        # nothing released ends inside a multi-byte character
        detok = tok.detokenizer()
        for i in ids:
            assert "\ufffd" not in detok.push(i)
    # random piece soup (byte pieces included) still round-trips
    ids = [rng.randrange(3, 32000) for _ in range(300)]
    detok = tok.detokenizer()
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tok.sp.decode(ids)


def test_bad_tokenizer_files_give_clear_errors(tmp_path):
    write_tokenizer_files(tmp_path)
    added = json.loads((tmp_path / "added_tokens.json").read_text())
    added["<7>"] = 32100
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(VocabError, match=r"<7> has id 32100, expected 32007"):
        SpeechGPTTokenizer.from_dir(tmp_path)
    del added["<7>"]
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(VocabError, match=r"tokens missing: <7>"):
        SpeechGPTTokenizer.from_dir(tmp_path)
    (tmp_path / "added_tokens.json").write_text("{not json")
    with pytest.raises(VocabError, match="not valid JSON"):
        SpeechGPTTokenizer.from_dir(tmp_path)
    (tmp_path / "added_tokens.json").unlink()
    with pytest.raises(VocabError, match="added_tokens.json"):
        SpeechGPTTokenizer.from_dir(tmp_path)


def test_release_table_mismatch_is_refused(tmp_path):
    """A shifted table (e.g. a tokenizer with 32001 pieces) reads consistently but is not the release's."""
    write_tokenizer_files(tmp_path)
    added = {k: v + 5 for k, v in json.loads((tmp_path / "added_tokens.json").read_text()).items()}
    (tmp_path / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(VocabError, match="tokenizer.model has 32000 pieces"):
        SpeechGPTTokenizer.from_dir(tmp_path)


def test_tiny_tokenizer_model_has_release_layout():
    from agent.tiny import TOKENIZER_MODEL

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_MODEL))
    assert sp.get_piece_size() == 32000
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    assert sp.encode(": ", out_type=str) == ["▁:", "▁"]
    assert "".join(sp.encode("  a", out_type=str)) == "▁▁▁a"  # runs of spaces survive (no whitespace collapsing)
    assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]  # byte fallback
