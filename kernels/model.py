"""The SpeechGPT LLaMA forward, written for batch-1 decoding (gpt-fast style: weights, a static KV cache, two
forward functions).

- `prefill(tokens, start_pos)`: a span of tokens at any position; torch SDPA with a causal mask offset by
  start_pos. Returns the last position's logits. Runs eagerly (the CPU path, and CUDA with graphs off).
- `prefill_static(tokens, start, n_valid, logits_out)`: the same layers at a static shape (a padded token bucket,
  start and valid count read from device memory, attention over the whole cache under a device-built mask), so the
  engine can capture one CUDA graph per bucket. Both prefills share one layer body (`_span_forward`).
- `decode_step(...)`: one token; every input (token id, position, "unit span open" flag) is read from device
  memory and every output goes to preallocated buffers, so the whole step can be captured in one CUDA graph.
  Kernels are chosen by device: Triton on CUDA, the torch reference ops on the CPU (one code path). By default
  (`fused`) a layer is six launches: RMSNorm -> qkv GEMV -> RoPE -> KV write in one kernel
  (kernels/norm_qkv_rope.py), split-K attention (two launches, or one with `attn_one_launch`), o GEMV + residual
  add (kernels/gemv_residual.py), RMSNorm -> gate/up GEMV -> SiLU*mul (kernels/norm_gate_up_silu.py), down GEMV +
  residual add. With `fused = False` it is one kernel per op (ten launches). Which is fastest is measured per card
  (kernels.engine.StepVariant, DecodeEngine.tune_step).

Weights are fused where that saves launches without changing the math: q/k/v rows in one matrix, gate/up rows in
one matrix (each output row is still the same dot product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.checkpoint import LlamaArch, LlamaCheckpoint
from kernels.lm_head import text_rows_logits
from kernels.decode_attention import attention_counters, choose_num_splits, decode_attention, decode_attention_scratch
from kernels.gemv_residual import gemv_residual
from kernels.norm_gate_up_silu import norm_gate_up_silu
from kernels.norm_qkv_rope import norm_qkv_rope
from kernels.rmsnorm import add_rmsnorm, rmsnorm
from kernels.rope import apply_rope_reference, rope_kv_write, rope_tables
from kernels.silu_mul import silu_mul


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [H + 2 * kv_dim, H]: q rows, then k, then v
    wo: torch.Tensor  # [H, H]
    mlp_norm: torch.Tensor  # [H]
    w_gate_up: torch.Tensor  # [2 * I, H]: gate rows, then up
    w_down: torch.Tensor  # [H, I]


@dataclass
class LlamaWeights:
    arch: LlamaArch
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @classmethod
    def from_state_dict(cls, arch: LlamaArch, get, dtype: torch.dtype, device: torch.device | str) -> "LlamaWeights":
        """`get(name)` returns one HF-named tensor; tensors are fused, cast and moved one layer at a time."""

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        layers = []
        for n in range(arch.num_layers):
            p = f"model.layers.{n}."
            layers.append(
                LayerWeights(
                    attn_norm=put(get(p + "input_layernorm.weight")),
                    wqkv=put(torch.cat([get(p + f"self_attn.{m}_proj.weight") for m in "qkv"])),
                    wo=put(get(p + "self_attn.o_proj.weight")),
                    mlp_norm=put(get(p + "post_attention_layernorm.weight")),
                    w_gate_up=put(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])),
                    w_down=put(get(p + "mlp.down_proj.weight")),
                )
            )
        embed = put(get("model.embed_tokens.weight"))
        head = embed if arch.tie_word_embeddings else put(get("lm_head.weight"))
        return cls(arch, embed, layers, put(get("model.norm.weight")), head)

    @classmethod
    def from_checkpoint(cls, ckpt: LlamaCheckpoint, dtype: torch.dtype, device: torch.device | str) -> "LlamaWeights":
        # Cast to fp32 first only where LoRA is merged; otherwise straight to the target dtype.
        weights = cls.from_state_dict(ckpt.arch, lambda name: ckpt.tensor(name, dtype), dtype, device)
        ckpt.files.release()
        return weights

    @classmethod
    def random(cls, arch: LlamaArch, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> "LlamaWeights":
        """Random weights at any shape (benchmarks): N(0, 0.02) matrices, norms near 1, made on the device."""
        g = torch.Generator(device=device).manual_seed(seed)

        def mat(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

        def norm() -> torch.Tensor:
            return (1.0 + 0.1 * torch.randn(arch.hidden_size, generator=g, device=device)).to(dtype)

        h, i, kv = arch.hidden_size, arch.intermediate_size, arch.kv_dim
        layers = [
            LayerWeights(norm(), mat(h + 2 * kv, h), mat(h, h), norm(), mat(2 * i, h), mat(h, i)) for _ in range(arch.num_layers)
        ]
        embed = mat(arch.vocab_size, h)
        return cls(arch, embed, layers, norm(), embed if arch.tie_word_embeddings else mat(arch.vocab_size, h))

    def hf_views(self) -> dict[str, torch.Tensor]:
        """HF-named views of the fused weights (no copy): for transformers models sharing these weights."""
        a = self.arch
        h, kv, i = a.hidden_size, a.kv_dim, a.intermediate_size
        sd = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm, "lm_head.weight": self.lm_head}
        for n, L in enumerate(self.layers):
            p = f"model.layers.{n}."
            q, k, v = L.wqkv.split([h, kv, kv])
            gate, up = L.w_gate_up.split([i, i])
            sd |= {
                p + "self_attn.q_proj.weight": q,
                p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v,
                p + "self_attn.o_proj.weight": L.wo,
                p + "mlp.gate_proj.weight": gate,
                p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": L.w_down,
                p + "input_layernorm.weight": L.attn_norm,
                p + "post_attention_layernorm.weight": L.mlp_norm,
            }
        return sd

    def decode_bytes(self, speech_rows: int | None = None) -> int:
        """Bytes of weights one decode step reads (the embedding row is negligible)."""
        per = lambda t: t.numel() * t.element_size()  # noqa: E731
        total = sum(per(t) for L in self.layers for t in (L.attn_norm, L.wqkv, L.wo, L.mlp_norm, L.w_gate_up, L.w_down))
        total += per(self.norm)
        head_rows = self.lm_head.shape[0] if speech_rows is None else speech_rows
        return total + head_rows * self.lm_head.shape[1] * self.lm_head.element_size()


class KVCache:
    """Static cache: [layers, kv_heads, max_seq, head_dim] for keys and for values."""

    def __init__(self, arch: LlamaArch, max_seq: int, dtype: torch.dtype, device: torch.device | str):
        shape = (arch.num_layers, arch.num_kv_heads, max_seq, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq = max_seq

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor) -> "KVCache":
        """A cache over existing storage (views of one slot of kernels.slot_cache.SlotKVCache), nothing allocated."""
        cache = object.__new__(cls)
        cache.k, cache.v, cache.max_seq = k, v, k.shape[2]
        return cache

    def nbytes_per_token(self) -> int:
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()


class LlamaModel:
    """Forward passes over `LlamaWeights` with a static KV cache and static decode buffers."""

    def __init__(self, weights: LlamaWeights, max_seq: int | None = None, *, unit_rows_start: int | None,
                 cache: KVCache | None = None):
        """cache: storage to use (a slot of a shared pool) instead of a new cache of max_seq positions."""
        arch = weights.arch
        self.w = weights
        self.arch = arch
        self.device = weights.device
        self.dtype = weights.dtype
        self.max_seq = cache.max_seq if cache is not None else max_seq or arch.max_position_embeddings
        self.cache = cache if cache is not None else KVCache(arch, self.max_seq, self.dtype, self.device)
        self.cos, self.sin = rope_tables(arch.head_dim, self.max_seq, arch.rope_theta, device=self.device)
        # Rows legal inside a unit span (units + specials); None disables the speech head.
        self.unit_rows_start = unit_rows_start
        self.num_splits = choose_num_splits(arch.num_heads, self.max_seq, self.device)
        self.attn_scratch = decode_attention_scratch(arch.num_heads, arch.head_dim, self.num_splits, self.device)
        self.logits = torch.empty(arch.vocab_size, dtype=torch.float32, device=self.device)
        # Per weight kind ("qkv", "o", "gate_up", "down", "head"): a Triton GEMV config, or None for cuBLAS
        # (F.linear). Set by the engine from a measurement (kernels.gemv.bench_gemv); cuBLAS by default.
        self.gemv_choice: dict[str, object] = {}
        # Fused decode layers (see decode_step): six launches per layer instead of ten. Per layer kind ("qkv",
        # "o", "gate_up", "down") a GemvConfig for the fused kernel, or None for its default; set by the engine.
        self.fused = True
        self.fused_choice: dict[str, object] = {}
        # Launch the fused path's Triton kernels with programmatic dependent launch (Hopper+): each kernel's launch
        # overlaps the previous one's tail, and it waits on the device for the data it reads. Off until measured.
        self.pdl = False
        # Decode attention in one launch (the last split of each head merges; see kernels.decode_attention) instead
        # of a split launch and a combine launch. Same output; fewer launches.
        self.attn_one_launch = False
        self.attn_counters = attention_counters(arch.num_heads, self.device)
        # Let decode attention pull the layer's o_proj weights into L2 while it runs (Hopper; a hint, same output).
        self.attn_l2_prefetch = False
        # CPU only: run the decode layers through torch.compile (kernels.cpu_step; compiled once per process and
        # shape). Rounds differently from the eager reference ops, so off unless asked for.
        self.cpu_compiled = False
        self.hidden = torch.empty(1, arch.hidden_size, dtype=self.dtype, device=self.device)  # the residual stream
        self.q_buf = torch.empty(arch.num_heads, arch.head_dim, dtype=self.dtype, device=self.device)
        self.act_buf = torch.empty(1, arch.intermediate_size, dtype=self.dtype, device=self.device)

    def gemv_shapes(self) -> dict[str, tuple[int, int]]:
        L = self.w.layers[0]
        return {"qkv": tuple(L.wqkv.shape), "o": tuple(L.wo.shape), "gate_up": tuple(L.w_gate_up.shape),
                "down": tuple(L.w_down.shape), "head": tuple(self.w.lm_head.shape)}

    def _mv(self, kind: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Batch-1 matrix-vector product x [1, K] -> [1, N] with the measured-fastest implementation."""
        cfg = self.gemv_choice.get(kind)
        if cfg is None:
            return F.linear(x, weight)
        from kernels.gemv import gemv_triton

        return gemv_triton(x, weight, config=cfg)

    # ---- prefill --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens [T] at positions start_pos.. and fill the cache. Returns fp32 logits of the last position
        ([V]), or of every position ([T, V]) with all_logits."""
        T = int(tokens.shape[0])
        if T == 0:
            raise ValueError("prefill needs at least one token")
        end = start_pos + T
        if start_pos < 0 or end > self.max_seq:
            raise ValueError(f"prefill of {T} tokens at position {start_pos} overflows the {self.max_seq}-position cache")
        positions = torch.arange(start_pos, end, device=self.device)
        # query i (absolute position start_pos + i) sees keys 0 .. start_pos + i
        mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start_pos)
        h = self._span_forward(tokens.to(self.device), positions, mask, kv_len=end)
        if not all_logits:
            h = h[-1:]
        logits = F.linear(h, self.w.lm_head).float()
        return logits if all_logits else logits[0]

    @torch.no_grad()
    def prefill_static(
        self, tokens: torch.Tensor, start: torch.Tensor, n_valid: torch.Tensor, logits_out: torch.Tensor
    ) -> torch.Tensor:
        """Static-shape prefill for CUDA-graph capture: tokens int64 [T] (the first n_valid real, the rest padding),
        start and n_valid int64 [1] on the device; nothing is read on the host. Writes K/V at start .. start + T - 1,
        the fp32 logits of the last valid token into logits_out [V], and advances start by n_valid (so chunks chain
        on the device). The caller guarantees start + T <= max_seq: pad K/V then land after the valid tokens, where
        nothing reads them before a later prefill or decode overwrites them."""
        T = int(tokens.shape[0])
        positions = start.long() + torch.arange(T, device=self.device)
        # Attend over the whole cache (a static shape); keys past each query's position are masked, pads included.
        mask = torch.arange(self.max_seq, device=self.device)[None, :] <= positions[:, None]
        h = self._span_forward(tokens, positions, mask, kv_len=self.max_seq)
        last = h.index_select(0, n_valid.long() - 1)  # [1, hidden]: the last valid row, chosen on the device
        logits_out.copy_(F.linear(last, self.w.lm_head)[0])
        start.add_(n_valid)
        return logits_out

    def _span_forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The layers over a span of tokens [T] at positions [T] (device int64): writes each layer's K/V into the
        cache at those positions, attends over cache keys [0, kv_len) under mask [T, kv_len] (True = visible), and
        returns the final-normed hidden states [T, hidden]. Shared by the eager and the static prefill."""
        arch, T = self.arch, int(tokens.shape[0])
        H, Hkv, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
        x = F.embedding(tokens, self.w.embed)  # [T, H*D]
        residual = None
        for n, L in enumerate(self.w.layers):
            if residual is None:
                h, residual = rmsnorm(x, L.attn_norm, arch.rms_norm_eps), x
            else:
                h, residual = add_rmsnorm(x, residual, L.attn_norm, arch.rms_norm_eps)
            qkv = F.linear(h, L.wqkv)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q = apply_rope_reference(q.view(T, H, D), self.cos, self.sin, positions)
            k = apply_rope_reference(k.view(T, Hkv, D), self.cos, self.sin, positions)
            # index_copy_ takes the positions from device memory (capturable; same values as a slice write)
            self.cache.k[n].index_copy_(1, positions, k.transpose(0, 1))
            self.cache.v[n].index_copy_(1, positions, v.view(T, Hkv, D).transpose(0, 1))
            keys = self.cache.k[n, :, :kv_len].unsqueeze(0)
            values = self.cache.v[n, :, :kv_len].unsqueeze(0)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=H != Hkv
            )  # [1, H, T, D]
            x = F.linear(attn[0].transpose(0, 1).reshape(T, H * D), L.wo)
            h, residual = add_rmsnorm(x, residual, L.mlp_norm, arch.rms_norm_eps)
            x = F.linear(silu_mul(F.linear(h, L.w_gate_up)), L.w_down)
        h, _ = add_rmsnorm(x, residual, self.w.norm, arch.rms_norm_eps)
        return h

    # ---- one decode step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_step(
        self,
        token: torch.Tensor,
        pos: torch.Tensor,
        seq_len: torch.Tensor,
        unit_span_open: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Feed token (int64 [1]) at position pos (int32 [1]); write its K/V; return fp32 logits [V] in
        self.logits. seq_len (int32 [1]) is set to pos + 1 here; pos is advanced by one. When unit_span_open
        (int32 [1]) is given and non-zero, rows below unit_rows_start are -inf (the speech-mode head)."""
        torch.add(pos, 1, out=seq_len)
        if self.cpu_compiled and self.device.type == "cpu":
            h = self._decode_layers_compiled(token, pos)
        elif self.fused:
            h = self._decode_layers_fused(token, pos, seq_len)
        else:
            h = self._decode_layers(token, pos, seq_len)
        self._head(h, unit_span_open)
        pos.add_(1)
        return self.logits

    def _decode_layers(self, token: torch.Tensor, pos: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """One kernel per op: add+RMSNorm, qkv GEMV, RoPE + KV write, attention, o GEMV, add+RMSNorm, gate_up GEMV,
        SiLU*mul, down GEMV. Returns the final-normed hidden state [1, H]."""
        arch = self.arch
        H, Hkv, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
        x = F.embedding(token.view(1), self.w.embed)  # [1, H*D]
        residual = None
        for n, L in enumerate(self.w.layers):
            if residual is None:
                h, residual = rmsnorm(x, L.attn_norm, arch.rms_norm_eps), x
            else:
                h, residual = add_rmsnorm(x, residual, L.attn_norm, arch.rms_norm_eps)
            qkv = self._mv("qkv", h, L.wqkv)[0]
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D])
            q = rope_kv_write(q.view(H, D), k.view(Hkv, D), v.view(Hkv, D), self.cos, self.sin, pos, self.cache.k[n], self.cache.v[n])
            attn = decode_attention(q, self.cache.k[n], self.cache.v[n], seq_len, num_splits=self.num_splits, scratch=self.attn_scratch,
                                    one_launch=self.attn_one_launch, counters=self.attn_counters,
                                    prefetch=L.wo if self.attn_l2_prefetch else None)
            x = self._mv("o", attn.reshape(1, H * D), L.wo)
            h, residual = add_rmsnorm(x, residual, L.mlp_norm, arch.rms_norm_eps)
            x = self._mv("down", silu_mul(self._mv("gate_up", h, L.w_gate_up)), L.w_down)
        h, _ = add_rmsnorm(x, residual, self.w.norm, arch.rms_norm_eps)
        return h

    def _decode_layers_fused(self, token: torch.Tensor, pos: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """The same math in six launches per layer: RMSNorm rides in the GEMV that consumes it, RoPE and the KV
        write in the qkv GEMV's epilogue, SiLU*mul in the gate_up GEMV's, the residual adds in the o and down
        GEMVs' (the residual stream `self.hidden` is updated in place). On the CPU each fused op is its
        op-by-op torch reference, so both paths compute the same thing there."""
        arch, cfg, eps, pdl = self.arch, self.fused_choice, self.arch.rms_norm_eps, self.pdl
        H, D = arch.num_heads, arch.head_dim
        hidden = self.hidden
        torch.index_select(self.w.embed, 0, token.view(1), out=hidden)
        for n, L in enumerate(self.w.layers):
            k_cache, v_cache = self.cache.k[n], self.cache.v[n]
            q = norm_qkv_rope(hidden, L.attn_norm, L.wqkv, eps, self.cos, self.sin, pos, k_cache, v_cache, self.q_buf, cfg.get("qkv"), pdl)
            attn = decode_attention(q, k_cache, v_cache, seq_len, num_splits=self.num_splits, scratch=self.attn_scratch, pdl=pdl,
                                    one_launch=self.attn_one_launch, counters=self.attn_counters,
                                    prefetch=L.wo if self.attn_l2_prefetch else None)
            gemv_residual(attn.reshape(1, H * D), L.wo, hidden, cfg.get("o"), pdl)
            act = norm_gate_up_silu(hidden, L.mlp_norm, L.w_gate_up, eps, self.act_buf, cfg.get("gate_up"), pdl)
            gemv_residual(act, L.w_down, hidden, cfg.get("down"), pdl)
        return rmsnorm(hidden, self.w.norm, eps)

    def _layer_tuples(self) -> list[tuple[torch.Tensor, ...]]:
        return [(L.attn_norm, L.wqkv, L.wo, L.mlp_norm, L.w_gate_up, L.w_down) for L in self.w.layers]

    def _decode_layers_compiled(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The CPU step's layers as one compiled call (kernels.cpu_step). Updates the residual stream self.hidden
        like the eager paths; returns the final-normed hidden state."""
        from kernels.cpu_step import compiled_decode_layers

        hidden, h, k, v = compiled_decode_layers()(token, pos, self.w.embed, self._layer_tuples(), self.cache.k, self.cache.v,
                                                   self.cos, self.sin, self.w.norm, self.arch.rms_norm_eps)
        at = pos.reshape(1).long()
        self.cache.k.index_copy_(2, at, k.unsqueeze(2).to(self.dtype))
        self.cache.v.index_copy_(2, at, v.unsqueeze(2).to(self.dtype))
        self.hidden.copy_(hidden)
        return h

    @torch.no_grad()  # as decode_step runs: grad mode is part of what the compiled code was specialised for
    def warm_cpu_compiled(self) -> None:
        """Compile the CPU step's layers now (a no-op once this process compiled them for these shapes); the call
        writes nothing (the caller of the compiled layers writes the K/V)."""
        from kernels.cpu_step import compiled_decode_layers

        token = torch.zeros(1, dtype=torch.long, device=self.device)
        pos = torch.zeros(1, dtype=torch.int32, device=self.device)
        compiled_decode_layers()(token, pos, self.w.embed, self._layer_tuples(), self.cache.k, self.cache.v, self.cos, self.sin,
                                 self.w.norm, self.arch.rms_norm_eps)

    def _head(self, h: torch.Tensor, unit_span_open: torch.Tensor | None) -> None:
        """h [1, H] -> fp32 logits in self.logits."""
        start = self.unit_rows_start
        if unit_span_open is None or start is None:
            self.logits.copy_(self._mv("head", h, self.w.lm_head)[0])
            return
        # Speech rows are always needed; text rows only outside a unit span (decided on the device).
        self.logits[start:].copy_(F.linear(h[0], self.w.lm_head[start:]))
        text_rows_logits(h[0], self.w.lm_head, unit_span_open, start, self.logits)
