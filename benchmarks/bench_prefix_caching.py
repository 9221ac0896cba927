"""What prefix caching costs the simulator: each shipped experiment with named prompt content, run with
``scheduler.enable_prefix_caching`` on and off, best of ``--repeat`` runs each.

With the cache on, the simulated engine itself changes: prefills shrink, so steps are shorter and there are more
of them. The table gives the loop's wall time and its wall time per simulated iteration; the second is what the
cache's bookkeeping costs per step.

    python benchmarks/bench_prefix_caching.py [--repeat 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmsim.config import load_config
from llmsim.run import run_experiment

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


def loop_time(name: str, caching: bool, repeat: int) -> tuple[float, int]:
    cfg = load_config(EXPERIMENTS / f"{name}.yaml", {"scheduler.enable_prefix_caching": caching})
    best, iterations = float("inf"), 0
    for _ in range(repeat):
        result, summary = run_experiment(cfg, write=False)
        best = min(best, result.wall_s)
        iterations = summary["utilization"]["iterations"]
    return best, iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| experiment | loop s, cache on | off | ratio | iterations on | off | us per iteration on | off | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("shared_prefix", "conversations", "mooncake_routing"):
        on_s, on_n = loop_time(name, True, args.repeat)
        off_s, off_n = loop_time(name, False, args.repeat)
        on_us, off_us = on_s / on_n * 1e6, off_s / off_n * 1e6
        print(f"| {name} | {on_s:.2f} | {off_s:.2f} | {on_s / off_s:.2f} | {on_n:,} | {off_n:,} | {on_us:.2f} | "
              f"{off_us:.2f} | {on_us / off_us:.2f} |")


if __name__ == "__main__":
    main()
