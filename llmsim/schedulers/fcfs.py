"""FCFS continuous batching in the style of vLLM (v0) and Orca: prefill-prioritised, no chunking.

Each step first admits waiting requests in arrival order while their whole pending prompt fits the token
budget, the sequence limit and the KV cache (above the watermark); a step with any prefill runs prefills
only. Otherwise every running request decodes one token, evicting the latest-admitted request when the KV
cache is full (recompute, or swap to host memory).

With ``enable_prefix_caching`` (vLLM v0's automatic prefix caching, off by default there and here) a request
that holds no KV -- a new one, or one preempted by recompute -- takes its longest cached prefix as computed when
admitted and prefills the rest (the KV cache's ``lookup`` / ``allocate_slots``, as vLLM V1 does too); the token
budget counts only the tokens it prefills.
"""

from __future__ import annotations

from llmsim.request import Request
from llmsim.schedulers.base import Scheduler, SchedulerOutput


class FCFSScheduler(Scheduler):
    supports_prefix_caching = True

    def may_drop_started(self, max_model_len: int) -> bool:
        # A request preempted by recompute whose prompt and output outgrew the step budget (``schedule``).
        return self.preemption == "recompute" and self.max_num_batched_tokens < max_model_len

    def rejection_reason(self, request: Request) -> str:
        # A prompt runs in one step, within the token budget.
        if request.num_prompt_tokens > self.max_num_batched_tokens:
            return f"prompt of {request.num_prompt_tokens} tokens exceeds max_num_batched_tokens"
        return ""

    def _first_chunk(self, request: Request, budget: int) -> int:
        """Tokens to admit of a head whose prefill exceeds the ``budget`` left: none (it waits; a policy that
        prefills in chunks says how much)."""
        return 0

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        while self.waiting:
            request = self.waiting[0]
            if (not request.num_computed_tokens and request.num_tokens > self.max_num_batched_tokens
                    and not self._first_chunk(request, self.max_num_batched_tokens)):
                # Preempted by recompute, its prompt and the tokens it generated no longer fit one step (a
                # prompt that never did is rejected at arrival). vLLM v0 drops it (``_schedule_prefills``: more
                # tokens than the prompt limit, cached or not, is FINISHED_IGNORED); it had waited at the head of
                # the queue for ever, and the engine stopped with work queued.
                self._ignore(request, f"preempted by recompute after {request.num_generated_tokens} output tokens: "
                                      f"its {request.num_tokens} tokens exceed max_num_batched_tokens "
                                      f"{self.max_num_batched_tokens} (vLLM v0 drops it, FINISHED_IGNORED)")
                continue
            if not self.has_seq_room():
                break
            hit = self._hit(request)  # looked up once: nothing changes the cache until it is admitted
            n = request.num_pending_tokens - hit.num_tokens  # all it has pending, less its cached prefix
            take = n if n <= budget else self._first_chunk(request, budget)
            if not take or not self._can_admit(request, n, hit):
                break
            self._admit(request, take, out, reserve_tokens=n, hit=hit)
            budget -= take
        if out.prefills:
            return out
        self._schedule_decodes(self.idle_running()[:self.decode_share()], out)
        return out
