"""The pipelined W4A4 GEMM in Gluon (specq.kernels.gluon_w4a4).

Gluon kernels don't run in Triton's interpreter, so CPU CI checks what it can without a GPU: the kernel
compiles for sm_90 (ptxas from Triton's wheel) with every candidate config, keeps its wgmma in flight
(no serialization, C7514; one wgmma group left outstanding while the previous chunk is rescaled) and
stays in registers; and the dispatch rule. The GPU tests run every config against float64 on ragged
shapes and against the Triton kernel.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess

import pytest
import torch


def _gluon():
    pytest.importorskip("triton")
    from specq.kernels import gluon_w4a4

    if not gluon_w4a4.HAVE_GLUON:
        pytest.skip("this triton has no Gluon")
    return gluon_w4a4


def _config_ids():
    """Readable test ids per candidate (the index into ``_candidates()`` where that cannot be imported)."""
    try:
        from specq.kernels.gluon_w4a4 import _candidates
    except ImportError:
        return [str(i) for i in range(N_CANDIDATES)]
    return [f"{i}-{c['BLOCK_N']}x{c['BLOCK_M']}-s{c['STAGES']}-w{c.num_warps}-i2f{c['I2F']}-ws{c['WS']}"
            for i, c in enumerate(_candidates())]


N_CANDIDATES = 11


def test_candidate_count():
    assert len(_gluon()._candidates()) == N_CANDIDATES


@pytest.mark.parametrize("index", range(N_CANDIDATES), ids=_config_ids())
def test_wgmma_kernel_compiles_for_sm90_with_wgmma_in_flight(sass_report, index):
    """Each candidate compiles for sm_90; ptxas keeps the wgmmas asynchronous (no C7514) and the two int32
    result sets in registers; the main loop runs 4 chunks of 4 IGMMA each and waits with one group
    outstanding (chunk i's wgmma runs under chunk i-1's rescale). Warp-specialized candidates issue no TMA
    copy from that loop (the copy warp does, its registers cut to 24 for the MMA warps)."""
    g = _gluon()
    sr, ptxas = sass_report, sass_report.PTXAS
    cfg = g._candidates()[index]
    kernel = sr.gluon_w4a4_kernel(cfg)
    out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", "-o", os.devnull, "-"], input=kernel.asm["ptx"],
                         capture_output=True, text=True)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "C7514" not in log, log  # "wgmma.mma_async instructions are serialized"
    spill = [int(b) for b in re.findall(r"(\d+) bytes spill stores", log)]
    assert spill and max(spill) <= 96, log  # a few words at most (2026-12-07: 32-72 bytes)
    sass = sr.sass_of(kernel)
    loop = sr.loop_histogram(sass, "IGMMA", predicated=True)
    igmma = sum(n for op, n in loop.items() if op.startswith("IGMMA"))
    assert igmma == 16, loop
    assert re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x1", sass), "no wgmma left in flight"
    # two register sets for the int32 results, used in turn
    sets = {m.group(1) for m in re.finditer(r"IGMMA\.\S+\s+(R\d+),", sass)}
    assert len(sets) == 2, sets
    assert ("UTMALDG" in "".join(loop)) != bool(cfg["WS"]), loop
    assert bool(re.search(r"USETMAXREG\.DEALLOC\S*\s+0x18\b", sass)) == bool(cfg["WS"])


def test_warp_specialized_loop_is_leaner(sass_report, capsys):
    """sass_report --gluon: the warp-specialized 128 x 128 candidate's K loop has fewer barriers and fewer
    instructions per chunk than the single-partition one of the same tile (the copy warp took the TMA issue)."""
    g = _gluon()
    cands = g._candidates()
    plain = next(i for i, c in enumerate(cands) if not c["WS"] and c["BLOCK_N"] == 128 and c["I2F"] == 1
                 and c["STAGES"] == 4)
    ws = next(i for i, c in enumerate(cands) if c["WS"] and c["BLOCK_N"] == 128 and c["I2F"] == 1)
    per_chunk = {}
    for index in (plain, ws):
        assert sass_report.main(["--gluon", str(index), "--top", "1"]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        m = re.search(r"(\d+) spill instructions, K loop of (\d+) chunks: (\d+) instructions and ([\d.]+) barriers", line)
        assert m and int(m.group(1)) == 0 and int(m.group(2)) == 4, line
        per_chunk[index] = (int(m.group(3)), float(m.group(4)))
    assert per_chunk[ws][0] < per_chunk[plain][0] and per_chunk[ws][1] < per_chunk[plain][1], per_chunk


def test_dispatch_rule(monkeypatch):
    """Enabled (the default; SPECQ_W4A4_GLUON=0 turns it off), the Gluon kernel takes Hopper, > 128 rows,
    per-token activation scales, whole 128-chunks of K in whole weight groups; everything else stays on the
    Triton kernel (and nothing runs it on CPU). Turned off, nothing does."""
    g = _gluon()
    assert g.ENABLED == (os.environ.get("SPECQ_W4A4_GLUON", "1") not in ("", "0"))
    monkeypatch.setattr(g, "ENABLED", False)
    assert not g.supported(1024, 4096, 4096, 128, 0, torch.device("cuda"))
    monkeypatch.setattr(g, "ENABLED", True)
    cpu = torch.device("cpu")
    assert not g.supported(1024, 4096, 4096, 128, 0, cpu)
    if not torch.cuda.is_available():
        return
    dev = torch.device("cuda")
    hopper = torch.cuda.get_device_capability(dev)[0] == 9
    assert g.supported(1024, 4096, 4096, 128, 0, dev) == hopper
    assert not g.supported(128, 4096, 4096, 128, 0, dev)
    assert not g.supported(1024, 4096, 4096, 128, 32, dev)
    assert not g.supported(1024, 4096, 4160, 128, 0, dev)
    assert not g.supported(1024, 4096, 4096, 64, 0, dev)


def _hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs a Hopper GPU")


# (M, K, N): ragged M and N; 3 chunks (only the one-chunk tail loop); 16 chunks (the 4-chunk loop); 7 chunks
GPU_CASES = [(300, 1024, 200), (129, 384, 64), (520, 2048, 520), (1000, 896, 4100)]


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(N_CANDIDATES), ids=_config_ids())
@pytest.mark.parametrize("m,k,n", GPU_CASES, ids=[f"{m}x{k}x{n}" for m, k, n in GPU_CASES])
def test_gpu_wgmma_kernel_matches_float64_and_triton(index, m, k, n):
    _hopper()
    g = _gluon()
    from specq.formats import activation, int4
    from specq.kernels import triton_w4a4

    gen = torch.Generator().manual_seed(m + k + n + index)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    p, s = int4.quantize(w.bfloat16(), 128)
    q, sx = activation.quantize_int4(x, 0)
    sx = sx.reshape(m, 1).float()
    ref = (q.double() * sx.double()) @ int4.dequantize(p, s, torch.float64).T + b.double()
    qg, qw, sx, p, s, b = (t.cuda() for t in (triton_w4a4.to_wgmma_order(q).contiguous(),
                                               triton_w4a4.to_word_order(q).contiguous(), sx, p, s, b))
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    g.launch_wgmma(g._candidates()[index], qg, sx, p, s, b, out, True, 128)
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    tri = triton_w4a4.w4a4_matmul(qw, sx, p, s, b, 128, 0, torch.bfloat16)
    # the same int32 chunk dots, scaled in the same order: equal up to bf16 rounding of the output
    assert torch.allclose(out.float(), tri.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_op_runs_the_wgmma_kernel_at_large_m(monkeypatch):
    """torch.ops.specq.linear_w4a4 at 256 rows on Hopper goes through the Gluon kernel and equals the
    reference op (rotation + per-token INT4 activations)."""
    _hopper()
    g = _gluon()
    monkeypatch.setattr(g, "ENABLED", True)
    import specq.kernels.ops  # noqa: F401
    from specq.formats import int4
    from specq.kernels import ops

    w = torch.randn(384, 1024, device="cuda") * 0.05
    p, s = int4.quantize(w.bfloat16(), 128)
    x = torch.randn(2, 128, 1024, device="cuda", dtype=torch.bfloat16)
    g._CACHE.best.clear()
    y = torch.ops.specq.linear_w4a4(x, p, s, None, 128, 0, 128)
    assert g._CACHE.best, "the Gluon kernel did not run"
    # the reference in x's dtype: its rotated activation is rounded to bf16 before quantization, as the
    # pre-kernel's is (in float64 a few codes land on the other side of a rounding boundary)
    ref = ops.reference_w4a4(x, p, s, None, 0, 128).double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_wgmma_k_order_matches_the_register_decode():
    """The Gluon kernel's operand layout, emulated in float64 (the GPU is the only place it runs): lane t's A
    registers for K step s hold the four bytes of the even codes (``lo``) of packed word 4t + s at logical
    K 32s + 4t.. and its odd codes (``hi``) at 32s + 16 + 4t..; with the activation codes in
    ``to_wgmma_order`` the dot over that logical K is the matmul of the codes."""
    pytest.importorskip("triton")
    from specq.formats import int4
    from specq.kernels import triton_w4a4

    gen = torch.Generator().manual_seed(5)
    n, k, m = 8, 256, 3
    p, s = int4.quantize((torch.randn(n, k, generator=gen) * 0.05).bfloat16(), 128)
    q = torch.randint(-8, 8, (m, k), generator=gen, dtype=torch.int8)
    w = p.to(torch.int64) & 0xFFFFFFFF  # the words as unsigned
    lo = (((w << 4) & 0xF0F0F0F0) ^ 0x80808080).reshape(n, k // 128, 4, 4)  # [n, block, t, s]
    hi = ((w & 0xF0F0F0F0) ^ 0x80808080).reshape(n, k // 128, 4, 4)
    a = torch.zeros(n, k, dtype=torch.float64)
    for blk, t, s_, h, b in itertools.product(range(k // 128), range(4), range(4), range(2), range(4)):
        byte = ((hi if h else lo)[:, blk, t, s_] >> (8 * b)) & 0xFF
        a[:, 128 * blk + 32 * s_ + 16 * h + 4 * t + b] = (byte - 256 * (byte >= 128)).double()  # int8 16 q
    codes = triton_w4a4.to_wgmma_order(q).double()
    got = codes @ a.T / 16  # the kernel's int32 dot (its weights are 16 q)
    assert torch.equal(got, q.double() @ int4.unpack(p).double().T)
