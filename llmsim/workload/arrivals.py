"""Arrival processes: inter-arrival gaps drawn in blocks, yielded one at a time."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llmsim.config import ArrivalProcess, Gamma, Poisson

BLOCK = 4096  # draws per numpy call: amortises call overhead, keeps memory flat


def arrival_times(process: ArrivalProcess, rng: np.random.Generator) -> Iterator[float]:
    """Absolute arrival times (s), starting from the first gap after t = 0."""
    t = 0.0
    while True:
        if isinstance(process, Poisson):
            gaps = rng.exponential(1.0 / process.rate_per_s, BLOCK)
        elif isinstance(process, Gamma):
            # Gamma with mean 1/rate and coefficient of variation cv: shape k = 1/cv^2, scale = 1/(rate k).
            shape = 1.0 / process.cv**2
            gaps = rng.gamma(shape, 1.0 / (process.rate_per_s * shape), BLOCK)
        else:  # pragma: no cover - the config union admits nothing else
            raise TypeError(process)
        for gap in gaps.tolist():
            t += gap
            yield t
