"""What the GPU benchmarks share: their command line and the suite's timer on a seeded CUDA device."""

from __future__ import annotations

import argparse
import csv

import torch

from llmsim.microbench.timer import Timer, device_name


def parse_args(doc: str, quick_help: str) -> argparse.Namespace:
    """``--out CSV`` and ``--quick`` (a smaller grid, described by ``quick_help``), with ``doc`` as the help."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap.parse_args()


def cuda_timer(warmup: int, repetitions: int) -> tuple[torch.device, Timer, str]:
    """The CUDA device (torch seeded), the suite's timer on it (CUDA events, the L2 flushed by reading before
    each repetition) and the device's name."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    return device, Timer(device, warmup=warmup, repetitions=repetitions), device_name(device)


def write_rows(path: str, rows: list[dict]) -> None:
    """The measured rows as a CSV, columns in the first row's order."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
