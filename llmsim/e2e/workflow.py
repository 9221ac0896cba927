"""``llmsim validate-e2e``: replay every measured run, compare, write ``e2e_errors.csv``, the step check
(``e2e_step_check.csv``), a markdown report and a parity plot. The interface (arguments, the CSV's columns and
metric names) is stable: users and CI script against it."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llmsim.e2e.compare import COLUMNS, compare
from llmsim.e2e.frontend import FrontendFit, fit_leave_one_model_out
from llmsim.e2e.intervals import draw_factors, held_out_ratios, interval_bounds, ratio_summary
from llmsim.e2e.replay import replay
from llmsim.e2e.runs import MeasuredRun, find_runs, load_run, stages_until_last_arrival
from llmsim.e2e.step_check import step_ratios, summarize
from llmsim.e2e.vllm_bench import bench_names, load_bench_run
from llmsim.errors import ConfigError
from llmsim.hardware.profile import load_profile
from llmsim.results_folder import write_folder
from llmsim.run import output_folder

HEADLINE = ("ttft_mean", "ttft_p99", "e2e_mean", "tpot_mean", "request_throughput", "errors")


def truncate(run: MeasuredRun, max_requests: int) -> MeasuredRun:
    """The first ``max_requests`` requests, stages cut at the last arrival (a quick slice of a long run)."""
    if max_requests < 1:
        raise ConfigError(f"--max-requests {max_requests}: must be at least 1")
    requests, truth = run.requests[:max_requests], run.truth[:max_requests]
    return dataclasses.replace(run, requests=requests, truth=truth,
                               stages=stages_until_last_arrival(run.stages, requests))


def validate_e2e(root: Path, device: str, out: Path, select: list[str] | None = None,
                 max_requests: int | None = None, on_run=None, intervals: int = 0
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The error table (``e2e_errors.csv``) and the overload check (``e2e_overload.csv``), both also written to
    ``out`` with the report and plots, complete or absent. ``intervals``: Monte Carlo samples of the held-out
    kernel errors (``llmsim.e2e.intervals``); with any, also writes ``e2e_intervals.csv`` and the intervals'
    coverage in the report."""
    replayed, benched = find_runs(root), bench_names(root)
    names = [(n, load_run) for n in replayed] + [(n, load_bench_run) for n in benched]
    twice = sorted(set(replayed) & set(benched))
    if twice:  # every table keys a run's rows by its name (two had crashed the summary after every replay)
        raise ConfigError(f"{root}: run {twice[0]!r} is both replay/{twice[0]}.json.gz and bench/{twice[0]}.json; "
                          "give the two different names")
    if not names:
        raise ConfigError(f"{root / 'bench'}: no <exp>.json vllm bench serve results")
    if select:
        names = [(n, load) for n, load in names if any(s in n for s in select)]
        if not names:
            raise ConfigError(f"--runs {' '.join(select)}: matches no run in {root}")
    runs = [load(root, n) for n, load in names]  # read and check everything before the long part
    try:
        load_profile(device)
    except ConfigError as exc:
        raise ConfigError(f"--device: {str(exc).removeprefix('hardware.device: ')}") from None
    with output_folder(Path(out), "--out"):  # removed again if the replays fail or are interrupted
        return _replay_all(runs, root, out, device, max_requests, on_run, intervals)


def _replay_all(runs: list[MeasuredRun], root: Path, out: Path, device: str, max_requests: int | None, on_run,
                intervals: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if max_requests is not None:
        runs = [truncate(r, max_requests) for r in runs]
    ratios = held_out_ratios(device) if intervals else {}
    samples = draw_factors(ratios, intervals)
    # First the engine alone, then each model's runs again with the front end fitted on the other models.
    engine_only, notes = {}, []
    for run in runs:
        t0 = time.perf_counter()
        engine_only[run.name] = replayed = replay(run, root, device)
        notes.append((run.name, run.kv_blocks, replayed.kv_blocks_planned, replayed.filled_lengths,
                      len(run.requests), time.perf_counter() - t0))
    fits = fit_leave_one_model_out(runs, engine_only)
    frames, engine_frames, interval_frames, step_frames, step_request_frames = [], [], [], [], []
    for run in runs:
        step_request_frames.append(step_ratios(run, engine_only[run.name]))
        step_frames.append(summarize(run, step_request_frames[-1]))
        latency = fits[run.model_id].latency_s
        final = replay(run, root, device, frontend_latency_s=latency) if latency else engine_only[run.name]
        frames.append(compare(run, final))
        engine_frames.append(compare(run, engine_only[run.name]))
        if samples:
            drawn = [compare(run, replay(run, root, device, latency, factors))["predicted"] for factors in samples]
            interval_frames.append(with_intervals(frames[-1], np.column_stack(drawn)))
        if on_run is not None:
            on_run(run.name)
    table = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    engine_table = pd.concat(engine_frames, ignore_index=True)[list(COLUMNS)]
    steps = pd.concat(step_frames, ignore_index=True)
    step_requests = pd.concat(step_request_frames, ignore_index=True)
    check = overload_check(table, {name: n for name, _, _, _, n, _ in notes})
    text = report(table, engine_table, check, list(fits.values()), notes, device, root) + step_check_report(steps)
    files = {
        "e2e_errors_engine_only.csv": lambda p: engine_table.to_csv(p, index=False),
        "e2e_step_check.csv": lambda p: steps.to_csv(p, index=False),
        "e2e_step_check_requests.csv.gz": lambda p: step_requests.to_csv(p, index=False),
        "e2e_step_check.png": lambda p: step_check_plot(step_requests, p),
        "e2e_overload.csv": lambda p: check.to_csv(p, index=False),
    }
    if samples:
        bounds = pd.concat(interval_frames, ignore_index=True)
        files["e2e_intervals.csv"] = lambda p: bounds.to_csv(p, index=False)
        text += intervals_report(bounds, ratios, len(samples))
    files["e2e_report.md"] = lambda p: p.write_text(text)
    files["e2e_parity.png"] = lambda p: parity_plot(table, p)
    files["e2e_errors.csv"] = lambda p: table.to_csv(p, index=False)
    # Complete or absent: e2e_errors.csv, what scripts read, appears last; an earlier run's intervals go.
    write_folder(out, files, marker="e2e_errors.csv", stale=[] if samples else ["e2e_intervals.csv"], setting="--out")
    return table, check


INTERVAL_COLUMNS = ("experiment", "stage", "metric", "predicted", "low", "high", "measured", "inside")


def with_intervals(table: pd.DataFrame, drawn: np.ndarray) -> pd.DataFrame:
    """``table``'s rows with the 5th-95th percentile of each metric over the samples (``drawn``: one column per
    sample) and whether the measured value lies inside."""
    bounds = np.array([interval_bounds(row) for row in drawn])
    low, high = bounds[:, 0], bounds[:, 1]
    measured = table["measured"].to_numpy(dtype=float)
    inside = (measured >= low) & (measured <= high)
    return table.assign(low=low, high=high, inside=inside)[list(INTERVAL_COLUMNS)]


def coverage(bounds: pd.DataFrame) -> pd.DataFrame:
    """Per headline metric, the share of (run, stage) rows whose measurement lies inside the interval, and how
    many rows that share is over."""
    t = bounds[bounds["metric"].isin(HEADLINE[:-1])].dropna(subset=["measured", "low", "high"])
    return t.groupby("metric")["inside"].agg(share="mean", rows="size")


def intervals_report(bounds: pd.DataFrame, ratios: dict, num_samples: int) -> str:
    lines = ["", "## Prediction intervals", "",
             f"{num_samples} samples of the held-out kernel errors (`llmsim.e2e.intervals`): per kernel group, one "
             "held-out row's measured / predicted ratio scales that group's modelled times. The ratios drawn from:",
             "", "| kernel group | held-out rows | 5th pct | median | 95th pct |", "|---|---:|---:|---:|---:|"]
    for group, n, lo, mid, hi in ratio_summary(ratios):
        lines.append(f"| {group} | {n} | {lo:.3f} | {mid:.3f} | {hi:.3f} |")
    lines += ["", "Share of runs and stages whose measurement lies inside the 5th-95th percentile interval "
              "(`e2e_intervals.csv`):", "", "| metric | coverage | rows |", "|---|---:|---:|"]
    for metric, share, rows in coverage(bounds).itertuples():
        lines.append(f"| {metric} | {share:.0%} | {rows} |")
    return "\n".join(lines) + "\n"


def step_check_report(steps: pd.DataFrame) -> str:
    lines = ["", "## Step check", "",
             "Each request's measured time per output token over the execution model's steps at the state the server "
             "was measured in (`llmsim.e2e.step_check`: the running batch, KV and prefills rebuilt from the measured "
             "first-token and finish times, not the simulated ones). 1.0: the modelled steps match the server's at "
             "the operating points it ran through. Per request in `e2e_step_check_requests.csv.gz`; over time in "
             "`e2e_step_check.png`.", "",
             "| run | stage | requests | step ratio, median (p10-p90) | running | KV tokens per running request | "
             "waiting |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in steps.itertuples():
        if not r.requests:
            lines.append(f"| {r.experiment} | {r.stage} | 0 | - | - | - | - |")
            continue
        lines.append(f"| {r.experiment} | {r.stage} | {r.requests} | {r.step_ratio_median:.3f} ({r.step_ratio_p10:.3f}-"
                     f"{r.step_ratio_p90:.3f}) | {r.running_mean:.1f} | {r.kv_tokens_per_running_mean:.0f} | "
                     f"{r.waiting_mean:.1f} |")
    return "\n".join(lines) + "\n"


def step_check_plot(per_request: pd.DataFrame, path: Path, bin_s: float = 30.0) -> None:
    """Per run, the step ratio (median over the requests sent in each ``bin_s``) against send time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(per_request["experiment"]))
    cols = min(4, max(1, len(runs)))
    rows = -(-len(runs) // cols) if runs else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, runs):
        g = per_request[per_request["experiment"] == name]
        binned = g.groupby((g["arrival_s"] // bin_s) * bin_s)["step_ratio"].median()
        ax.plot(binned.index, binned.to_numpy(), lw=1.2)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_title(re.sub(r"^\d{8}-\d{6}-", "", name)[:48], fontsize=7)  # the run's timestamp says little here
        ax.set_xlabel("request sent (s)", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    axes[0][0].set_ylim(0.8, 2.0)  # shared: the runs that kept up sit at 1.0 +- a few %; higher bins are cut off
    axes[0][0].set_ylabel("measured / modelled step", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean |rel_error| over runs and stages, per metric (the issue's acceptance measure)."""
    t = table[table["metric"].isin(HEADLINE[:-1])].dropna(subset=["rel_error"])
    return t.assign(abs_error=t["rel_error"].abs()).groupby("metric")["abs_error"].agg(["mean", "median", "count"])


# A run counts as overloaded when at least this share of its requests timed out (measured or predicted).
OVERLOADED_SHARE = 0.01


def overload_check(table: pd.DataFrame, num_requests: dict[str, int]) -> pd.DataFrame:
    """Per run (stage ``all``): whether the measured server and the replay were overloaded (timed-out requests at
    least ``OVERLOADED_SHARE`` of the run's), and the issue's test: an overloaded run's predicted timeouts within 2x
    of the measured ones, a run that kept up predicted to keep up."""
    rows = []
    errors = table[(table["stage"] == "all") & (table["metric"] == "errors")]
    for r in errors.itertuples(index=False):
        n = num_requests[r.experiment]
        measured_over, predicted_over = r.measured >= OVERLOADED_SHARE * n, r.predicted >= OVERLOADED_SHARE * n
        if measured_over:
            ok = r.measured / 2 <= r.predicted <= 2 * r.measured
        else:
            ok = not predicted_over
        rows.append((r.experiment, n, int(r.measured), int(r.predicted), measured_over, predicted_over, ok))
    return pd.DataFrame(rows, columns=["experiment", "requests", "measured_timeouts", "predicted_timeouts",
                                       "measured_overloaded", "predicted_overloaded", "passes"])


def report(table: pd.DataFrame, engine_table: pd.DataFrame, check: pd.DataFrame, fits: list[FrontendFit],
           notes: list, device: str, root: Path) -> str:
    """The markdown report: ``check`` is ``overload_check``'s table (written to ``e2e_overload.csv`` too)."""
    lines = [f"# End-to-end validation on {device}", "",
             f"Runs from `{root}`. The kernels are fitted on kernel measurements, not on these runs. The one "
             "parameter fitted at this level, the front end's latency per request (`cluster.frontend_latency_s`), "
             "is fitted leave-one-model-out: each model's runs are replayed with the value fitted on the other "
             "models' runs, so every run is held out.", "",
             "| held-out model | front end fitted on | requests in the fit | frontend_latency_s |",
             "|---|---|---:|---:|"]
    for f in fits:
        lines.append(f"| {f.held_out} | {', '.join(f.fitted_on) or '(no other model: engine alone)'} | "
                     f"{f.num_requests} | {f.latency_s * 1e3:.2f} ms |")
    lines += ["", "| run | server KV blocks | simulator's own plan | lengths filled from profile | requests | wall s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, blocks, planned, filled, n, wall in notes:
        lines.append(f"| {name} | {blocks} | {planned} | {filled} | {n} | {wall:.1f} |")
    both = summary(table).join(summary(engine_table).add_suffix("_engine"))
    lines += ["", "Mean and median |relative error| over runs and stages (stage `all` included), held out, and "
              "with the engine alone (`e2e_errors_engine_only.csv`):", "",
              "| metric | mean | median | engine alone: mean | median | n |", "|---|---:|---:|---:|---:|---:|"]
    for metric, r in both.iterrows():
        lines.append(f"| {metric} | {r['mean']:.1%} | {r['median']:.1%} | {r['mean_engine']:.1%} | "
                     f"{r['median_engine']:.1%} | {int(r['count'])} |")
    lines += ["", f"Overload check (stage `all`; overloaded: at least {OVERLOADED_SHARE:.0%} of the requests timed "
              "out; an overloaded run passes when the predicted timeouts are within 2x of the measured ones, a run "
              f"that kept up when the replay keeps up too): {int(check['passes'].sum())} of {len(check)} pass.", "",
              "| run | requests | timed out, measured | predicted | overloaded, measured | predicted | passes |",
              "|---|---:|---:|---:|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for r in check.itertuples(index=False):
        lines.append(f"| {r.experiment} | {r.requests} | {r.measured_timeouts} | {r.predicted_timeouts} | "
                     f"{yes[r.measured_overloaded]} | {yes[r.predicted_overloaded]} | {yes[r.passes]} |")
    lines += ["", "Per run and stage (predicted / measured, relative error):", "",
              "| run | stage | " + " | ".join(HEADLINE) + " |", "|---|---|" + "---:|" * len(HEADLINE)]
    for (run, stage), g in table.groupby(["experiment", "stage"], sort=False):
        g = g.set_index("metric")
        cells = []
        for m in HEADLINE:
            p, v, e = g.loc[m, "predicted"], g.loc[m, "measured"], g.loc[m, "rel_error"]
            fmt = (lambda x: f"{x:.0f}") if m == "errors" else (lambda x: f"{x:.3g}")
            cells.append(f"{fmt(p)} / {fmt(v)}" + (f" ({e:+.0%})" if np.isfinite(e) else ""))
        lines.append(f"| {run} | {stage} | " + " | ".join(cells) + " |")
    lines += ["", "![parity](e2e_parity.png)", ""]
    return "\n".join(lines)


def parity_plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("ttft_mean", "ttft_p99", "e2e_mean", "tpot_mean")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    for ax, metric in zip(axes, metrics):
        t = table[(table["metric"] == metric)].dropna(subset=["predicted", "measured"])
        t = t[(t["predicted"] > 0) & (t["measured"] > 0)]
        for stage, g in t.groupby(t["stage"] == "all"):
            ax.scatter(g["measured"], g["predicted"], s=14, label="whole run" if stage else "stage")
        if len(t):
            lo, hi = min(t["measured"].min(), t["predicted"].min()), max(t["measured"].max(), t["predicted"].max())
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(metric)
        ax.set_xlabel("measured (s)")
    axes[0].set_ylabel("predicted (s)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
