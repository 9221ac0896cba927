"""Simulation speed: simulated requests per wall-second and peak memory.

Default workload (issue targets): Llama-2-7B on A100-80GB, TP1, 16 replicas, Poisson arrivals, 100,000
requests, mean prompt ~2k tokens, mean output ~200 tokens.

    python benchmarks/bench_sim_speed.py [--requests N] [--replicas R] [--rate RPS] [--step] [--workers W] [--profile]

Replay a BurstGPT-format CSV instead (see make_burstgpt_like.py), without per-iteration records:

    python benchmarks/bench_sim_speed.py --trace results/burstgpt_like_1m.csv --requests 1000000 --no-iteration-records
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from llmsim.config import parse_config
from llmsim.run import run_experiment


def config(num_requests: int, num_replicas: int, rate: float, fast_forward: bool, output_median: float,
           trace: str | None = None, record_iterations: bool = True, scheduler: str = "fcfs",
           prefix_caching: bool | None = None, chunk_size: int = 512, workers: int = 1):
    if trace:
        # Failed rows (Response tokens == 0) arrive and are rejected with a reason, so every row is a request.
        workload = {"num_requests": num_requests, "trace": {"path": trace, "format": "burstgpt", "failed": "reject"}}
    else:
        workload = {
            "num_requests": num_requests,
            "arrival": {"kind": "poisson", "rate_per_s": rate},
            # lognormal(median, sigma) has mean median * exp(sigma^2 / 2): ~1,950 and ~200 tokens.
            "prompt_tokens": {"kind": "lognormal", "median": 1650, "sigma": 0.55, "min": 16, "max": 3500},
            "output_tokens": {"kind": "lognormal", "median": output_median, "sigma": 0.6, "min": 1,
                              "max": round(590 * output_median / 168)},
        }
    return parse_config({
        "name": "speed-benchmark",
        "seed": 1,
        "model": {"name": "Llama-2-7B"},
        "hardware": {"device": "a100-80gb"},
        "cluster": {"num_replicas": num_replicas, "router": "round_robin"},
        "scheduler": {"name": scheduler, "max_num_batched_tokens": 4096, "chunk_size": chunk_size,
                      **({} if prefix_caching is None else {"enable_prefix_caching": prefix_caching})},
        "workload": workload,
        "simulation": {"fast_forward": fast_forward, "record_iterations": record_iterations, "workers": workers},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--rate", type=float, default=40.0, help="cluster arrival rate, requests/s")
    ap.add_argument("--output-median", type=float, default=168.0)
    ap.add_argument("--scheduler", choices=("fcfs", "sarathi", "vllm_v1"), default="fcfs")
    ap.add_argument("--no-prefix-caching", action="store_true", help="vllm_v1 without prefix caching")
    ap.add_argument("--chunk-size", type=int, default=512, help="sarathi's token budget per step")
    ap.add_argument("--step", action="store_true", help="step every iteration (no fast-forward)")
    ap.add_argument("--trace", help="replay this BurstGPT-format CSV instead of the synthetic workload")
    ap.add_argument("--no-iteration-records", action="store_true", help="keep only iteration totals (less memory)")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes simulating the replicas (simulation.workers; identical results)")
    ap.add_argument("--profile", action="store_true", help="print a pyinstrument profile (needs pyinstrument)")
    args = ap.parse_args()
    cfg = config(args.requests, args.replicas, args.rate, not args.step, args.output_median, args.trace,
                 not args.no_iteration_records, args.scheduler,
                 False if args.no_prefix_caching else None, args.chunk_size, args.workers)
    profiler = None
    if args.profile:
        from pyinstrument import Profiler
        profiler = Profiler()
        profiler.start()
    t0 = time.perf_counter()
    result, summary = run_experiment(cfg, write=False)
    wall = time.perf_counter() - t0
    if profiler:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    r = summary["requests"]
    print(f"requests={args.requests} replicas={args.replicas} rate={args.rate}/s "
          f"scheduler={args.scheduler} mode={'step' if args.step else 'fast-forward'} workers={args.workers}")
    print(f"finished={r['finished']} rejected={r['rejected']} preemptions={r['preemptions']} "
          f"iterations={summary['utilization']['iterations']} "
          f"simulated={summary['simulation']['simulated_s']:.0f}s")
    print(f"simulation loop: {result.wall_s:.2f} s -> {args.requests / result.wall_s:,.0f} simulated requests/s")
    print(f"end to end (incl. summary): {wall:.2f} s; peak RSS {peak_mib:,.0f} MiB; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
