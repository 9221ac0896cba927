"""The iteration loop of a pipelined replica (``pp`` > 1).

Up to ``micro_batches`` batches are in flight, by default one per stage as in vLLM: a batch enters stage 0 as
soon as stage 0 is free, each stage takes its layers' share of the batch's time (the first stage also the
embedding, the last the LM head: ``ExecutionModel.pipeline_stages``), and stage ``k`` starts a batch when both
the batch has left stage ``k-1`` (plus the activation hand-off) and stage ``k`` has finished the previous batch,
so the slowest stage sets the pipeline's pace. Requests of a batch in flight sit out of later batches until it
leaves the last stage. An iteration record is one micro-batch, its duration the time it holds stage 0: busy time
counts each GPU once at stage 0's share (below the power cap energy does not depend on it: a step's energy is its
work plus idle power over the run, busy or not), and a stage's power is capped at its own utilisation. Pipelines never
fast-forward.

The engine's CPU time per step (``ExecutionModel.cpu_step_s``) is the driver's: it prepares a micro-batch before
the batch can enter stage 0, one micro-batch at a time, and starts on the next one as long before stage 0 frees
as the last one's preparation took (vLLM v0 runs one virtual engine per stage, so one micro-batch's CPU work
overlaps the others' GPU work). Without CPU time a batch is scheduled when stage 0 frees.

A client timeout (``Replica.abort``, run as the loop wakes) takes a request out at once, even from a batch in
flight, its KV freed as vLLM frees an aborted request's blocks; that batch's token for it is dropped when the batch
lands (``drop_aborted``), as vLLM discards an aborted request's output.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

import simpy

from llmsim.schedulers.base import SchedulerOutput

if TYPE_CHECKING:
    from llmsim.cluster.replica import Replica


def run_pipeline(replica: Replica):
    env, scheduler, ex = replica.env, replica.scheduler, replica.execution
    stage_free = [env.now] * ex.plan.pp  # when each stage finishes its current micro-batch
    flights: deque[tuple[float, SchedulerOutput, float]] = deque()  # (leaves the last stage, batch, entered)
    lead_s, driver_free = 0.0, env.now  # the last micro-batch's CPU time; when the driver finishes preparing it
    while True:
        if replica.actions:  # cheap check first: this loop is hot
            replica.run_actions()
        now = env.now
        while flights and flights[0][0] <= now:
            end, out, start = flights.popleft()
            scheduler.land_flight(out)
            if replica.aborted_in_flight:
                out = drop_aborted(out, replica.aborted_in_flight)
            replica.apply(out, start, end)
        can_launch = len(flights) < replica.micro_batches and scheduler.has_schedulable_work
        ready = stage_free[0] - lead_s
        if ready < driver_free:
            ready = driver_free
        if can_launch and ready <= now:
            out = scheduler.schedule()
            if scheduler.ignored:
                replica.record_ignored()
            if not out.is_empty:
                leaves_s, lead_s = launch(replica, out, now, stage_free)
                flights.append((leaves_s, out, now))
                driver_free = now + lead_s
                continue
            can_launch = False  # nothing schedulable now (KV short, or all work in flight)
        wake_at = [flights[0][0]] if flights else []
        if can_launch:
            wake_at.append(ready)
        if not wake_at:
            yield from replica.wait_for_work()
            continue
        replica.cuttable = True  # an arrival or a cluster policy may have work for stage 0 sooner
        try:
            yield env.at(min(wake_at))
        except simpy.Interrupt:
            pass
        replica.cuttable = False


def launch(replica: Replica, out: SchedulerOutput, now: float, stage_free: list[float]) -> tuple[float, float]:
    """Put a batch into the pipeline; returns when it leaves the last stage, and the CPU time that prepared it."""
    ex = replica.execution
    chunks, num_decode, kv_tokens, num_samples = out.signature()
    cost = ex.iteration(chunks, num_decode, kv_tokens, num_samples, with_cpu=False)
    stage_s, hand_off_s = ex.pipeline_stages(cost, num_decode + sum(n for n, _ in chunks), num_samples)
    # The engine's CPU prepares the micro-batch, and swapped KV moves over the host link, before it can start.
    cpu_s = ex.cpu_step_s(len(chunks) + num_decode, num_samples)
    t = now + cpu_s
    t = t + out.swap_bytes / ex.hardware.host_link.bandwidth_bytes_per_s
    held_from = stage_free[0] if stage_free[0] > now else now  # stage 0 is this batch's from here
    for k in range(len(stage_free)):
        start = t if t > stage_free[k] else stage_free[k]
        stage_free[k] = start + stage_s[k]
        t = stage_free[k] + hand_off_s
    replica.recorder.iteration(replica.id, held_from, stage_free[0] - held_from, cost.flops, cost.num_bytes,
                               out.num_prefill_tokens, num_decode, replica.blocks.num_used_blocks)
    replica.scheduler.start_flight(out)
    return stage_free[-1], cpu_s


def drop_aborted(out: SchedulerOutput, aborted: set[int]) -> SchedulerOutput:
    """The landed batch without the requests whose clients gave up while it was in flight (their ids leave
    ``aborted``): as vLLM discards an aborted request's output, none of their tokens is delivered."""
    ids = set(out.request_ids()) & aborted
    if not ids:
        return out
    aborted -= ids
    return replace(out, prefills=[c for c in out.prefills if c.request.id not in ids],
                   decodes=[r for r in out.decodes if r.id not in ids])
