"""W4A4 GEMM for Hopper in Gluon: the INT8 wgmma kept in flight while the next chunk's weights decode.

The Triton kernel (``triton_w4a4``) leaves each chunk's serial chain to the compiler: load, decode,
store, wgmma, *wait*, rescale; Triton 3.6 waits for every int32 wgmma at once, so within one program
nothing overlaps the tensor cores (~820 SM cycles per 128 x 128 x 128 chunk-tile where the MMA needs
256 and the instructions ~315). Gluon (Triton's tile-level language with explicit layouts, shared memory,
barriers and async wgmma) lets this kernel order the work itself. Per 128-deep chunk i:

1. wait for chunk i's TMA copies (activation codes [BLOCK_M, BK] and packed weights [BLOCK_N, BK/8] in a
   ring of STAGES slots);
2. decode its weights (three instructions per eight, ``triton_w4a4._decode_words``'s trick) from shared
   memory *straight into the wgmma's A-operand registers* (``_decode_chunk``): no store, fence or barrier
   between the decode and the MMA. That works because the activation codes come in a K order made for it
   (``triton_w4a4.to_wgmma_order``, written by the pre-kernel with ORDER 128);
3. issue chunk i's wgmma (A: those registers, B: the activation codes in shared memory) into one of two
   int32 register sets and *don't wait for it*;
4. wait for chunk i-1's wgmma only (``warpgroup_mma_wait(1)``), rescale its int32 result into the fp32
   accumulator by the weight group's scales (held in shared memory for the tile's whole K), and refill its
   ring slot with chunk i-1+STAGES.

So chunk i's tensor work runs under chunk i+1's decode and chunk i-1's rescale. No wgmma stays in flight
across the loop's back edge (ptxas would then serialize them all): an iteration runs four chunks and
drains. The tile is the transposed output (weight rows x tokens, as triton_w4a4's SWAP): wgmma's M side
is 64 rows per warpgroup, its N side the tokens.

Status (2026-12-07, H100, ``benchmarks/kernels.py`` with CUDA graphs): the first version, whose decoded
weights went through shared memory as the wgmma's A operand, ran at 0.98-1.17x bf16 on the 8B shapes at
M = 256 / 1024, no better than triton_w4a4 (``benchmarks/results/kernels_wgmma_smem_a_h100.md``): per
chunk-tile its shared memory carried ~56 KB (TMA writes, the decoded tile's store and the wgmma's reads of
both operands), above what the SM's 128 B/clk serve in the MMA's 256 cycles. This version (A decoded into
registers) runs at 1.22-1.60x bf16 there, where triton_w4a4 runs at 0.95-1.08x
(``benchmarks/results/kernels_wgmma_rega_h100.md``), so the op uses it by default (``ENABLED``;
SPECQ_W4A4_GLUON=0 turns it off). Warp-specialized configs (WS: a copy warp issues the TMA copies, the MMA
warps hand each ring slot back through an "empty" mbarrier) cut the loop's barriers from 4 to 2 per chunk and
its instructions from 215 to 174 but were no faster (``benchmarks/results/wgmma_ws_h100.md``: barrier stalls
were 0.19 of 4.15 cycles per issued instruction); they stay candidates, picked at 14336 x 4096, M = 1024.

Integer-level form (``LEVELS``; W4A4 scale levels, ``int4.snap_scales``): the weight scales are integer levels of
one unit per row, so chunk i decodes q * level (``_decode_words_scaled``) and its wgmma adds into the single
int32 accumulator that every chunk shares (``_levels_loop``): no conversion or FMA per chunk, no result read
before the end, half the registers (130 instead of 254 on the 128 x 64 tile), so 256-token tiles fit (two
wgmmas of 128 per decoded chunk, ``_levels_loop_pair``). On the H100 (2026-12-07,
``benchmarks/results/kernels_levels_h100.md``) the GEMM runs at 1.87x bf16 at 4096 x 4096, M = 1024 (27.5 us; the
rescaling form 41.5) and 1.59-1.78x on the larger 8B shapes (1.16x at 4096 x 4096, M = 256). Gluon kernels don't run in Triton's
interpreter; CPU CI compiles every candidate for sm_90 and checks the SASS and the K order's math; the GPU tests
(``tests/test_gluon_w4a4.py``) check it against float64 and the Triton kernel, and ``benchmarks/wgmma_quick.py``
checks and times it in one short call.

Split-K (``SPLIT``; candidates timed only with SPECQ_W4A4_SPLIT=1 until a GPU has run them): SPLIT programs per
tile each sum a share of K's chunks and store their partial; a counter per tile (acq_rel atomic after a CTA
barrier) tells the last one, which adds the partials in split order and stores the output. For shapes whose tiles
leave SMs idle (K = 14336, N = 4096, M = 256: 64 tiles) or read the codes too often from L2 (4096 x 4096, M = 256).
PDL (SPECQ_PDL=1, also untested on a GPU): the kernel waits for the pre-kernel's grid only after its weight-only
prologue, so its launch and prologue overlap the pre-kernel's tail.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton

try:  # Gluon ships with Triton >= 3.5; without it the Triton kernel serves every shape
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

from specq.kernels.triton_common import INTERPRET, PDL_ENABLED, Config, ConfigCache, m_bucket, next_pow2
from specq.kernels.triton_w4a4 import DECODE_ASM

CHUNK_K = 128  # K per chunk: one int32 wgmma result, rescaled once; divides the weight (and activation) groups

if HAVE_GLUON:
    BK = gl.constexpr(CHUNK_K)
    # the TMA tiles' shared-memory layouts: activation codes [BLOCK_M, BK] in 128-byte swizzled rows (the
    # wgmma's B operand), packed words [BLOCK_N, BK / 8] plain (read by 16-byte loads, see _words_layout)
    CODES_SMEM = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8)
    WORDS_SMEM = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32)

    @gluon.jit
    def _decode_words(pw):
        """int32 words of eight codes (q + 8) -> (lo, hi) int32 words of four int8 ``16 q`` each: the even
        codes (k0 k2 k4 k6) and the odd ones (k1 k3 k5 k7), one LOP3 (and one shift) each."""
        return gl.inline_asm_elementwise(DECODE_ASM, "=r,=r,r", [pw], dtype=(gl.int32, gl.int32), is_pure=True,
                                         pack=1)

    @gluon.jit
    def _decode_words_scaled(pw, lv):
        """int32 words of eight codes n = q + 8 and their rows' scale levels lv (int32 [rows, 1], 0..16) ->
        (lo, hi) int32 words of four int8 ``q * lv`` each, even and odd codes as ``_decode_words``: masked into
        bytes, one multiply-add makes each byte q * lv + 128 (0..240: no carry into the next byte), and flipping
        the top bits makes them the int8 q * lv (``triton_w4a4._decode_words_scaled``)."""
        c = (128 - 8 * lv) * 0x01010101
        lo = ((pw & 0x0F0F0F0F) * lv + c) ^ -2139062144  # ^ 0x80808080
        hi = (((pw >> 4) & 0x0F0F0F0F) * lv + c) ^ -2139062144
        return lo, hi

    @gluon.constexpr_function
    def _words_layout(num_warps):
        """The packed words [16 * num_warps, BK / 8] as DOT_A wants them (see ``_decode_chunk``): registers hold
        4 consecutive words and the row 8 below; lanes t = 0..3 take words 4t.., lanes / 4 rows 0..7; warps
        rows of 16 (the wgmma's m64 per warpgroup)."""
        warps = [[16 << w, 0] for w in range(num_warps.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]],
                                          lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]], warp_bases=warps,
                                          block_bases=[], shape=[16 * num_warps, BK // 8])

    @gluon.jit
    def _decode_chunk(i, w_smem, ready, STAGES: gl.constexpr, WORDS: gl.constexpr, DOT_A: gl.constexpr,
                      BLOCK_N: gl.constexpr):
        """Wait for chunk i's copies and decode its packed weights straight into the wgmma's A-operand
        registers: int8 [BLOCK_N, BK] in DOT_A. Thread (lane t) holds words 4t..4t+3 of its rows (one 16-byte
        load per row); word 4t + s gives the bytes of K step s at logical K 32s + 4t (its even codes, ``lo``)
        and 32s + 16 + 4t (its odd codes, ``hi``), which is where DOT_A keeps them: the activation codes come
        in that order (``triton_w4a4.to_wgmma_order``), and no data moves between threads."""
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        lo, hi = _decode_words(w_smem.index(s).load(WORDS))
        return _to_operand(lo, hi, DOT_A, BLOCK_N)

    @gluon.jit
    def _decode_chunk_levels(i, w_smem, lv, ready, STAGES: gl.constexpr, WORDS: gl.constexpr, DOT_A: gl.constexpr,
                             BLOCK_N: gl.constexpr):
        """``_decode_chunk`` with scale levels (lv: int32 [BLOCK_N, 1] in WORDS, the chunk's group): the A
        operand holds q * level."""
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        lo, hi = _decode_words_scaled(w_smem.index(s).load(WORDS), lv)
        return _to_operand(lo, hi, DOT_A, BLOCK_N)

    @gluon.jit
    def _to_operand(lo, hi, DOT_A: gl.constexpr, BLOCK_N: gl.constexpr):
        """Decoded words (lo, hi: int32 [BLOCK_N, 16] in WORDS) -> the wgmma's int8 A operand [BLOCK_N, BK]."""
        # [rows, word 4t + s] -> [rows, s, h, t] (h: lo / hi), then each word's four bytes along K
        x = gl.permute(gl.join(gl.reshape(lo, [BLOCK_N, 4, 4]), gl.reshape(hi, [BLOCK_N, 4, 4])), [0, 2, 3, 1])
        x = gl.join(x, x)
        x = gl.reshape(gl.join(x, x), [BLOCK_N, BK])
        # int32 word -> its four int8 bytes, in place (the asm takes four copies of the word, keeps one)
        b = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [x], dtype=gl.int8, is_pure=True, pack=4)
        return gl.convert_layout(b, DOT_A, assert_trivial=True)

    @gluon.jit
    def _load_chunk(j, q_desc, w_desc, q_smem, w_smem, ready, off_m, off_n, n_chunks, c0, STAGES: gl.constexpr):
        """TMA copies of the program's chunk j (chunk c0 + j of K: a split-K program starts at c0) into ring slot
        j % STAGES; none past its last chunk."""
        s = j % STAGES
        pred = j < n_chunks
        mbarrier.expect(ready.index(s), q_desc.block_type.nbytes + w_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(q_desc, [off_m, (c0 + j) * BK], ready.index(s), q_smem.index(s), pred=pred)
        tma.async_copy_global_to_shared(w_desc, [off_n, (c0 + j) * (BK // 8)], ready.index(s), w_smem.index(s),
                                        pred=pred)

    @gluon.jit
    def _w4a4_wgmma_kernel(
        q_desc, w_desc, sx_ptr, sw_ptr, b_ptr, y_ptr,
        M, N, K, stride_sxm, stride_swn, stride_ym,
        unit_ptr,             # LEVELS: fp32 units [N] (else unused)
        ws_ptr, cnt_ptr,      # SPLIT > 1: int32 partial sums [SPLIT, tiles, BLOCK_N * BLOCK_M], arrival counters
        LEVELS: gl.constexpr,  # sw_ptr holds uint8 scale levels [N, K / WG]: one int32 sum over K, no rescale
        WG: gl.constexpr,     # weight group size along K (a multiple of BK)
        NG: gl.constexpr,     # weight groups held in shared memory: a power of two >= K / WG
        HAS_BIAS: gl.constexpr,
        STAGES: gl.constexpr,
        I2F: gl.constexpr,    # int32 -> fp32 by the conversion instruction (else the magic-number trick)
        WS: gl.constexpr,     # warp-specialized: a copy warp issues the copies (else the MMA warps do)
        num_warps: gl.constexpr,
        SPLIT: gl.constexpr = 1,  # split-K: programs per tile, each summing a contiguous share of K's chunks
        PDL: gl.constexpr = False,  # launched with programmatic dependent launch: wait for the codes' writer
    ):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]  # tokens: the wgmma's N
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]  # weight rows: the wgmma's M, 64 per warpgroup
        KW: gl.constexpr = BK // 8

        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
        n_tiles = num_pid_m * ((N + BLOCK_N - 1) // BLOCK_N)
        pid = gl.program_id(0)
        all_chunks = (K + BK - 1) // BK
        if SPLIT > 1:  # program pid sums chunks [c0, c0 + n_chunks) of tile pid % n_tiles
            tile_id = pid % n_tiles
            split = pid // n_tiles
            per_split = (all_chunks + SPLIT - 1) // SPLIT
            c0 = split * per_split
            n_chunks = gl.maximum(gl.minimum(per_split, all_chunks - c0), 0)  # 0 if K has too few chunks
        else:  # constants: no registers for them (the warp-specialized configs are at their cap)
            tile_id = pid
            split = 0
            c0 = 0
            n_chunks = all_chunks
        pid_m = tile_id % num_pid_m  # neighbouring programs share a weight tile (read once from L2)
        pid_n = tile_id // num_pid_m
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        q_smem = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BK], q_desc.layout)
        w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, KW], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        # The tile's weight scales, all of K, go to shared memory once: a global load in the K loop would
        # still be in flight at the next chunk's proxy fence, which waits for it (a full L2 round trip)
        sw_smem = gl.allocate_shared_memory(sw_ptr.dtype.element_ty, [NG, BLOCK_N],
                                            gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        SWL: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, num_warps], [0, 1])  # lanes along K: coalesced
        SW_PART: gl.constexpr = 32 if NG > 32 else NG
        n_groups = (K + WG - 1) // WG
        sn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, SWL))
        for c in gl.static_range(NG // SW_PART):
            sg = c * SW_PART + gl.arange(0, SW_PART, layout=gl.SliceLayout(1, SWL))
            part = gl.load(sw_ptr + sn[None, :] * stride_swn + sg[:, None],
                           mask=(sn < N)[None, :] & (sg < n_groups)[:, None], other=0)
            sw_smem.slice(c * SW_PART, SW_PART).store(part)
        gl.thread_barrier()
        # read back a group (row) at a time: the same bytes seen as rows of a one-dimensional layout
        sw_smem = sw_smem._reinterpret(sw_ptr.dtype.element_ty, [NG, BLOCK_N],
                                       gl.SwizzledSharedLayout(1, 1, 1, order=[0]))

        out = (sx_ptr, b_ptr, y_ptr, unit_ptr, M, N, stride_sxm, stride_ym)
        red = (ws_ptr, cnt_ptr, tile_id, split, n_tiles)
        tile = (q_desc, w_desc, q_smem, ready, off_m, n_chunks, c0)
        # Everything above reads only weights; from here on the codes and token scales of the kernel before
        # (the pre-kernel, which let this grid launch early) are read, and global memory is written.
        if PDL:
            _wait_for_the_grid_before()
        if WS == 0:
            for j in gl.static_range(STAGES):
                _load_chunk(j, q_desc, w_desc, q_smem, w_smem, ready, off_m, off_n, n_chunks, c0, STAGES)
            # no "empty" barriers: the MMA warps refill the slots themselves (``ready`` fills the unused argument)
            _mma_tile(tile, ready, w_smem, sw_smem, off_n, out, red, WG, STAGES, I2F, HAS_BIAS, BLOCK_M, BLOCK_N, WS,
                      LEVELS, SPLIT, num_warps)
        else:
            # a slot is free again once the MMA warps are done with it (their arrive on ``empty``)
            empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
            for s in gl.static_range(STAGES):
                mbarrier.init(empty.index(s), count=1)
            gl.warp_specialize([
                (_mma_tile, (tile, empty, w_smem, sw_smem, off_n, out, red, WG, STAGES, I2F, HAS_BIAS, BLOCK_M,
                             BLOCK_N, WS, LEVELS, 1, num_warps)),
                (_copy_loop, (q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, c0, STAGES))],
                [1], [24])
            for s in gl.static_range(STAGES):
                mbarrier.invalidate(empty.index(s))
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(s))

    @gluon.jit
    def _wait_for_the_grid_before():
        """griddepcontrol.wait: block until the grid this one depends on (PDL) has completed and its memory is
        visible (at once without PDL)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _mma_tile(tile, empty, w_smem, sw_smem, off_n, out, red, WG: gl.constexpr, STAGES: gl.constexpr,
                  I2F: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  WS: gl.constexpr, LEVELS: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
        """The MMA warps' work on the tile: the K loop, then the scaled, biased output stored. The integer-level
        form takes up to 256 tokens as two wgmmas of 128 (the widest int8 wgmma Triton emits) per decoded chunk.
        Split-K (SPLIT > 1): each program sums its share of K; the last of a tile's programs to finish adds the
        others' sums to its own (``_split_total``) and stores the output."""
        q_desc, w_desc, q_smem, ready, off_m, n_chunks, c0 = tile
        sx_ptr, b_ptr, y_ptr, unit_ptr, M, N, stride_sxm, stride_ym = out
        TOK: gl.constexpr = BLOCK_M if BLOCK_M <= 128 else 128  # tokens per wgmma
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, TOK, 32])
        ROWS: gl.constexpr = gl.SliceLayout(1, MMA)  # per weight row (n)
        DOT_A: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=4)
        WORDS: gl.constexpr = _words_layout(num_warps)
        ctx = (q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0)
        rn = off_n + gl.arange(0, BLOCK_N, layout=ROWS)
        if LEVELS:
            unit = gl.load(unit_ptr + rn, mask=rn < N, other=0.0)
            if BLOCK_M > 128:
                acc0, acc1 = _levels_loop_pair(ctx, sw_smem, WG, STAGES, WORDS, BLOCK_N, TOK, DOT_A, MMA)
                _keep_partial(acc0, red, 0, 2, SPLIT, MMA)
                _keep_partial(acc1, red, 1, 2, SPLIT, MMA)
                if _last_of_tile(red, SPLIT):
                    acc0 = _split_total(acc0, red, 0, 2, SPLIT, MMA)
                    acc1 = _split_total(acc1, red, 1, 2, SPLIT, MMA)
                    _epilogue(acc0.to(gl.float32) * unit[:, None], off_m, off_n, out, 1.0, HAS_BIAS, MMA, num_warps)
                    _epilogue(acc1.to(gl.float32) * unit[:, None], off_m + TOK, off_n, out, 1.0, HAS_BIAS, MMA,
                              num_warps)
            else:
                acc = _levels_loop(ctx, sw_smem, WG, STAGES, WORDS, BLOCK_N, TOK, DOT_A, MMA)
                _keep_partial(acc, red, 0, 1, SPLIT, MMA)
                if _last_of_tile(red, SPLIT):
                    acc = _split_total(acc, red, 0, 1, SPLIT, MMA)
                    _epilogue(acc.to(gl.float32) * unit[:, None], off_m, off_n, out, 1.0, HAS_BIAS, MMA, num_warps)
        else:
            acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=MMA)
            acc = _mma_loop(acc, ctx, sw_smem, ROWS, WG, STAGES, WORDS, BLOCK_N, DOT_A, WS)
            _keep_partial(acc, red, 0, 1, SPLIT, MMA)
            if _last_of_tile(red, SPLIT):
                acc = _split_total(acc, red, 0, 1, SPLIT, MMA)
                # the decoded weights were 16 q: the exact 1/16 joins the per-token scale
                _epilogue(acc, off_m, off_n, out, 0.0625, HAS_BIAS, MMA, num_warps)

    @gluon.jit
    def _partial_offsets(red, split, part, PARTS: gl.constexpr, MMA: gl.constexpr, BLOCK_N: gl.constexpr,
                         TOK: gl.constexpr):
        """Where program ``split``'s sum of part ``part`` (of PARTS: token halves of a 256-token tile) of this
        tile lies in the workspace, element for element in the accumulator's own layout (no shuffle: the
        program that reads it back holds the same elements)."""
        ws_ptr, cnt_ptr, tile_id, _, n_tiles = red
        base = ((split * n_tiles + tile_id) * PARTS + part) * (BLOCK_N * TOK)
        rn = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        rm = gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
        return ws_ptr + base + rn[:, None] * TOK + rm[None, :]

    @gluon.jit
    def _keep_partial(acc, red, part, PARTS: gl.constexpr, SPLIT: gl.constexpr, MMA: gl.constexpr):
        """Split-K: store this program's sum (int32, or fp32 as its bits) for the tile's last program."""
        if SPLIT > 1:
            ws_ptr, cnt_ptr, tile_id, split, n_tiles = red
            ptrs = _partial_offsets(red, split, part, PARTS, MMA, acc.shape[0], acc.shape[1])
            gl.store(ptrs, acc.to(gl.int32, bitcast=True) if acc.dtype == gl.float32 else acc)

    @gluon.jit
    def _last_of_tile(red, SPLIT: gl.constexpr):
        """Whether this program stores the tile (always, without split-K): the tile's programs each count
        themselves in on its counter once their sums are stored (a CTA barrier, then one acq_rel atomic: the
        release that publishes every thread's stores); the one that sees SPLIT - 1 others is last, and its
        acquire makes their sums visible to it. It puts the counter back to 0 for the next launch."""
        last = True
        if SPLIT > 1:
            ws_ptr, cnt_ptr, tile_id, split, n_tiles = red
            gl.thread_barrier()
            last = gl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel", scope="gpu") == SPLIT - 1
            if last:
                gl.atomic_xchg(cnt_ptr + tile_id, 0, sem="relaxed", scope="gpu")
        return last

    @gluon.jit
    def _split_total(acc, red, part, PARTS: gl.constexpr, SPLIT: gl.constexpr, MMA: gl.constexpr):
        """The tile's sum over all its programs, added in split order (the same fp32 rounding whichever program
        is last; int32 sums are exact). The workspace is read past L1 (.cg): other SMs wrote it."""
        if SPLIT > 1:
            total = gl.zeros_like(acc)
            for s in range(SPLIT):  # a loop, not unrolled: one partial's registers at a time
                bits = gl.load(_partial_offsets(red, s, part, PARTS, MMA, acc.shape[0], acc.shape[1]),
                               cache_modifier=".cg")
                total = total + (bits.to(gl.float32, bitcast=True) if acc.dtype == gl.float32 else bits)
            acc = total
        return acc

    @gluon.jit
    def _epilogue(acc, off_m, off_n, out, SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, MMA: gl.constexpr,
                  num_warps: gl.constexpr):
        """acc [rows, tokens] (weight rows from off_n, tokens from off_m) times the tokens' scales and SCALE,
        plus the bias, stored into y[m, n]."""
        sx_ptr, b_ptr, y_ptr, unit_ptr, M, N, stride_sxm, stride_ym = out
        BLOCK_N: gl.constexpr = acc.shape[0]
        TOK: gl.constexpr = acc.shape[1]
        rn = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        rm = off_m + gl.arange(0, TOK, layout=gl.SliceLayout(0, MMA))
        acc = acc * (gl.load(sx_ptr + rm * stride_sxm, mask=rm < M, other=0.0) * SCALE)[None, :]
        if HAS_BIAS:
            acc = acc + gl.load(b_ptr + rn, mask=rn < N, other=0.0).to(gl.float32)[:, None]
        # store y[m, n] with n fastest: 16-byte stores along each output row
        OUT: gl.constexpr = gl.BlockedLayout([8, 1], [BLOCK_N // 8, 32 // (BLOCK_N // 8)], [1, num_warps], [0, 1])
        res = gl.convert_layout(acc.to(y_ptr.dtype.element_ty), OUT)
        on = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT))
        om = off_m + gl.arange(0, TOK, layout=gl.SliceLayout(0, OUT))
        gl.store(y_ptr + om[None, :] * stride_ym + on[:, None], res, mask=(on < N)[:, None] & (om < M)[None, :])

    @gluon.jit
    def _mma_loop(acc, ctx, sw_smem, ROWS: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
                  WORDS: gl.constexpr, BLOCK_N: gl.constexpr, DOT_A: gl.constexpr, WS: gl.constexpr):
        """The K loop of the MMA warps: acc + the tile's scaled int32 products over all chunks."""
        q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0 = ctx
        # Two register sets hold the int32 wgmma results, in turn: a wgmma zero-starts (use_acc=False) in the
        # registers of the result before last. No wgmma is in flight across the loop's back edge: the copy that
        # would carry its registers around makes ptxas serialize every wgmma (C7514). So an iteration runs four
        # chunks (each one's wgmma under the next one's decode and the last one's rescale) and drains.
        fa = gl.zeros_like(acc, dtype=gl.int32)
        fb = gl.zeros_like(acc, dtype=gl.int32)
        n_main = n_chunks - n_chunks % 4
        for base in range(0, n_main, 4):
            tok0, sw0 = _issue(base, fa, ctx, sw_smem, ROWS, WG, STAGES, WORDS, BLOCK_N, DOT_A)
            tok1, sw1 = _issue(base + 1, fb, ctx, sw_smem, ROWS, WG, STAGES, WORDS, BLOCK_N, DOT_A)
            acc, fa = _finish(base, tok0, sw0, acc, 1, ctx, STAGES, WS)
            tok2, sw2 = _issue(base + 2, fa, ctx, sw_smem, ROWS, WG, STAGES, WORDS, BLOCK_N, DOT_A)
            acc, fb = _finish(base + 1, tok1, sw1, acc, 1, ctx, STAGES, WS)
            tok3, sw3 = _issue(base + 3, fb, ctx, sw_smem, ROWS, WG, STAGES, WORDS, BLOCK_N, DOT_A)
            acc, fa = _finish(base + 2, tok2, sw2, acc, 1, ctx, STAGES, WS)
            acc, fb = _finish(base + 3, tok3, sw3, acc, 0, ctx, STAGES, WS)
        for i in range(n_main, n_chunks):  # the last n_chunks % 4, one at a time
            tok0, sw0 = _issue(i, fa, ctx, sw_smem, ROWS, WG, STAGES, WORDS, BLOCK_N, DOT_A)
            acc, fa = _finish(i, tok0, sw0, acc, 0, ctx, STAGES, WS)
        return acc

    @gluon.jit
    def _levels_loop(ctx, lv_smem, WG: gl.constexpr, STAGES: gl.constexpr, WORDS: gl.constexpr,
                     BLOCK_N: gl.constexpr, TOK: gl.constexpr, DOT_A: gl.constexpr, MMA: gl.constexpr):
        """The K loop with scale levels: every chunk's wgmma adds q * level times the codes into one int32
        accumulator, so no result is read until the end. A chunk's wgmma runs under the next chunk's decode;
        once it is done (the wait leaves one wgmma, the newest, in flight) its A registers and ring slot are
        free, and the slot is refilled. Same ring and prologue as the rescaling loop (single partition)."""
        q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0 = ctx
        acc = gl.zeros([BLOCK_N, TOK], gl.int32, layout=MMA)
        for i in range(n_chunks):
            a_op = _decode_chunk_levels(i, w_smem, _chunk_levels(c0 + i, lv_smem, WG, WORDS), ready, STAGES, WORDS,
                                        DOT_A, BLOCK_N)
            acc = warpgroup_mma(a_op, q_smem.index(i % STAGES).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            _refill_previous(i, ctx, STAGES)
        return warpgroup_mma_wait(0, deps=(acc, ))

    @gluon.jit
    def _levels_loop_pair(ctx, lv_smem, WG: gl.constexpr, STAGES: gl.constexpr, WORDS: gl.constexpr,
                          BLOCK_N: gl.constexpr, TOK: gl.constexpr, DOT_A: gl.constexpr, MMA: gl.constexpr):
        """``_levels_loop`` for 2 * TOK tokens: each decoded chunk feeds two wgmmas (the ring slot's first and
        second TOK rows of codes) into two accumulators; the wait leaves the newest two in flight."""
        q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0 = ctx
        acc0 = gl.zeros([BLOCK_N, TOK], gl.int32, layout=MMA)
        acc1 = gl.zeros([BLOCK_N, TOK], gl.int32, layout=MMA)
        for i in range(n_chunks):
            a_op = _decode_chunk_levels(i, w_smem, _chunk_levels(c0 + i, lv_smem, WG, WORDS), ready, STAGES, WORDS,
                                        DOT_A, BLOCK_N)
            codes = q_smem.index(i % STAGES)
            acc0 = warpgroup_mma(a_op, codes.slice(0, TOK).permute((1, 0)), acc0, is_async=True)
            acc1 = warpgroup_mma(a_op, codes.slice(TOK, TOK).permute((1, 0)), acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))
            _refill_previous(i, ctx, STAGES)
        acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        return acc0, acc1

    @gluon.jit
    def _chunk_levels(i, lv_smem, WG: gl.constexpr, WORDS: gl.constexpr):
        """Chunk i's scale levels, int32 [rows, 1] in the packed words' layout (each row's decode takes its own)."""
        return gl.expand_dims(lv_smem.index((i * BK) // WG).load(gl.SliceLayout(1, WORDS)).to(gl.int32), 1)

    @gluon.jit
    def _refill_previous(i, ctx, STAGES: gl.constexpr):
        """After chunk i - 1's wgmmas are done: once every warp is past it, its ring slot takes chunk i - 1 + STAGES."""
        q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0 = ctx
        if i > 0:
            gl.thread_barrier()
            _load_chunk(i - 1 + STAGES, q_desc, w_desc, q_smem, w_smem, ready, off_m, off_n, n_chunks, c0, STAGES)

    @gluon.jit
    def _copy_loop(q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, c0, STAGES: gl.constexpr):
        """The copy warp (WS): each chunk's TMA copies into its ring slot once the MMA warps freed it. The
        slots start free: a fresh mbarrier's phase before the first counts as complete."""
        for j in range(n_chunks):
            s = j % STAGES
            mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1)
            # the MMA warps read the slot's words through the generic proxy; the copy writes through the async
            fence_async_shared()
            _load_chunk(j, q_desc, w_desc, q_smem, w_smem, ready, off_m, off_n, n_chunks, c0, STAGES)

    @gluon.jit
    def _issue(i, free, ctx, sw_smem, ROWS: gl.constexpr, WG: gl.constexpr, STAGES: gl.constexpr,
               WORDS: gl.constexpr, BLOCK_N: gl.constexpr, DOT_A: gl.constexpr):
        """Decode chunk i's weights and issue its wgmma into the registers of ``free`` (a finished result);
        returns the in-flight result and the chunk's weight scales. The decoded A registers stay the wgmma's
        until its wait: ptxas tracks wgmma register operands itself (the wait's deps take no 8-bit tensors)."""
        q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0 = ctx
        a_op = _decode_chunk(i, w_smem, ready, STAGES, WORDS, DOT_A, BLOCK_N)
        # zero-start, as a runtime predicate (i < 0 is never true): with a constant False the result gets fresh
        # registers, which lets ptxas keep a third 64-register set live
        tok = warpgroup_mma(a_op, q_smem.index(i % STAGES).permute((1, 0)), free, use_acc=i < 0, is_async=True)
        sw = sw_smem.index(((c0 + i) * BK) // WG).load(ROWS).to(gl.float32)
        return tok, sw

    @gluon.jit
    def _finish(i, tok, sw, acc, OUTSTANDING: gl.constexpr, ctx, STAGES: gl.constexpr, WS: gl.constexpr):
        """Wait for chunk i's wgmma (leaving OUTSTANDING newer ones in flight), hand its ring slot back (WS: to
        the copy warp; else refill it with chunk i + STAGES) and add its scaled result to ``acc``; returns acc
        and the finished int32 result."""
        q_desc, w_desc, q_smem, w_smem, ready, empty, off_m, off_n, n_chunks, I2F, c0 = ctx
        d = warpgroup_mma_wait(OUTSTANDING, deps=(tok, ))
        gl.thread_barrier()  # every warp is done with the slot (its words and, via its wgmma, its codes)
        if WS:
            mbarrier.arrive(empty.index(i % STAGES), count=1)
        else:
            _load_chunk(i + STAGES, q_desc, w_desc, q_smem, w_smem, ready, off_m, off_n, n_chunks, c0, STAGES)
        return _pinned(_rescale(acc, d, sw, I2F)), d

    @gluon.jit
    def _pinned(x):
        """x, through an empty volatile asm: the code that computes x stays before the next wgmma issue (also
        volatile asm). Otherwise LLVM sinks the rescale below the next wgmma, whose result then can't take the
        registers the rescale reads, and ptxas keeps a third 64-register set (and spills)."""
        return gl.inline_asm_elementwise("", "=f,0", [x], dtype=gl.float32, is_pure=False, pack=1)

    @gluon.jit
    def _rescale(acc, d, sw, I2F: gl.constexpr):
        """acc + d * sw (per weight row). int32 -> fp32 exactly (|d| < 2^22: 128 * 128 * 8 at most): one
        conversion instruction (I2FP), or, where that pipe is slow, 1.5 * 2^23 added as an integer (which puts d
        in the mantissa) and a float subtract to take it out; the autotuner times both."""
        if I2F:
            return acc + d.to(gl.float32) * sw[:, None]
        return acc + ((d + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0) * sw[:, None]


_CACHE = ConfigCache("w4a4_wgmma")

# On by default since its register-A form ran on the H100 (2026-12-07: correct, 1.22-1.60x bf16 at M = 256 /
# 1024 where triton_w4a4 is 0.95-1.08x); SPECQ_W4A4_GLUON=0 keeps W4A4 on the Triton kernel.
ENABLED = os.environ.get("SPECQ_W4A4_GLUON", "1") not in ("", "0")
# The integer-level form (scale levels, ``_levels_loop``): on since it ran on the H100 (2026-12-07: its GPU tests
# passed; the GEMM 1.16-1.87x bf16 at M = 256 / 1024 on the 8B shapes, where the rescaling form was 1.15-1.47x,
# benchmarks/results/kernels_levels_h100.md). SPECQ_W4A4_GLUON_LEVELS=0 sends scale levels on Hopper to the
# rescaling form with the snapped scales (per-token activations) or the Triton kernel's integer path.
LEVELS_ENABLED = os.environ.get("SPECQ_W4A4_GLUON_LEVELS", "1") not in ("", "0")
# Split-K candidates (``SPLIT`` > 1): off until they have run on a GPU (written 2026-12-08 in a session whose
# device was withdrawn: compiled for sm_90 and checked in SASS only). SPECQ_W4A4_SPLIT=1 lets the autotuner time
# them; ``launch_wgmma`` runs any config given.
SPLIT_ENABLED = os.environ.get("SPECQ_W4A4_SPLIT", "0") not in ("", "0")


def supported(m: int, n: int, k: int, group: int, act_group: int, device: torch.device) -> bool:
    """Whether this kernel takes the shape: Hopper, Gluon present, more than 128 rows (below that the Triton
    kernel's split-K tiles fill the GPU better), per-token activation scales, K in whole chunks and weight
    groups that hold whole chunks."""
    return (ENABLED and HAVE_GLUON and not INTERPRET and device.type == "cuda" and m > 128 and act_group == 0
            and k % CHUNK_K == 0 and group % CHUNK_K == 0 and _groups_held(k, group) <= MAX_GROUPS
            and torch.cuda.get_device_capability(device)[0] == 9)


def _groups_held(k: int, group: int) -> int:
    return next_pow2(triton.cdiv(k, group))


# a tile's weight scales for all of K sit in shared memory beside the ring: up to K = 32768 at groups of 128
MAX_GROUPS = 256


def _candidates() -> list[Config]:
    # (tokens per tile = the wgmma's N, weight rows per tile: 64 per warpgroup, ring stages, warps, I2F, WS)
    # (I2F: cvt to convert the int32 results, 0: the exact add/subtract trick; WS: a copy warp beside the MMA
    # warps). 128-row tiles read each token's codes from L2 half as often as 64-row ones (ncu, 2026-12-07: L2
    # at 64% behind 128 x 64 tiles). The warp-specialized ones were slower at 4096 x 4096 (M = 256, 1024) and
    # the autotuner's pick at 14336 x 4096, M = 1024 (H100, 2026-12-07, benchmarks/results/wgmma_ws_h100.md).
    raw = [(128, 64, 4, 4, 0, 0), (128, 64, 3, 4, 0, 0), (128, 128, 3, 8, 0, 0), (128, 128, 4, 8, 0, 0),
           (64, 64, 4, 4, 0, 0), (128, 64, 4, 4, 1, 0), (128, 128, 3, 8, 1, 0), (128, 128, 4, 8, 1, 0),
           (128, 128, 4, 8, 1, 1), (128, 128, 4, 8, 0, 1), (64, 64, 4, 4, 1, 1)]
    split = [(128, 128, 4, 8, 1, 0, 2)]  # split-K (single partition only; 128 x 64 tiles spill with it)
    return [Config.make(num_warps=nw, num_stages=1, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, I2F=i2f, WS=ws, SPLIT=sp)
            for bm, bn, st, nw, i2f, ws, sp in [r + (1,) for r in raw] + split]


def _level_candidates() -> list[Config]:
    """Configs of the integer-level form (single partition). With one int32 accumulator and no fp32 one a
    thread holds half the registers of the rescaling form, so tiles may take 256 tokens (the wgmma's widest
    N), which decodes each weight chunk once per 256 tokens instead of 128. (tokens, weight rows, ring
    stages, warps); shared memory per stage: tokens x 128 B of codes + rows x 64 B of words."""
    # 128 x 64 at 3 stages: 130 registers and 62 KB, three programs per SM
    # 64 x 64: twice the tiles of 128 x 64, for M = 256 at N = 4096 (one wave of 128 tiles on 132 SMs otherwise)
    # Split-K (last field) for grids of fewer tiles than SMs: at K = 14336, N = 4096, M = 256 the 128 x 128 tile
    # makes 64 tiles (half the H100 idle) and the 128 x 64 one 128 tiles that read each token's codes from L2
    # twice as often; 256 x 128 tiles in four splits read the codes a quarter as often as 128 x 64 ones.
    raw = [(128, 64, 4, 4, 1), (128, 64, 3, 4, 1), (256, 64, 3, 4, 1), (256, 64, 2, 4, 1), (128, 128, 4, 8, 1),
           (256, 128, 3, 8, 1), (64, 64, 4, 4, 1),
           (128, 128, 4, 8, 2), (256, 128, 3, 8, 2), (256, 128, 3, 8, 4), (256, 64, 3, 4, 2)]
    return [Config.make(num_warps=nw, num_stages=1, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, I2F=1, WS=0, SPLIT=sp)
            for bm, bn, st, nw, sp in raw]


def _tiles(cfg: Config, m: int, n: int) -> int:
    return triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])


def _worth_timing(cfg: Config, m: int, n: int, k: int, sms: int) -> bool:
    """Split-K only where the tiles alone leave SMs idle and every split keeps a pipeline's worth of chunks
    (a split config elsewhere only adds the workspace round trip)."""
    sp = cfg["SPLIT"]
    return sp == 1 or (SPLIT_ENABLED and _tiles(cfg, m, n) < sms and triton.cdiv(k, CHUNK_K) >= 8 * sp)


# Per device: the split-K arrival counters, one per tile (zeros; the last program of a tile puts its counter
# back to 0). Made outside CUDA-graph capture (a zero-fill captured into a graph would not run until replay);
# while none exists, a capture runs split configs unsplit (same tile, same result).
_COUNTERS: dict = {}
MAX_SPLIT_TILES = 4096


def _counters(device: torch.device) -> Optional[torch.Tensor]:
    c = _COUNTERS.get(device.index)
    if c is None and not torch.cuda.is_current_stream_capturing():
        c = _COUNTERS[device.index] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return c


def max_registers(cfg: Config) -> Optional[int]:
    """The register cap of a warp-specialized config (None otherwise): its MMA warps plus the copy warp's
    warpgroup (warps are given registers by the warpgroup) as many times per SM as its tiles fit, i.e. two
    tiles of 4 MMA warps or one of 8; the copy warp gives back all but 24 to the MMA warps (232 each for two
    4-warp tiles, enough for 64 x 64 ones: 128 x 64 ones spilled; 240 for 8 MMA warps)."""
    if not cfg["WS"]:
        return None
    tiles_per_sm = 2 if cfg.num_warps == 4 else 1
    return 65536 // (tiles_per_sm * (cfg.num_warps + 4) * 32) // 8 * 8


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TMA needs 16-byte aligned bases and row strides (the caller checked K): a contiguous copy otherwise."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def w4a4_matmul(q: torch.Tensor, sx: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor], group: int, out_dtype: torch.dtype,
                units: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q int8 [M, K] in the wgmma K order (``triton_w4a4.to_wgmma_order``), sx fp32 [M, 1] per-token scales,
    packed int32 [N, K/8], scales [N, K/group] -> [M, N] in out_dtype. The shape must be ``supported``. With
    ``units`` (fp32 [N]), ``scales`` are uint8 scale levels (``int4.snap_scales``): the weight is
    q * level * unit, summed over K in int32 (the integer-level form)."""
    M, K = q.shape
    N = packed.shape[0]
    y = torch.empty((M, N), device=q.device, dtype=out_dtype)
    q, packed, scales = _aligned(q), _aligned(packed), scales.contiguous()
    b_arg = bias if bias is not None else sx

    def launch(cfg: Config):
        launch_wgmma(cfg, q, sx, packed, scales, b_arg, y, bias is not None, group, units)

    key = (group, m_bucket(M), N, K, out_dtype, bias is not None, units is not None, q.device.index)
    cfg = _CACHE.best.get(key)
    if cfg is None:  # the candidate list only on a miss: no host work per call once tuned
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        cfg = _CACHE.pick(key, [c for c in (_level_candidates() if units is not None else _candidates())
                                if _worth_timing(c, m_bucket(M), N, K, sms)], launch)
    launch(cfg)
    return y


def launch_wgmma(cfg: Config, q, sx, packed, scales, b_arg, out, has_bias: bool, group: int,
                 units: Optional[torch.Tensor] = None) -> None:
    """One run of the kernel at config ``cfg`` into ``out`` [M, N] (``units``: see w4a4_matmul)."""
    M, K = q.shape
    N = packed.shape[0]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    q_desc = TensorDescriptor(q, [M, K], [K, 1], [bm, CHUNK_K], CODES_SMEM)
    w_desc = TensorDescriptor(packed, [N, K // 8], [packed.stride(0), 1], [bn, CHUNK_K // 8], WORDS_SMEM)
    tiles = _tiles(cfg, M, N)
    split = cfg["SPLIT"]
    counters = _counters(q.device) if split > 1 else None
    if counters is None or tiles > counters.numel():
        split = 1  # no counters yet (first call inside a graph capture) or too many tiles: unsplit
    # the programs' partial sums (int32, or fp32 bits), read back by each tile's last program; unsplit
    # launches allocate nothing (sx fills the unused pointers, as it does unit_ptr)
    ws = torch.empty(split * tiles * bm * bn, dtype=torch.int32, device=q.device) if split > 1 else sx
    pdl = PDL_ENABLED  # supported() checked Hopper
    _w4a4_wgmma_kernel[(tiles * split,)](
        q_desc, w_desc, sx, scales, b_arg, out, M, N, K, sx.stride(0), scales.stride(0), out.stride(0),
        units if units is not None else sx, ws, counters if split > 1 else sx, LEVELS=units is not None, WG=group,
        NG=_groups_held(K, group), HAS_BIAS=has_bias, STAGES=cfg["STAGES"], I2F=cfg["I2F"], WS=cfg["WS"],
        num_warps=cfg.num_warps, maxnreg=max_registers(cfg), SPLIT=split, PDL=pdl, launch_pdl=pdl)
