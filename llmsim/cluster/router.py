"""Routers: pick the replica for each arriving request (policy only)."""

from __future__ import annotations

from llmsim.cluster.replica import Replica
from llmsim.request import Request


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastOutstanding:
    """Fewest routed-but-unfinished requests; ties go to the lowest replica id."""

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        return min(replicas, key=lambda r: (r.num_outstanding, r.id))


ROUTERS = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding}
