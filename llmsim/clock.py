"""A simpy environment that schedules events at exact absolute times.

simpy schedules at ``now + delay``, and that sum cannot always round to a wanted time. Replicas compute
iteration end times themselves (``t + dt``, accumulated the same way whether they step or fast-forward), so
they need events at exactly those times: ``at(t)`` puts an event on simpy's queue at ``t`` itself.
Arrivals use ``urgent_at``: a request arriving exactly at an iteration boundary is seen by that boundary.
This uses simpy's event queue layout (``(time, priority, id, event)``), stable across simpy 4.x.
"""

from __future__ import annotations

from heapq import heappush

import simpy
from simpy.core import NORMAL, URGENT


class Clock(simpy.Environment):
    def _at(self, time_s: float, priority: int) -> simpy.Event:
        if time_s < self._now:
            raise ValueError(f"cannot schedule in the past: {time_s} < {self._now}")
        event = simpy.Event(self)
        event._ok = True
        event._value = None
        heappush(self._queue, (time_s, priority, next(self._eid), event))
        return event

    def at(self, time_s: float) -> simpy.Event:
        return self._at(time_s, NORMAL)

    def urgent_at(self, time_s: float) -> simpy.Event:
        return self._at(time_s, URGENT)
