"""Decode fast-forward: a run of pure-decode iterations computed up front and waited out in one go.

When a batch is pure decode over every running request, the following iterations repeat it until a request
finishes or the KV cache runs short, so their end times are computed up front (``t_j = t_{j-1} + dt_j``,
exactly as stepping would) and the per-request bookkeeping is applied once::

    t0 ---dt1--- t1 ---dt2--- t2 ... tk        one simpy wait instead of k, one update per request
              ^ arrival: wait for the next boundary t_j, apply j steps, schedule afresh

An arrival the scheduler could admit (``Scheduler.cuts_run``) cuts the run at the next boundary, where
stepping would have seen it too; results are bit-identical to stepping (tests compare both). Cluster policies
that act on a replica from outside ``post`` actions that run at its next boundary, or ``wake`` it, which cuts a
run the same way; while a run is waited out the replica's ``num_used_blocks_now`` and ``num_computed_now``
report the state stepping would show (from ``replica.run_state``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING

import simpy

from llmsim.request import Request
from llmsim.schedulers.base import SchedulerOutput

if TYPE_CHECKING:
    from llmsim.cluster.replica import Replica


def decode_run(replica: Replica, out: SchedulerOutput, start: float):
    blocks = replica.blocks
    requests = out.decodes
    num_decode = len(requests)
    bs = blocks.block_size
    num_steps = min(r.num_output_tokens - r.num_generated_tokens for r in requests)
    # Step j >= 2 needs a new block for request i when c_i + j - 1 is a multiple of the block size
    # (c_i: KV tokens before step 1, whose block was allocated by the scheduler).
    new_blocks = [0] * (num_steps + 1)
    for r in requests:
        j = 1 + ((-r.num_computed_tokens) % bs or bs)
        while j <= num_steps:
            new_blocks[j] += 1
            j += bs
    cum_blocks = list(accumulate(new_blocks))
    if cum_blocks[-1] > blocks.num_free_blocks:
        num_steps = bisect_right(cum_blocks, blocks.num_free_blocks) - 1
    used0 = blocks.num_used_blocks

    step_s, step_flops, step_bytes = replica.execution.decode_run(num_decode, out.decode_kv_tokens, num_steps)
    times = [start]
    t = start
    for dt in step_s:
        t = t + dt
        times.append(t)
    done = num_steps
    replica.run_state = (times, cum_blocks, requests)
    replica.cuttable = num_steps > 1
    while True:
        try:
            yield replica.env.at(times[done])
            break
        except simpy.Interrupt as cut:
            end = bisect_left(times, replica.env.now, 1)  # the next boundary
            if cut.cause == "pending" and end < num_steps:
                end += 1  # the one after: there the engine first schedules the held request
            done = min(done, end)
            # Something that must act at the very next boundary may still come (an arrival the scheduler can
            # admit at once does not: under async scheduling every arrival is held).
            replica.cuttable = done > bisect_left(times, replica.env.now, 1)
    replica.cuttable = False
    replica.run_state = None
    replica.step_start_s, replica.step_end_s = times[done - 1], times[done]

    durations = [times[j] - times[j - 1] for j in range(1, done + 1)]
    replica.recorder.iterations_bulk(replica.id, times[:done], durations, step_flops[:done], step_bytes[:done],
                                     num_decode, [used0 + b for b in cum_blocks[1:done + 1]])
    apply_decode_steps(replica, requests, times, durations)


def apply_decode_steps(replica: Replica, requests: list[Request], times: list[float],
                       durations: list[float]) -> None:
    """Apply decode iterations ending at ``times[1..]`` (``durations[j-1] = times[j] - times[j-1]``)."""
    num_steps = len(durations)
    start, end = times[0], times[num_steps]
    recorder = replica.recorder
    steady = sum(replica.sample(r, start, times[1]) for r in requests)
    if steady:
        recorder.gap(durations[0], steady)
    later_gaps = durations[1:]
    recorder.gaps_bulk(later_gaps, len(requests))
    max_gap = max(later_gaps, default=0.0)
    for r in requests:
        r.num_computed_tokens += num_steps
        if num_steps > 1:
            r.num_generated_tokens += num_steps - 1
            r.last_token_s = end
            if max_gap > r.max_tbt_s:
                r.max_tbt_s = max_gap
        if r.scheduled_s != r.scheduled_s:
            r.scheduled_s = start
    replica.scheduler.commit_decode_run(requests)
    replica.finish_done(requests)
