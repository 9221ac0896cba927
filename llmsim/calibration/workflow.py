"""``llmsim calibrate`` and ``llmsim validate``: profile files in, fitted profile and validation report out.

A calibrated profile records what it was fitted on in its ``calibration`` block (measurements file, relative to the
profile, and the held-out split), so ``validate`` needs only the device name to reproduce the report.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from llmsim.calibration.fit import Split, calibrate, l2_resident, validation_only
from llmsim.calibration.measurements import read_measurements
from llmsim.calibration.predict import Rows
from llmsim.calibration.report import (collective_table, compare, error_table, markdown, moe_table, parity_plot,
                                       summary)
from llmsim.errors import ConfigError
from llmsim.hardware.profile import (PROFILES_DIR, HardwareProfile, available_profiles, forget_loaded_profiles,
                                     load_profile, profile_files)

METHOD = ("scipy.optimize.least_squares on log(predicted/measured), soft-L1 loss (scale 5%), per op kind "
          "(roofline max_eff, half_tokens, memory_eff, overhead_s; GEMMs also half_k, half_n, half_tiles, softness, "
          "k_latency_s and, for dense GEMMs on a profile with num_sms, split_k_min_k, for FP8 GEMMs quant_memory_eff "
          "(their input's quantization, at the bytes the measuring stack moved), on the rows of gemm_source "
          "where one is named), per attention kernel (prefill_attention, with its L2 term where the profile has "
          "l2_cache_bytes; decode_attention) and per collective "
          "(alpha-beta latency, bus bandwidth); held-out rows excluded from the fit")


def profile_path(device: str) -> Path:
    """A profile file from a name, a path, or a prefix that names one profile (``h100`` -> h100-sxm)."""
    path = Path(device)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"--device: profile file {path} not found")
        return path
    exact = PROFILES_DIR / f"{device.lower()}.yaml"
    if exact.exists():
        return exact
    matches = [n for n in available_profiles() if n.startswith(device.lower())]
    if len(matches) == 1:
        return PROFILES_DIR / f"{matches[0]}.yaml"
    if matches:
        raise ConfigError(f"--device: {device!r} matches {', '.join(matches)}; name one")
    raise ConfigError(f"--device: {device!r} names no profile; allowed: {', '.join(available_profiles())} "
                      "or a path to a profile YAML")


def default_report_dir(path: Path) -> Path:
    """Reports of a profile go beside it, in ``validation/`` (the shipped profiles' reports are in the repo's)."""
    return path.resolve().parent / "validation"


def _read_profile(path: Path) -> HardwareProfile:
    return load_profile(str(path.resolve()))


def _split(profile: HardwareProfile) -> Split:
    c = profile.calibration
    return Split(tuple(c.get("held_out_models", ())), tuple(c.get("held_out_num_workers", ())),
                 tuple(c.get("held_out_head_layouts", ())), tuple(c.get("held_out_gemm_k", ())),
                 c.get("gemm_source"))


def _stored_measurements(profile: HardwareProfile, path: Path) -> list[Path]:
    stored = profile.calibration.get("measurements")
    if not stored:
        return []
    return [path.parent / m for m in ([stored] if isinstance(stored, str) else stored)]


def profile_measurements(device: str) -> tuple[HardwareProfile, Rows | None, Split]:
    """A profile, the measurements its calibration recorded (None where it has none at hand) and its split."""
    path = profile_path(device)
    profile = _read_profile(path)
    stored = [m for m in _stored_measurements(profile, path) if m.exists()]
    return profile, (read_all(stored, profile) if profile.calibrated and stored else None), _split(profile)


def read_all(paths: list[Path], profile: HardwareProfile) -> Rows:
    return Rows(pd.concat([read_measurements(p) for p in paths], ignore_index=True), profile)


def _check_devices(rows: Rows, profile: HardwareProfile, path: Path, measurements: list[Path]) -> None:
    """Rows measured on a part llmsim has another profile of (their ``device`` names it) neither calibrate nor
    validate this one: a T4 profile fitted on the CPU's rows had been written, its report measuring it against the
    rows it was fitted to. A profile's ``base:`` chain counts as its own (h200 takes h100-sxm's fit). Rows of a
    device no profile is named after (``cuda`` from the microbenchmarks, ``a100`` from Vidur) are the user's call."""
    own = {profile.name, *(p.stem for p in profile_files(str(path.resolve())))}
    wrong = sorted(set(rows.df["device"].astype(str)) & (set(available_profiles()) - own))
    if wrong:
        raise ConfigError(f"{', '.join(map(str, measurements))}: rows measured on {', '.join(wrong)}, not on "
                          f"{profile.name}; give their own profile (--device {wrong[0]}) or measurements of this part")


def unseen(rows: Rows, fitted: Rows | None, split: Split) -> np.ndarray:
    """Rows the fit cannot have seen: held out by the split, or of a model, head layout or collective the
    profile's own measurements do not contain (validating on another file must not label its rows "fit")."""
    held = split.held_out(rows.df)
    if fitted is None:
        return held
    fitted_keys = set(_keys(fitted.df)[~split.held_out(fitted.df) & ~split.other_gemm_source(fitted)])
    return held | ~np.isin(_keys(rows.df), list(fitted_keys))


def _keys(df: pd.DataFrame) -> np.ndarray:
    """What identifies the shapes a row comes from: its op and model, head layout or worker count."""
    return np.array([f"{op}|{model}|{h}/{k}|{w}|{d}|{g}" for op, model, h, k, w, d, g in zip(
        df["op"], df["model"], df["n_head"], df["n_kv_head"], df["num_workers"], df["device"], df["gemm_k"])])


@dataclass
class Validation:
    table: object  # pandas DataFrame from report.error_table
    report_path: Path
    plot_path: Path


def validate(path: Path, measurements: Path | None, out_dir: Path, command: str) -> Validation:
    profile = _read_profile(path)
    stored = _stored_measurements(profile, path)
    if measurements is None:
        if not stored:
            raise ConfigError(f"{path}: no calibration.measurements recorded; pass --measurements FILE")
        measurements = stored
    rows = read_all(measurements, profile)
    _check_devices(rows, profile, path, measurements)
    split = _split(profile)
    own = all(m.resolve() in {s.resolve() for s in stored} for m in measurements)
    # What the fit saw, where its files are at hand; otherwise (an uncalibrated profile, or a copy moved away
    # from its measurements) every row counts as unseen.
    seen = [m for m in stored if m.exists()]
    held = unseen(rows, None if own else (read_all(seen, profile) if seen else None), split)
    if not own and not seen:
        held = np.ones(len(rows), dtype=bool)
    held |= validation_only(profile, rows.kind) | split.other_gemm_source(rows)  # never fitted
    comparison = compare(profile, rows, held, l2_resident(profile, rows))
    if comparison.empty:
        raise ConfigError(f"{', '.join(map(str, measurements))}: no rows that {profile.name} can predict "
                          "(device ops or kinds missing)")
    table = error_table(comparison)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Named by the profile's file, so a copy of a shipped profile (same ``name:``) never overwrites its report.
    plot = out_dir / f"{path.stem}.png"
    parity_plot(comparison, profile.name, plot)
    report = out_dir / f"{path.stem}.md"
    shown = ", ".join(_relative(m, path.parent) for m in measurements)
    collectives = collective_table(comparison, profile.custom_all_reduce_max_bytes)
    report.write_text(markdown(profile, table, shown, split, plot.name, command, collectives, moe_table(comparison)))
    return Validation(table, report, plot)


def run_calibration(path: Path, measurements: list[Path], split: Split, out: Path, report_dir: Path,
                    command: str) -> tuple[HardwareProfile, Validation]:
    """Fit ``path``'s profile to ``measurements``, write the fitted profile to ``out``, validate it."""
    profile = _read_profile(path)
    rows = read_all(measurements, profile)
    _check_devices(rows, profile, path, measurements)
    _check_split(rows, split)
    fitted = calibrate(profile, rows, split)
    calibration = {
        "measurements": [_path_from(out.parent, m) for m in measurements],
        "held_out_models": list(split.held_out_models),
        "held_out_num_workers": list(split.held_out_num_workers),
        "held_out_head_layouts": list(split.held_out_head_layouts),
        "held_out_gemm_k": list(split.held_out_gemm_k),
        **({"gemm_source": split.gemm_source} if split.gemm_source else {}),
        "fitted_rows": int((~split.held_out(rows.df) & ~l2_resident(profile, rows)
                            & ~validation_only(profile, rows.kind) & ~split.other_gemm_source(rows)).sum()),
        "method": METHOD,
        "date": dt.date.today().isoformat(),
        "command": command,
    }
    fitted = fitted.model_copy(update={"calibrated": True, "calibration": calibration})
    write_profile(fitted, out)
    # The report says how to reproduce it: by name where the fit replaced the named profile, else by its file.
    device = fitted.name if out.resolve() == path.resolve() else out
    result = validate(out, measurements, report_dir, f"llmsim validate --device {device}")
    fitted = fitted.model_copy(update={"validation": {
        "report": _path_from(out.parent, result.report_path),
        "mape": summary(result.table),
    }})
    write_profile(fitted, out)
    return fitted, result


def _check_split(rows: Rows, split: Split) -> None:
    """A held-out name that matches no row is a typo, not a held-out set."""
    df = rows.df
    models = set(df["model"].dropna())
    for model in split.held_out_models:
        if model not in models:
            raise ConfigError(f"--hold-out-model {model!r} matches no measured row; models: "
                              f"{', '.join(sorted(models)[:20])}")
    layouts = {f"{int(h)}/{int(k)}" for h, k in zip(df["n_head"], df["n_kv_head"])
               if not (pd.isna(h) or pd.isna(k))}
    for layout in split.held_out_head_layouts:
        if layout not in layouts:
            raise ConfigError(f"--hold-out-heads {layout!r} matches no measured attention row; layouts: "
                              f"{', '.join(sorted(layouts))}")
    gemm_k = set(df.loc[df["op"] == "gemm", "gemm_k"].dropna().astype(int))
    for k in split.held_out_gemm_k:
        if k not in gemm_k:
            raise ConfigError(f"--hold-out-gemm-k {k} matches no measured GEMM")
    if split.gemm_source is not None and not any(
            str(k).startswith("linear") and str(src).startswith(split.gemm_source)
            for k, src in zip(rows.kind, df["source"])):
        raise ConfigError(f"--gemm-source {split.gemm_source!r} matches no measured GEMM's source")
    workers = set(df["num_workers"].dropna().astype(int))
    for n in split.held_out_num_workers:
        if n not in workers:
            raise ConfigError(f"--hold-out-workers {n} matches no measured collective")
    if len(df) and split.held_out(df).all():
        raise ConfigError("every measured row is held out: nothing left to fit")


def write_profile(profile: HardwareProfile, path: Path) -> None:
    data = profile.model_dump(exclude_none=True)
    # GEMM shape terms at their defaults (no shape terms) are left out: they would clutter every other op kind.
    for eff in data["efficiency"].values():
        for key in ("half_k", "half_n", "half_tiles"):
            if eff["compute"].get(key) == 0.0:
                del eff["compute"][key]
        if eff.get("k_latency_s") == 0.0:
            del eff["k_latency_s"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=120))
    forget_loaded_profiles()


def _path_from(base: Path, target: Path) -> str:
    """``target`` as a path from the folder ``base``, as a profile records its files (read back from its folder,
    wherever the command ran)."""
    return os.path.relpath(Path(target).resolve(), Path(base).resolve())


def _relative(target: Path, base: Path) -> str:
    try:
        return str(Path(target).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(target)
