"""The KV manager's prefix caching one block at a time, as vLLM's ``block_pool.py`` keeps it: a ``Block`` object
per named block with its own reference count and free-queue cell. ``llmsim.kv_cache.BlockManager`` keeps the same
state in runs of blocks; ``test_prefix_cache`` drives both with the same operations and checks they agree. What
the two share (counting, allocation, anonymous blocks, a preempted request's own run, the free queue's walk) is
inherited; this overrides the named blocks' bookkeeping, block by block."""

from __future__ import annotations

from llmsim import kv_cache


class Block:
    """A block with named content: its chained hash, how many requests hold it, and its cell in the free queue
    (``None`` while held)."""

    __slots__ = ("hash", "ref", "cell")

    def __init__(self, block_hash: int):
        self.hash = block_hash
        self.ref = 1
        self.cell: list | None = None


class BlockManager(kv_cache.BlockManager):
    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        super().__init__(num_blocks, block_size, watermark_blocks, enable_prefix_caching)
        self._shared: dict[int, list[Block]] = {}  # request id -> its named-content blocks, in order
        self._segs = self._shared  # where the inherited code keeps each request's named blocks
        self._cached: dict[int, Block] = {}  # hash -> the block caching it

    def append_slots(self, requests) -> None:
        for r in requests:
            self.append_slot(r)

    def grow_to_computed(self, requests, num_steps=None) -> None:
        """One request at a time, as a block-at-a-time engine catches each request's blocks up; a pure decode run
        of ``num_steps`` steps (its first step's slots booked already) step by step, as stepping books it."""
        if num_steps is not None and num_steps > 1:
            self._replay_decode_steps(requests, num_steps)
            return
        for r in requests:
            self.grow_to(r, max(self.blocks_for(r.num_computed_tokens), self.num_held(r)), r.num_computed_tokens)

    def _num_named(self, rid: int) -> int:
        return len(self._shared.get(rid, ()))

    def _add_named(self, rid: int, hashes: tuple[int, ...], held: int, end: int) -> None:
        self._shared.setdefault(rid, []).extend(map(Block, hashes[held:end]))

    def _release_named(self, rid: int) -> int:
        shared = self._shared.pop(rid, [])
        num_cached = self._num_cached.pop(rid, 0)
        released = 0
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
        return released

    def _caches_all(self, hashes: tuple[int, ...]) -> bool:
        cached = self._cached
        return all(h in cached for h in hashes)

    def _holds_cached(self, rid: int, hashes: tuple[int, ...], done: int, full: int) -> bool:
        cached = self._cached
        return any(h in cached for h in hashes[done:full])

    def _cache_filled(self, rid: int, done: int, full: int) -> None:
        cached = self._cached
        for block in self._shared[rid][done:full]:
            if block.hash not in cached:  # an equal block cached already keeps the entry
                cached[block.hash] = block

    def _match(self, hashes: tuple[int, ...], limit: int) -> tuple[tuple, int, int]:
        """Block by block: each matched block is a run of one."""
        hits = []
        cached = self._cached
        for h in hashes[:limit]:
            block = cached.get(h)
            if block is None:
                break
            hits.append(block)
        return tuple(hits), len(hits), sum(1 for b in hits if b.ref == 0)

    def _hold_hit(self, rid: int, blocks: tuple) -> list[Block]:
        for block in blocks:
            if block.ref == 0:
                block.cell[0] = None  # out of the free queue
                block.cell = None
            block.ref += 1
        return list(blocks)

    def _take_cell(self, cell: list, num_blocks: int) -> int:
        self._queue.popleft()
        block = cell[0]
        if block is None:
            return 0  # taken out by a hit
        block.cell = None
        if self._cached.get(block.hash) is block:
            del self._cached[block.hash]
        return 1

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached) + sum(run.count for run in self._runs.values())

    def cached_hashes(self) -> set[int]:
        return set(self._cached)

    def _check_named(self) -> int:
        holders: dict[Block, int] = {}  # each shared block -> how many requests list it
        for blocks in self._shared.values():
            for b in blocks:
                holders[b] = holders.get(b, 0) + 1
        assert all(b.ref == n for b, n in holders.items()), "a shared block's reference count is off"
        for h, block in self._cached.items():
            assert block.hash == h
        return len(holders)

    def _cell_blocks(self, cell: list) -> int:
        if cell[0] is None:
            return 0
        assert cell[0].ref == 0 and cell[0].cell is cell, "a free block is held or listed twice"
        return 1
