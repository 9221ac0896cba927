"""A scheduler with a non-FCFS admission order, to check that the scheduler contract carries it.

Shortest prompt first: the waiting queue is kept sorted by pending prompt tokens (ties in arrival order),
and admission and decoding are FCFS's (``fcfs.py``). The queue is the policy's own, so ``cuts_run``'s
default -- the new request is now at the head of the queue -- holds as it is: a request that sorts behind
the head cannot be admitted before the head, which did not fit.
"""

from __future__ import annotations

from bisect import insort

from llmsim.request import Request
from llmsim.schedulers.fcfs import FCFSScheduler


class ShortestPromptFirstScheduler(FCFSScheduler):
    def add(self, request: Request) -> None:
        # Preempted requests go back to the head (``_preempt``); arrivals sort in behind them by length.
        waiting = list(self.waiting)
        resumed = next((i for i, r in enumerate(waiting) if not r.num_preemptions), len(waiting))
        rest = waiting[resumed:]
        insort(rest, request, key=lambda r: r.num_pending_tokens)
        self.waiting.clear()
        self.waiting.extend(waiting[:resumed] + rest)
