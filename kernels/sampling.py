"""SpeechGPT sampling (HF transformers 4.33 order) as a torch reference and a fused, CUDA-graph-safe Triton sampler.

HF order (what the official `generate` call does, reproduced by `filter_logits_reference`):
    logits (fp32) -> min-new-tokens (EOS = -inf while fewer than `min_new_tokens` tokens were generated)
    -> / temperature -> top-k (remove scores < k-th largest; ties at the k-th value are kept)
    -> top-p (sort ascending, softmax, cumsum, remove where cumprob <= 1 - top_p, always keep the largest)
    -> softmax -> multinomial.
Greedy (do_sample=False) applies only the min-new-tokens processor, then argmax.

Fused Triton path (`sample_triton`), two launches, no host sync:
  stage 1, P programs of BLOCK_V logits each: EOS ban (num_generated read on the device), temperature, then the
      program's top K_MAX = 64 entries by (value desc, index asc), found by a 32-step bisection over an
      order-preserving int32 image of the fp32 values plus a cumsum for ties, and compacted (in index order) into
      K_MAX int64 slots of a scratch buffer. Each slot packs (value key << 32) + (2^31 - 1 - index), so one int64
      comparison orders by value and then by lower index.
  stage 2, one program: the P * K_MAX candidates contain every token >= the global k-th largest value (k <= K_MAX).
      Bisection gives the k-th largest value; tokens >= it are kept (HF keeps ties; capped at K_MAX), compacted into
      K_MAX slots; pairwise comparisons of the packed keys give each kept token its rank, the HF ascending
      cumulative probability for top-p, and the descending CDF for the draw. The draw is inverse-CDF with
      u = tl.rand(seed, offset): seed and offset live in device memory and the kernel advances offset (and the
      num_generated counter), so every CUDA-graph replay draws a fresh number (a seed captured by value would not).

Why bisection rather than tl.sort or repeated max extraction: a bitonic sort of a 2048-wide block is ~66 dependent
compare-exchange stages (and takes seconds per block in the Triton interpreter the CPU tests use); K_MAX rounds of
max extraction are 64 dependent reductions. The bisection is 32 reductions, independent of K_MAX, and the
per-token ranking is done only on the <= 64 survivors, by pairwise comparison (64 x 64), not by sorting.

Ties: HF keeps every token equal to the k-th largest value; the fused sampler keeps them too, up to K_MAX tokens in
total (with top_k close to K_MAX and a large tie group at the k-th value, the tied tokens past K_MAX are dropped,
which also shifts the top-p normalisation: not reachable with continuous logits, rare with bf16 at top_k = 50).
Among equal values the lower index ranks first (for greedy this is torch.argmax's first-index rule); HF's top-p cut
inside a group of equal values depends on torch.sort's order. Both are measure-zero for real (continuous) logits,
but bf16 logits do tie: the distribution over values is the same, the chosen index within a tie may differ.
Arithmetic: fp32 throughout; on the GPU Triton's fp32 division and exp are the fast approximate forms (<= 2 ulp),
so probabilities match the reference to ~1e-7 and kept sets can differ only when a cumulative probability lies
within ~1e-6 of 1 - top_p. NaN logits are not supported (HF would fail in multinomial).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "CPU_DRAWS",
    "K_MAX",
    "SampleDebug",
    "SamplerState",
    "SamplingParams",
    "SPEECHGPT_SAMPLING",
    "filter_logits_reference",
    "greedy",
    "greedy_reference",
    "greedy_triton",
    "kept_distribution",
    "sample",
    "sample_host",
    "kept_from_top",
    "race_pick",
    "sample_kept",
    "sample_reference",
    "sample_triton",
    "sample_triton_debug",
    "sampling_scratch",
]

K_MAX = 64  # candidates per program and the largest supported top_k
_DEFAULT_BLOCK_V = 2048  # stage-1 block: 17 programs and 1088 stage-2 candidates for V = 33006
_GREEDY_BLOCK_V = 4096


@dataclass(frozen=True)
class SamplingParams:
    """SpeechGPT's generation config (temperature 0.7, top-k 50, top-p 0.8, min_new_tokens 10, EOS 2)."""

    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.8
    min_new_tokens: int = 10
    eos_id: int = 2
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0.0:
            raise ValueError(f"SamplingParams.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise ValueError(f"SamplingParams.min_new_tokens must be >= 0, got {self.min_new_tokens}")


# SpeechGPT's GenerationConfig in cli_infer.py (docs/speechgpt-format.md, Sampling settings).
SPEECHGPT_SAMPLING = SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_new_tokens=10, eos_id=2)


@dataclass
class SamplerState:
    """Device-resident sampler state; the kernels read and advance it, so a captured graph stays valid."""

    num_generated: torch.Tensor  # int32 [1]: tokens generated so far in this answer (EOS ban while < min_new)
    seed: torch.Tensor  # int64 [1]: Philox key
    offset: torch.Tensor  # int64 [1]: Philox counter, advanced by every draw
    token_out: torch.Tensor  # int64 [1]: the sampled token id (global vocabulary id)

    @classmethod
    def create(
        cls, device: torch.device | str, seed: int = 0, num_generated: int = 0, offset: int = 0
    ) -> SamplerState:
        return cls(
            num_generated=torch.full((1,), num_generated, dtype=torch.int32, device=device),
            seed=torch.full((1,), seed, dtype=torch.int64, device=device),
            offset=torch.full((1,), offset, dtype=torch.int64, device=device),
            token_out=torch.zeros((1,), dtype=torch.int64, device=device),
        )

    def reset(self, num_generated: int = 0, seed: int | None = None, offset: int | None = None) -> None:
        """In place, so tensors captured by a CUDA graph keep their addresses."""
        self.num_generated.fill_(num_generated)
        if seed is not None:
            self.seed.fill_(seed)
        if offset is not None:
            self.offset.fill_(offset)


# ----------------------------------------------------------------------------------------------------------------
# torch reference (HF 4.33 semantics)
# ----------------------------------------------------------------------------------------------------------------


def _eos_local(params: SamplingParams, vocab_offset: int, vocab_size: int) -> int:
    """EOS index inside the logits slice, or -1 when the slice [vocab_offset, vocab_offset + V) excludes it."""
    local = params.eos_id - vocab_offset
    return local if 0 <= local < vocab_size else -1


def filter_logits_reference(
    logits: torch.Tensor, params: SamplingParams, num_generated: int, vocab_offset: int = 0
) -> torch.Tensor:
    """Processed fp32 scores [V] exactly as HF computes them before the final softmax (-inf = removed)."""
    if logits.dim() != 1:
        raise ValueError(f"filter_logits_reference: logits must be [V], got {tuple(logits.shape)}")
    scores = logits.float().reshape(1, -1).clone()
    vocab = scores.shape[-1]
    eos = _eos_local(params, vocab_offset, vocab)
    if eos >= 0 and num_generated < params.min_new_tokens:  # MinNewTokensLengthLogitsProcessor
        scores[:, eos] = float("-inf")
    if params.greedy:
        return scores[0]
    if params.temperature != 1.0:  # TemperatureLogitsWarper
        scores = scores / params.temperature
    if params.top_k != 0:  # TopKLogitsWarper
        k = min(max(params.top_k, 1), vocab)
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:  # TopPLogitsWarper
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = False
        remove = remove.scatter(1, sorted_indices, remove)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores[0]


def sample_reference(
    logits: torch.Tensor,
    params: SamplingParams,
    num_generated: int,
    generator: torch.Generator | None = None,
    vocab_offset: int = 0,
) -> int:
    """One token id (global: local index + vocab_offset) drawn like HF (softmax + torch.multinomial)."""
    scores = filter_logits_reference(logits, params, num_generated, vocab_offset)
    if params.greedy:
        return int(torch.argmax(scores)) + vocab_offset
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)) + vocab_offset


def sample_host(
    logits: torch.Tensor,
    params: SamplingParams,
    num_generated: int,
    generator: torch.Generator | None = None,
    vocab_offset: int = 0,
) -> int:
    """sample_reference's draw, bit for bit and with the same use of the generator, without its full-vocabulary
    sort (the CPU engine's sampler: the sort was most of a tiny model's step).

    After top-k only the tokens >= the k-th largest score are finite, so top-p's ascending sort of all V scores is
    (V - m) -infs followed by the m candidates in order: it is built from a sort of the m candidates, and softmax and
    cumsum then run on the same [1, V] values as in the reference (same rounding). torch.multinomial(probs, 1) is
    argmax(probs / E) with E = an Exp(1) draw for each of the V entries (torch's one-sample path): the V draws are
    made (the generator advances as in the reference), the ratio is taken over the kept tokens only (every other
    ratio is 0; index order keeps argmax's first-index rule). Where this shortcut is not exact the reference runs:
    greedy, no top-k or k > V / 4, fewer than k finite scores, or tied candidate scores (their top-p order is
    torch.sort's over the whole vector)."""
    if logits.dim() != 1:
        raise ValueError(f"sample_host: logits must be [V], got {tuple(logits.shape)}")
    vocab = logits.shape[0]
    k = min(max(params.top_k, 1), vocab)
    if params.greedy or params.top_k == 0 or 4 * k > vocab:
        return sample_reference(logits, params, num_generated, generator, vocab_offset)
    scores = logits.float()
    eos = _eos_local(params, vocab_offset, vocab)
    if eos >= 0 and num_generated < params.min_new_tokens:
        scores = scores.clone()
        scores[eos] = float("-inf")
    if params.temperature != 1.0:
        scores = scores / params.temperature
    kth = torch.topk(scores, k)[0][-1]
    if not bool(torch.isfinite(kth)):
        return sample_reference(logits, params, num_generated, generator, vocab_offset)
    keep = (scores >= kth).nonzero()[:, 0]  # the top-k survivors (ties at the k-th value too), in index order
    values = scores[keep]
    if params.top_p < 1.0:
        ordered, order = torch.sort(values)
        if bool((ordered[1:] == ordered[:-1]).any()):
            return sample_reference(logits, params, num_generated, generator, vocab_offset)
        m = ordered.numel()
        sorted_logits = torch.full((1, vocab), float("-inf"), device=scores.device)
        sorted_logits[0, vocab - m :] = ordered
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)[0, vocab - m :]
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False
        keep = keep[order[~remove].sort().values]
        values = scores[keep]
    final = torch.full((vocab,), float("-inf"), device=scores.device)
    final[keep] = values
    probs = torch.softmax(final, dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return int(keep[torch.argmax(probs[keep] / race[keep])]) + vocab_offset


def kept_distribution(
    logits: torch.Tensor, params: SamplingParams, num_generated: int, vocab_offset: int = 0
) -> tuple[torch.Tensor, list[float]] | None:
    """The tokens HF's processors keep and their probabilities, from the top-k alone: (local ids [m], by descending
    score; their probabilities, m floats). The same set and probabilities as softmax(filter_logits_reference) up to
    rounding: temperature, softmax and top-p's cumulative sum run in float64 on the k values on the host (HF: fp32
    over all V), so a token whose cumulative probability lies within rounding of 1 - top_p may fall on the other side.
    None where it does not apply: greedy, no top-k or k > V / 4, fewer than k finite scores, a tie at the k-th value."""
    vocab = logits.shape[0]
    k = min(max(params.top_k, 1), vocab)
    if params.greedy or params.top_k == 0 or 4 * k > vocab:
        return None
    scores = logits.float()
    eos = _eos_local(params, vocab_offset, vocab)
    if eos >= 0 and num_generated < params.min_new_tokens:
        scores = scores.clone()
        scores[eos] = float("-inf")
    values, ids = torch.topk(scores, k + 1)  # one more, to see a tie at the k-th value (HF would keep it)
    return kept_from_top(values.tolist(), ids, params)


def kept_from_top(top: list[float], ids: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, list[float]] | None:
    """kept_distribution's second half, from the k + 1 largest (EOS-banned) scores in descending order and their ids
    (k = params.top_k): also used by the batched sampler (kernels.batched_sampling), which takes them for many rows
    in one topk."""
    k = len(top) - 1
    if not math.isfinite(top[k - 1]) or top[k] == top[k - 1]:
        return None
    scaled = [v / params.temperature for v in top[:k]]
    weights = [math.exp(v - scaled[0]) for v in scaled]
    m = k
    if params.top_p < 1.0:  # HF: remove where the ascending cumulative probability <= 1 - top_p, never the largest
        total, cumulative = sum(weights), 0.0
        while m > 1:
            cumulative += weights[m - 1] / total
            if cumulative > 1 - params.top_p:
                break
            m -= 1
    total = sum(weights[:m])
    return ids[:m], [w / total for w in weights[:m]]


def race_pick(ids: torch.Tensor, probs: list[float], generator: torch.Generator | None) -> int:
    """The exponential race argmax(p_i / E_i), E_i ~ Exp(1) drawn from `generator`: picks ids[i] with probability
    p_i (the rule torch.multinomial's one-sample draw uses), with one random number per kept token."""
    race = torch.empty(len(probs)).exponential_(1, generator=generator).tolist()
    best = max(range(len(probs)), key=lambda i: probs[i] / race[i] if race[i] > 0 else math.inf)
    return int(ids[best])


def sample_kept(
    logits: torch.Tensor,
    params: SamplingParams,
    num_generated: int,
    generator: torch.Generator | None = None,
    vocab_offset: int = 0,
) -> int:
    """A draw from HF's distribution (kept_distribution) with random numbers for the kept tokens only: the
    exponential race argmax(p_i / E_i), E_i ~ Exp(1), picks token i with probability p_i (the rule torch.multinomial's
    one-sample draw uses over all V entries). m draws instead of V, but not HF's random stream: a seed gives other
    tokens than the reference. Where kept_distribution does not apply, sample_host (HF's draw)."""
    kept = kept_distribution(logits, params, num_generated, vocab_offset)
    if kept is None:
        return sample_host(logits, params, num_generated, generator, vocab_offset)
    return race_pick(*kept, generator) + vocab_offset


CPU_DRAWS = {"hf": sample_host, "kept": sample_kept}  # how the CPU sampler draws (see sample)


def greedy_reference(logits: torch.Tensor, vocab_offset: int = 0) -> int:
    return int(torch.argmax(logits)) + vocab_offset


# ----------------------------------------------------------------------------------------------------------------
# Triton helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    # fp32 -> int32 whose signed order is the float order: flip the magnitude bits of negative numbers.
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_to_float(key):
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)  # the flip is its own inverse
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pack(key, idx):
    # High half: value key; low half: 2^31 - 1 - index, so int64 order = value desc, then index asc.
    return (key.to(tl.int64) << 32) + (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _unpack(packed):
    hi = packed >> 32  # arithmetic shift: floor division, so the low half below is in [0, 2^32)
    low = packed - (hi << 32)
    return hi.to(tl.int32), 0x7FFFFFFF - low.to(tl.int32)


@triton.jit
def _pad_entries(SHAPE: tl.constexpr):
    # Empty slot: value -inf (never kept), lowest index priority.
    neg_inf = tl.full([SHAPE], float("-inf"), tl.float32)
    return _pack(_order_key(neg_inf), tl.full([SHAPE], 0x7FFFFFFF, tl.int32))


@triton.jit
def _kth_largest_key(key, valid, k):
    # Largest t with count(valid & key >= t) >= k, by bisection over the int32 range (32 halvings of 2^32);
    # INT32_MIN when fewer than k lanes are valid. Returned as an int64 [1] block.
    key64 = key.to(tl.int64)
    lo = tl.full([1], -2147483648, tl.int64)
    hi = tl.full([1], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + ((hi - lo + 1) >> 1)
        count = tl.sum((valid & (key64 >= mid)).to(tl.int32), axis=0)
        ok = count >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _select_top(key, valid, k, CAP: tl.constexpr):
    # Mask of the lanes >= the k-th largest key (ties included), capped at CAP lanes by taking tied lanes in lane
    # order; with k == CAP this is exactly the top CAP by (value desc, lane asc).
    t = _kth_largest_key(key, valid, k)
    key64 = key.to(tl.int64)
    above = valid & (key64 > t)
    tie = valid & (key64 == t)
    need = CAP - tl.sum(above.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0) - 1
    return above | (tie & (tie_rank < need))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _sample_candidates_kernel(
    logits_ptr,
    cand_ptr,
    num_gen_ptr,
    vocab,
    eos_local,
    min_new,
    temperature,
    BLOCK_V: tl.constexpr,
    K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < vocab
    x = tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    num_generated = tl.load(num_gen_ptr)
    x = tl.where((offs == eos_local) & (num_generated < min_new), float("-inf"), x)
    x = x / temperature  # division, like HF's `scores / temperature`
    key = _order_key(x)
    sel = _select_top(key, valid, K, K)
    # Compact the selected lanes, in index order, into this program's K slots; pad the rest.
    slot = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    base = cand_ptr + pid * K
    tl.store(base + slot, _pack(key, offs), mask=sel)
    lanes = tl.arange(0, K)
    tl.store(base + lanes, _pad_entries(K), mask=lanes >= n_sel)


@triton.jit
def _sample_select_kernel(
    cand_ptr,
    num_gen_ptr,
    seed_ptr,
    offset_ptr,
    token_ptr,
    dbg_tokens_ptr,
    dbg_ids_ptr,
    dbg_probs_ptr,
    n_cand,
    top_k,
    top_p_cut,
    vocab_offset,
    num_draws,
    NC: tl.constexpr,
    K: tl.constexpr,
    GREEDY: tl.constexpr,
    DRAWS: tl.constexpr,
    DEBUG: tl.constexpr,
):
    c = tl.arange(0, NC)
    cmask = c < n_cand
    packed = tl.load(cand_ptr + c, mask=cmask, other=0)
    packed = tl.where(cmask, packed, _pad_entries(NC))
    lanes = tl.arange(0, K)
    draws = tl.arange(0, DRAWS)
    offset = tl.load(offset_ptr)
    if GREEDY:
        # Max packed key = max value, lowest index among ties (torch.argmax's rule).
        _, best = _unpack(tl.max(packed, axis=0))
        token = best.to(tl.int64) + vocab_offset
        tl.store(token_ptr, token)
        if DEBUG:
            tl.store(dbg_tokens_ptr + draws, tl.zeros([DRAWS], tl.int64) + token, mask=draws < num_draws)
            tl.store(dbg_ids_ptr + lanes, tl.where(lanes == 0, token, -1))
            tl.store(dbg_probs_ptr + lanes, tl.where(lanes == 0, 1.0, 0.0))
    else:
        key, _ = _unpack(packed)
        finite = _key_to_float(key) > float("-inf")
        # Top-k with HF's tie rule (>= k-th largest value), capped at K tokens; compacted through the scratch tail
        # (a register tensor cannot be compacted in place).
        keep = _select_top(key, finite, top_k, K)
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        n_keep = tl.sum(keep.to(tl.int32), axis=0)
        tail = cand_ptr + n_cand
        tl.store(tail + slot, packed, mask=keep)
        tl.store(tail + lanes, _pad_entries(K), mask=lanes >= n_keep)
        tl.debug_barrier()  # the stores above must be visible to every thread of the program
        kp = tl.load(tail + lanes)
        kkey, kidx = _unpack(kp)
        kval = _key_to_float(kkey)
        kfin = kval > float("-inf")
        # Packed keys are unique among real tokens, so pairwise comparisons give exact ranks and cumulative sums.
        gt = kp[None, :] > kp[:, None]  # gt[i, j]: token j ranks before token i
        rank = tl.sum(gt.to(tl.int32), axis=1)
        vmax = tl.max(tl.where(kfin, kval, float("-inf")), axis=0)
        e = tl.where(kfin, tl.exp(kval - vmax), 0.0)
        probs = e / tl.sum(e, axis=0)
        # HF top-p: ascending cumulative probability (token i and everything below it) <= 1 - top_p is removed;
        # the most likely token always stays.
        cum_asc = tl.sum(tl.where(gt, 0.0, probs[None, :]), axis=1)
        keep2 = kfin & ((cum_asc > top_p_cut) | (rank == 0))
        e2 = tl.where(keep2, e, 0.0)
        total = tl.sum(e2, axis=0)
        cdf = tl.sum(tl.where(gt | (kp[None, :] == kp[:, None]), e2[None, :], 0.0), axis=1)  # descending CDF
        # Inverse CDF: the first kept token (by rank) whose CDF exceeds u * total; the least likely kept token if
        # rounding leaves none.
        seed = tl.load(seed_ptr)
        u = tl.rand(seed, (offset + draws).to(tl.int32)) * total
        hit = keep2[None, :] & (cdf[None, :] > u[:, None])
        pick = tl.min(tl.where(hit, rank[None, :], K), axis=1)
        last = tl.max(tl.where(keep2, rank, 0), axis=0)
        pick = tl.minimum(pick, last)
        chosen = keep2[None, :] & (rank[None, :] == pick[:, None])
        tokens = tl.sum(tl.where(chosen, kidx[None, :], 0), axis=1).to(tl.int64) + vocab_offset
        tl.store(token_ptr, tl.sum(tl.where(draws == 0, tokens, 0), axis=0))
        if DEBUG:
            tl.store(dbg_tokens_ptr + draws, tokens, mask=draws < num_draws)
            n_keep2 = tl.sum(keep2.to(tl.int32), axis=0)
            tl.store(dbg_ids_ptr + rank, kidx.to(tl.int64) + vocab_offset, mask=keep2)
            tl.store(dbg_probs_ptr + rank, e2 / total, mask=keep2)
            tl.store(dbg_ids_ptr + lanes, tl.full([K], -1, tl.int64), mask=lanes >= n_keep2)
            tl.store(dbg_probs_ptr + lanes, tl.zeros([K], tl.float32), mask=lanes >= n_keep2)
    # Advance the device-side state so the next call (or graph replay) sees a new counter and fresh randomness.
    # The barrier makes sure every thread has read `offset` before the (single-thread) update lands.
    tl.debug_barrier()
    tl.store(num_gen_ptr, tl.load(num_gen_ptr) + 1)
    tl.store(offset_ptr, offset + num_draws)


@triton.jit
def _argmax_partial_kernel(logits_ptr, part_ptr, vocab, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < vocab
    x = tl.load(logits_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    packed = tl.where(valid, _pack(_order_key(x), offs), _pad_entries(BLOCK_V))
    tl.store(part_ptr + pid, tl.max(packed, axis=0))


@triton.jit
def _argmax_final_kernel(part_ptr, token_ptr, n_parts, vocab_offset, BLOCK_P: tl.constexpr):
    offs = tl.arange(0, BLOCK_P)
    valid = offs < n_parts
    packed = tl.load(part_ptr + offs, mask=valid, other=0)
    packed = tl.where(valid, packed, _pad_entries(BLOCK_P))
    _, best = _unpack(tl.max(packed, axis=0))
    tl.store(token_ptr, best.to(tl.int64) + vocab_offset)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------


def _plan(vocab: int, block_v: int | None) -> tuple[int, int]:
    if block_v is None:
        block_v = min(_DEFAULT_BLOCK_V, triton.next_power_of_2(vocab))
    block_v = max(block_v, K_MAX)
    if block_v & (block_v - 1):
        raise ValueError(f"sampling: block_v must be a power of two, got {block_v}")
    return block_v, triton.cdiv(vocab, block_v)


def sampling_scratch(vocab_size: int, device: torch.device | str, block_v: int | None = None) -> torch.Tensor:
    """int64 scratch for `sample_triton` (candidates of every program + K_MAX compaction slots)."""
    _, programs = _plan(vocab_size, block_v)
    return torch.empty(programs * K_MAX + K_MAX, dtype=torch.int64, device=device)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 1 or logits.stride(0) != 1:
        raise ValueError(f"sampling: logits must be a contiguous [V] tensor, got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"sampling: logits must be floating point, got {logits.dtype}")
    if not 0 < logits.shape[0] < 2**31 - 1:
        raise ValueError(f"sampling: vocabulary size out of range: {logits.shape[0]}")


def _check_state(state: SamplerState, device: torch.device) -> None:
    for name, t, dtype in (
        ("num_generated", state.num_generated, torch.int32),
        ("seed", state.seed, torch.int64),
        ("offset", state.offset, torch.int64),
        ("token_out", state.token_out, torch.int64),
    ):
        if t.numel() != 1 or t.dtype != dtype or t.device != device:
            raise ValueError(
                f"SamplerState.{name} must be a {dtype} tensor [1] on {device}, got {t.dtype} {tuple(t.shape)} "
                f"on {t.device}"
            )


def _launch_sampler(
    logits: torch.Tensor,
    params: SamplingParams,
    state: SamplerState,
    vocab_offset: int,
    scratch: torch.Tensor | None,
    block_v: int | None,
    num_draws: int,
    debug: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> None:
    _check_logits(logits)
    _check_state(state, logits.device)
    if not params.greedy and not 1 <= params.top_k <= K_MAX:
        raise ValueError(
            f"sample_triton: top_k must be in [1, {K_MAX}] (K_MAX candidates per program), got {params.top_k}; "
            "use sample_reference for top_k = 0 (no top-k) or larger k"
        )
    if vocab_offset < 0:
        raise ValueError(f"sample_triton: vocab_offset must be >= 0, got {vocab_offset}")
    vocab = logits.shape[0]
    block_v, programs = _plan(vocab, block_v)
    n_cand = programs * K_MAX
    if scratch is None:
        scratch = torch.empty(n_cand + K_MAX, dtype=torch.int64, device=logits.device)
    if scratch.dtype != torch.int64 or scratch.numel() < n_cand + K_MAX or not scratch.is_contiguous():
        raise ValueError(
            f"sample_triton: scratch must be contiguous int64 with >= {n_cand + K_MAX} elements "
            f"(see sampling_scratch), got {scratch.dtype} {scratch.numel()}"
        )
    eos = _eos_local(params, vocab_offset, vocab)
    temperature = 1.0 if params.greedy else float(params.temperature)
    _sample_candidates_kernel[(programs,)](
        logits,
        scratch,
        state.num_generated,
        vocab,
        eos,
        params.min_new_tokens,
        temperature,
        BLOCK_V=block_v,
        K=K_MAX,
        num_warps=8 if block_v >= 2048 else 4,
    )
    dbg_tokens, dbg_ids, dbg_probs = debug if debug is not None else (state.token_out,) * 3
    nc = triton.next_power_of_2(n_cand)
    _sample_select_kernel[(1,)](
        scratch,
        state.num_generated,
        state.seed,
        state.offset,
        state.token_out,
        dbg_tokens,
        dbg_ids,
        dbg_probs,
        n_cand,
        params.top_k,
        1.0 - params.top_p,  # passed as fp32, the same rounding as HF's fp32 comparison
        vocab_offset,
        num_draws,
        NC=nc,
        K=K_MAX,
        GREEDY=params.greedy,
        DRAWS=triton.next_power_of_2(num_draws),
        DEBUG=debug is not None,
        num_warps=8 if nc >= 2048 else 4,
    )


def sample_triton(
    logits: torch.Tensor,
    params: SamplingParams,
    state: SamplerState,
    vocab_offset: int = 0,
    scratch: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Fused min-new/temperature/top-k/top-p sampling of one token from logits [V] (any float dtype).
    Returns state.token_out (int64 [1], id = local index + vocab_offset); advances state.num_generated and
    state.offset on the device. CUDA-graph safe."""
    _launch_sampler(logits, params, state, vocab_offset, scratch, block_v, 1, None)
    return state.token_out


@dataclass
class SampleDebug:
    tokens: torch.Tensor  # int64 [num_draws]: draws for offsets offset .. offset + num_draws - 1
    kept_ids: torch.Tensor  # int64 [n_kept]: kept token ids, most likely first
    kept_probs: torch.Tensor  # fp32 [n_kept]: their renormalised probabilities


def sample_triton_debug(
    logits: torch.Tensor,
    params: SamplingParams,
    state: SamplerState,
    vocab_offset: int = 0,
    num_draws: int = 1,
    block_v: int | None = None,
) -> SampleDebug:
    """The production kernels with their debug outputs: the kept set, its probabilities and `num_draws` draws
    (the same numbers as `num_draws` successive `sample_triton` calls). Syncs with the host: tests only."""
    if num_draws < 1:
        raise ValueError(f"sample_triton_debug: num_draws must be >= 1, got {num_draws}")
    dev = logits.device
    tokens = torch.full((num_draws,), -1, dtype=torch.int64, device=dev)
    ids = torch.full((K_MAX,), -1, dtype=torch.int64, device=dev)
    probs = torch.zeros((K_MAX,), dtype=torch.float32, device=dev)
    _launch_sampler(logits, params, state, vocab_offset, None, block_v, num_draws, (tokens, ids, probs))
    n_kept = int((ids >= 0).sum())
    return SampleDebug(tokens=tokens, kept_ids=ids[:n_kept], kept_probs=probs[:n_kept])


def greedy_triton(
    logits: torch.Tensor,
    token_out: torch.Tensor,
    vocab_offset: int = 0,
    scratch: torch.Tensor | None = None,
    block_v: int = _GREEDY_BLOCK_V,
) -> torch.Tensor:
    """argmax(logits) + vocab_offset into token_out (int64 [1]); first index on ties like torch.argmax."""
    _check_logits(logits)
    if token_out.numel() != 1 or token_out.dtype != torch.int64:
        raise ValueError(f"greedy_triton: token_out must be int64 [1], got {token_out.dtype} {tuple(token_out.shape)}")
    vocab = logits.shape[0]
    block_v = min(block_v, triton.next_power_of_2(vocab))
    programs = triton.cdiv(vocab, block_v)
    if scratch is None:
        scratch = torch.empty(programs, dtype=torch.int64, device=logits.device)
    if scratch.dtype != torch.int64 or scratch.numel() < programs:
        raise ValueError(f"greedy_triton: scratch must be int64 with >= {programs} elements")
    _argmax_partial_kernel[(programs,)](logits, scratch, vocab, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    _argmax_final_kernel[(1,)](
        scratch, token_out, programs, vocab_offset, BLOCK_P=triton.next_power_of_2(programs), num_warps=1
    )
    return token_out


# ----------------------------------------------------------------------------------------------------------------
# dispatchers: Triton on CUDA, the torch reference elsewhere
# ----------------------------------------------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    state: SamplerState,
    vocab_offset: int = 0,
    generator: torch.Generator | None = None,
    cpu_draw: str = "hf",
) -> torch.Tensor:
    """Samples one token into state.token_out and advances the state, on CUDA with the fused kernels, elsewhere
    with cpu_draw: "hf" = the reference's draw (sample_host: HF multinomial, its random stream), "kept" = the same
    distribution from random numbers for the kept tokens only (sample_kept); `generator` or one seeded from
    (seed, offset)."""
    if logits.is_cuda:
        return sample_triton(logits, params, state, vocab_offset=vocab_offset)
    offset = int(state.offset.reshape(-1)[0])
    if generator is None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(hash((int(state.seed.reshape(-1)[0]), offset)) & (2**63 - 1))
    if cpu_draw not in CPU_DRAWS:
        raise ValueError(f"sample: cpu_draw must be one of {', '.join(CPU_DRAWS)}, got {cpu_draw!r}")
    token = CPU_DRAWS[cpu_draw](logits, params, int(state.num_generated.reshape(-1)[0]), generator, vocab_offset)
    state.token_out.fill_(token)
    state.num_generated.add_(1)
    state.offset.add_(1)
    return state.token_out


def greedy(logits: torch.Tensor, token_out: torch.Tensor, vocab_offset: int = 0) -> torch.Tensor:
    if logits.is_cuda:
        return greedy_triton(logits, token_out, vocab_offset=vocab_offset)
    token_out.fill_(greedy_reference(logits, vocab_offset))
    return token_out
