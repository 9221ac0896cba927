"""DistServe (Zhong et al., OSDI'24): prefill and decode on separate instance pools (cluster policy).

Arrivals are routed to a prefill instance. Once a request's prompt is computed and its first token sampled it
leaves the prefill batch, and the cluster's router sends it to a decode instance. Its KV stays on the prefill
instance (parked: it holds the prefill instance's memory) until the decode instance pulls it, as DistServe does
so that a busy decode pool pushes back on the prefill pool instead of overflowing: the decode instance's
``DecodeScheduler`` admits it when its KV cache and batch have room, holds blocks for it, and the KV crosses the
link (``cluster.network``: concurrent copies share the instances' links; only the blocks not already cached on
the decode instance). When the copy lands the request joins the decode batch and the prefill instance frees its
copy, both at their next iteration boundary.

A client that gives up (``simulation.client_timeout_s``) is followed to wherever its request is at that
instance's next boundary: queued or running on either instance, it leaves as on a colocated replica; waiting on a
decode instance with its KV parked, the prefill instance frees that KV too; with its KV on the wire, it leaves at
once and the copy's blocks come back on both instances when the copy lands (the bytes already in flight are not
recalled).
"""

from __future__ import annotations

from llmsim.clock import Clock
from llmsim.cluster.network import Network
from llmsim.cluster.replica import Replica
from llmsim.request import DONE, Request, RequestStatus


class DistServe:
    def __init__(self, env: Clock, router, inter_node: bool, network: Network):
        self.env = env
        self.router = router  # picks a decode instance for each handed-over request
        self.inter_node = inter_node
        self.network = network
        self.decode_replicas: list[Replica] = []
        self.parked_on: dict[int, Replica] = {}  # request id -> the prefill instance holding its KV
        self.in_transfer: dict[int, Request] = {}  # KV on the wire, by request id

    def connect(self, replicas: list[Replica], decode_replicas: list[Replica]) -> None:
        self.replicas = replicas  # every instance, by id
        self.decode_replicas = decode_replicas
        for rep in decode_replicas:
            rep.scheduler.on_pull = lambda r, cached, rep=rep: self._pull(rep, r, cached)

    def on_prefilled(self, replica: Replica, requests: list[Request]) -> None:
        """A prefill instance applied a batch (its requests): those whose prompt is done move on
        (``Replica.on_prefilled``)."""
        # Done: the whole prompt computed and its first token sampled (a chunk that leaves one prompt token
        # also leaves one pending token; that token is computed here, and samples the first token, next step).
        moved = [r for r in requests
                 if r.status is RequestStatus.RUNNING and r.num_generated_tokens and r.num_pending_tokens == 1]
        for r in moved:
            replica.park(r)
            r.status = RequestStatus.WAITING
            self.parked_on[r.id] = replica
            self.router.pick(r, self.decode_replicas).submit(r)

    def _pull(self, decode: Replica, r: Request, cached_tokens: int) -> None:
        """The decode instance admitted ``r`` (blocks and a batch slot held): copy the KV it lacks."""
        prefill = self.parked_on.pop(r.id)
        self.in_transfer[r.id] = r
        self.network.copy_kv(prefill, decode, r.num_computed_tokens - cached_tokens, self.inter_node,
                             lambda: self._landed(prefill, decode, r))

    def _landed(self, prefill: Replica, decode: Replica, r: Request) -> None:
        if self.in_transfer.pop(r.id, None) is None:  # the client gave up meanwhile: its blocks come back
            decode.post(lambda: decode.scheduler.drop_reservation(r))
        else:
            decode.post(lambda: decode.scheduler.adopt(r))
        prefill.post(lambda: prefill.drop_parked(r))

    def abort(self, r: Request, reason: str) -> None:
        """The client gave up on ``r``: at the next boundary of the instance it is on, it leaves."""
        rep = self.replicas[r.replica_id]

        def act() -> None:
            if r.status in DONE:
                return
            if r.replica_id != rep.id:  # handed over since: follow it
                self.abort(r, reason)
                return
            if self.in_transfer.pop(r.id, None) is not None:  # its KV on the wire (``_landed`` cleans up)
                rep.abandon(r, reason)
                return
            if r.status is RequestStatus.MIGRATING:  # landed, joining the batch at this boundary: then
                rep.post(act)
                return
            rep.abort(r, reason)
            prefill = self.parked_on.pop(r.id, None)
            if prefill is not None:  # it waited here with its KV parked on the prefill instance
                prefill.post(lambda: prefill.drop_parked(r))

        rep.post(act)

    def in_flight(self) -> list[Request]:
        return list(self.in_transfer.values())
