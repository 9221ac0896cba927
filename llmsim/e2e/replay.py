"""Replay a measured run in the simulator: the server's model, TP, flags and KV blocks, vLLM V1 with prefix
caching, the run's exact arrivals and lengths, and the shared system prompts of its workload."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmsim.cluster.simulation import build_execution, simulate
from llmsim.config import ExperimentConfig, parse_config
from llmsim.e2e.runs import MeasuredRun, last_arrival_s, present
from llmsim.errors import ConfigError, LLMSimError
from llmsim.execution.model import ExecutionModel
from llmsim.request import Request

# HuggingFace ids of catalog models (used when DIR/model_configs/ has no config.json for the run's model).
CATALOG_IDS = {"meta-llama/Llama-2-7b-hf": "Llama-2-7B", "meta-llama/Llama-2-13b-hf": "Llama-2-13B",
               "meta-llama/Llama-2-70b-hf": "Llama-2-70B", "mistralai/Mixtral-8x7B-v0.1": "Mixtral-8x7B",
               "codellama/CodeLlama-34b-Instruct-hf": "CodeLlama-34B", "meta-llama/Meta-Llama-3-8B": "Llama-3-8B"}


@dataclass
class Replayed:
    """Per request, index-aligned with the run: predicted TTFT and E2E (NaN where the request failed: not
    finished within the client's timeout), and whether its lengths were filled in from the workload profile."""

    ttft_s: np.ndarray
    e2e_s: np.ndarray
    error: np.ndarray
    outputs: np.ndarray  # output tokens each request was replayed with (TPOT divides by these, both sides)
    filled_lengths: int
    kv_blocks_planned: int  # the simulator's own memory plan, beside the server's count it replays
    wall_s: float
    prompts: np.ndarray | None = None  # prompt tokens each request was replayed with
    cached_tokens: np.ndarray | None = None  # of those, the prefix-cache hit the simulated engine gave it
    execution: ExecutionModel | None = None  # the replay's execution model (``llmsim.e2e.step_check``)


def model_name(run: MeasuredRun, root: Path) -> str:
    local = root / "model_configs" / run.model_id.split("/")[-1] / "config.json"
    if present(local):
        return str(local)
    if run.model_id in CATALOG_IDS:
        return CATALOG_IDS[run.model_id]
    raise ConfigError(f"{run.name}: model {run.model_id!r} is neither in {local.parent.parent} nor in the catalog "
                      f"({', '.join(CATALOG_IDS)})")


def experiment(run: MeasuredRun, root: Path, device: str, frontend_latency_s: float = 0.0,
               time_factors: dict[str, float] | None = None) -> ExperimentConfig:
    return parse_config({
        "name": run.name, "model": {"name": model_name(run, root), "dtype": "bf16"},
        "hardware": {"device": device, "time_factors": time_factors or {}}, "parallel": {"tp": run.tp},
        "cluster": {"frontend_latency_s": frontend_latency_s},
        "scheduler": {"name": "vllm_v1", "enable_prefix_caching": True, "max_num_seqs": run.max_num_seqs,
                      "max_num_batched_tokens": run.max_num_batched_tokens, "block_size": run.block_size,
                      "max_model_len": run.max_model_len, "num_gpu_blocks_override": run.kv_blocks},
        # The requests come from the run; this only satisfies the schema.
        "workload": {"num_requests": len(run.requests), "arrival": {"kind": "poisson", "rate_per_s": 1.0},
                     "prompt_tokens": {"kind": "fixed", "value": 1}, "output_tokens": {"kind": "fixed", "value": 1}},
        # The client gives up at its timeout and the server aborts the request (freeing its KV), as vLLM does.
        "simulation": {"record_iterations": False, "max_time_s": last_arrival_s(run.requests) + run.timeout_s + 1.0,
                       "client_timeout_s": run.timeout_s},
    }, f"{run.name} (replayed)")


# A run's prompts come from a pool that the client cycles through when the prompt lengths repeat with one
# period: at least this share of requests has the length of the request one period earlier ...
POOL_MATCH_SHARE = 0.95
# ... where lengths drawn at random would match far less often (the chance that two requests share a length).
POOL_MAX_CHANCE = 0.5
POOL_MAX_PERIOD = 1000


def prompt_pool_period(prompt_lengths: list[int]) -> int:
    """The size of the prompt pool a run cycles through in arrival order, or 0 where it has none.

    inference-perf's data generators build a fixed pool of prompts and send ``pool[i % len(pool)]`` as the
    ``i``-th request; every shipped run does (a pool of 100: each prompt length occurs a multiple of n/100 times,
    and 98-99.7% of requests repeat the length of the request 100 before them, the rest reordered by concurrent
    client workers). A repeated prompt is a prefix-cache hit on the server for all its full blocks, so which
    request repeats which decides the prefill work. The period is the smallest one the lengths repeat with
    (failed requests, recorded with no length, are left out of the comparison)."""
    lengths = np.asarray(prompt_lengths, dtype=np.int64)
    known = lengths[lengths > 0]
    if len(known) < 2:
        return 0
    _, counts = np.unique(known, return_counts=True)
    if ((counts / len(known)) ** 2).sum() > POOL_MAX_CHANCE:
        return 0  # (nearly) one length: a repeat says nothing
    for period in range(1, min(POOL_MAX_PERIOD, len(lengths) // 2) + 1):
        a, b = lengths[period:], lengths[:-period]
        both = (a > 0) & (b > 0)
        if both.sum() and (a[both] == b[both]).mean() >= POOL_MATCH_SHARE:
            return period
    return 0


def requests_of(run: MeasuredRun) -> tuple[list[Request], int]:
    """The run's requests, with the content each shares with others as prefix segments. Requests the data gives
    no usable lengths for take their pool slot's length, or else the profile's nominal lengths; returns how many
    did:

    - failed requests carry 0 prompt and output tokens;
    - with ``ignore_eos`` the server generates the requested length, yet some runs record far fewer output
      tokens for requests that took as long as full-length ones (a counting fault in the client's data: in the
      Llama-2-7B codegen run 2,876 of 9,000 requests record under 200 of the forced ~247 tokens, with the same
      2.1 s median E2E, whatever count they record); a count under 90% of the profile's ``output_len`` is
      replaced by it (the counts of intact requests spread about 5% around it).

    Shared content: where the prompts cycle through a pool (``prompt_pool_period``), request ``i`` sends the whole
    prompt of slot ``i % period`` again; otherwise each request shares its system prompt (``shared_prefix``)."""
    sp = run.shared_prefix
    prompts = int(sp.get("num_unique_system_prompts", 0))
    system = int(sp.get("system_prompt_len", 0))
    nominal_in = system + int(sp.get("question_len", 0))
    nominal_out = int(sp.get("output_len", 0))
    forced = bool(run.ignore_eos and nominal_out)
    recorded = [int(r["input_tokens"]) for r in run.requests]
    period = prompt_pool_period(recorded)
    slot_length: dict[int, int] = {}
    if period:
        for i, n in enumerate(recorded):
            if n > 0:
                slot_length.setdefault(i % period, n)
    out, filled = [], 0
    for i, r in enumerate(run.requests):
        prompt, output = recorded[i], int(r["output_tokens"])
        if forced and 0 < output < 0.9 * nominal_out:
            output = 0
        if prompt <= 0 or output <= 0:
            if prompt <= 0:
                prompt = slot_length.get(i % period, nominal_in) if period else nominal_in
            if output <= 0:
                output = nominal_out
            if prompt <= 0 or output <= 0:
                raise ConfigError(f"{run.name}: request {i} has {recorded[i]} prompt / {r['output_tokens']} output "
                                  "tokens and nothing to fill them from (a shared_prefix profile, or output_len in "
                                  "the server's flags)")
            filled += 1
        req = Request(i, r["arrival_time_us"] / 1e6, prompt, output)
        if period:
            req.prefix_segments = ((i % period, prompt),)
        elif prompts and system and prompt > system:
            # inference-perf's users are spread over the system prompts; every prompt is reused within seconds,
            # so which user has which prompt does not change what the cache holds.
            req.prefix_segments = ((i % prompts, system),)
        out.append(req)
    return out, filled


def replay(run: MeasuredRun, root: Path, device: str, frontend_latency_s: float = 0.0,
           time_factors: dict[str, float] | None = None) -> Replayed:
    """``time_factors``: multipliers on the kernel groups' modelled times (a prediction-interval sample)."""
    cfg = experiment(run, root, device, frontend_latency_s, time_factors)
    requests, filled = requests_of(run)
    planned = _planned_blocks(cfg)
    result = simulate(cfg, requests)
    df = result.recorder.request_frame().set_index("id").reindex(range(len(requests)))
    arrival = np.array([r.arrival_s for r in requests])
    ttft = df["first_token_s"].to_numpy(dtype=float) - arrival
    e2e = df["finish_s"].to_numpy(dtype=float) - arrival
    error = ~((df["status"] == "finished").to_numpy() & (e2e <= run.timeout_s))
    ttft[error] = np.nan
    e2e[error] = np.nan
    outputs = np.array([r.num_output_tokens for r in requests], dtype=float)
    prompts = np.array([r.num_prompt_tokens for r in requests], dtype=float)
    cached = df["num_cached_tokens"].fillna(0).to_numpy(dtype=float)
    return Replayed(ttft, e2e, error, outputs, filled, planned, result.wall_s, prompts, cached, result.execution)


def _planned_blocks(cfg: ExperimentConfig) -> int:
    scheduler = cfg.scheduler.model_copy(update={"num_gpu_blocks_override": None})
    try:
        return build_execution(cfg.model_copy(update={"scheduler": scheduler}))[2].num_blocks
    except LLMSimError:
        return 0  # the plan does not fit at this context length; the replay uses the server's count anyway
