"""A sweep file: a base experiment and a grid of overrides addressed by dotted config paths.

```yaml
name: sarathi-vs-fcfs
base: sarathi_vs_fcfs.yaml            # an experiment YAML (relative to this file) or an inline mapping
output_dir: ../results/sarathi_vs_fcfs
grid:                                 # every combination is one point
  workload.arrival.rate_per_s: [2, 4, 6, 8]
  scheduler.name: [fcfs, sarathi]
x: workload.arrival.rate_per_s        # the axis of the goodput and energy curves (default: a rate in the grid)
```

``variants`` (optional) name sets of overrides applied together, for comparisons a product grid cannot express
(each policy with its own settings); every variant runs at every grid combination, and the variant's name is
the ``variant`` column of the results::

    variants:
      round_robin: {cluster.policy: colocated, cluster.router: round_robin}
      llumnix: {cluster.policy: llumnix}
"""

from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmsim.config import (ExperimentConfig, _resolve_paths, apply_overrides, check_config_path,
                           format_validation_error, parse_config, read_yaml, set_path)
from llmsim.errors import ConfigError

RATE_PATHS = ("workload.arrival.rate_per_s", "workload.trace.time_scale")


def check_distinct(values: list, where: str) -> None:
    """A value listed twice (1 and 1.0 too) would run the same experiments twice and put both in the table."""
    for i, value in enumerate(values):
        if any(value == earlier for earlier in values[:i]):
            raise ValueError(f"{where}: {value!r} is listed twice")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "sweep"
    base: str | dict[str, Any]
    output_dir: Path = Path("results/sweep")
    grid: dict[str, list[Any]] = Field(min_length=1)
    variants: dict[str, dict[str, Any]] = {}
    x: str | None = None

    @model_validator(mode="after")
    def _values(self) -> "SweepConfig":
        for path, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{path}: an empty list of values gives no points")
            check_distinct(values, f"grid.{path}")
        return self

    @property
    def curve_keys(self) -> list[str]:
        """The result columns that tell curves apart (all but the x axis)."""
        return (["variant"] if self.variants else []) + [k for k in self.grid if k != self.x]


@dataclass(frozen=True)
class Point:
    index: int
    values: dict[str, Any]  # grid path -> value
    config: ExperimentConfig
    folder: str | None = None  # results folder under the sweep's root (default: from the index and values)

    @property
    def name(self) -> str:
        if self.folder is not None:
            return self.folder
        return f"p{self.index:03d}_" + values_label(self.values)


def values_label(values: dict[str, Any]) -> str:
    """``key=value`` parts of a folder name, from the last component of each dotted path."""
    return "_".join(f"{path.rsplit('.', 1)[-1]}={_short(v)}" for path, v in values.items())


def _short(value: Any) -> str:
    text = str(value) if not isinstance(value, dict) else "-".join(f"{k}{v}" for k, v in value.items())
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)[:40]


def load_base(path: Path, base: str | dict, overrides: dict[str, Any] | None = None) -> dict:
    """The base experiment of a sweep or plan file (``path``): a YAML path relative to it, or an inline mapping,
    with ``overrides`` (``--set``) applied. Returns a fresh dict with workload paths resolved against the file
    that holds the base, a path set by ``--set`` too (as ``llmsim run`` resolves it against the experiment)."""
    if isinstance(base, str):
        base_path = path.parent / base
        try:
            data = read_yaml(base_path, "experiment")
        except ConfigError as exc:
            raise ConfigError(f"{path}: base: {exc}") from None
        base_dir = base_path.parent
        if not isinstance(data, dict):
            # A list had surfaced as an AttributeError; an empty file as every plan candidate's own error row.
            raise ConfigError(f"{path}: base: {base_path} is "
                              + ("empty" if data is None else f"a YAML {type(data).__name__}")
                              + ", not a mapping of experiment settings")
    else:
        data, base_dir = copy.deepcopy(base), path.parent
    data = apply_overrides(data, overrides, str(path))
    _resolve_paths(data.get("workload"), base_dir)
    return data


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[SweepConfig, list[Point]]:
    """The sweep's points; ``overrides`` ({dotted path: value}, from ``--set``) apply to the base experiment."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if raw is not None and not isinstance(raw, dict):  # had been a TypeError traceback
        raise ConfigError(f"invalid sweep file {path}: expected a mapping at the top level")
    try:
        sweep = SweepConfig(**(raw or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), "sweep file")) from None
    # A key that is no config path had been set in every point alike; "variant" had been dropped silently (the
    # results' column of that name), so its points ran the same experiment.
    for key in sweep.grid:
        check_config_path(key, f"{path}: grid")
    for name, settings in sweep.variants.items():
        for key in settings:
            check_config_path(key, f"{path}: variants.{name}")
    base = load_base(path, sweep.base, overrides)
    if not sweep.output_dir.is_absolute():
        sweep = sweep.model_copy(update={"output_dir": Path(os.path.abspath(path.parent / sweep.output_dir))})
    if sweep.x is None:
        sweep = sweep.model_copy(update={"x": next((p for p in RATE_PATHS if p in sweep.grid), None)})
    elif sweep.x not in sweep.grid:
        raise ConfigError(f"{path}: x: {sweep.x!r} is not a grid path; allowed: {', '.join(sweep.grid)}")
    points = []
    variants = list(sweep.variants.items()) or [(None, {})]
    combos = itertools.product(variants, itertools.product(*sweep.grid.values()))
    for index, ((variant, overrides), combo) in enumerate(combos):
        values = ({"variant": variant} if variant is not None else {}) | dict(zip(sweep.grid, combo))
        data = copy.deepcopy(base)
        where = f"{path} (grid point {index}: " + ", ".join(f"{k}={v}" for k, v in values.items()) + ")"
        for key, value in [*overrides.items(), *values.items()]:
            if key != "variant":  # the variant's name, a results column (checked above: no config path)
                try:
                    set_path(data, key, value)
                except ConfigError as exc:  # a value of the base or of a variant in the way of a grid path
                    raise ConfigError(f"{where}: {exc}") from None
        _resolve_paths(data.get("workload"), path.parent)  # a trace path in the grid: relative to this file
        data["name"] = f"{sweep.name}/{index}"
        config = parse_config(data, where)
        check_names_at(config, where)
        points.append(Point(index, values, config))
    return sweep, points


def check_names_at(cfg: ExperimentConfig, where: str) -> None:
    """The point's model and device exist (``cluster.simulation.check_names``), checked before any point runs;
    the error names the point."""
    from llmsim.cluster.simulation import check_names

    try:
        check_names(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
