"""Live migration of a running request between two replicas (mechanism; Llumnix's policy picks who and where).

Llumnix's protocol, stage by stage, each step taken at an iteration boundary of the source, where the request's
progress is exact::

    stage 1: reserve blocks on the destination, copy all KV computed so far   (request keeps decoding)
    stage k: copy the blocks written during stage k-1                        (request keeps decoding)
    last:    once at most ``last_stage_max_blocks`` are left uncopied: take the request out of the batch,
             copy the rest (the downtime), and hand it to the destination, which decodes it from then on

A copy of ``n`` tokens crosses the network model (``transfer``, over ``cluster.network``). The migration is
dropped, and the destination's reservation freed, when the request finishes or is preempted on the source
meanwhile, when the destination runs out of KV, or when ``max_stages`` pass without the remainder getting small
enough.

What happens on the destination -- reserving blocks, freeing them, taking the request into its batch -- is done
by the destination between two of its iterations (``Replica.post``), as an instance's engine loop handles such
requests; so its KV cache changes only at its own iteration boundaries, where fast-forward and stepping agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from llmsim.clock import Clock
from llmsim.cluster.replica import Replica, record_timed_out
from llmsim.request import Request, RequestStatus


@dataclass(eq=False)
class Migration:
    request: Request
    src: Replica
    dst: Replica
    num_preemptions: int  # the request's count at the start: a preemption since then drops the migration
    num_stages: int = 0
    copied_tokens: int = 0  # KV tokens already on the destination
    released_s: float = 0.0  # when the request left the source's batch (its downtime starts)


@dataclass
class MigrationStats:
    started: int = 0
    committed: int = 0
    aborted: dict[str, int] = field(default_factory=dict)  # by reason
    copied_tokens: int = 0
    downtime_s: float = 0.0  # summed over committed migrations

    def summary(self) -> dict:
        """The ``migration`` section of summary.json."""
        return {"started": self.started, "committed": self.committed, "aborted": dict(sorted(self.aborted.items())),
                "copied_tokens": self.copied_tokens,
                "mean_downtime_s": self.downtime_s / self.committed if self.committed else None}


def migration_line(m: dict) -> str:
    """The summary table's line for a ``migration`` section."""
    aborted = sum(m["aborted"].values())
    downtime = f", mean downtime {m['mean_downtime_s'] * 1e3:.2f} ms" if m["mean_downtime_s"] is not None else ""
    return f"migrations: {m['committed']} committed, {aborted} dropped, {m['copied_tokens']} KV tokens copied{downtime}"


class Migrator:
    def __init__(self, env: Clock, transfer: Callable[[Replica, Replica, int, Callable[[], None]], None], *,
                 max_stages: int, last_stage_max_blocks: int, on_end: Callable[[Migration], None] | None = None):
        self.env = env
        self.transfer = transfer  # (source, destination, tokens, action when the copy lands)
        self.max_stages = max_stages
        self.last_stage_max_blocks = last_stage_max_blocks
        self.on_end = on_end
        self.active: dict[int, Migration] = {}  # by request id
        self.stats = MigrationStats()

    def start(self, request: Request, src: Replica, dst: Replica) -> Migration:
        m = Migration(request, src, dst, request.num_preemptions)
        self.active[request.id] = m
        self.stats.started += 1
        dst.scheduler.reserve_seq()
        src.post(lambda: self._stage(m))
        return m

    def in_flight(self) -> list[Request]:
        """Requests between replicas (in their stop-and-copy)."""
        return [m.request for m in self.active.values() if m.request.status is RequestStatus.MIGRATING]

    def _stage(self, m: Migration) -> None:
        r, src, dst = m.request, m.src, m.dst
        if (r.status is not RequestStatus.RUNNING or r.replica_id != src.id or r.num_pending_tokens != 1
                or r.num_preemptions != m.num_preemptions):
            return self._abort(m, "finished or preempted on the source")
        block_size = dst.blocks.block_size
        copied_blocks = m.copied_tokens // block_size  # whole blocks on the destination; a partial one is resent
        uncopied_tokens = r.num_computed_tokens - copied_blocks * block_size
        need = dst.blocks.blocks_for(r.num_computed_tokens) - dst.blocks.num_held(r)
        if not dst.has_room_for(need):
            return self._abort(m, "destination out of KV blocks")
        last = dst.blocks.blocks_for(uncopied_tokens) <= self.last_stage_max_blocks
        if not last and m.num_stages >= self.max_stages:
            return self._abort(m, "did not converge within max_stages")
        tokens = r.num_computed_tokens
        dst.post(lambda: self._reserve(m, tokens))
        self.stats.copied_tokens += uncopied_tokens
        m.copied_tokens = r.num_computed_tokens
        if last:
            src.release(r)
            r.status = RequestStatus.MIGRATING
            m.released_s = self.env.now
            self.transfer(src, dst, uncopied_tokens, lambda: self._commit(m))
        else:
            m.num_stages += 1
            self.transfer(src, dst, uncopied_tokens, lambda: src.post(lambda: self._stage(m)))

    def _reserve(self, m: Migration, tokens: int) -> None:
        """On the destination, at its boundary: hold blocks for ``tokens`` of the request's KV. The room was
        checked at the source's boundary with the destination's KV use as stepping shows it; until this
        boundary the destination allocates nothing (its in-flight step's slots were already counted), so it
        fits."""
        if self.active.get(m.request.id) is not m:
            return  # dropped meanwhile (its drop is queued after this action)
        dst = m.dst
        dst.scheduler.reserve_blocks(m.request, dst.blocks.blocks_for(tokens) - dst.blocks.num_held(m.request))

    def _commit(self, m: Migration) -> None:
        """The last copy landed: the destination takes the request at its next boundary."""
        m.dst.post(lambda: self._adopt(m))

    def give_up(self, request: Request, reason: str) -> bool:
        """The client gave up on ``request``: if it is in its stop-and-copy (out of every batch, its last KV on
        the wire), it leaves now and the destination's reservation comes back when the copy lands; returns
        whether it was. A request still on a replica is aborted there, and its migration is dropped at its next
        stage."""
        m = self.active.get(request.id)
        if m is None or request.status is not RequestStatus.MIGRATING:
            return False
        record_timed_out(m.src.recorder, request, reason)  # it left the source's count at its release
        return True

    def _adopt(self, m: Migration) -> None:
        if m.request.status is RequestStatus.TIMED_OUT:  # its client gave up during the stop-and-copy
            m.dst.scheduler.drop_reservation(m.request)  # at the destination's boundary already
            reason = "client gave up during the stop-and-copy"
            self.stats.aborted[reason] = self.stats.aborted.get(reason, 0) + 1
            return self._end(m)
        m.request.num_migrations += 1
        m.dst.adopt(m.request)
        self.stats.committed += 1
        self.stats.downtime_s += self.env.now - m.released_s  # out of every batch: the copy and the wait
        self._end(m)

    def _abort(self, m: Migration, reason: str) -> None:
        m.dst.post(lambda: m.dst.scheduler.drop_reservation(m.request))
        self.stats.aborted[reason] = self.stats.aborted.get(reason, 0) + 1
        self._end(m)

    def _end(self, m: Migration) -> None:
        del self.active[m.request.id]
        if self.on_end is not None:
            self.on_end(m)
