"""KV copies between instances over shared links (mechanism; DistServe's hand-offs, Llumnix's migrations).

Every GPU has its own link of the network model's bandwidth (NVLink-class inside a node, the NIC across nodes),
so an instance of ``G`` GPUs sends and receives at ``G x bandwidth`` at most, and one copy between two instances
moves at most ``min(G_src, G_dst) x bandwidth`` (its GPU pairs move their shards in parallel). Copies that
overlap in time share those capacities max-min fairly (progressive filling: the most contended link sets the
rate of every copy on it, the capacity they leave goes to the others), recomputed whenever a copy starts or
finishes. A copy's bytes drain at its rate and it lands the link's latency after its last byte. A copy alone on
its links takes ``latency + bytes / (min(G_src, G_dst) x bandwidth)``; inside a node and across nodes are
separate links.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from llmsim.clock import Clock

if TYPE_CHECKING:
    from llmsim.cluster.replica import Replica


@dataclass(eq=False)
class Copy:
    num_bytes: float
    remaining_bytes: float
    links: tuple  # the shared links it crosses: the source's egress and the destination's ingress
    max_rate: float  # bytes/s its GPU pairs move alone
    latency_s: float
    on_landed: Callable[[], None]
    urgent: bool  # lands as an urgent event (seen by an iteration boundary at the same instant)
    rate: float = 0.0  # bytes/s while the current set of copies holds
    shared: bool = False  # it has moved slower than alone at some point (another copy shared a link)


@dataclass
class LinkStats:
    copies: int = 0
    bytes: float = 0.0
    max_concurrent: int = 0
    copies_slowed: int = 0  # copies that moved slower than alone at some point

    def summary(self) -> dict:
        return {"copies": self.copies, "bytes": self.bytes, "max_concurrent": self.max_concurrent,
                "copies_slowed": self.copies_slowed}


# A copy whose bytes left are this small a share of its size has drained (what is left is rounding).
_DRAINED = 1e-9


class Network:
    def __init__(self, env: Clock):
        self.env = env
        self.capacity: dict[tuple, float] = {}  # link -> bytes/s
        self.active: list[Copy] = []  # in start order
        self._updated_s = 0.0
        self._generation = 0  # a wake-up of an older generation finds the copies changed and does nothing
        self.stats = LinkStats()

    def copy(self, src: tuple[int, int], dst: tuple[int, int], num_bytes: float, bandwidth: float,
             latency_s: float, kind: str, on_landed: Callable[[], None], urgent: bool = False) -> None:
        """Copy ``num_bytes`` from instance ``src`` to ``dst`` (each ``(id, GPUs)``) over links of ``kind``
        (``intra_node`` or ``inter_node``) of ``bandwidth`` bytes/s per GPU; ``on_landed`` runs when it lands."""
        (src_id, src_gpus), (dst_id, dst_gpus) = src, dst
        links = (("out", kind, src_id), ("in", kind, dst_id))
        self.capacity.setdefault(links[0], bandwidth * src_gpus)
        self.capacity.setdefault(links[1], bandwidth * dst_gpus)
        c = Copy(num_bytes, num_bytes, links, bandwidth * min(src_gpus, dst_gpus), latency_s, on_landed, urgent)
        self.stats.copies += 1
        self.stats.bytes += num_bytes
        if num_bytes <= 0:
            self._land(c)
            return
        self._drain_to(self.env.now)
        self.active.append(c)
        self.stats.max_concurrent = max(self.stats.max_concurrent, len(self.active))
        self._reschedule()

    def copy_kv(self, src: Replica, dst: Replica, num_tokens: int, inter_node: bool,
                on_landed: Callable[[], None], urgent: bool = False) -> None:
        """Copy ``num_tokens`` tokens of KV cache from instance ``src`` to ``dst`` over the link a KV copy from
        ``src`` crosses (``ExecutionModel.kv_link``: inside a node, or across nodes with ``inter_node``)."""
        ex = src.execution
        bandwidth, latency_s = ex.kv_link(inter_node)
        self.copy((src.id, ex.plan.num_gpus), (dst.id, dst.execution.plan.num_gpus),
                  num_tokens * ex.model.kv_bytes_per_token(), bandwidth, latency_s,
                  "inter_node" if inter_node else "intra_node", on_landed, urgent)

    def _drain_to(self, now: float) -> None:
        elapsed = now - self._updated_s
        if elapsed > 0:
            for c in self.active:
                c.remaining_bytes -= c.rate * elapsed
        self._updated_s = now

    def _reschedule(self) -> None:
        """Max-min fair rates for the copies in flight, and a wake-up when the first of them drains."""
        self._generation += 1
        if not self.active:
            return
        self._fair_rates()
        first = min(self.active, key=lambda c: c.remaining_bytes / c.rate)
        at = self.env.now + max(0.0, first.remaining_bytes) / first.rate
        self.env.process(self._wake(self._generation, first, at))

    def _fair_rates(self) -> None:
        """Progressive filling: the link (or a copy's own limit) whose capacity left, shared by its copies not yet
        set, gives each the least sets their rates; its copies' use comes off every other link they cross."""
        left: dict = {}
        users: dict = {}
        for c in self.active:
            for key, capacity in ((c, c.max_rate),) + tuple((k, self.capacity[k]) for k in c.links):
                if key not in left:
                    left[key] = capacity
                    users[key] = []
                users[key].append(c)
        unset = set(self.active)
        while unset:
            share, key = min(((left[k] / n, k) for k, cs in users.items()
                              if (n := sum(1 for c in cs if c in unset))), key=lambda x: x[0])
            for c in users[key]:
                if c in unset:
                    c.rate = share
                    unset.discard(c)
                    for k in (c,) + c.links:
                        left[k] -= share
        for c in self.active:
            if not c.shared and c.rate < c.max_rate * (1.0 - 1e-12):
                c.shared = True
                self.stats.copies_slowed += 1

    def _wake(self, generation: int, first: Copy, at: float):
        yield self.env.at(at)
        if generation != self._generation:
            return  # a copy started or landed since: rates and the wake-up were recomputed
        self._drain_to(self.env.now)
        drained = [c for c in self.active if c is first or c.remaining_bytes <= _DRAINED * c.num_bytes]
        self.active = [c for c in self.active if c not in drained]
        for c in drained:
            self._land(c)
        self._reschedule()

    def _land(self, c: Copy) -> None:
        self.env.process(self._landing(c, self.env.now + c.latency_s))

    def _landing(self, c: Copy, at: float):
        yield (self.env.urgent_at(at) if c.urgent else self.env.at(at))
        c.on_landed()
