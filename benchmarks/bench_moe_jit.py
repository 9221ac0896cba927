"""When vLLM's fused-MoE Triton kernel compiles during serving, and how long it takes (needs a CUDA GPU, Triton and
vLLM's kernel).

Triton compiles a kernel once per set of compile-time constants (the tile configuration vLLM picks for the step's
token count M from its tuned file) and per specialisation of the integer arguments (Triton specialises an int
divisible by 16). A serving engine compiles at start-up what its profiling run (M = max_num_batched_tokens) and
its CUDA-graph capture (M = the captured batch sizes) reach; a step of another M whose variant is new compiles on
the spot, and every request waits. This replays that start-up, then every M above the largest captured size up
to max_num_batched_tokens once, in a fresh Triton cache, and records per M the configuration, how many kernels
compiled and the call's time (Mixtral-8x7B's TP 2 shard by default: 8 experts, top 2, hidden 4096, 7168 of the
intermediate size per GPU).

    python benchmarks/bench_moe_jit.py --configs 'E=8,N=7168,device_name=NVIDIA_H100_80GB_HBM3.json' \
        --out moe_jit.csv [--kernel my_copy_of_the_kernel.py]

``--configs`` is vLLM's tuned-configuration file for the shape (in vLLM's source tree,
``vllm/model_executor/layers/fused_moe/configs/``); the kernel is vLLM's ``fused_moe_kernel``, imported from an
installed vLLM or from ``--kernel`` (a file defining it with vLLM's signature).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import tempfile
import time

os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))  # nothing compiled before

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def load_kernel(path: str | None):
    if path is None:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_moe_kernel
        return fused_moe_kernel
    spec = importlib.util.spec_from_file_location("moe_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fused_moe_kernel


def moe_align(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """vLLM's ``moe_align_block_size``: token slots sorted by expert, each expert's padded to ``block_m``."""
    numel = topk_ids.numel()
    max_padded = numel + num_experts * (block_m - 1)
    if numel < num_experts:
        max_padded = min(numel * block_m, max_padded)
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.full((triton.cdiv(max_padded, block_m),), -1, dtype=torch.int32, device=topk_ids.device)
    start = taken = 0
    for e, n in enumerate(counts):
        sorted_ids[start:start + n] = order[taken:taken + n].to(torch.int32)
        padded = triton.cdiv(n, block_m) * block_m
        expert_ids[start // block_m:(start + padded) // block_m] = e
        start += padded
        taken += n
    return sorted_ids, expert_ids, torch.tensor([start], dtype=torch.int32, device=topk_ids.device)


def invoke(kernel, a, b, c, topk_weights, sorted_ids, expert_ids, num_post_padded, mul_routed_weight, top_k,
           config):
    """vLLM's ``invoke_fused_moe_kernel`` for 16-bit weights and activations."""
    config = dict(config)
    em = sorted_ids.shape[0]
    if a.shape[0] < config["BLOCK_SIZE_M"]:
        em = min(em, a.shape[0] * top_k * config["BLOCK_SIZE_M"])
    grid = (triton.cdiv(em, config["BLOCK_SIZE_M"]) * triton.cdiv(b.shape[1], config["BLOCK_SIZE_N"]),)
    block_k = config.pop("BLOCK_SIZE_K")
    kernel[grid](a, b, c, None, None, topk_weights, sorted_ids, expert_ids, num_post_padded, b.shape[1], b.shape[2],
                 em, a.shape[0] * top_k, a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1),
                 c.stride(1), c.stride(2), 0, 0, 0, 0, 0, 0, 0, MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k,
                 compute_type=tl.bfloat16 if a.dtype == torch.bfloat16 else tl.float16, use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
                 per_channel_quant=False, BLOCK_SIZE_K=block_k, **config)


def num_compiled(kernel) -> int:
    """Kernels Triton holds compiled for this function (its per-device caches)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", required=True, help="vLLM's tuned configuration file for the shape")
    ap.add_argument("--kernel", help="a file defining vLLM's fused_moe_kernel (default: import it from vLLM)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=7168, help="per GPU")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-capture-size", type=int, default=256, help="the largest CUDA-graph batch")
    args = ap.parse_args()
    kernel = load_kernel(args.kernel)
    with open(args.configs) as f:
        configs = {int(k): v for k, v in json.load(f).items()}
    torch.manual_seed(0)
    dev = torch.device("cuda")
    e, top_k, hidden, inter = args.experts, args.top_k, args.hidden, args.intermediate
    w1 = torch.randn(e, 2 * inter, hidden, dtype=torch.bfloat16, device=dev) * 0.02
    w2 = torch.randn(e, hidden, inter, dtype=torch.bfloat16, device=dev) * 0.02

    def step(m: int) -> tuple[int, float, int]:
        """One fused MoE over ``m`` tokens; returns (kernels compiled by it, its wall time in ms, config key)."""
        key = min(configs, key=lambda k: abs(k - m))  # vLLM's try_get_optimal_moe_config
        config = configs[key]
        x = torch.randn(m, hidden, dtype=torch.bfloat16, device=dev)
        scores = torch.rand(m, e, device=dev)
        topk_weights, topk_ids = scores.topk(top_k, dim=1)
        sorted_ids, expert_ids, post = moe_align(topk_ids, config["BLOCK_SIZE_M"], e)
        cache1 = torch.empty(m, top_k, 2 * inter, dtype=torch.bfloat16, device=dev)
        cache3 = torch.empty(m, top_k, hidden, dtype=torch.bfloat16, device=dev)
        torch.cuda.synchronize()
        before, t0 = num_compiled(kernel), time.perf_counter()
        invoke(kernel, x, w1, cache1, topk_weights, sorted_ids, expert_ids, post, False, top_k, config)
        gate, up = cache1.view(-1, 2 * inter).chunk(2, dim=1)
        cache2 = torch.nn.functional.silu(gate) * up
        invoke(kernel, cache2, w2, cache3, topk_weights, sorted_ids, expert_ids, post, True, 1, config)
        torch.cuda.synchronize()
        return num_compiled(kernel) - before, (time.perf_counter() - t0) * 1000.0, key

    rows = []
    capture = [1, 2, 4] + list(range(8, args.max_capture_size + 1, 8))
    # Start-up: the profiling run at the token budget, then CUDA-graph capture from the largest batch down.
    for phase, sizes in (("profile_run", [args.max_num_batched_tokens]), ("graph_capture", capture[::-1]),
                         ("serving", range(args.max_capture_size + 1, args.max_num_batched_tokens + 1))):
        for m in sizes:
            compiled, ms, key = step(m)
            c = configs[key]
            rows.append({"phase": phase, "num_tokens": m, "config_key": key, "block_m": c["BLOCK_SIZE_M"],
                         "block_n": c["BLOCK_SIZE_N"], "block_k": c["BLOCK_SIZE_K"], "group_m": c["GROUP_SIZE_M"],
                         "num_warps": c["num_warps"], "num_stages": c["num_stages"], "kernels_compiled": compiled,
                         "call_ms": round(ms, 3)})
            if compiled:
                print(rows[-1], flush=True)
    rows.append({"phase": "total", "num_tokens": 0, "config_key": 0, "block_m": 0, "block_n": 0, "block_k": 0,
                 "group_m": 0, "num_warps": 0, "num_stages": 0, "kernels_compiled": num_compiled(kernel),
                 "call_ms": 0.0})
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
