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
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
        for entry, entry_where in ((r, f"{replay_path}: requests[{i}]"), (t, where)):
            if entry.get("has_error") is not None and not isinstance(entry["has_error"], bool):
                raise ConfigError(f"{entry_where}: has_error {entry['has_error']!r}: expected true or false")
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
    if not isinstance(replay["model_id"], str):
        raise ConfigError(f"{replay_path}: model_id {replay['model_id']!r}: expected a HuggingFace id")
    config = replay["config"]
    if not isinstance(config, dict):
        raise ConfigError(f"{replay_path}: config: expected an object of the server's settings")
    _need(config, ("tensor_parallelism", "max_num_seqs", "max_num_batched_tokens", "kv_blocks_total_gpu"),
          f"{replay_path}: config")
    for key in ("tensor_parallelism", "max_num_seqs", "max_num_batched_tokens", "kv_blocks_total_gpu", "block_size"):
        if key in config and not (whole_count(config[key]) and config[key] >= 1):  # int() had cut 0.5 to 0
            raise ConfigError(f"{replay_path}: config.{key} {config[key]!r}: expected a whole number >= 1")
    requests = replay["requests"]
    if not isinstance(requests, list):
        raise ConfigError(f"{replay_path}: requests: expected a list")
    if len(truth) != len(requests):
        raise ConfigError(f"{truth_path}: {len(truth)} measurements for {len(requests)} requests")
    _check_entries(requests, truth, replay_path, truth_path)
    run_dir = root / "runs" / name
    stages, shared, ignore_eos = [], {}, False
    profile_path = run_dir / "profile.yaml"
    if present(profile_path):
        stages, shared, ignore_eos = _profile(yaml_file(profile_path, "YAML/JSON"), profile_path)  # JSON is YAML
    stages = stages_until_last_arrival(stages, requests)
    max_model_len = None
    exp_path = run_dir / "exp-config.yaml"
    if present(exp_path):
        flags = yaml_file(exp_path) or {}
        if not isinstance(flags, dict):
            raise ConfigError(f"{exp_path}: expected a mapping of vLLM's flags")
        max_model_len = flags.get("max_model_len")
        if max_model_len is not None and not (whole_count(max_model_len) and max_model_len >= 1):
            raise ConfigError(f"{exp_path}: max_model_len {max_model_len!r}: expected a whole number >= 1")
    return MeasuredRun(
        name=name, model_id=replay["model_id"], model_config=replay.get("model_config") or {},
        tp=int(config["tensor_parallelism"]), max_num_seqs=int(config["max_num_seqs"]),
        max_num_batched_tokens=int(config["max_num_batched_tokens"]), block_size=int(config.get("block_size", 16)),
        kv_blocks=int(config["kv_blocks_total_gpu"]), max_model_len=max_model_len, requests=requests, truth=truth,
        stages=stages, shared_prefix=shared, ignore_eos=ignore_eos)


def present(path: Path) -> bool:
    """Whether an optional file is there to read: a link to nothing is (reading it is the error that names it),
    where ``exists()`` had taken it for absent and the run was replayed without it."""
    return path.exists() or path.is_symlink()


def yaml_file(path: Path, what: str = "YAML"):
    """A measured run's YAML file (a client's or a server's settings); one that does not read is an error naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: not valid {what}: {exc}") from None


def _mapping(value, where: str) -> dict:
    """An optional section of a profile: absent (or null) is empty; anything but a mapping is an error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _profile(profile, path: Path) -> tuple[list[tuple[float, float]], dict, bool]:
    """inference-perf's load stages (start, end), its shared-prefix data section and whether the server ignored
    EOS, from its client config, checked as the replay reads them."""
    profile = _mapping(profile, str(path))
    stage_list = _mapping(profile.get("load"), f"{path}: load").get("stages") or []
    if not isinstance(stage_list, list):
        raise ConfigError(f"{path}: load.stages: expected a list of stages")
    stages, start = [], 0.0
    for k, stage in enumerate(stage_list):
        where = f"{path}: load.stages[{k}]"
        if not isinstance(stage, dict):
            raise ConfigError(f"{where}: expected a mapping with a duration")
        _need(stage, ("duration",), where)
        if not (non_negative(stage["duration"]) and stage["duration"] > 0):
            raise ConfigError(f"{where}: duration {stage['duration']!r}: expected seconds > 0")
        stages.append((start, start + float(stage["duration"])))
        start += float(stage["duration"])
    shared = _mapping(_mapping(profile.get("data"), f"{path}: data").get("shared_prefix"),
                      f"{path}: data.shared_prefix")
    for key in ("num_unique_system_prompts", "system_prompt_len", "question_len", "output_len"):
        if shared.get(key) is not None and not whole_count(shared[key]):
            raise ConfigError(f"{path}: data.shared_prefix.{key} {shared[key]!r}: expected a whole number >= 0")
    ignore_eos = _mapping(profile.get("server"), f"{path}: server").get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ConfigError(f"{path}: server.ignore_eos {ignore_eos!r}: expected true or false")
    return stages, shared, ignore_eos


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
