"""Routers: pick the replica for each arriving request (policy only)."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from itertools import islice

from llmsim.cluster.replica import Replica
from llmsim.kv_cache import request_block_hashes
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
        self._trees: dict[int, dict[int, None]] = {}  # per replica: block hash -> None, least recent first

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
        known = {}  # replica id -> how many of the prompt's first blocks its memory holds
        if hashes and not imbalanced:
            best, matched = least, -1
            for rep in replicas:
                n = known[rep.id] = self._known(rep, hashes)
                if n > matched or (n == matched and (rep.num_outstanding, rep.id) < (best.num_outstanding, best.id)):
                    best, matched = rep, n
            # SGLang's match rate: the matched part over the whole prompt (tokens past the named content never
            # match), and the match followed only above the threshold.
            if matched * block_size / request.num_prompt_tokens > self.cache_threshold:
                choice = best
        if hashes:
            n = known.get(choice.id)
            self._remember(choice, hashes, self._known(choice, hashes) if n is None else n)
        return choice

    def _known(self, replica: Replica, hashes: tuple[int, ...]) -> int:
        """How many of the prompt's first blocks the replica's memory holds. What the memory holds of any chain is a
        prefix of it (``_remember``), and a block's hash names its whole prefix, so the blocks held are a prefix of
        the prompt too: a binary search finds where it ends."""
        tree = self._trees.get(replica.id)
        if not tree:
            return 0
        return bisect_left(range(len(hashes)), True, key=lambda i: hashes[i] not in tree)

    def _remember(self, replica: Replica, hashes: tuple[int, ...], num_known: int) -> None:
        """The prompt's blocks become the most recent in the replica's memory, the last first, so that a prompt's
        first blocks are forgotten last: what is left of a prompt is a prefix (a radix tree drops leaves first),
        which later prompts can still match. Of the prompt, the memory holds its first ``num_known`` blocks and no
        others (a block is touched only together with every block before it in its chain, and just before
        them, so a chain's blocks are dropped deepest first and what is left of a chain is a prefix): the rest
        go in without a lookup, and only the known ones are moved."""
        tree = self._trees.setdefault(replica.id, {})
        # A dict in recency order (insertion order; a key moved is deleted and put back), each step one C-level
        # pass, since a prompt has hundreds of blocks and this runs for every request routed (an OrderedDict's
        # per-key bookkeeping took most of the router's time): the known blocks out; the new ones in at the end,
        # last first; the known ones back after them, last first; the least recent dropped from the front until
        # the memory fits.
        known = hashes[:num_known]
        _consume(map(tree.__delitem__, known))
        tree.update(dict.fromkeys(reversed(hashes[num_known:])))
        tree.update(dict.fromkeys(reversed(known)))
        excess = len(tree) - replica.blocks.num_blocks
        if excess > 0:
            _consume(map(tree.__delitem__, list(islice(tree, excess))))


def _consume(calls) -> None:
    """Run an iterator of calls for their effect, in C (no bytecode per item)."""
    deque(calls, maxlen=0)


ROUTERS = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding, "prefix_aware": PrefixAware}
