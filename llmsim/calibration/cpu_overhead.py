"""Fit an engine's CPU time per step (``llmsim.execution.cpu_overhead``) to Vidur's measured CPU overheads.

Vidur (github.com/microsoft/vidur, MIT) measured the Sarathi-Serve engine -- vLLM v0's code base -- in decode steps
of 8-64 requests, per model and TP degree, on an A100 and an A40 server (``data/profiling/<gpu>/cpu_overheads.csv``,
milliseconds per step). Its columns map onto the model's terms:

- ``SCHEDULE_MEAN + PREPARE_INPUTS_E2E_MEAN``: per step + per scheduled request (+ per request per 1k of context);
- ``SAMPLER_E2E_MEAN + PROCESS_MODEL_OUTPUTS_MEAN``: per step + per sampled token (+ per 1k of context);
- ``RAY_COMM_TIME_MEDIAN``: the rest of the step's wall time (the step loop; with tp > 1 the driver's round trip
  to its workers): per step + per request, plus a multi-GPU per-step and per-request part.

Every request of a measured step is a decode that samples a token, so the per-request and per-sampled-token slopes
are told apart by which component they were measured in. ``MODEL_EXECUTION_E2E`` (launching the GPU work)
overlaps the GPU and is left out. Whole models are held out of the fit; a second host's file is only validated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from llmsim.calibration.measurements import number_column
from llmsim.errors import TraceError
from llmsim.execution.cpu_overhead import CpuOverhead, CpuOverheadParams

_PREPARE = ("SCHEDULE_MEAN", "PREPARE_INPUTS_E2E_MEAN")
_SAMPLE = ("SAMPLER_E2E_MEAN", "PROCESS_MODEL_OUTPUTS_MEAN")
_REST = "RAY_COMM_TIME_MEDIAN"
_SHAPE = ("model_name", "batch_size", "tensor_parallel_degree")


def read_vidur_cpu(path: str | Path) -> pd.DataFrame:
    """One host's ``cpu_overheads.csv``: model, batch, tp, the engine's ``max_model_len`` and the three parts."""
    from llmsim.e2e.replay import CATALOG_IDS
    from llmsim.models.spec import load_model

    path = Path(path)
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # ValueError: pandas' parser and empty-file errors, bytes not UTF-8
        raise TraceError(f"{path}: not a Vidur cpu_overheads.csv: {exc}") from None
    missing = [c for c in (*_SHAPE, *_PREPARE, *_SAMPLE, _REST) if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing Vidur columns {', '.join(missing)}")
    for column in (*_SHAPE[1:], *_PREPARE, *_SAMPLE, _REST):  # a value that is no number had been a TypeError
        df[column] = number_column(df, column, path, minimum=0)
    unknown = sorted(set(df["model_name"]) - set(CATALOG_IDS))
    if unknown:
        raise TraceError(f"{path}: models without a catalog entry: {', '.join(unknown)}")
    # Vidur's engine ran each model at its full context (its HuggingFace max_position_embeddings).
    context = {m: load_model(CATALOG_IDS[m], "fp16").max_position for m in set(df["model_name"])}
    return pd.DataFrame({
        "model": df["model_name"], "batch": df["batch_size"].astype(float), "tp": df["tensor_parallel_degree"],
        "max_model_len": df["model_name"].map(context).astype(float),
        "prepare_ms": df[list(_PREPARE)].sum(axis=1), "sample_ms": df[list(_SAMPLE)].sum(axis=1),
        "rest_ms": df[_REST]})


def _solve(columns: list[np.ndarray], y: np.ndarray, where: str, needs: str) -> np.ndarray:
    design = np.column_stack(columns)
    # Terms the rows cannot tell apart had been split by least squares' minimum norm (a one-row file gave five
    # "fitted" terms; a file of one TP degree, multi-GPU terms of 0): say what the fit needs instead.
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise TraceError(f"{where}: the rows to fit cannot tell the terms apart: they need {needs}")
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    return np.maximum(coef, 0.0)  # a negative time has no reading; none came out negative on Vidur's data


def fit_cpu_overhead(rows: pd.DataFrame, where: str = "CPU overhead fit") -> CpuOverheadParams:
    b = rows["batch"].to_numpy()
    k = rows["max_model_len"].to_numpy() / 1000.0
    multi = (rows["tp"].to_numpy() > 1).astype(float)
    one = np.ones_like(b)
    two_contexts = "steps of at least two batch sizes, of models of at least two context lengths"
    p0, p1, p2 = _solve([one, b, b * k], rows["prepare_ms"].to_numpy(), where, two_contexts)
    s0, s1, s2 = _solve([one, b, b * k], rows["sample_ms"].to_numpy(), where, two_contexts)
    r0, r1, m0, m1 = _solve([one, b, multi, multi * b], rows["rest_ms"].to_numpy(), where,
                            "steps of at least two batch sizes at TP 1 and at TP 2 or more")
    contexts = rows["max_model_len"]
    return CpuOverheadParams(per_step_ms=p0 + s0 + r0, per_request_ms=p1 + r1, per_request_per_1k_context_ms=p2,
                             per_sampled_token_ms=s1, per_sampled_token_per_1k_context_ms=s2,
                             multi_gpu_per_step_ms=m0, multi_gpu_per_request_ms=m1,
                             context_range_tokens=(int(contexts.min()), int(contexts.max())))


def predict_ms(params: CpuOverheadParams, rows: pd.DataFrame) -> np.ndarray:
    out = []
    for batch, tp, context in zip(rows["batch"], rows["tp"], rows["max_model_len"]):
        n = int(batch)
        out.append(CpuOverhead.of(params, int(context), int(tp)).step_s(n, n) * 1e3)
    return np.array(out)


def error_table(params: CpuOverheadParams, rows: pd.DataFrame, split: str) -> pd.DataFrame:
    """Mean and max |relative error| of the step's CPU time per (model, tp), with the split it belongs to."""
    measured = (rows["prepare_ms"] + rows["sample_ms"] + rows["rest_ms"]).to_numpy()
    rel = predict_ms(params, rows) / measured - 1.0
    frame = rows[["model", "tp"]].assign(rel=rel, abs=np.abs(rel))
    table = frame.groupby(["model", "tp"], sort=True).agg(
        rows=("rel", "size"), mean_signed=("rel", "mean"), mean_abs=("abs", "mean"), max_abs=("abs", "max"))
    return table.reset_index().assign(split=split)


def calibrate_cpu(measurements: str | Path, hold_out_models: list[str], check: list[str | Path], name: str,
                  source: str) -> tuple[dict, pd.DataFrame]:
    """The profile document (parameters, source, errors) and the error table over every split."""
    rows = read_vidur_cpu(measurements)
    unknown = sorted(set(hold_out_models) - set(rows["model"]))
    if unknown:
        raise TraceError(f"{measurements}: --hold-out-model {', '.join(unknown)} has no rows; models: "
                         f"{', '.join(sorted(set(rows['model'])))}")
    if rows.empty:
        raise TraceError(f"{measurements}: no rows to fit")
    held = rows["model"].isin(hold_out_models)
    if held.all():
        raise TraceError(f"{measurements}: every model is held out; nothing is left to fit")
    params = fit_cpu_overhead(rows[~held], str(measurements))
    tables = [error_table(params, rows[~held], "fit")]
    if held.any():
        tables.append(error_table(params, rows[held], "held-out model"))
    for path in check:
        tables.append(error_table(params, read_vidur_cpu(path), f"other host ({Path(path).name})"))
    table = pd.concat(tables, ignore_index=True)
    summary = {split: {"mean_abs_pct": round(100 * float(np.average(g["mean_abs"], weights=g["rows"])), 1),
                       "max_abs_pct": round(100 * float(g["max_abs"].max()), 1)}
               for split, g in table.groupby("split", sort=False)}
    doc = {"name": name, "source": source, "fitted_on": Path(measurements).name,
           "held_out_models": sorted(hold_out_models),
           "params": _rounded(params),
           "errors": summary}
    return doc, table


def _rounded(params: CpuOverheadParams) -> dict:
    return {key: list(v) if isinstance(v, tuple) else round(float(v), 6)
            for key, v in params.model_dump().items() if v is not None}


def write_profile(doc: dict, out: str | Path) -> None:
    header = ("# CPU time per engine step (llmsim.execution.cpu_overhead), written by `llmsim calibrate-cpu`;\n"
              "# errors: |relative error| of the step's CPU time, mean over rows and worst row, per split.\n")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(header + yaml.safe_dump(doc, sort_keys=False, width=110))
