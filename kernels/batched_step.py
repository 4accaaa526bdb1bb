"""One decode step for B sessions at once: one forward pass with one row per session over the slot KV cache.

Each row feeds its session's last token at that session's own position and reads its own slot, so the weights are
read once per step for every running session (the point of batching at a memory-bound batch size). The layer
math is the batch-1 path's op for op (kernels.model.LlamaModel._decode_layers) with the GEMVs as small-M GEMMs
(cuBLAS), RoPE at per-row positions, the KV write at per-row (slot, position) pairs, and attention through
kernels.batched_attention (Triton on CUDA; on the CPU each row runs the batch-1 reference over its slot).

Rows are padded to a multiple of `row_quantum` with dummy rows (token 0, position 0, the scratch slot, length 1).
On the CPU this also keeps a row's logits from depending on its neighbours where the BLAS rounds every row of an
fp32 GEMM alike at row counts that are multiples of 4 (measured on the machine this was written on: AMD EPYC,
torch 2.13; a single-row GEMV rounds differently there). Elsewhere they differ by summation-order noise only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.batched_attention import batched_decode_attention_triton, rows_attention_cpu
from kernels.decode_attention import choose_num_splits
from kernels.model import LlamaWeights
from kernels.rmsnorm import add_rmsnorm, rmsnorm
from kernels.rope import rope_tables, rotate_half
from kernels.silu_mul import silu_mul
from kernels.slot_cache import SlotKVCache

__all__ = ["BatchedDecoder", "padded_rows"]


def padded_rows(rows: int, quantum: int) -> int:
    return max(quantum, -(-rows // quantum) * quantum)


class BatchedDecoder:
    def __init__(self, weights: LlamaWeights, cache: SlotKVCache, *, unit_rows_start: int | None, row_quantum: int = 4):
        self.w = weights
        self.arch = weights.arch
        self.cache = cache
        self.device = weights.device
        self.unit_rows_start = unit_rows_start
        self.row_quantum = row_quantum
        self.cos, self.sin = rope_tables(self.arch.head_dim, cache.max_seq, self.arch.rope_theta, device=self.device)
        self.num_splits = choose_num_splits(self.arch.num_heads, cache.max_seq, self.device)

    def padded(self, rows: int) -> int:
        return padded_rows(rows, self.row_quantum)

    @torch.no_grad()
    def step(self, tokens: list[int], positions: list[int], slots: list[int], span_open: list[bool] | None = None) -> torch.Tensor:
        """Feed tokens[b] at positions[b] of slot slots[b] (writing its K/V there) for every row b; returns fp32
        logits [B, V] (padded rows dropped). span_open[b]: the row is inside a unit span under the speech-mode head,
        so its rows below unit_rows_start are -inf."""
        b = len(tokens)
        if not b or len(positions) != b or len(slots) != b:
            raise ValueError(f"BatchedDecoder.step: {b} tokens, {len(positions)} positions, {len(slots)} slots")
        if any(not 0 <= p < self.cache.max_seq for p in positions):
            raise ValueError(f"BatchedDecoder.step: positions {positions} outside the {self.cache.max_seq}-position slots")
        if len(set(slots)) != b:
            raise ValueError(f"BatchedDecoder.step: a slot appears in two rows: {slots}")
        pad = self.padded(b) - b
        dev = self.device
        tok = torch.tensor(list(tokens) + [0] * pad, dtype=torch.long, device=dev)
        pos = torch.tensor(list(positions) + [0] * pad, dtype=torch.long, device=dev)
        slot = torch.tensor(list(slots) + [self.cache.scratch_slot] * pad, dtype=torch.long, device=dev)
        logits = self._forward(tok, pos, slot, b)[:b]
        start = self.unit_rows_start
        if span_open is not None and start is not None and any(span_open):
            rows = torch.tensor([i for i, o in enumerate(span_open) if o], dtype=torch.long, device=dev)
            logits[rows, :start] = float("-inf")
        return logits

    def _forward(self, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, real: int) -> torch.Tensor:
        """The layers over padded rows (the first `real` are sessions); fp32 logits [rows, V]."""
        a, eps = self.arch, self.arch.rms_norm_eps
        H, Hkv, D = a.num_heads, a.num_kv_heads, a.head_dim
        n_rows = tok.shape[0]
        seq_lens = (pos + 1).to(torch.int32)
        cpu_rows = list(zip(slot[:real].tolist(), (pos[:real] + 1).tolist())) if self.device.type != "cuda" else None
        # RoPE's cos / sin rows of every row's position, once per step (apply_rope_reference's formula, same bits)
        c, s = self.cos[pos], self.sin[pos]
        c = torch.cat((c, c), dim=-1).to(self.w.dtype).unsqueeze(1)
        s = torch.cat((s, s), dim=-1).to(self.w.dtype).unsqueeze(1)
        x = F.embedding(tok, self.w.embed)  # [B, H*D]
        residual = None
        for n, L in enumerate(self.w.layers):
            if residual is None:
                h, residual = rmsnorm(x, L.attn_norm, eps), x
            else:
                h, residual = add_rmsnorm(x, residual, L.attn_norm, eps)
            q, k, v = F.linear(h, L.wqkv).split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = q.reshape(n_rows, H, D)
            q = q * c + rotate_half(q) * s
            k = k.reshape(n_rows, Hkv, D)
            k = k * c + rotate_half(k) * s
            k_pool, v_pool = self.cache.k[n], self.cache.v[n]  # [slots + 1, Hkv, S, D]
            k_pool[slot, :, pos] = k
            v_pool[slot, :, pos] = v.reshape(n_rows, Hkv, D)
            if self.device.type == "cuda":  # pads cost one tile each and keep the launch shape fixed
                attn = batched_decode_attention_triton(q.contiguous(), k_pool, v_pool, slot, seq_lens, num_splits=self.num_splits)
            else:  # on the CPU a pad's attention is pure cost: zeros stand in (its outputs are dropped)
                attn = torch.zeros_like(q)
                attn[:real] = rows_attention_cpu(q, k_pool, v_pool, cpu_rows)
            x = F.linear(attn.reshape(n_rows, H * D), L.wo)
            h, residual = add_rmsnorm(x, residual, L.mlp_norm, eps)
            x = F.linear(silu_mul(F.linear(h, L.w_gate_up)), L.w_down)
        h, _ = add_rmsnorm(x, residual, self.w.norm, eps)
        return F.linear(h, self.w.lm_head).float()
