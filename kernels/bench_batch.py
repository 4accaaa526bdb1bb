"""`speechgpt-rt bench-decode --batch 1 2 4 8 ...`: one batched decode step of B sessions against the batch-1
engine stepping the same B sessions in turn, side by side in one run.

For each context length and batch size B: B slots of the slot KV cache at that context, and per iteration
  batched   one BatchedDecoder.step over the B rows + each row's own sampling (what a BatchedEngine iteration does);
  in_turn   B steps of the batch-1 DecodeEngine (its fastest path here: a CUDA-graph replay on CUDA, the eager
            step the Session uses on the CPU), each with its sampling: what serving B sessions one by one costs.
Reported: ms per batched step, aggregate tokens/s (B / step), the in-turn time of B tokens, the speed-up
(in_turn / batched), and on CUDA the bytes one batched step must read (weights once + every row's KV) as GB/s and %
of the card's datasheet bandwidth. The two are timed in alternating rounds (median of rounds) so drift on a
shared machine hits both alike. Random weights (the time does not depend on the values).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from kernels.bench_decode import CONFIGS, SPEECHGPT_TEXT_ROWS, SPEECHGPT_UNIT_SPAN_IDS, _sync, kv_bytes, spec_bandwidth
from kernels.batched_step import BatchedDecoder
from kernels.engine import DecodeEngine
from kernels.model import LlamaWeights
from kernels.batched_sampling import sample_rows
from kernels.sampling import SPEECHGPT_SAMPLING, SamplerState
from kernels.slot_cache import SlotKVCache, slots_that_fit


def _timed(fn, device: torch.device, steps: int) -> float:
    """Seconds per call of fn, over `steps` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def batch_benchmark(config: str, device: str, dtype: torch.dtype, batches: list[int], contexts: list[int],
                    steps: int = 32, rounds: int = 5, json_path: Path | None = None, cpu_draw: str = "kept", log=print) -> dict:
    """cpu_draw: the CPU sampler's draw on both sides (the batched engine's default is "kept")."""
    dev = torch.device(device)
    arch = CONFIGS[config]
    max_seq = min(arch.max_position_embeddings, max(contexts) + 1)  # slots no longer than the contexts need
    w = LlamaWeights.random(arch, dtype, dev)
    head = dict(unit_rows_start=SPEECHGPT_TEXT_ROWS, unit_span_ids=SPEECHGPT_UNIT_SPAN_IDS)
    single = DecodeEngine(w, max_seq, cpu_draw=cpu_draw, **head)
    single.warmup(SPEECHGPT_SAMPLING)
    left_out = []
    if dev.type == "cuda":  # as many sessions as the card holds at these contexts
        fit = slots_that_fit(arch, max_seq, dtype, dev)
        left_out = [b for b in batches if b > fit]
        batches = [b for b in batches if b <= fit]
        for b in left_out:
            log(f"B={b}: {b} KV slots of {max_seq} positions do not fit in this card's free memory (at most {fit}); left out")
        if not batches:
            raise ValueError(f"no batch size fits: at most {fit} slots of {max_seq} positions")
    cache = SlotKVCache(arch, max(batches), max_seq, dtype, dev)
    decoder = BatchedDecoder(w, cache, unit_rows_start=SPEECHGPT_TEXT_ROWS)
    params = SPEECHGPT_SAMPLING
    card, spec = spec_bandwidth(dev)
    res: dict = {"config": config, "device": card, "cpu_draw": cpu_draw if dev.type != "cuda" else None, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "rounds": rounds,
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": [],
                 "left_out_for_memory": left_out}
    weight_bytes = w.decode_bytes()
    elem = torch.empty((), dtype=dtype).element_size()

    for requested in contexts:
        ctx = min(requested, max_seq - 1)
        single.truncate(0)
        single.prefill(torch.randint(3, SPEECHGPT_TEXT_ROWS, (min(ctx, 16),)))  # position, not content, sets the cost
        single._reset_sampler(0)
        graph = single._graph(params, False) if single.use_graphs else None

        def one_step() -> None:
            single.pos_dev.fill_(ctx)
            if graph is not None:
                graph.replay()
            else:
                single._step(params, False)

        samplers = [SamplerState.create(dev, seed=b) for b in range(max(batches))]
        generators = [torch.Generator().manual_seed(b) if dev.type != "cuda" else None for b in range(max(batches))]

        def batched_step(b: int) -> None:
            logits = decoder.step([5] * b, [ctx] * b, list(range(b)))
            sample_rows(logits, [params] * b, samplers[:b], generators[:b], cpu_draw)

        one_step(), batched_step(max(batches))  # warm-up
        t_single: list[float] = []
        t_batch: dict[int, list[float]] = {b: [] for b in batches}
        for _ in range(rounds):
            t_single.append(_timed(one_step, dev, steps))
            for b in batches:
                t_batch[b].append(_timed(lambda: batched_step(b), dev, max(1, steps // 2)))
        t1 = statistics.median(t_single)
        for b in batches:
            tb = statistics.median(t_batch[b])
            nbytes = weight_bytes + b * kv_bytes(arch, ctx + 1, elem)
            row = {"context": ctx, "batch": b, "step_ms": 1e3 * tb, "tok_s": b / tb, "in_turn_ms": 1e3 * b * t1,
                   "in_turn_tok_s": 1 / t1, "speedup": b * t1 / tb, "gbps": nbytes / tb / 1e9,
                   "pct_spec": 100 * nbytes / tb / spec if spec else None}
            res["rows"].append(row)
            log(f"context {ctx:5d}  B={b:3d}  batched {row['step_ms']:8.2f} ms/step  {row['tok_s']:9.0f} tok/s   "
                f"in turn {row['in_turn_ms']:8.2f} ms  speed-up {row['speedup']:5.2f}x"
                + (f"  {row['gbps']:7.0f} GB/s ({row['pct_spec']:.0f}% of spec)" if spec else ""))
            if json_path is not None:
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_path.write_text(json.dumps(res, indent=2))
    return res


def markdown_table(res: dict) -> str:
    lines = [f"{res['config']} {res['dtype']} on {res['device']} ({res['threads']} threads, torch {res['torch']})", "",
             "| context | B | batched ms/step | tokens/s | B in turn, ms | speed-up | % spec BW |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        pct = f"{r['pct_spec']:.0f}%" if r["pct_spec"] is not None else "-"
        lines.append(f"| {r['context']} | {r['batch']} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['in_turn_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {pct} |")
    return "\n".join(lines)
