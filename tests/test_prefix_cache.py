"""Prefix caching in the KV manager: chained block hashes, reference counts, the LRU free queue, a preempted
request's own cached blocks, and the hit rate on the Mooncake trace against an offline count."""

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from llmsim.kv_cache import NO_HIT, BlockManager, block_hashes
from llmsim.request import Request
from llmsim.workload.traces import mooncake_segments

MOONCAKE = Path(__file__).parent.parent / "workloads" / "mooncake_conversation.jsonl"


def admit(bm: BlockManager, r: Request, n: int | None = None) -> int:
    """Admit ``r`` from its cached prefix plus ``n`` tokens (default: the rest); returns the hit tokens."""
    hit = bm.lookup(r)
    n = r.num_tokens - hit.num_tokens if n is None else n
    assert bm.allocate_slots(r, hit, n)
    r.num_computed_tokens += n
    return hit.num_tokens


def test_hashes_chain_and_split_segments_into_blocks():
    a = Request(0, 0, 64, 1, prefix_segments=((7, 40), (8, 24)))
    b = Request(1, 0, 64, 1, prefix_segments=((7, 40), (9, 24)))
    c = Request(2, 0, 64, 1, prefix_segments=((6, 40), (8, 24)))
    ha, hb, hc = (block_hashes(r, 16) for r in (a, b, c))
    assert len(ha) == 4  # 64 named tokens: four full blocks
    assert ha[:2] == hb[:2] and ha[2] != hb[2]  # block 2 mixes tokens 32-39 of 7 with 0-7 of 8 or 9
    assert ha[3] != hc[3]  # same content, other parent: another block
    assert block_hashes(Request(3, 0, 64, 1, prefix_segments=((7, 20),)), 16) == ha[:1]  # a partial block has none


def test_second_request_reuses_the_shared_prefix_and_leaves_one_token():
    bm = BlockManager(100, 16, enable_prefix_caching=True)
    a = Request(0, 0, 100, 5, prefix_segments=((1, 64),))
    b = Request(1, 0, 100, 5, prefix_segments=((1, 64),))
    same = Request(2, 0, 64, 5, prefix_segments=((1, 64),))
    assert admit(bm, a) == 0
    assert admit(bm, b) == 64  # four shared blocks
    assert bm.num_used_blocks == 7 + 7 - 4
    assert bm.lookup(same).num_tokens == 48  # all 64 tokens cached, but the last must be computed
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 100 and bm.num_cached_blocks == 4
    bm.check_integrity()


def test_lru_evicts_the_oldest_freed_and_a_request_s_last_block_first():
    bm = BlockManager(8, 16, enable_prefix_caching=True)
    a = Request(0, 0, 64, 1, prefix_segments=((1, 64),))
    admit(bm, a)
    bm.free(a)  # queue: 4 fresh blocks, then a's blocks 3, 2, 1, 0
    fill = Request(1, 0, 16 * 5, 1)
    admit(bm, fill)  # takes the 4 fresh blocks and a's last block
    bm.check_integrity()
    again = Request(2, 0, 65, 1, prefix_segments=((1, 64),))
    assert bm.lookup(again).num_tokens == 48  # blocks 0-2 are still cached


def test_recompute_preemption_keeps_own_blocks_for_the_resume():
    bm = BlockManager(20, 16, enable_prefix_caching=True)
    r = Request(0, 0, 100, 50)
    admit(bm, r)
    r.num_generated_tokens, r.num_computed_tokens = 10, 110
    bm.free(r, keep_cached=True)
    r.num_computed_tokens = 0
    assert bm.lookup(r).num_tokens == 96  # its 6 full blocks, unnamed content only it can hit
    other = Request(1, 0, 100, 5)
    assert bm.lookup(other) is NO_HIT
    admit(bm, other)  # 7 blocks from the head: 13 never used and r's partial block come first
    assert bm.lookup(r).num_tokens == 96
    admit(bm, Request(2, 0, 16 * 9, 1))  # the 7 left before the run, then the run's top two
    assert bm.lookup(r).num_tokens == 64
    bm.check_integrity()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "step", "finish", "preempt"]), st.integers(0, 5),
                          st.integers(1, 80), st.integers(0, 3)), min_size=1, max_size=60))
def test_references_and_free_queue_stay_consistent(ops):
    """Random admissions (shared or own content), chunks, finishes and preemptions; after each, every block is
    counted once, reference counts match the holders, and the free queue holds exactly the free blocks."""
    bm = BlockManager(24, 8, enable_prefix_caching=True)
    requests: dict[int, Request] = {}
    running: set[int] = set()
    for op, key, n, content in ops:
        if key not in requests:
            requests[key] = Request(key, 0, 16 + 8 * content + key, 200, prefix_segments=((content, 8 * content + 12),))
        r = requests[key]
        if op == "admit" and key not in running:
            hit = bm.lookup(r)
            if hit.num_tokens == 0 and r.num_computed_tokens:
                continue
            take = min(n, r.num_tokens - hit.num_tokens)
            if bm.allocate_slots(r, hit, take):
                r.num_computed_tokens += take
                running.add(key)
        elif op == "step" and key in running:
            pending = r.num_tokens - r.num_computed_tokens
            take = min(n, pending) if pending else 1
            if bm.can_allocate(r, take):
                bm.allocate(r, take)
                r.num_computed_tokens += take
                if r.num_computed_tokens == r.num_tokens:
                    r.num_generated_tokens += 1
        elif op in ("finish", "preempt") and key in running:
            bm.free(r, keep_cached=op == "preempt")
            running.discard(key)
            r.num_computed_tokens = 0
            if op == "finish":
                del requests[key]
        bm.check_integrity()


def _mooncake_requests(limit: int) -> list[Request]:
    out = []
    with MOONCAKE.open() as f:
        for i, line in zip(range(limit), f):
            row = json.loads(line)
            out.append(Request(i, 0, row["input_length"], 1,
                               prefix_segments=mooncake_segments(tuple(row["hash_ids"]), row["input_length"])))
    return out


def _offline_hit_tokens(requests: list[Request], block_size: int) -> int:
    """Count, without the KV manager, each prompt's longest prefix of 16-token blocks that an earlier prompt
    also had: block k of a prompt is (its 512-token ids up to block k's, k's place in its 512-token block)."""
    per = 512 // block_size
    seen: set = set()
    total = 0
    for r in requests:
        ids = [h for h, _ in r.prefix_segments]
        keys = [(tuple(ids[:k // per + 1]), k % per) for k in range(r.num_prompt_tokens // block_size)]
        hit = 0
        for key in keys[:(r.num_prompt_tokens - 1) // block_size]:
            if key not in seen:
                break
            hit += 1
        total += hit * block_size
        seen.update(keys)
    return total


def test_mooncake_hit_rate_unbounded_equals_offline_count_and_bounded_is_lower():
    requests = _mooncake_requests(1500)
    expected = _offline_hit_tokens(requests, 16)

    def run(num_blocks):
        bm = BlockManager(num_blocks, 16, enable_prefix_caching=True)
        hits = 0
        for r in requests:
            r.num_computed_tokens, r.block_hashes = 0, None
            hits += admit(bm, r)
            bm.free(r)
        bm.check_integrity()
        return hits

    assert expected > 0
    assert run(10**7) == expected
    assert run(8000) < expected


def _reference_block_hashes(segments, block_size):
    """Block hashes the plain way, one block at a time from its pieces: what the fast path must equal."""
    hashes, parent, tokens = [], 0, []
    for seg_id, seg_len in segments:
        if seg_len == 0:
            tokens.append((seg_id, 0, None))  # an empty piece joins the block it falls in
        tokens += [(seg_id, i, 1) for i in range(seg_len)]
    block, filled = [], 0
    for seg_id, offset, one in tokens:
        if one is None:
            block.append((seg_id, 0, 0))
            continue
        if block and block[-1][0] == seg_id and block[-1][1] + block[-1][2] == offset and block[-1][2] > 0:
            block[-1] = (seg_id, block[-1][1], block[-1][2] + 1)
        else:
            block.append((seg_id, offset, 1))
        filled += 1
        if filled == block_size:
            parent = hash((parent, *block[0])) if len(block) == 1 else hash((parent, tuple(block)))
            hashes.append(parent)
            block, filled = [], 0
    return tuple(hashes)


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 80)), max_size=8), st.sampled_from([1, 4, 16]))
def test_block_hashes_equal_the_block_by_block_definition(segments, block_size):
    request = Request(0, 0.0, 10, 1, prefix_segments=tuple(segments))
    assert block_hashes(request, block_size) == _reference_block_hashes(segments, block_size)
