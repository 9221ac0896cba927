"""A sweep's combined table, DistServe-style goodput per curve, and goodput / energy curves as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from llmsim.sweep.spec import RATE_PATHS, Point, SweepConfig


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
            # An engine that stopped under the load (swap space full) served no request to the end: attainment 0.
            rows.append({**row, **({"attainment": 0.0} if s.get("engine_aborted") else {}),
                         "error": s.get("error", "not run")})
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
    """DistServe's goodput per curve: the highest arrival rate whose SLO attainment reaches ``target``, and every
    lighter rate swept reaches it too, also per GPU (0 where the lightest misses). On a ``time_scale`` axis, where
    a smaller scale replays the trace faster, the lowest scale that does (``goodput_time_scale``; empty where none
    does). ``capped`` where that is the heaviest load the curve ran: the grid stops before the curve misses the
    target, so the goodput is at least that. ``non_monotone`` where a heavier load meets the target again after
    one that misses (noise, or a policy that changes behaviour with load): the goodput stays below the miss, where
    a capacity plan can rely on every lighter load."""
    x = sweep.x
    if x not in RATE_PATHS or "attainment" not in df:  # the highest replica count meeting it is no goodput
        return pd.DataFrame()
    scale = x.endswith("time_scale")  # heavier load at smaller values
    others = sweep.curve_keys
    out = []
    for key, group in (df.groupby(others, sort=False) if others else [((), df)]):
        key = key if isinstance(key, tuple) else (key,)
        ran = group[group["attainment"].notna()].sort_values(x, ascending=not scale)  # lightest load first
        meets = (ran["attainment"] >= target).to_numpy()
        held = int(meets.argmin()) if not meets.all() else len(meets)  # loads up to the first miss
        best = float(ran[x].iloc[held - 1]) if held else (float("nan") if scale else 0.0)
        row = {**dict(zip(others, key)), ("goodput_time_scale" if scale else "goodput_rate"): best}
        if not scale:
            known = group["num_gpus"].dropna() if "num_gpus" in group else ()  # none where every point failed
            gpus = int(known.iloc[0]) if len(known) else 0
            row.update(goodput_rate_per_gpu=best / gpus if gpus else 0.0, num_gpus=gpus)
        out.append({**row, "capped": bool(held) and held == len(meets), "non_monotone": bool(meets[held:].any())})
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
