"""Timing one kernel on one device: warm-up, synchronisation, repetitions, median and spread.

On CUDA and ROCm (torch exposes both as ``cuda``) each repetition is bracketed by CUDA events, and a buffer larger
than the L2 cache is read before it, so weights are read from HBM as they are in a real forward pass (the next
layer's weights are never still in cache). On CPU, ``perf_counter_ns`` brackets each call, and a buffer half as
large again as the last-level cache (as the OS reports it; at most ``_CPU_FLUSH_MAX_BYTES``) is read before it, for
the same reason: a shape's weights that fit in the cache would otherwise be timed from it or from memory depending
on what else the machine runs, and the grid's small shapes then time two ways from one run to the next.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB, MI325X: 256 MB Infinity Cache)
# A CPU's flush reads 1.5x its last-level cache, up to this much (a server's LLC of hundreds of MB would cost
# tens of ms a repetition; weights that big are past the grid's shapes anyway).
_CPU_FLUSH_MAX_BYTES = 128 * 2**20
_CPU_FLUSH_DEFAULT_BYTES = 64 * 2**20  # where the OS does not say


@dataclass(frozen=True)
class Timing:
    median_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    repetitions: int

    @staticmethod
    def of(times: list[float]) -> "Timing":
        return Timing(statistics.median(times), statistics.fmean(times),
                      statistics.stdev(times) if len(times) > 1 else 0.0, min(times), max(times), len(times))


def torch_device(kind: str) -> torch.device:
    """``cpu``, ``cuda`` or ``rocm`` (a ROCm build of torch drives AMD GPUs through the ``cuda`` API)."""
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {kind}: torch {torch.__version__} sees no GPU")
    is_rocm = torch.version.hip is not None
    if (kind == "rocm") != is_rocm:
        raise RuntimeError(f"--device {kind}: this torch build is for {'ROCm' if is_rocm else 'CUDA'}")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


class Timer:
    def __init__(self, device: torch.device, warmup: int, repetitions: int, flush: str = "read"):
        """``flush`` (GPUs): how the L2 is emptied before each repetition: ``read`` a buffer larger than it (the
        suite's), ``write`` it, or ``none`` (``benchmarks/bench_l2_flush.py`` compares them)."""
        if flush not in ("read", "write", "none"):
            raise ValueError(f"flush {flush!r}: read, write or none")
        self.device, self.warmup, self.repetitions, self.flush = device, warmup, repetitions, flush
        if device.type == "cuda":
            self._flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
        else:
            self._flush = None if flush == "none" else _cpu_flush_buffer(_cpu_flush_bytes())

    def __call__(self, fn: Callable[[], object]) -> Timing:
        return Timing.of(self.samples(fn))

    def samples(self, fn: Callable[[], object]) -> list[float]:
        """Milliseconds of each repetition, after the warm-up calls."""
        for _ in range(self.warmup):
            fn()
        return self._cuda_times(fn) if self.device.type == "cuda" else self._cpu_times(fn)

    def _cpu_times(self, fn) -> list[float]:
        times = []
        for _ in range(self.repetitions):
            if self.flush == "read":
                self._flush.sum()
            elif self.flush == "write":
                self._flush.fill_(1.0)
            start = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - start) / 1e6)
        return times

    def _cuda_times(self, fn) -> list[float]:
        pairs = []
        for _ in range(self.repetitions):
            # Evict the L2 by reading the buffer. Overwriting it (zero_) left an L2's worth of dirty lines that the
            # timed kernel paid to write back: on an H100, 1-token GEMMs over 134 and 268 MB of weights timed 59 and
            # 106 us after a write flush, 50 and 97 us after a read flush, and 48 and 95 us per GEMM in a CUDA graph
            # of GEMMs over distinct weights (no flush: what a forward pass does; benchmarks/bench_l2_flush.py).
            if self.flush == "read":
                self._flush.sum()
            elif self.flush == "write":
                self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in pairs]


def _cpu_flush_bytes(cache_dir: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """1.5x the largest CPU cache the OS lists (Linux sysfs), at most ``_CPU_FLUSH_MAX_BYTES``."""
    sizes = []
    for entry in cache_dir.glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    if not sizes:
        return _CPU_FLUSH_DEFAULT_BYTES
    return min(int(1.5 * max(sizes)), _CPU_FLUSH_MAX_BYTES)


@functools.lru_cache(maxsize=1)
def _cpu_flush_buffer(num_bytes: int) -> torch.Tensor:
    """One buffer for every CPU timer of the process (a run makes a timer per round); written once, so reading it
    touches memory rather than the zero page."""
    return torch.ones(num_bytes // 4, dtype=torch.float32)
