"""Llumnix (Sun et al., OSDI'24): load-aware dispatch and live migration across colocated instances (policy).

An instance's load is its *freeness*: how many more decode steps its batch can run before the KV cache is
full, ``F = (M - V) / B`` with ``M`` its KV blocks, ``B`` its batch size and ``V`` its *virtual usage*, the
blocks really in use plus

- the head-of-line queued request's demand (de-fragmentation): an instance whose queue is blocked looks
  loaded, so requests migrate out of it until the queued one fits;
- a headroom while it serves a high-priority request (priorities): the instance looks loaded, so normal
  requests are dispatched elsewhere and migrate out, and the high-priority request runs in a lighter batch.

Dispatch sends each arrival to the instance of highest freeness, counting every queued request (so a burst
spreads). As in Llumnix, dispatch works from the load each instance last reported (every polling interval) plus
the requests the dispatcher itself sent there since (``dispatch_load: reported``); ``exact`` reads every
instance's instantaneous state instead. Every polling interval, instances below ``migrate_out_threshold`` are
paired, lowest first, with instances above ``migrate_in_threshold``, highest first, and each pair migrates one
request: the source's running request of lowest priority, shortest first (Llumnix's "SR"), as it is the cheapest
to move.
"""

from __future__ import annotations

from typing import Callable

import simpy

from llmsim.clock import Clock
from llmsim.cluster.migration import Migration, Migrator
from llmsim.cluster.network import Network
from llmsim.cluster.replica import Replica
from llmsim.config import LlumnixConfig
from llmsim.request import Request, RequestStatus


class Llumnix:
    def __init__(self, env: Clock, replicas: list[Replica], cfg: LlumnixConfig,
                 transfer: Callable[[Replica, Replica, int, Callable[[], None]], None]):
        self.env = env
        self.replicas = replicas
        self.cfg = cfg
        self.migrator: Migrator | None = None
        self._pairing: set[int] = set()  # replicas at either end of a migration under way
        self._poller_idle: simpy.Event | None = None
        self.reported = cfg.dispatch_load == "reported"
        # Per replica: (virtual usage, requests) as last reported, and what was dispatched there since.
        self._reports: dict[int, tuple[float, int]] = {rep.id: (0.0, 0) for rep in replicas}
        self._sent: dict[int, tuple[float, int]] = {rep.id: (0.0, 0) for rep in replicas}
        if cfg.migration:
            self.migrator = Migrator(env, transfer, max_stages=cfg.max_stages,
                                     last_stage_max_blocks=cfg.last_stage_max_blocks, on_end=self._ended)
        if cfg.migration or self.reported:
            env.process(self._poll())

    # --- load -------------------------------------------------------------------------------------------

    def virtual_usage(self, rep: Replica, queued: str) -> float:
        """Blocks in use plus the demand of queued requests (``queued``: "all", "head" or "none") plus the
        priority headroom."""
        usage: float = rep.num_used_blocks_now()
        waiting, blocks = rep.queued(), rep.blocks
        if queued == "all":
            usage += sum(blocks.num_new_blocks(r, r.num_pending_tokens) for r in waiting)
        elif queued == "head" and waiting:
            usage += blocks.num_new_blocks(waiting[0], waiting[0].num_pending_tokens)
        if self.cfg.priority_headroom and self._serves_high_priority(rep):
            usage += self.cfg.priority_headroom * blocks.num_blocks
        return usage

    def dispatch_freeness(self, rep: Replica) -> float:
        if self.reported:
            (usage, requests), (sent_blocks, sent) = self._reports[rep.id], self._sent[rep.id]
            return (rep.blocks.num_blocks - usage - sent_blocks) / max(requests + sent, 1)
        queued = len(rep.queued())
        return (rep.blocks.num_blocks - self.virtual_usage(rep, "all")) / max(len(rep.scheduler.running) + queued, 1)

    def report(self) -> None:
        """Every instance reports its load (what ``dispatch_freeness`` reads between reports)."""
        for rep in self.replicas:
            s = rep.scheduler
            self._reports[rep.id] = (self.virtual_usage(rep, "all"), len(s.running) + len(rep.queued()))
            self._sent[rep.id] = (0.0, 0)

    def migration_freeness(self, rep: Replica) -> float:
        usage = self.virtual_usage(rep, "head" if self.cfg.defrag else "none")
        return (rep.blocks.num_blocks - usage) / max(len(rep.scheduler.running), 1)

    @staticmethod
    def _serves_high_priority(rep: Replica) -> bool:
        s = rep.scheduler
        return any(r.priority > 0 for r in s.running) or any(r.priority > 0 for r in rep.queued())

    # --- dispatch (the router interface) -----------------------------------------------------------------

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        idle = self._poller_idle is not None and not self._poller_idle.triggered
        if self.reported and idle:
            # The reports an idle cluster sent meanwhile, read here at the arrival (an urgent event, before any
            # iteration boundary at this instant), so stepping and fast-forward see the same state.
            self.report()
        best = max(replicas, key=lambda rep: (self.dispatch_freeness(rep), -rep.id))
        if self.reported:  # the dispatcher knows what it sent: the prompt's blocks, one more request
            blocks, sent = self._sent[best.id]
            self._sent[best.id] = (blocks + best.blocks.blocks_for(request.num_pending_tokens), sent + 1)
        if idle:  # wake the poller: the cluster has work again
            self._poller_idle.succeed()
        return best

    # --- migration ---------------------------------------------------------------------------------------

    def _poll(self):
        env, interval = self.env, self.cfg.polling_interval_s
        while True:
            if not self._busy():  # sleep through idle spells instead of polling them
                self._poller_idle = env.event()
                yield self._poller_idle
                self._poller_idle = None
            # Urgent: a poll at an iteration boundary sees the state before that boundary, in stepping and in
            # fast-forward alike. Passive: the poll after the cluster's last work has nothing to act on, and does
            # not stretch the simulated span (as a migration that can never start would have).
            yield env.passive_at(env.now + interval, urgent=True)
            if self._busy():
                env.mark_active()
            if self.reported:
                self.report()
            if self.migrator is not None:
                self.pair_and_migrate()

    def _busy(self) -> bool:
        active = self.migrator is not None and bool(self.migrator.active)
        return active or any(rep.scheduler.has_work for rep in self.replicas)

    def pair_and_migrate(self) -> list[Migration]:
        cfg = self.cfg
        loads = [(self.migration_freeness(rep), rep.id, rep) for rep in self.replicas if rep.id not in self._pairing]
        sources = sorted((x for x in loads if x[0] < cfg.migrate_out_threshold), key=lambda x: x[:2])
        dests = sorted((x for x in loads if x[0] > cfg.migrate_in_threshold), key=lambda x: (-x[0], x[1]))
        started = []
        for (_, _, src), (_, _, dst) in zip(sources, dests):
            request = self.pick_request(src)
            if request is None or not self._fits(request, src, dst):
                continue
            self._pairing |= {src.id, dst.id}
            started.append(self.migrator.start(request, src, dst))
        return started

    @staticmethod
    def pick_request(src: Replica) -> Request | None:
        """The source's decoding request of lowest priority, shortest first."""
        candidates = [r for r in src.scheduler.running
                      if r.status is RequestStatus.RUNNING and src.is_decoding_now(r)]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.priority, src.num_computed_now(r), r.id))

    @staticmethod
    def _fits(request: Request, src: Replica, dst: Replica) -> bool:
        """The destination has room for the request's KV now (the handshake would refuse it otherwise)."""
        return dst.has_room_for(dst.blocks.blocks_for(src.num_computed_now(request)))

    def _ended(self, m: Migration) -> None:
        self._pairing -= {m.src.id, m.dst.id}


def migration_transfer(gpus_per_node: int, gpus_per_replica: int, link: str, network: Network
                       ) -> Callable[[Replica, Replica, int, Callable[[], None]], None]:
    """A KV copy between two replicas over the network model (``cluster.network``: concurrent copies share the
    replicas' links); the action runs when it lands. Replicas sit on nodes in id order, so with ``link: auto``
    replicas on one node copy over NVLink-class links, others over the inter-node network."""

    def node(rep: Replica) -> int:
        return rep.id * gpus_per_replica // gpus_per_node

    def transfer(src: Replica, dst: Replica, num_tokens: int, on_landed: Callable[[], None]) -> None:
        if link == "auto":
            inter_node = gpus_per_replica > gpus_per_node or node(src) != node(dst)
        else:
            inter_node = link == "inter_node"
        # Urgent, like arrivals: a copy landing exactly at an iteration boundary is seen by that boundary.
        network.copy_kv(src, dst, num_tokens, inter_node, on_landed, urgent=True)

    return transfer
