"""One model instance on its GPUs: a simpy process that runs iterations.

Each iteration: ask the scheduler for a batch, charge its time from the execution model, then apply it
(computed tokens advance, new tokens are sampled, finished requests leave). Pure-decode runs are
fast-forwarded (``fast_forward.py``); pipelined replicas run their own loop (``pipeline.py``). The replica
never edits the scheduler's queues or the KV cache: it calls the scheduler's operations (``schedulers/base.py``).

Cluster policies act on a replica from outside through ``submit``, ``post`` (an action at the next iteration
boundary, where request states are exact), ``wake``, ``release`` and ``adopt``.

Async scheduling (vLLM's default, ``EngineCore.step_with_batch_queue``): the engine schedules step N+1 and
queues it behind step N before it waits for N's output, so the schedule for the step starting at a boundary
was made when the previous step started. A request submitted while a step runs is held (``pending``) and
handed to the scheduler at the first boundary whose previous step started after it arrived, one step later
than a synchronous engine; an idle engine schedules it at once.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Callable

import simpy

from llmsim.clock import Clock
from llmsim.cluster.fast_forward import decode_run, mixed_run
from llmsim.cluster.pipeline import run_pipeline
from llmsim.execution.model import ExecutionModel
from llmsim.execution.moe_jit import FusedMoeCompiles
from llmsim.kv_cache import BlockManager
from llmsim.metrics.recorder import Recorder
from llmsim.request import DONE, Request, RequestStatus
from llmsim.schedulers.base import PrefillChunk, Scheduler, SchedulerOutput


def record_timed_out(recorder: Recorder, request: Request, reason: str) -> None:
    """The client gave up on ``request``, which holds nothing anywhere now: it leaves with ``reason``."""
    request.status = RequestStatus.TIMED_OUT
    request.reject_reason = reason
    recorder.request(request, "timed_out")


class Replica:
    def __init__(self, env: Clock, replica_id: int, scheduler: Scheduler,
                 execution: ExecutionModel, recorder: Recorder, *, fast_forward: bool = True,
                 on_prefilled: Callable[[Replica, list[Request]], None] | None = None,
                 micro_batches: int = 1, async_scheduling: bool = False,
                 moe_compiles: FusedMoeCompiles | None = None, stop_s: float | None = None):
        self.env = env
        self.stop_s = stop_s  # where the simulation stops (``simulation.max_time_s``); None: it runs to the end
        self.id = replica_id
        self.scheduler = scheduler
        self.blocks: BlockManager = scheduler.blocks  # read-only here: the scheduler owns it
        self.execution = execution
        self.recorder = recorder
        self.fast_forward = fast_forward
        # DistServe prefill instance: called with each batch's prefill chunks once they are applied, so the
        # requests whose prompt is done can move on to a decode instance.
        self.on_prefilled = on_prefilled
        self.num_outstanding = 0  # routed here and not finished
        self.actions: list[Callable[[], None]] = []  # cluster-policy actions for the next boundary
        # While a run is waited out: (boundary times, cumulative new blocks, its decodes, and for a mixed run
        # (its prefill, tokens a step)); ``cuttable``: the wait may still be interrupted.
        self.run_state: tuple[list[float], list[int], list[Request], tuple[Request, int] | None] | None = None
        self.cuttable = False
        self._idle: simpy.Event | None = None
        self.micro_batches = scheduler.micro_batches = micro_batches
        # Pipelines run stage by stage even with one micro-batch, so that each stage's power is its own.
        self.pipelined = execution.plan.pp > 1
        # Async scheduling: (submitted at, request) not yet seen by the scheduler, and the last step's span.
        self.async_scheduling = async_scheduling and not self.pipelined
        self.pending: deque[tuple[float, Request]] = deque()
        self.step_start_s = self.step_end_s = float("-inf")
        # Pipelines: requests aborted while a micro-batch holding them was in flight, dropped from it as it lands.
        self.aborted_in_flight: set[int] = set()
        # The fused-MoE kernel variants this engine has built (a cold Triton cache), or None: nothing to build.
        self.moe_compiles = moe_compiles
        self.process = env.process(run_pipeline(self) if self.pipelined else self._run())

    # --- interface for routers and cluster policies ----------------------------------------------------

    def submit(self, request: Request) -> None:
        request.replica_id = self.id
        if self.recorder.logs_gaps and request.gap_log is None:
            request.gap_log = []
        self.num_outstanding += 1
        if self.async_scheduling and self._idle is None:  # a step is running: the engine sees it later
            self.pending.append((self.env.now, request))
            if self.cuttable:
                self._cut("pending")  # the run ends where the engine first schedules it
            return
        self.scheduler.add(request)
        if self._idle is not None and not self._idle.triggered:
            self._idle.succeed()
        elif self.cuttable and (self.pipelined or self.scheduler.cuts_run(request)):
            self._cut("arrival")

    def queued(self) -> list[Request]:
        """Requests here that do not run yet: the scheduler's queue, then those async scheduling still holds, as
        stepping would show them now."""
        waiting, pending = self.scheduler.waiting, self.pending
        if not pending:
            return list(waiting)
        if self.run_state is not None:
            # A mixed run's full chunks hold arrivals past the boundaries where stepping hands them to the
            # scheduler (``release_pending``: at each boundary, those submitted before the step that ended began),
            # which queues them in its order (by priority): show them so.
            times = self.run_state[0]
            passed = self._boundaries_passed(times)
            if passed:
                seen_by = times[passed - 1]
                released = [r for t, r in pending if t <= seen_by]
                if released:
                    return self.scheduler.waiting_after(released) + [r for t, r in pending if t > seen_by]
        return [*waiting, *(r for _, r in pending)]

    def in_flight(self) -> list[Request]:
        return list(self.scheduler.running) + self.queued()

    def wake(self) -> None:
        """Something outside changed this replica (KV held, batch): schedule afresh at the next boundary."""
        if self._idle is not None and not self._idle.triggered:
            self._idle.succeed()
        elif self.cuttable:
            self._cut()

    def post(self, action: Callable[[], None]) -> None:
        """Run ``action`` at the next iteration boundary, where the request states are exact."""
        self.actions.append(action)
        self.wake()

    def adopt(self, request: Request) -> None:
        """Take a migrated request whose KV already sits in its reserved blocks here."""
        request.replica_id = self.id
        self.scheduler.adopt(request)
        self.num_outstanding += 1
        self.wake()

    def abort(self, request: Request, reason: str) -> None:
        """The client gave up on ``request`` (call at a boundary, or while idle): it leaves, its KV freed."""
        if request.status in DONE:
            return
        held = next((i for i, (_, r) in enumerate(self.pending) if r is request), None)
        if held is not None:
            del self.pending[held]
        else:
            if request.id in self.scheduler.busy:  # in a pipeline micro-batch in flight: its output is dropped
                self.aborted_in_flight.add(request.id)
            self.scheduler.abort(request)
        self.abandon(request, reason)

    def abandon(self, request: Request, reason: str) -> None:
        """The client gave up on ``request``, which is in none of this replica's queues (``abort`` took it out,
        or its KV is still on its way here in DistServe's pull, whose reservation is given back when the copy
        lands): it leaves now."""
        self.num_outstanding -= 1
        record_timed_out(self.recorder, request, reason)

    def record_ignored(self) -> None:
        """Record the requests the scheduler dropped as never runnable (rejected, with their reason)."""
        for request in self.scheduler.take_ignored():
            self.num_outstanding -= 1
            self.recorder.request(request, "rejected")

    def release(self, request: Request) -> None:
        """Let a running request go (with its KV, which is freed here); call at a boundary."""
        self.scheduler.release(request)
        self.num_outstanding -= 1

    def park(self, request: Request) -> None:
        """Let a running request go while its KV stays here until pulled (``drop_parked``); at a boundary."""
        self.scheduler.park(request)
        self.num_outstanding -= 1

    def drop_parked(self, request: Request) -> None:
        """A parked request's KV has been pulled: free it here (at a boundary; ``post`` wakes the replica)."""
        self.scheduler.drop_parked(request)

    def num_used_blocks_now(self) -> int:
        """KV blocks in use as stepping would show them now (a decode run books its blocks when it ends)."""
        if self.run_state is None:
            return self.blocks.num_used_blocks
        times, cum_blocks, _, _ = self.run_state
        # The manager holds the run's first step plus whatever changed from outside since; the run's later
        # steps are booked when it ends.
        return self.blocks.num_used_blocks + cum_blocks[bisect_left(times, self.env.now, 1)]

    def has_room_for(self, num_blocks: int) -> bool:
        """``num_blocks`` more KV blocks fit now, above the admission watermark."""
        blocks = self.blocks
        return num_blocks + blocks.watermark_blocks <= blocks.num_blocks - self.num_used_blocks_now()

    def num_computed_now(self, request: Request) -> int:
        """KV tokens of a running request as stepping would show them now."""
        if self.run_state is None:
            return request.num_computed_tokens
        times, _, requests, prefill = self.run_state
        done = self._boundaries_passed(times)
        if prefill is not None and prefill[0] is request:
            # Its chunks, then (a mixed run's tail) a token a step.
            chunk, pending = prefill[1], request.num_pending_tokens
            head = -(-pending // chunk)
            return request.num_computed_tokens + (done * chunk if done < head else pending + done - head)
        return request.num_computed_tokens + (done if request in requests else 0)

    def _boundaries_passed(self, times: list[float]) -> int:
        """How many of a run's boundaries (``times[1:]``) lie before now: the steps stepping would have done (one
        at exactly now is not passed yet: an urgent event there sees the state before it)."""
        return bisect_left(times, self.env.now, 1) - 1

    def is_decoding_now(self, request: Request) -> bool:
        """Whether a running request has one pending token (it decodes) as stepping would show it now: a mixed
        run's prompt, once its last chunk has run, decodes."""
        if self.run_state is not None:
            times, _, _, prefill = self.run_state
            if prefill is not None and prefill[0] is request:
                done = self._boundaries_passed(times)
                return request.num_pending_tokens - done * prefill[1] <= 1  # its prompt done, or one token left
        return request.num_pending_tokens == 1

    def run_actions(self) -> None:
        actions, self.actions = self.actions, []
        for action in actions:
            action()

    def release_pending(self) -> None:
        """At a boundary: hand the scheduler what the engine has seen by now -- requests submitted before the
        step that just ended started (the schedule for the next step was made then), or everything when the
        replica was idle or the next step would be empty without them (the engine then schedules at once)."""
        pending, scheduler = self.pending, self.scheduler
        now = self.env.now
        seen_by = self.step_start_s if self.step_end_s == now else now
        while pending and pending[0][0] <= seen_by:
            scheduler.add(pending.popleft()[1])
        if pending and not scheduler.has_schedulable_work:
            while pending:
                scheduler.add(pending.popleft()[1])

    def _cut(self, cause: str = "cut") -> None:
        """End the wait at the next boundary: for a cluster policy ("cut") or an arrival the scheduler could admit
        ("arrival", which a mixed run ignores); for a request held by async scheduling ("pending") at the one
        after it, where the engine first schedules it."""
        self.cuttable = False
        self.process.interrupt(cause)

    def wait_for_work(self):
        """Sleep until a request is submitted or something wakes this replica."""
        self._idle = self.env.event()
        yield self._idle
        self._idle = None

    # --- the iteration loop ----------------------------------------------------------------------------

    def _run(self):
        env, scheduler = self.env, self.scheduler
        while True:
            if self.actions:  # cheap check first: this loop is hot
                self.run_actions()
            if self.pending:
                self.release_pending()
            if not scheduler.has_work:
                if self.actions:  # posted by the actions just run (one waiting for another): nothing to step
                    continue
                yield from self.wait_for_work()
                continue
            start = env.now
            out = scheduler.schedule()
            if scheduler.ignored:
                self.record_ignored()
            if out.is_empty:
                if not scheduler.has_work:
                    continue  # what was queued left the queue without running (a DistServe pull started)
                if not (scheduler.num_parked or scheduler.num_reserved_seqs):
                    raise RuntimeError(f"replica {self.id}: scheduler produced an empty batch with work queued")
                # KV or batch slots held for copies between instances leave no room: wait for one to land.
                yield from self.wait_for_work()
                continue
            # A step that builds a fused-MoE kernel variant runs alone; a run repeats its first step's token count,
            # and a mixed run checks the counts of its other steps (a prompt's last chunk, its tail).
            moe, builds = self.moe_compiles, False
            if moe is not None:
                moe_tokens = out.num_prefill_tokens + len(out.decodes)
                builds = not moe.is_built(moe_tokens, not out.prefills)
            if self.fast_forward and not self.actions and not builds:
                # A DistServe prefill instance hands a request over after the step that samples its first token,
                # so its decodes (a prompt's last token) never run on. A request held by async scheduling joins
                # at the next boundary but one: decodes step until it has. An action posted while the last ones
                # ran (one that waits a boundary for another) runs at the next boundary: this step runs alone.
                hands_over = self.on_prefilled is not None
                if not self.pending and not hands_over and scheduler.allows_fast_forward(out):
                    yield from decode_run(self, out, start)
                    continue
                chunk = scheduler.mixed_run_chunk(out)
                if chunk and not (hands_over and (out.decodes or chunk == out.prefills[0].request.num_pending_tokens)):
                    yield from mixed_run(self, out, start, chunk)
                    continue
            chunks, num_decode, kv_tokens, num_samples = out.signature()
            cost = self.execution.iteration(chunks, num_decode, kv_tokens, num_samples)
            duration = cost.time_s + out.swap_bytes / self.execution.hardware.host_link.bandwidth_bytes_per_s
            if builds:  # the engine waits for Triton
                duration += moe.stall_s(moe_tokens, not out.prefills)
            end = start + duration
            self.recorder.iteration(self.id, start, end - start, cost.flops, cost.num_bytes,
                                    out.num_prefill_tokens, num_decode, self.blocks.num_used_blocks)
            self.step_start_s, self.step_end_s = start, end
            yield env.at(end)
            self.apply(out, start, end)

    def apply(self, out: SchedulerOutput, start: float, end: float) -> None:
        """The batch ran from ``start`` to ``end``: advance its requests and sample their tokens."""
        steady = 0
        for chunk in out.prefills:
            r = chunk.request
            if r.scheduled_s != r.scheduled_s:  # NaN: first time it runs
                r.scheduled_s = start
            r.num_computed_tokens += chunk.num_new_tokens
            if r.num_computed_tokens == r.num_tokens:
                steady += self.sample(r, start, end)
        for r in out.decodes:
            if r.scheduled_s != r.scheduled_s:
                r.scheduled_s = start
            r.num_computed_tokens += 1
            steady += self.sample(r, start, end)
        if steady:
            self.recorder.gap(end - start, steady)
        self.finish_done([c.request for c in out.prefills], out.decodes)
        if self.on_prefilled is not None:
            # Including decodes: a prompt whose chunks left one token computes it as a decode-sized step.
            self.on_prefilled(self, [c.request for c in out.prefills] + out.decodes)

    def sample(self, r: Request, start: float, end: float) -> int:
        """A new token at ``end``. Returns 1 when the previous token ended the previous iteration."""
        r.num_generated_tokens += 1
        if r.num_generated_tokens == 1:
            r.first_token_s = end
            r.last_token_s = end
            return 0
        gap = end - r.last_token_s
        if gap > r.max_tbt_s:
            r.max_tbt_s = gap
        if r.gap_log is not None:
            r.gap_log.append(gap)
        steady = r.last_token_s == start
        if not steady:
            self.recorder.gap(gap, 1)
        r.last_token_s = end
        return 1 if steady else 0

    def finish_done(self, *groups: list[Request]) -> None:
        finished = []
        for group in groups:
            for r in group:
                if r.num_generated_tokens >= r.num_output_tokens and r.status is RequestStatus.RUNNING:
                    r.finish_s = r.last_token_s
                    r.status = RequestStatus.FINISHED
                    self.num_outstanding -= 1
                    self.recorder.request(r, "finished")
                    finished.append(r)
        if finished:
            self.scheduler.retire(finished)
