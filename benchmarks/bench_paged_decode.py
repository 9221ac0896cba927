"""Paged decode attention against how the KV blocks lie in memory (needs a CUDA GPU and Triton).

A serving engine's decode attention reads each request's KV through a block table. After a while of serving,
the free-block queue is shuffled, so a request's blocks lie scattered over the layer's KV pool instead of side
by side, and vLLM's default block holds 16 tokens, while the kernel measurements the profiles are fitted on used
64-token blocks. This times one decode-attention layer (a split-free Triton kernel in vLLM's NHD cache layout,
[blocks, block tokens, KV heads, head dim], fp16) over the same batch with the block table laid out contiguously
or drawn at random from the pool, at both block sizes and two pool sizes, so the cost of either difference is
measured rather than assumed (``bench_fp8_kv_decode.py`` runs the same kernel over an FP8 cache, which it
dequantizes with per-tensor scales). The kernel is this file's, not vLLM's FlashAttention, so the numbers bound the
effect of the layout on a paged gather; they are not vLLM's latencies.

    python benchmarks/bench_paged_decode.py --out paged_decode.csv [--quick]
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gpu_bench import cuda_timer, parse_args, write_rows


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, scale, k_scale, v_scale,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                  TILE: tl.constexpr, MAX_LEN: tl.constexpr, KV_FP8: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    q_mask = (g < GROUP)[:, None]
    q = tl.load(q_ptr + b * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :], mask=q_mask,
                other=0.0)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_sum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    for start in range(0, MAX_LEN, TILE):  # the batch's longest; shorter ones mask the rest
        t = start + tl.arange(0, TILE)
        valid = t < seq_len
        page = tl.load(table_ptr + b * stride_tb + t // BLOCK, mask=valid, other=0).to(tl.int64)
        row = page * stride_kb + (t % BLOCK) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if KV_FP8:  # an FP8 cache: dequantized with its per-tensor scale, as vLLM's Triton attention does
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if KV_FP8:
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(out_ptr + b * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode(q, k_cache, v_cache, table, lens, block_size: int, max_len: int, tile: int = 64,
                 k_scale: float = 1.0, v_scale: float = 1.0):
    """One decode step's attention; a float8_e4m3fn cache is read as FP8 and scaled by ``k_scale`` / ``v_scale``."""
    batch, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode[(batch, kv_heads)](
        q, k_cache, v_cache, table, lens, out, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), table.stride(0), 1.0 / math.sqrt(head_dim), k_scale, v_scale, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK=block_size, TILE=tile,
        MAX_LEN=max_len, KV_FP8=k_cache.dtype == torch.float8_e4m3fn)
    return out


def reference(q, k_cache, v_cache, table, lens, block_size: int, k_scale: float = 1.0, v_scale: float = 1.0):
    """The same attention by gathering each request's KV (for the correctness check)."""
    outs = []
    group = q.shape[1] // k_cache.shape[2]
    for b in range(q.shape[0]):
        n = int(lens[b])
        pages = table[b, : -(-n // block_size)].long()
        k = k_scale * k_cache[pages].reshape(-1, *k_cache.shape[2:])[:n].float().repeat_interleave(group, 1)
        v = v_scale * v_cache[pages].reshape(-1, *v_cache.shape[2:])[:n].float().repeat_interleave(group, 1)
        s = torch.einsum("hd,thd->ht", q[b].float(), k) / math.sqrt(q.shape[2])
        outs.append(torch.einsum("ht,thd->hd", s.softmax(-1), v))
    return torch.stack(outs)


LAYOUTS = {  # (query heads, KV heads) per GPU
    "Mixtral-8x7B TP2": (16, 4),
    "CodeLlama-34B TP2": (32, 4),
    "Llama-2-7B TP1": (32, 32),
}


def main() -> None:
    args = parse_args(__doc__, "one layout, one pool size")
    device, timer, gpu = cuda_timer(warmup=5, repetitions=50)
    head_dim = 128
    rows = []
    layouts = dict(list(LAYOUTS.items())[:1]) if args.quick else LAYOUTS
    pools_gib = (1.0,) if args.quick else (1.0, 16.0)
    for name, (num_heads, kv_heads) in layouts.items():
        for pool_gib in pools_gib:
            for block_size in (16, 64):
                bytes_per_block = block_size * kv_heads * head_dim * 2
                num_blocks = int(pool_gib * (1 << 30) / bytes_per_block)
                k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=torch.float16, device="cuda")
                v_cache = torch.randn_like(k_cache)
                for batch, kv_len in ((128, 1800), (128, 700), (32, 1800)):
                    pages = -(-kv_len // block_size)
                    if batch * pages > num_blocks:
                        continue
                    lens = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
                    q = torch.randn(batch, num_heads, head_dim, dtype=torch.float16, device="cuda")
                    for table_kind in ("contiguous", "scattered"):
                        if table_kind == "contiguous":
                            table = torch.arange(batch * pages, dtype=torch.int32, device="cuda").view(batch, pages)
                        else:
                            table = torch.randperm(num_blocks, device="cuda")[: batch * pages].to(torch.int32)
                            table = table.view(batch, pages)
                        table = table.contiguous()
                        got = paged_decode(q, k_cache, v_cache, table, lens, block_size, kv_len)
                        check = slice(0, 4)
                        want = reference(q[check], k_cache, v_cache, table[check], lens[check], block_size)
                        err = (got[check].float() - want).abs().max().item()
                        us = 1000.0 * timer(lambda: paged_decode(q, k_cache, v_cache, table, lens, block_size,
                                                                 kv_len)).median_ms
                        kv_bytes = 2 * batch * kv_len * kv_heads * head_dim * 2
                        rows.append({"device": gpu, "layout": name, "num_heads": num_heads, "kv_heads": kv_heads,
                                     "pool_gib": pool_gib, "block_size": block_size, "batch": batch,
                                     "kv_len": kv_len, "table": table_kind, "time_us": round(us, 2),
                                     "kv_read_gb_per_s": round(kv_bytes / us / 1e3, 1), "max_abs_err": err})
                        print(rows[-1], flush=True)
                del k_cache, v_cache
                torch.cuda.empty_cache()
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
