"""The iteration loop of a pipelined replica (``pp`` > 1).

Up to ``micro_batches`` batches are in flight, by default one per stage as in vLLM: a batch enters stage 0 as
soon as stage 0 is free, each stage takes an equal share of the batch's time, and stage ``k`` starts a batch
when both the batch has left stage ``k-1`` (plus the activation hand-off) and stage ``k`` has finished the
previous batch. Requests of a batch in flight sit out of later batches until it leaves the last stage. An
iteration record is one micro-batch, its duration the time it holds a stage: busy time and energy count each
GPU once, and a stage's power is capped at its own utilisation. Pipelines never fast-forward.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import simpy

from llmsim.schedulers.base import SchedulerOutput

if TYPE_CHECKING:
    from llmsim.cluster.replica import Replica


def run_pipeline(replica: Replica):
    env, scheduler, ex = replica.env, replica.scheduler, replica.execution
    stage_free = [env.now] * ex.plan.pp  # when each stage finishes its current micro-batch
    flights: deque[tuple[float, SchedulerOutput, float]] = deque()  # (leaves the last stage, batch, entered)
    while True:
        if replica.actions:  # cheap check first: this loop is hot
            replica.run_actions()
        now = env.now
        while flights and flights[0][0] <= now:
            end, out, start = flights.popleft()
            scheduler.land_flight(out)
            replica.apply(out, start, end)
        can_launch = len(flights) < replica.micro_batches and scheduler.has_schedulable_work
        if can_launch and stage_free[0] <= now:
            out = scheduler.schedule()
            if not out.is_empty:
                flights.append((launch(replica, out, now, stage_free), out, now))
                continue
            can_launch = False  # nothing schedulable now (KV short, or all work in flight)
        wake_at = [flights[0][0]] if flights else []
        if can_launch:
            wake_at.append(stage_free[0])
        if not wake_at:
            yield from replica.wait_for_work()
            continue
        replica.cuttable = True  # an arrival or a cluster policy may have work for stage 0 sooner
        try:
            yield env.at(min(wake_at))
        except simpy.Interrupt:
            pass
        replica.cuttable = False


def launch(replica: Replica, out: SchedulerOutput, now: float, stage_free: list[float]) -> float:
    """Put a batch into the pipeline; returns when it leaves the last stage."""
    ex = replica.execution
    chunks, num_decode, kv_tokens, num_samples = out.signature()
    cost = ex.iteration(chunks, num_decode, kv_tokens, num_samples)
    stage_s, hand_off_s = ex.pipeline_stages(cost, num_decode + sum(n for n, _ in chunks))
    # Swapped KV moves over the host link before the batch can start.
    t = now + out.swap_bytes / ex.hardware.host_link.bandwidth_bytes_per_s
    for k in range(len(stage_free)):
        start = t if t > stage_free[k] else stage_free[k]
        stage_free[k] = start + stage_s
        t = stage_free[k] + hand_off_s
    replica.recorder.iteration(replica.id, now, stage_free[0] - now, cost.flops, cost.num_bytes,
                               out.num_prefill_tokens, num_decode, replica.blocks.num_used_blocks)
    replica.scheduler.start_flight(out)
    return stage_free[-1]
