"""The scheduler of a DistServe decode instance: requests arrive with their prompt's KV computed on a prefill
instance and are admitted in arrival order as soon as the KV cache (above the watermark) and the sequence limit
allow. Admission pulls the KV (DistServe's pull-based hand-off): the request holds its blocks and a batch slot
here while the KV crosses the link (``on_pull`` tells the cluster policy, which ``adopt``s it into the batch
when the copy lands). A request preempted here by recompute re-runs its prefill here, FCFS-style (a step with a
prefill runs prefills only); one longer than the token budget (its prompt and the tokens generated so far) runs
in chunks of the budget, one a step, as an engine with chunked prefill (vLLM V1's, the one a disaggregated vLLM
decode instance runs) runs it, where a prefill-only engine could never run it.

With prefix caching (the experiment's ``enable_prefix_caching``) the decode instance has a prefix cache of its
own, as a vLLM decode instance does: a handed-over request shares the blocks of its longest prefix cached here
(another request's system prompt or earlier turns) instead of holding copies, and the named blocks its
transferred KV fills are cached here for later requests; the pull carries only the blocks not cached here (as
vLLM's KV connectors do). A request re-prefilled here after a recompute preemption looks the cache up like any
admission in vLLM: its own full blocks stay cached when it is preempted, so it recomputes only what was evicted
meanwhile and its last partial block.
"""

from __future__ import annotations

from typing import Callable

from llmsim.kv_cache import NO_HIT, PrefixHit
from llmsim.request import Request, RequestStatus
from llmsim.schedulers.base import PrefillChunk, SchedulerOutput
from llmsim.schedulers.fcfs import FCFSScheduler


def _handed_over(request: Request, num_new_tokens: int) -> bool:
    return num_new_tokens == 1 and request.status is RequestStatus.WAITING


class DecodeScheduler(FCFSScheduler):
    """FCFS admission and decoding; only what admitting a handed-over request means differs."""

    # Called with (request, tokens of its prompt cached here) when admission starts pulling its KV; set by the
    # DistServe policy (``DistServe.connect``) before the simulation starts.
    on_pull: Callable[[Request, int], None] | None = None

    def schedule(self) -> SchedulerOutput:
        # A re-prefill admitted in chunks goes on, alone in its steps, until its last chunk.
        partial = next((r for r in self.idle_running() if r.num_pending_tokens > 1), None)
        if partial is None:
            return super().schedule()
        out = SchedulerOutput()
        n = min(partial.num_pending_tokens, self.max_num_batched_tokens)
        if self._reserve(partial, n, out):
            out.prefills.append(PrefillChunk(partial, n, partial.num_computed_tokens))
        return out

    def _first_chunk(self, request: Request, budget: int) -> int:
        # A re-prefill longer than the whole budget starts with a chunk of it, in a step of its own.
        return budget if budget == self.max_num_batched_tokens else 0

    def _can_admit(self, request: Request, num_new_tokens: int, hit: PrefixHit) -> bool:
        if not _handed_over(request, num_new_tokens):
            return super()._can_admit(request, num_new_tokens, hit)  # a re-prefill after a recompute preemption
        # Its prompt's KV plus this step's token, from the prefix cached here (none without prefix caching).
        blocks = self.blocks
        return blocks.can_admit_from(blocks.lookup(request), request.num_computed_tokens + num_new_tokens)

    def _admit(self, request: Request, num_new_tokens: int, out: SchedulerOutput,
               reserve_tokens: int | None = None, hit: PrefixHit = NO_HIT) -> None:
        if not _handed_over(request, num_new_tokens):
            super()._admit(request, num_new_tokens, out, reserve_tokens, hit)
            return
        # Handed-over KV: hold blocks for the computed tokens, sharing the prefix cached here, and pull the rest;
        # the request joins the batch when the copy lands (``adopt``).
        blocks = self.blocks
        computed = request.num_computed_tokens
        cached_here = blocks.lookup(request)  # ``hit`` is NO_HIT: ``_hit`` skips a request with computed KV
        request.num_computed_tokens = cached_here.num_tokens  # allocate_slots counts from the hit ...
        if not blocks.allocate_slots(request, cached_here, computed - cached_here.num_tokens):
            raise RuntimeError(f"request {request.id}: admitted without room for its KV")
        request.num_computed_tokens = computed  # ... and the transfer fills the rest
        self.waiting.popleft()
        request.status = RequestStatus.MIGRATING
        self.num_reserved_seqs += 1
        self.on_pull(request, cached_here.num_tokens)
