"""The batched engine (kernels.batch_engine) on the tiny bundle's LLM (fp32, CPU): sessions batched together
decode exactly what each decodes alone, whoever joins, leaves, cancels or truncates meanwhile; the scheduler
shares its token budget with prefills, steps the most urgent sessions first and admits only what it can serve."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from agent.prompts import Task, prompt_for
from kernels.batch_engine import AdmissionRefused, BatchConfig, BatchedEngine, pick_rows
from kernels.engine import DecodeEngine
from kernels.model import LlamaModel, LlamaWeights
from kernels.sampling import SPEECHGPT_SAMPLING, SamplingParams

GREEDY = SamplingParams(greedy=True, min_new_tokens=0)
HOT = SamplingParams(temperature=1.3, top_k=40, top_p=0.95, min_new_tokens=3)
MAX_SEQ = 512


@pytest.fixture(scope="module")
def parts(tiny_llm):
    tok, arch, sd = tiny_llm
    vocab = tok.vocab
    head = {"unit_rows_start": vocab.speech_rows[0], "unit_span_ids": (vocab.sosp, vocab.eosp)}
    return tok, LlamaWeights.from_state_dict(arch, sd.__getitem__, torch.float32, "cpu"), head


def batched(parts, **cfg) -> BatchedEngine:
    _, w, head = parts
    cfg = {"max_sessions": 6, "max_seq": MAX_SEQ, "admission": False, **cfg}
    clock = cfg.pop("clock", time.monotonic)
    return BatchedEngine(w, config=BatchConfig(**cfg), clock=clock, **head)


def speech_prompt(tok, seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return tok.encode(prompt_for(Task.SPEECH, units=[rng.randrange(1000) for _ in range(n)]))


def alone(parts, script, cpu_draw="kept") -> list[list[int]]:
    """Replay a session's operations on a fresh batch-1 engine: ("prefill", ids) | ("truncate", n) |
    ("decode", kwargs, n_tokens_read or None = to the end)."""
    _, w, head = parts
    eng = DecodeEngine(w, MAX_SEQ, cpu_draw=cpu_draw, **head)
    out = []
    for op in script:
        if op[0] == "prefill":
            eng.prefill(op[1])
        elif op[0] == "truncate":
            eng.truncate(op[1])
        else:
            stream = eng.decode(**op[1])
            got = list(stream) if op[2] is None else [next(stream) for _ in range(op[2])]
            stream.close()
            out.append(got)
    return out


@pytest.mark.parametrize("cpu_draw", ["kept", "hf"])
def test_sessions_decoding_together_give_their_alone_tokens(parts, cpu_draw):
    """Three sessions (greedy, SpeechGPT's sampling under the speech head, hot sampling), each from its own thread at
    once: every token stream equals the batch-1 engine's for the same prompt and seed."""
    tok = parts[0]
    eng = batched(parts, cpu_draw=cpu_draw)
    cases = [(speech_prompt(tok, 1, 12), dict(params=GREEDY, seed=0, max_new_tokens=40)),
             (speech_prompt(tok, 2, 30), dict(params=SPEECHGPT_SAMPLING, seed=7, max_new_tokens=60, speech_mode=True)),
             (speech_prompt(tok, 3, 50), dict(params=HOT, seed=3, max_new_tokens=50, stop_ids=()))]
    got: list = [None] * len(cases)

    def run(i):
        slot = eng.open_slot()
        prompt, kw = cases[i]
        slot.prefill(prompt)
        got[i] = list(slot.decode(**kw))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    eng.close()
    for i, (prompt, kw) in enumerate(cases):
        assert got[i] == alone(parts, [("prefill", prompt), ("decode", kw, None)], cpu_draw)[0], f"session {i}"
    assert max(len(s.slots) for s in eng.steps) >= 2  # they did share steps


def test_a_rows_logits_do_not_depend_on_its_neighbours(parts):
    """A session's logits alone in a batched step and among 2, 5 or 11 others agree within fp32 summation-order
    noise (rows are padded to a multiple of 4; where the CPU BLAS rounds every row alike at such counts, as the one
    this was written on does, they are identical) and with the batch-1 model's step on the same cache; the greedy
    choice is the same everywhere."""
    tok, w, head = parts
    eng = batched(parts, max_sessions=12)
    slots = [eng.open_slot() for _ in range(12)]
    for i, s in enumerate(slots):
        s.prefill(speech_prompt(tok, 10 + i, 5 + 3 * i))
    d = eng.decoder

    def step(rows):
        return d.step([17 + r for r in rows], [slots[r].pos for r in rows], [slots[r].slot for r in rows])

    ref = step([0])[0]
    for rows in ([0, 1], [3, 0, 7, 2, 9], list(range(12))[::-1]):
        got = step(rows)[rows.index(0)]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert int(got.argmax()) == int(ref.argmax()), rows
    one = LlamaModel(w, unit_rows_start=head["unit_rows_start"], cache=eng.cache.slot_cache(slots[0].slot))
    pos = torch.tensor([slots[0].pos], dtype=torch.int32)
    batch1 = one.decode_step(torch.tensor([17]), pos, torch.zeros(1, dtype=torch.int32)).clone()
    torch.testing.assert_close(ref, batch1, rtol=1e-4, atol=1e-4)
    assert int(batch1.argmax()) == int(ref.argmax())
    eng.close()


def test_join_leave_cancel_and_truncate_mid_stream(parts):
    """A decodes; B joins after A's 6th token, C after A's 12th; A cancels, rolls back to its prompt and answers
    again with another seed while B and C run; B leaves (released) mid-answer. Each session's tokens equal its own
    operations replayed alone."""
    tok = parts[0]
    eng = batched(parts)
    pa, pb, pc = speech_prompt(tok, 21, 20), speech_prompt(tok, 22, 35), speech_prompt(tok, 23, 8)
    ka = dict(params=SPEECHGPT_SAMPLING, seed=1, max_new_tokens=80, stop_ids=())
    ka2 = dict(params=HOT, seed=9, max_new_tokens=15, stop_ids=())
    kb = dict(params=HOT, seed=2, max_new_tokens=80, stop_ids=())
    kc = dict(params=GREEDY, seed=0, max_new_tokens=30, stop_ids=())
    a, b, c = eng.open_slot(), eng.open_slot(), eng.open_slot()
    a.prefill(pa)
    sa = a.decode(**ka)
    got_a = [next(sa) for _ in range(6)]
    b.prefill(pb)
    sb = b.decode(**kb)
    got_a += [next(sa) for _ in range(6)]
    got_b = [next(sb) for _ in range(4)]
    c.prefill(pc)
    sc = c.decode(**kc)
    got_c = [next(sc) for _ in range(5)]
    got_a += [next(sa) for _ in range(3)]
    sa.cancel()
    assert list(sa) == [] and sa.stop_reason == "cancelled"
    a.truncate(len(pa))
    a.prefill(tok.encode("again", add_bos=False))
    sa2 = a.decode(**ka2)
    got_a2 = [next(sa2) for _ in range(4)]
    got_b += [next(sb) for _ in range(7)]
    b.release()  # B's session ends mid-answer
    got_c += list(sc)
    got_a2 += list(sa2)
    eng.close()
    assert [got_a, got_a2] == alone(parts, [("prefill", pa), ("decode", ka, 15), ("truncate", len(pa)),
                                            ("prefill", tok.encode("again", add_bos=False)), ("decode", ka2, None)])
    assert got_b == alone(parts, [("prefill", pb), ("decode", kb, 11)])[0]
    assert got_c == alone(parts, [("prefill", pc), ("decode", kc, None)])[0]
    assert eng.cache.free_slots == 6 - 2  # B's slot is free again


def test_padded_rows_write_only_the_scratch_slot(parts):
    """One session decoding (its rows padded with three dummies): the other sessions' slots are untouched bit for
    bit, the dummies' K/V land in the scratch slot."""
    tok = parts[0]
    eng = batched(parts, max_sessions=3)
    a, b, c = eng.open_slot(), eng.open_slot(), eng.open_slot()
    b.prefill(speech_prompt(tok, 31, 10))
    c.prefill(speech_prompt(tok, 32, 12))
    before = [(eng.cache.k[:, s.slot].clone(), eng.cache.v[:, s.slot].clone()) for s in (b, c)]
    scratch = eng.cache.scratch_slot
    eng.cache.v[:, scratch].fill_(float("nan"))
    a.prefill(speech_prompt(tok, 33, 9))
    assert len(list(a.decode(GREEDY, max_new_tokens=10, stop_ids=()))) == 10
    eng.close()
    for (k, v), s in zip(before, (b, c)):
        assert torch.equal(eng.cache.k[:, s.slot], k) and torch.equal(eng.cache.v[:, s.slot], v)
    assert not eng.cache.v[:, scratch, :, 0].isnan().any()  # the dummies wrote position 0 of the scratch slot
    assert eng.cache.v[:, scratch, :, 1:].isnan().all()


def test_a_long_prefill_shares_the_token_budget_with_decoding_sessions(parts):
    """Three sessions decode; a 300-token prompt arrives. It is prefilled in chunks: no iteration runs more tokens
    than the budget (decode rows + prefill chunk), no decoding session is left out of an iteration for it, and the
    prompt's logits equal a one-piece prefill's."""
    tok, w, head = parts
    eng = batched(parts, token_budget=16, min_prefill_chunk=4)
    decoders = [eng.open_slot() for _ in range(3)]
    streams = []
    for i, s in enumerate(decoders):
        s.prefill(speech_prompt(tok, 40 + i, 10))
        streams.append(s.decode(HOT, seed=i, max_new_tokens=400, stop_ids=()))
    stop = threading.Event()
    counts = [0, 0, 0]

    def read(i):
        for _ in streams[i]:
            counts[i] += 1
            if stop.is_set():
                streams[i].cancel()

    readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    [t.start() for t in readers]
    while min(counts) < 3:
        time.sleep(0.01)
    long = eng.open_slot()
    prompt = speech_prompt(tok, 49, 230)
    assert len(prompt) >= 300
    logits = long.prefill(prompt)
    stop.set()
    [t.join(timeout=60) for t in readers]
    eng.close()
    window = [s for s in eng.steps if any(slot == long.slot for slot, _ in s.prefill)]
    assert len(window) >= len(prompt) // 16  # chunked, not one blocking pass
    for rec in window:
        tokens = sum(n for _, n in rec.prefill)
        assert len(rec.slots) + tokens <= max(16, len(rec.slots) + 4), rec
        assert not rec.skipped
    assert any(len(rec.slots) == 3 for rec in window)  # the decoding sessions kept stepping meanwhile
    ref = DecodeEngine(w, MAX_SEQ, **head).prefill(prompt)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


class VirtualClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pick_rows_orders_by_deadline_caps_and_skips():
    deadlines = {0: 100.5, 1: 100.1, 2: 100.3, 3: 103.0, 4: None, 5: 102.0}
    rows, skipped, wake = pick_rows(deadlines, now=100.0, max_rows=3, skip_slack_s=2.0)
    assert rows == [4, 1, 2]  # no deadline = now, then the earliest; capped at 3 (0 and 5 wait for the next step)
    assert skipped == [3] and wake == pytest.approx(1.0)  # 3 s of audio buffered: due again in 1 s
    rows, skipped, wake = pick_rows(deadlines, now=101.5, max_rows=10, skip_slack_s=2.0)
    assert rows == [4, 1, 2, 0, 5, 3] and skipped == [] and wake is None
    assert pick_rows({}, 0.0, 4, 2.0) == ([], [], None)


def test_a_session_with_audio_buffered_skips_steps_until_it_comes_due(parts):
    """Through the engine: a session whose deadline is 3 s away gets no token while two urgent ones decode; once
    its deadline comes within the slack it decodes again (a virtual clock: no real waiting)."""
    tok = parts[0]
    clock = VirtualClock()
    eng = batched(parts, skip_slack_s=2.0, clock=clock)
    slots = [eng.open_slot() for _ in range(3)]
    for i, s in enumerate(slots):
        s.prefill(speech_prompt(tok, 50 + i, 6))
    slots[0].deadline, slots[1].deadline, slots[2].deadline = 100.1, 100.3, 103.0
    streams = [s.decode(GREEDY, max_new_tokens=200, stop_ids=()) for s in slots]
    late: list[int] = []
    reader = threading.Thread(target=lambda: late.extend(next(streams[2]) for _ in range(3)))
    reader.start()
    for _ in range(10):
        next(streams[0]), next(streams[1])
    assert late == [] and any(slots[2].slot in rec.skipped for rec in eng.steps)
    assert all(slots[2].slot not in rec.slots for rec in eng.steps)
    clock.t = 101.5  # 1.5 s left: within the slack
    with eng._lock:
        eng._lock.notify_all()
    reader.join(timeout=60)
    assert len(late) == 3
    for s in streams:
        s.close()
    eng.close()


def test_admission_refuses_beyond_slots_and_beyond_real_time(parts):
    eng = batched(parts, max_sessions=16, admission=True, real_time_tokens_per_s=50.0, step_margin=0.8)
    eng.step_times.update({4: 0.004, 8: 0.010})  # measured step seconds at 4 and 8 padded rows
    opened = [eng.open_slot() for _ in range(12)]  # 12 rows: 10 + 6 ms = 16 ms, exactly the 0.8 / 50 s budget
    with pytest.raises(AdmissionRefused, match=r"13 sessions would need a 22\.0 ms decode step.*16\.0 ms real-time budget"):
        eng.open_slot()
    opened.pop().release()
    opened.append(eng.open_slot())  # a released slot admits again
    eng.close()
    full = batched(parts, max_sessions=2)
    full.open_slot(), full.open_slot()
    with pytest.raises(AdmissionRefused, match="all 2 KV slots are in use"):
        full.open_slot()
    full.close()
    with pytest.raises(AdmissionRefused, match="closed"):
        full.open_slot()


def test_errors_are_named_and_a_closed_engine_ends_streams(parts):
    tok = parts[0]
    eng = batched(parts, max_sessions=2)
    s = eng.open_slot()
    with pytest.raises(RuntimeError, match="needs a prefill"):
        s.decode()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.prefill([5, 10**6])
    with pytest.raises(ValueError, match="overflows"):
        s.prefill([5] * (MAX_SEQ + 1))
    s.prefill(speech_prompt(tok, 60, 5))
    stream = s.decode(HOT, max_new_tokens=300, stop_ids=())
    next(stream)
    with pytest.raises(RuntimeError, match="while a decode stream is running"):
        s.prefill([5])
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        list(stream)
    s.release()
    s.release()  # idempotent


def test_text_first_keeps_the_first_token_out_of_the_unit_and_special_rows(parts):
    """decode(text_first=True) draws token 0 from the text rows only, on both engines (an answer wanted as text must
    not open with a unit span); without it the same logits give the unit-span opener."""
    tok, w, head = parts
    start, sosp = head["unit_rows_start"], head["unit_span_ids"][0]
    prompt = speech_prompt(tok, 70, 6)
    single = DecodeEngine(w, MAX_SEQ, **head)
    eng = batched(parts, max_sessions=1)
    slot = eng.open_slot()
    for engine in (single, slot):
        logits = engine.prefill(prompt)
        logits[sosp] = logits.max() + 50.0  # the model "wants" to open a unit span
        engine._last_logits = logits
        plain = engine.decode(GREEDY, max_new_tokens=1, stop_ids=())
        assert list(plain) == [sosp]
        engine.truncate(len(prompt))
        engine._last_logits = logits
        first = list(engine.decode(GREEDY, max_new_tokens=1, stop_ids=(), text_first=True))
        assert first == [int(logits[:start].argmax())] and first[0] < start
    eng.close()


def test_a_failed_step_or_iteration_ends_what_was_in_flight_and_the_engine_goes_on(parts, monkeypatch):
    tok = parts[0]
    eng = batched(parts, max_sessions=2)
    s = eng.open_slot()
    prompt = speech_prompt(tok, 80, 6)
    s.prefill(prompt)
    real_step = eng.decoder.step
    calls = {"n": 0}

    def failing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise FloatingPointError("injected fault in the batched forward")
        return real_step(*a, **kw)

    monkeypatch.setattr(eng.decoder, "step", failing_step)
    stream = s.decode(GREEDY, max_new_tokens=50, stop_ids=())
    with pytest.raises(RuntimeError, match="injected fault in the batched forward"):
        list(stream)
    s.truncate(len(prompt))
    s.prefill([5])
    assert len(list(s.decode(GREEDY, max_new_tokens=5, stop_ids=()))) == 5  # the next answer decodes

    real_prefill = eng._prefill
    monkeypatch.setattr(eng, "_prefill", lambda budget: (_ for _ in ()).throw(MemoryError("injected scheduler fault")))
    other = eng.open_slot()
    with pytest.raises(MemoryError, match="injected scheduler fault"):
        other.prefill(prompt)
    monkeypatch.setattr(eng, "_prefill", real_prefill)
    other.prefill(prompt)  # the scheduler thread survived
    assert len(list(other.decode(GREEDY, max_new_tokens=3, stop_ids=()))) == 3
    eng.close()
