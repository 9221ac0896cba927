"""Power a GPU draws while idle, in a compute-bound GEMM loop, a memory-bound GEMM loop and a copy loop, with
the FLOP and byte rates it sustains there: the operating points the energy model (``llmsim/energy.py``) maps
from MFU and MBU to watts. Needs a CUDA GPU and NVML (``nvidia-ml-py``).

Each phase runs for ``--seconds``; NVML's power reading is sampled every 50 ms and the median of the phase's
second half is reported (the sensor averages over about a second). Rates come from CUDA events around the
phase's kernels.

    python benchmarks/bench_gpu_power.py [--seconds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch
import torch.nn.functional as F


class PowerSampler(threading.Thread):
    def __init__(self, handle, nvml) -> None:
        super().__init__(daemon=True)
        self.handle, self.nvml = handle, nvml
        self.samples: list[tuple[float, float]] = []  # (time s, watts)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3))
            time.sleep(0.05)

    def median_w(self, start: float, end: float) -> float:
        mid = (start + end) / 2
        return statistics.median(w for t, w in self.samples if mid <= t <= end)


def loop(fn, seconds: float) -> tuple[float, int]:
    """Run ``fn`` back to back for about ``seconds``; returns (GPU seconds per call, calls)."""
    fn()
    torch.cuda.synchronize()
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls, t0 = 0, time.perf_counter()
    start_ev.record()
    while time.perf_counter() - t0 < seconds:
        for _ in range(64):
            fn()
        calls += 64
        torch.cuda.synchronize()  # keep the queue short so the phase ends on time
    end_ev.record()
    torch.cuda.synchronize()
    return start_ev.elapsed_time(end_ev) / 1e3 / calls, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu_power.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import pynvml as nvml
    except ImportError:
        sys.exit("bench_gpu_power.py needs NVML's Python binding: pip install nvidia-ml-py")
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    limit_w = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3
    print(f"{torch.cuda.get_device_name(0)}; enforced power limit {limit_w:.0f} W")
    sampler = PowerSampler(handle, nvml)
    sampler.start()
    bf16 = torch.bfloat16
    big = torch.randn(8192, 8192, dtype=bf16, device="cuda")
    x16 = torch.randn(16, 8192, dtype=bf16, device="cuda")
    weights = [torch.randn(8192, 8192, dtype=bf16, device="cuda") for _ in range(16)]  # 2.1 GB: never in L2
    src = torch.empty(2**30 // 2, dtype=bf16, device="cuda")
    dst = torch.empty_like(src)
    ring = iter(range(1 << 62))
    phases = {
        "idle": None,
        "GEMM 8192^3 (compute-bound)": (lambda: big @ big, 2 * 8192**3, 3 * 8192 * 8192 * 2),
        "GEMM 16 x 8192 x 8192, 16 weights in turn (memory-bound)":
            (lambda: F.linear(x16, weights[next(ring) % 16]), 2 * 16 * 8192 * 8192,
             8192 * 8192 * 2 + 2 * 16 * 8192 * 2),
        "copy 1 GiB": (lambda: dst.copy_(src), 0, 2 * 2**30),
    }
    print("| phase | median W | TFLOP/s | TB/s (read + write) |")
    print("|---|---:|---:|---:|")
    for name, phase in phases.items():
        start = time.perf_counter()
        if phase is None:
            time.sleep(args.seconds)
            tflops = tbs = 0.0
        else:
            fn, flops, num_bytes = phase
            per_call, _ = loop(fn, args.seconds)
            tflops, tbs = flops / per_call / 1e12, num_bytes / per_call / 1e12
        print(f"| {name} | {sampler.median_w(start, time.perf_counter()):.0f} | {tflops:.0f} | {tbs:.2f} |")
        time.sleep(1.0)  # let the sensor settle between phases
    sampler.stop.set()


if __name__ == "__main__":
    main()
