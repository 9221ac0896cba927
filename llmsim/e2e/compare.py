"""Predicted vs measured, per load stage and for the whole run, in the table ``llmsim validate-e2e`` writes.

Metrics over the requests that succeeded (the client's view): ``ttft`` and ``e2e`` mean/p50/p90/p99 (seconds),
``tpot_mean`` = mean of (e2e - ttft) / (output - 1) over requests with more than one output token (the output
lengths the requests were replayed with, on both sides),
``request_throughput`` = succeeded requests / stage duration, ``errors`` = failed requests (client timeout).
``rel_error`` = predicted / measured - 1 (empty where the measured value is 0 or missing).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmsim.e2e.replay import Replayed
from llmsim.e2e.runs import MeasuredRun

COLUMNS = ("experiment", "stage", "metric", "predicted", "measured", "rel_error")
LATENCY = ("mean", "p50", "p90", "p99")


def _stats(name: str, values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if not len(values):
        return {f"{name}_{s}": float("nan") for s in LATENCY}
    return {f"{name}_mean": float(values.mean()), **{f"{name}_p{q}": float(np.percentile(values, q))
                                                     for q in (50, 90, 99)}}


def metrics(ttft: np.ndarray, e2e: np.ndarray, error: np.ndarray, outputs: np.ndarray, duration_s: float
            ) -> dict[str, float]:
    ok = ~error
    out = {**_stats("ttft", np.where(ok, ttft, np.nan)), **_stats("e2e", np.where(ok, e2e, np.nan))}
    many = ok & (outputs > 1)
    out["tpot_mean"] = float(((e2e[many] - ttft[many]) / (outputs[many] - 1)).mean()) if many.any() else float("nan")
    out["request_throughput"] = float(ok.sum() / duration_s) if duration_s > 0 else float("nan")
    out["errors"] = float(error.sum())
    return out


def compare(run: MeasuredRun, replayed: Replayed) -> pd.DataFrame:
    arrival = np.array([r["arrival_time_us"] for r in run.requests]) / 1e6
    m_ttft, m_e2e, m_error = run.measured_ttft_s(), run.measured_e2e_s(), run.measured_errors()
    p_outputs = replayed.outputs  # as replayed (``replay.requests_of``), for both sides
    stages = [(str(k), lo, hi) for k, (lo, hi) in enumerate(run.stages)]
    stages.append(("all", run.stages[0][0], run.stages[-1][1]))
    rows = []
    for stage, lo, hi in stages:
        sel = (arrival >= lo) & (arrival < hi) if stage != "all" else np.ones(len(arrival), dtype=bool)
        duration = hi - lo
        predicted = metrics(replayed.ttft_s[sel], replayed.e2e_s[sel], replayed.error[sel], p_outputs[sel], duration)
        measured = metrics(m_ttft[sel], m_e2e[sel], m_error[sel], p_outputs[sel], duration)
        for name in measured:
            p, m = predicted[name], measured[name]
            rel = p / m - 1.0 if (m and np.isfinite(m) and np.isfinite(p)) else float("nan")
            rows.append((run.name, stage, name, p, m, rel))
    return pd.DataFrame(rows, columns=list(COLUMNS))
