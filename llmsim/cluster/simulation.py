"""Wire an experiment together and run it: arrivals -> router -> replicas -> records."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from llmsim.clock import Clock
from llmsim.cluster.replica import Replica
from llmsim.cluster.router import ROUTERS
from llmsim.config import ExperimentConfig
from llmsim.energy import power_model
from llmsim.execution.memory import MemoryPlan, plan_memory
from llmsim.execution.model import ExecutionModel, ParallelPlan
from llmsim.hardware.profile import load_profile
from llmsim.kv_cache import BlockManager
from llmsim.metrics.recorder import Recorder
from llmsim.models.spec import ModelSpec, load_model
from llmsim.request import Request, RequestStatus
from llmsim.schedulers import SCHEDULERS


@dataclass
class SimulationResult:
    config: ExperimentConfig
    model: ModelSpec
    execution: ExecutionModel
    memory: MemoryPlan
    recorder: Recorder
    replicas: list[Replica]
    num_arrived: int
    num_in_flight: int
    sim_time_s: float
    wall_s: float


def build_execution(cfg: ExperimentConfig) -> tuple[ModelSpec, ExecutionModel, MemoryPlan, int]:
    model = load_model(cfg.model.name, cfg.model.dtype)
    hardware = load_profile(cfg.hardware.device)
    plan = ParallelPlan(cfg.parallel.tp, cfg.parallel.pp)
    s = cfg.scheduler
    max_model_len = s.max_model_len or model.max_position
    memory = plan_memory(model, hardware, plan, block_size=s.block_size,
                         gpu_memory_utilization=s.gpu_memory_utilization,
                         max_num_batched_tokens=s.max_num_batched_tokens, max_num_seqs=s.max_num_seqs,
                         runtime_reserve_gib=s.runtime_reserve_gib, max_model_len=max_model_len)
    return model, ExecutionModel(model, hardware, plan), memory, max_model_len


def make_replica(env: Clock, replica_id: int, cfg: ExperimentConfig, execution: ExecutionModel,
                 num_blocks: int, recorder: Recorder) -> Replica:
    s = cfg.scheduler
    blocks = BlockManager(num_blocks, s.block_size, watermark_blocks=int(s.watermark * num_blocks))
    kwargs = dict(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                  preemption=s.preemption, kv_bytes_per_token=execution.model.kv_bytes_per_token())
    if s.name == "sarathi":
        kwargs["chunk_size"] = s.chunk_size
    scheduler = SCHEDULERS[s.name](blocks, **kwargs)
    return Replica(env, replica_id, scheduler, execution, recorder, fast_forward=cfg.simulation.fast_forward)


def rejection_reason(r: Request, cfg: ExperimentConfig, max_model_len: int, blocks: BlockManager) -> str:
    total = r.num_prompt_tokens + r.num_output_tokens
    if r.reject_reason:
        return r.reject_reason
    if total > max_model_len:
        return f"prompt + output = {total} tokens exceeds max_model_len {max_model_len}"
    if blocks.blocks_for(total) > blocks.num_blocks - blocks.watermark_blocks:
        return f"needs {blocks.blocks_for(total)} KV blocks, a replica has {blocks.num_blocks}"
    if cfg.scheduler.name == "fcfs" and r.num_prompt_tokens > cfg.scheduler.max_num_batched_tokens:
        return f"prompt of {r.num_prompt_tokens} tokens exceeds max_num_batched_tokens"
    return ""


def simulate(cfg: ExperimentConfig, requests: Iterable[Request],
             on_progress: Callable[[int], None] | None = None) -> SimulationResult:
    """Run one experiment. ``on_progress(n)`` is called as requests arrive (n new arrivals)."""
    wall0 = time.perf_counter()
    model, execution, memory, max_model_len = build_execution(cfg)
    env = Clock()
    power = power_model(execution.hardware, execution.peak_flops, execution.bandwidth, execution.plan.num_gpus)
    recorder = Recorder(power, cfg.simulation.record_iterations)
    replicas = [make_replica(env, i, cfg, execution, memory.num_blocks, recorder)
                for i in range(cfg.cluster.num_replicas)]
    router = ROUTERS[cfg.cluster.router]()
    counts = {"arrived": 0}

    def arrivals():
        for r in requests:
            if r.arrival_s > env.now:
                yield env.urgent_at(r.arrival_s)
            counts["arrived"] += 1
            if on_progress is not None and counts["arrived"] % 1024 == 0:
                on_progress(1024)
            reason = rejection_reason(r, cfg, max_model_len, replicas[0].blocks)
            if reason:
                r.status, r.reject_reason = RequestStatus.REJECTED, reason
                recorder.request(r, "rejected")
                continue
            router.pick(r, replicas).submit(r)

    env.process(arrivals())
    env.run(until=cfg.simulation.max_time_s)
    if on_progress is not None:
        on_progress(counts["arrived"] % 1024)
    in_flight = [r for rep in replicas for r in rep.in_flight()]
    for r in in_flight:
        recorder.request(r, "in_flight")
    for rep in replicas:
        rep.blocks.check_integrity()
    return SimulationResult(cfg, model, execution, memory, recorder, replicas, counts["arrived"], len(in_flight),
                            env.now, time.perf_counter() - wall0)
