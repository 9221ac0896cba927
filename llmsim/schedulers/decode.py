"""The scheduler of a DistServe decode instance: requests arrive with their prompt's KV already computed (handed
over from a prefill instance) and join the running decode batch in arrival order as soon as the KV cache (above
the watermark) and the sequence limit allow. A request preempted here by recompute re-runs its prefill here,
FCFS-style (a step with a prefill runs prefills only).
"""

from __future__ import annotations

from llmsim.request import RequestStatus
from llmsim.schedulers.base import SchedulerOutput
from llmsim.schedulers.fcfs import FCFSScheduler


class DecodeScheduler(FCFSScheduler):
    """FCFS admission and decoding; only what admitting a handed-over request means differs."""

    def _admit(self, request, num_new_tokens: int, out: SchedulerOutput) -> None:
        if num_new_tokens == 1 and request.status is RequestStatus.WAITING:
            # Handed-over KV: hold blocks for the computed tokens; FCFS's decode pass adds its slot this step.
            self.blocks.allocate(request, 0)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            return
        super()._admit(request, num_new_tokens, out)
