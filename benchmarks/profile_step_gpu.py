"""Per-kernel CUDA time of one compiled bf16 / mxfp4 decode step at the Llama-3-8B shape (no CUDA graphs).

    PYTHONPATH=. python benchmarks/profile_step_gpu.py      # writes $OUT/gpu_prof.txt (default: .)

Where a decode step's time goes, kernel by kernel (torch.profiler, 5 steps at position ~140, random
weights, compiled with inductor without CUDA graphs so that each kernel is seen).
"""
import os, sys, torch
import specq
from specq.runtime import bench
from specq.runtime.compiled import CompiledSteps, make_static_cache
from torch.profiler import profile, ProfilerActivity
model = bench.random_model(bench.LLAMA3_8B_SHAPE, dtype=torch.bfloat16, device="cuda")
specq.transform(model, modes=("bf16", "mxfp4"), recipe={"name": "m", "base": "default", "mxfp4_scale_rule": "mse"})
specq.set_mode(model, "bf16")
steps = CompiledSteps(model, make_static_cache(model, 1, 512), compile="inductor", cuda_graphs=False)
steps.logits(torch.randint(0, 1000, (1, 128), device="cuda"), 0, "bf16")
x = torch.randint(0, 1000, (1, 1), device="cuda")
out = open(os.path.join(os.environ.get("OUT", "."), "gpu_prof.txt"), "w")
for mode in ("bf16", "mxfp4"):
    for r in range(3): steps.greedy(x, 130 + r, mode)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for r in range(5): steps.greedy(x, 140 + r, mode)
        torch.cuda.synchronize()
    t = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90)
    tot = sum(e.self_device_time_total for e in prof.key_averages()) / 5
    print(f"== {mode}: total CUDA kernel time per step {tot/1e3:.3f} ms", file=out)
    print(t, file=out)
out.close()
print(open(os.path.join(os.environ.get("OUT", "."), "gpu_prof.txt")).read()[:6000])
