"""Block-scaled FP8 GEMMs two ways, beside per-tensor FP8 and bf16 (needs an NVIDIA GPU with FP8 tensor cores and
Triton).

``llmsim microbench`` times a block-FP8 linear layer (``dtype: fp8_block``) as vLLM's per-token-group quantization
followed by cuBLASLt's blockwise-scaled GEMM, or, where torch or the GPU lacks that, a Triton GEMM of the form of
vLLM's own (``llmsim/microbench/fp8_block.py``). This times both over the suite's bare-GEMM shapes (aiconfigurator's
m x n x k grid), with per-tensor FP8 (vLLM's two quantization kernels and cuBLASLt) and bf16 beside them, and checks
each block-FP8 output against the product of the dequantized operands, so the README can say what a block-scaled
layer costs over a per-tensor one on this GPU and how much the GEMM kernel's choice moves it.

    python benchmarks/bench_fp8_block_gemm.py --out fp8_block_gemm.csv [--quick]
"""

from __future__ import annotations


import torch

from gpu_bench import cuda_timer, parse_args, write_rows
from llmsim.microbench.fp8_block import GROUP
from llmsim.microbench.grid import GRIDS
from llmsim.microbench.kernels import fp8_block_gemm_kernel, fp8_gemm_kernel, gemm_kernel


CHECK_ROWS = 8


def reference(tensors: dict, m: int, n: int, k: int) -> torch.Tensor:
    """The first ``CHECK_ROWS`` rows of x @ w.T with w dequantized by its block scales and x in bf16 (the
    activations' quantization error is part of what the check allows), computed on the CPU: on the GPU, an eager
    cuBLAS GEMM after CUDA graphs holding cuBLAS calls were captured and freed returned values up to 1.7e38 on an
    H100 (torch 2.11) for a few shapes, where the graphed kernels' outputs were right."""
    x = tensors[((m, k), torch.bfloat16)][:CHECK_ROWS].float().cpu()
    w = tensors[((n, k), torch.float8_e4m3fn)].float().cpu()
    scales = tensors[((n, k), "block_scales")].cpu().repeat_interleave(GROUP, 0).repeat_interleave(GROUP, 1)
    return x @ (w * scales).t()


def main() -> None:
    args = parse_args(__doc__, "a few shapes")
    device, timer, gpu = cuda_timer(warmup=3, repetitions=20)
    shapes = GRIDS["full"].gemms
    if args.quick:
        shapes = [s for s in shapes if s[1] == 4096 and s[2] == 4096 and s[0] in (1, 128, 4096)]
    rows = []
    with torch.inference_mode():
        for m, n, k in shapes:
            tensors: dict = {}
            times = {"bf16": timer(gemm_kernel(m, n, k, "bf16", device, tensors)).median_ms}
            kernel, impl = fp8_gemm_kernel(m, n, k, device, tensors)
            times[f"fp8 {impl}"] = timer(kernel).median_ms
            errors = {}
            for gemm in ("cublaslt", "triton"):
                try:
                    kernel, impl = fp8_block_gemm_kernel(m, n, k, device, tensors, gemms=(gemm,))
                except RuntimeError as exc:
                    print(f"m={m} n={n} k={k} {gemm}: {exc}", flush=True)
                    continue
                want = reference(tensors, m, n, k)
                got = kernel()[:CHECK_ROWS].float().cpu()
                errors[impl] = ((got - want).norm() / want.norm()).item()
                times[f"fp8_block {impl}"] = timer(kernel).median_ms
            for name, ms in times.items():
                rows.append({"device": gpu, "m": m, "n": n, "k": k, "kernel": name, "median_us": round(1e3 * ms, 2),
                             "rel_err": round(errors.get(name.removeprefix("fp8_block "), float("nan")), 5)})
            print({r["kernel"]: (r["median_us"], r["rel_err"]) for r in rows[-len(times):]}, m, n, k, flush=True)
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
