"""Sarathi-Serve: stall-free batching with chunked prefills under a per-iteration token budget.

Every step first gives each running decode its token (decodes are never stalled by a prefill), then spends
what is left of the budget on prefill chunks: first requests already part-way through their prompt, then
waiting requests in arrival order. ``chunk_size`` is the budget (Sarathi's token budget, e.g. 512).

Admission follows Sarathi-Serve's block manager (vLLM v0's): a waiting request is admitted only when the blocks
of its whole prompt fit above the watermark, and they are allocated then, so its later chunks never need a
block. (Admitting on the first chunk alone over-commits the cache under memory pressure: requests admitted
together outgrow it part-way through their prompts and evict each other by recompute.)

With ``enable_prefix_caching`` (vLLM v0's automatic prefix caching beside its chunked prefill; off by default, as
there) a request holding no KV starts from its longest cached prefix: it is admitted when the blocks of the rest
of its prompt fit, holds them all from then on, and its blocks are cached as its chunks fill them.
"""

from __future__ import annotations

from llmsim.request import RequestStatus
from llmsim.schedulers.base import PrefillChunk, Scheduler, SchedulerOutput


class SarathiScheduler(Scheduler):
    config_fields = ("chunk_size",)
    supports_prefix_caching = True

    def __init__(self, blocks, *, chunk_size: int = 512, **kwargs):
        super().__init__(blocks, **kwargs)
        self.chunk_size = chunk_size

    def mixed_run_chunk(self, out: SchedulerOutput) -> int:
        return self._run_chunk(out, min(self.chunk_size, self.max_num_batched_tokens))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = min(self.chunk_size, self.max_num_batched_tokens)
        decoding, prefilling = [], []
        for r in self.idle_running():
            # num_pending_tokens == 1, spelled out: this reads every running request at every step.
            if r.num_prompt_tokens + r.num_generated_tokens - r.num_computed_tokens == 1:
                decoding.append(r)
            else:
                prefilling.append(r)
        self._schedule_decodes(decoding[:min(budget, self.decode_share())], out)
        budget -= len(out.decodes)
        for request in prefilling:  # part-way prefills continue in admission order
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted to make room for a decode
            pending = request.num_pending_tokens
            n = min(pending, budget)
            if not self._reserve(request, n, out):
                continue
            out.prefills.append(PrefillChunk(request, n, request.num_computed_tokens))
            budget -= n
        while budget > 0 and self.waiting and self.has_seq_room() and not out.preempted:
            request = self.waiting[0]
            hit = self._hit(request)
            prompt = request.num_pending_tokens - hit.num_tokens
            n = min(prompt, budget)
            if not self._can_admit(request, prompt, hit):
                break
            # This chunk's blocks and the rest of the prompt's are held from now on (past the cached prefix, if
            # any, taken as computed), cached only as chunks fill them.
            self._admit(request, n, out, reserve_tokens=prompt, hit=hit)
            budget -= n
        return out
