"""Scripted answers (DecodeEngine.set_forced_tokens, for benchmarks): the stream is the script, the model runs every
step (its cache afterwards equals a prefill of prompt + script), and a fork or a reset goes back to sampling."""

from __future__ import annotations

import pytest
import torch

from tests.test_engine import new_engine, speech_prompt


def test_a_forced_decode_emits_the_script_and_runs_the_model(tiny_llm):
    tok = tiny_llm[0]
    prompt = speech_prompt(tok, 3, n=20)
    script = tok.encode("one two three; [ta] an answer; [ua]", add_bos=False) + [tok.vocab.sosp, 32005, 32007, tok.vocab.eosp]
    eng = new_engine(tiny_llm)
    eng.set_forced_tokens(script)
    eng.prefill(prompt)
    assert list(eng.decode(seed=1)) == script  # and it stops after the last one
    # every token but the last was fed to the model: its cache holds what a prefill of the whole text writes
    fresh = new_engine(tiny_llm)
    fresh.prefill(prompt + script[:-1])
    n = len(prompt) + len(script) - 1
    assert eng.pos == n
    torch.testing.assert_close(eng.model.cache.k[:, :, :n], fresh.model.cache.k[:, :, :n], rtol=1e-5, atol=1e-5)
    # off again: sampling, the same as an engine that was never scripted
    eng.set_forced_tokens(None)
    eng.prefill(prompt, start_pos=0)
    plain = new_engine(tiny_llm)
    plain.prefill(prompt)
    assert list(eng.decode(seed=1, max_new_tokens=12)) == list(plain.decode(seed=1, max_new_tokens=12))


def test_forks_do_not_inherit_a_script_and_bad_scripts_are_refused(tiny_llm):
    eng = new_engine(tiny_llm)
    eng.set_forced_tokens([5, 6, 7])
    assert eng.fork().forced_tokens == 0
    for bad in ([], [-1], [eng.model.arch.vocab_size]):
        with pytest.raises(ValueError, match="set_forced_tokens"):
            eng.set_forced_tokens(bad)
