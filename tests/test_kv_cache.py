import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmsim.kv_cache import BlockManager
from llmsim.request import Request


def test_allocate_append_free():
    bm = BlockManager(10, 16)
    r = Request(0, 0.0, 20, 5)
    assert bm.num_new_blocks(r, 20) == 2
    bm.allocate(r, 20)
    r.num_computed_tokens = 20
    assert bm.num_new_blocks(r, 1) == 0  # token 21 fits in the second block
    r.num_computed_tokens = 32
    assert bm.num_new_blocks(r, 1) == 1
    assert bm.free(r) == 2 and bm.num_free_blocks == 10
    bm.check_integrity()


def test_watermark_blocks_admission_not_growth():
    bm = BlockManager(10, 16, watermark_blocks=2)
    r = Request(0, 0.0, 16 * 9, 5)
    assert not bm.can_admit(r, 16 * 9) and bm.can_allocate(r, 16 * 9)


def test_over_allocation_raises():
    bm = BlockManager(1, 16)
    with pytest.raises(RuntimeError):
        bm.allocate(Request(0, 0.0, 40, 1), 40)


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40), st.booleans()), max_size=200))
def test_blocks_are_conserved_under_any_sequence(ops):
    bm = BlockManager(64, 8)
    reqs = [Request(i, 0.0, 10, 10) for i in range(8)]
    for idx, n, free in ops:
        r = reqs[idx]
        if free:
            bm.free(r)
            r.num_computed_tokens = 0
        elif bm.can_allocate(r, n):
            bm.allocate(r, n)
            r.num_computed_tokens += n
            assert bm.num_held(r) == bm.blocks_for(r.num_computed_tokens)
        bm.check_integrity()


def _run_with_evictions(bulk: bool, pool: int, pre: int, x_tokens: int, steps: int, x_first: bool):
    """A decode run of request 20 (whose answer is named content) beside an unrelated request that takes new
    blocks, while request 32 -- the next round of 20's conversation, preempted, so its copy of 20's answer sits
    cached in the free queue -- waits: stepping (each step's slots in batch order) or the bulk bookkeeping of a
    fast-forwarded run. Returns what a later step can see (32's hit, free blocks, every cached hash), or None
    where the setup does not fit the pool."""
    bm = BlockManager(pool, 16, enable_prefix_caching=True)
    r20 = Request(20, 0.0, 48, 200, prefix_segments=((1, 48), (2, 64)))
    r32 = Request(32, 0.0, 144, 16, prefix_segments=((1, 48), (2, 64), (3, 32)))
    x = Request(7, 0.0, x_tokens, 400)
    assert bm.allocate_slots(r20, bm.lookup(r20), 48)
    r20.num_computed_tokens = 48
    while r20.num_computed_tokens < pre:
        bm.append_slot(r20)
        r20.num_computed_tokens += 1
        r20.num_generated_tokens += 1
    hit = bm.lookup(r32)
    if not bm.allocate_slots(r32, hit, r32.num_tokens - hit.num_tokens):
        return None
    r32.num_computed_tokens = 144
    bm.free(r32, keep_cached=True)  # preempted by recompute
    r32.num_computed_tokens = 0
    if not bm.can_allocate(x, x_tokens):
        return None
    bm.allocate(x, x_tokens)
    x.num_computed_tokens = x_tokens
    batch = [x, r20] if x_first else [r20, x]
    if sum(bm.blocks_for(r.num_computed_tokens + steps) - bm.num_held(r) for r in batch) > bm.num_free_blocks:
        return None
    for step in range(steps):
        if step == 0 or not bulk:  # a run's first step is scheduled like any other
            for r in batch:
                bm.append_slot(r)
        if not bulk or step == steps - 1:
            advance = 1 if not bulk else steps
            for r in batch:
                r.num_computed_tokens += advance
                r.num_generated_tokens += advance
    if bulk:
        bm.grow_to_computed(batch, steps)
    bm.check_integrity()
    hit = bm.lookup(r32)
    return hit.num_tokens, hit.num_evictable, bm.num_free_blocks, sorted(bm.cached_hashes())


@given(pool=st.integers(14, 30), pre=st.sampled_from([48, 56, 63, 64, 70]), x_tokens=st.integers(2, 20).map(lambda k: 8 * k),
       steps=st.integers(2, 60), x_first=st.booleans())
@example(pool=14, pre=48, x_tokens=16, steps=60, x_first=True)  # the bulk path cached 96 tokens of 32's, stepping 80
def test_a_fast_forwarded_decode_run_caches_what_stepping_caches_under_evictions(pool, pre, x_tokens, steps, x_first):
    """Stepping fills named blocks and evicts the free queue's cached blocks step by step; the bulk path of a
    decode run replays those steps where their order decides what stays cached (a fill whose hash a free block
    caches is a copy until that block is evicted), so both leave the same cache."""
    assert _run_with_evictions(True, pool, pre, x_tokens, steps, x_first) == \
        _run_with_evictions(False, pool, pre, x_tokens, steps, x_first)
