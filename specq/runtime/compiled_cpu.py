"""The CPU recipe for compiled decoding steps: frozen weights, no Python between kernels.

On the CPU there are no CUDA graphs to hide per-call costs, and at one token a 135M-parameter step
is ~15 ms, so every Python-level cost inside a step shows. `frozen_step` compiles the step function
with inductor under five measures (benchmarks/results/cpu_e2e.md has the numbers):

1. Freezing (``torch._inductor.config.freezing``, on while dynamo traces and inductor compiles):
   parameters and buffers become constants of the compiled code. inductor then prepacks every bf16
   weight for oneDNN (bit-identical results to F.linear, ~1.5x faster at one token: the matmuls
   stream a blocked layout), and the specq ops' weight preparation (INT4 repacking; see
   specq.kernels.inductor_cpu, registered here) runs once at compile time.
2. The specq ops are decomposed into aten ops (specq.kernels.inductor_cpu), so no matmul calls back
   into Python (~40 us each otherwise, 210 per step of the default model).
3. Grouped-query attention runs as one SDPA head per key/value head (specq.runtime.attention: same
   numbers, ~3x faster on this kernel at one query).
4. Dynamo's guards on the model's modules are skipped (``skip_guard_on_all_nn_modules_unsafe``):
   evaluating them cost ~1.5 ms per call. Graphs are still chosen by the step's other inputs (the mode
   argument, shapes), and a graph is only reused by the `torch.compile` wrapper (backend) that made
   it: each `frozen_step` compiles with a backend object of its own, so one model's frozen graphs
   are never offered to another model (tests/test_compiled_cpu.py checks both).
5. Sibling linears are fused (specq.passes.fuse_siblings, on dynamo's graph before inductor): q/k/v
   and gate/up, which read the same input, become one matmul over concatenated weights (folded into
   one constant by 1.) and a split. Default model, one token, interleaved A/B in one process
   (lab measurement, 12 rounds x 5 steps): bf16 step 0.87x the time, w4a16 0.86x, bf16 4-token
   verify 0.85x. ``SPECQ_FUSE_SIBLINGS=0`` turns it off.

Not used: inductor's C++ wrapper (``cpp_wrapper``, the code that calls a step's ~300 kernels in C++
instead of Python): with fused siblings, an interleaved A/B measured bf16 steps at 0.94x the time
and w4a16 at 0.95x, for compiles ~1.8x as long (~75 s per graph). Also tried and dropped: attention
at one query as fused elementwise loops instead of the flash kernel (a 3x win in isolation, ~1% in
the step, and 1.3x slower at a 4-token verify).

The price of 1 and 4: a compiled step keeps the weights and module attributes it was traced with.
After changing the model in place, drop its steps (`specq.runtime.compiled.release_steps(model)`).
"""

from __future__ import annotations

import os

import torch

# 5. (fuse_siblings): SPECQ_FUSE_SIBLINGS=0 turns it off (for A/B measurements)
FUSE_SIBLINGS = os.environ.get("SPECQ_FUSE_SIBLINGS", "1") != "0"


def frozen_step(step_fn, model: torch.nn.Module, backend):
    """`step_fn(model, ...)` compiled with `backend` (inductor) under the CPU recipe above."""
    import torch._inductor.config as inductor_config

    from specq.kernels import inductor_cpu
    from specq.passes.fuse_siblings import fuse_sibling_linears
    from specq.runtime.attention import grouped_sdpa, sdpa_configs

    inductor_cpu.register()

    def own_backend(gm, example_inputs):  # a backend object of this model's own (see 4. above)
        if FUSE_SIBLINGS:
            gm, _ = fuse_sibling_linears(gm)  # the concatenations fold under freezing (1.)
        return backend(gm, example_inputs)

    compiled = torch.compile(step_fn, backend=own_backend, fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    configs = sdpa_configs(model)

    def call(*args):
        prev = inductor_config.freezing
        inductor_config.freezing = True  # read by dynamo (parameters as constants) and by inductor
        try:
            with grouped_sdpa(model, configs):
                return compiled(*args)
        finally:
            inductor_config.freezing = prev

    return call
