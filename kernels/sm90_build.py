"""Build the decode-step Triton kernels for Hopper (sm_90) without a GPU and report what the compiler made of them.

GPU time is scarce; compile errors and slow code shapes should not be found on it. Triton's wheel ships ptxas, so
`python -m kernels.sm90_build` compiles the fused layer kernels, the plain GEMV and decode attention at 7B-like
tile configs in bf16, with and without programmatic dependent launch (PDL), and reports per kernel:
- the width of every global load (16-byte `ld.global.v4` for the weight tiles: the GEMV is all weight streaming),
- spills (STL/LDL in the SASS, via the bundled nvdisasm),
- with PDL: how many global loads are issued before `griddepcontrol.wait` (the first weight tile only) and that
  `griddepcontrol.launch_dependents` follows the wait,
- the bulk L2 prefetches of the attention kernel's prefetch mode (issued before the PDL wait),
- where a kernel publishes through an atomic (one-launch decode attention): its memory semantics and scope, whether
  a CTA barrier separates the last global store from it, and that every global load after it bypasses L1 (`.cg`).
It must run without TRITON_INTERPRET (the interpreter replaces @triton.jit). `tests/test_kernels_sm90_build.py`
runs it in a subprocess and checks the report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_ARCH = 90
BF16 = "*bf16"


def _compile(fn, types: dict[str, str], consts: dict, aligned: list[str], num_warps: int, pdl: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # What the launcher would specialise at run time: 16-byte aligned pointers, strides and sizes divisible by 16.
    signature = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options={"num_warps": num_warps, "launch_pdl": pdl})


def _nvdisasm() -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    return str(path) if path.is_file() else None


def _inspect(kernel, tile_bytes: int | None, threads: int) -> dict:
    ptx: str = kernel.asm["ptx"]
    lines = ptx.splitlines()
    widths: dict[str, int] = {}
    for line in lines:
        m = re.search(r"ld\.global(?:\.\w+)*?\.(v\d\.b\d+|b\d+)", line)
        if m:
            widths[m.group(1)] = widths.get(m.group(1), 0) + 1
    wait = next((i for i, line in enumerate(lines) if "griddepcontrol.wait" in line), None)
    trigger = next((i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line), None)
    out = {
        "load_widths": widths,
        "pdl_wait": wait is not None,
        "loads_before_wait": sum("ld.global" in line for line in lines[:wait]) if wait is not None else None,
        "trigger_after_wait": (trigger is not None and wait is not None and trigger > wait),
        "v4_loads_per_weight_tile": tile_bytes // (16 * threads) if tile_bytes else None,
        "spills": None,
        "l2_prefetches": sum("prefetch.L2" in line for line in lines),
    }
    if out["l2_prefetches"] and wait is not None:
        out["l2_prefetch_before_wait"] = any("prefetch.L2" in line for line in lines[:wait])
    atom = next((i for i, line in enumerate(lines) if re.search(r"\batom\.", line)), None)
    if atom is not None:
        last_store = max(i for i, line in enumerate(lines[:atom]) if "st.global" in line)
        after = [line for line in lines[atom:] if "ld.global" in line]
        out["atomic"] = {
            "op": re.search(r"atom(\.\w+)+", lines[atom]).group(0),
            "barrier_after_last_store": any("bar.sync" in line for line in lines[last_store:atom]),
            "loads_after": len(after),
            "loads_after_bypass_l1": sum(".cg" in line for line in after),
        }
    disasm = _nvdisasm()
    if disasm:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            sass = subprocess.run([disasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        out["spills"] = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    return out


def build_report() -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90_build compiles real kernels: run it without TRITON_INTERPRET=1")
    import triton

    from kernels.batched_attention import _batched_combine_kernel, _batched_split_kernel
    from kernels.decode_attention import _decode_attn_combine_kernel, _decode_attn_split_kernel
    from kernels.gemv import _gemv_kernel
    from kernels.gemv_residual import _gemv_residual_kernel
    from kernels.norm_gate_up_silu import _norm_gate_up_silu_kernel
    from kernels.norm_qkv_rope import _norm_qkv_rope_kernel

    report: dict = {"triton": triton.__version__, "arch": f"sm_{TARGET_ARCH}", "kernels": {}}

    def add(name: str, kernel, tile_bytes: int | None, num_warps: int) -> None:
        report["kernels"][name] = _inspect(kernel, tile_bytes, 32 * num_warps)

    for pdl in (False, True):
        tag = "pdl" if pdl else "plain"
        for bn, bk, nw in ((8, 512, 4), (16, 512, 8), (4, 1024, 4), (2, 4096, 8)):
            k = _compile(_gemv_residual_kernel, {"w_ptr": BF16, "x_ptr": BF16, "h_ptr": BF16},
                         {"BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": True, "USE_GDC": pdl},
                         ["w_ptr", "x_ptr", "h_ptr", "N", "K", "stride_wn"], nw, pdl)
            add(f"gemv_residual[{bn}x{bk},w{nw}]/{tag}", k, 2 * bn * bk, nw)
        for pairs, bk, nw in ((4, 512, 4), (8, 512, 8)):
            k = _compile(
                _norm_qkv_rope_kernel,
                {"x_ptr": BF16, "g_ptr": BF16, "w_ptr": BF16, "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i32",
                 "q_out_ptr": BF16, "k_cache_ptr": BF16, "v_cache_ptr": BF16, "eps": "fp32"},
                {"HEAD_DIM": 128, "PAIRS": pairs, "BLOCK_K": bk, "EVEN_K": True, "USE_GDC": pdl},
                ["x_ptr", "g_ptr", "w_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_cache_ptr", "v_cache_ptr", "stride_wn",
                 "K", "stride_cos", "stride_qo", "stride_kc_h", "stride_kc_s", "stride_vc_h", "stride_vc_s"],
                nw, pdl)  # fmt: skip
            add(f"norm_qkv_rope[{2 * pairs}x{bk},w{nw}]/{tag}", k, 2 * 2 * pairs * bk, nw)
            k = _compile(_norm_gate_up_silu_kernel, {"x_ptr": BF16, "g_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16, "eps": "fp32"},
                         {"P": pairs, "BLOCK_K": bk, "EVEN_K": True, "USE_GDC": pdl},
                         ["x_ptr", "g_ptr", "w_ptr", "out_ptr", "stride_wn", "K", "INTER"], nw, pdl)
            add(f"norm_gate_up_silu[{2 * pairs}x{bk},w{nw}]/{tag}", k, 2 * 2 * pairs * bk, nw)
        # The split kernel in its three modes: two-launch (plain split), one-launch, one-launch with L2 prefetch.
        for name, one_launch, prefetch in (("decode_attention_split", False, False), ("decode_attention_one_launch", True, False),
                                           ("decode_attention_one_launch_l2_prefetch", True, True)):
            k = _compile(
                _decode_attn_split_kernel,
                {"q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, "seq_len_ptr": "*i32", "scratch_ptr": "*fp32",
                 "counter_ptr": "*i32", "out_ptr": BF16, "pf_ptr": "*u8", "qk_scale": "fp32"},
                {"GROUP": 1, "D": 128, "BLOCK_D": 128, "BLOCK_N": 64, "BLOCK_S": 32, "ONE_LAUNCH": one_launch,
                 "PREFETCH": prefetch, "USE_GDC": pdl},
                ["q_ptr", "k_ptr", "v_ptr", "scratch_ptr", "out_ptr", "pf_ptr", "stride_qh", "stride_kh", "stride_ks",
                 "stride_vh", "stride_vs", "stride_oh"],
                4, pdl)  # fmt: skip
            add(f"{name}/{tag}", k, None, 4)
        k = _compile(_decode_attn_combine_kernel, {"scratch_ptr": "*fp32", "out_ptr": BF16},
                     {"D": 128, "BLOCK_D": 128, "BLOCK_S": 32, "USE_GDC": pdl}, ["scratch_ptr", "out_ptr", "stride_oh"], 4, pdl)
        add(f"decode_attention_combine/{tag}", k, None, 4)
    # The batched engine's attention over per-row slots and lengths (kernels.batched_attention).
    k = _compile(_batched_split_kernel,
                 {"q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, "slots_ptr": "*i32", "seq_lens_ptr": "*i32", "scratch_ptr": "*fp32",
                  "qk_scale": "fp32"},
                 {"H": 32, "GROUP": 1, "D": 128, "BLOCK_D": 128, "BLOCK_N": 64},
                 ["q_ptr", "k_ptr", "v_ptr", "scratch_ptr", "stride_qb", "stride_qh", "stride_kslot", "stride_kh", "stride_ks",
                  "stride_vslot", "stride_vh", "stride_vs"], 4)  # fmt: skip
    add("batched_attention_split", k, None, 4)
    k = _compile(_batched_combine_kernel, {"scratch_ptr": "*fp32", "out_ptr": BF16}, {"D": 128, "BLOCK_D": 128, "BLOCK_S": 32},
                 ["scratch_ptr", "out_ptr"], 4)
    add("batched_attention_combine", k, None, 4)
    k = _compile(_gemv_kernel, {"w_ptr": BF16, "x_ptr": BF16, "y_ptr": BF16}, {"BLOCK_N": 8, "BLOCK_K": 512, "EVEN_K": True},
                 ["w_ptr", "x_ptr", "y_ptr", "N", "K", "stride_wn"], 4)
    add("gemv[8x512,w4]", k, 2 * 8 * 512, 4)
    return report


def main() -> int:
    report = build_report()
    if "--json" in sys.argv:
        print(json.dumps(report))
        return 0
    print(f"sm_{TARGET_ARCH} build with triton {report['triton']} (no GPU needed)")
    for name, r in report["kernels"].items():
        pdl = f" loads before griddepcontrol.wait: {r['loads_before_wait']}" if r["pdl_wait"] else ""
        atom = f" atomic {r['atomic']}" if "atomic" in r else ""
        pf = f" L2 prefetches {r['l2_prefetches']}" if r["l2_prefetches"] else ""
        print(f"  {name:38s} loads {r['load_widths']} spills {r['spills']}{pdl}{pf}{atom}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
