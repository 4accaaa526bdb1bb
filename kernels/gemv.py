"""Batch-1 GEMV y = W x (W [N, K] row-major fp16/bf16), torch reference, Triton kernel and a benchmark.

At batch 1 the decode step is ~97% weight reads, so a GEMV is only as good as its achieved bandwidth. Each program
owns BLOCK_N rows and walks K in BLOCK_K steps: a [BLOCK_N, BLOCK_K] tile is contiguous along K, so loads
vectorise to 16-byte accesses and a warp reads whole 128-byte lines; products accumulate in an fp32
[BLOCK_N, BLOCK_K] tile that is reduced once at the end (no per-step cross-thread reductions).

`bench_gemv()` times it against torch.nn.functional.linear (cuBLAS) at the LLaMA-7B shapes with
triton.testing.do_bench (median, L2 flushed between runs) so the engine can pick the faster one per shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["AUTO_CONFIGS", "GemvConfig", "bench_gemv", "default_config", "dot_rows", "fastest_config", "gemv", "gemv_reference",
           "gemv_triton", "shortlist"]

# (N, K) at LLaMA-7B: fused qkv, o_proj, fused gate_up, down_proj, lm_head (SpeechGPT vocab 33006).
LLAMA7B_SHAPES: tuple[tuple[int, int], ...] = ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (33006, 4096))


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4


BENCH_CONFIGS: tuple[GemvConfig, ...] = (
    GemvConfig(4, 512, 4),
    GemvConfig(8, 256, 4),
    GemvConfig(8, 512, 4),
    GemvConfig(16, 256, 4),
    GemvConfig(4, 1024, 4),
    GemvConfig(8, 1024, 8),
    GemvConfig(16, 512, 8),
    GemvConfig(32, 256, 8),
)


# What the engine's gemv="auto" races against cuBLAS: the benchmark set plus wide-K tiles, which keep more bytes in
# flight per program (the small o_proj and the K=11008 down_proj are where narrow tiles fall short).
AUTO_CONFIGS: tuple[GemvConfig, ...] = BENCH_CONFIGS + (
    GemvConfig(1, 4096, 4),
    GemvConfig(2, 2048, 4),
    GemvConfig(2, 4096, 8),
    GemvConfig(4, 2048, 8),
    GemvConfig(4, 4096, 8),
    GemvConfig(8, 1024, 4),
    GemvConfig(8, 2048, 8),
    GemvConfig(16, 1024, 8),
)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 y = W x (the accuracy reference)."""
    return F.linear(x.float(), weight.float())


def default_config(n: int, k: int) -> GemvConfig:
    # A BLOCK_K that divides K drops the K masks (EVEN_K); 11008 = 43 * 256.
    for block_k in (512, 256, 128):
        if k % block_k == 0:
            return GemvConfig(8, block_k, 4)
    return GemvConfig(8, 512, 4)


@triton.jit
def _weight_tile(w_rows, cols, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_rows + cols[None, :])
    return tl.load(w_rows + cols[None, :], mask=(cols < K)[None, :], other=0.0)


@triton.jit
def _accumulate(acc, sq, w, x_ptr, g_ptr, cols, K, EVEN_K: tl.constexpr, NORM: tl.constexpr):
    if EVEN_K:
        x = tl.load(x_ptr + cols).to(tl.float32)
    else:
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    if NORM:
        if EVEN_K:
            g = tl.load(g_ptr + cols).to(tl.float32)
        else:
            g = tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        sq += x * x
        x = x * g
    acc += w.to(tl.float32) * x[None, :]
    return acc, sq


@triton.jit
def dot_rows(
    w_ptr,
    rows,
    stride_wn,
    x_ptr,
    g_ptr,
    K,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    NORM: tl.constexpr,
    GDC: tl.constexpr,
):
    """The GEMV inner loop, shared by the plain and the fused GEMVs: for the BLOCK_N weight rows `rows` (any row
    indices, each row contiguous along K) returns fp32 y[r] = sum_k W[rows[r], k] * x[k] and 0.0. With NORM it
    multiplies x by the RMSNorm weight g on the fly and also returns sum_k x[k]^2, so a fused kernel can apply
    the norm's 1/rms to y afterwards (W (g * x / rms) = (W (g * x)) / rms) without a separate norm pass.

    GDC (programmatic dependent launch): the first weight tile does not depend on the previous kernel, so it is
    requested before waiting for that kernel (weight streaming starts during its tail); x and g are read only
    after the wait. The next kernel is then allowed to launch: it finds this one past its own wait, so at most
    two kernels of the chain are resident at a time, and everything before this kernel's predecessor is done."""
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    sq = tl.zeros([BLOCK_K], dtype=tl.float32)
    if GDC:
        cols = tl.arange(0, BLOCK_K)
        w = _weight_tile(w_rows, cols, K, EVEN_K)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
        acc, sq = _accumulate(acc, sq, w, x_ptr, g_ptr, cols, K, EVEN_K, NORM)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            acc, sq = _accumulate(acc, sq, _weight_tile(w_rows, cols, K, EVEN_K), x_ptr, g_ptr, cols, K, EVEN_K, NORM)
    else:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            acc, sq = _accumulate(acc, sq, _weight_tile(w_rows, cols, K, EVEN_K), x_ptr, g_ptr, cols, K, EVEN_K, NORM)
    return tl.sum(acc, axis=1), tl.sum(sq, axis=0)


@triton.jit
def _gemv_kernel(
    w_ptr,
    x_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    # Clamp rather than mask the row loads: the last program re-reads row N-1 and its store is masked.
    y, _ = dot_rows(w_ptr, tl.minimum(rows, N - 1), stride_wn, x_ptr, x_ptr, K, BLOCK_N, BLOCK_K, EVEN_K, False, False)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [K] or [1, K], weight [N, K] (last dim contiguous) -> y [N] or [1, N] in x's dtype."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be [N, K] with a contiguous last dim, got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape not in ((k,), (1, k)) or x.stride(-1) != 1:
        raise ValueError(f"gemv: x must be [{k}] or [1, {k}] and contiguous, got {tuple(x.shape)}")
    out_shape = (n,) if x.dim() == 1 else (1, n)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != out_shape or not out.is_contiguous():
        raise ValueError(f"gemv: out must be a contiguous {out_shape} tensor, got {tuple(out.shape)}")
    cfg = config or default_config(n, k)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        weight,
        x,
        out,
        n,
        k,
        weight.stride(0),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps,
    )
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher: the Triton GEMV on CUDA, torch F.linear elsewhere."""
    if x.is_cuda:
        return gemv_triton(x, weight, out=out)
    y = F.linear(x, weight)
    if out is not None:
        out.copy_(y)
        y = out
    return y


# do_bench windows for the config races: microsecond kernels repeat hundreds of times in 25 ms, and a race of ~20
# configs x 9 kernels at load must stay within seconds.
RACE_WARMUP_MS, RACE_REP_MS = 5, 25


def fastest_config(
    run: Callable[[GemvConfig], torch.Tensor],
    reference: torch.Tensor,
    configs: tuple[GemvConfig, ...],
) -> tuple[GemvConfig | None, float, dict[str, float]]:
    """Race the configs of one kernel launch `run(cfg)` (CUDA): (fastest correct config, its median us, us per
    config). A config whose output is off the fp32 `reference` by more than 1% of its range is dropped."""
    from triton.testing import do_bench

    times: dict[str, float] = {}
    best, best_us = None, float("inf")
    scale = reference.abs().max().item()
    for cfg in configs:
        err = (run(cfg).float() - reference).abs().max().item()
        if not err <= 1e-2 * scale + 1e-3:  # a broken config must not win the race
            continue
        us = 1e3 * do_bench(lambda cfg=cfg: run(cfg), warmup=RACE_WARMUP_MS, rep=RACE_REP_MS, return_mode="median")
        times[str(cfg)] = us
        if us < best_us:
            best, best_us = cfg, us
    return best, best_us, times


def shortlist(times: dict[str, float], configs: tuple[GemvConfig, ...], keep: int = 6) -> tuple[GemvConfig, ...]:
    """The `keep` fastest of `configs` by an earlier race's us per config (`fastest_config`'s third result; configs
    it did not time are left out): a fused kernel over the same weights races these instead of every config."""
    timed = [c for c in configs if str(c) in times]
    return tuple(sorted(timed, key=lambda c: times[str(c)])[:keep])


def bench_gemv(
    shapes: tuple[tuple[int, int], ...] = LLAMA7B_SHAPES,
    dtype: torch.dtype = torch.bfloat16,
    configs: tuple[GemvConfig, ...] = BENCH_CONFIGS,
    device: str = "cuda",
    verbose: bool = True,
) -> list[dict]:
    """Median time of F.linear vs the best Triton config per shape, side by side in one run (CUDA only).
    Returns one dict per shape: n, k, torch_us, triton_us, best config, GB/s of both, torch/triton ratio and the
    us of every config that passed the accuracy check."""
    from triton.testing import do_bench

    if not torch.cuda.is_available():
        raise RuntimeError("bench_gemv needs a CUDA device")
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        weight = (torch.randn((n, k), generator=gen, device=device) * 0.02).to(dtype)
        x = torch.randn((k,), generator=gen, device=device).to(dtype)
        out = torch.empty((n,), dtype=dtype, device=device)
        torch_us = 1e3 * do_bench(lambda: F.linear(x, weight), warmup=RACE_WARMUP_MS, rep=RACE_REP_MS, return_mode="median")
        best_cfg, best_us, times = fastest_config(lambda cfg: gemv_triton(x, weight, out=out, config=cfg), gemv_reference(x, weight), configs)
        nbytes = n * k * weight.element_size()
        row = {
            "n": n,
            "k": k,
            "torch_us": torch_us,
            "triton_us": best_us,
            "best_config": best_cfg,
            "torch_gbps": nbytes / (torch_us * 1e-6) / 1e9,
            "triton_gbps": nbytes / (best_us * 1e-6) / 1e9,
            "torch_over_triton": torch_us / best_us,
            "us_per_config": times,
        }
        rows.append(row)
        if verbose:
            print(
                f"[{n:>5} x {k:>5}] torch {row['torch_us']:8.1f} us ({row['torch_gbps']:6.0f} GB/s)  "
                f"triton {row['triton_us']:8.1f} us ({row['triton_gbps']:6.0f} GB/s) {best_cfg}  "
                f"torch/triton {row['torch_over_triton']:.2f}x"
            )
    return rows


if __name__ == "__main__":
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"bench_gemv on {name}, torch {torch.__version__}, triton {triton.__version__}")
    bench_gemv()
