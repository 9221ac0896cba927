"""Prefix caching in the KV manager: chained block hashes, reference counts, the LRU free queue, a preempted
request's own cached blocks, and the hit rate on the Mooncake trace against an offline count."""

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsim.cluster.simulation import simulate
from llmsim.config import ConfigError
from llmsim.kv_cache import NO_HIT, BlockManager, _run_base, block_hashes, forget_hash_states
from llmsim.request import Request
from llmsim.schedulers import SCHEDULERS, Scheduler
from llmsim.workload import build_workload
from llmsim.workload.traces import mooncake_segments
from tests import kv_cache_reference as reference
from tests.factories import assert_nothing_lost, make_config

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
    hashes, parent, tokens, run = [], 0, [], None
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
            if len(block) > 1:
                parent, run = hash((parent, tuple(block))), None
            else:  # a whole block inside a segment: one on from the last if that was the same segment's
                seg_id, offset, _ = block[0]
                follows = run is not None and run == (seg_id, offset - block_size)
                parent, run = parent + 1 if follows else _run_base(parent, seg_id, offset, block_size), block[0][:2]
            hashes.append(parent)
            block, filled = [], 0
    return tuple(hashes)


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 80)), max_size=8), st.sampled_from([1, 4, 16]))
def test_block_hashes_equal_the_block_by_block_definition(segments, block_size):
    request = Request(0, 0.0, 10, 1, prefix_segments=tuple(segments))
    assert block_hashes(request, block_size) == _reference_block_hashes(segments, block_size)


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 40)), min_size=1, max_size=10), st.sampled_from([1, 4, 16]),
       st.lists(st.booleans(), min_size=10, max_size=10))
def test_a_conversation_turn_hashed_on_from_the_turn_before_equals_hashing_it_whole(segments, block_size, hashed):
    """``block_hashes`` carries on from the remembered end of a prompt one or two segments shorter (the turn
    before): whichever earlier prompts were hashed, each comes out as the block-by-block definition has it."""
    forget_hash_states()
    for k in range(1, len(segments) + 1):
        if hashed[k - 1] or k == len(segments):
            request = Request(k, 0.0, 10, 1, prefix_segments=tuple(segments[:k]))
            assert block_hashes(request, block_size) == _reference_block_hashes(segments[:k], block_size)
    listed = Request(0, 0.0, 10, 1, prefix_segments=[list(s) for s in segments])  # lists, from the Python API
    assert block_hashes(listed, block_size) == _reference_block_hashes(segments, block_size)


# Prompts that share content and part from each other at block boundaries and inside blocks: a system prompt
# (content 1), then one of two questions, then maybe an answer (content 5); or something else entirely.
_CONTENTS = [((1, 24),), ((1, 24), (2, 10)), ((1, 24), (3, 13)), ((1, 24), (2, 10), (5, 9)), ((1, 11), (4, 20)),
             ((6, 30),), ()]
_ANSWERING = len(_CONTENTS)  # content index of a request whose answer is named too (a conversation's turn)
_KINDS = ["admit"] * 3 + ["step"] * 3 + ["decode", "decode_batch", "decode_run", "decode_steps", "reserve", "finish",
                                         "finish", "preempt", "probe"]
_OPS = st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 5), st.integers(1, 40),
                          st.integers(0, _ANSWERING)),
                min_size=1, max_size=100)


@settings(max_examples=300, deadline=None)
@given(_OPS, st.sampled_from([(4, 30), (4, 60), (8, 14)]))
def test_runs_of_blocks_behave_as_vllm_s_block_at_a_time_cache(ops, shape):
    """The manager keeps named blocks in runs; vLLM keeps them one by one (``kv_cache_reference``). Driven with
    the same admissions (hits that end inside a run, on held and on free blocks), chunks, decodes one by one and
    in bulk, finishes, preemptions and evictions, the two agree on every hit, every admission, and every count."""
    _drive_both(ops, shape)


def test_runs_of_blocks_behave_as_vllm_s_block_at_a_time_cache_on_long_random_runs():
    """The same on 300 longer seeded sequences, which reach the rarer cases (a hit ending inside a free run, a
    fill that copies some cached blocks and caches others) hundreds of times."""
    rng = random.Random(7)
    for _ in range(300):
        ops = [(rng.choice(_KINDS), rng.randrange(6), rng.randint(1, 40), rng.randrange(_ANSWERING + 1))
               for _ in range(200)]
        _drive_both(ops, rng.choice([(4, 30), (4, 60), (8, 14)]))


def _drive_both(ops, shape):
    block_size, num_blocks = shape
    managers = (BlockManager(num_blocks, block_size, enable_prefix_caching=True),
                reference.BlockManager(num_blocks, block_size, enable_prefix_caching=True))
    twins: dict[int, tuple[Request, Request]] = {}  # each manager mutates its own copy of a request
    running: list[int] = []
    for op, key, n, content in ops:
        if key not in twins:
            if content == _ANSWERING:  # a system prompt, then an answer of its own the request generates
                segments, length = ((1, 24), (100 + key, 40)), 27
            else:
                segments = _CONTENTS[content]
                length = sum(s for _, s in segments) + 3 + key
            twins[key] = tuple(Request(key, 0, length, 30, prefix_segments=segments) for _ in managers)
        pair = twins[key]
        if op == "admit" and key not in running:
            hits = [bm.lookup(r) for bm, r in zip(managers, pair)]
            assert (hits[0].num_tokens, hits[0].num_evictable, hits[0].num_run_blocks) == (
                hits[1].num_tokens, hits[1].num_evictable, hits[1].num_run_blocks)
            take = min(n, pair[0].num_tokens - hits[0].num_tokens)
            admitted = {bm.allocate_slots(r, hit, take) for bm, r, hit in zip(managers, pair, hits)}
            assert len(admitted) == 1
            if admitted.pop():
                for r in pair:
                    r.num_computed_tokens += take
                running.append(key)
        elif op == "step" and key in running and pair[0].num_pending_tokens > 1:
            take = min(n, pair[0].num_pending_tokens - 1)
            if managers[0].can_allocate(pair[0], take):
                for bm, r in zip(managers, pair):
                    bm.allocate(r, take)
                    r.num_computed_tokens += take
        elif op == "decode" and key in running and managers[0].num_free_blocks:
            for bm, r in zip(managers, pair):
                bm.append_slot(r)
                r.num_computed_tokens += 1
        elif op == "reserve" and key in running and managers[0].num_free_blocks:
            # A block held ahead of the tokens, not filled yet (a migration's destination reserves so).
            for bm, r in zip(managers, pair):
                bm.grow_to(r, bm.num_held(r) + 1)
        elif op == "decode_batch" and running and managers[0].num_free_blocks >= len(running):
            # One token for every running request, the blocks in one call (the schedulers' fast path).
            for i, bm in enumerate(managers):
                batch = [twins[k][i] for k in running]
                bm.append_slots(batch)
                for r in batch:
                    r.num_computed_tokens += 1
        elif op == "decode_run" and running:
            # Every running request advances n tokens, then the blocks catch up in one call (fast-forward).
            need = sum(max(0, managers[0].blocks_for(twins[k][0].num_computed_tokens + n)
                           - managers[0].num_held(twins[k][0])) for k in running)
            if need <= managers[0].num_free_blocks:
                for i, bm in enumerate(managers):
                    batch = [twins[k][i] for k in running]
                    for r in batch:
                        r.num_computed_tokens += n
                    bm.grow_to_computed(batch)
        elif op == "decode_steps":
            # A pure decode run of n steps, booked as the simulator books one: the first step's slots when it is
            # scheduled, the others in one call after the run; the reference books every step.
            decoding = [k for k in running if twins[k][0].num_computed_tokens >= twins[k][0].num_prompt_tokens]
            need = sum(max(0, managers[0].blocks_for(twins[k][0].num_computed_tokens + n)
                           - managers[0].num_held(twins[k][0])) for k in decoding)
            if decoding and need <= managers[0].num_free_blocks:
                for i, bm in enumerate(managers):
                    batch = [twins[k][i] for k in decoding]
                    bm.append_slots(batch)
                    for r in batch:
                        r.num_computed_tokens += n
                    bm.grow_to_computed(batch, n)
        elif op in ("finish", "preempt") and key in running:
            for bm, r in zip(managers, pair):
                bm.free(r, keep_cached=op == "preempt")
                r.num_computed_tokens = 0
            running.remove(key)
            if op == "finish":
                del twins[key]
        elif op == "probe" and key not in running:
            assert len({bm.hit_may_grow(r, [twins[k][i] for k in running])
                        for i, (bm, r) in enumerate(zip(managers, pair))}) == 1
        for bm in managers:
            bm.check_integrity()
        new, ref = managers
        assert (new.num_free_blocks, new.num_cached_blocks) == (ref.num_free_blocks, ref.num_cached_blocks)
        assert new.cached_hashes() == ref.cached_hashes()
        for k in running:
            assert new.num_held(twins[k][0]) == ref.num_held(twins[k][1])
            assert new.fills_named_blocks(twins[k][0]) == ref.fills_named_blocks(twins[k][1])
        for a, b in twins.values():  # the manager finds cached content from its runs' first blocks alone
            assert new.fills_cached_content(a) == ref.fills_cached_content(b)


@pytest.mark.parametrize("scheduler", ["fcfs", "sarathi"])
def test_vllm_v0_with_prefix_caching_prefills_only_what_is_not_cached(scheduler, monkeypatch):
    """vLLM v0's --enable-prefix-caching (``scheduler.enable_prefix_caching`` with ``fcfs`` or, beside chunked
    prefill, ``sarathi``; off by default, as in v0): a request starts from its longest cached prefix, so shared
    system prompts are prefilled once; results with it off are those without it, and nothing is lost either way."""

    def run(caching):
        cfg = make_config(scheduler={"name": scheduler, "max_num_batched_tokens": 4096, "chunk_size": 512,
                                     **({} if caching is None else {"enable_prefix_caching": caching})},
                          workload={"num_requests": 120, "arrival": {"kind": "poisson", "rate_per_s": 4.0},
                                    "shared_prefix": {"num_system_prompts": 2, "users_per_system_prompt": 6,
                                                      "system_prompt_tokens": 1000, "question_tokens": 100,
                                                      "output_tokens": 60}})
        assert cfg.scheduler.prefix_caching is bool(caching)
        result = simulate(cfg, build_workload(cfg.workload, cfg.seed))
        df = assert_nothing_lost(result, 120)
        it = result.recorder.iteration_frame()
        return df, int(it["num_prefill_tokens"].sum())

    default, default_prefill = run(None)
    off, off_prefill = run(False)
    on, on_prefill = run(True)
    assert default_prefill == off_prefill and default.equals(off)  # off by default
    assert (off["num_cached_tokens"] == 0).all() and (on["num_cached_tokens"] > 0).mean() > 0.9
    assert on_prefill < 0.3 * off_prefill  # ~1,000 of each ~1,100-token prompt is one of two system prompts
    assert on["first_token_s"].sub(on["arrival_s"]).mean() < off["first_token_s"].sub(off["arrival_s"]).mean()
    # A policy that does not look prefixes up refuses the setting.
    monkeypatch.setitem(SCHEDULERS, "plain", type("Plain", (Scheduler,), {}))
    with pytest.raises(ConfigError, match="enable_prefix_caching is not modelled for the plain scheduler"):
        make_config(scheduler={"name": "plain", "enable_prefix_caching": True})

