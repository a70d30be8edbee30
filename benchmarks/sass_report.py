"""Compile specq's Triton GEMV kernels for sm_90 on any machine and count the SASS of their K loop.

    python benchmarks/sass_report.py [--fmt int4,mxfp4] [--bn 4 --jt 64 --warps 2 --rows 1] [--top 16]
    python benchmarks/sass_report.py --mma [--tiles 2 --warps 4 --rows 1 --offset 0]   # tensor-core GEMV
    python benchmarks/sass_report.py --w4a4 [--bm 128 --bn 128 --warps 8 --stages 3 --swap 1]   # W4A4 GEMM
    python benchmarks/sass_report.py --gluon 5   # the Gluon W4A4 GEMM at candidate 5 (gluon_w4a4._candidates())

No GPU is needed: Triton's own ptxas and nvdisasm (shipped in the triton wheel) build and disassemble
the kernel for an H100 (sm_90), with the argument specialisation the GPU launcher applies (pointers
16-byte aligned, sizes and strides divisible by 16), so the loads are vectorised as they are there.
It prints the instruction histogram of the K loop (the longest span closed by a backward branch) and the
instructions per weight, the budget that decides a 4-bit GEMV's speed (see triton_gemv's docstring).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def compile_sm90(fn, signature: dict, constexprs: dict, divisible: list[str], num_warps: int, num_stages: int = 1,
                 maxnreg=None):
    """triton.compile for sm_90 with tt.divisibility=16 on the named arguments (and a register cap)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass_of(kernel) -> str:
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def registers(kernel) -> int:
    """Registers per thread of a compiled kernel (cuobjdump's resource usage)."""
    import triton
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", out).group(1))


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def instructions(sass: str) -> list[str]:
    """The text of each instruction line of nvdisasm's output (predicate, opcode, operands), in order."""
    return [ln.split(";")[0].split("*/")[-1].strip() for ln in sass.splitlines() if "*/" in ln]


def loop_histogram(sass: str, containing: str = "", predicated: bool = False) -> collections.Counter:
    """Opcode counts of the longest loop (between a backward branch's label and the branch: the K loop) whose
    body has an instruction containing ``containing``. ``predicated``: only loops closed by a conditional
    branch (an mbarrier wait's retry stub at the end of a kernel jumps back unconditionally)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, l in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", l))}
    loop = None
    for i, l in enumerate(lines):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", l)
        if m and predicated and not re.search(r"@!?U?P\w+\s+BRA", l):
            continue
        if m and labels.get(m.group(1), i) < i and (loop is None or i - labels[m.group(1)] > loop[1] - loop[0]) \
                and any(containing in body for body in lines[labels[m.group(1)]:i]):
            loop = (labels[m.group(1)], i)
    start, end = loop if loop else (0, len(lines))
    ops = collections.Counter()
    for l in lines[start:end + 1]:
        m = _INSTR.match(l)
        if m:
            ops[m.group(1)] += 1
    return ops


# the 4-bit GEMVs' common arguments, and those the launcher specialises as divisible by 16 on the GPU
_DIVISIBLE = ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn", "stride_sn",
              "stride_ym"]


def _gemv_signature(mxfp4: bool) -> dict:
    return {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*u8" if mxfp4 else "*bf16", "b_ptr": "*bf16",
            "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32",
            "stride_sn": "i32", "stride_ym": "i32"}


def gemv_kernel(fmt: str, bn: int, jt: int, warps: int, rows: int):
    from specq.kernels import triton_gemv as g
    f = g.FORMAT_MXFP4 if fmt == "mxfp4" else g.FORMAT_INT4
    sig = dict(_gemv_signature(f == g.FORMAT_MXFP4), ONE="i32")
    const = {"FORMAT": g.kernel_format(f, rows), "GS": 32 if f == g.FORMAT_MXFP4 else 128, "ROWS": rows, "JT": jt, "BN": bn,
             "HAS_BIAS": False, "EVEN_K": True, "XW": True}
    k = compile_sm90(g._gemv_kernel, sig, const, _DIVISIBLE, warps)
    weights_per_iter = bn * 32 * jt  # BN rows x one chunk of 32 * JT elements, per program
    return k, weights_per_iter / (32 * warps)  # weights per thread per iteration


def mma_gemv_kernel(fmt: str, tiles: int, kw: int, nb: int = 1, prefetch: int = 1, offset: int = 0):
    """The tensor-core GEMV (triton_mma_gemv) for sm_90, and its weights per thread per K step."""
    from specq.kernels import triton_mma_gemv as g
    f = g.FORMAT_MXFP4 if fmt == "mxfp4" else g.FORMAT_INT4
    const = {"FORMAT": g.kernel_format(f, offset), "GS": 32 if f == g.FORMAT_MXFP4 else 128, "TILES": tiles,
             "NB": nb, "KW": kw, "HAS_BIAS": False, "EVEN_K": True, "PREFETCH": prefetch}
    k = compile_sm90(g._mma_gemv_kernel, _gemv_signature(f == g.FORMAT_MXFP4), const, _DIVISIBLE, kw)
    return k, 2 * tiles * 32  # 16 * TILES rows x 128 K per warp step = 2 * TILES rows x 32 K per thread


def w4a4_kernel(block_m: int, block_n: int, warps: int, stages: int, swap: int, levels: bool = False):
    """The W4A4 GEMM (triton_w4a4) for sm_90 at one tile config (per-token scales, groups of 128), and its
    weights per thread per 128-deep K chunk."""
    from specq.kernels import triton_w4a4 as w
    sig = {"q_ptr": "*i8", "sx_ptr": "*fp32", "w_ptr": "*i32", "sw_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
           "M": "i32", "N": "i32", "K": "i32", "K_PER": "i32", "stride_qm": "i32", "stride_sxm": "i32",
           "stride_wn": "i32", "stride_swn": "i32", "stride_ym": "i32", "unit_ptr": "*fp32"}
    if levels:
        sig["sw_ptr"] = "*u8"
    const = {"LEVELS": levels, "WG": 128, "AG": 0, "SUB_K": 128, "N_SUB": 1, "HAS_BIAS": False, "BLOCK_M": block_m,
             "BLOCK_N": block_n, "GROUP_M": 8, "EVEN_K": True, "SWAP": swap, "SPLIT_K": 1}
    divisible = [a for a in sig if a not in ("M", "sx_ptr")]
    k = compile_sm90(w._w4a4_matmul_kernel, sig, const, divisible, warps, stages)
    return k, block_n * 128 / (32 * warps)


def gluon_w4a4_kernel(cfg, levels: bool = False, pdl: bool = False):
    """The pipelined Gluon W4A4 GEMM (gluon_w4a4) for sm_90 at one candidate config (per-token scales, weight
    groups of 128, bias); ``levels``: the integer-level form (uint8 scale levels, ``gluon_w4a4._level_candidates``)."""
    from specq.kernels import gluon_w4a4 as g
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    sig = {"q_desc": f"tensordesc<i8[{bm}, {g.CHUNK_K}],{g.CODES_SMEM!r}>",
           "w_desc": f"tensordesc<i32[{bn}, {g.CHUNK_K // 8}],{g.WORDS_SMEM!r}>",
           "sx_ptr": "*fp32", "sw_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32",
           "K": "i32", "stride_sxm": "i32", "stride_swn": "i32", "stride_ym": "i32", "unit_ptr": "*fp32",
           "ws_ptr": "*i32", "cnt_ptr": "*i32"}
    if levels:
        sig["sw_ptr"] = "*u8"
    const = {"LEVELS": levels, "WG": 128, "NG": 32, "HAS_BIAS": True, "STAGES": cfg["STAGES"], "I2F": cfg["I2F"], "WS": cfg["WS"],
             "num_warps": cfg.num_warps, "SPLIT": cfg["SPLIT"], "PDL": pdl}
    divisible = ["sx_ptr", "sw_ptr", "b_ptr", "y_ptr", "N", "K", "stride_swn", "stride_ym", "unit_ptr", "ws_ptr",
                 "cnt_ptr"]
    return compile_sm90(g._w4a4_wgmma_kernel, sig, const, divisible, cfg.num_warps, maxnreg=g.max_registers(cfg))


def act_loop_kernel(plan, act_group: int = 0, fake: bool = False, order: int = 128, levels: int = 0):
    """The looped activation pre-kernel (triton_act) for sm_90 at one LoopPlan: bf16 x, Hadamard blocks of
    128, chunks of 128."""
    from specq.kernels import triton_act as a
    sig = {"x_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32",
           "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_qm": "i32", "stride_sm": "i32",
           "inv_norm": "fp32", "n_seg": "i32"}
    const = {"CH": 128, "CHP": 128, "SEG": plan.seg, "R": plan.rows, "AG": act_group, "ROTATE": True,
             "FAKE": fake, "DOT_FP32": False, "IEEE": False, "ORDER": order, "STAGES": plan.stages, "LV": levels}
    divisible = ["x_ptr", "h_ptr", "y_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_ym", "stride_qm"]
    return compile_sm90(a._act_loop_kernel, sig, const, divisible, plan.warps)


def _print_top(ops: collections.Counter, top: int) -> None:
    for op, n in ops.most_common(top):
        print(f"  {op:28s} {n:5d}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fmt", default="int4,mxfp4")
    ap.add_argument("--bn", type=int, default=4)
    ap.add_argument("--jt", type=int, default=64)
    ap.add_argument("--warps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--mma", action="store_true", help="the tensor-core GEMV instead (--tiles, --warps, --rows)")
    ap.add_argument("--tiles", type=int, default=2)
    ap.add_argument("--offset", type=int, default=0, help="INT4 offset codes (tensor-core GEMV)")
    ap.add_argument("--w4a4", action="store_true", help="the W4A4 GEMM instead (--bm, --bn, --warps, --stages, --swap)")
    ap.add_argument("--bm", type=int, default=128)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--swap", type=int, default=1)
    ap.add_argument("--gluon", type=int, default=None, metavar="INDEX",
                    help="the Gluon W4A4 GEMM at this candidate instead")
    ap.add_argument("--levels", action="store_true",
                    help="with --w4a4 / --gluon: the integer-level form (uint8 scale levels; --gluon INDEX then "
                         "indexes gluon_w4a4._level_candidates())")
    args = ap.parse_args(argv)
    if args.gluon is not None:
        from specq.kernels import gluon_w4a4 as g
        cfg = (g._level_candidates() if args.levels else g._candidates())[args.gluon]
        k = gluon_w4a4_kernel(cfg, levels=args.levels)
        sass = sass_of(k)
        ops = loop_histogram(sass, "IGMMA", predicated=True)
        # 4 wgmma k-steps per chunk and 128 tokens (the integer-level form takes 256 as two wgmma groups)
        per_chunk = 4 * max(1, cfg["BLOCK_M"] // 128) if args.levels else 4
        chunks = sum(n for op, n in ops.items() if op.startswith("IGMMA")) // per_chunk
        spills = len(re.findall(r"\b(?:STL|LDL)\b", sass))
        print(f"== gluon w4a4 {'level ' if args.levels else ''}candidate {args.gluon} {dict(cfg.meta)} warps={cfg.num_warps}: {registers(k)} registers, "
              f"{spills} spill instructions, K loop of {chunks} chunks: {sum(ops.values()) / max(chunks, 1):.0f} "
              f"instructions and {ops['BAR.SYNC.DEFER_BLOCKING'] / max(chunks, 1):.1f} barriers per chunk")
        _print_top(ops, args.top)
        return 0
    if args.w4a4:
        k, per_thread = w4a4_kernel(args.bm, args.bn, args.warps, args.stages, args.swap, args.levels)
        ops = loop_histogram(sass_of(k), "IGMMA")
        total = sum(ops.values())
        print(f"== w4a4 BLOCK_M={args.bm} BLOCK_N={args.bn} warps={args.warps} stages={args.stages} "
              f"SWAP={args.swap}{' levels' if args.levels else ''}: {registers(k)} registers, {total} loop instructions per 128-deep chunk, "
              f"{per_thread:.0f} weights per thread")
        _print_top(ops, args.top)
        return 0
    for fmt in args.fmt.split(","):
        if args.mma:
            k, per_thread = mma_gemv_kernel(fmt, args.tiles, args.warps, 1 if args.rows <= 8 else 2,
                                            offset=args.offset)
        else:
            k, per_thread = gemv_kernel(fmt, args.bn, args.jt, args.warps, args.rows)
        ops = loop_histogram(sass_of(k))
        total = sum(ops.values())
        what = (f"mma-gemv {fmt} TILES={args.tiles}" if args.mma else f"gemv {fmt} BN={args.bn} JT={args.jt}")
        print(f"== {what} warps={args.warps} rows={args.rows}: "
              f"{total} loop instructions, {per_thread:.0f} weights per thread per iteration, "
              f"{total / per_thread:.2f} instructions per weight")
        for op, n in ops.most_common(args.top):
            print(f"  {op:28s} {n:5d}  {n / per_thread:5.2f}/weight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
