"""Static guards on the 4-bit GEMV's machine code: its K loop for an H100 (sm_90), built on any machine.

The one-token GEMV is bound by instructions per weight (ncu: MXFP4 issues in ~76% of the cycles,
benchmarks/results/gemv_lab_h100.md), so a change that adds a few instructions per weight, or that
loses the 16-byte loads, costs speed that CPU CI can't time. Triton's wheel carries ptxas and nvdisasm,
so benchmarks/sass_report.py compiles the kernel for sm_90 here, with the argument specialisation the
GPU launcher applies, and counts the loop. The budgets are today's counts plus ~3% (2026-12-07:
INT4 3.54, MXFP4 4.68 per weight at one row; 8.12 and 9.06 at four rows).
"""

from __future__ import annotations

import pytest
import torch


# (format, rows of x, instructions per weight in the K loop at most)
BUDGETS = [("int4", 1, 3.65), ("mxfp4", 1, 4.8), ("int4", 4, 8.35), ("mxfp4", 4, 9.3)]


@pytest.mark.parametrize("fmt,rows,budget", BUDGETS, ids=[f"{f}-rows{r}" for f, r, _ in BUDGETS])
def test_gemv_k_loop_stays_within_its_instruction_budget(sass_report, fmt, rows, budget):
    sr = sass_report
    kernel, weights_per_thread = sr.gemv_kernel(fmt, bn=4, jt=64, warps=2, rows=rows)
    ops = sr.loop_histogram(sr.sass_of(kernel))
    per_weight = sum(ops.values()) / weights_per_thread
    assert per_weight <= budget, f"{fmt} rows={rows}: {per_weight:.2f} instructions per weight > {budget}: {ops}"
    # 16-byte loads: one per weight row (4 words) and four per row of x (32 bf16 as int32 words),
    # plus one scale per weight row; per-element loads (after losing the launcher's alignment, say)
    # would be 32 per row of x
    assert ops["LDG.E.128"] >= 4 + 4 * rows, ops
    loads = sum(n for op, n in ops.items() if op.startswith("LDG"))
    assert loads <= 8 + 4 * rows, (loads, ops)
    if fmt == "mxfp4":
        # one conversion per weight: the fp16 -> fp32 conversion reads the halves in place
        assert ops["HADD2.F32"] == weights_per_thread, ops
        if rows == 1:  # (more rows convert more x values, some with PRMT)
            # the int16-cast form it replaced cost 0.71 PRMT per weight regrouping halves
            assert ops["PRMT"] / weights_per_thread <= 0.3, ops


# Tensor-core GEMV (triton_mma_gemv): (format, 16-row tiles per program, rows of x, INT4 offset codes, budget)
MMA_BUDGETS = [("int4", 2, 1, 0, 2.5), ("int4", 2, 1, 1, 2.2), ("mxfp4", 2, 1, 0, 3.5), ("int4", 2, 16, 1, 2.87),
               ("mxfp4", 2, 16, 0, 4.3)]


@pytest.mark.parametrize("fmt,tiles,rows,offset,budget", MMA_BUDGETS,
                         ids=[f"{f}-tiles{t}-rows{r}-offset{o}" for f, t, r, o, _ in MMA_BUDGETS])
def test_mma_gemv_k_loop_decodes_into_registers(sass_report, fmt, tiles, rows, offset, budget):
    """The weights go from the 16-byte loads through the decode into the MMA's registers: no shared
    memory in the K loop (Triton's tl.dot path stores and reloads every decoded tile), one HMMA per
    16 x 8 x 16 block, and the instruction count per weight within its budget (2026-12-07 + ~3%)."""
    sr = sass_report
    nb = 1 if rows <= 8 else 2
    kernel, weights_per_thread = sr.mma_gemv_kernel(fmt, tiles, kw=4, nb=nb, offset=offset)
    ops = sr.loop_histogram(sr.sass_of(kernel))
    assert not [op for op in ops if op.startswith(("STS", "LDS", "BAR"))], ops
    # per thread and step: 2 * TILES rows x 4 words, each word two MMAs per x tile (+ the offset sums)
    mmas = 2 * tiles * 4 * nb + (8 * nb if offset else 0)
    assert ops["HMMA.16816.F32.BF16"] == mmas, ops
    assert ops["LDG.E.128"] == 2 * tiles + 4 * nb, ops
    per_weight = sum(ops.values()) / weights_per_thread
    assert per_weight <= budget, f"{fmt}: {per_weight:.2f} instructions per weight > {budget}: {ops}"


# W4A4 GEMM (triton_w4a4), SWAP tiles: (BLOCK_M, BLOCK_N, warps, stages, loop instructions per thread per
# 128-deep chunk at most, registers at most). 2026-12-07: 303 and 315 instructions (446 before the word-order
# decode); the 64 x 128 tile of 4 warps (the autotuner's pick on the H100) must stay at <= 208 registers
# without spills so that two programs share an SM, the 64 x 64 tile of 4 warps at <= 128 (four per SM).
W4A4_BUDGETS = [(128, 128, 8, 3, 312, 255), (128, 64, 4, 4, 324, 208), (64, 64, 4, 3, 216, 128)]


@pytest.mark.parametrize("bm,bn,warps,stages,budget,max_regs", W4A4_BUDGETS,
                         ids=[f"{bm}x{bn}-w{w}" for bm, bn, w, *_ in W4A4_BUDGETS])
def test_w4a4_k_loop_decodes_three_instructions_per_word(sass_report, bm, bn, warps, stages, budget, max_regs):
    sr = sass_report
    kernel, weights_per_thread = sr.w4a4_kernel(bm, bn, warps, stages, swap=1)
    ops = sr.loop_histogram(sr.sass_of(kernel))
    total = sum(ops.values())
    assert total <= budget, f"{total} loop instructions > {budget}: {ops}"
    assert ops["IGMMA.64"] == 4, ops  # one int8 wgmma per 32 of K, per warpgroup
    # the decode: one shift and two LOP3 per word of 8 weights, no sign extension or byte packing
    words = weights_per_thread / 8
    assert ops["LOP3.LUT"] <= 2 * words + 2, ops
    assert ops["SGXT"] == 0 and ops["PRMT"] <= 2, ops
    assert not any(op.startswith(("LDL", "STL")) for op in ops), f"spills: {ops}"
    assert sr.registers(kernel) <= max_regs


# The same K loop with scale levels (weights decoded as q * level, one int32 sum over K): (tile, budget,
# registers at most). 2026-12-07: 156-168 instructions and 96-134 registers, against 303-315 and 124-205
# for the rescaling loop: the per-chunk conversion and FMA are gone, the decode costs two IMAD and a LOP3
# per word more.
W4A4_LEVEL_BUDGETS = [(128, 128, 8, 3, 165, 140), (128, 64, 4, 4, 175, 140), (64, 64, 4, 3, 165, 104)]


@pytest.mark.parametrize("bm,bn,warps,stages,budget,max_regs", W4A4_LEVEL_BUDGETS,
                         ids=[f"{bm}x{bn}-w{w}" for bm, bn, w, *_ in W4A4_LEVEL_BUDGETS])
def test_w4a4_level_k_loop_has_no_rescale(sass_report, bm, bn, warps, stages, budget, max_regs):
    sr = sass_report
    kernel, weights_per_thread = sr.w4a4_kernel(bm, bn, warps, stages, swap=1, levels=True)
    ops = sr.loop_histogram(sr.sass_of(kernel))
    total = sum(ops.values())
    assert total <= budget, f"{total} loop instructions > {budget}: {ops}"
    assert ops["IGMMA.64"] == 4, ops
    assert not any(op.startswith(("I2F", "FADD", "FFMA", "FMUL")) for op in ops), f"float math in the loop: {ops}"
    words = weights_per_thread / 8
    assert ops["IMAD"] >= 2 * words, ops  # the multiply-add per four weights
    assert not any(op.startswith(("LDL", "STL")) for op in ops), f"spills: {ops}"
    assert sr.registers(kernel) <= max_regs


@pytest.mark.parametrize("pdl", [True, False])
def test_pre_kernel_lets_the_gemm_launch_first_thing_under_pdl(sass_report, pdl):
    """With PDL (codes for the Gluon GEMM on Hopper) the persistent pre-kernel's first instructions include
    griddepcontrol.launch_dependents (PREEXIT), so the GEMM's prologue overlaps this grid; without, none."""
    from specq.kernels import triton_act as a
    sass = _act_whole_rows_sass(sass_report, 0, 0, pdl)
    ops = sass_report.instructions(sass)
    where = [i for i, op in enumerate(ops) if op == "PREEXIT"]
    assert where == ([where[0]] if pdl else []) and (not pdl or where[0] < 8), where
    assert not a._feeds_pdl_gemm(torch.zeros(2, 128), 128, False)  # a CPU tensor never


def _act_whole_rows_sass(sass_report, act_group: int, levels: int, pdl: bool = False) -> str:
    """The persistent whole-row pre-kernel for sm_90: two rows of K = 4096 per block, 8 warps, codes in the
    Gluon GEMM's K order."""
    from specq.kernels import triton_act as a
    sig = {"x_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "M": "i32",
           "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_qm": "i32", "stride_sm": "i32",
           "inv_norm": "fp32"}
    const = {"CH": 128, "CHP": 128, "NP": 32, "R": 2, "AG": act_group, "ROTATE": True, "FAKE": False,
             "DOT_FP32": False, "IEEE": False, "ORDER": 128, "STAGES": 2, "LV": levels, "PDL": pdl}
    div = ["x_ptr", "h_ptr", "y_ptr", "q_ptr", "s_ptr", "K", "stride_xm", "stride_ym", "stride_qm"]
    return sass_report.sass_of(sass_report.compile_sm90(a._act_persistent_kernel, sig, const, div, 8))


@pytest.mark.parametrize("act_group,levels,budget", [(0, 0, 14.5), (32, 16, 26.0)])
def test_pre_kernel_instructions_per_element(sass_report, act_group, levels, budget):
    """The whole-row pre-kernel's loop (one block of 2 x 4096 elements, 32 per thread): per token 13.6 SASS
    instructions per element (reciprocal multiply, rint folded into the conversion, no clamp), groups of 32
    with 16 levels 24.8 (the token amax from the group amaxes) on 2026-12-08; the budgets leave a little room."""
    ops = sass_report.loop_histogram(_act_whole_rows_sass(sass_report, act_group, levels), "HGMMA")
    per_element = sum(ops.values()) / (2 * 4096 / 256)
    assert per_element <= budget, (per_element, ops.most_common(12))
