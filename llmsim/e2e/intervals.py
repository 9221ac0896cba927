"""Prediction intervals for the end-to-end replays: the calibration's held-out kernel errors, carried through the
simulation by Monte Carlo.

``llmsim validate`` reports how far each kernel model is from measurements it never saw. In a replay a kernel's
error is systematic (the same shapes run every step), so one sample draws, for each kernel group (GEMMs, prefill
attention, decode attention, collectives, the rest), the measured / predicted ratio of one held-out row at random
and scales that group's modelled times by it (``hardware.time_factors``). Every run is replayed under the same
samples; a metric's interval is the 5th to 95th percentile of its values over them.

Held out means what the profile's own fit did not see (its recorded split), measured on the software stack the
curves model: GEMM rows of another stack (``calibration.gemm_source``) are a different engine, not an error of
this one, and are left out, as are rows under 10 us (launch-scale kernels no serving step is made of) and
decode-attention rows whose KV sits in L2.
"""

from __future__ import annotations

import numpy as np

from llmsim.calibration.fit import l2_resident
from llmsim.calibration.predict import is_link_kind, predict_s
from llmsim.calibration.workflow import profile_measurements
from llmsim.errors import ConfigError
from llmsim.execution.model import KERNEL_GROUPS, kernel_group

MIN_MEASURED_S = 10e-6
LOW, HIGH = 5.0, 95.0  # percentiles of the interval


def held_out_ratios(device: str) -> dict[str, np.ndarray]:
    """Measured / predicted time of every held-out kernel row of the device's profile, by kernel group."""
    profile, rows, split = profile_measurements(device)
    if rows is None:
        raise ConfigError(f"--intervals: profile {profile.name} has no calibration measurements to draw "
                          "kernel errors from")
    held = split.held_out(rows.df) & ~split.other_gemm_source(rows) & ~l2_resident(profile, rows)
    ratio = rows.measured_s / predict_s(profile, rows)
    usable = held & np.isfinite(ratio) & (ratio > 0) & (rows.measured_s >= MIN_MEASURED_S) & (
        rows.kind != "unmodelled")
    groups = np.array(["collective" if is_link_kind(k) else kernel_group(k) for k in rows.kind])
    return {g: ratio[usable & (groups == g)] for g in KERNEL_GROUPS if (usable & (groups == g)).any()}


def draw_factors(ratios: dict[str, np.ndarray], num_samples: int, seed: int = 0) -> list[dict[str, float]]:
    """``num_samples`` sets of per-group time factors, each one held-out ratio per group (deterministic)."""
    rng = np.random.default_rng(seed)
    return [{g: float(r[rng.integers(len(r))]) for g, r in ratios.items()} for _ in range(num_samples)]


def interval_bounds(samples: np.ndarray) -> tuple[float, float]:
    """The 5th and 95th percentile of one metric's values over the samples (NaN where none is finite)."""
    finite = samples[np.isfinite(samples)]
    if not len(finite):
        return float("nan"), float("nan")
    return float(np.percentile(finite, LOW)), float(np.percentile(finite, HIGH))


def ratio_summary(ratios: dict[str, np.ndarray]) -> list[tuple[str, int, float, float, float]]:
    """(group, rows, 5th, 50th, 95th percentile of measured / predicted) for the report."""
    return [(g, len(r), *np.percentile(r, [LOW, 50.0, HIGH])) for g, r in ratios.items()]

