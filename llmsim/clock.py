"""A simpy environment that schedules events at exact absolute times.

simpy schedules at ``now + delay``, and that sum cannot always round to a wanted time. Replicas compute
iteration end times themselves (``t + dt``, accumulated the same way whether they step or fast-forward), so
they need events at exactly those times: ``at(t)`` puts an event on simpy's queue at ``t`` itself.
Arrivals use ``urgent_at``: a request arriving exactly at an iteration boundary is seen by that boundary.
This uses simpy's event queue layout (``(time, priority, id, event)``), stable across simpy 4.x.

``last_active_s`` is the time of the last event that had something to do (a client's deadline for a request that
had finished long before has nothing to: it had stretched a run's simulated span to the last deadline). A
fast-forwarded run waits on its last planned boundary; when something cuts it short, the process waits on an
earlier boundary instead, and the event it no longer waits on stays queued with no callbacks. Draining the queue
then moves ``now`` to that stale time, where a stepped replica's clock would have stopped earlier: the simulated
span is read from ``last_active_s``, which is the same either way.
"""

from __future__ import annotations

from heapq import heappop, heappush

import simpy
from simpy.core import NORMAL, URGENT, EmptySchedule, EventPriority, StopSimulation


class _Passive(simpy.Event):
    """An event whose callbacks may find nothing to do (a client's deadline for a request that finished long
    before): it moves ``last_active_s`` only where a callback calls ``mark_active``."""


class Clock(simpy.Environment):
    def __init__(self) -> None:
        super().__init__()
        self.last_active_s = self._now

    def step(self) -> None:
        """simpy's ``Environment.step``, which also notes the time of each event that has callbacks."""
        try:
            self._now, _, _, event = heappop(self._queue)
        except IndexError:
            raise EmptySchedule from None
        callbacks, event.callbacks = event.callbacks, None
        if callbacks and type(event) is not _Passive:
            self.last_active_s = self._now
        try:
            for callback in callbacks:
                callback(event)
        except StopSimulation:
            event.callbacks = callbacks[callbacks.index(callback) + 1:]
            self.schedule(event, EventPriority(-1))
            raise
        if not event._ok and not hasattr(event, "_defused"):
            exc = type(event._value)(*event._value.args)
            exc.__cause__ = event._value
            raise exc

    def run(self, until: float | None = None) -> None:
        """simpy's ``run``; a cut-off ``until`` counts as activity only where it stops something still going (an
        event with something to do is queued past it): one the work ended before changes no result, the simulated
        span included."""
        if until is None:
            return super().run()
        stop = self._at(float(until), URGENT, _Passive)  # before the steps ending at the cut-off, as simpy's is
        super().run(stop)
        if any(event.callbacks and type(event) is not _Passive for _, _, _, event in self._queue):
            self.last_active_s = self._now

    def _at(self, time_s: float, priority: int, kind: type = simpy.Event) -> simpy.Event:
        if time_s < self._now:
            raise ValueError(f"cannot schedule in the past: {time_s} < {self._now}")
        event = kind(self)
        event._ok = True
        event._value = None
        heappush(self._queue, (time_s, priority, next(self._eid), event))
        return event

    def at(self, time_s: float) -> simpy.Event:
        return self._at(time_s, NORMAL)

    def urgent_at(self, time_s: float) -> simpy.Event:
        return self._at(time_s, URGENT)

    def passive_at(self, time_s: float, urgent: bool = False) -> simpy.Event:
        """``at`` (``urgent_at``), for an event that counts as activity only where its callback says so
        (``mark_active``)."""
        return self._at(time_s, URGENT if urgent else NORMAL, _Passive)

    def mark_active(self) -> None:
        self.last_active_s = self._now
