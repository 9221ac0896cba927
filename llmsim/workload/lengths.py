"""Token-length distributions, and joint (prompt, output) sampling from a trace."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from llmsim.config import Fixed, LengthDist, LogNormal, Uniform, Zipf

BLOCK = 4096


def sample_lengths(dist: LengthDist, rng: np.random.Generator, size: int) -> np.ndarray:
    if isinstance(dist, Fixed):
        return np.full(size, dist.value, dtype=np.int64)
    if isinstance(dist, Uniform):
        return rng.integers(dist.min, dist.max + 1, size)
    if isinstance(dist, Zipf):
        # Bounded Zipf by inverse CDF over the support: exact for any a > 0 (numpy's zipf needs a > 1).
        support = np.arange(dist.min, dist.max + 1)
        cdf = np.cumsum(support.astype(float) ** -dist.a)
        cdf /= cdf[-1]
        return support[np.searchsorted(cdf, rng.random(size), side="right").clip(0, len(support) - 1)]
    if isinstance(dist, LogNormal):
        draws = rng.lognormal(np.log(dist.median), dist.sigma, size)
        return np.clip(np.rint(draws), dist.min, dist.max).astype(np.int64)
    raise TypeError(dist)  # pragma: no cover


def length_pairs(prompt: LengthDist, output: LengthDist, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """Independent prompt and output lengths, drawn in blocks."""
    while True:
        p = sample_lengths(prompt, rng, BLOCK).tolist()
        o = sample_lengths(output, rng, BLOCK).tolist()
        yield from zip(p, o)


def empirical_pairs(prompts: np.ndarray, outputs: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """Joint (prompt, output) pairs resampled with replacement, keeping their correlation."""
    if len(prompts) == 0:
        raise ValueError("empirical length source has no rows")
    while True:
        idx = rng.integers(0, len(prompts), BLOCK)
        yield from zip(prompts[idx].tolist(), outputs[idx].tolist())
