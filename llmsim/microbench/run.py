"""``llmsim microbench``: measure every op of the grid on one device and write the measurements schema."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pandas as pd
import torch

from llmsim.calibration.measurements import normalize, write_measurements
from llmsim.microbench.collectives import measure_collectives
from llmsim.microbench.grid import GRIDS, Grid, compute_specs
from llmsim.microbench.kernels import attention_kernel, layer_kernel, memcpy_kernel
from llmsim.microbench.timer import Timer, device_name, torch_device


def _kernel(spec: dict, device: torch.device) -> Callable[[], object]:
    if spec["op"] == "memcpy":
        return memcpy_kernel(int(spec["size_bytes"]), device)
    row = SimpleNamespace(**{k: spec.get(k, float("nan")) for k in
                             ("op", "dtype", "tp", "num_tokens", "n_head", "n_kv_head", "n_embd", "n_expanded_embd",
                              "vocab_size", "gated", "batch_size", "seq_len", "kv_len")})
    if spec["op"] in ("attn_prefill", "attn_decode"):
        return attention_kernel(row, device)
    return layer_kernel(row, device)


def run_microbench(device_kind: str, grid: Grid, dtype: str, warmup: int, repetitions: int,
                   collectives: bool = True, on_progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    device = torch_device(device_kind)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    timer = Timer(device, warmup, repetitions)
    name = device_name(device)
    rows = []
    with torch.inference_mode():
        for spec in compute_specs(grid, dtype):
            timing = timer(_kernel(spec, device))
            rows.append({**spec, **vars(timing)})
            if on_progress:
                on_progress(1)
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
         collectives: bool, quiet: bool) -> pd.DataFrame:
    from tqdm import tqdm

    grid = GRIDS[grid_name]
    dtype = dtype or ("fp32" if device_kind == "cpu" else "bf16")
    total = len(compute_specs(grid, dtype))
    with tqdm(total=total, unit="op", desc="microbench", disable=quiet or None, leave=False) as bar:
        df = run_microbench(device_kind, grid, dtype, warmup, repetitions, collectives, bar.update)
    write_measurements(df, out)
    return df
