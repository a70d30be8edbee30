"""Split-KV decode attention on Triton: the CUDA kernel of ``torch.ops.specq.decode_attention``.

At decode sizes one key/value head has G * q query rows (Llama-3-8B: 4 query heads x 1 token) and
the static cache L positions (hundreds): the work is reading K and V once, and a kernel with one
program per head leaves most SMs idle. So (flash-decoding):

1. ``_partial_kernel``, grid (B * Hkv, S): program (bh, s) takes the query rows of head bh and BPS
   blocks of BL cache positions; per block it loads the mask tile first and skips the block when the
   mask hides all of it (the positions past the current length), else computes the scores with one
   ``tl.dot`` (rows padded to R >= 16), an online softmax in fp32 (base 2), and ``p @ V``. It writes
   its unnormalised output rows and (max, sum) per row to a small fp32 workspace.
2. The combine: rescale the S partial rows to a common max, sum and normalise, and write
   [B, q, Hq, D] directly (the layout o_proj reads; no transpose copy). The last program of each
   head to finish does it (an arrival counter per head, acq_rel atomics), so a decode attention is
   one kernel; ``_combine_kernel`` (grid (B * Hkv,), the same code) is the separate form, used while
   a CUDA graph is captured before the counters exist and under SPECQ_ATTENTION_COMBINE=separate.
   Measured (benchmarks/decode_step_ab.py, H100, 8B shape, bf16, 16-token bursts): step 5.927 -> 5.773 ms.

S is chosen so that about two programs per SM run; blocks are BL = 32 positions when that helps fill
the GPU, else 64.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from specq.kernels import attention_op
from specq.kernels.triton_common import INTERPRET

LOG2E = 1.4426950408889634


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ml_ptr, cnt_ptr, out_ptr,
    L, HKV, scale_log2e,
    sqb, sqh, sqt, skb, skh, skl, svb, svh, svl, smb, smt, sob, sot, soh,
    G: tl.constexpr, QLEN: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    BL: tl.constexpr, BPS: tl.constexpr, S: tl.constexpr, SP: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
    FUSED: tl.constexpr,  # the last program of a head combines (cnt_ptr: zeroed counters, left zeroed)
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    r = tl.arange(0, R)             # row r: query head h * G + r // QLEN, token r % QLEN
    rv = r < G * QLEN
    t = r % QLEN
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + (h * G + r // QLEN)[:, None] * sqh + t[:, None] * sqt + d[None, :],
                mask=rv[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full((R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((R,), dtype=tl.float32)
    acc = tl.zeros((R, D), dtype=tl.float32)
    for i in range(BPS):
        lo = (sp * BPS + i) * BL + tl.arange(0, BL)
        lv = lo < L
        if HAS_MASK:
            am = tl.load(m_ptr + b * smb + t[:, None] * smt + lo[None, :], mask=rv[:, None] & lv[None, :], other=0)
            valid = am != 0
        else:
            valid = rv[:, None] & lv[None, :]
        if tl.max(tl.max(valid.to(tl.int32), axis=1), axis=0) > 0:  # else the mask hides the whole block
            k = tl.load(k_ptr + b * skb + h * skh + lo[:, None] * skl + d[None, :], mask=lv[:, None], other=0.0)
            v = tl.load(v_ptr + b * svb + h * svh + lo[:, None] * svl + d[None, :], mask=lv[:, None], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale_log2e
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing valid yet: no NaN
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    row = (bh * S + sp) * R + r
    tl.store(o_ptr + row[:, None] * D + d[None, :], acc, mask=rv[:, None])
    tl.store(ml_ptr + 2 * row, m_i, mask=rv)
    tl.store(ml_ptr + 2 * row + 1, l_i, mask=rv)
    if FUSED:
        # acq_rel: this program's partials are visible before its count, and the last one to count
        # sees every other program's partials
        if tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel") == S - 1:
            _combine_head(o_ptr, ml_ptr, out_ptr, bh, b, h, r, rv, t, d, sob, sot, soh, G, QLEN, R, D, S, SP)
            tl.store(cnt_ptr + bh, 0)  # ready for the next call (and the next CUDA graph replay)


@triton.jit
def _combine_head(o_ptr, ml_ptr, out_ptr, bh, b, h, r, rv, t, d, sob, sot, soh,
                  G: tl.constexpr, QLEN: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
                  S: tl.constexpr, SP: tl.constexpr):
    """All rows of head bh: rescale the S partial rows to a common max, sum, normalise, write
    [B, q, Hq, D]. Reads bypass L1 (.cg): other SMs wrote them during this kernel."""
    s = tl.arange(0, SP)
    rows = (bh * S + s)[:, None] * R + r[None, :]
    valid = (s < S)[:, None] & rv[None, :]
    m = tl.load(ml_ptr + 2 * rows, mask=valid, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(ml_ptr + 2 * rows + 1, mask=valid, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)  # rows no split saw: weights 0
    den = tl.sum(tl.exp2(m - m_use[None, :]) * l_s, axis=0)
    num = tl.zeros((R, D), dtype=tl.float32)
    for i in range(S):
        row = (bh * S + i) * R + r
        m_i = tl.load(ml_ptr + 2 * row, mask=rv, other=float("-inf"), cache_modifier=".cg")
        o_i = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=rv[:, None], other=0.0, cache_modifier=".cg")
        num += o_i * tl.exp2(m_i - m_use)[:, None]
    out = tl.where(den[:, None] > 0, num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    tl.store(out_ptr + b * sob + t[:, None] * sot + (h * G + r // QLEN)[:, None] * soh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=rv[:, None])


@triton.jit
def _combine_kernel(
    o_ptr, ml_ptr, out_ptr, HKV, sob, sot, soh,
    G: tl.constexpr, QLEN: tl.constexpr, R: tl.constexpr, D: tl.constexpr,
    S: tl.constexpr, SP: tl.constexpr,
):
    """The separate combine, grid (B * Hkv,): the same code as the fused one, so both forms give
    bitwise-equal results."""
    bh = tl.program_id(0)
    r = tl.arange(0, R)
    _combine_head(o_ptr, ml_ptr, out_ptr, bh, bh // HKV, bh % HKV, r, r < G * QLEN, r % QLEN, tl.arange(0, D),
                  sob, sot, soh, G, QLEN, R, D, S, SP)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_plan(batch_heads: int, length: int, sms: int) -> tuple[int, int, int]:
    """(BL, BPS, S): block length, blocks per program, programs per head, for ~2 programs per SM."""
    bl = 32 if batch_heads * triton.cdiv(length, 64) < sms else 64
    blocks = triton.cdiv(length, bl)
    want = max(1, triton.cdiv(2 * sms, batch_heads))
    bps = triton.cdiv(blocks, min(blocks, want))
    return bl, bps, triton.cdiv(blocks, bps)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    """The op's CUDA implementation (also callable on CPU tensors under TRITON_INTERPRET=1)."""
    attention_op.check_args(query, key, value, mask)
    if not attention_op.kernel_supports(query, key, value, mask):
        return attention_op.reference(query, key, value, mask, scale)
    b, hq, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    g = hq // hkv
    r = max(16, triton.next_power_of_2(g * q))
    bl, bps, s = split_plan(b * hkv, length, _sm_count(query.device))
    work = torch.empty((b * hkv * s * r, d), device=query.device, dtype=torch.float32)
    ml = torch.empty((b * hkv * s * r, 2), device=query.device, dtype=torch.float32)
    out = torch.empty((b, q, hq, d), device=query.device, dtype=query.dtype)
    m_arg = mask if mask is not None else query
    smb, smt = (mask.stride(0), mask.stride(2)) if mask is not None else (0, 0)
    counters = _counters(query.device, b * hkv) if FUSED_COMBINE else None
    sp = triton.next_power_of_2(s)
    _partial_kernel[(b * hkv, s)](
        query, key, value, m_arg, work, ml, counters if counters is not None else ml, out,
        length, hkv, float(scale) * LOG2E,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), smb, smt, out.stride(0), out.stride(1), out.stride(2),
        G=g, QLEN=q, R=r, D=d, BL=bl, BPS=bps, S=s, SP=sp, HAS_MASK=mask is not None, DOT_FP32=INTERPRET,
        FUSED=counters is not None, num_warps=4, num_stages=1)
    if counters is None:
        _combine_kernel[(b * hkv,)](
            work, ml, out, hkv, out.stride(0), out.stride(1), out.stride(2),
            G=g, QLEN=q, R=r, D=d, S=s, SP=sp, num_warps=4, num_stages=1)
    return out


# SPECQ_ATTENTION_COMBINE=separate keeps the two-kernel form (for A/B measurements)
FUSED_COMBINE = os.environ.get("SPECQ_ATTENTION_COMBINE", "fused") != "separate"
_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> Optional[torch.Tensor]:
    """Zeroed int32 arrival counters, one per (batch, KV head), persistent per device (each call
    leaves them zeroed, so a CUDA graph replays with no memset; calls run one after another on the
    decode stream). None while a CUDA graph is being captured before any exist: the caller then runs
    the separate combine kernel."""
    key = str(device)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
