"""``llmsim calibrate`` and ``llmsim validate``: profile files in, fitted profile and validation report out.

A calibrated profile records what it was fitted on in its ``calibration`` block (measurements file, relative to the
profile, and the held-out split), so ``validate`` needs only the device name to reproduce the report.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmsim.calibration.fit import Split, calibrate
from llmsim.calibration.measurements import read_measurements
from llmsim.calibration.predict import Rows
from llmsim.calibration.report import compare, error_table, markdown, parity_plot, summary
from llmsim.errors import ConfigError
from llmsim.hardware.profile import PROFILES_DIR, HardwareProfile, available_profiles, load_profile

METHOD = ("scipy.optimize.least_squares on log(predicted/measured), soft-L1 loss (scale 5%), per op kind "
          "(roofline max_eff, half_tokens, memory_eff, overhead_s) and per collective (alpha-beta latency, bus "
          "bandwidth); held-out rows excluded from the fit")


def profile_path(device: str) -> Path:
    """A profile file from a name, a path, or a unique prefix that has calibration data (``a100`` -> a100-80gb)."""
    path = Path(device)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"--device: profile file {path} not found")
        return path
    exact = PROFILES_DIR / f"{device.lower()}.yaml"
    if exact.exists():
        return exact
    matches = [n for n in available_profiles()
               if n.startswith(device.lower()) and load_profile(n).calibration.get("measurements")]
    if len(matches) == 1:
        return PROFILES_DIR / f"{matches[0]}.yaml"
    raise ConfigError(f"--device: {device!r} names no single profile; allowed: {', '.join(available_profiles())} "
                      "or a path to a profile YAML")


def _read_profile(path: Path) -> HardwareProfile:
    return load_profile(str(path.resolve()))


def _split(profile: HardwareProfile) -> Split:
    c = profile.calibration
    return Split(tuple(c.get("held_out_models", ())), tuple(c.get("held_out_num_workers", ())))


@dataclass
class Validation:
    table: object  # pandas DataFrame from report.error_table
    report_path: Path
    plot_path: Path


def validate(path: Path, measurements: Path | None, out_dir: Path, command: str) -> Validation:
    profile = _read_profile(path)
    if measurements is None:
        stored = profile.calibration.get("measurements")
        if not stored:
            raise ConfigError(f"{path}: no calibration.measurements recorded; pass --measurements FILE")
        measurements = path.parent / stored
    rows = Rows(read_measurements(measurements))
    split = _split(profile)
    comparison = compare(profile, rows, split)
    if comparison.empty:
        raise ConfigError(f"{measurements}: no rows that {profile.name} can predict (device ops or kinds missing)")
    table = error_table(comparison)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = out_dir / f"{profile.name}.png"
    parity_plot(comparison, profile.name, plot)
    report = out_dir / f"{profile.name}.md"
    shown = _relative(measurements, path.parent)
    report.write_text(markdown(profile, table, shown, split, plot.name, command))
    return Validation(table, report, plot)


def run_calibration(path: Path, measurements: Path, split: Split, out: Path, report_dir: Path,
                    command: str) -> tuple[HardwareProfile, Validation]:
    """Fit ``path``'s profile to ``measurements``, write the fitted profile to ``out``, validate it."""
    profile = _read_profile(path)
    rows = Rows(read_measurements(measurements))
    fitted = calibrate(profile, rows, split)
    calibration = {
        "measurements": _relative(measurements, out.parent),
        "held_out_models": list(split.held_out_models),
        "held_out_num_workers": list(split.held_out_num_workers),
        "fitted_rows": int((~split.held_out(rows.df)).sum()),
        "method": METHOD,
        "date": dt.date.today().isoformat(),
        "command": command,
    }
    fitted = fitted.model_copy(update={"calibrated": True, "calibration": calibration})
    write_profile(fitted, out)
    result = validate(out, measurements, report_dir, f"llmsim validate --device {fitted.name}")
    fitted = fitted.model_copy(update={"validation": {
        "report": _relative(result.report_path, out.parent),
        "mape": summary(result.table),
    }})
    write_profile(fitted, out)
    return fitted, result


def write_profile(profile: HardwareProfile, path: Path) -> None:
    data = profile.model_dump(exclude_none=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=120))
    load_profile.cache_clear()


def _relative(target: Path, base: Path) -> str:
    try:
        return str(Path(target).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(target)
