"""The scheduler of a DistServe decode instance: requests arrive with their prompt's KV already computed (handed
over from a prefill instance) and join the running decode batch in arrival order as soon as the KV cache (above
the watermark) and the sequence limit allow. A request preempted here by recompute re-runs its prefill here,
FCFS-style (a step with a prefill runs prefills only).
"""

from __future__ import annotations

from llmsim.request import RequestStatus
from llmsim.schedulers.base import Scheduler, SchedulerOutput


class DecodeScheduler(Scheduler):
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = request.num_pending_tokens
            if n > budget or not self.blocks.can_admit(request, n):
                break
            if n == 1 and request.status is RequestStatus.WAITING:
                # Handed-over KV: hold blocks for the computed tokens; its decode slot is added below.
                self.blocks.allocate(request, 0)
                self.waiting.popleft()
                request.status = RequestStatus.RUNNING
                self.running.append(request)
            else:
                self._admit(request, n, out)
            budget -= n
        if out.prefills:
            return out
        self._schedule_decodes(list(self.running), out)
        return out
