"""A sweep's combined table, DistServe-style goodput per curve, and goodput / energy curves as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from llmsim.sweep.spec import Point, SweepConfig


def _label(value) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def table(points: list[Point], summaries: dict[int, dict]) -> pd.DataFrame:
    rows = []
    for p in points:
        s = summaries.get(p.index, {})
        row = {"point": p.name, **{k: _label(v) if isinstance(v, dict) else v for k, v in p.values.items()}}
        if "error" in s or not s:
            rows.append({**row, "error": s.get("error", "not run")})
            continue
        rows.append({
            **row,
            "num_gpus": s["utilization"]["num_gpus"],
            "finished": s["requests"]["finished"], "rejected": s["requests"]["rejected"],
            "throughput_rps": s["throughput"]["requests_per_s"],
            "attainment": s["slo"]["attainment"], "goodput_rps": s["slo"]["goodput_requests_per_s"],
            "ttft_p90_s": s["ttft"]["p90_s"], "ttft_p99_s": s["ttft"]["p99_s"], "tpot_p90_s": s["tpot"]["p90_s"],
            "itl_p99_s": s["itl"]["p99_s"], "e2e_p99_s": s["e2e"]["p99_s"],
            "preemptions": s["requests"]["preemptions"], "migrations": s["requests"]["migrations"],
            "j_per_output_token": s["energy"]["j_per_output_token"],
            "mean_power_w_per_gpu": s["energy"]["mean_power_w_per_gpu"],
            "mfu": s["utilization"]["mfu"], "error": "",
        })
    return pd.DataFrame(rows)


def goodput(df: pd.DataFrame, sweep: SweepConfig, target: float) -> pd.DataFrame:
    """DistServe's goodput: for each curve, the highest rate whose SLO attainment reaches ``target``; ``capped``
    where that is the highest rate the curve ran (the goodput is at least that: the grid stops before the curve
    misses the target)."""
    x = sweep.x
    if x is None or "attainment" not in df:
        return pd.DataFrame()
    others = sweep.curve_keys
    out = []
    for key, group in (df.groupby(others, sort=False) if others else [((), df)]):
        key = key if isinstance(key, tuple) else (key,)
        ok = group[group["attainment"] >= target]
        best = float(ok[x].max()) if len(ok) else 0.0
        ran = group[x][group["attainment"].notna()]
        gpus = int(group["num_gpus"].dropna().iloc[0]) if group["num_gpus"].notna().any() else 0
        out.append({**dict(zip(others, key)), "goodput_rate": best,
                    "goodput_rate_per_gpu": best / gpus if gpus else 0.0, "num_gpus": gpus,
                    "capped": bool(len(ok)) and best == float(ran.max())})
    return pd.DataFrame(out)


CURVE_FILES = ("goodput_curve.png", "energy_curve.png", "ttft_p99_curve.png")


def curves(df: pd.DataFrame, sweep: SweepConfig, target: float) -> dict[str, Callable[[Path], None]]:
    """The sweep's curves against its x path: file name -> a function that writes the plot there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = sweep.x
    if x is None or "attainment" not in df:
        return {}
    others = sweep.curve_keys
    writers = {}
    for column, ylabel, filename in zip(("attainment", "j_per_output_token", "ttft_p99_s"),
                                        ("SLO attainment", "joules per output token", "P99 TTFT (s)"), CURVE_FILES):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups = df.groupby(others, sort=False) if others else [((), df)]
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, key)) or sweep.name
            group = group.sort_values(x)
            ax.plot(group[x], group[column], marker="o", label=label)
        if column == "attainment":
            ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.0%}")
            ax.set_ylim(0, 1.02)
        if column == "ttft_p99_s":
            ax.set_yscale("log")
        ax.set(xlabel=x, ylabel=ylabel, title=f"{sweep.name}: {ylabel} vs {x.rsplit('.', 1)[-1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        writers[filename] = _saver(fig)
        plt.close(fig)
    return writers


def _saver(fig) -> Callable[[Path], None]:
    return lambda path: fig.savefig(path, dpi=110, format="png")
