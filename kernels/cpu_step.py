"""The CPU decode layers through torch.compile: the same math as the eager CPU step, fewer, fused ops.

On the CPU the eager decode step is bound by op overhead at small shapes (a tiny model's layer is ~60 torch ops of
a few microseconds each), which Inductor's generated C++ removes. All layers are one compiled call (`decode_layers`);
per layer:

- `qkv_rope`: RMSNorm -> fused qkv projection -> RoPE, giving (q, k, v) of the new token;
- `attend_mlp`: attention over the static cache's positions before `pos` (a mask, so one compiled shape serves every
  position) and the new token's own k, v; o projection + residual, RMSNorm -> gate/up -> SiLU*mul -> down + residual.

The graph only reads the cache: the new k, v of every layer come back and the caller writes them at `pos` (one
index_copy_ per cache). The compiled function depends only on the shapes, so it is compiled once per process and
shared by every model of that shape and every DecodeEngine.fork(). Inductor fuses the reductions (RMSNorm's mean,
the softmax), so the rounding differs from the eager step's in the last bits: the compiled path is opt-in
(`cpu_compile`) and tested against the eager one (same greedy tokens, logits within a stated tolerance), never
assumed bit-exact.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from kernels.norm_gate_up_silu import norm_gate_up_silu_reference
from kernels.rmsnorm import rmsnorm_reference
from kernels.rope import apply_rope_reference


def qkv_rope(
    hidden: torch.Tensor, attn_norm: torch.Tensor, wqkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    pos: torch.Tensor, eps: float, num_kv_heads: int, head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [1, K] at position pos (int [1]) -> rotated q [H, D], rotated k [Hkv, D], v [Hkv, D]."""
    qkv = F.linear(rmsnorm_reference(hidden, attn_norm, eps), wqkv)[0]
    kv = num_kv_heads * head_dim
    q, k, v = qkv.split([qkv.shape[0] - 2 * kv, kv, kv])
    positions = pos.reshape(1).long()
    q = apply_rope_reference(q.view(1, -1, head_dim), cos, sin, positions)[0]
    k = apply_rope_reference(k.view(1, num_kv_heads, head_dim), cos, sin, positions)[0]
    return q, k, v.view(num_kv_heads, head_dim)


def attend_mlp(
    hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    pos: torch.Tensor, wo: torch.Tensor, mlp_norm: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, eps: float,
) -> torch.Tensor:
    """The rest of the layer: softmax(q . K^T / sqrt(D)) . V over the cached positions < pos and the new token's own
    k, v (fp32, like decode_attention_reference; the cache is only read), then the o projection, the MLP and both
    residual adds. Returns hidden [1, K]."""
    heads, d = q.shape
    group = heads // k_cache.shape[0]
    keys = k_cache.float().repeat_interleave(group, dim=0)  # [H, S, D]
    values = v_cache.float().repeat_interleave(group, dim=0)
    qf = q.float() * (1.0 / math.sqrt(d))
    cached = torch.einsum("hd,hsd->hs", qf, keys)
    earlier = torch.arange(k_cache.shape[1], device=k_cache.device) < pos.reshape(1).long()
    own_k, own_v = k.float().repeat_interleave(group, dim=0), v.float().repeat_interleave(group, dim=0)  # [H, D]
    scores = torch.cat([cached.masked_fill(~earlier, float("-inf")), (qf * own_k).sum(-1, keepdim=True)], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    attn = (torch.einsum("hs,hsd->hd", probs[:, :-1], values) + probs[:, -1:] * own_v).to(q.dtype)
    hidden = hidden + F.linear(attn.reshape(1, heads * d), wo)
    return hidden + F.linear(norm_gate_up_silu_reference(hidden, mlp_norm, w_gate_up, eps), w_down)


def decode_layers(
    token: torch.Tensor, pos: torch.Tensor, embed: torch.Tensor, layers: list[tuple[torch.Tensor, ...]],
    k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every layer of one decode step: token (int64 [1]) at pos (int32 [1]) over the caches [L, Hkv, S, D] (read
    only: a graph that wrote into a slice of its input would copy the whole cache back on every call); layers: per
    layer (attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down). Returns (residual stream [1, K], final-normed hidden
    state [1, K], the new token's k and v [L, Hkv, D] for the caller to write at pos)."""
    hidden = F.embedding(token.view(1), embed)
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    new_k, new_v = [], []
    for n, (attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down) in enumerate(layers):
        q, k, v = qkv_rope(hidden, attn_norm, wqkv, cos, sin, pos, eps, num_kv_heads, head_dim)
        hidden = attend_mlp(hidden, q, k, v, k_cache[n], v_cache[n], pos, wo, mlp_norm, w_gate_up, w_down, eps)
        new_k.append(k)
        new_v.append(v)
    return hidden, rmsnorm_reference(hidden, norm, eps), torch.stack(new_k), torch.stack(new_v)


_compiled = None
_compile_lock = threading.Lock()


def compiled_decode_layers():
    """decode_layers compiled with torch.compile, once per process (Dynamo keeps one entry per shape and layer count,
    shared by every model and fork of that shape)."""
    global _compiled
    with _compile_lock:
        if _compiled is None:
            _compiled = torch.compile(decode_layers, dynamic=False, fullgraph=True)
        return _compiled
