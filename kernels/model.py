"""The SpeechGPT LLaMA forward, written for batch-1 decoding (gpt-fast style: weights, a static KV cache, two
forward functions).

- `prefill(tokens, start_pos)`: a span of tokens at any position; torch SDPA with a causal mask offset by
  start_pos. Returns the last position's logits.
- `decode_step(...)`: one token; every input (token id, position, "unit span open" flag) is read from device
  memory and every output goes to preallocated buffers, so the whole step can be captured in one CUDA graph.
  Kernels are chosen by device: Triton on CUDA, the torch reference ops on the CPU (one code path).

Weights are fused where that saves launches without changing the math: q/k/v rows in one matrix, gate/up rows in
one matrix (each output row is still the same dot product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.checkpoint import LlamaArch, LlamaCheckpoint
from kernels.lm_head import text_rows_logits
from kernels.decode_attention import choose_num_splits, decode_attention, decode_attention_scratch
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

    def nbytes_per_token(self) -> int:
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()


class LlamaModel:
    """Forward passes over `LlamaWeights` with a static KV cache and static decode buffers."""

    def __init__(self, weights: LlamaWeights, max_seq: int | None = None, unit_rows_start: int | None = None):
        arch = weights.arch
        self.w = weights
        self.arch = arch
        self.device = weights.device
        self.dtype = weights.dtype
        self.max_seq = max_seq or arch.max_position_embeddings
        self.cache = KVCache(arch, self.max_seq, self.dtype, self.device)
        self.cos, self.sin = rope_tables(arch.head_dim, self.max_seq, arch.rope_theta, device=self.device)
        # Rows legal inside a unit span (units + specials); None disables the speech head.
        self.unit_rows_start = unit_rows_start
        self.num_splits = choose_num_splits(arch.num_heads, self.max_seq, self.device)
        self.attn_scratch = decode_attention_scratch(arch.num_heads, arch.head_dim, self.num_splits, self.device)
        self.logits = torch.empty(arch.vocab_size, dtype=torch.float32, device=self.device)
        # Per weight kind ("qkv", "o", "gate_up", "down", "head"): a Triton GEMV config, or None for cuBLAS
        # (F.linear). Set by the engine from a measurement (kernels.gemv.bench_gemv); cuBLAS by default.
        self.gemv_choice: dict[str, object] = {}

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
        arch, T = self.arch, int(tokens.shape[0])
        if T == 0:
            raise ValueError("prefill needs at least one token")
        end = start_pos + T
        if start_pos < 0 or end > self.max_seq:
            raise ValueError(f"prefill of {T} tokens at position {start_pos} overflows the {self.max_seq}-position cache")
        H, Hkv, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
        positions = torch.arange(start_pos, end, device=self.device)
        x = F.embedding(tokens.to(self.device), self.w.embed)  # [T, H*D]
        # query i (absolute position start_pos + i) sees keys 0 .. start_pos + i
        mask = torch.ones(T, end, dtype=torch.bool, device=self.device).tril(diagonal=start_pos)
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
            self.cache.k[n, :, start_pos:end] = k.transpose(0, 1)
            self.cache.v[n, :, start_pos:end] = v.view(T, Hkv, D).transpose(0, 1)
            keys = self.cache.k[n, :, :end].unsqueeze(0)
            values = self.cache.v[n, :, :end].unsqueeze(0)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, enable_gqa=H != Hkv
            )  # [1, H, T, D]
            x = F.linear(attn[0].transpose(0, 1).reshape(T, H * D), L.wo)
            h, residual = add_rmsnorm(x, residual, L.mlp_norm, arch.rms_norm_eps)
            x = F.linear(silu_mul(F.linear(h, L.w_gate_up)), L.w_down)
        h, _ = add_rmsnorm(x, residual, self.w.norm, arch.rms_norm_eps)
        if not all_logits:
            h = h[-1:]
        logits = F.linear(h, self.w.lm_head).float()
        return logits if all_logits else logits[0]

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
        arch = self.arch
        H, Hkv, D = arch.num_heads, arch.num_kv_heads, arch.head_dim
        torch.add(pos, 1, out=seq_len)
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
            attn = decode_attention(q, self.cache.k[n], self.cache.v[n], seq_len, num_splits=self.num_splits, scratch=self.attn_scratch)
            x = self._mv("o", attn.reshape(1, H * D), L.wo)
            h, residual = add_rmsnorm(x, residual, L.mlp_norm, arch.rms_norm_eps)
            x = self._mv("down", silu_mul(self._mv("gate_up", h, L.w_gate_up)), L.w_down)
        h, _ = add_rmsnorm(x, residual, self.w.norm, arch.rms_norm_eps)
        self._head(h, unit_span_open)
        pos.add_(1)
        return self.logits

    def _head(self, h: torch.Tensor, unit_span_open: torch.Tensor | None) -> None:
        """h [1, H] -> fp32 logits in self.logits."""
        start = self.unit_rows_start
        if unit_span_open is None or start is None:
            self.logits.copy_(self._mv("head", h, self.w.lm_head)[0])
            return
        # Speech rows are always needed; text rows only outside a unit span (decided on the device).
        self.logits[start:].copy_(F.linear(h[0], self.w.lm_head[start:]))
        text_rows_logits(h[0], self.w.lm_head, unit_span_open, start, self.logits)
