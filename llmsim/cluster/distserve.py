"""DistServe (Zhong et al., OSDI'24): prefill and decode on separate instance pools (cluster policy).

Arrivals are routed to a prefill instance. Once a request's prompt is computed and its first token sampled it
leaves the prefill instance with its KV (the prefill side frees its copy: transfers in flight hold no prefill
memory), the KV crosses the link (``ExecutionModel.kv_transfer_s``), and a decode instance chosen by the
cluster's router takes it: its ``DecodeScheduler`` holds blocks for the handed-over tokens and decodes it.
"""

from __future__ import annotations

from llmsim.clock import Clock
from llmsim.cluster.replica import Replica
from llmsim.request import Request, RequestStatus


class DistServe:
    def __init__(self, env: Clock, router, inter_node: bool):
        self.env = env
        self.router = router  # picks a decode instance for each handed-over request
        self.inter_node = inter_node
        self.decode_replicas: list[Replica] = []
        self.in_transfer: dict[int, Request] = {}  # KV on the wire, by request id

    def on_prefilled(self, replica: Replica, requests: list[Request]) -> None:
        """A prefill instance applied a batch (its requests): those whose prompt is done move on
        (``Replica.on_prefilled``)."""
        # Done: the whole prompt computed and its first token sampled (a chunk that leaves one prompt token
        # also leaves one pending token; that token is computed here, and samples the first token, next step).
        moved = [r for r in requests
                 if r.status is RequestStatus.RUNNING and r.num_generated_tokens and r.num_pending_tokens == 1]
        for r in moved:
            replica.release(r)
            r.status = RequestStatus.WAITING
            self.in_transfer[r.id] = r
            dst_gpus = self.decode_replicas[0].execution.plan.num_gpus
            delay = replica.execution.kv_transfer_s(r.num_computed_tokens, self.inter_node, dst_gpus)
            self.env.process(self._deliver(r, self.env.now + delay))

    def _deliver(self, r: Request, at: float):
        yield self.env.at(at)
        del self.in_transfer[r.id]
        self.router.pick(r, self.decode_replicas).submit(r)

    def in_flight(self) -> list[Request]:
        return list(self.in_transfer.values())
