"""What prefix caching costs the simulator: each shipped experiment with named prompt content, run with
``scheduler.enable_prefix_caching`` on and off (alternately), ``--repeat`` runs each.

With the cache on, the simulated engine itself changes: prefills shrink, so steps are shorter and there are more
of them. The table gives the loop's wall time and its wall time per simulated iteration; the second is what the
cache's bookkeeping costs per step. The machine's speed drifts between runs, so beside the ratio of the best runs
it gives the median over the back-to-back on/off pairs (whose order alternates) of their per-iteration ratio.

    python benchmarks/bench_prefix_caching.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from llmsim.config import load_config
from llmsim.execution.model import forget_shared_costs
from llmsim.run import run_experiment

EXPERIMENTS = Path(__file__).parent.parent / "experiments"


def loop_times(name: str, repeat: int) -> dict[bool, tuple[list[float], int]]:
    """Loop times of every run and the iterations with the cache on and off; each repetition runs the two back
    to back, in alternating order, so that a change in the machine's load falls on both."""
    cfgs = {on: load_config(EXPERIMENTS / f"{name}.yaml", {"scheduler.enable_prefix_caching": on})
            for on in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    iterations = {}
    for i in range(repeat):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            forget_shared_costs()  # each run prices its steps from cold, as a run in a process of its own does
            result, summary = run_experiment(cfgs[on], write=False)
            times[on].append(result.wall_s)
            iterations[on] = summary["utilization"]["iterations"]
    return {on: (times[on], iterations[on]) for on in (True, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print("| experiment | loop s, cache on | off | ratio | iterations on | off | us per iteration on | off | ratio | "
          "median of pairs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("shared_prefix", "conversations", "mooncake_routing"):
        times = loop_times(name, args.repeat)
        (on_runs, on_n), (off_runs, off_n) = times[True], times[False]
        on_s, off_s = min(on_runs), min(off_runs)
        on_us, off_us = on_s / on_n * 1e6, off_s / off_n * 1e6
        pairs = statistics.median(a / on_n / (b / off_n) for a, b in zip(on_runs, off_runs))
        print(f"| {name} | {on_s:.2f} | {off_s:.2f} | {on_s / off_s:.2f} | {on_n:,} | {off_n:,} | {on_us:.2f} | "
              f"{off_us:.2f} | {on_us / off_us:.2f} | {pairs:.2f} |")


if __name__ == "__main__":
    main()
