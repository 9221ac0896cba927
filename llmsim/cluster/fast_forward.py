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

Mixed runs (``Scheduler.mixed_run_chunk``): a batch of every running decode plus one prefill chunk that takes
the rest of the token budget repeats -- the same decodes, the prompt's next chunk of the same size -- until the
prompt's last, partial chunk, a request finishes or the KV cache runs short. Each step is costed by the same
``ExecutionModel.iteration`` call stepping makes. No arrival can join such a step (no budget is left), so
arrivals do not cut a mixed run; cluster-policy actions still do.
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
    new_blocks = decode_blocks(requests, num_steps, bs)
    cum_blocks = list(accumulate(new_blocks))
    if cum_blocks[-1] > blocks.num_free_blocks:
        num_steps = bisect_right(cum_blocks, blocks.num_free_blocks) - 1
    used0 = blocks.num_used_blocks

    execution, kv_tokens = replica.execution, out.decode_kv_tokens
    times = [start]
    t = start
    for dt in execution.decode_run_times(num_decode, kv_tokens, num_steps):
        t = t + dt
        times.append(t)
    replica.run_state = (times, cum_blocks, requests, None)
    done = yield from wait_out(replica, times, arrivals_cut=True)
    # The work of the steps done only: about half the steps computed are cut off by an arrival.
    step_flops, step_bytes = execution.decode_run_work(num_decode, kv_tokens, done)
    durations = record_steps(replica, times, done, step_flops, step_bytes, num_decode, used0, cum_blocks)
    apply_decode_steps(replica, requests, times, durations)


def decode_blocks(requests: list[Request], num_steps: int, block_size: int) -> list[int]:
    """New blocks the decodes need at each step 1..``num_steps``: step j >= 2 needs one for request i when
    c_i + j - 1 is a multiple of the block size (c_i: KV tokens before step 1, whose block the scheduler
    allocated)."""
    new_blocks = [0] * (num_steps + 1)
    for r in requests:
        j = 1 + ((-r.num_computed_tokens) % block_size or block_size)
        while j <= num_steps:
            new_blocks[j] += 1
            j += block_size
    return new_blocks


def record_steps(replica: Replica, times: list[float], done: int, step_flops: list[float],
                 step_bytes: list[float], num_decode: int, used0: int, cum_blocks: list[int],
                 num_prefill_tokens: int = 0) -> list[float]:
    """Record a run's first ``done`` iterations (KV blocks in use: ``used0`` plus the run's new blocks so far);
    returns their durations."""
    durations = [times[j] - times[j - 1] for j in range(1, done + 1)]
    replica.recorder.iterations_bulk(replica.id, times[:done], durations, step_flops[:done], step_bytes[:done],
                                     num_decode, [used0 + b for b in cum_blocks[1:done + 1]], num_prefill_tokens)
    return durations


def mixed_run(replica: Replica, out: SchedulerOutput, start: float, chunk_size: int):
    """Every running decode plus the next ``chunk_size`` tokens of one prompt, step after step (the first step is
    ``out``, whose blocks the scheduler allocated)."""
    blocks, execution = replica.blocks, replica.execution
    bs = blocks.block_size
    prefill = out.prefills[0]
    request, c, cached0 = prefill.request, chunk_size, prefill.num_cached_tokens
    decodes = out.decodes
    num_decode = len(decodes)
    # Steps that leave the prompt unfinished (its last chunk may be partial and leave budget to admit others).
    num_steps = -(-request.num_pending_tokens // c) - 1
    if decodes:
        num_steps = min(num_steps, min(r.num_output_tokens - r.num_generated_tokens for r in decodes))
    new_blocks = decode_blocks(decodes, num_steps, bs)
    held = blocks.num_held(request)
    for j in range(2, num_steps + 1):  # the prompt's chunk j needs its blocks (none if reserved at admission)
        need = blocks.blocks_for(cached0 + c * j)
        if need > held:
            new_blocks[j] += need - held
            held = need
    cum_blocks = list(accumulate(new_blocks))
    if cum_blocks[-1] > blocks.num_free_blocks:
        num_steps = bisect_right(cum_blocks, blocks.num_free_blocks) - 1
    used0 = blocks.num_used_blocks

    times, step_flops, step_bytes = [start], [], []
    t, kv_tokens = start, out.decode_kv_tokens
    for j in range(num_steps):
        cost = execution.iteration(((c, cached0 + c * j),), num_decode, kv_tokens, num_decode)
        t = t + (cost.time_s + 0.0)  # as stepping adds the (zero) swap time
        times.append(t)
        step_flops.append(cost.flops)
        step_bytes.append(cost.num_bytes)
        kv_tokens += num_decode
    replica.run_state = (times, cum_blocks, decodes, (request, c))
    done = yield from wait_out(replica, times, arrivals_cut=False)
    durations = record_steps(replica, times, done, step_flops, step_bytes, num_decode, used0, cum_blocks, c)
    if request.scheduled_s != request.scheduled_s:  # NaN: its first chunk ran in this run
        request.scheduled_s = start
    request.num_computed_tokens += c * done
    if decodes:
        apply_decode_steps(replica, decodes, times[:done + 1], durations, also=[request])
    else:
        replica.scheduler.commit_decode_run([request])


def wait_out(replica: Replica, times: list[float], arrivals_cut: bool):
    """Wait until the run's last boundary, or until the boundary where something cuts it; returns the number
    of steps done. ``arrivals_cut``: an arrival ends the run at the next boundary (a decode run), or at the one
    after for a request held by async scheduling; a mixed run ignores arrivals."""
    done = len(times) - 1
    replica.cuttable = done > 1
    while True:
        try:
            yield replica.env.at(times[done])
            break
        except simpy.Interrupt as cut:
            end = bisect_left(times, replica.env.now, 1)  # the next boundary
            if cut.cause in ("arrival", "pending") and not arrivals_cut:
                end = done
            elif cut.cause == "pending" and end < done:
                end += 1  # the one after: there the engine first schedules the held request
            done = min(done, end)
            # Something that must act at the very next boundary may still come.
            replica.cuttable = done > bisect_left(times, replica.env.now, 1)
    replica.cuttable = False
    replica.run_state = None
    replica.step_start_s, replica.step_end_s = times[done - 1], times[done]
    return done


def apply_decode_steps(replica: Replica, requests: list[Request], times: list[float],
                       durations: list[float], also: list[Request] = ()) -> None:
    """Apply decode iterations ending at ``times[1..]`` (``durations[j-1] = times[j] - times[j-1]``). ``also``:
    requests whose blocks follow their KV tokens too (a mixed run's prefill, advanced by the caller)."""
    num_steps = len(durations)
    start, first, end = times[0], times[1], times[num_steps]
    recorder = replica.recorder
    later_gaps = durations[1:]
    max_gap = max(later_gaps, default=0.0)
    more = num_steps - 1
    steady = 0
    off_gaps = []  # first-step gaps of requests whose previous token did not end where this run started
    for r in requests:
        # The first step's token is ``Replica.sample`` inlined (this loop runs for every request of every run):
        # its gap is a steady one when the request's previous token ended exactly where this run started.
        generated = r.num_generated_tokens + 1
        if generated == 1:
            r.first_token_s = first
        else:
            gap = first - r.last_token_s
            if gap > r.max_tbt_s:
                r.max_tbt_s = gap
            if r.last_token_s == start:
                steady += 1
            else:
                off_gaps.append(gap)
        r.num_computed_tokens += num_steps
        if more:
            r.num_generated_tokens = generated + more
            r.last_token_s = end
            if max_gap > r.max_tbt_s:
                r.max_tbt_s = max_gap
        else:
            r.num_generated_tokens = generated
            r.last_token_s = first
        if r.scheduled_s != r.scheduled_s:
            r.scheduled_s = start
    if off_gaps:
        recorder.gaps_bulk(off_gaps, 1)  # in request order, as one call each would have recorded them
    if steady:
        recorder.gap(durations[0], steady)
    recorder.gaps_bulk(later_gaps, len(requests))
    replica.scheduler.commit_decode_run(requests + also if also else requests, None if also else num_steps)
    replica.finish_done(requests)
