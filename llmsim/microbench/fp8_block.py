"""Block-scaled FP8 GPU kernels as vLLM runs a block-FP8 checkpoint's linear layers (needs Triton).

A block-FP8 checkpoint (``quantization_config.weight_block_size: [128, 128]``: DeepSeek-V3's, Qwen3's) stores one
weight scale per 128 x 128 block, and vLLM quantizes the bf16 activations per token and per group of 128 input
columns, each group with its own dynamic scale (``per_token_group_quant_fp8``: a group's absolute maximum over the
format's largest value, floored at 1e-10; the scales written column-major for the GEMM), then runs a GEMM that
applies both scales once per 128-deep slice of K. On Hopper vLLM 0.14 runs that GEMM with DeepGEMM where installed,
else CUTLASS's blockwise kernel on activations padded to a multiple of 4 rows, else its Triton kernel
(``w8a8_triton_block_scaled_mm``). Here: the group quantization as vLLM's Triton kernel does it, and the GEMM as
cuBLASLt's blockwise-scaled FP8 GEMM (``torch._scaled_mm`` with 1 x 128 and 128 x 128 scales, CUDA 12.9 and a
Hopper GPU), or where that is not available a Triton kernel of vLLM's form (``block_scaled_matmul``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmsim.microbench.kernels import FP8_BLOCK, FP8_E4M3_MAX, FP8_GROUP_EPS

GROUP = FP8_BLOCK


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, scale_ptr, cols, scale_row_stride, scale_group_stride,
                        GROUP_SIZE: tl.constexpr, FP8_MAX: tl.constexpr, EPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    offs = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    x = tl.load(x_ptr + row * cols + offs).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), EPS) / FP8_MAX
    q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + row * cols + offs, q.to(q_ptr.dtype.element_ty))
    tl.store(scale_ptr + row * scale_row_stride + group * scale_group_stride, scale)


def quantize_fp8_per_group_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize the contiguous 16-bit ``x`` [m, k] (k a multiple of 128) into the first m rows of ``q``
    (float8_e4m3fn, [>= m, k]) with one scale per token and 128 columns written to ``scale`` ([>= m, k / 128],
    float32, any strides: column-major for the GEMM). Allocation-free, so a CUDA graph can capture it."""
    m, k = x.shape
    _group_quant_kernel[(m, k // GROUP)](x, q, scale, k, scale.stride(0), scale.stride(1), GROUP_SIZE=GROUP,
                                         FP8_MAX=FP8_E4M3_MAX, EPS=FP8_GROUP_EPS)


@triton.jit
def _block_scaled_matmul_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, M, N, K,
                                a_scale_row_stride, a_scale_group_stride, b_scale_row_stride,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr):
    # Tiles visited in groups of GROUP_M rows of tiles (the same B tiles reused from L2 by neighbouring programs).
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]
    b_ptrs = b_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]  # B stored [N, K]: read as [K, N]
    b_block = (pid_n * BLOCK_N) // 128  # BLOCK_N <= 128 and divides it: one weight-scale block per tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptr + rows * a_scale_row_stride + kb * a_scale_group_stride, mask=row_ok,
                          other=0.0)
        b_scale = tl.load(b_scale_ptr + b_block * b_scale_row_stride + kb)
        acc += tl.dot(a, b) * a_scale[:, None] * b_scale
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def block_scaled_matmul(q: torch.Tensor, q_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """``out`` [m, n] = (``q`` [m, k] x ``q_scale`` per row and 128 columns) @ (``w`` [n, k] x ``w_scale`` per
    128 x 128 block).T, in the tiles of vLLM's Triton block-FP8 kernel where no tuned configuration exists
    (64 x 128 x 128 tiles, groups of 32 tile rows, 4 warps, 2 stages)."""
    m, k = q.shape
    n = w.shape[0]
    block_m, block_n, block_k = 64, 128, GROUP
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _block_scaled_matmul_kernel[grid](q, w, out, q_scale, w_scale, m, n, k, q_scale.stride(0), q_scale.stride(1),
                                      w_scale.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                      GROUP_M=32, num_warps=4, num_stages=2)
    return out
