"""``llmsim validate-e2e``: replay every measured run, compare, write ``e2e_errors.csv``, a markdown report and
a parity plot. The interface (arguments, the CSV's columns and metric names) is stable: users and CI script
against it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from llmsim.e2e.compare import COLUMNS, compare
from llmsim.e2e.frontend import FrontendFit, fit_leave_one_model_out
from llmsim.e2e.replay import replay
from llmsim.e2e.runs import MeasuredRun, find_runs, load_run, stages_until_last_arrival
from llmsim.e2e.vllm_bench import bench_names, load_bench_run
from llmsim.errors import ConfigError

HEADLINE = ("ttft_mean", "ttft_p99", "e2e_mean", "tpot_mean", "request_throughput", "errors")


def truncate(run: MeasuredRun, max_requests: int) -> MeasuredRun:
    """The first ``max_requests`` requests, stages cut at the last arrival (a quick slice of a long run)."""
    if max_requests < 1:
        raise ConfigError(f"--max-requests {max_requests}: must be at least 1")
    requests, truth = run.requests[:max_requests], run.truth[:max_requests]
    return dataclasses.replace(run, requests=requests, truth=truth,
                               stages=stages_until_last_arrival(run.stages, requests))


def validate_e2e(root: Path, device: str, out: Path, select: list[str] | None = None,
                 max_requests: int | None = None, on_run=None) -> pd.DataFrame:
    names = [(n, load_run) for n in find_runs(root)] + [(n, load_bench_run) for n in bench_names(root)]
    if not names:
        raise ConfigError(f"{root / 'bench'}: no <exp>.json vllm bench serve results")
    if select:
        names = [(n, load) for n, load in names if any(s in n for s in select)]
        if not names:
            raise ConfigError(f"--runs {' '.join(select)}: matches no run in {root}")
    runs = [load(root, n) for n, load in names]  # read and check everything before the long part
    if max_requests is not None:
        runs = [truncate(r, max_requests) for r in runs]
    # First the engine alone, then each model's runs again with the front end fitted on the other models.
    engine_only, notes = {}, []
    for run in runs:
        t0 = time.perf_counter()
        engine_only[run.name] = replayed = replay(run, root, device)
        notes.append((run.name, run.kv_blocks, replayed.kv_blocks_planned, replayed.filled_lengths,
                      len(run.requests), time.perf_counter() - t0))
    fits = fit_leave_one_model_out(runs, engine_only)
    frames, engine_frames = [], []
    for run in runs:
        latency = fits[run.model_id].latency_s
        final = replay(run, root, device, frontend_latency_s=latency) if latency else engine_only[run.name]
        frames.append(compare(run, final))
        engine_frames.append(compare(run, engine_only[run.name]))
        if on_run is not None:
            on_run(run.name)
    table = pd.concat(frames, ignore_index=True)[list(COLUMNS)]
    engine_table = pd.concat(engine_frames, ignore_index=True)[list(COLUMNS)]
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "e2e_errors.csv", index=False)
    engine_table.to_csv(out / "e2e_errors_engine_only.csv", index=False)
    (out / "e2e_report.md").write_text(report(table, engine_table, list(fits.values()), notes, device, root))
    parity_plot(table, out / "e2e_parity.png")
    return table


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean |rel_error| over runs and stages, per metric (the issue's acceptance measure)."""
    t = table[table["metric"].isin(HEADLINE[:-1])].dropna(subset=["rel_error"])
    return t.assign(abs_error=t["rel_error"].abs()).groupby("metric")["abs_error"].agg(["mean", "median", "count"])


def report(table: pd.DataFrame, engine_table: pd.DataFrame, fits: list[FrontendFit], notes: list, device: str,
           root: Path) -> str:
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
