"""FCFS continuous batching in the style of vLLM (v0) and Orca: prefill-prioritised, no chunking.

Each step first admits waiting requests in arrival order while their whole pending prompt fits the token
budget, the sequence limit and the KV cache (above the watermark); a step with any prefill runs prefills
only. Otherwise every running request decodes one token, evicting the latest-admitted request when the KV
cache is full (recompute, or swap to host memory).
"""

from __future__ import annotations

from llmsim.request import Request
from llmsim.schedulers.base import Scheduler, SchedulerOutput


class FCFSScheduler(Scheduler):
    def rejection_reason(self, request: Request) -> str:
        # A prompt runs in one step, within the token budget.
        if request.num_prompt_tokens > self.max_num_batched_tokens:
            return f"prompt of {request.num_prompt_tokens} tokens exceeds max_num_batched_tokens"
        return ""

    def _can_admit(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks.can_admit(request, num_new_tokens)

    def _new_tokens(self, request: Request) -> int:
        """The tokens admitting the head of the queue prefills (all it has pending: no prefix cache here)."""
        return request.num_pending_tokens

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        while self.waiting and self.has_seq_room():
            request = self.waiting[0]
            n = self._new_tokens(request)
            if n > budget or not self._can_admit(request, n):
                break
            self._admit(request, n, out)
            budget -= n
        if out.prefills:
            return out
        self._schedule_decodes(self.idle_running()[:self.decode_share()], out)
        return out
