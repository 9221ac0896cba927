"""Paged KV cache block manager (mechanism only; schedulers decide *who* gets blocks).

Without prefix caching, blocks are interchangeable and the manager counts how many each request holds:
``num_free_blocks + sum(held) == num_blocks`` is the conservation law ``check_integrity`` asserts.

With prefix caching (vLLM v1's scheme, ``vllm/v1/core/block_pool.py`` and ``kv_cache_manager.py``) a full block
has a content hash chained from its parent block's, a freed block stays in the cache until it is reused, and a
new request starts from its longest cached prefix. Identity is kept where it can matter and counted where it
cannot:

- Blocks of content the workload names (``Request.prefix_segments``: a system prompt, earlier turns of a
  conversation, Mooncake's ``hash_ids``) carry chained hashes and reference counts; requests with the same
  prefix share them. They are kept as ``_Seg`` runs: consecutive blocks of one hash chain with the same holders,
  the same cached-or-not state and one place in the free queue, so that a request of a thousand named blocks
  costs a few runs, not a thousand blocks (SGLang's radix tree keeps runs for the same reason). A hit that ends
  inside a run, or a fill that caches part of one, splits it; nothing else does.
- Blocks past that content hold tokens no other request has. Only the request itself can hit them again (when
  it resumes after a recompute preemption), so a preempted request's full blocks stay cached as one ``_Run``;
  everything else is an anonymous count.

Every operation has the outcome vLLM's block-at-a-time code has (``tests/kv_cache_reference.py`` is that code,
and a property test drives both with the same operations). The free queue is vLLM's LRU
``FreeKVCacheBlockQueue`` at run granularity: allocation takes blocks from its head (evicting what they cached),
a freed request's blocks join its tail in reverse order (its last block is evicted first, so eviction shortens a
run from its end), and a cache hit takes blocks out of the queue::

    head -> [7 anonymous] [_Seg: 3 blocks] [_Run r12: 40 blocks] [2 anonymous] [_Seg: 96 blocks] ... <- tail

A run's queue entry is a one-item list (its cell); a hit that takes the whole run out empties the cell, which
is skipped when it reaches the head.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmsim.request import Request


class _Seg:
    """Named-content blocks at positions ``start .. end - 1`` of the hash chain ``chain`` (the hashes of the
    request whose blocks they were first), alike in everything the manager tracks: the requests holding them
    (``holders``, so the reference count is its length), whether the cache maps their hashes to them
    (``cached``), and their cell in the free queue (``None`` while held)."""

    __slots__ = ("chain", "start", "end", "holders", "cached", "cell")

    def __init__(self, chain: tuple[int, ...], start: int, end: int, holders: list[int], cached: bool = False):
        self.chain, self.start, self.end = chain, start, end
        self.holders = holders
        self.cached = cached
        self.cell: list | None = None


class _Run:
    """Full blocks ``base .. base + count - 1`` of a preempted request, cached for its resumption; eviction takes
    the highest first, so what is left is always a prefix of them."""

    __slots__ = ("request_id", "base", "count")

    def __init__(self, request_id: int, base: int, count: int):
        self.request_id, self.base, self.count = request_id, base, count


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A request's longest cached prefix: runs of shared blocks (each with the chain position its part of the
    hit ends at), then blocks of its own cached run."""

    segments: tuple[tuple[_Seg, int], ...]
    num_named_blocks: int
    num_run_blocks: int
    num_evictable: int  # of those, blocks now in the free queue (a hit takes them out of it)
    num_tokens: int


NO_HIT = PrefixHit((), 0, 0, 0, 0)


def block_hashes(request: Request, block_size: int) -> tuple[int, ...]:
    """Hashes of the request's blocks that its named content fills, each naming the block's content and all
    before it, as vLLM's chained hashes do. A block of several content pieces ``(content id, offset, tokens)``
    (the end of one segment and the start of the next) hashes ``(parent's hash, pieces)``. The blocks lying wholly inside one segment (long prompts are mostly these) number on from a
    62-bit base hashed from the block before them, the segment and the offset they start at: ``base + i`` for
    the i-th, which names the same prefix as a chained hash would (two runs of a few hundred blocks overlap with
    probability ~1e-16: 64-bit hashing, like the tuple hashes of the blocks that span two segments and vLLM's
    builtin-hash option), at one ``range`` for the lot. Below 2**63 the hashes stay machine-word ints, which
    ``range`` makes and the cache's sets hash about 3x faster than 128-bit ones."""
    segments = request.prefix_segments
    if type(segments) is not tuple or (segments and type(segments[0]) is not tuple):  # lists, from the Python API
        segments = tuple(map(tuple, segments))
    # A multi-turn prompt is the previous turn's plus its answer and the next question: carry on from where
    # hashing the previous turn's segments stopped, if that is remembered (two or one segments shorter).
    hashes: list[int] = []
    parent = 0
    pieces: list[tuple[int, int, int]] = []  # the current block's pieces so far
    need = block_size  # tokens the current block still lacks
    done = 0
    for k in (len(segments) - 1, len(segments) - 2):
        state = _HASH_STATES.get((block_size, segments[:k])) if k > 0 else None
        if state is not None:
            done, (prefix_hashes, parent, prefix_pieces, need) = k, state
            hashes, pieces = list(prefix_hashes), list(prefix_pieces)
            break
    for seg_id, seg_len in segments[done:]:
        offset = 0
        if pieces or seg_len == 0:  # the segment continues a block begun before it (or adds an empty piece)
            take = need if need < seg_len else seg_len
            pieces.append((seg_id, 0, take))
            need -= take
            offset = take
            if need:
                continue  # the segment ends inside this block
            parent = hash((parent, tuple(pieces)))
            hashes.append(parent)
            pieces, need = [], block_size
        count = (seg_len - offset) // block_size
        if count:
            base = _run_base(parent, seg_id, offset, block_size)
            hashes.extend(range(base, base + count))
            parent = base + count - 1
            offset += count * block_size
        if offset < seg_len:
            pieces.append((seg_id, offset, seg_len - offset))
            need = block_size - (seg_len - offset)
    result = tuple(hashes)
    global _hash_states_size
    if _hash_states_size + len(result) > _MAX_HASH_STATES_SIZE:
        forget_hash_states()
    _HASH_STATES[(block_size, segments)] = (result, parent, tuple(pieces), need)
    _hash_states_size += len(result)
    return result


# (block size, prefix segments) -> (their block hashes, the last full block's hash, the pieces of the block they
# end inside, the tokens it still lacks): where ``block_hashes`` stopped, so that the next turn of a conversation
# hashes only what it adds. A pure function's memo, emptied as a simulation starts (``forget_hash_states``), so that
# every run hashes from cold as a run in a process of its own does, and whenever it would hold more than
# ``_MAX_HASH_STATES_SIZE`` hashes (~40 MB: it keeps finished requests' hashes alive, and a replay of long
# single-turn prompts, Mooncake's, would otherwise keep hundreds per request of tens of thousands).
_HASH_STATES: dict[tuple, tuple] = {}
_MAX_HASH_STATES_SIZE = 1 << 20
_hash_states_size = 0  # hashes the memo holds


def forget_hash_states() -> None:
    global _hash_states_size
    _HASH_STATES.clear()
    _hash_states_size = 0


def _run_base(parent: int, seg_id: int, offset: int, block_size: int) -> int:
    """The 62-bit base of a run of whole blocks inside one segment (``block_hashes``); ``base + i`` stays below
    2**63 for any run shorter than 2**62 blocks."""
    return hash((parent, seg_id, offset, block_size)) & _MASK_62


_MASK_62 = (1 << 62) - 1


def request_block_hashes(request: Request, block_size: int) -> tuple[int, ...]:
    """``block_hashes``, computed once per request and kept on it: every replica of an experiment has one block
    size, so the router and the KV managers read the same hashes."""
    hashes = request.block_hashes
    if hashes is None:
        hashes = request.block_hashes = block_hashes(request, block_size) if request.prefix_segments else ()
    return hashes


def match_chain(starts: dict, hashes: tuple[int, ...], limit: int) -> tuple[list, int]:
    """The longest prefix of the chain ``hashes`` (up to ``limit`` blocks) that runs of blocks hold, each run an
    object with the ``chain`` it is part of and the ``end`` of its positions, indexed in ``starts`` by the hash of
    its first block: (each run matched with the position its part of the match ends at, blocks matched). A hash is
    held once, so a run holding block p but not p - 1 starts at p: the runs are found one at a time from ``p``."""
    runs = []
    p = 0
    while p < limit:
        run = starts.get(hashes[p])
        if run is None:
            break
        chain = run.chain
        end = run.end if run.end < limit else limit
        if chain[end - 1] != hashes[end - 1]:
            # The chain leaves this run's inside it. Hashes are chained, so the blocks match up to the first
            # that differs: bisect for it.
            lo, hi = p + 1, end - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if chain[mid] == hashes[mid]:
                    lo = mid + 1
                else:
                    hi = mid
            end = lo
        runs.append((run, end))
        p = end
    return runs, p


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
        self._segs: dict[int, list[_Seg]] = {}  # request id -> runs of its named blocks, positions 0.. in order
        self._num_cached: dict[int, int] = {}  # request id -> how many of its named blocks are full
        # Hash of a cached run's first block -> the run. A hash is cached once, so a block's content is cached
        # where a run starting at or before its position caches it (``_holds_cached``); the runs' other hashes
        # are not indexed, so that filling and evicting a block costs nothing per block.
        self._starts: dict[int, _Seg] = {}
        self._start_hashes: set[int] = set()  # its keys again: a set answers "any of these?" twice as fast
        # Requests that may hold copies among their full named blocks (filled while an equal block was cached, not
        # cached themselves): only for these can a run starting below their next block cache content past it.
        self._copying: set[int] = set()
        self._runs: dict[int, _Run] = {}  # request id -> its cached run
        self._queue: deque = deque([num_blocks]) if num_blocks else deque()  # int | [_Seg | None] cell | _Run

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
        if self.caching and request.prefix_segments:
            # Only a new block, or a named block this token fills (to be cached), changes anything.
            bs, rid = self.block_size, request.id
            if c % bs == 0:
                self.allocate(request, 1)
            elif (c + 1) % bs == 0 and rid in self._segs:
                if (c + 1) // bs > self._held.get(rid, 0):
                    self.allocate(request, 1)
                    return
                self._cache_full(rid, c + 1)  # the token fills a block it holds: cache it, take nothing
        elif c % self.block_size == 0 and c >= self._held.get(request.id, 0) * self.block_size:
            # A request with no named content holds anonymous blocks only, with or without caching: a new one
            # comes off the head of the free queue (``_take``, which evicts what it cached) or off the count.
            if self.num_free_blocks == 0:
                raise RuntimeError(f"request {request.id} needs a block, none free")
            self._held[request.id] = self._held.get(request.id, 0) + 1
            if self.caching:
                self._take(1)
            else:
                self.num_free_blocks -= 1

    def append_slots(self, requests: list[Request]) -> None:
        """``append_slot`` for each of a batch's decodes, in order (the schedulers' fast path: the caller has
        checked that enough blocks are free). Most tokens land in a block the request already holds, so this
        tests first what ``append_slot`` needs to do anything: a token at a block's start, or (with named
        blocks held) one that fills a block."""
        block_size, named = self.block_size, bool(self._segs)
        append_slot = self.append_slot
        for request in requests:
            computed = request.num_computed_tokens
            if computed % block_size == 0 or (named and (computed + 1) % block_size == 0):
                append_slot(request)

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

    def _takes_evict_cached(self, num_blocks: int) -> bool:
        """Whether taking ``num_blocks`` blocks off the head of the free queue would evict cached content."""
        for entry in self._queue:
            if num_blocks <= 0:
                return False
            kind = type(entry)
            if kind is int:
                num_blocks -= entry
            elif kind is list:
                if entry[0] is not None:
                    return True
            else:
                num_blocks -= entry.count
        return False

    def _decode_run_fills(self, requests: list[Request]) -> tuple[list | None, list, int]:
        """What a decode run's bookkeeping changes, found without changing anything: for each request with named
        blocks left to fill that takes a block or fills one, (id, its hashes, blocks held, blocks to hold, the
        end of the named blocks it now holds too (0: none), named blocks cached, named blocks full, whether those
        just filled are content no block caches); (id, blocks to hold) of the others that take blocks; and how
        many blocks the run takes. Stepping books each step's takes (which evict what the free queue's head
        caches) and fills in batch order; booking the fills, then all the takes as one, ends in the same state
        unless a take evicts a cached block and a fill holds content some block caches (a copy while that block
        is cached, the cached one once it is evicted). Then the first list is None (replay the steps). Two
        requests never fill blocks of one hash in a run: a decode fills the request's own answer, which nobody
        else generates."""
        bs = self.block_size
        held, num_cached, copying = self._held, self._num_cached, self._copying
        starts = self._start_hashes
        fills, grows = [], []  # grows: (id, blocks to hold) of requests with no named block left to fill
        take = 0
        copies = False
        for r in requests:
            c = r.num_computed_tokens
            n = -(-c // bs)
            rid = r.id
            has = held.get(rid, 0)
            if r.prefix_segments:
                hashes = r.block_hashes
                if hashes is None:
                    hashes = request_block_hashes(r, bs)
                named = len(hashes)
                done = num_cached.get(rid, 0)
                if done < named:
                    full = c // bs
                    if full > named:
                        full = named
                    if n <= has and full <= done:
                        continue  # no new block and no named block filled: nothing changes
                    end = 0
                    if n > has:
                        take += n - has
                        if has < named:
                            end = n if n < named else named
                    new = True
                    if full > done:  # _holds_cached, inlined (a decode run fills a block or two of most requests)
                        if rid in copying:
                            new = not self._holds_cached(rid, hashes, done, full)
                        elif full - done == 1:
                            new = hashes[done] not in starts
                        else:
                            new = starts.isdisjoint(hashes[done:full])
                        if not new:
                            copies = True
                    fills.append((rid, hashes, has, n, end, done, full, new))
                    continue
            if n > has:
                take += n - has
                grows.append((rid, n))
        if take > self.num_free_blocks:
            raise RuntimeError(f"a decode run needs {take} blocks, {self.num_free_blocks} free")
        if copies and self._takes_evict_cached(take):
            return None, grows, take
        return fills, grows, take

    def _replay_decode_steps(self, requests: list[Request], num_steps: int) -> None:
        """Bring a decode run's requests to their computed tokens as stepping does: step by step, each request's
        ``append_slot`` in batch order (its first step's slot was allocated when it was scheduled)."""
        final = [r.num_computed_tokens for r in requests]
        try:
            for j in range(1, num_steps):
                for r, end in zip(requests, final):
                    r.num_computed_tokens = end - num_steps + j
                    self.append_slot(r)
        finally:
            for r, end in zip(requests, final):
                r.num_computed_tokens = end

    def fills_named_blocks(self, request: Request) -> bool:
        """Whether the request's next tokens fill blocks of named content not yet cached (prefix caching)."""
        if not self.caching or not request.prefix_segments:
            return False
        return len(request_block_hashes(request, self.block_size)) > self._num_cached.get(request.id, 0)

    def fills_cached_content(self, request: Request) -> bool:
        """Whether a named block the request has yet to fill holds content some block caches now (prefix caching;
        filling it would make a copy, unless that block is evicted first)."""
        if not self.caching or not request.prefix_segments:
            return False
        hashes = request_block_hashes(request, self.block_size)
        return self._holds_cached(request.id, hashes, self._num_cached.get(request.id, 0), len(hashes))

    def grow_to_computed(self, requests: list[Request], num_steps: int | None = None) -> None:
        """``grow_to`` each request's computed tokens (after a fast-forwarded decode run), in one loop.
        ``num_steps``: the run's steps, each one token of every request (a pure decode run), which lets the run's
        block takes be booked as one and lets a run whose order of takes and named-block fills matters be
        replayed step by step (``_decode_run_fills``)."""
        bs = self.block_size
        if self.caching and num_steps is not None and num_steps > 1:
            fills, grows, take = self._decode_run_fills(requests)
            if fills is None:
                self._replay_decode_steps(requests, num_steps)
                return
            held = self._held
            for rid, n in grows:
                held[rid] = n
            for rid, hashes, has, n, end, done, full, new in fills:
                if n > has:
                    held[rid] = n
                if end:  # the request holds named blocks has .. end - 1 too
                    self._add_named(rid, hashes, has, end)
                if full > done:
                    if not new or not self._extend_cached_run(rid, done, full):
                        self._cache_filled(rid, done, full)
                    self._num_cached[rid] = full
            if take:
                self._take(take)
            return
        if self.caching:
            # A request with no named blocks left to fill only takes blocks off the free queue; consecutive
            # takes are one take (the queue is consumed from its head either way), so they are batched between
            # the requests that take the general path, in order.
            held, num_cached, take = self._held, self._num_cached, 0
            for r in requests:
                n = -(-r.num_computed_tokens // bs)
                done = num_cached.get(r.id, 0) if r.prefix_segments else 0
                named = len(request_block_hashes(r, bs)) if r.prefix_segments else 0
                if done < named:
                    has = held.get(r.id, 0)
                    if n <= has and min(r.num_computed_tokens // bs, named) <= done:
                        continue  # no new block and no named block filled: nothing changes
                    if take:
                        self._take(take)
                        take = 0
                    if n - has > self.num_free_blocks:
                        raise RuntimeError(f"request {r.id} needs {n - has} blocks, {self.num_free_blocks} free")
                    self._grow(r, n if n > has else has, r.num_computed_tokens)  # grow_to, inlined
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
        num_named = self._num_named(rid)
        stale = self._runs.pop(rid, None)
        if stale is not None:  # left from an earlier preemption: its blocks stay free, cached for nobody
            stale.request_id = -1
        full = min(request.num_computed_tokens // self.block_size, n)
        num_own_full = max(0, full - num_named)
        anonymous = n - num_named - num_own_full
        if anonymous:
            self._push(anonymous)
        if num_own_full:
            if keep_cached:
                run = _Run(rid, num_named, num_own_full)
                self._queue.append(run)
                self._runs[rid] = run
            else:  # no request can ever hit them: they are free blocks like any other
                self._push(num_own_full)
        self.num_free_blocks += n - num_named + self._release_named(rid)
        return n

    # --- prefix caching ---------------------------------------------------------------------------------

    def lookup(self, request: Request) -> PrefixHit:
        """The longest cached prefix of a request that holds no blocks, in whole blocks, leaving at least one
        token to compute (its logits give the next token; vLLM caps a hit at ``num_tokens - 1``)."""
        if not self.caching:
            return NO_HIT
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = request_block_hashes(request, self.block_size)
        segments, p, evictable = self._match(hashes, min(max_blocks, len(hashes)))
        num_run = 0
        run = self._runs.get(request.id)
        if run is not None and run.base == p == len(hashes):
            num_run = min(run.count, max_blocks - p)
        if not p and not num_run:
            return NO_HIT
        return PrefixHit(segments, p, num_run, evictable + num_run, (p + num_run) * self.block_size)

    def _match(self, hashes: tuple[int, ...], limit: int) -> tuple[tuple, int, int]:
        """The cached runs matching the chain ``hashes`` from its start, up to ``limit`` blocks: (each run with
        the position its part of the match ends at, blocks matched, of those the ones in the free queue)."""
        segments, matched = match_chain(self._starts, hashes, limit)
        evictable = 0
        p = 0
        for seg, end in segments:
            if not seg.holders:
                evictable += end - p
            p = end
        return tuple(segments), matched, evictable

    def free_blocks_to_admit(self, hit: PrefixHit, num_tokens: int) -> int:
        """Free blocks a request that holds none uses to hold ``num_tokens`` tokens from its cached prefix
        ``hit``: the blocks past the hit, and the hit's blocks still in the free queue (taking them out of the
        queue uses them)."""
        return self.blocks_for(num_tokens) - hit.num_named_blocks - hit.num_run_blocks + hit.num_evictable

    def can_admit_from(self, hit: PrefixHit, num_tokens: int) -> bool:
        """Whether a request that holds no blocks fits ``num_tokens`` tokens from its cached prefix ``hit`` and
        leaves the watermark free (``can_admit`` for a request with a prefix-cache hit)."""
        return self.free_blocks_to_admit(hit, num_tokens) + self.watermark_blocks <= self.num_free_blocks

    def allocate_slots(self, request: Request, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Admit a request that holds no blocks: take its cached prefix ``hit`` (its computed tokens become the
        hit's) and room for ``num_new_tokens`` more. False, changing nothing, when they do not fit (vLLM v1's
        ``allocate_slots``). ``hit`` must come from ``lookup`` with nothing changed since."""
        if self.free_blocks_to_admit(hit, hit.num_tokens + num_new_tokens) > self.num_free_blocks:
            return False
        num_hit = hit.num_named_blocks + hit.num_run_blocks
        run = self._runs.pop(request.id, None)
        if run is not None:
            # The hit takes the run's lowest blocks; those above stay where they are in the queue, free and
            # cached for nobody (the request recomputes them).
            run.count -= hit.num_run_blocks
            run.request_id = -1
        if num_hit:
            rid = request.id
            self._segs[rid] = self._hold_hit(rid, hit.segments)
            self.num_free_blocks -= hit.num_evictable
            self._held[rid] = num_hit
            self._num_cached[rid] = hit.num_named_blocks
            request.num_computed_tokens = hit.num_tokens
        self.allocate(request, num_new_tokens)
        return True

    def _hold_hit(self, rid: int, segments: tuple) -> list[_Seg]:
        """The request takes the runs of its hit (out of the free queue where they sit); returns its list."""
        segs = []
        for seg, end in segments:
            if end < seg.end:
                self._split(seg, end)  # the hit takes the run's first blocks
            cell = seg.cell
            if cell is not None:  # out of the free queue
                cell[0] = None
                seg.cell = None
            seg.holders.append(rid)
            segs.append(seg)
        return segs

    def hit_may_grow(self, request: Request, running: list[Request]) -> bool:
        """Whether ``request``'s cached prefix could get longer while ``running`` decode: its next named block
        is not cached yet and some running request still has named blocks to fill (multi-turn traffic, where
        the next round's prompt holds the answer being generated). Conservative: it does not check that the
        blocks match."""
        if self._caches_all(request_block_hashes(request, self.block_size)):
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
            if held < len(hashes):  # it holds named blocks 0 .. held - 1 so far
                self._add_named(rid, hashes, held, num_blocks if num_blocks < len(hashes) else len(hashes))
        self._cache_full(rid, num_tokens)

    def _cache_full(self, rid: int, num_tokens: int) -> None:
        """Cache the request's named blocks that its first ``num_tokens`` tokens fill and are not cached yet."""
        num_named = self._num_named(rid)
        if not num_named:
            return
        done = self._num_cached.get(rid, 0)
        full = num_tokens // self.block_size
        if full > num_named:
            full = num_named
        if full > done:
            self._cache_filled(rid, done, full)
            self._num_cached[rid] = full

    # The named blocks' own bookkeeping, in runs (``tests/kv_cache_reference.py`` overrides these one block at a
    # time, and the property tests check that the two agree).

    def _num_named(self, rid: int) -> int:
        """How many named blocks the request holds (its first ones)."""
        segs = self._segs.get(rid)
        return segs[-1].end if segs else 0

    def _add_named(self, rid: int, hashes: tuple[int, ...], held: int, end: int) -> None:
        """The request now holds named blocks ``held .. end - 1`` too, not filled yet."""
        segs = self._segs.setdefault(rid, [])
        if segs and not segs[-1].cached and segs[-1].chain is hashes:
            segs[-1].end = end  # its own run of blocks nobody can hit grows
        else:
            segs.append(_Seg(hashes, held, end, [rid]))

    def _release_named(self, rid: int) -> int:
        """The request lets its named blocks go, the tail first (so eviction takes a prompt's end first); returns
        how many are free now (the others are still held by requests sharing them)."""
        segs = self._segs.pop(rid, None)
        self._num_cached.pop(rid, None)
        self._copying.discard(rid)
        if not segs:
            return 0
        released = 0
        enqueue = self._queue.append
        for seg in reversed(segs):
            holders = seg.holders
            if len(holders) > 1:
                holders.remove(rid)
                continue
            holders.clear()
            size = seg.end - seg.start
            released += size
            if seg.cached:
                cell = seg.cell = [seg]
                enqueue(cell)
            else:  # content nobody can hit (not full yet, or a copy of blocks cached elsewhere)
                self._push(size)
        return released

    def _caches_all(self, hashes: tuple[int, ...]) -> bool:
        # Every block cached is every block matched: a run caching block p but not p - 1 would start at p.
        return self._match(hashes, len(hashes))[1] == len(hashes)

    def _holds_cached(self, rid: int, hashes: tuple[int, ...], done: int, full: int) -> bool:
        """Whether some block caches the content of positions ``done .. full - 1`` of the chain ``hashes``, the
        chain of request ``rid``, which holds its named blocks before ``done`` (or holds none and ``done`` is 0).

        A run caching block p starts at some q <= p, and as hashes are chained it holds the chain's content from
        q to p: ``_starts`` has ``hashes[q]``. For q < done that content is in blocks the request holds, cached
        only if they are that run's, which ends before ``done``; so unless the request holds copies (full blocks
        it filled while an equal one was cached, not cached themselves; ``_copying``) below ``done``, only runs
        starting at ``done .. full - 1`` can cache any of those blocks, and one starting there does. One pass of
        the runs' index over the blocks' hashes answers that."""
        if done >= full:
            return False
        if rid not in self._copying:
            return not self._start_hashes.isdisjoint(hashes[done:full])
        if self._start_hashes.isdisjoint(hashes[:full]):
            return False
        return any(self._cached_positions(hashes, done, full))

    def _cached_positions(self, hashes: tuple[int, ...], lo: int, hi: int) -> list[bool]:
        """For each position ``lo .. hi - 1`` of the chain ``hashes``, whether some block caches its content: a scan
        over every run that could start at or before it (for the rare requests that hold copies)."""
        cached = [False] * (hi - lo)
        starts = self._starts
        for q in range(hi):
            seg = starts.get(hashes[q])
            if seg is None:
                continue
            p = q if q > lo else lo
            stop = seg.end if seg.end < hi else hi
            while p < stop and seg.chain[p] == hashes[p]:  # chained: once they differ, they differ on
                cached[p - lo] = True
                p += 1
        return cached

    def _cache_filled(self, rid: int, done: int, full: int) -> None:
        """Cache the request's named blocks ``done .. full - 1``, just filled: each whose hash no block caches
        yet (an equal block cached already keeps the entry, and this one stays a copy nobody can hit). They
        lie in its own runs not cached, which only it holds."""
        segs = self._segs[rid]
        starts = self._starts
        last = segs[-1]
        if last.start == done and not self._holds_cached(rid, last.chain, done, full):
            # The usual case: new content, at the start of its last run.
            self._extend_cached_run(rid, done, full)
            return
        self._copying.add(rid)  # some of these blocks may copy cached ones (or did before)
        i = len(segs) - 1
        while segs[i].start > done:
            i -= 1
        if segs[i].start < done:  # a copy of cached blocks ran on into blocks not filled yet
            i += 1
            self._split(segs[i - 1], done)
        filled = [seg for seg in segs[i:] if seg.start < full]
        if filled[-1].end > full:
            self._split(filled[-1], full)
        for seg in filled:
            chain, start, end = seg.chain, seg.start, seg.end
            is_new = [not cached for cached in self._cached_positions(chain, start, end)]
            if all(is_new):
                seg.cached = True
                starts[chain[start]] = seg
                self._start_hashes.add(chain[start])
                continue
            # Some blocks copy cached ones: split the run where that changes and cache the rest.
            at = start
            while seg is not None:
                state = is_new[at - start]
                stop = at + 1
                while stop < end and is_new[stop - start] is state:
                    stop += 1
                rest = self._split(seg, stop) if stop < end else None
                if state:
                    seg.cached = True
                    starts[chain[at]] = seg
                    self._start_hashes.add(chain[at])
                seg, at = rest, stop

    def _extend_cached_run(self, rid: int, done: int, full: int) -> bool:
        """``_cache_filled`` for blocks ``done .. full - 1`` of content no block caches: if they start the request's
        last run (a prefill's next chunk, a decode's answer), cache them there and return True."""
        segs = self._segs[rid]
        last = segs[-1]
        if last.start != done:
            return False
        chain = last.chain
        before = segs[-2] if len(segs) > 1 else None
        if (before is not None and before.cached and before.end == done and before.chain is chain
                and len(before.holders) == 1):
            before.end = full  # the run it cached last grows
            if full == last.end:
                segs.pop()
            else:
                last.start = full
            return True
        if full < last.end:
            self._split(last, full)
        last.cached = True
        self._starts[chain[done]] = last
        self._start_hashes.add(chain[done])
        return True

    def _split(self, seg: _Seg, at: int) -> _Seg:
        """Split a run before position ``at``; the part from ``at`` on is a new run that keeps the old one's
        holders, cached state and place in the free queue, and follows it in each holder's list."""
        rest = _Seg(seg.chain, at, seg.end, list(seg.holders), seg.cached)
        seg.end = at
        cell = seg.cell
        if cell is not None:
            cell[0] = rest
            rest.cell = cell
            seg.cell = None
        if seg.cached:
            self._starts[seg.chain[at]] = rest
            self._start_hashes.add(seg.chain[at])
        for rid in seg.holders:
            segs = self._segs[rid]
            segs.insert(segs.index(seg) + 1, rest)
        return rest

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
                num_blocks -= self._take_cell(entry, num_blocks)
            else:
                take = min(entry.count, num_blocks)
                entry.count -= take
                num_blocks -= take
                if entry.count == 0:
                    queue.popleft()
                    if self._runs.get(entry.request_id) is entry:
                        del self._runs[entry.request_id]

    def _take_cell(self, cell: list, num_blocks: int) -> int:
        """Up to ``num_blocks`` blocks from the free-queue cell at the head, evicting their content; returns how
        many (the cell leaves the queue when it has none left, or was emptied by a hit)."""
        seg = cell[0]
        if seg is None:  # taken out by a hit
            self._queue.popleft()
            return 0
        start, end, chain = seg.start, seg.end, seg.chain
        if end - start > num_blocks:  # the run's last blocks go first
            seg.end = end - num_blocks
            return num_blocks
        self._queue.popleft()
        seg.cell = None
        seg.cached = False
        del self._starts[chain[start]]
        self._start_hashes.remove(chain[start])
        return end - start

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content a request could hit (held or free)."""
        named = sum(seg.end - seg.start for seg in self._starts.values())
        return named + sum(run.count for run in self._runs.values())

    def cached_hashes(self) -> set[int]:
        """The hashes of every cached named block (for checks and tests)."""
        return {h for seg in self._starts.values() for h in seg.chain[seg.start:seg.end]}

    def check_integrity(self) -> None:
        assert all(v > 0 for v in self._held.values()), "a request holds a non-positive number of blocks"
        assert 0 <= self.num_free_blocks <= self.num_blocks, "free block count out of range"
        if not self.caching:
            held = sum(self._held.values())
            assert held + self.num_free_blocks == self.num_blocks, (
                f"KV blocks not conserved: {held} held + {self.num_free_blocks} free != {self.num_blocks}")
            return
        shared = self._check_named()
        assert all(held >= self._num_named(rid) for rid, held in self._held.items()), (
            "a request lists more named blocks than it holds")
        own = sum(held - self._num_named(rid) for rid, held in self._held.items())
        queued = 0
        for entry in self._queue:
            kind = type(entry)
            if kind is int:
                assert entry > 0
                queued += entry
            elif kind is list:
                queued += self._cell_blocks(entry)
            else:
                queued += entry.count
        assert queued == self.num_free_blocks, f"free queue holds {queued} blocks, counter says {self.num_free_blocks}"
        assert own + shared + self.num_free_blocks == self.num_blocks, (
            f"KV blocks not conserved: {own} own + {shared} shared + {self.num_free_blocks} free "
            f"!= {self.num_blocks}")
        for rid, run in self._runs.items():
            assert run.request_id == rid and run.count > 0 and rid not in self._held

    def _check_named(self) -> int:
        """Check the named blocks' bookkeeping; returns how many named blocks are held (shared ones once)."""
        listed: dict[_Seg, list[int]] = {}  # each held run -> the requests listing it
        for rid, segs in self._segs.items():
            assert rid in self._held, "a request lists runs but holds no blocks"
            position = 0
            for seg in segs:
                assert seg.start == position < seg.end, "a request's runs do not tile its named blocks"
                position = seg.end
                listed.setdefault(seg, []).append(rid)
            done = self._num_cached.get(rid, 0)
            assert done <= position
            assert rid in self._copying or all(seg.cached for seg in segs if seg.start < done), (
                "a request holds copies among its full named blocks but is not marked as copying")
        for seg, rids in listed.items():
            assert sorted(seg.holders) == sorted(rids), "a run's holders are not the requests listing it"
            assert seg.cell is None, "a held run is in the free queue"
            assert seg.cached or len(rids) == 1, "a run nobody can hit is shared"
        cached_runs = [seg for seg in listed if seg.cached]
        cached_runs += [entry[0] for entry in self._queue if type(entry) is list and entry[0] is not None]
        hashes = [h for seg in cached_runs for h in seg.chain[seg.start:seg.end]]
        assert len(hashes) == len(set(hashes)), "a hash is cached twice"
        assert self._starts == {seg.chain[seg.start]: seg for seg in cached_runs}, "a cached run's start is lost"
        assert self._start_hashes == self._starts.keys(), "the set of cached runs' first hashes is not the index's"
        return sum(seg.end - seg.start for seg in listed)

    def _cell_blocks(self, cell: list) -> int:
        """Check a free-queue cell; returns the free blocks in it."""
        seg = cell[0]
        if seg is None:
            return 0
        assert not seg.holders and seg.cell is cell and seg.cached, "a free run is held or listed twice"
        assert seg.start < seg.end
        return seg.end - seg.start
