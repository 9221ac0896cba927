"""Measured serving runs in the layout of the shipped vLLM H100 data (see the README, "End-to-end validation")::

    DIR/replay/<exp>.json.gz               requests in arrival order (arrival_time_us, input_tokens, output_tokens,
                                           has_error) + server config (tensor_parallelism, max_num_seqs,
                                           max_num_batched_tokens, kv_blocks_total_gpu, block_size) + model_config
    DIR/replay/<exp>_ground_truth.json.gz  per request, index-aligned: measured ttft_s, e2e_s, has_error
    DIR/runs/<exp>/profile.yaml            inference-perf's client config (JSON): load stages, shared-prefix data
    DIR/runs/<exp>/exp-config.yaml         vLLM's flags (max_model_len, ...)

Every file but the two replay files is optional: without a profile the run is one stage and has no shared
prefixes; without exp-config the model's own context length applies.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from llmsim.errors import ConfigError

CLIENT_TIMEOUT_S = 300.0  # inference-perf's request timeout in the shipped runs (the data shows failures at 300 s)


@dataclass
class MeasuredRun:
    name: str
    model_id: str  # HuggingFace id, e.g. meta-llama/Llama-2-7b-hf
    model_config: dict  # dimensions from the replay file
    tp: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    kv_blocks: int  # the KV blocks the server had
    max_model_len: int | None
    requests: list[dict]  # arrival_time_us, input_tokens, output_tokens, has_error
    truth: list[dict]  # ttft_s, e2e_s, has_error
    stages: list[tuple[float, float]] = field(default_factory=list)  # (start_s, end_s) of each load stage
    shared_prefix: dict = field(default_factory=dict)  # inference-perf's shared_prefix data section
    ignore_eos: bool = False  # the client forced output lengths
    timeout_s: float = CLIENT_TIMEOUT_S

    def measured_ttft_s(self) -> np.ndarray:
        """Measured TTFT per request (NaN where the data has none)."""
        return np.array([t.get("ttft_s", np.nan) for t in self.truth], dtype=float)

    def measured_e2e_s(self) -> np.ndarray:
        return np.array([t.get("e2e_s", np.nan) for t in self.truth], dtype=float)

    def measured_errors(self) -> np.ndarray:
        """Requests that failed on the server or at the client (either file may say so)."""
        return np.array([bool(t.get("has_error")) or bool(r.get("has_error"))
                         for t, r in zip(self.truth, self.requests)], dtype=bool)


def _json_gz(path: Path):
    try:
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a gzipped JSON replay file: {exc}") from None


def _need(data: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")


def non_negative(value, allow_none: bool = False) -> bool:
    """A number >= 0 (not a bool, not NaN); None only where ``allow_none``."""
    if value is None:
        return allow_none
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value and value >= 0


def whole_count(value) -> bool:
    """A whole number >= 0 (not a bool)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _check_entries(requests: list, truth: list, replay_path: Path, truth_path: Path) -> None:
    """Every request and measurement as the replay reads them, checked before any run is replayed (a bad entry
    in the last run had surfaced as a KeyError after the others' replays): a request's arrival (microseconds,
    in order) and token counts; a measurement's E2E and TTFT in seconds, TTFT absent only for a failed request."""
    last = 0
    for i, (r, t) in enumerate(zip(requests, truth)):
        where = f"{replay_path}: requests[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: expected an object")
        _need(r, ("arrival_time_us", "input_tokens", "output_tokens"), where)
        if not non_negative(r["arrival_time_us"]) or r["arrival_time_us"] < last:
            raise ConfigError(f"{where}: arrival_time_us {r['arrival_time_us']!r}: expected microseconds >= 0, "
                              "in arrival order")
        last = r["arrival_time_us"]
        for k in ("input_tokens", "output_tokens"):
            if not whole_count(r[k]):
                raise ConfigError(f"{where}: {k} {r[k]!r}: expected a whole number >= 0")
        where = f"{truth_path}: [{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{where}: expected an object")
        failed = bool(t.get("has_error")) or bool(r.get("has_error"))
        for k in ("ttft_s", "e2e_s"):
            if not non_negative(t.get(k), allow_none=failed):
                raise ConfigError(f"{where}: {k} {t.get(k)!r}: expected seconds >= 0"
                                  + ("" if failed else " (only a failed request, has_error, may have none)"))


def load_run(root: Path, name: str) -> MeasuredRun:
    replay_path = root / "replay" / f"{name}.json.gz"
    truth_path = root / "replay" / f"{name}_ground_truth.json.gz"
    if not truth_path.exists():
        raise ConfigError(f"{replay_path}: no ground truth beside it ({truth_path.name})")
    replay, truth = _json_gz(replay_path), _json_gz(truth_path)
    if not isinstance(replay, dict) or not isinstance(truth, list):
        raise ConfigError(f"{replay_path}: expected an object with requests, and a list of measurements")
    _need(replay, ("model_id", "config", "requests"), str(replay_path))
    config = replay["config"]
    _need(config, ("tensor_parallelism", "max_num_seqs", "max_num_batched_tokens", "kv_blocks_total_gpu"),
          f"{replay_path}: config")
    requests = replay["requests"]
    if not isinstance(requests, list):
        raise ConfigError(f"{replay_path}: requests: expected a list")
    if len(truth) != len(requests):
        raise ConfigError(f"{truth_path}: {len(truth)} measurements for {len(requests)} requests")
    _check_entries(requests, truth, replay_path, truth_path)
    run_dir = root / "runs" / name
    stages, shared, ignore_eos = [], {}, False
    profile_path = run_dir / "profile.yaml"
    if profile_path.exists():
        try:
            profile = yaml.safe_load(profile_path.read_text())  # JSON is YAML
        except yaml.YAMLError as exc:
            raise ConfigError(f"{profile_path}: not valid YAML/JSON: {exc}") from None
        start = 0.0
        for k, stage in enumerate((profile.get("load") or {}).get("stages") or []):
            _need(stage, ("duration",), f"{profile_path}: load.stages[{k}]")
            stages.append((start, start + float(stage["duration"])))
            start += float(stage["duration"])
        shared = ((profile.get("data") or {}).get("shared_prefix")) or {}
        ignore_eos = bool((profile.get("server") or {}).get("ignore_eos"))
    stages = stages_until_last_arrival(stages, requests)
    max_model_len = None
    exp_path = run_dir / "exp-config.yaml"
    if exp_path.exists():
        max_model_len = (yaml.safe_load(exp_path.read_text()) or {}).get("max_model_len")
    return MeasuredRun(
        name=name, model_id=replay["model_id"], model_config=replay.get("model_config") or {},
        tp=int(config["tensor_parallelism"]), max_num_seqs=int(config["max_num_seqs"]),
        max_num_batched_tokens=int(config["max_num_batched_tokens"]), block_size=int(config.get("block_size", 16)),
        kv_blocks=int(config["kv_blocks_total_gpu"]), max_model_len=max_model_len, requests=requests, truth=truth,
        stages=stages, shared_prefix=shared, ignore_eos=ignore_eos)


def last_arrival_s(requests: list[dict]) -> float:
    return max((r["arrival_time_us"] for r in requests), default=0) / 1e6


def stages_until_last_arrival(stages: list[tuple[float, float]], requests: list[dict]) -> list[tuple[float, float]]:
    """The load stages cut at the last arrival, where the data stops earlier (a slice of a run); one stage over
    all the arrivals when there are none."""
    last = last_arrival_s(requests) + 1e-6
    return [(lo, min(hi, last)) for lo, hi in stages if lo < last] or [(0.0, last)]


def find_runs(root: Path) -> list[str]:
    """Run names under ``root/replay`` (every ``<exp>.json.gz`` with a ground truth file beside it); none when
    ``root`` holds only ``bench/`` (``vllm_bench.py``)."""
    replay = root / "replay"
    if not replay.is_dir():
        if (root / "bench").is_dir():
            return []
        raise ConfigError(f"{root}: no replay/ folder (expected DIR/replay/<exp>.json.gz and "
                          "<exp>_ground_truth.json.gz) and no bench/ folder (vllm bench serve results)")
    names = sorted(p.name[:-len(".json.gz")] for p in replay.glob("*.json.gz")
                   if not p.name.endswith("_ground_truth.json.gz"))
    if not names and not (root / "bench").is_dir():
        raise ConfigError(f"{replay}: no <exp>.json.gz replay files")
    return names
