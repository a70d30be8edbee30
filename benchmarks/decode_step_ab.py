"""A/B of the compiled decode step at the Llama-3-8B shape (random weights, CUDA): the decode
attention's combine fused into its split-KV kernel (the default) against the separate combine kernel.

    PYTHONPATH=. python benchmarks/decode_step_ab.py            # MODES=bf16,mxfp4 for both modes

Per-token time of 16-token greedy bursts (one CUDA graph each), variants interleaved over 7 rounds in
one process, median. Measured on the H100 (2026-11-23, an earlier form of this script that also
toggled a SwiGLU fold, since dropped): bf16 step 5.927 ms separate -> 5.773 ms fused.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import specq  # noqa: E402
from specq.kernels import triton_attention  # noqa: E402
from specq.runtime import bench  # noqa: E402
from specq.runtime.compiled import CompiledSteps, make_static_cache  # noqa: E402


def main() -> None:
    modes = os.environ.get("MODES", "bf16").split(",")
    model = bench.random_model(bench.LLAMA3_8B_SHAPE, dtype=torch.bfloat16, device="cuda")
    if modes != ["bf16"]:
        specq.transform(model, modes=tuple(["bf16"] + [m for m in modes if m != "bf16"]))
    steps = {}
    for variant in ("separate", "fused"):
        triton_attention.FUSED_COMBINE = variant == "fused"  # read when each graph is captured
        triton_attention._COUNTERS.clear()
        torch._dynamo.reset()
        t0 = time.time()
        s = CompiledSteps(model, make_static_cache(model, 1, 512), compile="inductor")
        s.logits(torch.randint(0, 1000, (1, 128), device="cuda"), 0, "bf16")
        for m in modes:
            s.greedy_burst(torch.tensor([[5]], device="cuda"), 128, 16, m)
        torch.cuda.synchronize()
        print(f"variant combine={variant}: setup {time.time() - t0:.0f} s", flush=True)
        steps[variant] = s
    res = {}
    for _ in range(7):
        for variant, s in steps.items():
            for m in modes:
                tok = torch.tensor([[5]], device="cuda")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(8):
                    s.greedy_burst(tok, 128 + 16 * i, 16, m)
                torch.cuda.synchronize()
                res.setdefault((variant, m), []).append((time.perf_counter() - t0) / 128 * 1e3)
    print("| combine | mode | ms/token (median of 7) | min |\n|---|---|---|---|")
    for (variant, m), v in res.items():
        v.sort()
        print(f"| {variant} | {m} | {v[len(v) // 2]:.3f} | {v[0]:.3f} |")


if __name__ == "__main__":
    main()
