"""Times the W4A4 activation pre-kernel's launch plans (``specq.kernels.triton_act``) on a GPU: the whole-row
kernel ("rows"), the per-chunk kernel ("chunks": per token, two passes over x), the looped kernel
(``LoopPlan``: rows per program, chunks per segment, warps, pipeline stages) and the persistent whole-row
kernel (``PersistentPlan``: rows per block, warps, pipeline stages, programs per SM). Every plan's codes and
scales are checked bit for bit against the "chunks" plan first. Bandwidth: x read + codes written (1 byte each).

    python benchmarks/act_lab.py [--ks 4096,14336] [--ms 256,1024] [--act-group 32 --levels 16]
        [--only "default,chunks,persistent r1 w8 st2 1/SM"] [--out act_lab.md] [--json act_lab.json]

Timing as benchmarks/kernels.py's ``w4a4-act`` row: median of CUDA-graph replays of the same x (so x is in
L2, as a layer's input is right after the op that wrote it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kernels as kb  # noqa: E402  (benchmarks/kernels.py)

LOOP_PLANS = [(1, 16, 4, 2), (1, 16, 4, 3), (1, 16, 4, 1), (1, 32, 4, 2), (1, 32, 8, 2), (1, 32, 8, 3),
              (2, 8, 4, 2), (2, 16, 4, 2), (2, 16, 8, 2), (2, 16, 8, 3), (4, 4, 4, 2), (4, 8, 4, 2), (4, 8, 8, 2),
              (4, 16, 8, 2), (8, 4, 4, 2), (8, 8, 8, 2)]
# (rows per block, warps, stages, programs per SM); run where the rows fit one tile (K <= 16384 at chunks of
# 128; at K = 14336 one row is a [128, 128] tile, 112 chunks padded to 128)
PERSISTENT_PLANS = [(1, 4, 2, 2), (1, 4, 2, 4), (1, 4, 3, 4), (2, 4, 2, 1), (2, 4, 2, 2), (2, 4, 3, 2),
                    (2, 8, 2, 2), (2, 4, 2, 4), (4, 8, 2, 1), (4, 8, 3, 2),
                    (1, 8, 2, 1), (1, 8, 2, 2), (1, 8, 3, 2), (1, 16, 2, 1), (2, 16, 2, 1)]


def plans_for(k: int, had_block: int, act_group: int) -> list:
    from specq.kernels import triton_act as a
    plans = [None, "chunks"] + (["rows"] if a._rows_layout(k, had_block, act_group) is not None else [])
    n_chunks = triton.cdiv(k, a._chunk(k, had_block, act_group))
    plans += [a.LoopPlan(*p) for p in LOOP_PLANS if p[1] <= n_chunks]
    return plans + [a.PersistentPlan(*p) for p in PERSISTENT_PLANS
                    if a._rows_layout(k, had_block, act_group, p[0]) is not None]


def plan_name(plan) -> str:
    """The table's name of a plan: "rows", "chunks", "loop r4 s16 w8 st2", "persistent r2 w4 st2 2/SM"."""
    from specq.kernels import triton_act as a
    if isinstance(plan, str):
        return plan
    if plan is None:
        return "default"
    if isinstance(plan, a.LoopPlan):
        return "loop r{} s{} w{} st{}".format(*plan)
    return "persistent r{} w{} st{} {}/SM".format(*plan)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="4096,14336")
    ap.add_argument("--ms", default="256,1024")
    ap.add_argument("--act-group", type=int, default=0)
    ap.add_argument("--had-block", type=int, default=128)
    ap.add_argument("--order", type=int, default=128, help="codes' K order: 128 (Gluon GEMM) or 8 (Triton GEMM)")
    ap.add_argument("--only", default=None, help="comma-separated plan names to run (as the table names them)")
    ap.add_argument("--levels", type=int, default=0, help="scale levels of the activation groups (--act-group > 0)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from specq.kernels import triton_act as a

    dev = torch.device("cuda")
    copy_bw = kb.measure_copy_bandwidth()
    ag, hb = args.act_group, args.had_block
    rows = []
    for k in (int(v) for v in args.ks.split(",")):
        for m in (int(v) for v in args.ms.split(",")):
            x = (torch.randn(m, k, device=dev) * torch.rand(m, 1, device=dev) * 4).to(torch.bfloat16)
            lv = args.levels
            ref = a.quantize(x, ag, hb, args.order, plan="chunks", levels=lv)
            only = set(args.only.split(",")) if args.only else None
            for plan in plans_for(k, hb, ag):
                name = plan_name(plan)
                if only is not None and name not in only:
                    continue
                if plan is None:
                    name = f"default ({plan_name(a._default_plan(m, k, hb, ag))})"
                try:
                    got = a.quantize(x, ag, hb, args.order, plan=plan, levels=lv)
                    same = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
                    t = kb._bench(lambda plan=plan: a.quantize(x, ag, hb, args.order, plan=plan, levels=lv), 1)
                except Exception as e:  # report and go on: a plan may not compile at some shape
                    print(f"K={k} M={m} {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                moved = m * k * 3
                row = dict(K=k, M=m, plan=name, us=t * 1e6, pct_bw=100 * moved / t / copy_bw, equal=same)
                rows.append(row)
                print(f"K={k:5d} M={m:5d} {name:26s} {row['us']:7.2f} us {row['pct_bw']:5.1f}% copy "
                      f"{'equal' if same else 'DIFFERENT'}", flush=True)
    lines = [f"# Activation pre-kernel plans ({torch.cuda.get_device_name()})", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `python benchmarks/act_lab.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- act group {ag}, scale levels {args.levels}, Hadamard block {hb}, codes in K order {args.order}; copy bandwidth "
             f"{copy_bw / 1e12:.2f} TB/s; bytes = x read + codes written", "",
             "| K | M | plan | us | % copy BW | equal to chunks |", "|---:|---:|---|---:|---:|---|"]
    lines += [f"| {r['K']} | {r['M']} | {r['plan']} | {r['us']:.2f} | {r['pct_bw']:.1f} | {r['equal']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "copy_bw": copy_bw}, f, indent=1)
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
