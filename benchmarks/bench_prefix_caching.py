"""What prefix caching costs the simulator: each shipped experiment with named prompt content, run with
``scheduler.enable_prefix_caching`` on and off (alternately), best of ``--repeat`` runs each.

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


def loop_times(name: str, repeat: int) -> dict[bool, tuple[float, int]]:
    """Best loop time and iterations with the cache on and off; the two alternate, so that a change in the
    machine's load falls on both."""
    cfgs = {on: load_config(EXPERIMENTS / f"{name}.yaml", {"scheduler.enable_prefix_caching": on})
            for on in (True, False)}
    best = {True: (float("inf"), 0), False: (float("inf"), 0)}
    for _ in range(repeat):
        for on, cfg in cfgs.items():
            result, summary = run_experiment(cfg, write=False)
            if result.wall_s < best[on][0]:
                best[on] = (result.wall_s, summary["utilization"]["iterations"])
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| experiment | loop s, cache on | off | ratio | iterations on | off | us per iteration on | off | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("shared_prefix", "conversations", "mooncake_routing"):
        times = loop_times(name, args.repeat)
        (on_s, on_n), (off_s, off_n) = times[True], times[False]
        on_us, off_us = on_s / on_n * 1e6, off_s / off_n * 1e6
        print(f"| {name} | {on_s:.2f} | {off_s:.2f} | {on_s / off_s:.2f} | {on_n:,} | {off_n:,} | {on_us:.2f} | "
              f"{off_us:.2f} | {on_us / off_us:.2f} |")


if __name__ == "__main__":
    main()
