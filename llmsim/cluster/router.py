"""Routers: pick the replica for each arriving request (policy only)."""

from __future__ import annotations

from collections import deque

from llmsim.cluster.replica import Replica
from llmsim.kv_cache import match_chain, request_block_hashes
from llmsim.request import Request


class RoundRobin:
    def __init__(self, cfg=None) -> None:
        self._next = 0

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastOutstanding:
    """Fewest routed-but-unfinished requests (the router's own count); ties go to the lowest replica id."""

    def __init__(self, cfg=None) -> None:
        pass

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        return min(replicas, key=lambda r: (r.num_outstanding, r.id))


class PrefixAware:
    """SGLang's cache-aware router. The router keeps, per replica, the block hashes of the prompts it sent
    there (an approximation of that replica's prefix cache, bounded by its KV blocks, least recently routed
    dropped first, a prompt's last blocks before its first; it never reads the replica's cache). While loads
    are balanced it sends a request to the replica holding the longest part of its prompt when that part is
    more than ``cache_threshold`` of the prompt's tokens (SGLang's match rate), else to the least loaded; when
    the loads drift apart (the busiest has more than ``balance_abs_threshold`` requests above the idlest and
    more than ``balance_rel_threshold`` times as many), to the least loaded."""

    def __init__(self, cfg) -> None:
        p = cfg.prefix_aware
        self.cache_threshold = p.cache_threshold
        self.balance_abs = p.balance_abs_threshold
        self.balance_rel = p.balance_rel_threshold
        self._memories: dict[int, _Memory] = {}  # per replica

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        least = min(replicas, key=lambda r: (r.num_outstanding, r.id))
        busiest = max(r.num_outstanding for r in replicas)
        block_size = replicas[0].blocks.block_size
        # The prompt's named blocks: a turn's own answer is named too (the next turn's prompt resends it), but a
        # router sees the prompt only.
        hashes = request_block_hashes(request, block_size)[:request.num_prompt_tokens // block_size]
        imbalanced = (busiest - least.num_outstanding > self.balance_abs
                      and busiest > least.num_outstanding * self.balance_rel)
        choice = least
        found = {}  # replica id -> (how many of the prompt's first blocks its memory holds, where they lie)
        if hashes and not imbalanced:
            best, matched = least, -1
            for rep in replicas:
                found[rep.id] = self._memory(rep).find(hashes)
                n = found[rep.id][0]
                if n > matched or (n == matched and (rep.num_outstanding, rep.id) < (best.num_outstanding, best.id)):
                    best, matched = rep, n
            # SGLang's match rate: the matched part over the whole prompt (tokens past the named content never
            # match), and the match followed only above the threshold.
            if matched * block_size / request.num_prompt_tokens > self.cache_threshold:
                choice = best
        if hashes:
            memory = self._memory(choice)
            where = found.get(choice.id)
            if where is None:  # loads apart: no replica was looked at
                where = memory.find(hashes)
            memory.remember(hashes, where[1], choice.blocks.num_blocks)
        return choice

    def _memory(self, replica: Replica) -> _Memory:
        memory = self._memories.get(replica.id)
        if memory is None:
            memory = self._memories[replica.id] = _Memory()
        return memory

    def _known(self, replica: Replica, hashes: tuple[int, ...]) -> int:
        """How many of the prompt's first blocks the replica's memory holds."""
        memory = self._memories.get(replica.id)
        return memory.find(hashes)[0] if memory is not None else 0

    def memory_blocks(self, replica_id: int) -> list[int]:
        """The block hashes the router remembers of a replica, least recent first (for checks and tests)."""
        memory = self._memories.get(replica_id)
        return memory.blocks() if memory is not None else []


class _Routed:
    """What a replica's memory still holds of one routed prompt: positions ``start .. end - 1`` of its hash chain,
    recent in reverse (its last block least recent, its first the most)."""

    __slots__ = ("chain", "start", "end")

    def __init__(self, chain: tuple[int, ...], start: int, end: int):
        self.chain, self.start, self.end = chain, start, end


class _Memory:
    """The block hashes routed to a replica as an LRU of blocks, kept a prompt at a time (a prompt has hundreds of
    blocks and this runs for every request routed; one entry a block took most of the router's time).

    Routing a prompt makes all its blocks the most recent, its last block first, and drops the least recent until
    the memory fits the replica's KV blocks. So a block is touched only together with every block before it in
    its chain, and just after them in recency: what is left of any chain is a prefix of it (a radix tree drops
    leaves first), and each block is held once, by the entry of the prompt that touched it last. The queue holds
    the entries oldest first, each least recent from its end; a prompt's blocks that a later one touches leave its
    entry's start. Hashes are chained, so the entry holding block p of a prompt, if p - 1 is held elsewhere or p
    is 0, starts at p: an index of the entries' first hashes finds a prompt's known blocks a run at a time, as the
    KV manager's prefix lookup does."""

    def __init__(self) -> None:
        self.queue: deque[_Routed] = deque()  # oldest first; entries emptied by a later prompt stay until popped
        self.starts: dict[int, _Routed] = {}  # hash of an entry's first block -> the entry
        self.size = 0  # blocks held
        self.emptied = 0  # empty entries in the queue

    def find(self, hashes: tuple[int, ...]) -> tuple[int, list[tuple[_Routed, int]]]:
        """How many of the prompt's first blocks the memory holds, and the entries holding them (each with the
        position its part ends at)."""
        runs, matched = match_chain(self.starts, hashes, len(hashes))
        return matched, runs

    def remember(self, hashes: tuple[int, ...], runs: list[tuple[_Routed, int]], capacity: int) -> None:
        """The prompt's blocks become the most recent (``runs``: where its known ones lie, from ``find``); then the
        least recent go until ``capacity`` blocks are left."""
        starts = self.starts
        for entry, end in runs:  # the known blocks leave the entries holding them (each one's most recent)
            del starts[entry.chain[entry.start]]
            self.size -= end - entry.start
            entry.start = end
            if end < entry.end:
                starts[entry.chain[end]] = entry
            else:
                self.emptied += 1
        routed = _Routed(hashes, 0, len(hashes))
        self.queue.append(routed)
        starts[hashes[0]] = routed
        self.size += len(hashes)
        excess = self.size - capacity
        queue = self.queue
        while excess > 0:
            entry = queue[0]
            held = entry.end - entry.start
            if held > excess:
                entry.end -= excess
                self.size -= excess
                break
            queue.popleft()
            if held:
                del starts[entry.chain[entry.start]]
                self.size -= held
                excess -= held
            else:
                self.emptied -= 1
        if self.emptied > 64 and self.emptied * 2 > len(queue):  # drop emptied entries the queue still lists
            self.queue = deque(entry for entry in queue if entry.end > entry.start)
            self.emptied = 0

    def blocks(self) -> list[int]:
        """Every block's hash, least recent first."""
        return [h for entry in self.queue for h in reversed(entry.chain[entry.start:entry.end])]


ROUTERS = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding, "prefix_aware": PrefixAware}
