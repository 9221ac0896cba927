"""The serving front end's latency (``cluster.frontend_latency_s``), fitted leave-one-model-out.

A measured TTFT is what the client saw: the engine's time plus what vLLM's API server adds (HTTP, tokenization,
the hop to the engine and back, detokenization, streaming). The simulator models the engine; the front end is
one constant per request, fitted here as the median of (measured - predicted) TTFT over the requests of the
*other* models' runs, replayed with the engine alone. Runs where the server was overloaded (measured timeouts)
are left out of the fit: their TTFT is queueing, not the front end. A model whose runs have no other model to
be fitted on keeps the engine alone (0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmsim.e2e.replay import Replayed
from llmsim.e2e.runs import MeasuredRun


@dataclass(frozen=True)
class FrontendFit:
    held_out: str  # the model whose runs are replayed with this value
    fitted_on: tuple[str, ...]  # the models whose runs it was fitted on
    latency_s: float
    num_requests: int  # requests the median was taken over


def ttft_residuals(run: MeasuredRun, replayed: Replayed) -> np.ndarray:
    """Measured - predicted TTFT of the requests both sides completed."""
    measured = run.measured_ttft_s()
    ok = np.isfinite(measured) & np.isfinite(replayed.ttft_s)
    return measured[ok] - replayed.ttft_s[ok]


def fit_leave_one_model_out(runs: list[MeasuredRun], engine_only: dict[str, Replayed]) -> dict[str, FrontendFit]:
    """Per model (HuggingFace id): the front-end latency fitted on every other model's runs."""
    models = sorted({r.model_id for r in runs})
    fits = {}
    for model in models:
        others = [r for r in runs if r.model_id != model and not r.measured_errors().any()]  # overloaded: left out
        residuals = [ttft_residuals(r, engine_only[r.name]) for r in others]
        values = np.concatenate(residuals) if residuals else np.empty(0)
        latency = max(float(np.median(values)), 0.0) if len(values) else 0.0
        fits[model] = FrontendFit(model, tuple(sorted({r.model_id for r in others})), latency, len(values))
    return fits
