"""The KV manager's prefix caching one block at a time, as vLLM's ``block_pool.py`` keeps it: a ``Block`` object
per named block with its own reference count and free-queue cell. ``llmsim.kv_cache.BlockManager`` keeps the same
state in runs of blocks; ``test_prefix_cache`` drives both with the same operations and checks they agree. What
the two share (counting, allocation, the free queue's anonymous entries) is inherited."""

from __future__ import annotations

from dataclasses import dataclass

from llmsim import kv_cache
from llmsim.kv_cache import _Run, request_block_hashes
from llmsim.request import Request


class Block:
    """A block with named content: its chained hash, how many requests hold it, and its cell in the free queue
    (``None`` while held)."""

    __slots__ = ("hash", "ref", "cell")

    def __init__(self, block_hash: int):
        self.hash = block_hash
        self.ref = 1
        self.cell: list | None = None


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A request's longest cached prefix: shared blocks, then blocks of its own cached run."""

    blocks: tuple[Block, ...]
    num_run_blocks: int
    num_evictable: int  # of those, blocks now in the free queue (a hit takes them out of it)
    num_tokens: int


NO_HIT = PrefixHit((), 0, 0, 0)



class BlockManager(kv_cache.BlockManager):
    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        super().__init__(num_blocks, block_size, watermark_blocks, enable_prefix_caching)
        self._shared: dict[int, list[Block]] = {}  # request id -> its named-content blocks, in order
        self._segs = self._shared  # what the inherited fast paths test membership in
        self._cached: dict[int, Block] = {}  # hash -> the block caching it

    def free(self, request: Request, keep_cached: bool = False) -> int:
        """Release every block of the request; returns how many left its hold. ``keep_cached``: its KV stays
        valid (a recompute preemption), so its own full blocks stay cached for when it resumes."""
        n = self._held.pop(request.id, 0)
        if not self.caching:
            self.num_free_blocks += n
            return n
        rid = request.id
        shared = self._shared.pop(rid, [])
        num_cached = self._num_cached.pop(rid, 0)
        stale = self._runs.pop(rid, None)
        if stale is not None:  # left from an earlier preemption: its blocks stay free, cached for nobody
            stale.request_id = -1
        full = min(request.num_computed_tokens // self.block_size, n)
        num_own_full = max(0, full - len(shared))
        anonymous = n - len(shared) - num_own_full
        if anonymous:
            self._push(anonymous)
        if num_own_full:
            if keep_cached:
                run = _Run(rid, len(shared), num_own_full)
                self._queue.append(run)
                self._runs[rid] = run
            else:  # no request can ever hit them: they are free blocks like any other
                self._push(num_own_full)
        released = n - len(shared)
        cached, enqueue = self._cached.get, self._queue.append
        for i in range(len(shared) - 1, -1, -1):  # the tail first, so eviction takes a prompt's end first
            block = shared[i]
            ref = block.ref - 1
            block.ref = ref
            if ref:
                continue
            released += 1
            if i < num_cached and cached(block.hash) is block:
                cell = block.cell = [block]
                enqueue(cell)
            else:
                self._push(1)
        self.num_free_blocks += released
        return n

    # --- prefix caching ---------------------------------------------------------------------------------

    def lookup(self, request: Request) -> PrefixHit:
        """The longest cached prefix of a request that holds no blocks, in whole blocks, leaving at least one
        token to compute (its logits give the next token; vLLM caps a hit at ``num_tokens - 1``)."""
        if not self.caching:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = request_block_hashes(request, self.block_size)
        hits = []
        cached = self._cached
        for h in hashes[:max_blocks]:
            block = cached.get(h)
            if block is None:
                break
            hits.append(block)
        num_run = 0
        run = self._runs.get(request.id)
        if run is not None and run.base == len(hits) == len(hashes):
            num_run = min(run.count, max_blocks - len(hits))
        if not hits and not num_run:
            return NO_HIT
        evictable = sum(1 for b in hits if b.ref == 0) + num_run
        return PrefixHit(tuple(hits), num_run, evictable, (len(hits) + num_run) * self.block_size)

    def free_blocks_to_admit(self, hit: PrefixHit, num_tokens: int) -> int:
        """Free blocks a request that holds none uses to hold ``num_tokens`` tokens from its cached prefix
        ``hit``: the blocks past the hit, and the hit's blocks still in the free queue (taking them out of the
        queue uses them)."""
        return self.blocks_for(num_tokens) - len(hit.blocks) - hit.num_run_blocks + hit.num_evictable

    def allocate_slots(self, request: Request, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Admit a request that holds no blocks: take its cached prefix ``hit`` (its computed tokens become the
        hit's) and room for ``num_new_tokens`` more. False, changing nothing, when they do not fit (vLLM v1's
        ``allocate_slots``)."""
        if self.free_blocks_to_admit(hit, hit.num_tokens + num_new_tokens) > self.num_free_blocks:
            return False
        num_hit = len(hit.blocks) + hit.num_run_blocks
        run = self._runs.pop(request.id, None)
        if run is not None:
            # The hit takes the run's lowest blocks; those above stay where they are in the queue, free and
            # cached for nobody (the request recomputes them).
            run.count -= hit.num_run_blocks
            run.request_id = -1
        if num_hit:
            for block in hit.blocks:
                if block.ref == 0:
                    block.cell[0] = None  # out of the free queue
                    block.cell = None
                block.ref += 1
            self.num_free_blocks -= hit.num_evictable
            rid = request.id
            self._held[rid] = num_hit
            self._shared[rid] = list(hit.blocks)
            self._num_cached[rid] = len(hit.blocks)
            request.num_computed_tokens = hit.num_tokens
        self.allocate(request, num_new_tokens)
        return True

    def hit_may_grow(self, request: Request, running: list[Request]) -> bool:
        """Whether ``request``'s cached prefix could get longer while ``running`` decode: its next named block
        is not cached yet and some running request still has named blocks to fill (multi-turn traffic, where
        the next round's prompt holds the answer being generated). Conservative: it does not check that the
        blocks match."""
        hashes = request_block_hashes(request, self.block_size)
        cached = self._cached
        if all(h in cached for h in hashes):
            return False
        cached_blocks = self._num_cached
        return any(len(request_block_hashes(r, self.block_size)) > cached_blocks.get(r.id, 0) for r in running)

    def _grow(self, request: Request, num_blocks: int, num_tokens: int) -> None:
        """Hold ``num_blocks`` blocks, and cache the named-content blocks full of the first ``num_tokens``."""
        rid = request.id
        held = self._held.get(rid, 0)
        if num_blocks > held:
            self._take(num_blocks - held)
            self._held[rid] = num_blocks
            hashes = request_block_hashes(request, self.block_size)
            if held < len(hashes):
                self._shared.setdefault(rid, []).extend(map(Block, hashes[held:num_blocks]))
        shared = self._shared.get(rid)
        if shared is None:
            return
        done = self._num_cached.get(rid, 0)
        full = min(num_tokens // self.block_size, len(shared))
        if full > done:
            cached = self._cached
            for block in shared[done:full]:
                if block.hash not in cached:  # an equal block cached already keeps the entry
                    cached[block.hash] = block
            self._num_cached[rid] = full

    def _take(self, num_blocks: int) -> None:
        """Take blocks from the head of the free queue, evicting whatever they cached."""
        queue = self._queue
        self.num_free_blocks -= num_blocks
        while num_blocks:
            entry = queue[0]
            kind = type(entry)
            if kind is int:
                if entry > num_blocks:
                    queue[0] = entry - num_blocks
                    return
                queue.popleft()
                num_blocks -= entry
            elif kind is list:
                queue.popleft()
                block = entry[0]
                if block is None:
                    continue  # taken out by a hit
                block.cell = None
                if self._cached.get(block.hash) is block:
                    del self._cached[block.hash]
                num_blocks -= 1
            else:
                take = min(entry.count, num_blocks)
                entry.count -= take
                num_blocks -= take
                if entry.count == 0:
                    queue.popleft()
                    if self._runs.get(entry.request_id) is entry:
                        del self._runs[entry.request_id]

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached) + sum(run.count for run in self._runs.values())

    def check_integrity(self) -> None:
        assert all(v > 0 for v in self._held.values()), "a request holds a non-positive number of blocks"
        assert 0 <= self.num_free_blocks <= self.num_blocks, "free block count out of range"
        if not self.caching:
            held = sum(self._held.values())
            assert held + self.num_free_blocks == self.num_blocks, (
                f"KV blocks not conserved: {held} held + {self.num_free_blocks} free != {self.num_blocks}")
            return
        holders: dict[Block, int] = {}  # each shared block -> how many requests list it
        for blocks in self._shared.values():
            for b in blocks:
                holders[b] = holders.get(b, 0) + 1
        assert all(b.ref == n for b, n in holders.items()), "a shared block's reference count is off"
        shared = holders
        own = sum(self._held[rid] - len(self._shared.get(rid, ())) for rid in self._held)
        assert all(self._held[rid] >= len(self._shared.get(rid, ())) for rid in self._held)
        queued = 0
        for entry in self._queue:
            kind = type(entry)
            if kind is int:
                assert entry > 0
                queued += entry
            elif kind is list:
                if entry[0] is not None:
                    assert entry[0].ref == 0 and entry[0].cell is entry, "a free block is held or listed twice"
                    queued += 1
            else:
                queued += entry.count
        assert queued == self.num_free_blocks, f"free queue holds {queued} blocks, counter says {self.num_free_blocks}"
        assert own + len(shared) + self.num_free_blocks == self.num_blocks, (
            f"KV blocks not conserved: {own} own + {len(shared)} shared + {self.num_free_blocks} free "
            f"!= {self.num_blocks}")
        for h, block in self._cached.items():
            assert block.hash == h
        for rid, run in self._runs.items():
            assert run.request_id == rid and run.count > 0 and rid not in self._held
