"""The step check: each request's measured time per output token against the execution model's steps at the state
the server was measured in, not the simulated one.

A replay compares outcomes, and there a step-time error and the queueing it causes compound: steps 10% too fast
can turn a measured backlog into none. The step check holds the state to the measurement instead. From every
request's measured first-token and finish times it rebuilds, on a grid of ``GRID_S``:

- the running batch: the requests between their first token and their finish;
- their KV tokens: each one's prompt plus the tokens it has emitted so far, at its own measured rate;
- the waiting requests: arrived, no first token yet (a request that failed waits until it failed);
- the prefills: each request's prompt, less the prefix-cache hit the replay gave it, at its measured first token.

At each grid point the modelled decode step is ``ExecutionModel.decode_iteration`` for that batch and KV; the
prefills landing in a grid cell take their share of it (each costed as the extra time of the step it joins), so the
cell emits ``(1 - prefill share) / step`` tokens a second per running request. A request's modelled inter-token
time is its decode interval over the tokens the model emits in it, and

    step ratio = measured (e2e - ttft) / (output - 1)  /  modelled inter-token time.

1.0 means the model's steps match the server's at the operating points it ran through; the ratio does not depend
on whether the simulator would have reached those points. Caveats: a request preempted and resumed counts as
running throughout (a KV-bound run overstates its batch), and the times are the client's (a front end that delays
tokens shows as slower steps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llmsim.e2e.replay import Replayed
from llmsim.e2e.runs import MeasuredRun

GRID_S = 0.25
MAX_PREFILL_SHARE = 0.95  # a cell with more prefill than this still emits some tokens (client-time jitter)
COLUMNS = ("experiment", "stage", "requests", "step_ratio_median", "step_ratio_p10", "step_ratio_p90",
           "running_mean", "kv_tokens_per_running_mean", "waiting_mean")
REQUEST_COLUMNS = ("experiment", "request", "arrival_s", "step_ratio", "running", "kv_tokens_per_running", "waiting")


def measured_state(run: MeasuredRun, prompts: np.ndarray, outputs: np.ndarray):
    """(grid times, running requests, their KV tokens, waiting requests, per request: arrival, first token, finish,
    inter-token time, whether it decoded) from the measured times alone."""
    arrival = np.array([r["arrival_time_us"] for r in run.requests], dtype=float) / 1e6
    ttft, e2e, error = run.measured_ttft_s(), run.measured_e2e_s(), run.measured_errors()
    first, finish = arrival + ttft, arrival + e2e
    decoded = ~error & np.isfinite(ttft) & np.isfinite(e2e) & (outputs > 1) & (e2e > ttft)
    itl = np.where(decoded, (e2e - ttft) / np.maximum(outputs - 1, 1), np.nan)
    ends = np.concatenate([arrival, finish[np.isfinite(finish)]])
    grid = np.arange(0.0, ends.max() + 2 * GRID_S, GRID_S)
    running, kv = np.zeros(len(grid)), np.zeros(len(grid))
    for i in np.flatnonzero(decoded):
        s, e = np.searchsorted(grid, first[i]), np.searchsorted(grid, finish[i])
        running[s:e] += 1
        kv[s:e] += prompts[i] + (grid[s:e] - first[i]) / itl[i]
    waits_until = np.where(decoded | np.isfinite(ttft), first,
                           np.where(np.isfinite(e2e), finish, arrival + run.timeout_s))
    waiting = np.zeros(len(grid) + 1)
    np.add.at(waiting, np.searchsorted(grid, arrival), 1)
    np.add.at(waiting, np.searchsorted(grid, waits_until), -1)
    return grid, running, kv, np.cumsum(waiting)[:-1], arrival, first, finish, itl, decoded


def step_ratios(run: MeasuredRun, replayed: Replayed) -> pd.DataFrame:
    """Per request that decoded (``REQUEST_COLUMNS``): its arrival, step ratio, and the mean running batch, KV
    tokens per running request and waiting requests over its decode interval."""
    prompts, outputs, execution = replayed.prompts, replayed.outputs, replayed.execution
    grid, running, kv, waiting, arrival, first, finish, itl, decoded = measured_state(run, prompts, outputs)
    step = np.full(len(grid), np.nan)
    for j in np.flatnonzero(running):
        step[j] = execution.decode_iteration(int(running[j]), int(kv[j])).time_s
    prefill_s = np.zeros(len(grid))
    for i in np.flatnonzero(decoded):
        j = min(int(np.searchsorted(grid, first[i])), len(grid) - 1)
        b, tokens = int(running[j]), int(kv[j])
        cached = int(min(replayed.cached_tokens[i], prompts[i] - 1))
        with_prefill = execution.iteration(((int(prompts[i]) - cached, cached),), b, tokens, b + 1).time_s
        prefill_s[j] += with_prefill - (step[j] if b else 0.0)  # step[j]: the same batch without the prefill
    tokens_per_s = (1.0 - np.minimum(prefill_s / GRID_S, MAX_PREFILL_SHARE)) / step  # per running request
    rows = []
    for i in np.flatnonzero(decoded):
        s, e = np.searchsorted(grid, first[i]), np.searchsorted(grid, finish[i])
        if e <= s:
            continue
        modelled_itl = (e - s) / tokens_per_s[s:e].sum()
        rows.append((run.name, int(i), arrival[i], itl[i] / modelled_itl, running[s:e].mean(),
                     (kv[s:e] / running[s:e]).mean(), waiting[s:e].mean()))
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def summarize(run: MeasuredRun, per_request: pd.DataFrame) -> pd.DataFrame:
    """One row per load stage (requests by arrival) and ``all`` (``COLUMNS``): the step ratio's median and 10th/90th
    percentiles, and the means of the per-request state."""
    stages = [(str(k), lo, hi) for k, (lo, hi) in enumerate(run.stages)] + [("all", -np.inf, np.inf)]
    out = []
    for stage, lo, hi in stages:
        sel = per_request[(per_request["arrival_s"] >= lo) & (per_request["arrival_s"] < hi)]
        if sel.empty:
            out.append((run.name, stage, 0) + (float("nan"),) * 6)
            continue
        r = sel["step_ratio"].to_numpy()
        out.append((run.name, stage, len(sel), float(np.median(r)), float(np.percentile(r, 10)),
                    float(np.percentile(r, 90)), float(sel["running"].mean()),
                    float(sel["kv_tokens_per_running"].mean()), float(sel["waiting"].mean())))
    return pd.DataFrame(out, columns=list(COLUMNS))
