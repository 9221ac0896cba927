"""Plan search: which (device, TP, PP, replicas, scheduler) serves a workload within its SLOs best?

Every candidate gets the same GPU budget (replicas = gpus // (tp * pp)). Its goodput is DistServe's: the highest
arrival rate at which at least ``slo.attainment`` of requests meet every SLO, found by doubling the rate until
attainment drops below the target and then bisecting to ``tolerance``. Candidates are ranked by goodput per GPU,
per dollar (GPU-hour prices are the user's, in the plan file) or per watt (requests per joule at the goodput
rate, from the energy model).

```yaml
name: llama2-70b
base: plan_base.yaml                        # experiment: model, workload (lengths), slo; the rate is searched
gpus: 8
candidates:                                 # dotted config paths -> values; every combination is a candidate
  hardware.device: [a100-80gb, h100-sxm, mi325x]
  parallel: [{tp: 4}, {tp: 8}, {tp: 4, pp: 2}]
  scheduler.name: [fcfs, sarathi]
rates: {start: 1.0, max: 256.0, tolerance: 0.05}   # tolerance: relative width of the final bracket
price_per_gpu_hour: {a100-80gb: 4.0, h100-sxm: 8.0, mi325x: 6.0}   # optional, USD, your own prices
rank_by: goodput_per_gpu                    # goodput_per_gpu | goodput_per_dollar | goodput_per_watt
```
"""

from __future__ import annotations

import copy
import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmsim.config import format_validation_error, parse_config, read_yaml
from llmsim.errors import ConfigError, LLMSimError
from llmsim.sweep.spec import load_base, set_path


class RateSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: float = Field(default=1.0, gt=0)
    max: float = Field(default=256.0, gt=0)
    tolerance: float = Field(default=0.05, gt=0, lt=1)


class PlanSearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "plan-search"
    base: str | dict[str, Any]
    gpus: int = Field(ge=1)
    candidates: dict[str, list[Any]] = Field(min_length=1)
    rates: RateSearch = RateSearch()
    price_per_gpu_hour: dict[str, float] = {}
    rank_by: Literal["goodput_per_gpu", "goodput_per_dollar", "goodput_per_watt"] = "goodput_per_gpu"
    output_dir: Path = Path("results/plan_search")


def load_plan_search(path: str | Path) -> tuple[PlanSearchConfig, dict, list[dict[str, Any]]]:
    path = Path(path)
    raw = read_yaml(path, "plan file") or {}
    try:
        cfg = PlanSearchConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), "plan file")) from None
    base = load_base(path, cfg.base)
    if cfg.rank_by == "goodput_per_dollar":
        devices = cfg.candidates.get("hardware.device") or [base.get("hardware", {}).get("device", "a100-80gb")]
        missing = [d for d in devices if d not in cfg.price_per_gpu_hour]
        if missing:
            raise ConfigError(f"{path}: price_per_gpu_hour: rank_by goodput_per_dollar needs a price for "
                              f"{', '.join(missing)}")
    if not cfg.output_dir.is_absolute():
        cfg = cfg.model_copy(update={"output_dir": path.parent / cfg.output_dir})
    combos = [dict(zip(cfg.candidates, values)) for values in itertools.product(*cfg.candidates.values())]
    return cfg, base, combos


def candidate_config(base: dict, values: dict[str, Any], gpus: int, rate: float) -> dict:
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_path(data, key, value)
    parallel = data.get("parallel") or {}
    per_replica = int(parallel.get("tp", 1)) * int(parallel.get("pp", 1))
    set_path(data, "cluster.num_replicas", max(1, gpus // per_replica))
    workload = data.setdefault("workload", {})
    workload.pop("trace", None)
    workload["arrival"] = {**(workload.get("arrival") or {"kind": "poisson"}), "rate_per_s": rate}
    return data


def _attainment(data: dict) -> tuple[float, dict]:
    from llmsim.run import run_experiment

    _, summary = run_experiment(parse_config(data, "<plan candidate>"), write=False)
    return summary["slo"]["attainment"], summary


def search_candidate(base: dict, values: dict[str, Any], gpus: int, rates: RateSearch) -> dict:
    """Goodput of one candidate: the highest rate meeting the attainment target, within ``rates.tolerance``."""
    row: dict[str, Any] = {k: (",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v)
                           for k, v in values.items()}
    try:
        probe = parse_config(candidate_config(base, values, gpus, rates.start), "<plan candidate>")
        target = probe.slo.attainment
        per_replica = probe.parallel.tp * probe.parallel.pp
        if per_replica > gpus:
            return {**row, "error": f"needs {per_replica} GPUs per replica, budget is {gpus}"}
        row.update(replicas=probe.cluster.num_replicas, gpus_used=probe.cluster.num_replicas * per_replica)
        good, good_summary, bad = 0.0, None, None
        rate = rates.start
        runs = 0
        while rate <= rates.max:  # double until the target is missed
            attained, summary = _attainment(candidate_config(base, values, gpus, rate))
            runs += 1
            if attained < target:
                bad = rate
                break
            good, good_summary = rate, summary
            rate *= 2.0
        if bad is not None:
            lo = good if good > 0 else 0.0
            hi = bad
            floor = rates.start / 64.0  # below this, report no goodput rather than bisect towards zero
            while hi - lo > rates.tolerance * hi and hi > floor:
                mid = (lo + hi) / 2.0
                attained, summary = _attainment(candidate_config(base, values, gpus, mid))
                runs += 1
                if attained >= target:
                    lo, good, good_summary = mid, mid, summary
                else:
                    hi = mid
        row.update(goodput_rate=good, runs=runs, capped=bad is None)
        if good_summary is not None:
            row.update(power_w=good_summary["energy"]["mean_power_w_per_gpu"] * row["gpus_used"],
                       j_per_output_token=good_summary["energy"]["j_per_output_token"],
                       ttft_p90_s=good_summary["ttft"]["p90_s"], tpot_p90_s=good_summary["tpot"]["p90_s"])
        row["error"] = ""
        return row
    except LLMSimError as exc:
        return {**row, "error": str(exc).splitlines()[0]}


def rank(rows: list[dict], cfg: PlanSearchConfig) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if "goodput_rate" not in df:
        df["goodput_rate"] = float("nan")
    ok = df["error"] == ""
    df["goodput_per_gpu"] = df["goodput_rate"] / df.get("gpus_used", float("nan"))
    if "power_w" in df:
        df["goodput_per_watt"] = df["goodput_rate"] / df["power_w"]  # requests per joule
    if cfg.price_per_gpu_hour:
        device = df["hardware.device"] if "hardware.device" in df else None
        if device is not None:
            price = device.map(cfg.price_per_gpu_hour) * df["gpus_used"]
            df["goodput_per_dollar"] = df["goodput_rate"] * 3600.0 / price  # requests per dollar
    key = cfg.rank_by if cfg.rank_by in df else "goodput_per_gpu"
    return pd.concat([df[ok].sort_values(key, ascending=False, kind="stable"), df[~ok]], ignore_index=True)


def run_plan_search(cfg: PlanSearchConfig, base: dict, combos: list[dict], workers: int | None = None,
                    on_done=None) -> pd.DataFrame:
    workers = workers or os.cpu_count() or 1
    rows: list[dict] = []
    if workers == 1:
        for values in combos:
            rows.append(search_candidate(base, values, cfg.gpus, cfg.rates))
            if on_done:
                on_done()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(search_candidate, base, values, cfg.gpus, cfg.rates) for values in combos]
            for future in futures:
                rows.append(future.result())
                if on_done:
                    on_done()
    return rank(rows, cfg)
