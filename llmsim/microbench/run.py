"""``llmsim microbench``: measure every op of the grid on one device and write the measurements schema."""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pandas as pd
import torch

from llmsim.calibration.measurements import COLLECTIVE_OPS, normalize, write_measurements
from llmsim.microbench.collectives import measure_collectives
from llmsim.microbench.grid import GRIDS, Grid, compute_specs
from llmsim.microbench.kernels import (attention_kernel, fp8_block_gemm_kernel, fp8_gemm_kernel, gemm_kernel,
                                       layer_kernel, memcpy_kernel, moe_bytes, moe_kernel)
from llmsim.microbench.timer import Timer, Timing, device_name, torch_device


# The bare GEMMs in FP8, by dtype: each kernel returns itself and the impl that ran (the row's ``impl`` column).
_FP8_GEMM_KERNELS = {"fp8": fp8_gemm_kernel, "fp8_block": fp8_block_gemm_kernel}


def _kernel(spec: dict, device: torch.device, tensors: dict) -> Callable[[], object]:
    if spec["op"] == "memcpy":
        return memcpy_kernel(int(spec["size_bytes"]), device)
    fp8_kernel = _FP8_GEMM_KERNELS.get(spec["dtype"]) if spec["op"] == "gemm" else None
    if fp8_kernel is not None:
        kernel, spec["impl"] = fp8_kernel(int(spec["num_tokens"]), int(spec["gemm_n"]), int(spec["gemm_k"]), device,
                                          tensors)
        return kernel
    if spec["op"] == "moe":
        kernel, spec["impl"] = moe_kernel(SimpleNamespace(**spec), device, tensors)
        return kernel
    if spec["op"] == "gemm":
        return gemm_kernel(int(spec["num_tokens"]), int(spec["gemm_n"]), int(spec["gemm_k"]), spec["dtype"], device,
                           tensors)
    row = SimpleNamespace(**{k: spec.get(k, float("nan")) for k in
                             ("op", "dtype", "tp", "num_tokens", "n_head", "n_kv_head", "n_embd", "n_expanded_embd",
                              "vocab_size", "gated", "batch_size", "seq_len", "kv_len")})
    if spec["op"] in ("attn_prefill", "attn_decode"):
        return attention_kernel(row, device)
    return layer_kernel(row, device, tensors)


def has_fp8(device: torch.device) -> bool:
    """Whether the device has FP8 tensor cores torch's ``_scaled_mm`` runs on: NVIDIA compute capability 8.9 (Ada)
    and above. ROCm's FP8 formats differ (e4m3fnuz on MI300) and are not timed."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 9)


def _free_bytes(device: torch.device) -> int:
    """Memory free on the device (a CPU: the host's available memory, where the OS says)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux
        return sys.maxsize


def fp8_gemm_dtypes(device: torch.device, fp8: bool | None = None) -> tuple[str, ...]:
    """The FP8 forms of the bare GEMMs to time on ``device``: per-tensor W8A8 (``fp8``) where it has FP8 tensor
    cores (``has_fp8``; ``fp8`` forces it either way), and block-scaled (``fp8_block``) where it also has Triton,
    whose kernels quantize the activations per group and run the fallback GEMM (``fp8_block.py``)."""
    fp8_cores = has_fp8(device)
    if not (fp8_cores if fp8 is None else fp8):
        return ()
    return ("fp8", "fp8_block") if fp8_cores and importlib.util.find_spec("triton") else ("fp8",)


def measured_specs(grid: Grid, dtype: str, fp8: bool | None, device: torch.device,
                   ops: tuple[str, ...] | None = None) -> list[dict]:
    """The grid's rows (of ``ops`` only, where given) this device can hold: a fused-MoE row needs every expert's
    weights at once (DeepSeek-V3's at TP 1 are 22.5 GB in bf16), so rows that would not fit in nine tenths of the
    free memory are left out, and a note says which, rather than the run ending in an out-of-memory error partway."""
    specs = compute_specs(grid, dtype, fp8_gemm_dtypes(device, fp8))
    if ops is not None:
        specs = [s for s in specs if s["op"] in ops]
    room = 0.9 * _free_bytes(device)
    fits = [s["op"] != "moe" or moe_bytes(s) <= room for s in specs]
    if not all(fits):
        too_big = [s for s, ok in zip(specs, fits) if not ok]
        shapes = sorted({f"{s['model']} tp {s['tp']}" for s in too_big})
        print(f"llmsim: note: microbench leaves out {len(too_big)} fused-MoE rows that need more than the "
              f"{room / 2**30:.1f} GiB this device has free: {', '.join(shapes)}", file=sys.stderr)
        specs = [s for s, ok in zip(specs, fits) if ok]
    return specs


# On a CPU the grid is timed in interleaved rounds: a shared machine's load comes and goes over minutes, and
# timing each row in one block would let a busy spell land on one model's rows only (for example every row of
# the model a calibration holds out). Spread over rounds, a busy spell slows every row alike, and the median
# of a row's samples discards it. A GPU has the device to itself: one round.
CPU_ROUNDS = 5


def run_microbench(device_kind: str, grid: Grid, dtype: str, warmup: int, repetitions: int,
                   collectives: bool = True, on_progress: Callable[[int], None] | None = None,
                   threads: int | None = None, fp8: bool | None = None,
                   specs: list[dict] | None = None) -> pd.DataFrame:
    """``fp8``: time the bare GEMMs in FP8 too (None: where the device has FP8 tensor cores; ``fp8_gemm_dtypes``).
    ``specs``: the rows to time, where the caller has them already (default: ``measured_specs`` of the grid)."""
    device = torch_device(device_kind)
    if specs is None:
        specs = measured_specs(grid, dtype, fp8, device)
    if device.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    rounds = min(CPU_ROUNDS, repetitions) if device.type == "cpu" else 1
    timers = [Timer(device, warmup, repetitions // rounds + (k < repetitions % rounds)) for k in range(rounds)]
    name = device_name(device)
    samples: list[list[float]] = [[] for _ in specs]
    with torch.inference_mode():
        for timer in timers:
            tensors: dict = {}  # random inputs by shape, kept while one model shard's rows are timed
            shard = None
            for spec, times in zip(specs, samples):
                if (spec.get("model"), spec.get("tp")) != shard:
                    tensors.clear()
                    shard = (spec.get("model"), spec.get("tp"))
                times += timer.samples(_kernel(spec, device, tensors))
                if on_progress:
                    on_progress(1)
    rows = [{**spec, **vars(Timing.of(times))} for spec, times in zip(specs, samples)]
    if collectives:
        for world in grid.world_sizes:
            # Collectives between processes on a shared host are noisier than kernels: take three times the samples.
            rows += measure_collectives(device_kind, world, list(grid.collective_bytes), warmup, 3 * repetitions)
    df = pd.DataFrame(rows)
    df["device"] = device_kind
    df["torch_version"] = torch.__version__
    df["date"] = dt.date.today().isoformat()
    df["source"] = f"llmsim microbench on {name}"
    return normalize(df)


def main(device_kind: str, out: Path, grid_name: str, dtype: str | None, warmup: int, repetitions: int,
         collectives: bool, quiet: bool, threads: int | None = None, ops: tuple[str, ...] | None = None
         ) -> pd.DataFrame:
    """``ops``: time only the grid's rows of these ops (the collectives only if one of them is a collective)."""
    from llmsim.progress import progress

    grid = GRIDS[grid_name]
    dtype = dtype or ("fp32" if device_kind == "cpu" else "bf16")
    device = torch_device(device_kind)
    specs = measured_specs(grid, dtype, None, device, ops)  # once: its note too
    if ops is not None:
        collectives = collectives and any(op in COLLECTIVE_OPS for op in ops)
        if not specs and not collectives:
            raise ValueError(f"--grid {grid_name} has no rows of {', '.join(ops)} on this device")
    total = len(specs) * (min(CPU_ROUNDS, repetitions) if device_kind == "cpu" else 1)
    with progress(total, "op", "microbench", quiet) as bar:
        df = run_microbench(device_kind, grid, dtype, warmup, repetitions, collectives, bar.update, threads,
                            specs=specs)
    write_measurements(df, out)
    return df
