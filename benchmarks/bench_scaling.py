"""How simulation wall time grows with requests, replicas, output length and Sarathi's chunk size (the speed
benchmark's workload; FCFS unless the row says otherwise).

Each row is one run of ``bench_sim_speed.config``; "us per token" is loop wall time divided by simulated tokens
(prompt + output), which should stay flat or fall if cost grows no worse than linearly in simulated tokens.
Load is held constant: the arrival rate scales with replicas, and inversely with output length.

    python benchmarks/bench_scaling.py
"""

from __future__ import annotations

import time

from bench_sim_speed import config

from llmsim.execution.model import forget_shared_costs
from llmsim.run import run_experiment


def run(label: str, requests: int, replicas: int, output_median: float, scheduler: str = "fcfs",
        chunk_size: int = 512) -> None:
    rate = 2.5 * replicas * 168.0 / output_median  # 40 req/s on 16 replicas at the default output length
    cfg = config(requests, replicas, rate, True, output_median, record_iterations=False, scheduler=scheduler,
                 chunk_size=chunk_size)
    forget_shared_costs()  # each row prices its steps from cold, as a run in a process of its own does
    t0 = time.perf_counter()
    result, summary = run_experiment(cfg, write=False)
    total = time.perf_counter() - t0
    records = result.recorder.requests
    output_tokens = sum(records["num_generated_tokens"])
    tokens = sum(records["num_prompt_tokens"]) + output_tokens
    print(f"| {label} | {requests:,} | {replicas} | {output_median:.0f} | {tokens / 1e6:.1f} M | {output_tokens / 1e6:.1f} M | "
          f"{summary['utilization']['iterations']:,} | {result.wall_s:.2f} | {total:.2f} | "
          f"{requests / result.wall_s:,.0f} | {result.wall_s / tokens * 1e6:.3f} |")


def main() -> None:
    print("| sweep | requests | replicas | output median | simulated tokens | output tokens | iterations | loop s | "
          "total s | req/s | us per token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in (12_500, 25_000, 50_000, 100_000):
        run("requests", n, 16, 168.0)
    for replicas in (4, 16, 64):
        run("replicas", 25_000, replicas, 168.0)
    for out in (84.0, 168.0, 336.0, 672.0):
        run("output length", 25_000, 16, out)
    for chunk in (256, 512, 1024, 2048):
        run(f"sarathi chunk {chunk}", 25_000, 16, 168.0, "sarathi", chunk)


if __name__ == "__main__":
    main()
