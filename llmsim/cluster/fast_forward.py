"""Decode fast-forward: a run of pure-decode iterations computed up front and waited out in one go.

When a batch is pure decode over every running request, the following iterations repeat it until a request
finishes or the KV cache runs short, so their end times are computed up front (``t_j = t_{j-1} + dt_j``,
exactly as stepping would) and the per-request bookkeeping is applied once::

    t0 ---dt1--- t1 ---dt2--- t2 ... tk        one simpy wait instead of k, one update per request
              ^ arrival: wait for the next boundary t_j, apply j steps, schedule afresh

An arrival the scheduler could admit (``Scheduler.cuts_run``) cuts the run at the next boundary, where
stepping would have seen it too; results are bit-identical to stepping (tests compare both). Cluster policies
that act on a replica from outside ``post`` actions that run at its next boundary, or ``wake`` it, which cuts a
run the same way; while a run is waited out the replica's ``num_used_blocks_now``, ``num_computed_now`` and
``is_decoding_now`` report the state stepping would show (from ``replica.run_state``).

Mixed runs (``Scheduler.mixed_run_chunk``): a batch of every running decode plus one prefill chunk that takes
the rest of the token budget repeats -- the same decodes, the prompt's next chunk of the same size -- until the
prompt's last chunk, a request finishes or the KV cache runs short. Each step is costed by the same
``ExecutionModel.iteration`` call stepping makes. No arrival can join such a step (no budget is left), so
arrivals do not cut it; cluster-policy actions still do. The step of the prompt's last, partial chunk leaves
budget: it joins the run only when nothing waits, and an arrival the scheduler sees by then ends the run before
it. Once the prompt has ended (in that step, or in ``out`` itself, which may be a whole short prompt), and while
nothing waits, the run goes on as a decode run of every running request, the prompt's among them (the run's
``tail``), which an arrival cuts at the next boundary as it cuts a decode run::

    | full chunks (arrivals wait) | partial chunk | tail: pure decode, one token of every request a step |
                                  ^ an arrival seen by here ends the run here; later ones at the next boundary

With prefix caching, the KV bookkeeping of a run is booked when it ends. Where ``out`` ended the prompt, the tail
is booked as a decode run (``BlockManager.grow_to_computed`` with its steps, which replays them where the order
of takes and named-block fills matters); a prompt chunked over several steps runs only where no decode fills
named blocks and none of its own has content some block caches (``Scheduler._run_chunk``), so that the order
cannot matter. While a run holds arrivals (async scheduling) past the boundaries where stepping queues them,
``Replica.queued`` shows the queue stepping would show.
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
    if stops_in_first_step(replica, times):
        step_flops, step_bytes = execution.decode_run_work(num_decode, kv_tokens, 1)
        record_steps(replica, times, 0, 1, step_flops, step_bytes, num_decode, used0, cum_blocks)
        yield from wait_for_stop(replica, times)
        return
    replica.run_state = (times, cum_blocks, requests, None)
    done = yield from wait_out(replica, times)
    # The work of the steps done only: about half the steps computed are cut off by an arrival.
    step_flops, step_bytes = execution.decode_run_work(num_decode, kv_tokens, done)
    durations = record_steps(replica, times, 0, done, step_flops, step_bytes, num_decode, used0, cum_blocks)
    apply_decode_steps(replica, requests, times, durations)
    replica.finish_done(requests)


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


def record_steps(replica: Replica, times: list[float], first: int, end: int, step_flops: list[float],
                 step_bytes: list[float], num_decode: int, used0: int, cum_blocks: list[int],
                 num_prefill_tokens: int | list[int] = 0) -> list[float]:
    """Record a run's iterations ``first`` .. ``end - 1`` (their FLOPs and bytes; KV blocks in use: ``used0`` plus
    the run's new blocks so far; prefill tokens the same in each or one per step); returns their durations."""
    durations = [times[j] - times[j - 1] for j in range(first + 1, end + 1)]
    replica.recorder.iterations_bulk(replica.id, times[first:end], durations, step_flops, step_bytes, num_decode,
                                     [used0 + b for b in cum_blocks[first + 1:end + 1]], num_prefill_tokens)
    return durations


def mixed_run(replica: Replica, out: SchedulerOutput, start: float, chunk_size: int):
    """Every running decode plus the next ``chunk_size`` tokens of one prompt, step after step (the first step is
    ``out``, whose blocks the scheduler allocated), up to the step that ends the prompt where it may join; then,
    while nothing waits, pure decode steps of every running request, the prompt's among them."""
    blocks, execution, scheduler = replica.blocks, replica.execution, replica.scheduler
    bs = blocks.block_size
    prefill = out.prefills[0]
    request, c, cached0 = prefill.request, chunk_size, prefill.num_cached_tokens
    pending = request.num_pending_tokens
    decodes = out.decodes
    num_decode = len(decodes)
    # Steps whose chunk takes the rest of the budget, the first being ``out`` (or that ends the prompt, as
    # ``out`` may); then the prompt's last, partial chunk (``last`` tokens, if any).
    num_full = pending // c
    last = pending - num_full * c
    head = -(-pending // c)  # steps until the prompt ends
    # A partial chunk leaves budget that stepping gives the queue, so it joins only when nothing waits; an
    # arrival the scheduler sees by its boundary (``num_full``) ends the run there. The step that ends the
    # prompt samples its first token: it stays out where a DistServe prefill instance hands the request over
    # after it. A step whose token count needs a fused-MoE kernel built runs alone. A last chunk of one token
    # is scheduled as a decode (one pending token): that step stays out too.
    moe = replica.moe_compiles
    quiet = not scheduler.waiting and not replica.pending
    ends_prompt = replica.on_prefilled is None and (not last or last > 1 and quiet and (
        moe is None or moe.is_built(num_decode + last, False)))
    num_steps = head if ends_prompt else head - 1
    # Then every running request decodes, one token a step, while nothing waits (the ``tail``).
    tail = 0
    if ends_prompt and quiet and (moe is None or moe.is_built(num_decode + 1, True)):
        tail = request.num_output_tokens - request.num_generated_tokens - 1
    if decodes:
        left = min(r.num_output_tokens - r.num_generated_tokens for r in decodes)
        num_steps = min(num_steps, left)
        tail = min(tail, left - num_steps)
    new_blocks = decode_blocks(decodes, num_steps + tail, bs)
    held = blocks.num_held(request)
    for j in range(2, num_steps + 1):  # the prompt's chunk j needs its blocks (none if reserved at admission)
        need = blocks.blocks_for(cached0 + min(c * j, pending))
        if need > held:
            new_blocks[j] += need - held
            held = need
    prompt_kv = cached0 + pending  # the request's KV tokens when its prompt has ended
    if tail:  # (so the prompt's last chunk is in the run, and ``held`` its blocks)
        j = held * bs - prompt_kv + 1  # its first decode step that needs a block more
        while j <= tail:
            new_blocks[num_steps + j] += 1
            j += bs
    cum_blocks = list(accumulate(new_blocks))
    if cum_blocks[-1] > blocks.num_free_blocks:
        total = bisect_right(cum_blocks, blocks.num_free_blocks) - 1
        num_steps, tail = min(num_steps, total), max(0, total - num_steps)
    used0 = blocks.num_used_blocks

    # Each chunk step's (tokens, cached tokens, sampled tokens): the step that ends the prompt (a full chunk where
    # ``last == 0``, else the partial one) samples its first token too.
    chunk_steps = [(c, cached0 + c * j, num_decode + 1 if c * (j + 1) == pending else num_decode)
                   for j in range(min(num_steps, num_full))]
    if num_steps > num_full:
        chunk_steps.append((last, cached0 + c * num_full, num_decode + 1))
    step_times, step_flops, step_bytes = execution.chunk_run_costs(chunk_steps, num_decode, out.decode_kv_tokens)
    times = [start]
    t = start
    for dt in step_times:
        t = t + (dt + 0.0)  # as stepping adds the (zero) swap time
        times.append(t)
    tail_kv = out.decode_kv_tokens + num_decode * len(chunk_steps) + prompt_kv + 1
    if tail:
        for dt in execution.decode_run_times(num_decode + 1, tail_kv, tail):
            t = t + dt
            times.append(t)
        order = list(scheduler.running)  # the tail's decodes, in the order stepping schedules them
    if stops_in_first_step(replica, times):  # its first step is ``out``: a chunk, or the whole short prompt
        record_steps(replica, times, 0, 1, step_flops[:1], step_bytes[:1], num_decode, used0, cum_blocks,
                     [c if num_full else last])
        yield from wait_for_stop(replica, times)
        return
    replica.run_state = (times, cum_blocks, decodes, (request, c))
    done = yield from wait_out(replica, times, arrivals_from=num_full)

    ran = min(done, num_steps)  # steps of the prompt's chunks
    ran_tail = done - ran
    chunks = [c] * ran
    if ran > num_full:
        chunks[-1] = last
    durations = record_steps(replica, times, 0, ran, step_flops[:ran], step_bytes[:ran], num_decode, used0,
                             cum_blocks, chunks)
    if ran_tail:
        tail_flops, tail_bytes = execution.decode_run_work(num_decode + 1, tail_kv, ran_tail)
        durations += record_steps(replica, times, ran, done, tail_flops, tail_bytes, num_decode + 1, used0,
                                  cum_blocks)
    if request.scheduled_s != request.scheduled_s:  # NaN: its first chunk ran in this run
        request.scheduled_s = start
    request.num_computed_tokens += min(c * ran, pending)
    prefilled = []
    if ran == head:  # its last chunk ran: the (first, unless it was recomputed) token
        if replica.sample(request, times[ran - 1], times[ran]):
            replica.recorder.gap(durations[ran - 1], 1)
        prefilled.append(request)
    if ran_tail:  # then a token a step (``Replica.sample``'s bookkeeping; the gaps are recorded with the others')
        request.num_computed_tokens += ran_tail
        request.num_generated_tokens += ran_tail
        request.last_token_s = times[done]
        max_gap = max(durations[ran:])
        if max_gap > request.max_tbt_s:
            request.max_tbt_s = max_gap
        if request.gap_log is not None:
            request.gap_log.append((durations, ran, done))
    # The KV bookkeeping. Where the prompt ended in ``out`` (whose blocks the scheduler booked), the tail's
    # steps are a decode run of every running request whose first step is ``out``: booked as one, with the
    # prompt's named blocks filled like any decode's (prefix caching).
    as_decode_run = (order, ran_tail + 1) if ran_tail and ran == 1 else None
    apply_decode_steps(replica, decodes, times[:done + 1], durations, also=[request],
                       joined_after=ran if ran_tail else 0, as_decode_run=as_decode_run)
    # Stepping's ``apply`` finishes the prefills, then the decodes, of a step; the tail's decodes in its order.
    if ran_tail:
        replica.finish_done(order)
    else:
        replica.finish_done(prefilled, decodes)


def stops_in_first_step(replica: Replica, times: list[float]) -> bool:
    """Whether the simulation stops (``simulation.max_time_s``) before the run's first step ends."""
    return replica.stop_s is not None and times[1] >= replica.stop_s


def wait_for_stop(replica: Replica, times: list[float]):
    """Wait out a run's first step, which the simulation stops during, as stepping waits out that step: the caller
    recorded it (stepping records a step as it starts it), and nothing cuts it (its end never comes)."""
    replica.step_start_s, replica.step_end_s = times[0], times[1]
    yield replica.env.at(times[1])


def wait_out(replica: Replica, times: list[float], arrivals_from: int = 0):
    """Wait until the run's last boundary, or until the boundary where something cuts it; returns the number
    of steps done. An arrival the scheduler could admit ends the run at the next boundary, or at the one after
    for a request held by async scheduling -- but not before boundary ``arrivals_from``: the steps up to there
    leave no budget to admit it (a mixed run's full chunks)."""
    done = len(times) - 1
    stop = replica.stop_s
    if stop is not None and times[done] >= stop:
        # The simulation stops at ``stop`` (``simulation.max_time_s``) and runs no event of its own time after it:
        # stepping has applied the steps that end before it and is in the middle of the next. So the run ends at its
        # last boundary before the stop (its steps are recorded), and the replica schedules its next step there.
        last = bisect_left(times, stop, 1) - 1
        if last >= 1:
            done = last
    replica.cuttable = done > 1
    while True:
        try:
            yield replica.env.at(times[done])
            break
        except simpy.Interrupt as cut:
            end = bisect_left(times, replica.env.now, 1)  # the next boundary
            if cut.cause in ("arrival", "pending"):
                if cut.cause == "pending":
                    # The engine first schedules a held request at the first boundary whose step began at or after
                    # its arrival (``Replica.release_pending``): the one after the next, or the next itself for an
                    # arrival at the instant the run's first step began (a turn sent as the answer before it ends).
                    end = bisect_left(times, replica.env.now) + 1
                if end < arrivals_from:
                    end = arrivals_from
            done = min(done, end)
            # Something that must act at the very next boundary may still come.
            replica.cuttable = done > bisect_left(times, replica.env.now, 1)
    replica.cuttable = False
    replica.run_state = None
    replica.step_start_s, replica.step_end_s = times[done - 1], times[done]
    return done


def apply_decode_steps(replica: Replica, requests: list[Request], times: list[float],
                       durations: list[float], also: list[Request] = (), joined_after: int = 0,
                       as_decode_run: tuple[list[Request], int] | None = None) -> None:
    """Apply decode iterations ending at ``times[1..]`` (``durations[j-1] = times[j] - times[j-1]``); the caller
    finishes the requests done (``Replica.finish_done``). ``also``: requests whose blocks follow their KV
    tokens too (a mixed run's prefill, advanced by the caller); where ``joined_after`` is set, they decoded from
    the step after that one on, and their tokens' gaps are recorded with the others'. ``as_decode_run``: the
    requests, in batch order, and steps of the decode run whose KV bookkeeping this run's is (default: the
    requests' blocks follow their tokens, or ``requests`` with ``len(durations)`` steps where ``also`` is
    empty)."""
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
            if r.gap_log is not None:
                r.gap_log.append(gap)
        if more and r.gap_log is not None:
            r.gap_log.append((durations, 1, num_steps))
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
    if joined_after:
        if requests:
            recorder.gaps_bulk(durations[1:joined_after], len(requests))
        recorder.gaps_bulk(durations[joined_after:], len(requests) + len(also))
    elif requests:
        recorder.gaps_bulk(later_gaps, len(requests))
    if as_decode_run is not None:
        replica.scheduler.commit_decode_run(*as_decode_run)
    else:
        replica.scheduler.commit_decode_run(requests + also if also else requests, None if also else num_steps)
