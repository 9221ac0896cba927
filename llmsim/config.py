"""Typed experiment configuration. YAML maps one-to-one onto these models; unknown keys are errors.

``load_config`` turns every validation problem into a ``ConfigError`` that names the YAML path (e.g.
``workload.arrival.rate_per_s``) and, where there is a fixed set, the allowed values or keys.
"""

from __future__ import annotations

import copy
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from llmsim.bool_numbers import NumbersNotBools
from llmsim.errors import ConfigError, validation_error_loc
from llmsim.execution.cpu_overhead import CpuOverheadParams, load_cpu_profile, shipped_profiles
from llmsim.models.spec import hf_config_file
from llmsim.yaml_text import load_yaml_text



# Model instances per pool: each is a process with its own KV manager, so a count past this is a typo (a float
# like 1e16 read as a whole number), not a cluster; it would exhaust memory before simulating anything.
MAX_REPLICAS = 10_000

class _Strict(NumbersNotBools):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        # Checked here, where the model is known exactly (a union member, not the union), so the error lists
        # the keys this model takes.
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError("unknown_key", "unknown key; allowed keys: {allowed}",
                                              {"key": key, "allowed": ", ".join(sorted(cls.model_fields))})
        return data


class ModelConfig(_Strict):
    name: str  # catalog name or path to a HuggingFace config.json (or its folder), relative to the working directory
    # Weights' dtype (default the model's); fp8/int8 is a quantised checkpoint, GEMMs at that dtype's peak;
    # fp8_block a block-scaled FP8 one (128 x 128 weight blocks, DeepSeek-V3's and Qwen3's FP8 checkpoints).
    dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8", "fp8_block"] | None = None
    # Activations (and TP all-reduce payloads): default the weights' dtype when 16/32-bit, else bf16.
    activation_dtype: Literal["fp32", "fp16", "bf16"] | None = None
    # vLLM's --kv-cache-dtype: default the activations'.
    kv_cache_dtype: Literal["fp32", "fp16", "bf16", "fp8"] | None = None

    @field_validator("name")
    @classmethod
    def _absolute_path(cls, name: str) -> str:
        # A path is made absolute (on the working directory), so the config.yaml a results folder records it in
        # runs again from anywhere.
        return os.path.abspath(name) if hf_config_file(name) is not None else name


class HardwareConfig(_Strict):
    device: str = "a100-80gb"  # profile name in hardware_profiles/ or a path to a profile YAML (working directory)
    # What-if multipliers on the modelled kernel times, by group (1 where absent): "attention 20% slower" is
    # {attention_decode: 1.2}. ``llmsim validate-e2e --intervals`` draws them from the held-out kernel errors.
    time_factors: dict[Literal["gemm", "attention_prefill", "attention_decode", "collective", "other"],
                       Annotated[float, Field(gt=0, allow_inf_nan=False)]] = {}

    @field_validator("device")
    @classmethod
    def _absolute_path(cls, device: str) -> str:
        return os.path.abspath(device) if Path(device).suffix else device  # as model.name's


class ParallelConfig(_Strict):
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    # Micro-batches in flight through the pipeline (default: one per stage, as vLLM runs PP); 1 runs each
    # batch through every stage before the next starts.
    micro_batches: int | None = Field(default=None, ge=1)
    # Layers on each pipeline stage, first to last, as vLLM's VLLM_PP_LAYER_PARTITION gives them (default:
    # vLLM's own even split). They must add up to the model's layers (checked when the model is loaded).
    pp_layer_partition: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _micro_batches(self) -> "ParallelConfig":
        if self.micro_batches is not None and self.micro_batches > self.pp:
            raise ValueError(f"micro_batches ({self.micro_batches}) can be at most pp ({self.pp}): one per stage")
        if self.pp_layer_partition is not None and len(self.pp_layer_partition) != self.pp:
            raise ValueError(f"pp_layer_partition has {len(self.pp_layer_partition)} stages, pp is {self.pp}")
        return self


class PoolConfig(_Strict):
    """One DistServe instance pool: its replica count and its own parallel plan."""

    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    # The pool's own batch limits, as DistServe sets them per phase (--context-max-batch-size and
    # --context-max-tokens-per-batch, --decoding-...); default: the scheduler's.
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)


class DistServeConfig(_Strict):
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    # Where the KV cache travels from a prefill to a decode instance: NVLink-class links inside a node, or the
    # inter-node network (InfiniBand) between nodes.
    kv_link: Literal["intra_node", "inter_node"] = "intra_node"


class LlumnixConfig(_Strict):
    """Llumnix (OSDI'24): load-aware dispatch and live migration. Defaults follow Llumnix's own."""

    polling_interval_s: float = Field(default=0.05, gt=0)  # how often instance loads are reported and paired
    migration: bool = True  # False: load-aware dispatch only (INFaaS++, the paper's baseline)
    # What dispatch sees: "reported", each instance's load as of its last report (every polling interval), plus
    # the requests this dispatcher sent it since; or "exact", every instance's instantaneous state (an
    # omniscient dispatcher no real cluster has).
    dispatch_load: Literal["reported", "exact"] = "reported"
    # Count the head-of-line queued request's KV demand as virtual usage, so instances whose queue is blocked
    # migrate requests out and make room for it (de-fragmentation).
    defrag: bool = True
    # Freeness (decode steps the free KV lasts the running batch) below which an instance migrates out, and
    # above which one may take a request in (higher, so a migration cannot turn the pair around).
    migrate_out_threshold: float = 3.0
    migrate_in_threshold: float = 6.0
    max_stages: int = Field(default=3, ge=0)  # copy stages while decoding before giving up
    last_stage_max_blocks: int = Field(default=16, ge=1)  # stop and copy once this few blocks are left
    # Share of an instance's KV blocks added to its virtual usage while it serves a high-priority request:
    # dispatch and migration then keep its load down so the high-priority request runs in a lighter batch.
    priority_headroom: float = Field(default=0.0, ge=0, le=1)
    # Where migrated KV travels: "auto" places replicas on nodes in order (NVLink inside a node).
    link: Literal["auto", "intra_node", "inter_node"] = "auto"

    @model_validator(mode="after")
    def _thresholds(self) -> "LlumnixConfig":
        if self.migrate_in_threshold < self.migrate_out_threshold:
            raise ValueError("migrate_in_threshold must be at least migrate_out_threshold")
        return self


class PrefixAwareConfig(_Strict):
    """SGLang's cache-aware router (``router: prefix_aware``); defaults are SGLang's."""

    cache_threshold: float = Field(default=0.5, ge=0, le=1)  # share of the prompt's tokens a match must exceed
    balance_abs_threshold: int = Field(default=32, ge=0)  # requests between the busiest and the idlest replica
    balance_rel_threshold: float = Field(default=1.0001, ge=1)  # and their ratio, before balancing wins


class ClusterConfig(_Strict):
    num_replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    # round_robin; least_outstanding (the router's own count of unfinished requests); prefix_aware (SGLang's
    # cache-aware routing: the replica holding the longest part of the prompt, unless loads drift apart).
    router: Literal["round_robin", "least_outstanding", "prefix_aware"] = "round_robin"
    prefix_aware: PrefixAwareConfig = PrefixAwareConfig()
    # colocated: every replica prefills and decodes. distserve: separate prefill and decode pools (the
    # ``distserve`` section; ``parallel`` and ``num_replicas`` are then unused), KV handed over the network.
    # llumnix: colocated replicas with Llumnix's load-aware dispatch (instead of ``router``) and live
    # migration (the ``llumnix`` section).
    policy: Literal["colocated", "distserve", "llumnix"] = "colocated"
    distserve: DistServeConfig = DistServeConfig()
    llumnix: LlumnixConfig = LlumnixConfig()
    # What the serving front end adds to every request before the engine sees it (vLLM's API server: HTTP,
    # tokenization, the hop to the engine, and on the way back detokenization and streaming), in seconds;
    # TTFT and E2E include it, ITL does not. 0: the engine alone. ``llmsim validate-e2e`` fits it on measured
    # runs (leave-one-model-out); the README gives the value for the vLLM H100 runs.
    frontend_latency_s: float = Field(default=0.0, ge=0)


class SchedulerConfig(_Strict):
    # A name in ``llmsim.schedulers.SCHEDULERS``. vllm_v1: vLLM V1 (token budget, running first, chunked
    # prefill, prefix caching); fcfs: vLLM v0 / Orca (prefill-priority steps); sarathi: Sarathi-Serve
    # (stall-free chunked prefill under ``chunk_size``).
    name: str = "vllm_v1"
    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    chunk_size: int = Field(default=512, ge=1)  # sarathi: token budget per iteration
    # vllm_v1: a prefill takes at most this many tokens a step (0: no limit), so long prompts share the budget.
    long_prefill_token_threshold: int = Field(default=0, ge=0)
    # Reuse the KV of cached prefixes (vLLM's --enable-prefix-caching). Default: on for vllm_v1, as in vLLM V1;
    # off for fcfs and sarathi, as in vLLM v0.
    enable_prefix_caching: bool | None = None
    block_size: int = Field(default=16, ge=1)  # tokens per KV block
    preemption: Literal["recompute", "swap"] = "recompute"
    # vLLM's --swap-space: host memory per GPU for swapped-out KV (v0's default 4). With preemption: swap, a
    # preemption that does not fit stops the engine, as vLLM v0's does ("Aborted due to the lack of CPU swap space").
    swap_space_gib: float = Field(default=4.0, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    watermark: float = Field(default=0.01, ge=0, lt=1)  # share of KV blocks kept free at admission
    max_model_len: int | None = Field(default=None, ge=1)  # default: the model's max position
    runtime_reserve_gib: float = Field(default=1.0, ge=0)  # CUDA context, communicator buffers
    # vLLM's --num-gpu-blocks-override: the KV blocks per replica, instead of the memory plan's count (for
    # replaying a server whose block count is known).
    num_gpu_blocks_override: int | None = Field(default=None, ge=1)
    # vLLM's async scheduling (on by default in vLLM V1 since about 0.14): the engine schedules step N+1 while
    # step N runs, so a request that arrives during step N is first scheduled in step N+2. Default: on for
    # vllm_v1, as in vLLM; modelled for vllm_v1 only (pipelined replicas queue their micro-batches instead).
    async_scheduling: bool | None = None
    # Triton's kernel cache when the engine starts: 'cold' (a fresh host: a step that needs a fused-MoE kernel
    # variant its start-up did not build waits for Triton to build it) or 'warm' (kept from an earlier run:
    # nothing is built while serving). MoE models only (``execution/moe_jit.py``).
    triton_cache: Literal["cold", "warm"] = "cold"
    # Seconds Triton takes to build one fused-MoE kernel (the host's CPU compiles, whatever the GPU): measured
    # with vLLM's kernel for Mixtral-8x7B's TP 2 shard on an H100 host, 16 CPU cores, Triton 3.6
    # (benchmarks/bench_moe_jit.py: 1.03-1.29 s a variant of two kernels, median 1.126 s).
    fused_moe_build_s: float = Field(default=0.563, gt=0)
    # The engine's CPU time per step (llmsim.execution.cpu_overhead): a profile in hardware_profiles/cpu_overhead/,
    # a mapping of its *_ms parameters, or 'off'. A synchronous engine adds it to each step's GPU time; with async
    # scheduling a step takes the longer of the two. Default: vllm_v0 (fitted on measurements of vLLM v0's code
    # base) for fcfs and sarathi; off for vllm_v1, which has no measured CPU profile (see the README).
    cpu_overhead: Annotated[Union[Annotated[CpuOverheadParams, Tag("cpu_params")],
                                  Annotated[str, Tag("cpu_profile")]],
                            Discriminator(lambda v: "cpu_profile" if isinstance(v, str) else "cpu_params")] | None = None

    @field_validator("cpu_overhead")
    @classmethod
    def _cpu_profile(cls, value):
        if isinstance(value, str) and value != "off" and value not in shipped_profiles():
            raise ValueError(f"unknown CPU overhead profile {value!r}; allowed: 'off', "
                             f"{', '.join(map(repr, shipped_profiles()))} or a mapping of *_ms parameters")
        return value

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from llmsim.schedulers import SCHEDULERS

        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(map(repr, SCHEDULERS))}")
        return name

    @model_validator(mode="after")
    def _prefix_caching(self) -> "SchedulerConfig":
        from llmsim.schedulers import SCHEDULERS

        if self.enable_prefix_caching and not SCHEDULERS[self.name].supports_prefix_caching:
            raise ValueError(f"enable_prefix_caching is not modelled for the {self.name} scheduler")
        if self.async_scheduling and self.name != "vllm_v1":
            raise ValueError(f"async_scheduling is modelled for the vllm_v1 scheduler only, not {self.name}")
        return self

    @model_validator(mode="after")
    def _budget_covers_sequences(self) -> "SchedulerConfig":
        # vLLM refuses to start with a smaller budget (``SchedulerConfig``, V1 and v0 alike): each running
        # sequence needs a token of it every step. Sarathi-Serve's budget is ``chunk_size``.
        if self.name in ("vllm_v1", "fcfs") and self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) is below max_num_seqs "
                             f"({self.max_num_seqs}); vLLM requires max_num_batched_tokens >= max_num_seqs")
        return self

    @property
    def prefix_caching(self) -> bool:
        """Whether the KV cache reuses cached prefixes (default: on for vllm_v1, as vLLM V1; off for fcfs and
        sarathi, as vLLM v0's ``--enable-prefix-caching``)."""
        if self.enable_prefix_caching is None:
            from llmsim.schedulers import SCHEDULERS

            return SCHEDULERS[self.name].prefix_caching_by_default
        return self.enable_prefix_caching

    @property
    def cpu_overhead_params(self) -> CpuOverheadParams | None:
        """The CPU time per step to model, or None (default: vLLM v0's profile for fcfs and sarathi)."""
        value = self.cpu_overhead
        if value is None:
            value = "off" if self.name == "vllm_v1" else "vllm_v0"
        if isinstance(value, str):
            return None if value == "off" else load_cpu_profile(value)
        return value

    @property
    def schedules_ahead(self) -> bool:
        """Whether the engine schedules one step ahead (``async_scheduling``; default: on for vllm_v1)."""
        if self.async_scheduling is None:
            return self.name == "vllm_v1"
        return self.async_scheduling


MAX_TOKENS = 2**31 - 1  # token counts past this are mistakes, not requests


class Fixed(_Strict):
    kind: Literal["fixed"]
    value: int = Field(ge=1, le=MAX_TOKENS)


class _Range(_Strict):
    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class Uniform(_Range):
    kind: Literal["uniform"]
    min: int = Field(ge=1, le=MAX_TOKENS)
    max: int = Field(ge=1, le=MAX_TOKENS)


class Zipf(_Range):
    """P(n) proportional to n^-a on [min, max]: many short requests, a heavy tail of long ones."""

    kind: Literal["zipf"]
    a: float = Field(gt=0)
    min: int = Field(ge=1, le=MAX_TOKENS)
    max: int = Field(ge=1, le=MAX_TOKENS)


class LogNormal(_Range):
    kind: Literal["lognormal"]
    median: float = Field(gt=0)
    sigma: float = Field(ge=0)
    min: int = Field(default=1, ge=1, le=MAX_TOKENS)
    max: int = Field(default=1_000_000, ge=1, le=MAX_TOKENS)


LengthDist = Annotated[Union[Fixed, Uniform, Zipf, LogNormal], Field(discriminator="kind")]


class Poisson(_Strict):
    kind: Literal["poisson"]
    rate_per_s: float = Field(gt=0)


class Gamma(_Strict):
    """Gamma inter-arrival times: CV > 1 gives bursts (BurstGPT fits CV of 2-5), CV = 1 is Poisson."""

    kind: Literal["gamma"]
    rate_per_s: float = Field(gt=0)
    cv: float = Field(gt=0)


ArrivalProcess = Annotated[Union[Poisson, Gamma], Field(discriminator="kind")]


class TraceConfig(_Strict):
    path: Path
    # prefill_decode: a lengths-only CSV (num_prefill_tokens, num_decode_tokens), for lengths_from only.
    format: Literal["burstgpt", "azure", "mooncake", "prefill_decode"]
    model: str | None = None  # burstgpt: keep rows of this model (e.g. ChatGPT, GPT-4)
    log_type: str | None = None  # burstgpt: "Conversation log" or "API log"
    failed: Literal["skip", "reject"] = "skip"  # burstgpt rows with Response tokens == 0
    start_s: float = Field(default=0.0, ge=0)  # window on the trace's own clock
    end_s: float | None = None
    time_scale: float = Field(default=1.0, gt=0)  # >1 stretches time (slower), <1 compresses (faster)
    # Leave out rows whose prompt + output exceed this many tokens, as papers filter a dataset to the model's
    # context (otherwise such requests arrive and are rejected with a reason).
    max_total_tokens: int | None = Field(default=None, ge=2)
    # burstgpt conversations (v1.2's Session ID): send a later turn its think time (the trace's gap less the real
    # service's Elapsed time) after the simulated answer, instead of at its trace time. Reads the trace whole.
    closed_loop: bool = False

    @model_validator(mode="after")
    def _window(self) -> "TraceConfig":
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s ({self.end_s}) must be after start_s ({self.start_s})")
        if self.closed_loop and self.format != "burstgpt":
            raise ValueError(f"closed_loop replays BurstGPT conversations (Session ID, Elapsed time), not {self.format}")
        return self


class SharedPrefixConfig(_Strict):
    """Shared-prefix traffic as kubernetes-sigs/inference-perf's ``shared_prefix`` generator makes it: a pool of
    system prompts, each shared by several users, each user with a question of their own. Request ``i`` is user
    ``i mod users`` (users = system prompts x users per prompt). Single turn: the prompt is the system prompt
    plus the user's question. Multi-turn chat: round ``k`` of a user sends the conversation so far (system
    prompt, then each earlier round's question and answer) plus the question again."""

    num_system_prompts: int = Field(ge=1)
    users_per_system_prompt: int = Field(ge=1)
    system_prompt_tokens: int = Field(ge=1)
    question_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)
    multi_turn: bool = False


class ConversationConfig(_Strict):
    """Closed-loop chat (``llmsim/workload/conversations.py``): each arrival starts a conversation of a geometric
    number of turns (mean ``mean_turns``); a later turn is sent an exponential think time (mean
    ``mean_think_time_s``) after the previous answer's last token, and resends the conversation so far plus a new
    message. ``prompt_tokens``/``output_tokens`` (or ``lengths_from``) give each turn's new message and answer."""

    mean_turns: float = Field(ge=1)
    mean_think_time_s: float = Field(gt=0)


class WorkloadConfig(_Strict):
    """Either replay a ``trace``, or draw ``arrival`` times with lengths from distributions or a trace, or with
    ``shared_prefix`` traffic."""

    num_requests: int | None = Field(default=None, ge=1)
    duration_s: float | None = Field(default=None, gt=0)  # stop arrivals after this simulated time
    trace: TraceConfig | None = None
    arrival: ArrivalProcess | None = None
    prompt_tokens: LengthDist | None = None
    output_tokens: LengthDist | None = None
    lengths_from: TraceConfig | None = None  # joint (prompt, output) pairs sampled from a trace
    shared_prefix: SharedPrefixConfig | None = None  # system prompts shared by users (prefix caching)
    conversation: ConversationConfig | None = None  # closed-loop multi-turn chat with think time
    high_priority_fraction: float = Field(default=0.0, ge=0, le=1)  # share of requests marked high priority

    @model_validator(mode="after")
    def _one_source(self) -> "WorkloadConfig":
        if self.trace is not None:
            if self.trace.format == "prefill_decode":
                raise ValueError("trace.format prefill_decode has lengths but no arrival times: use it in "
                                 "workload.lengths_from, with arrival")
            if (self.arrival or self.prompt_tokens or self.output_tokens or self.lengths_from or self.shared_prefix
                    or self.conversation):
                raise ValueError("a trace replay takes arrivals and lengths from the trace; remove "
                                 "arrival/prompt_tokens/output_tokens/lengths_from/shared_prefix/conversation")
            return self
        if self.arrival is None:
            raise ValueError("set either trace (replay) or arrival (synthetic)")
        if self.shared_prefix is not None:
            if self.conversation is not None:
                raise ValueError("shared_prefix has multi-turn chat of its own (multi_turn); remove conversation")
            if self.prompt_tokens or self.output_tokens or self.lengths_from:
                raise ValueError("shared_prefix sets the lengths; remove prompt_tokens/output_tokens/lengths_from")
            if self.num_requests is None and self.duration_s is None:
                raise ValueError("set num_requests or duration_s for a synthetic workload")
            return self
        has_dists = self.prompt_tokens is not None and self.output_tokens is not None
        if has_dists == (self.lengths_from is not None):
            raise ValueError("synthetic workloads need prompt_tokens and output_tokens, or lengths_from")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("synthetic workloads need num_requests or duration_s")
        return self


class SLOConfig(_Strict):
    """``per_request`` (DistServe's): a request meets the SLO when its TTFT, TPOT (and max token gap, with
    ``tbt_s``) are within bounds; attainment is the share of requests that do. ``pooled`` (Sarathi-Serve's
    capacity): the run meets the SLO when the P99 of every token gap pooled over finished requests (ITL's) is within
    ``p99_itl_s`` and the median scheduling delay (arrival to first scheduled) within ``median_queueing_s``;
    attainment is then 1 or 0, so sweeps and plan searches find the highest rate that meets it."""

    definition: Literal["per_request", "pooled"] = "per_request"
    ttft_s: float = Field(default=2.0, gt=0)
    tpot_s: float = Field(default=0.1, gt=0)
    # Optional bound on every gap between consecutive tokens of a request (its max TBT), per request.
    tbt_s: float | None = Field(default=None, gt=0)
    attainment: float = Field(default=0.9, gt=0, le=1)  # share of requests that must meet every SLO
    p99_itl_s: float | None = Field(default=None, gt=0)  # pooled: bound on the P99 of all token gaps
    median_queueing_s: float = Field(default=2.0, gt=0)  # pooled: bound on the median scheduling delay

    @model_validator(mode="after")
    def _pooled_bounds(self) -> "SLOConfig":
        if self.definition == "pooled" and self.p99_itl_s is None:
            raise ValueError("definition: pooled needs p99_itl_s (the bound on the P99 of all token gaps)")
        return self


class SimulationConfig(_Strict):
    fast_forward: bool = True  # closed-form decode runs; exact, see cluster/replica.py
    max_time_s: float | None = Field(default=None, gt=0)  # stop here; unfinished requests are in flight
    # False: keep only running totals of iterations (no iterations.parquet); saves ~70 bytes per iteration.
    record_iterations: bool = True
    # Clients give up on a request not finished this long after it arrived; the server aborts it at its next
    # step boundary (vLLM aborts a request whose client disconnected, freeing its KV) and it is reported
    # ``timed_out``. None: clients wait for ever.
    client_timeout_s: float | None = Field(default=None, gt=0)
    # Processes that simulate the replicas, each its share (``cluster/workers.py``): for clusters whose replicas
    # never interact (round-robin routing, colocated replicas, open-loop traffic). Results are identical to 1.
    workers: int = Field(default=1, ge=1, le=64)


class EnergyConfig(_Strict):
    pue: float = Field(default=1.0, ge=1.0)  # facility power usage effectiveness, multiplies GPU energy


class ExperimentConfig(_Strict):
    name: str = "experiment"
    # Written into a result's config.yaml: the llmsim (version + source digest) that produced it. A config read
    # back keeps it only as a record; the code that runs it writes its own.
    llmsim_version: str | None = None
    input_digests: dict[str, str] | None = None  # the same: the content of the files it read (``llmsim.run``)
    seed: int = Field(default=0, ge=0)
    output_dir: Path = Path("results")
    model: ModelConfig
    hardware: HardwareConfig = HardwareConfig()
    parallel: ParallelConfig = ParallelConfig()
    cluster: ClusterConfig = ClusterConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    workload: WorkloadConfig
    slo: SLOConfig = SLOConfig()
    energy: EnergyConfig = EnergyConfig()
    simulation: SimulationConfig = SimulationConfig()

    @property
    def in_worker_processes(self) -> bool:
        """Whether the replicas are simulated in worker processes (``simulation.workers``, at most one a replica)."""
        return min(self.simulation.workers, self.cluster.num_replicas) > 1

    def scheduler_for(self, role: str) -> SchedulerConfig:
        """The scheduler config a pool runs: a DistServe prefill or decode pool may set its own batch limits."""
        if self.cluster.policy != "distserve" or role not in ("prefill", "decode"):
            return self.scheduler
        pool = getattr(self.cluster.distserve, role)
        update = {name: getattr(pool, name) for name in ("max_num_seqs", "max_num_batched_tokens")
                  if getattr(pool, name) is not None}
        return self.scheduler.model_copy(update=update) if update else self.scheduler

    @model_validator(mode="after")
    def _llumnix_without_pipelines(self) -> "ExperimentConfig":
        pipelined = self.parallel.pp > 1 or (self.cluster.policy == "distserve" and max(
            self.cluster.distserve.prefill.pp, self.cluster.distserve.decode.pp) > 1)
        if self.cluster.policy == "llumnix" and self.parallel.pp > 1:
            # As in Llumnix itself: a request in a micro-batch in flight cannot be taken out of the batch.
            raise ValueError("cluster.policy: llumnix runs with parallel.pp: 1 (no live migration out of a "
                             "pipeline)")
        if self.simulation.workers > 1:
            why = ("cluster.router: round_robin (a router that reads the replicas' state needs them in one process)"
                   if self.cluster.router != "round_robin" else
                   "cluster.policy: colocated (DistServe and Llumnix move requests between replicas)"
                   if self.cluster.policy != "colocated" else
                   "open-loop traffic (a conversation's next turn waits on the replica serving the one before)"
                   if self.workload.conversation is not None or (self.workload.trace is not None
                                                                 and self.workload.trace.closed_loop) else
                   "no simulation.max_time_s (a run cut at a time is simulated in one process)"
                   if self.simulation.max_time_s is not None else "")
            if why:
                raise ValueError(f"simulation.workers: {self.simulation.workers} needs {why}")
        if self.scheduler.async_scheduling and pipelined:
            # A pipelined replica already keeps a micro-batch per stage in flight (``parallel.micro_batches``).
            raise ValueError("scheduler.async_scheduling: modelled for replicas without pipeline stages "
                             "(parallel.pp: 1)")
        return self


def format_validation_error(exc: ValidationError, source: str, what: str = "experiment config") -> str:
    lines = [f"invalid {what} {source}:"]
    for err in exc.errors():
        loc = tuple(p for p in validation_error_loc(err)
                    if not (isinstance(p, str) and p in {"poisson", "gamma", "fixed", "uniform", "zipf", "lognormal",
                                                          "cpu_params", "cpu_profile", "[key]"}))
        where = ".".join(str(p) for p in loc) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: dict, source: str = "<dict>") -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid experiment config {source}: expected a mapping at the top level")
    try:
        return ExperimentConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def yaml_error_where(path: Path, exc: Exception) -> str:
    """``file:line`` of a YAML syntax error (the file alone where the parser gives no position)."""
    mark = getattr(exc, "problem_mark", None)
    return f"{path}:{mark.line + 1}" if mark is not None else str(path)


def read_yaml(path: Path, what: str):
    """A YAML file's content; a missing file or bad YAML is a ConfigError naming ``what`` and the path."""
    try:
        return load_yaml_text(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text YAML file (bytes that are not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {yaml_error_where(path, exc)} is not valid YAML: "
                          f"{getattr(exc, 'problem', None) or exc}") from None


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``--set path.to.key=value`` arguments as {dotted path: value}; values are YAML (``4``, ``true``,
    ``[1, 2]``, ``{tp: 2}``)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        path, sep, text = item.partition("=")
        if not sep or not path or any(not part for part in path.split(".")):
            raise ConfigError(f"--set {item!r}: expected path.to.key=value, e.g. workload.arrival.rate_per_s=4")
        try:
            overrides[path] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return overrides


def check_config_path(path: str, where: str) -> None:
    """A dotted path that a sweep's grid or variant, or a plan's candidates, sets in every experiment: each key
    one the schema has, as far as its sections are plain models (a union, such as an arrival process, is checked
    when the experiment is parsed). A typo here is the same mistake in every point, so it is one error before any
    of them, naming ``where``."""
    keys = path.split(".")
    if not all(keys):
        raise ConfigError(f"{where}: {path!r} is not a dotted path of config keys (it has an empty key)")
    model = ExperimentConfig
    for depth, key in enumerate(keys):
        if key not in model.model_fields:
            section = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(f"{where}: {path}: {key!r} is no key of {section}; allowed keys: "
                              f"{', '.join(sorted(model.model_fields))}")
        if depth == len(keys) - 1:
            return
        annotation = model.model_fields[key].annotation
        members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
        if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], _Strict):
            model = members[0]  # a section, or an optional one
            continue
        if not _holds_sections(annotation):
            raise ConfigError(f"{where}: {path}: {'.'.join(keys[:depth + 1])} is a value, not a section that "
                              f"holds {keys[depth + 1]!r}")
        return


def _holds_sections(annotation) -> bool:
    """Whether a field of this type can be a mapping (a model, a dict, a union with one of them, Any)."""
    if annotation is Any or annotation is dict:
        return True
    if isinstance(annotation, type):
        return issubclass(annotation, (BaseModel, dict))
    origin = typing.get_origin(annotation)
    if origin is dict:
        return True
    return any(_holds_sections(arg) for arg in typing.get_args(annotation))


def set_path(data: dict, path: str, value: Any) -> None:
    """Set a dotted path in a raw config mapping, creating missing sections; a scalar in the way is an error."""
    node = data
    keys = path.split(".")
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            where = ".".join(keys[:depth + 1])
            raise ConfigError(f"{path}: {where} is {child!r}, not a section that can hold {keys[depth + 1]!r}")
        node = child
    node[keys[-1]] = copy.deepcopy(value)


def apply_overrides(data, overrides: dict[str, Any] | None, source: str):
    if overrides and not isinstance(data, dict):
        return data  # parse_config reports the top level
    for path, value in (overrides or {}).items():
        try:
            set_path(data, path, value)
        except ConfigError as exc:
            raise ConfigError(f"{source}: --set {exc}") from None
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """An experiment YAML, with ``overrides`` ({dotted path: value}, from ``--set``) applied before validation."""
    path = Path(path)
    data = read_yaml(path, "experiment config")
    data = {} if data is None else data
    if isinstance(data, dict) and "base" in data:  # a sweep or a plan search given where an experiment goes
        command = "llmsim plan" if "candidates" in data else "llmsim sweep"
        raise ConfigError(f"{path}: a {command.split()[1]} file (it has a base experiment), not an experiment; "
                          f"run it with {command} {path}")
    data = apply_overrides(data, overrides, str(path))
    # Every relative path in a YAML (traces, lengths_from, output_dir) is relative to that YAML file, so an
    # experiment runs the same from any working directory. Command-line paths (--out) are relative to it. They
    # are made absolute, so the config.yaml a results folder records runs again from anywhere.
    if isinstance(data, dict):
        _resolve_paths(data.get("workload"), path.parent)
        if isinstance(data.get("output_dir"), str) and not Path(data["output_dir"]).is_absolute():
            data["output_dir"] = os.path.abspath(path.parent / data["output_dir"])
    source = str(path) + (" with " + " ".join(f"--set {k}={v}" for k, v in overrides.items()) if overrides else "")
    return parse_config(data, source)


def _resolve_paths(workload, base: Path) -> None:
    if not isinstance(workload, dict):
        return
    for key in ("trace", "lengths_from"):
        section = workload.get(key)
        if isinstance(section, dict) and isinstance(section.get("path"), str):
            p = Path(section["path"])
            if not p.is_absolute():
                section["path"] = os.path.abspath(base / p)
