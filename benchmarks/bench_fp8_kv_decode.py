"""Decode attention over an FP8 KV cache against a bf16 one, same kernel, same shapes (needs a CUDA GPU and Triton).

vLLM's ``--kv-cache-dtype fp8`` halves the bytes a decode step's attention reads. What that buys depends on the
kernel: where attention is bound by reading KV, up to 2x; where it is bound by launches, the split of the work or
the dequantization, less. The H100 profile's decode-attention curves are fitted apart for bf16 and fp8 KV on
NVIDIA's measurements of vLLM 0.14's kernels; this times one kernel (``bench_paged_decode.py``'s split-free paged
Triton kernel, vLLM's NHD layout, 16-token blocks laid out contiguously) with both caches over the head layouts and
batch x KV-length grid of those measurements, so the fp8 / bf16 time ratio of a kernel whose only difference is
the cache's dtype is measured, and set beside the measured vLLM ratio and the profile's in the README. The FP8
cache is dequantized in the kernel with per-tensor scales, as vLLM's Triton attention does it; vLLM's
FlashAttention 3 on Hopper instead runs the QK product in FP8. The kernel is not vLLM's: its latencies are not
vLLM's, and at small batches (few programs, no split over the KV length) it is launch- and latency-bound.

    python benchmarks/bench_fp8_kv_decode.py --out fp8_kv_decode.csv [--quick]
"""

from __future__ import annotations


import torch

from bench_paged_decode import paged_decode, reference
from gpu_bench import cuda_timer, parse_args, write_rows

LAYOUTS = ((32, 8), (8, 1), (64, 8), (32, 32))  # (query heads, KV heads) on one GPU; head dim 128
BATCHES = (1, 8, 32, 128, 256)
KV_LENS = (512, 2048, 8192)
BLOCK_TOKENS = 16  # vLLM's default block
MAX_CACHE_BYTES = 24 * 2**30  # a layer's K and V in bf16 for the largest batch x length kept under this


def main() -> None:
    args = parse_args(__doc__, "one layout, two batches, one length")
    device, timer, gpu = cuda_timer(warmup=5, repetitions=50)
    head_dim = 128
    layouts, batches, kv_lens = ((LAYOUTS[:1], (8, 128), (2048,)) if args.quick else (LAYOUTS, BATCHES, KV_LENS))
    rows = []
    for num_heads, kv_heads in layouts:
        for batch in batches:
            for kv_len in kv_lens:
                pages = -(-kv_len // BLOCK_TOKENS)
                cache_bytes = 2 * batch * pages * BLOCK_TOKENS * kv_heads * head_dim * 2
                if cache_bytes > MAX_CACHE_BYTES:
                    continue
                k16 = torch.randn(batch * pages, BLOCK_TOKENS, kv_heads, head_dim, dtype=torch.bfloat16,
                                  device=device)
                v16 = torch.randn_like(k16)
                # Per-tensor scales as vLLM's calculated ones (absolute maximum over the format's largest value).
                k_scale, v_scale = k16.abs().max().item() / 448.0, v16.abs().max().item() / 448.0
                caches = {"bf16": (k16, v16, 1.0, 1.0),
                          "fp8": ((k16.float() / k_scale).to(torch.float8_e4m3fn),
                                  (v16.float() / v_scale).to(torch.float8_e4m3fn), k_scale, v_scale)}
                table = torch.arange(batch * pages, dtype=torch.int32, device=device).view(batch, pages)
                lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
                q = torch.randn(batch, num_heads, head_dim, dtype=torch.bfloat16, device=device)
                for kv_dtype, (k, v, ks, vs) in caches.items():
                    def run():
                        return paged_decode(q, k, v, table, lens, BLOCK_TOKENS, kv_len, k_scale=ks, v_scale=vs)
                    got = run()
                    check = slice(0, 2)
                    want = reference(q[check], k, v, table[check], lens[check], BLOCK_TOKENS, ks, vs)
                    err = (got[check].float() - want).abs().max().item()
                    us = 1000.0 * timer(run).median_ms
                    kv_bytes = 2 * batch * kv_len * kv_heads * head_dim * k.element_size()
                    rows.append({"device": gpu, "num_heads": num_heads, "kv_heads": kv_heads, "batch": batch,
                                 "kv_len": kv_len, "kv_dtype": kv_dtype, "time_us": round(us, 2),
                                 "kv_read_gb_per_s": round(kv_bytes / us / 1e3, 1), "max_abs_err": err})
                    print(rows[-1], flush=True)
                del k16, v16, caches
                torch.cuda.empty_cache()
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
