"""Runs measured with vLLM's own client: ``vllm bench serve --save-result --save-detailed`` JSON, beside a small
file of the server's flags (``DIR/bench/<exp>.json`` and ``DIR/bench/<exp>.server.yaml``).

The result JSON gives, per request (in the order the client built them): ``start_times`` (the client's clock
when it sent each request; vLLM saves them since late 2025), ``input_lens``, ``output_lens``, ``ttfts``,
``itls`` (or ``e2els``) and ``errors`` ("" for a success). The server file names what the JSON does not::

    model: meta-llama/Llama-2-7b-hf   # HuggingFace id (catalog or DIR/model_configs/<name>/config.json)
    num_gpu_blocks: 7462              # the KV blocks the server logged ("# GPU blocks")
    max_num_seqs: 256
    max_num_batched_tokens: 8192
    tensor_parallel_size: 1           # optional, default 1
    block_size: 16                    # optional, default 16
    max_model_len: 4096               # optional
    ignore_eos: true                  # optional: the client forced output lengths
    output_len: 256                   # optional: the requested output length, for failed requests
    timeout_s: 21600                  # optional: the client's timeout (vLLM's: 6 hours)
"""

from __future__ import annotations

import json
from pathlib import Path

from llmsim.e2e.runs import MeasuredRun, non_negative, stages_until_last_arrival, whole_count, yaml_file
from llmsim.errors import ConfigError

VLLM_BENCH_TIMEOUT_S = 6 * 60 * 60.0  # vllm bench serve's aiohttp timeout
REQUIRED_LISTS = ("start_times", "input_lens", "output_lens", "ttfts")
# Each flag's default (None: required; max_model_len unset: the model's own context length).
SERVER_INTS = {"num_gpu_blocks": None, "max_num_seqs": None, "max_num_batched_tokens": None,
               "tensor_parallel_size": 1, "block_size": 16, "max_model_len": 0, "output_len": 0}
_MAY_BE_ZERO = ("output_len",)  # 0: none requested


def bench_names(root: Path) -> list[str]:
    bench = root / "bench"
    if not bench.is_dir():
        return []
    return sorted(p.stem for p in bench.glob("*.json"))


def _server_flags(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"{path}: missing (the server's flags beside {path.name.replace('.server.yaml', '.json')}:"
                          " model, num_gpu_blocks, max_num_seqs, max_num_batched_tokens)")
    flags = yaml_file(path)
    if not isinstance(flags, dict):
        raise ConfigError(f"{path}: expected a mapping of server flags")
    unknown = sorted(set(flags) - set(SERVER_INTS) - {"model", "ignore_eos", "timeout_s"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]}; allowed: "
                          f"{', '.join(sorted([*SERVER_INTS, 'model', 'ignore_eos', 'timeout_s']))}")
    out = {}
    for key, default in SERVER_INTS.items():
        value = flags.get(key, default)
        if value is None:
            raise ConfigError(f"{path}: {key}: missing")
        least = 0 if key in _MAY_BE_ZERO or key not in flags else 1  # a max_model_len written as 0 is no length
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{path}: {key}: expected a whole number >= {least}, got {value!r}")
        out[key] = value
    timeout = flags.get("timeout_s", VLLM_BENCH_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"{path}: timeout_s: expected seconds > 0, got {timeout!r}")
    out["timeout_s"] = float(timeout)
    if not isinstance(flags.get("ignore_eos", False), bool):
        raise ConfigError(f"{path}: ignore_eos: expected true or false")
    out["ignore_eos"] = flags.get("ignore_eos", False)
    if flags.get("model") is not None and not (isinstance(flags["model"], str) and flags["model"]):
        raise ConfigError(f"{path}: model: expected a HuggingFace id, got {flags['model']!r}")
    out["model"] = flags.get("model")
    return out


def load_bench_run(root: Path, name: str) -> MeasuredRun:
    path = root / "bench" / f"{name}.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a vllm bench serve result JSON: {exc}") from None
    if not isinstance(result, dict):
        raise ConfigError(f"{path}: expected a JSON object (vllm bench serve --save-result --save-detailed)")
    missing = [k for k in REQUIRED_LISTS if not isinstance(result.get(k), list)]
    if missing:
        raise ConfigError(f"{path}: no per-request {', '.join(missing)} (save with --save-result --save-detailed; "
                          "start_times needs a vLLM of late 2025 or newer)")
    n = len(result["start_times"])
    lists = {k: result[k] for k in ("start_times", "input_lens", "output_lens", "ttfts", "itls", "e2els", "errors")
             if isinstance(result.get(k), list)}
    bad = [k for k, v in lists.items() if len(v) != n]
    if bad:
        raise ConfigError(f"{path}: {bad[0]} has {len(lists[bad[0]])} entries for {n} requests")
    if "itls" not in lists and "e2els" not in lists:
        raise ConfigError(f"{path}: needs itls or e2els to know each request's end")
    flags = _server_flags(root / "bench" / f"{name}.server.yaml")
    model = flags["model"] or result.get("model_id")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{path}: no model: name it in {name}.server.yaml (model: <HuggingFace id>)")
    for i in range(n):
        for k in ("start_times", "ttfts"):
            v = lists[k][i]
            if not non_negative(v):
                raise ConfigError(f"{path}: {k}[{i}]: expected seconds >= 0, got {v!r}")
        for k in ("input_lens", "output_lens"):
            v = lists[k][i]
            if not whole_count(v):
                raise ConfigError(f"{path}: {k}[{i}]: expected a whole number >= 0, got {v!r}")
        if "errors" in lists and not (lists["errors"][i] is None or isinstance(lists["errors"][i], str)):
            # bool() had read any other value, a NaN too, as a failure
            raise ConfigError(f"{path}: errors[{i}]: expected the error's text (\"\" for a success), "
                              f"got {lists['errors'][i]!r}")
        if "e2els" in lists:
            if not non_negative(lists["e2els"][i]):  # a negative E2E had been measured as it stood
                raise ConfigError(f"{path}: e2els[{i}]: expected seconds >= 0, got {lists['e2els'][i]!r}")
        else:
            itls = lists["itls"][i]
            if not (itls is None or isinstance(itls, list) and all(non_negative(v) for v in itls)):
                raise ConfigError(f"{path}: itls[{i}]: expected a list of seconds >= 0, got {itls!r}")
    t0 = min(lists["start_times"], default=0.0)
    order = sorted(range(n), key=lambda i: lists["start_times"][i])  # the replay wants arrival order
    errors = lists.get("errors") or [""] * n
    requests, truth = [], []
    for i in order:
        error = bool(errors[i])
        ttft = float(lists["ttfts"][i])
        e2e = float(lists["e2els"][i]) if "e2els" in lists else ttft + sum(lists["itls"][i] or ())
        requests.append({"arrival_time_us": round((lists["start_times"][i] - t0) * 1e6),
                         "input_tokens": lists["input_lens"][i],
                         "output_tokens": 0 if error else lists["output_lens"][i], "has_error": error})
        truth.append({"ttft_s": None if error else ttft, "e2e_s": None if error else e2e, "has_error": error})
    return MeasuredRun(
        name=name, model_id=model, model_config={}, tp=flags["tensor_parallel_size"],
        max_num_seqs=flags["max_num_seqs"], max_num_batched_tokens=flags["max_num_batched_tokens"],
        block_size=flags["block_size"], kv_blocks=flags["num_gpu_blocks"], max_model_len=flags["max_model_len"] or None,
        requests=requests, truth=truth,
        stages=stages_until_last_arrival([], requests),  # one load stage over the arrivals
        shared_prefix={"output_len": flags["output_len"]} if flags["output_len"] else {},
        ignore_eos=flags["ignore_eos"], timeout_s=flags["timeout_s"])
