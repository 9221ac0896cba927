"""What the microbenchmark suite's L2 flush does to a GEMM's measured time (needs a CUDA GPU).

Each GEMM is timed four ways, the first three by the suite's timer (median of 20 CUDA-event-bracketed
repetitions): after overwriting a 256 MB buffer (a write flush, which leaves the L2 full of dirty lines), after
reading it (the suite's flush) and with no flush; the fourth per GEMM inside a CUDA graph of GEMMs over distinct
weights larger than the L2 together (no flush: what a forward pass does, and the reference the other three are
judged by).

    python benchmarks/bench_l2_flush.py
"""

from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F

from llmsim.microbench.timer import Timer

SHAPES = [(1, 4096, 4096), (1, 8192, 8192), (1, 16384, 8192), (16, 8192, 8192), (128, 8192, 8192), (1, 1024, 1024),
          (1024, 8192, 8192), (4096, 4096, 4096), (8192, 8192, 8192)]  # (tokens m, output n, inner k)


def timed_us(fn, flush: str) -> float:
    """The suite's timer (``llmsim.microbench.timer.Timer``) with the given flush: median of 20 repetitions."""
    return Timer(torch.device("cuda"), warmup=3, repetitions=20, flush=flush)(fn).median_ms * 1e3


def graph_us(m: int, n: int, k: int, copies: int, repetitions: int = 10) -> float:
    """Per GEMM, in a CUDA graph of ``copies`` GEMMs over distinct weights."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch asks
        for w in weights:
            F.linear(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            F.linear(x, w)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / copies)
    return statistics.median(times) * 1e3


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench_l2_flush.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    print(torch.cuda.get_device_name(0))
    print("| m | n | k | weights MB | write flush us | read flush us | no flush us | CUDA graph us |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, n, k in SHAPES:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        fn = lambda: F.linear(x, w)  # noqa: E731
        modes = [timed_us(fn, flush) for flush in ("write", "read", "none")]
        copies = max(4, min(24, int(2.5e9 // (n * k * 2))))  # 2.5 GB of weights in all: far above any L2
        cols = modes + [graph_us(m, n, k, copies)]
        print(f"| {m} | {n} | {k} | {n * k * 2 / 1e6:.0f} | " + " | ".join(f"{v:.1f}" for v in cols) + " |")


if __name__ == "__main__":
    main()
