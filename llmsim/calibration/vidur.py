"""Import Vidur's profiling CSVs (github.com/microsoft/vidur, MIT) into the measurements schema.

Layout read: ``compute/<device>/<org>/<model>/mlp.csv`` (per-shard layer ops by ``num_tokens`` and TP degree, times
in ms, fp16) and ``network/<node>/{all_reduce,send_recv}.csv`` (collectives by message size in bytes).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llmsim.calibration.measurements import LAYER_OPS, check, normalize
from llmsim.errors import TraceError

_STATS = {"median": "median_ms", "mean": "mean_ms", "std": "std_ms", "min": "min_ms", "max": "max_ms"}


def _read(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # ValueError: pandas' parser and empty-file errors, bytes not UTF-8
        raise TraceError(f"{path}: not a Vidur profiling CSV: {exc}") from None
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing Vidur columns {', '.join(missing)}")
    return df


def import_compute_csv(path: str | Path, device: str, model: str) -> pd.DataFrame:
    """One ``mlp.csv``: every op with a ``time_stats.<op>.median`` column becomes rows of the schema."""
    path = Path(path)
    shape = ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp", "num_tokens",
             "num_tensor_parallel_workers"]
    df = _read(path, tuple(shape))
    frames = []
    for op in LAYER_OPS:
        if f"time_stats.{op}.median" not in df.columns:
            continue
        rows = pd.DataFrame({
            "device": device, "op": op, "dtype": "fp16", "model": model,
            "tp": df["num_tensor_parallel_workers"], "num_tokens": df["num_tokens"],
            "n_head": df["n_head"], "n_kv_head": df["n_kv_head"], "n_embd": df["n_embd"],
            "n_expanded_embd": df["n_expanded_embd"], "vocab_size": df["vocab_size"],
            "gated": df["use_gated_mlp"],  # as written: check() refuses what is no true or false
        })
        for stat, column in _STATS.items():
            rows[column] = df.get(f"time_stats.{op}.{stat}")
        rows["source"] = f"vidur:compute/{device}/{model}/mlp.csv"
        frames.append(rows)
    if not frames:
        raise TraceError(f"{path}: no time_stats.<op>.median columns for any of {', '.join(LAYER_OPS)}")
    return _checked(frames, path)


def _checked(frames: list[pd.DataFrame], path: Path) -> pd.DataFrame:
    """Rows made from a CSV's rows (each frame indexed by the CSV's row), checked; an error names the CSV's line."""
    rows = pd.concat(frames)
    return check(normalize(rows), str(path), table_rows=[f":{i + 2}" for i in rows.index])


def import_network_csv(path: str | Path, device: str, node: str) -> pd.DataFrame:
    """One ``all_reduce.csv`` or ``send_recv.csv``. Vidur records rank 0 of each run."""
    path = Path(path)
    df = _read(path, ("num_workers", "size", "collective", "devices_per_node"))
    frames = []
    for collective, group in df.groupby("collective", sort=True):
        rows = pd.DataFrame({"device": device, "op": collective, "dtype": "fp16",
                             "size_bytes": group["size"], "num_workers": group["num_workers"],
                             "devices_per_node": group["devices_per_node"]})
        for stat, column in _STATS.items():
            rows[column] = group.get(f"time_stats.{collective}.{stat}")
        rows["source"] = f"vidur:network/{node}/{path.name}"
        frames.append(rows)
    return _checked(frames, path)


def import_vidur(root: str | Path, device: str, node: str | None = None) -> pd.DataFrame:
    """All compute CSVs of ``device`` under ``root`` and, when ``node`` is given, its network CSVs."""
    root = Path(root)
    compute_dir = root / "compute" / device
    files = sorted(compute_dir.glob("*/*/mlp.csv"))
    if not files:
        raise TraceError(f"{compute_dir}: no <org>/<model>/mlp.csv files for device {device!r}")
    frames = [import_compute_csv(f, device, f"{f.parent.parent.name}/{f.parent.name}") for f in files]
    if node is not None:
        network = sorted((root / "network" / node).glob("*.csv"))
        if not network:
            raise TraceError(f"{root / 'network' / node}: no collective CSVs")
        frames += [import_network_csv(f, device, node) for f in network]
    return pd.concat(frames, ignore_index=True)
