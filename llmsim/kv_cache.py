"""Paged KV cache block manager (mechanism only; schedulers decide *who* gets blocks).

Without prefix caching, blocks are interchangeable and the manager counts how many each request holds:
``num_free_blocks + sum(held) == num_blocks`` is the conservation law ``check_integrity`` asserts.

With prefix caching (vLLM v1's scheme, ``vllm/v1/core/block_pool.py`` and ``kv_cache_manager.py``) a full block
has a content hash chained from its parent block's, a freed block stays in the cache until it is reused, and a
new request starts from its longest cached prefix. Identity is kept where it can matter and counted where it
cannot:

- A block of content the workload names (``Request.prefix_segments``: a system prompt, earlier turns of a
  conversation, Mooncake's ``hash_ids``) is a ``Block`` with its chained hash and a reference count; requests
  with the same prefix share it.
- Blocks past that content hold tokens no other request has. Only the request itself can hit them again (when
  it resumes after a recompute preemption), so a preempted request's full blocks stay cached as one ``_Run``;
  everything else is an anonymous count.

The free queue is vLLM's LRU ``FreeKVCacheBlockQueue`` at that granularity: allocation takes blocks from its
head (evicting what they cached), a freed request's blocks join its tail in reverse order (its last block is
evicted first), and a cache hit takes a block out of the queue::

    head -> [7 anonymous] [Block h3] [_Run r12: 40 blocks] [2 anonymous] [Block h1] ... <- tail

Entries that a hit took out stay in the deque, marked dead, and are skipped when they reach the head.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmsim.request import Request


class Block:
    """A block with named content: its chained hash, how many requests hold it, and its cell in the free queue
    (``None`` while held)."""

    __slots__ = ("hash", "ref", "cell")

    def __init__(self, block_hash: int):
        self.hash = block_hash
        self.ref = 1
        self.cell: list | None = None


class _Run:
    """Full blocks ``base .. base + count - 1`` of a preempted request, cached for its resumption; eviction takes
    the highest first, so what is left is always a prefix of them."""

    __slots__ = ("request_id", "base", "count")

    def __init__(self, request_id: int, base: int, count: int):
        self.request_id, self.base, self.count = request_id, base, count


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A request's longest cached prefix: shared blocks, then blocks of its own cached run."""

    blocks: tuple[Block, ...]
    num_run_blocks: int
    num_evictable: int  # of those, blocks now in the free queue (a hit takes them out of it)
    num_tokens: int


NO_HIT = PrefixHit((), 0, 0, 0)


def block_hashes(request: Request, block_size: int) -> tuple[int, ...]:
    """Chained hashes of the request's blocks that its named content fills: block ``i`` hashes its parent's hash
    with the content pieces ``(content id, offset, tokens)`` of tokens ``[i * block_size, (i + 1) * block_size)``;
    a block of one piece hashes ``(parent, id, offset, tokens)``, one of several ``(parent, pieces)``."""
    hashes: list[int] = []
    append = hashes.append
    parent = 0
    pieces: list[tuple[int, int, int]] = []  # the current block's pieces so far
    need = block_size  # tokens the current block still lacks
    for seg_id, seg_len in request.prefix_segments:
        offset = 0
        if pieces or seg_len == 0:  # the segment continues a block begun before it (or adds an empty piece)
            take = need if need < seg_len else seg_len
            pieces.append((seg_id, 0, take))
            need -= take
            offset = take
            if need:
                continue  # the segment ends inside this block
            parent = hash((parent, *pieces[0])) if len(pieces) == 1 else hash((parent, tuple(pieces)))
            append(parent)
            pieces, need = [], block_size
        # Blocks that lie wholly inside the segment: one piece each (long prompts are mostly these).
        last = seg_len - block_size
        while offset <= last:
            parent = hash((parent, seg_id, offset, block_size))
            append(parent)
            offset += block_size
        if offset < seg_len:
            pieces.append((seg_id, offset, seg_len - offset))
            need = block_size - (seg_len - offset)
    return tuple(hashes)


def request_block_hashes(request: Request, block_size: int) -> tuple[int, ...]:
    """``block_hashes``, computed once per request and kept on it: every replica of an experiment has one block
    size, so the router and the KV managers read the same hashes."""
    hashes = request.block_hashes
    if hashes is None:
        hashes = request.block_hashes = block_hashes(request, block_size) if request.prefix_segments else ()
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, watermark_blocks: int = 0,
                 enable_prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Admission keeps this many blocks free so running requests can keep decoding (vLLM v0's watermark).
        self.watermark_blocks = watermark_blocks
        self.num_free_blocks = num_blocks
        self._held: dict[int, int] = {}  # request id -> blocks held
        self.caching = enable_prefix_caching
        # Prefix caching only:
        self._shared: dict[int, list[Block]] = {}  # request id -> its named-content blocks, in order
        self._num_cached: dict[int, int] = {}  # request id -> how many of those are full (hashed and cached)
        self._cached: dict[int, Block] = {}  # hash -> the block caching it
        self._runs: dict[int, _Run] = {}  # request id -> its cached run
        self._queue: deque = deque([num_blocks]) if num_blocks else deque()  # int | [Block] cell | _Run

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_held(self, request: Request) -> int:
        return self._held.get(request.id, 0)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks to add so the request can hold ``num_computed_tokens + num_new_tokens`` tokens of KV."""
        need = self.blocks_for(request.num_computed_tokens + num_new_tokens) - self._held.get(request.id, 0)
        return need if need > 0 else 0

    def can_admit(self, request: Request, num_new_tokens: int) -> bool:
        """Room to start (or resume) a request, keeping the watermark free for running ones."""
        return self.num_new_blocks(request, num_new_tokens) + self.watermark_blocks <= self.num_free_blocks

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_new_blocks(request, num_new_tokens) <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        need = self.num_new_blocks(request, num_new_tokens)
        if need > self.num_free_blocks:
            raise RuntimeError(f"request {request.id} needs {need} blocks, {self.num_free_blocks} free")
        if self.caching:
            self._grow(request, self._held.get(request.id, 0) + need,
                       request.num_computed_tokens + num_new_tokens)
        elif need:
            self._held[request.id] = self._held.get(request.id, 0) + need
            self.num_free_blocks -= need

    def append_slot(self, request: Request) -> None:
        """Room for one more token of a request (a decode step). Its blocks may already hold it: a scheduler
        that reserves a whole prompt at admission (Sarathi) has the last prompt token's block in hand."""
        c = request.num_computed_tokens
        if self.caching:
            # Only a new block, or a named block this token fills (to be cached), needs the general path.
            if c % self.block_size == 0 or ((c + 1) % self.block_size == 0 and request.id in self._shared):
                self.allocate(request, 1)
        elif c % self.block_size == 0 and c >= self._held.get(request.id, 0) * self.block_size:
            if self.num_free_blocks == 0:
                raise RuntimeError(f"request {request.id} needs a block, none free")
            self._held[request.id] = self._held.get(request.id, 0) + 1
            self.num_free_blocks -= 1

    def grow_to(self, request: Request, num_blocks: int, num_tokens: int = 0) -> None:
        """Bring a request's holding up to ``num_blocks``, full of its first ``num_tokens`` tokens (bulk decode
        bookkeeping; 0 for KV that is still arriving, as in a migration)."""
        need = num_blocks - self._held.get(request.id, 0)
        if need > self.num_free_blocks:
            raise RuntimeError(f"request {request.id} needs {need} blocks, {self.num_free_blocks} free")
        if self.caching:
            self._grow(request, max(num_blocks, self._held.get(request.id, 0)), num_tokens)
        elif need > 0:
            self._held[request.id] = num_blocks
            self.num_free_blocks -= need

    def fills_named_blocks(self, request: Request) -> bool:
        """Whether the request's next tokens fill blocks of named content not yet cached (prefix caching)."""
        if not self.caching or not request.prefix_segments:
            return False
        return len(request_block_hashes(request, self.block_size)) > self._num_cached.get(request.id, 0)

    def grow_to_computed(self, requests: list[Request]) -> None:
        """``grow_to`` each request's computed tokens (after a fast-forwarded decode run), in one loop."""
        bs = self.block_size
        if self.caching:
            # A request without named content only takes blocks off the free queue; consecutive takes are one
            # take (the queue is consumed from its head either way), so they are batched between the requests
            # that take the general path, in order.
            held, shared, take = self._held, self._shared, 0
            for r in requests:
                n = -(-r.num_computed_tokens // bs)
                if r.prefix_segments or r.id in shared:
                    if take:
                        self._take(take)
                        take = 0
                    self.grow_to(r, n, r.num_computed_tokens)
                    continue
                need = n - held.get(r.id, 0)
                if need > 0:
                    if take + need > self.num_free_blocks:
                        raise RuntimeError(f"request {r.id} needs {need} blocks, "
                                           f"{self.num_free_blocks - take} free")
                    held[r.id] = n
                    take += need
            if take:
                self._take(take)
            return
        held, free = self._held, self.num_free_blocks
        for r in requests:
            n = -(-r.num_computed_tokens // bs)
            need = n - held.get(r.id, 0)
            if need > 0:
                if need > free:
                    raise RuntimeError(f"request {r.id} needs {need} blocks, {free} free")
                held[r.id] = n
                free -= need
        self.num_free_blocks = free

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

    def _push(self, num_blocks: int) -> None:
        queue = self._queue
        if queue and type(queue[-1]) is int:
            queue[-1] += num_blocks
        else:
            queue.append(num_blocks)

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
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content a request could hit (held or free)."""
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
