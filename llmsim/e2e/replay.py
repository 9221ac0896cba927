"""Replay a measured run in the simulator: the server's model, TP, flags and KV blocks, vLLM V1 with prefix
caching, the run's exact arrivals and lengths, and the shared system prompts of its workload."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmsim.cluster.simulation import build_execution, simulate
from llmsim.config import ExperimentConfig, parse_config
from llmsim.e2e.runs import MeasuredRun
from llmsim.errors import ConfigError, LLMSimError
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


def model_name(run: MeasuredRun, root: Path) -> str:
    local = root / "model_configs" / run.model_id.split("/")[-1] / "config.json"
    if local.exists():
        return str(local)
    if run.model_id in CATALOG_IDS:
        return CATALOG_IDS[run.model_id]
    raise ConfigError(f"{run.name}: model {run.model_id!r} is neither in {local.parent.parent} nor in the catalog "
                      f"({', '.join(CATALOG_IDS)})")


def experiment(run: MeasuredRun, root: Path, device: str) -> ExperimentConfig:
    return parse_config({
        "name": run.name, "model": {"name": model_name(run, root), "dtype": "bf16"},
        "hardware": {"device": device}, "parallel": {"tp": run.tp},
        "scheduler": {"name": "vllm_v1", "enable_prefix_caching": True, "max_num_seqs": run.max_num_seqs,
                      "max_num_batched_tokens": run.max_num_batched_tokens, "block_size": run.block_size,
                      "max_model_len": run.max_model_len, "num_gpu_blocks_override": run.kv_blocks},
        # The requests come from the run; this only satisfies the schema.
        "workload": {"num_requests": len(run.requests), "arrival": {"kind": "poisson", "rate_per_s": 1.0},
                     "prompt_tokens": {"kind": "fixed", "value": 1}, "output_tokens": {"kind": "fixed", "value": 1}},
        "simulation": {"record_iterations": False, "max_time_s": run_end_s(run) + run.timeout_s + 1.0},
    }, f"{run.name} (replayed)")


def run_end_s(run: MeasuredRun) -> float:
    return max((r["arrival_time_us"] for r in run.requests), default=0) / 1e6


def requests_of(run: MeasuredRun) -> tuple[list[Request], int]:
    """The run's requests, with the system prompt each shares as a prefix segment. Requests the data gives no
    usable lengths for take the profile's nominal lengths; returns how many did:

    - failed requests carry 0 prompt and output tokens;
    - with ``ignore_eos`` the server generates the requested length, yet some runs record far fewer output
      tokens for requests that took as long as full-length ones (a counting fault in the client's data: in the
      Llama-2-7B codegen run 2,876 of 9,000 requests record under 200 of the forced ~247 tokens, with the same
      2.1 s median E2E, whatever count they record); a count under 90% of the profile's ``output_len`` is
      replaced by it (the counts of intact requests spread about 5% around it)."""
    sp = run.shared_prefix
    prompts = int(sp.get("num_unique_system_prompts", 0))
    system = int(sp.get("system_prompt_len", 0))
    nominal_in = system + int(sp.get("question_len", 0))
    nominal_out = int(sp.get("output_len", 0))
    forced = bool(run.ignore_eos and nominal_out)
    out, filled = [], 0
    for i, r in enumerate(run.requests):
        prompt, output = int(r["input_tokens"]), int(r["output_tokens"])
        if forced and 0 < output < 0.9 * nominal_out:
            output = 0
        if prompt <= 0 or output <= 0:
            if not (nominal_in and nominal_out):
                raise ConfigError(f"{run.name}: request {i} has {prompt} prompt / {output} output tokens and the "
                                  "run has no shared_prefix profile to fill them from")
            prompt, output = (prompt if prompt > 0 else nominal_in), (output if output > 0 else nominal_out)
            filled += 1
        req = Request(i, r["arrival_time_us"] / 1e6, prompt, output)
        if prompts and system and prompt > system:
            # inference-perf's users are spread over the system prompts; every prompt is reused within seconds,
            # so which user has which prompt does not change what the cache holds.
            req.prefix_segments = ((i % prompts, system),)
        out.append(req)
    return out, filled


def replay(run: MeasuredRun, root: Path, device: str) -> Replayed:
    cfg = experiment(run, root, device)
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
    return Replayed(ttft, e2e, error, outputs, filled, planned, result.wall_s)


def _planned_blocks(cfg: ExperimentConfig) -> int:
    scheduler = cfg.scheduler.model_copy(update={"num_gpu_blocks_override": None})
    try:
        return build_execution(cfg.model_copy(update={"scheduler": scheduler}))[2].num_blocks
    except LLMSimError:
        return 0  # the plan does not fit at this context length; the replay uses the server's count anyway
