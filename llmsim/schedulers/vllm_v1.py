"""vLLM V1's scheduler (``vllm/v1/core/sched/scheduler.py``, ``Scheduler.schedule``): one token budget per step,
no prefill or decode phase.

Each step spends ``max_num_batched_tokens``:

1. Running requests first, in order: each gets ``min(pending, long_prefill_token_threshold, budget)`` tokens --
   one for a decode, a chunk for a prefill that is part-way. Blocks are allocated for exactly the tokens
   scheduled; when they do not fit, the last running request is preempted by recompute (its full blocks stay
   in the prefix cache) until they do, and a request that had to preempt itself ends the pass.
2. Then, unless this step preempted anything, waiting requests in queue order while budget and
   ``max_num_seqs`` allow: each starts from its longest cached prefix (``num_tokens - 1`` at most), takes a
   chunk of what is left, and is admitted only if its blocks fit. The first that does not fit ends the pass.

Where it differs from ``sarathi``: no watermark (V1 admits while blocks fit), prefill chunks of running
requests come in running order mixed with decodes rather than after every decode, a resumed request looks up
the prefix cache (its own blocks, if not yet evicted), and preemption stops the admission of new requests for
the step. vLLM's ``max_num_partial_prefills`` is a v0 option that V1 does not apply, so it is not modelled.
"""

from __future__ import annotations

from llmsim.request import RequestStatus
from llmsim.schedulers.base import PrefillChunk, Scheduler, SchedulerOutput


class VLLMV1Scheduler(Scheduler):
    config_fields = ("long_prefill_token_threshold",)
    supports_prefix_caching = True
    prefix_caching_by_default = True
    pads_every_step_to_graphs = True

    def __init__(self, blocks, *, long_prefill_token_threshold: int = 0, **kwargs):
        super().__init__(blocks, **kwargs)
        self.long_prefill_token_threshold = long_prefill_token_threshold

    def mixed_run_chunk(self, out: SchedulerOutput) -> int:
        # Running requests are scheduled in order and the prefill's chunk takes what the decodes left, so with
        # every running request in the batch the part-way prefill is the last of them.
        return self._run_chunk(out, self.max_num_batched_tokens)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        threshold = self.long_prefill_token_threshold
        num_decodes, max_decodes = 0, self.decode_share()
        blocks = self.blocks
        running = self.idle_running()
        if max_decodes == len(running) <= min(budget, blocks.num_free_blocks):
            # Fast path for the leading decodes (the common case: all of them): each takes one token and at
            # most one block, so none is preempted and the budget lasts; the loop below does the same slower.
            decodes, kv_tokens = out.decodes, 0
            for request in running:
                computed = request.num_computed_tokens
                if request.num_prompt_tokens + request.num_generated_tokens - computed != 1:
                    break  # num_pending_tokens, spelled out: this runs for every decode of every step
                decodes.append(request)
                kv_tokens += computed + 1
            blocks.append_slots(decodes)
            num_decodes = len(decodes)
            out.decode_kv_tokens = kv_tokens
            budget -= num_decodes
            running = running[num_decodes:]
        for request in running:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this pass
            pending = request.num_pending_tokens
            if pending == 1 and num_decodes == max_decodes:
                continue  # pipeline micro-batch: the rest of the decodes go to the next one
            n = min(pending, budget)
            if 0 < threshold < n:
                n = threshold
            if pending == 1 and blocks.num_free_blocks:
                blocks.append_slot(request)  # a decode needs at most one block: nobody is preempted
            elif not self._reserve(request, n, out):
                break  # it preempted itself: nothing else can run this step
            if pending == 1:
                out.decodes.append(request)
                out.decode_kv_tokens += request.num_computed_tokens + 1
                num_decodes += 1
            else:
                out.prefills.append(PrefillChunk(request, n, request.num_computed_tokens))
            budget -= n
        if out.preempted:
            return out
        while self.waiting and budget > 0 and self.has_seq_room():
            request = self.waiting[0]
            resumed_swap = request.num_computed_tokens > 0  # swapped-out KV comes back whole
            hit = self._hit(request)  # none for a swapped-out request
            computed = request.num_computed_tokens if resumed_swap else hit.num_tokens
            n = min(request.num_tokens - computed, budget)
            if 0 < threshold < n:
                n = threshold
            if resumed_swap:
                if not blocks.can_allocate(request, n):
                    break
                self._admit(request, n, out)
            else:
                if not self._admit_from(request, hit, n, out):
                    break
            budget -= n
        return out
