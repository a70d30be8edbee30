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
    return [f"{i}-{c['BLOCK_N']}x{c['BLOCK_M']}-s{c['STAGES']}-w{c.num_warps}-i2f{c['I2F']}-ws{c['WS']}-k{c['SPLIT']}"
            for i, c in enumerate(_candidates())]


N_CANDIDATES = 12
N_LEVEL_CANDIDATES = 11


def _level_ids():
    try:
        from specq.kernels.gluon_w4a4 import _level_candidates
    except ImportError:
        return [str(i) for i in range(N_LEVEL_CANDIDATES)]
    return [f"{i}-{c['BLOCK_N']}x{c['BLOCK_M']}-s{c['STAGES']}-w{c.num_warps}-k{c['SPLIT']}"
            for i, c in enumerate(_level_candidates())]


def test_candidate_count():
    assert len(_gluon()._candidates()) == N_CANDIDATES
    assert len(_gluon()._level_candidates()) == N_LEVEL_CANDIDATES


def _ptxas_log(sass_report, kernel) -> str:
    out = subprocess.run([sass_report.PTXAS, "-v", "--gpu-name", "sm_90a", "-o", os.devnull, "-"],
                         input=kernel.asm["ptx"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@pytest.mark.parametrize("index", range(N_LEVEL_CANDIDATES), ids=_level_ids())
def test_integer_level_kernel_compiles_for_sm90_without_rescale(sass_report, index):
    """The integer-level form of every level candidate compiles for sm_90 with no spills and no serialized
    wgmma; its K loop issues one wgmma group per 128 tokens per chunk (4 IGMMA each), leaves the newest in
    flight (DEPBAR.LE 1 per group), accumulates in one int32 register set per group and converts nothing
    to float: the rescale is gone from the loop."""
    g = _gluon()
    sr = sass_report
    cfg = g._level_candidates()[index]
    kernel = sr.gluon_w4a4_kernel(cfg, levels=True)
    log = _ptxas_log(sr, kernel)
    assert "C7514" not in log, log
    assert re.search(r"\b0 bytes spill stores", log), log
    groups = max(1, cfg["BLOCK_M"] // 128)
    sass = sr.sass_of(kernel)
    loop = sr.loop_histogram(sass, "IGMMA", predicated=True)
    assert sum(n for op, n in loop.items() if op.startswith("IGMMA")) == 4 * groups, loop
    assert re.search(rf"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x{groups}\b", sass), "the newest wgmmas are not left in flight"
    assert len({m.group(1) for m in re.finditer(r"IGMMA\.\S+\s+(R\d+),", sass)}) == groups
    assert not any(op.startswith(("I2F", "FFMA", "FADD", "FMUL")) for op in loop), loop


@pytest.mark.parametrize("levels", [True, False], ids=["levels", "rescaling"])
def test_split_k_publishes_partials_before_counting_in(sass_report, levels):
    """Split-K configs end with the tile's handshake: after the partial sums' stores, a CTA barrier, then one
    thread's gpu-scope release fence and atomic add on the tile's counter (the last program's acquire: the L1
    invalidation after it), and the counter's reset by exchange; unsplit configs have no global atomic."""
    g = _gluon()
    sr = sass_report
    cands = g._level_candidates() if levels else g._candidates()
    split = next(c for c in cands if c["SPLIT"] > 1)
    plain = next(c for c in cands if c["SPLIT"] == 1 and c["WS"] == 0)
    sass = sr.sass_of(sr.gluon_w4a4_kernel(split, levels=levels))
    ops = sr.instructions(sass)
    add = next(i for i, op in enumerate(ops) if re.search(r"\bATOMG\.E\.ADD\.STRONG\.GPU\b", op))
    assert any("MEMBAR.ALL.GPU" in op for op in ops[add - 4:add]), ops[add - 6:add + 2]
    assert any(re.search(r"\bBAR\.SYNC", op) for op in ops[add - 12:add]), ops[add - 12:add]
    assert any("CCTL.IVALL" in op for op in ops[add + 1:add + 3]), ops[add:add + 3]
    assert any(re.search(r"\bATOMG\.E\.EXCH\.STRONG\.GPU\b", op) for op in ops[add:])
    assert any(re.search(r"\bSTG\.E", op) for op in ops[:add])  # the partials stored before the count
    assert "ATOMG" not in sr.sass_of(sr.gluon_w4a4_kernel(plain, levels=levels))


@pytest.mark.parametrize("levels", [True, False], ids=["levels", "rescaling"])
def test_pdl_waits_for_the_pre_kernel_before_any_copy_or_store(sass_report, levels):
    """Launched with programmatic dependent launch, the GEMM may start while the pre-kernel still writes the
    codes: its griddepcontrol.wait (ACQBULK) must come before every TMA copy (codes and weights share a ring
    slot's barrier) and every global store; without PDL there is none."""
    g = _gluon()
    sr = sass_report
    cfg = (g._level_candidates() if levels else g._candidates())[0]
    ops = sr.instructions(sr.sass_of(sr.gluon_w4a4_kernel(cfg, levels, pdl=True)))
    wait = [i for i, op in enumerate(ops) if re.search(r"\bACQBULK\b", op)]
    assert len(wait) == 1, wait
    assert not any(re.search(r"\b(UTMALDG|STG|ATOMG|RED)\b", op) for op in ops[:wait[0]]), ops[:wait[0]]
    assert any("UTMALDG" in op for op in ops[wait[0]:])
    assert "ACQBULK" not in sr.sass_of(sr.gluon_w4a4_kernel(cfg, levels))


def test_split_k_candidates_are_timed_only_where_tiles_leave_sms_idle(monkeypatch):
    g = _gluon()
    monkeypatch.setattr(g, "SPLIT_ENABLED", True)
    split = next(c for c in g._level_candidates() if c["SPLIT"] == 2 and (c["BLOCK_M"], c["BLOCK_N"]) == (128, 128))
    assert g._worth_timing(split, 256, 4096, 14336, 132)  # 64 tiles, 112 chunks
    assert not g._worth_timing(split, 1024, 4096, 14336, 132)  # 256 tiles
    assert not g._worth_timing(split, 256, 4096, 1024, 132)  # 8 chunks: 4 per split
    assert all(g._worth_timing(c, 1024, 4096, 14336, 132) for c in g._level_candidates() if c["SPLIT"] == 1)
    monkeypatch.setattr(g, "SPLIT_ENABLED", False)  # the default until they have run on a GPU
    assert not g._worth_timing(split, 256, 4096, 14336, 132)


def test_integer_level_loop_is_leaner_than_the_rescaling_one(sass_report):
    """Same tile (128 tokens x 64 weight rows, 4 warps, 4 stages): dropping the per-chunk rescale (and its
    wait) more than pays for the longer decode (q * level: a multiply-add and a LOP3 per four weights more)."""
    g = _gluon()
    sr = sass_report
    plain = next(c for c in g._candidates() if (c["BLOCK_M"], c["BLOCK_N"], c["STAGES"], c.num_warps, c["WS"]) ==
                 (128, 64, 4, 4, 0))
    levels = g._level_candidates()[0]
    assert (levels["BLOCK_M"], levels["BLOCK_N"], levels["STAGES"], levels.num_warps, levels["SPLIT"]) == (128, 64, 4, 4, 1)
    count = [sum(sr.loop_histogram(sr.sass_of(sr.gluon_w4a4_kernel(c, levels=lv)), "IGMMA", predicated=True).values())
             for c, lv in ((plain, False), (levels, True))]
    chunks = [4, 1]  # the rescaling loop runs four chunks per iteration
    per_chunk = [n / c for n, c in zip(count, chunks)]
    assert per_chunk[1] < 0.8 * per_chunk[0], per_chunk


def test_scaled_decode_bytes_are_q_times_level():
    """The integer-level decode, in int64 on the CPU: per byte, n * level + 128 - 8 level never carries into
    the next byte (level <= 16), and with its top bit flipped each byte is the int8 q * level, even codes in
    ``lo`` and odd ones in ``hi`` (the order of the plain decode, so the codes' K order is unchanged)."""
    from specq.formats import int4

    gen = torch.Generator().manual_seed(11)
    p, _ = int4.quantize(torch.randn(16, 64, generator=gen), 32)
    q = int4.unpack(p).to(torch.int64).reshape(16, 8, 8)  # [rows, word, element]
    w = p.to(torch.int64) & 0xFFFFFFFF
    for level in range(17):
        c = ((128 - 8 * level) * 0x01010101) & 0xFFFFFFFF
        lo = (((w & 0x0F0F0F0F) * level + c) & 0xFFFFFFFF) ^ 0x80808080
        hi = ((((w >> 4) & 0x0F0F0F0F) * level + c) & 0xFFFFFFFF) ^ 0x80808080
        for word, parity in ((lo, 0), (hi, 1)):
            byte = torch.stack([(word >> (8 * b)) & 0xFF for b in range(4)], -1)
            value = byte - 256 * (byte >= 128)
            assert torch.equal(value, q[:, :, parity::2] * level), level


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
@pytest.mark.parametrize("index", range(N_LEVEL_CANDIDATES), ids=_level_ids())
@pytest.mark.parametrize("m,k,n", GPU_CASES, ids=[f"{m}x{k}x{n}" for m, k, n in GPU_CASES])
def test_gpu_integer_level_kernel_matches_float64_and_triton(index, m, k, n):
    """The integer-level form (gluon_w4a4.LEVELS_ENABLED) against float64 with
    the snapped scales, and against the Triton kernel's integer path (the same exact int32 sums, so equal up
    to the fp32 rounding of the final scaling)."""
    _hopper()
    g = _gluon()
    from specq.formats import activation, int4
    from specq.kernels import triton_w4a4

    gen = torch.Generator().manual_seed(m + k + n + index)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen) * 0.05 * torch.rand(n, k // 128, 1, generator=gen).repeat_interleave(
        128, 2).reshape(n, k)
    b = (torch.randn(n, generator=gen) * 0.1).to(torch.bfloat16)
    p, s = int4.quantize(w.bfloat16(), 128)
    lv, unit = int4.snap_scales(s, 16)
    q, sx = activation.quantize_int4(x, 0)
    sx = sx.reshape(m, 1).float()
    ref = (q.double() * sx.double()) @ int4.dequantize(p, int4.snapped_scales(s, 16).double()).T + b.double()
    qg, qw, sx, p, lv, unit, b = (t.cuda() for t in (triton_w4a4.to_wgmma_order(q).contiguous(),
                                                     triton_w4a4.to_word_order(q).contiguous(), sx, p, lv, unit, b))
    out = torch.empty(m, n, dtype=torch.float32, device="cuda")
    g.launch_wgmma(g._level_candidates()[index], qg, sx, p, lv, b, out, True, 128, units=unit)
    rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert rel < 1e-6, rel
    tri = triton_w4a4.w4a4_matmul(qw, sx, p, lv, b, 128, 0, torch.float32, units=unit)
    assert torch.allclose(out, tri, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("levels", [True, False], ids=["levels", "rescaling"])
def test_gpu_split_k_equals_the_unsplit_tile_on_every_launch(levels):
    """Each split config against the same tile unsplit, launched three times (the counters must be back to 0
    after each launch): with scale levels the int32 sums are exact, so the outputs are bit-equal; the
    rescaling form adds the splits' fp32 sums in a fixed order (equal each launch, close to unsplit)."""
    _hopper()
    g = _gluon()
    from specq.formats import activation, int4
    from specq.kernels import triton_w4a4

    m, k, n = 300, 14336 // 4, 520  # 28 chunks: splits of 14 and of 7
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    p, s = int4.quantize((torch.randn(n, k, generator=gen) * 0.05).bfloat16(), 128)
    q, sx = activation.quantize_int4(x, 0)
    args = [triton_w4a4.to_wgmma_order(q).contiguous(), sx.reshape(m, 1).float(), p]
    args += list(int4.snap_scales(s, 16)) if levels else [s, None]
    qg, sx, p, sc, unit = (t.cuda() if t is not None else None for t in args)
    cands = g._level_candidates() if levels else g._candidates()
    for cfg in (c for c in cands if c["SPLIT"] > 1):
        plain = next(c for c in cands if c["SPLIT"] == 1 and all(c[f] == cfg[f] for f in ("BLOCK_M", "BLOCK_N")))
        ref = torch.empty(m, n, dtype=torch.float32, device="cuda")
        g.launch_wgmma(plain, qg, sx, p, sc, sx, ref, False, 128, units=unit)
        outs = []
        for _ in range(3):
            outs.append(torch.empty(m, n, dtype=torch.float32, device="cuda"))
            g.launch_wgmma(cfg, qg, sx, p, sc, sx, outs[-1], False, 128, units=unit)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), dict(cfg.meta)
        if levels:
            assert torch.equal(outs[0], ref), dict(cfg.meta)
        else:
            assert torch.allclose(outs[0], ref, rtol=1e-5, atol=1e-4), dict(cfg.meta)
    assert int(g._COUNTERS[torch.device("cuda").index or 0].abs().sum()) == 0


@pytest.mark.gpu
def test_gpu_op_runs_the_integer_level_kernel_when_enabled(monkeypatch):
    """With scale levels and LEVELS_ENABLED, torch.ops.specq.linear_w4a4 at 256 rows takes the integer-level
    Gluon form and equals the reference op with the snapped scales."""
    _hopper()
    g = _gluon()
    monkeypatch.setattr(g, "ENABLED", True)
    monkeypatch.setattr(g, "LEVELS_ENABLED", True)
    import specq.kernels.ops  # noqa: F401
    from specq.formats import int4
    from specq.kernels import ops

    w = torch.randn(384, 1024, device="cuda") * 0.05
    p, s = int4.quantize(w.bfloat16(), 128)
    x = torch.randn(2, 128, 1024, device="cuda", dtype=torch.bfloat16)
    g._CACHE.best.clear()
    y = torch.ops.specq.linear_w4a4(x, p, s, None, 128, 0, 128, 16)
    assert any(key[-2] is True for key in g._CACHE.best), "the integer-level form did not run"  # key: units given
    ref = ops.reference_w4a4(x, p, s, None, 0, 128, 16).double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


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
