import sys, torch
sys.path.insert(0, ".")
import specq.kernels.ops
from specq.formats import int4
from specq.kernels import triton_wq as W
torch.manual_seed(0)
for (M, K, N, g) in [(1030, 512, 260, 32), (300, 512, 260, 32), (1030, 512, 260, 128), (33, 512, 260, 32)]:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda") * 0.05
    p, s = int4.quantize(w.bfloat16(), g)
    ref = x.double() @ int4.dequantize(p, s, torch.float64).T
    for cfg in W._candidates(M, W.FORMAT_INT4, g):
        y = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),) if False else None
        import triton
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        try:
            W._wq_matmul_kernel[grid](x, p, s, x, y, M, N, K, x.stride(0), p.stride(0), s.stride(0), y.stride(0),
                FORMAT=1, GROUP=g, MAGIC=0x4300, OFFSET=136.0, HAS_BIAS=False, DOT_FP32=False, IEEE=False,
                EVEN_K=K % (cfg["SUB_K"] * cfg["N_SUB"]) == 0, **cfg.kwargs())
            torch.cuda.synchronize()
            err = float((y.double() - ref).norm() / ref.norm())
            print(M, K, N, g, cfg.meta, cfg.num_warps, cfg.num_stages, "nan" if torch.isnan(y).any() else "", f"{err:.2e}")
        except Exception as e:
            print(M, K, N, g, cfg.meta, "EXC", type(e).__name__, str(e)[:100])
