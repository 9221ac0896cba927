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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pandas as pd
from pydantic import ConfigDict, Field, ValidationError, model_validator

from llmsim.bool_numbers import NumbersNotBools
from llmsim.config import check_config_path, format_validation_error, parse_config, read_yaml, set_path
from llmsim.errors import ConfigError, LLMSimError
from llmsim.sweep.execute import execute_points, folder_lock
from llmsim.sweep.spec import Point, check_distinct, check_names_at, load_base, values_label


class RateSearch(NumbersNotBools):
    model_config = ConfigDict(extra="forbid")
    start: float = Field(default=1.0, gt=0)
    max: float = Field(default=256.0, gt=0)
    tolerance: float = Field(default=0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "RateSearch":
        if self.start > self.max:
            raise ValueError(f"start ({self.start}) is above max ({self.max})")
        return self


class PlanSearchConfig(NumbersNotBools):
    model_config = ConfigDict(extra="forbid")
    name: str = "plan-search"
    base: str | dict[str, Any]
    gpus: int = Field(ge=1)
    candidates: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(min_length=1)
    rates: RateSearch = RateSearch()
    price_per_gpu_hour: dict[str, Annotated[float, Field(gt=0)]] = {}
    rank_by: Literal["goodput_per_gpu", "goodput_per_dollar", "goodput_per_watt"] = "goodput_per_gpu"
    output_dir: Path = Path("results/plan_search")

    @model_validator(mode="after")
    def _distinct(self) -> "PlanSearchConfig":
        for path, values in self.candidates.items():
            check_distinct(values, f"candidates.{path}")
        return self


@dataclass(frozen=True)
class Candidate:
    """One combination of the plan's candidate values, parsed once at the starting rate (``probe``), or the
    error that parse gave (reported in the candidate's row)."""

    values: dict[str, Any]
    probe: Any = None  # ExperimentConfig
    error: str = ""


def load_plan_search(path: str | Path, overrides: dict[str, Any] | None = None
                     ) -> tuple[PlanSearchConfig, dict, list[Candidate]]:
    path = Path(path)
    raw = read_yaml(path, "plan file") or {}
    if not isinstance(raw, dict):  # had been a TypeError traceback
        raise ConfigError(f"invalid plan file {path}: expected a mapping at the top level")
    try:
        cfg = PlanSearchConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), "plan file")) from None
    for key in cfg.candidates:  # a typo had made every candidate fail alike, each in its own row
        check_config_path(key, f"{path}: candidates")
    base = load_base(path, cfg.base, overrides)
    workload = base.get("workload")
    if isinstance(workload, dict) and workload.get("trace") is not None:
        # Every candidate had failed on the lengths the dropped trace left missing, one row each.
        raise ConfigError(f"{path}: base: a plan search sets its own arrival rates, so its base workload replays no "
                          "trace; give lengths instead (lengths_from: {path: <trace>, format: ...} samples a trace's "
                          "prompt and output lengths; or prompt_tokens and output_tokens)")
    if cfg.rank_by == "goodput_per_dollar":
        devices = cfg.candidates.get("hardware.device") or [base.get("hardware", {}).get("device", "a100-80gb")]
        # A device that is not a name is its candidate's error (parse_config's), not a missing price.
        missing = [d for d in devices if isinstance(d, str) and d not in cfg.price_per_gpu_hour]
        if missing:
            raise ConfigError(f"{path}: price_per_gpu_hour: rank_by goodput_per_dollar needs a price for "
                              f"{', '.join(missing)}")
    if not cfg.output_dir.is_absolute():
        cfg = cfg.model_copy(update={"output_dir": Path(os.path.abspath(path.parent / cfg.output_dir))})
    candidates = []
    for values in (dict(zip(cfg.candidates, v)) for v in itertools.product(*cfg.candidates.values())):
        try:
            probe = parse_config(candidate_config(base, values, cfg.gpus, cfg.rates.start), "<plan candidate>")
        except LLMSimError as exc:  # reported in its row (run_plan_search)
            candidates.append(Candidate(values, error=" ".join(line.strip() for line in str(exc).splitlines()[:2])))
            continue
        # A device or model that does not exist is a typo here, not a plan that does not fit.
        check_names_at(probe, f"{path} (candidate {candidate_label(values)})")
        candidates.append(Candidate(values, probe))
    return cfg, base, candidates


def candidate_config(base: dict, values: dict[str, Any], gpus: int, rate: float) -> dict:
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_path(data, key, value)
    parallel = data.get("parallel") or {}
    degrees = [parallel.get("tp", 1), parallel.get("pp", 1)] if isinstance(parallel, dict) else []
    # Else not a plan (not a mapping, a degree not a whole number >= 1): parse_config says so, in its row.
    if degrees and all(type(d) is int and d >= 1 for d in degrees):
        set_path(data, "cluster.num_replicas", max(1, gpus // (degrees[0] * degrees[1])))
    workload = data.setdefault("workload", {})
    workload["arrival"] = {**(workload.get("arrival") or {"kind": "poisson"}), "rate_per_s": rate}
    return data


def _attainment(data: dict) -> tuple[float, dict]:
    from llmsim.run import run_experiment

    _, summary = run_experiment(parse_config(data, "<plan candidate>"), write=False)
    return summary["slo"]["attainment"], summary


@dataclass
class RateBracket:
    """One candidate's goodput search: double the rate until attainment misses the target, then bisect to
    ``tolerance``. The doubling ends at ``rates.max`` itself, so a candidate that meets the target there is known to
    (``bad`` stays None: its goodput is at least ``max``, and the search says no more). ``next_rate()`` is the next
    rate to try (None when done); ``record`` takes its result."""

    rates: RateSearch
    target: float
    good: float = 0.0
    good_summary: dict | None = None
    bad: float | None = None
    runs: int = 0
    error: str = ""
    _doubling: bool = True

    def next_rate(self) -> float | None:
        if self.error:
            return None
        if self._doubling:
            if self.runs == 0:
                return self.rates.start
            # the last doubling stops at max: a plan that holds 100 req/s with max 100 must not read 64
            return min(self.good * 2.0, self.rates.max) if self.good < self.rates.max else None
        lo, hi = self.good, self.bad
        floor = self.rates.start / 64.0  # below this, report no goodput rather than bisect towards zero
        if hi - lo > self.rates.tolerance * hi and hi > floor:
            return (lo + hi) / 2.0
        return None

    def record(self, rate: float, summary: dict) -> None:
        self.runs += 1
        if "error" in summary and not summary.get("engine_aborted"):
            self.error = summary["error"].splitlines()[0]
        elif "error" not in summary and summary["slo"]["attainment"] >= self.target:
            self.good, self.good_summary = rate, summary
        else:
            self.bad = rate
            self._doubling = False


def _candidate_row(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else v) for k, v in values.items()}


def candidate_label(values: dict[str, Any]) -> str:
    """A candidate as messages name it: ``hardware.device=h100-sxm, parallel=tp=4,pp=1``."""
    return ", ".join(f"{k}={v}" for k, v in _candidate_row(values).items())


def _finish_row(row: dict, search: RateBracket) -> dict:
    if search.error:
        return {**row, "error": search.error}
    row.update(goodput_rate=search.good, runs=search.runs, capped=search.bad is None)
    s = search.good_summary
    if s is not None:
        row.update(power_w=s["energy"]["mean_power_w_per_gpu"] * row["gpus_used"],
                   j_per_output_token=s["energy"]["j_per_output_token"],
                   ttft_p90_s=s["ttft"]["p90_s"], tpot_p90_s=s["tpot"]["p90_s"])
    row["error"] = ""
    return row


def rank(rows: list[dict], cfg: PlanSearchConfig) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for column in ("replicas", "gpus_used"):  # counts, left empty in a failed candidate's row (not 2.000 beside NaN)
        df[column] = df[column].astype("Int64") if column in df else pd.array([pd.NA] * len(df), dtype="Int64")
    if "goodput_rate" not in df:  # no candidate ran
        df["goodput_rate"] = float("nan")
    ok = df["error"] == ""
    gpus_used = df["gpus_used"].astype(float)
    df["goodput_per_gpu"] = df["goodput_rate"] / gpus_used
    if "power_w" in df:
        df["goodput_per_watt"] = df["goodput_rate"] / df["power_w"]  # requests per joule
    if cfg.price_per_gpu_hour:
        device = df["hardware.device"] if "hardware.device" in df else None
        if device is not None:
            prices = cfg.price_per_gpu_hour
            price = device.map(lambda d: prices.get(d) if isinstance(d, str) else None).astype(float) * gpus_used
            df["goodput_per_dollar"] = df["goodput_rate"] * 3600.0 / price  # requests per dollar
    key = cfg.rank_by if cfg.rank_by in df else "goodput_per_gpu"
    return pd.concat([df[ok].sort_values(key, ascending=False, kind="stable"), df[~ok]], ignore_index=True)


def run_plan_search(cfg: PlanSearchConfig, base: dict, candidates: list[Candidate], root: Path,
                    executor: str = "local", workers: int | None = None, address: str | None = None,
                    on_done=None) -> pd.DataFrame:
    """Every candidate's goodput. The searches advance in rounds: each round runs the next rate of every
    unfinished candidate as sweep points (``sweep.execute``: local processes or Ray, and its resume -- a
    probe whose folder under ``root`` holds the same resolved config is read back, not rerun)."""
    combos = [c.values for c in candidates]
    rows = [_candidate_row(values) for values in combos]
    searches: dict[int, RateBracket] = {}
    for i, row in enumerate(rows):
        probe = candidates[i].probe
        if probe is None:
            row["error"] = candidates[i].error
            continue
        per_replica = probe.parallel.tp * probe.parallel.pp
        if per_replica > cfg.gpus:
            row["error"] = f"needs {per_replica} GPUs per replica, budget is {cfg.gpus}"
            continue
        row.update(replicas=probe.cluster.num_replicas, gpus_used=probe.cluster.num_replicas * per_replica)
        searches[i] = RateBracket(cfg.rates, probe.slo.attainment)
    if on_done:
        for _ in range(len(combos) - len(searches)):
            on_done()
    with folder_lock(root):
        while True:
            points, owner = [], {}
            for i, search in searches.items():
                rate = search.next_rate()
                if rate is None:
                    continue
                data = candidate_config(base, combos[i], cfg.gpus, rate)
                data["name"] = f"{cfg.name}/{i}/{rate!r}"
                point = Point(len(points), {"candidate": i, "rate": rate}, parse_config(data, "<plan candidate>"),
                              folder=f"c{i:03d}_{values_label(combos[i])}/rate={rate!r}")
                owner[point.index] = (i, rate)
                points.append(point)
            if not points:
                break
            for index, summary in sorted(execute_points(root, points, executor, workers, address, None).items()):
                i, rate = owner[index]
                searches[i].record(rate, summary)
                if on_done and searches[i].next_rate() is None:
                    on_done()
    for i, search in searches.items():
        rows[i] = _finish_row(rows[i], search)
    return rank(rows, cfg)
