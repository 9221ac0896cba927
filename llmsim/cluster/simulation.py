"""Wire an experiment together and run it: arrivals -> router -> replicas -> records."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from llmsim.clock import Clock
from llmsim.cluster.distserve import DistServe
from llmsim.cluster.llumnix import Llumnix, migration_transfer
from llmsim.cluster.migration import MigrationStats
from llmsim.cluster.network import LinkStats, Network
from llmsim.cluster.replica import Replica
from llmsim.cluster.router import ROUTERS
from llmsim.cluster.workers import simulate_in_workers
from llmsim.config import ExperimentConfig
from llmsim.energy import PowerModel, power_model
from llmsim.errors import ConfigError, EngineAborted, PlanError
from llmsim.execution.cpu_overhead import CpuOverhead
from llmsim.execution.memory import MemoryPlan, plan_memory
from llmsim.execution.model import ExecutionModel, ParallelPlan
from llmsim.hardware.profile import load_profile
from llmsim.kv_cache import BlockManager, forget_hash_states
from llmsim.metrics.recorder import Recorder
from llmsim.models.spec import ModelSpec, load_model
from llmsim.request import DONE, Request, RequestStatus
from llmsim.schedulers import SCHEDULERS
from llmsim.schedulers.decode import DecodeScheduler
from llmsim.workload.conversations import ClosedLoop


@dataclass(frozen=True)
class Pool:
    """Replicas that share a role and a parallel plan: ``colocated`` (prefill and decode), or DistServe's
    ``prefill`` and ``decode`` instance pools."""

    role: str
    execution: ExecutionModel
    memory: MemoryPlan
    power: PowerModel
    num_replicas: int

    @property
    def num_gpus(self) -> int:  # per replica
        return self.execution.plan.num_gpus

    def host_swap_blocks(self, cfg: ExperimentConfig) -> int | None:
        """The host's KV blocks for a replica's swapped-out KV (vLLM's num_cpu_blocks); None where its scheduler
        preempts by recompute."""
        s = cfg.scheduler_for(self.role)
        return self.memory.swap_space_blocks(s.swap_space_gib) if s.preemption == "swap" else None


@dataclass
class SimulationResult:
    config: ExperimentConfig
    model: ModelSpec
    execution: ExecutionModel  # of the first pool (the only one unless DistServe)
    memory: MemoryPlan
    recorder: Recorder
    replicas: list[Replica]
    num_arrived: int
    num_in_flight: int
    sim_time_s: float
    wall_s: float
    pools: list[Pool] = field(default_factory=list)
    replica_pool: list[int] = field(default_factory=list)  # pool index of each replica
    migration: MigrationStats | None = None  # Llumnix with migration on
    kv_copies: LinkStats | None = None  # KV copies between instances (DistServe, Llumnix), where any
    # Each replica's record of the fused-MoE kernel variants it built (None: a dense model or a warm cache). With
    # ``simulation.workers`` > 1 the replicas ran in worker processes and ``replicas`` is empty.
    moe_compiles: list = field(default_factory=list)
    # Each replica's most KV blocks swapped out to the host at once (preemption: swap).
    peak_swapped_blocks: list[int] = field(default_factory=list)
    # With ``simulation.max_time_s``: requests the workload sends that reach the engine only after the cut-off
    # (None without one: every request arrived).
    num_not_arrived: int | None = None


def check_plan(model: ModelSpec, plan: ParallelPlan, where: str = "parallel") -> None:
    """The shapes vLLM accepts: TP divides the attention heads, and the KV heads (or KV heads divide TP, each
    replicated); no more pipeline stages than layers. ``where``: the config path of the plan's tp and pp (a
    DistServe pool's are ``cluster.distserve.<pool>``)."""
    if model.num_heads % plan.tp:
        raise PlanError(f"{where}.tp: {plan.tp} does not divide {model.name}'s {model.num_heads} attention heads")
    if model.num_kv_heads % plan.tp and plan.tp % model.num_kv_heads:
        raise PlanError(f"{where}.tp: {plan.tp} neither divides nor is a multiple of {model.name}'s "
                        f"{model.num_kv_heads} KV heads")
    if plan.pp > model.num_layers:
        raise PlanError(f"{where}.pp: {plan.pp} stages for {model.name}'s {model.num_layers} layers")
    if plan.layer_partition is not None and sum(plan.layer_partition) != model.num_layers:
        raise PlanError(f"parallel.pp_layer_partition: {list(plan.layer_partition)} adds up to "
                        f"{sum(plan.layer_partition)} layers, {model.name} has {model.num_layers}")


def check_names(cfg: ExperimentConfig) -> None:
    """The model and the hardware profile the config names exist and load: a typo in either is an error
    before anything runs (a sweep or a plan search checks every point up front)."""
    m = cfg.model
    load_model(m.name, m.dtype, m.activation_dtype, m.kv_cache_dtype)
    load_profile(cfg.hardware.device)


def build_execution(cfg: ExperimentConfig, tp: int | None = None, pp: int | None = None, role: str = "colocated"
                    ) -> tuple[ModelSpec, ExecutionModel, MemoryPlan, int]:
    m = cfg.model
    model = load_model(m.name, m.dtype, m.activation_dtype, m.kv_cache_dtype)
    hardware = load_profile(cfg.hardware.device)
    partition = cfg.parallel.pp_layer_partition
    # A DistServe pool (its own tp/pp) splits its layers evenly; the experiment's partition is the colocated plan's.
    plan = ParallelPlan(tp or cfg.parallel.tp, pp or cfg.parallel.pp,
                        tuple(partition) if partition is not None and role == "colocated" else None)
    pool = f"cluster.distserve.{role}" if role in ("prefill", "decode") else None
    check_plan(model, plan, pool or "parallel")
    s = cfg.scheduler_for(role)
    max_model_len = s.max_model_len or model.max_position
    try:
        memory = plan_memory(model, hardware, plan, block_size=s.block_size,
                             gpu_memory_utilization=s.gpu_memory_utilization,
                             max_num_batched_tokens=s.max_num_batched_tokens, max_num_seqs=s.max_num_seqs,
                             runtime_reserve_gib=s.runtime_reserve_gib, max_model_len=max_model_len)
    except PlanError as exc:
        if pool is None:
            raise
        raise PlanError(f"{pool}: {exc}") from None  # which pool does not fit
    if s.num_gpu_blocks_override is not None:
        memory = dataclasses.replace(memory, num_blocks=s.num_gpu_blocks_override)
    cpu = s.cpu_overhead_params
    cpu_overhead = None if cpu is None else CpuOverhead.of(cpu, max_model_len, plan.tp)
    # DistServe's decode instances schedule synchronously (``make_replica``), so their CPU time adds.
    execution = ExecutionModel(model, hardware, plan, cpu_overhead, s.schedules_ahead and role != "decode",
                               cfg.hardware.time_factors)
    return model, execution, memory, max_model_len


def build_pools(cfg: ExperimentConfig) -> tuple[ModelSpec, list[Pool], int]:
    if cfg.cluster.policy in ("colocated", "llumnix"):
        specs = [("colocated", cfg.parallel.tp, cfg.parallel.pp, cfg.cluster.num_replicas)]
    else:
        d = cfg.cluster.distserve
        specs = [("prefill", d.prefill.tp, d.prefill.pp, d.prefill.replicas),
                 ("decode", d.decode.tp, d.decode.pp, d.decode.replicas)]
    pools = []
    for role, tp, pp, n in specs:
        model, ex, memory, max_len = build_execution(cfg, tp, pp, role)
        pools.append(Pool(role, ex, memory, power_model(ex.hardware, ex.peak_flops, ex.bandwidth, ex.plan.num_gpus),
                          n))
    return model, pools, max_len


def make_replica(env: Clock, replica_id: int, cfg: ExperimentConfig, pool: Pool, recorder: Recorder,
                 on_prefilled: Callable | None = None) -> Replica:
    s = cfg.scheduler_for(pool.role)
    num_blocks = pool.memory.num_blocks
    decode_pool = pool.role == "decode"  # DistServe's decode instances: handed-over KV
    blocks = BlockManager(num_blocks, s.block_size, watermark_blocks=int(s.watermark * num_blocks),
                          enable_prefix_caching=s.prefix_caching)
    # A swap moves each GPU's shard of the KV over its own host link, all at once (vLLM's workers each copy their
    # own blocks): the time is a shard's bytes, on the stage holding the most layers' KV, over one link.
    kwargs = dict(max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
                  preemption=s.preemption, kv_bytes_per_token=pool.memory.largest_kv_bytes_per_block / s.block_size,
                  swap_space_blocks=pool.host_swap_blocks(cfg))
    if decode_pool:
        scheduler = DecodeScheduler(blocks, **kwargs)
    else:
        policy = SCHEDULERS[s.name]
        scheduler = policy(blocks, **kwargs, **{name: getattr(s, name) for name in policy.config_fields})
    pp = pool.execution.plan.pp
    moe_compiles = None
    if s.triton_cache == "cold" and pp == 1:  # pipelined replicas: not modelled
        moe_compiles = pool.execution.fused_moe_compiles(s.fused_moe_build_s, s.max_num_seqs,
                                                         s.max_num_batched_tokens, scheduler.pads_every_step_to_graphs)
    return Replica(env, replica_id, scheduler, pool.execution, recorder, fast_forward=cfg.simulation.fast_forward,
                   on_prefilled=on_prefilled, micro_batches=min(cfg.parallel.micro_batches or pp, pp),
                   async_scheduling=s.schedules_ahead and not decode_pool, moe_compiles=moe_compiles,
                   stop_s=cfg.simulation.max_time_s)


def rejection_reason(r: Request, max_model_len: int, entry: Replica, whole: Replica) -> str:
    """Why a request can never be served, or "". ``whole``: a replica that must hold the whole sequence;
    ``entry``: the replica kind arrivals go to (a DistServe prefill instance must hold the prompt)."""
    total = r.num_prompt_tokens + r.num_output_tokens
    if r.reject_reason:
        return r.reject_reason
    if total > max_model_len:
        return f"prompt + output = {total} tokens exceeds max_model_len {max_model_len}"
    blocks = whole.blocks
    if blocks.blocks_for(total) > blocks.num_blocks - blocks.watermark_blocks:
        return f"needs {blocks.blocks_for(total)} KV blocks, a replica has {blocks.num_blocks}"
    if entry is not whole:
        prefill_blocks = entry.blocks
        need = prefill_blocks.blocks_for(r.num_prompt_tokens + 1)
        if need > prefill_blocks.num_blocks - prefill_blocks.watermark_blocks:
            return f"prompt needs {need} KV blocks, a prefill instance has {prefill_blocks.num_blocks}"
    return entry.scheduler.rejection_reason(r)


def simulate(cfg: ExperimentConfig, requests: Iterable[Request] | ClosedLoop,
             on_progress: Callable[[int], None] | None = None, router=None) -> SimulationResult:
    """Run one experiment. ``on_progress(n)`` is called as requests arrive (n new arrivals). A closed-loop
    workload sends each later turn when the turn before it has ended (``llmsim/workload/conversations.py``).
    ``router``: in place of the configured one (a worker of ``simulation.workers``)."""
    if cfg.in_worker_processes and router is None:  # else one process's work
        if isinstance(requests, ClosedLoop):
            raise ConfigError(f"simulation.workers: {cfg.simulation.workers} needs open-loop traffic (a "
                              "conversation's next turn waits on the replica serving the one before)")
        return simulate_in_workers(cfg, requests, on_progress)
    wall0 = time.perf_counter()
    forget_hash_states()
    model, pools, max_model_len = build_pools(cfg)
    env = Clock()
    replica_pool = [i for i, pool in enumerate(pools) for _ in range(pool.num_replicas)]
    recorder = Recorder([pools[i].power for i in replica_pool], cfg.simulation.record_iterations)
    distserve = None
    network = Network(env)  # the KV copies between instances (DistServe's hand-offs, Llumnix's migrations)
    if cfg.cluster.policy == "distserve":
        inter_node = cfg.cluster.distserve.kv_link == "inter_node"
        distserve = DistServe(env, ROUTERS[cfg.cluster.router](cfg.cluster), inter_node, network)
    replicas = []
    for rid, pool_index in enumerate(replica_pool):
        pool = pools[pool_index]
        on_prefilled = distserve.on_prefilled if pool.role == "prefill" else None
        replicas.append(make_replica(env, rid, cfg, pool, recorder, on_prefilled))
    entry = [rep for rep, i in zip(replicas, replica_pool) if pools[i].role != "decode"]
    # Where a request can end unfinished after generating tokens, its gaps are logged so that they can leave the
    # ITL sample if it does (``Recorder.logs_gaps``).
    recorder.logs_gaps = (cfg.simulation.client_timeout_s is not None or cfg.simulation.max_time_s is not None
                          or any(rep.scheduler.may_drop_started(max_model_len) for rep in replicas))
    if distserve is not None:
        distserve.connect(replicas, [rep for rep, i in zip(replicas, replica_pool) if pools[i].role == "decode"])
    whole = distserve.decode_replicas[0] if distserve is not None else entry[0]
    llumnix = None
    if cfg.cluster.policy == "llumnix":
        transfer = migration_transfer(pools[0].execution.hardware.gpus_per_node, pools[0].num_gpus,
                                      cfg.cluster.llumnix.link, network)
        router = llumnix = Llumnix(env, replicas, cfg.cluster.llumnix, transfer)
    else:
        router = router or ROUTERS[cfg.cluster.router](cfg.cluster)
    migrator = llumnix.migrator if llumnix is not None else None
    counts = {"arrived": 0, "drawn": 0}  # drawn: taken from an open-loop stream (then waited for)

    frontend_s = cfg.cluster.frontend_latency_s
    timeout_s = cfg.simulation.client_timeout_s
    timeout_reason = f"client timeout ({timeout_s:g} s after arrival)" if timeout_s else ""

    closed_loop = requests if isinstance(requests, ClosedLoop) else None

    def give_up(r: Request) -> None:
        """The client's deadline passed: if the request is still being served, its replica aborts it at its next
        boundary (as an engine takes an abort between steps). A closed-loop client moves on now: its next turn
        follows the deadline, not the abort."""
        if r.status in DONE:
            return
        env.mark_active()
        if closed_loop is not None:
            send_next_turn(r, "timed_out")
        if distserve is not None:  # it may move between instances before its instance's next boundary
            distserve.abort(r, timeout_reason)
            return
        if migrator is not None and migrator.give_up(r, timeout_reason):
            return
        rep = replicas[r.replica_id]

        def abort() -> None:
            if r.status is RequestStatus.MIGRATING:  # its stop-and-copy began before this boundary
                migrator.give_up(r, timeout_reason)
            elif r.replica_id != rep.id:  # migrated since: follow it
                give_up(r)
            else:
                rep.abort(r, timeout_reason)

        rep.post(abort)

    def arrivals(stream: Iterable[Request], drawn: bool = True):
        for r in stream:
            if drawn:
                counts["drawn"] += 1
            at = r.arrival_s + frontend_s if frontend_s else r.arrival_s  # the engine sees it after the front end
            if at > env.now:
                yield env.urgent_at(at)
            if closed_loop is not None:  # ids in arrival order (a later turn is drawn when the one before it ends)
                r.id = counts["arrived"]
            counts["arrived"] += 1
            if on_progress is not None and counts["arrived"] % 1024 == 0:
                on_progress(1024)
            reason = rejection_reason(r, max_model_len, entry[0], whole)
            if reason:
                r.status, r.reject_reason = RequestStatus.REJECTED, reason
                recorder.request(r, "rejected")
                continue
            router.pick(r, entry).submit(r)
            if timeout_s:
                deadline = max(r.arrival_s + timeout_s, env.now)  # the client's clock starts when it sends
                env.passive_at(deadline).callbacks.append(lambda _, r=r: give_up(r))

    def send_next_turn(r: Request, status: str) -> None:
        """``r`` ended for its client now (a timed-out turn: when the client gave up, before the engine aborts it;
        its abort then finds no turn left to send)."""
        follow = closed_loop.next_turn(r, status, env.now)
        if follow is not None and status != "in_flight":  # sent after the user's think time
            env.process(arrivals((follow,), drawn=False))

    if closed_loop is None:
        requests = iter(requests)  # what is left of it at a cut-off is counted below
        env.process(arrivals(requests))
    else:
        recorder.on_request_end = send_next_turn
        env.process(arrivals(closed_loop.first_turns))
    try:
        env.run(until=cfg.simulation.max_time_s)
    except EngineAborted as exc:
        raise EngineAborted(f"at {env.now:.6g} s simulated, {exc}", env.now) from None
    if on_progress is not None:
        on_progress(counts["arrived"] % 1024)
    in_flight = [r for rep in replicas for r in rep.in_flight()]
    if distserve is not None:
        in_flight += distserve.in_flight()
    if migrator is not None:
        in_flight += migrator.in_flight()
    for r in in_flight:
        recorder.request(r, "in_flight")
    recorder.flush_take_backs()
    for rep in replicas:
        rep.blocks.check_integrity()
    num_not_arrived = None
    if cfg.simulation.max_time_s is not None:
        num_not_arrived = not_arrived(requests, closed_loop, counts)
    return SimulationResult(cfg, model, pools[0].execution, pools[0].memory, recorder, replicas, counts["arrived"],
                            len(in_flight), env.last_active_s, time.perf_counter() - wall0, pools, replica_pool,
                            migrator.stats if migrator is not None else None,
                            network.stats if network.stats.copies else None,
                            [rep.moe_compiles for rep in replicas],
                            [rep.scheduler.peak_swapped_blocks for rep in replicas], num_not_arrived)


def not_arrived(stream: Iterator[Request], closed_loop: ClosedLoop | None, counts: dict[str, int]) -> int:
    """Requests the workload sends that had not reached the engine at the cut-off: one drawn and waited for,
    and the rest of the stream (drawn now, as the run would have: a trace's rows to its end). Closed-loop: the
    turns sent and still on their way (a later turn is sent when the one before it ends, so none is counted for
    a turn in flight), and the first turns still to come."""
    if closed_loop is not None:
        for _ in closed_loop.first_turns:  # each takes its slot in num_sent
            pass
        return closed_loop.num_sent - counts["arrived"]
    return counts["drawn"] - counts["arrived"] + sum(1 for _ in stream)
