"""Exact absolute-time events on a simpy clock.

simpy schedules an event at ``now + delay``. Replicas compute iteration end times themselves (``t + dt``,
accumulated the same way whether they step or fast-forward), so they need an event at an exact absolute
time; ``at()`` finds the delay whose sum with ``now`` rounds to that time. Arrivals are scheduled URGENT so
that a request arriving exactly at an iteration boundary is always seen by that boundary.
"""

from __future__ import annotations

import math

import simpy
from simpy.core import URGENT


def at(env: simpy.Environment, time_s: float) -> simpy.Timeout:
    delay = time_s - env.now
    if delay < 0:
        raise ValueError(f"cannot schedule in the past: {time_s} < {env.now}")
    while env.now + delay < time_s:
        delay = math.nextafter(delay, math.inf)
    while env.now + delay > time_s and delay > 0:
        delay = math.nextafter(delay, -math.inf)
    return env.timeout(delay)


class UrgentAt(simpy.Event):
    """An event that fires at ``now + delay`` ahead of ordinary events at the same time."""

    def __init__(self, env: simpy.Environment, delay: float):
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, URGENT, delay)
