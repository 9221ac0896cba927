"""One model instance on its GPUs: a simpy process that runs iterations.

Each iteration: ask the scheduler for a batch, charge its time from the execution model, then apply it
(computed tokens advance, new tokens are sampled, finished requests release their KV).

Decode fast-forward. When a batch is pure decode over every running request, the following iterations
repeat it until a request finishes or the KV cache runs short, so their end times are computed up front
(``t_j = t_{j-1} + dt_j``, exactly as stepping would) and the per-request bookkeeping is applied once::

    t0 ---dt1--- t1 ---dt2--- t2 ... tk        one simpy wait instead of k, one update per request
              ^ arrival: wait for the next boundary t_j, apply j steps, schedule afresh

An arrival that becomes the head of the waiting queue (the only one the scheduler could admit) cuts the
run at the next boundary, where stepping would have seen it too; results are bit-identical to stepping
(tests compare both). Cluster policies that act on a replica from outside (Llumnix migration) ``post``
actions that run at its next boundary, or ``wake`` it after changing its KV or batch, which cuts a run the
same way; while a run is waited out, ``num_used_blocks_now`` and ``num_computed_now`` report the state
stepping would show.

Pipeline parallelism (``pp`` > 1). Up to ``micro_batches`` batches are in flight, by default one per stage as
in vLLM: a batch enters stage 0 as soon as stage 0 is free, each stage takes an equal share of the batch's
time, and stage ``k`` starts a batch when both the batch has left stage ``k-1`` (plus the activation hand-off)
and stage ``k`` has finished the previous batch. Requests of a batch in flight sit out of later batches
until it leaves the last stage. An iteration record is one micro-batch, its duration the time it holds a
stage: busy time and energy count each GPU once, and a stage's power is capped at its own utilisation.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from itertools import accumulate
from typing import Callable

import simpy

from llmsim.clock import Clock
from llmsim.execution.model import ExecutionModel
from llmsim.kv_cache import BlockManager
from llmsim.metrics.recorder import Recorder
from llmsim.request import Request, RequestStatus
from llmsim.schedulers.base import Scheduler, SchedulerOutput


class Replica:
    def __init__(self, env: Clock, replica_id: int, scheduler: Scheduler,
                 execution: ExecutionModel, recorder: Recorder, *, fast_forward: bool = True,
                 on_finish: Callable[[Request], None] | None = None,
                 handoff: Callable[[Request], None] | None = None, micro_batches: int = 1):
        self.env = env
        self.id = replica_id
        self.scheduler = scheduler
        self.blocks: BlockManager = scheduler.blocks
        self.execution = execution
        self.recorder = recorder
        self.fast_forward = fast_forward
        self.on_finish = on_finish
        # DistServe prefill instance: a request leaves as soon as its prompt is computed and its first token
        # sampled; ``handoff`` moves it (and its KV) on to the decode pool.
        self.handoff = handoff
        self.num_outstanding = 0  # routed here and not finished
        self._idle: simpy.Event | None = None
        self._actions: list[Callable[[], None]] = []  # cluster-policy actions for the next boundary
        # While a decode run is waited out: (boundary times, cumulative new blocks, its requests);
        # ``_cuttable``: the wait may still be interrupted.
        self._run_state: tuple[list[float], list[int], list[Request]] | None = None
        self._cuttable = False
        self.micro_batches = scheduler.micro_batches = micro_batches
        # Pipelines run stage by stage even with one micro-batch, so that each stage's power is its own.
        self.pipelined = execution.plan.pp > 1
        self.process = env.process(self._run_pipeline() if self.pipelined else self._run())

    # --- interface for routers and cluster policies ----------------------------------------------------

    def submit(self, request: Request) -> None:
        request.replica_id = self.id
        self.scheduler.add(request)
        self.num_outstanding += 1
        if self._idle is not None and not self._idle.triggered:
            self._idle.succeed()
        elif self._cuttable and (self.pipelined or self.scheduler.cuts_run(request)):
            self._cut()

    def in_flight(self) -> list[Request]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    def wake(self) -> None:
        """Something outside changed this replica (KV held, batch): schedule afresh at the next boundary."""
        if self._idle is not None and not self._idle.triggered:
            self._idle.succeed()
        elif self._cuttable:
            self._cut()

    def post(self, action: Callable[[], None]) -> None:
        """Run ``action`` at the next iteration boundary, where the request states are exact."""
        self._actions.append(action)
        self.wake()

    def adopt(self, request: Request) -> None:
        """Take a migrated request whose KV already sits in this replica's blocks; it decodes from the next
        batch on."""
        request.replica_id = self.id
        request.status = RequestStatus.RUNNING
        self.scheduler.running.append(request)
        self.num_outstanding += 1
        self.wake()

    def release(self, request: Request) -> None:
        """Let a running request go (with its KV, which is freed here); call at a boundary."""
        self.scheduler.running.remove(request)
        self.blocks.free(request)
        self.num_outstanding -= 1

    def num_used_blocks_now(self) -> int:
        """KV blocks in use as stepping would show them now (a decode run books its blocks when it ends)."""
        if self._run_state is None:
            return self.blocks.num_used_blocks
        times, cum_blocks, _ = self._run_state
        # The manager holds the run's first step plus whatever changed from outside since; the run's later
        # steps are booked when it ends.
        return self.blocks.num_used_blocks + cum_blocks[bisect_left(times, self.env.now, 1)]

    def has_room_for(self, num_blocks: int) -> bool:
        """``num_blocks`` more KV blocks fit now, above the admission watermark."""
        blocks = self.blocks
        return num_blocks + blocks.watermark_blocks <= blocks.num_blocks - self.num_used_blocks_now()

    def num_computed_now(self, request: Request) -> int:
        """KV tokens of a running request as stepping would show them now."""
        if self._run_state is None:
            return request.num_computed_tokens
        times, _, requests = self._run_state
        done = bisect_left(times, self.env.now, 1) - 1  # boundaries passed
        return request.num_computed_tokens + (done if request in requests else 0)

    def _run_actions(self) -> None:
        actions, self._actions = self._actions, []
        for action in actions:
            action()

    def _cut(self) -> None:
        self._cuttable = False
        self.process.interrupt("cut")

    # --- the iteration loop ----------------------------------------------------------------------------

    def _run(self):
        env, scheduler = self.env, self.scheduler
        while True:
            if self._actions:  # cheap check first: this loop is hot
                self._run_actions()
            if not scheduler.has_work:
                self._idle = env.event()
                yield self._idle
                self._idle = None
                continue
            start = env.now
            out = scheduler.schedule()
            if out.is_empty:
                raise RuntimeError(f"replica {self.id}: scheduler produced an empty batch with work queued")
            if self.fast_forward and scheduler.allows_fast_forward(out):
                yield from self._decode_run(out, start)
                continue
            chunks, num_decode, kv_tokens, num_samples = out.signature()
            cost = self.execution.iteration(chunks, num_decode, kv_tokens, num_samples)
            duration = cost.time_s + out.swap_bytes / self.execution.hardware.host_link.bandwidth_bytes_per_s
            end = start + duration
            self.recorder.iteration(self.id, start, end - start, cost.flops, cost.num_bytes,
                                    out.num_prefill_tokens, num_decode, self.blocks.num_used_blocks)
            yield env.at(end)
            self._apply(out, start, end)

    def _run_pipeline(self):
        env, scheduler, ex = self.env, self.scheduler, self.execution
        stage_free = [env.now] * ex.plan.pp  # when each stage finishes its current micro-batch
        flights: deque[tuple[float, SchedulerOutput, float]] = deque()  # (leaves the last stage, batch, entered)
        while True:
            if self._actions:  # cheap check first: this loop is hot
                self._run_actions()
            now = env.now
            while flights and flights[0][0] <= now:
                end, out, start = flights.popleft()
                scheduler.busy.difference_update(out.request_ids())
                self._apply(out, start, end)
            can_launch = len(flights) < self.micro_batches and scheduler.has_schedulable_work
            if can_launch and stage_free[0] <= now:
                out = scheduler.schedule()
                if not out.is_empty:
                    flights.append((self._launch(out, now, stage_free), out, now))
                    continue
                can_launch = False  # nothing schedulable now (KV short, or all work in flight)
            wake_at = [flights[0][0]] if flights else []
            if can_launch:
                wake_at.append(stage_free[0])
            if not wake_at:
                self._idle = env.event()
                yield self._idle
                self._idle = None
                continue
            self._cuttable = True  # an arrival or a cluster policy may have work for stage 0 sooner
            try:
                yield env.at(min(wake_at))
            except simpy.Interrupt:
                pass
            self._cuttable = False

    def _launch(self, out: SchedulerOutput, now: float, stage_free: list[float]) -> float:
        """Put a batch into the pipeline; returns when it leaves the last stage."""
        chunks, num_decode, kv_tokens, num_samples = out.signature()
        cost = self.execution.iteration(chunks, num_decode, kv_tokens, num_samples)
        stage_s, hand_off_s = self.execution.pipeline_stages(cost, num_decode + sum(n for n, _ in chunks))
        # Swapped KV moves over the host link before the batch can start.
        t = now + out.swap_bytes / self.execution.hardware.host_link.bandwidth_bytes_per_s
        for k in range(len(stage_free)):
            start = t if t > stage_free[k] else stage_free[k]
            stage_free[k] = start + stage_s
            t = stage_free[k] + hand_off_s
        self.recorder.iteration(self.id, now, stage_free[0] - now, cost.flops, cost.num_bytes,
                                out.num_prefill_tokens, num_decode, self.blocks.num_used_blocks)
        self.scheduler.busy.update(out.request_ids())
        return stage_free[-1]

    def _apply(self, out: SchedulerOutput, start: float, end: float) -> None:
        steady = 0
        for chunk in out.prefills:
            r = chunk.request
            if r.scheduled_s != r.scheduled_s:  # NaN: first time it runs
                r.scheduled_s = start
            r.num_computed_tokens += chunk.num_new_tokens
            if r.num_computed_tokens == r.num_tokens:
                steady += self._sample(r, start, end)
        for r in out.decodes:
            if r.scheduled_s != r.scheduled_s:
                r.scheduled_s = start
            r.num_computed_tokens += 1
            steady += self._sample(r, start, end)
        if steady:
            self.recorder.gap(end - start, steady)
        self._finish_done([c.request for c in out.prefills], out.decodes)
        if self.handoff is not None:
            self._hand_off(out.prefills)

    def _hand_off(self, prefills) -> None:
        moved = [c.request for c in prefills
                 if c.request.status is RequestStatus.RUNNING and c.request.num_pending_tokens == 1]
        if not moved:
            return
        for r in moved:
            self.scheduler.running.remove(r)
            self.blocks.free(r)  # the copy leaves with the request (in-flight transfers hold no prefill memory)
            self.num_outstanding -= 1
            r.status = RequestStatus.WAITING
            self.handoff(r)

    def _sample(self, r: Request, start: float, end: float) -> int:
        """A new token at ``end``. Returns 1 when the previous token ended the previous iteration."""
        r.num_generated_tokens += 1
        if r.num_generated_tokens == 1:
            r.first_token_s = end
            r.last_token_s = end
            return 0
        gap = end - r.last_token_s
        if gap > r.max_tbt_s:
            r.max_tbt_s = gap
        steady = r.last_token_s == start
        if not steady:
            self.recorder.gap(gap, 1)
        r.last_token_s = end
        return 1 if steady else 0

    def _finish_done(self, *groups: list[Request]) -> None:
        finished = False
        for group in groups:
            for r in group:
                if r.num_generated_tokens >= r.num_output_tokens and r.status is RequestStatus.RUNNING:
                    r.finish_s = r.last_token_s
                    r.status = RequestStatus.FINISHED
                    self.blocks.free(r)
                    self.num_outstanding -= 1
                    self.recorder.request(r, "finished")
                    finished = True
                    if self.on_finish is not None:
                        self.on_finish(r)
        if finished:
            self.scheduler.remove_finished()

    # --- fast-forward ----------------------------------------------------------------------------------

    def _decode_run(self, out: SchedulerOutput, start: float):
        requests = out.decodes
        num_decode = len(requests)
        bs = self.blocks.block_size
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
        if cum_blocks[-1] > self.blocks.num_free_blocks:
            num_steps = bisect_right(cum_blocks, self.blocks.num_free_blocks) - 1
        used0 = self.blocks.num_used_blocks

        step_s, step_flops, step_bytes = self.execution.decode_run(num_decode, out.decode_kv_tokens, num_steps)
        times = [start]
        t = start
        for dt in step_s:
            t = t + dt
            times.append(t)
        done = num_steps
        self._run_state = (times, cum_blocks, requests)
        self._cuttable = num_steps > 1
        try:
            yield self.env.at(times[-1])
        except simpy.Interrupt:
            done = bisect_left(times, self.env.now, 1)
            yield self.env.at(times[done])
        self._cuttable = False
        self._run_state = None

        durations = [times[j] - times[j - 1] for j in range(1, done + 1)]
        self.recorder.iterations_bulk(self.id, times[:done], durations, step_flops[:done], step_bytes[:done],
                                      num_decode, [used0 + b for b in cum_blocks[1:done + 1]])
        self._apply_decode_steps(requests, times, durations)

    def _apply_decode_steps(self, requests: list[Request], times: list[float], durations: list[float]) -> None:
        """Apply decode iterations ending at ``times[1..]`` (``durations[j-1] = times[j] - times[j-1]``)."""
        num_steps = len(durations)
        start, end = times[0], times[num_steps]
        steady = sum(self._sample(r, start, times[1]) for r in requests)
        if steady:
            self.recorder.gap(durations[0], steady)
        later_gaps = durations[1:]
        self.recorder.gaps_bulk(later_gaps, len(requests))
        max_gap = max(later_gaps, default=0.0)
        block_size = self.blocks.block_size
        for r in requests:
            r.num_computed_tokens += num_steps
            if num_steps > 1:
                r.num_generated_tokens += num_steps - 1
                r.last_token_s = end
                if max_gap > r.max_tbt_s:
                    r.max_tbt_s = max_gap
            if r.scheduled_s != r.scheduled_s:
                r.scheduled_s = start
            self.blocks.grow_to(r, -(-r.num_computed_tokens // block_size), r.num_computed_tokens)
        self._finish_done(requests)
