from types import SimpleNamespace

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsim.cluster.router import PrefixAware
from llmsim.cluster.simulation import simulate
from llmsim.config import ClusterConfig
from llmsim.kv_cache import BlockManager, request_block_hashes
from llmsim.request import Request, RequestStatus
from llmsim.schedulers import FCFSScheduler, SarathiScheduler
from tests.factories import make_config, make_requests


def apply(out):
    """Minimal executor: advance computed tokens, sample when caught up."""
    for c in out.prefills:
        c.request.num_computed_tokens += c.num_new_tokens
        if c.request.num_computed_tokens == c.request.num_tokens:
            c.request.num_generated_tokens += 1
    for r in out.decodes:
        r.num_computed_tokens += 1
        r.num_generated_tokens += 1


def test_fcfs_prefill_first_then_decode():
    s = FCFSScheduler(BlockManager(100, 16), max_num_seqs=8, max_num_batched_tokens=1000)
    a, b = Request(0, 0, 300, 4), Request(1, 0, 600, 4)
    s.add(a)
    out = s.schedule()
    assert [c.request for c in out.prefills] == [a] and not out.decodes
    apply(out)
    s.add(b)
    out = s.schedule()  # b's prefill runs alone: prefills are prioritised and never mixed with decodes
    assert [c.request for c in out.prefills] == [b] and not out.decodes
    apply(out)
    out = s.schedule()
    assert out.decodes == [a, b] and out.decode_kv_tokens == 301 + 601


def test_fcfs_token_budget_and_strict_order():
    s = FCFSScheduler(BlockManager(1000, 16), max_num_seqs=8, max_num_batched_tokens=1000)
    reqs = [Request(0, 0, 600, 2), Request(1, 0, 500, 2), Request(2, 0, 100, 2)]
    for r in reqs:
        s.add(r)
    out = s.schedule()
    # The second prompt would overflow the budget; the third must not jump the queue.
    assert [c.request.id for c in out.prefills] == [0]


def test_fcfs_preempts_latest_by_recompute_when_cache_full():
    s = FCFSScheduler(BlockManager(4, 16), max_num_seqs=8, max_num_batched_tokens=1000)
    a, b = Request(0, 0, 32, 50), Request(1, 0, 32, 50)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert len(out.prefills) == 2  # 2 blocks each: cache full
    apply(out)
    out = s.schedule()
    assert out.preempted == [b] and out.decodes == [a]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert s.waiting[0] is b
    s.blocks.check_integrity()


@pytest.mark.parametrize("fast_forward", [True, False])
def test_fcfs_drops_a_recomputed_request_whose_tokens_outgrew_the_budget_as_vllm_v0_does(fast_forward):
    """Preempted by recompute, a request re-runs its prompt and what it generated in one step; past the token
    budget it had waited at the head of the queue for ever, and the engine stopped ("empty batch with work
    queued"). vLLM v0 drops it (FINISHED_IGNORED): it is rejected with that reason; the others run."""
    cfg = make_config(
        cluster={"num_replicas": 1},
        scheduler={"name": "fcfs", "max_num_batched_tokens": 512, "num_gpu_blocks_override": 100},
        workload={"num_requests": 6, "arrival": {"kind": "poisson", "rate_per_s": 1000.0},
                  "prompt_tokens": {"kind": "fixed", "value": 450}, "output_tokens": {"kind": "fixed", "value": 400}},
        simulation={"fast_forward": fast_forward})
    result = simulate(cfg, make_requests([(0.0, 450, 400)] * 6))
    df = result.recorder.request_frame()
    dropped = df[df["reason"].str.contains("FINISHED_IGNORED")]
    assert len(dropped) >= 1 and (dropped["status"] == "rejected").all()
    assert (dropped["num_preemptions"] >= 1).all() and (dropped["num_generated_tokens"] > 62).all()
    assert "exceed max_num_batched_tokens 512 (vLLM v0 drops it" in dropped["reason"].iloc[0]
    assert set(df["status"]) == {"finished", "rejected"} and len(df) == 6
    assert (df[df["status"] == "finished"]["num_generated_tokens"] == 400).all()


@pytest.mark.parametrize("scheduler", ["fcfs", "sarathi", "vllm_v1"])
def test_a_resumption_hit_on_its_own_blocks_is_not_reported_as_a_prefix_cache_hit(scheduler):
    """``num_cached_tokens`` is the prefix-cache hit of a request's first admission. With fcfs or sarathi a
    request admitted without a hit had kept -1 until a recompute preemption's resumption hit its own blocks, and
    that hit (prompt and output so far, above the prompt) had been reported: no request here shares content."""
    cfg = make_config(cluster={"num_replicas": 1},
                      scheduler={"name": scheduler, "enable_prefix_caching": True, "num_gpu_blocks_override": 150,
                                 "max_num_batched_tokens": 2048},
                      workload={"num_requests": 40, "arrival": {"kind": "poisson", "rate_per_s": 1000.0},
                                "prompt_tokens": {"kind": "fixed", "value": 300},
                                "output_tokens": {"kind": "fixed", "value": 300}})
    df = simulate(cfg, make_requests([(0.0, 300, 300)] * 40)).recorder.request_frame()
    assert df["num_preemptions"].sum() > 0
    assert (df["num_cached_tokens"] == 0).all(), df[df["num_cached_tokens"] != 0]


def test_swap_preemption_keeps_kv_and_charges_transfer():
    s = FCFSScheduler(BlockManager(4, 16), max_num_seqs=8, max_num_batched_tokens=1000, preemption="swap",
                      kv_bytes_per_token=100.0)
    a, b = Request(0, 0, 32, 50), Request(1, 0, 32, 50)
    s.add(a)
    s.add(b)
    apply(s.schedule())
    out = s.schedule()
    assert out.preempted == [b]
    assert b.num_computed_tokens == 32  # its prompt's KV is kept, not dropped
    assert out.swap_bytes == b.num_computed_tokens * 100.0
    assert s.swapped_blocks == {1: 2} and s.num_swapped_blocks == 2  # host blocks of its 32 tokens


def test_swapped_kv_takes_host_blocks_until_it_comes_back_and_a_full_host_stops_the_engine():
    """vLLM's --swap-space: a request preempted by swap holds host blocks for its KV until it is swapped back in
    (or its client gives up); one that does not fit stops the engine, as vLLM v0's scheduler raises "Aborted due
    to the lack of CPU swap space", before anything changes."""
    from llmsim.errors import EngineAborted

    def scheduler(swap_space_blocks):
        s = FCFSScheduler(BlockManager(4, 16), max_num_seqs=8, max_num_batched_tokens=1000, preemption="swap",
                          kv_bytes_per_token=100.0, swap_space_blocks=swap_space_blocks)
        for i in range(2):
            s.add(Request(i, 0, 32, 50))
        apply(s.schedule())
        return s

    s = scheduler(2)
    apply(s.schedule())  # the second request goes to the host: both host blocks
    assert s.num_swapped_blocks == 2
    s.abort(s.running[0])  # the first leaves; the second comes back and frees its host blocks
    out = s.schedule()
    assert out.swap_bytes == 32 * 100.0 and s.num_swapped_blocks == 0 and not s.swapped_blocks
    s = scheduler(1)
    with pytest.raises(EngineAborted, match=r"swapping out request 1 needs 2 KV blocks of host memory, 1 of 1"):
        s.schedule()
    assert [r.id for r in s.running] == [0, 1] and s.num_swapped_blocks == 0  # nothing changed
    s = scheduler(2)
    apply(s.schedule())
    victim = s.waiting[0]
    s.abort(victim)  # a swapped-out request whose client gives up frees its host blocks too
    assert s.num_swapped_blocks == 0


def test_sarathi_decodes_first_then_chunks_within_budget():
    s = SarathiScheduler(BlockManager(1000, 16), chunk_size=256, max_num_seqs=64, max_num_batched_tokens=4096)
    a = Request(0, 0, 100, 10)
    s.add(a)
    apply(s.schedule())  # a's whole prompt fits one chunk
    big = Request(1, 0, 1000, 10)
    s.add(big)
    out = s.schedule()
    assert out.decodes == [a]
    assert [(c.request.id, c.num_new_tokens) for c in out.prefills] == [(1, 255)]
    apply(out)
    out = s.schedule()  # the part-way prefill continues, the decode is not stalled
    assert out.decodes == [a] and [(c.request.id, c.num_new_tokens, c.num_cached_tokens) for c in out.prefills] == [
        (1, 255, 255)]
    assert out.signature()[3] == 1  # only the decode samples; the unfinished chunk does not


def test_sarathi_last_chunk_samples_first_token():
    s = SarathiScheduler(BlockManager(1000, 16), chunk_size=64, max_num_seqs=64, max_num_batched_tokens=4096)
    r = Request(0, 0, 100, 3)
    s.add(r)
    apply(s.schedule())
    out = s.schedule()
    assert out.prefills[0].num_new_tokens == 36 and out.signature()[3] == 1


def test_sarathi_beats_fcfs_on_tail_tbt_and_goodput():
    """Sarathi-Serve's claim, on Mistral-7B / A100 at equal load: stall-free chunked prefill cuts P99 TBT and
    raises the rate of requests served within a TBT SLO; FCFS (prefill-prioritised) wins on TTFT."""
    from pathlib import Path

    from llmsim.config import parse_config
    from llmsim.run import run_experiment

    REPO = Path(__file__).resolve().parents[1]
    def run(scheduler):
        cfg = parse_config({
            "name": scheduler, "seed": 3, "model": {"name": "Mistral-7B"}, "hardware": {"device": "a100-80gb"},
            "cluster": {"num_replicas": 1},
            "scheduler": {"name": scheduler, "max_num_batched_tokens": 4096, "chunk_size": 512},
            "workload": {"num_requests": 400, "arrival": {"kind": "poisson", "rate_per_s": 5.0},
                         "lengths_from": {"path": str(REPO / "workloads/azure_conv_2023.csv"), "format": "azure"}},
            "slo": {"ttft_s": 2.0, "tpot_s": 0.1, "tbt_s": 0.1}}, "<test>")
        return run_experiment(cfg, write=False)[1]

    fcfs, sarathi = run("fcfs"), run("sarathi")
    assert sarathi["itl"]["p99_s"] < 0.5 * fcfs["itl"]["p99_s"]
    assert sarathi["slo"]["goodput_requests_per_s"] > 2 * fcfs["slo"]["goodput_requests_per_s"]
    assert sarathi["ttft"]["p90_s"] > fcfs["ttft"]["p90_s"]  # the price: prompts are chunked behind decodes


def test_a_policy_with_its_own_admission_order_plugs_in_by_name():
    """``tests/spf_scheduler.py`` (registered in conftest.py): a short prompt queued behind a long one that
    does not fit yet is admitted first, under fast-forward and stepping alike."""
    results = []
    for ff in (True, False):
        cfg = make_config(scheduler={"name": "spf", "max_num_batched_tokens": 4096, "max_num_seqs": 1},
                          cluster={"num_replicas": 1}, simulation={"fast_forward": ff})
        # One request decodes; a long and then a short prompt queue behind it (max_num_seqs 1).
        df = simulate(cfg, make_requests([(0.0, 100, 200), (0.1, 3000, 5), (0.2, 50, 5)])).recorder.request_frame()
        results.append(df)
        first = df.set_index("id")["first_token_s"]
        assert first[2] < first[1]
    pd.testing.assert_frame_equal(results[0], results[1], check_exact=True)


def test_sarathi_admits_only_when_the_whole_prompt_fits_and_reserves_it():
    """Sarathi-Serve's block manager: the prompt's blocks are checked and allocated at admission."""
    blocks = BlockManager(10, 16)  # 160 tokens of KV
    s = SarathiScheduler(blocks, max_num_seqs=8, max_num_batched_tokens=4096, chunk_size=64)
    long, short = Request(0, 0, 200, 4), Request(1, 0, 100, 4)
    s.add(long)
    out = s.schedule()
    assert out.is_empty and list(s.waiting) == [long]  # its first chunk would fit; its prompt does not
    s.waiting.clear()
    s.add(short)
    out = s.schedule()
    assert [(c.request, c.num_new_tokens) for c in out.prefills] == [(short, 64)]
    assert blocks.num_held(short) == 7  # all 100 prompt tokens' blocks, not the chunk's 4


def router_replicas(count: int, num_blocks: int) -> list[SimpleNamespace]:
    """Stand-ins for replicas, as a router sees them: an id, a routed-request count and a KV cache's size."""
    return [SimpleNamespace(id=i, num_outstanding=0, blocks=BlockManager(num_blocks, 16)) for i in range(count)]


def test_prefix_aware_router_follows_cached_prefixes_until_loads_drift_apart():
    replicas = router_replicas(3, 1000)
    router = PrefixAware(ClusterConfig(router="prefix_aware",
                                       prefix_aware={"balance_abs_threshold": 4, "balance_rel_threshold": 1.5}))

    def request(i, system):
        r = Request(i, 0.0, 400, 8)
        r.prefix_segments = ((system, 320),)  # 20 blocks of a shared system prompt
        return r

    first = router.pick(request(0, 7), replicas)
    first.num_outstanding += 1
    # The same system prompt follows the replica that has it; another prompt goes to the least loaded.
    assert router.pick(request(1, 7), replicas) is first
    other = router.pick(request(2, 8), replicas)
    assert other is not first and other.id == min(r.id for r in replicas if r is not first)
    # Once the loads drift apart beyond both thresholds, balance wins over the cache.
    first.num_outstanding = 10
    assert router.pick(request(3, 7), replicas) is not first
    # A request without named content is balanced as least-outstanding would.
    assert router.pick(Request(4, 0.0, 50, 5), replicas).num_outstanding == 0


def test_prefix_aware_router_knows_the_prompts_it_routed_not_their_answers():
    """A conversation turn names its answer (for the next turn's prompt), but the router only ever saw the
    prompt: the next turn shares 20 of its 50 prompt blocks with that replica (below the 0.5 threshold), not 40."""
    replicas = router_replicas(2, 1000)
    router = PrefixAware(ClusterConfig(router="prefix_aware"))
    turn = Request(0, 0.0, 320, 320, prefix_segments=((7, 320), (8, 320)))  # message, named answer
    first = router.pick(turn, replicas)
    first.num_outstanding += 1
    next_turn = Request(1, 0.0, 800, 16, prefix_segments=((7, 320), (8, 320), (9, 160), (10, 16)))
    assert router.pick(next_turn, replicas) is not first


def test_prefix_aware_router_forgets_the_ends_of_prompts_first():
    """The router's memory of a replica is bounded by its KV blocks and forgets the least recently routed blocks
    first -- a prompt's last blocks before its first, as a radix tree drops leaves (and vLLM's free queue a freed
    request's last block): what it still remembers of a prompt is a prefix, which a later request can match."""
    replicas = router_replicas(2, 25)
    router = PrefixAware(ClusterConfig(router="prefix_aware"))
    first = router.pick(Request(0, 0.0, 320, 8, prefix_segments=((7, 320),)), replicas)  # 20 blocks
    assert router.pick(Request(1, 0.0, 160, 8, prefix_segments=((8, 160),)), replicas) is first  # idle: tie
    # 30 blocks routed to a memory of 25: the first prompt's last 5 are forgotten, its first 15 (75%) matched.
    first.num_outstanding += 2
    assert router.pick(Request(2, 0.0, 320, 8, prefix_segments=((7, 320),)), replicas) is first


@given(seed=st.integers(0, 2**31), capacity=st.sampled_from([6, 20, 60]))
def test_prefix_aware_router_memory_is_the_plain_lru_of_the_blocks_it_routed(seed, capacity):
    """The router moves only the blocks it found (a prefix of the prompt) and adds the rest without looking:
    its memory is the plain LRU of every routed prompt's blocks, last block first, whatever the traffic --
    prompts sharing prefixes of several lengths, loads drifting apart, a memory a fraction of a prompt."""
    import random
    from collections import OrderedDict

    rng = random.Random(seed)
    replicas = router_replicas(3, capacity)
    router = PrefixAware(ClusterConfig(router="prefix_aware", prefix_aware={"balance_abs_threshold": 2}))
    reference = {rep.id: OrderedDict() for rep in replicas}
    for i in range(60):
        segments = tuple((rng.randint(0, 3), rng.choice([16, 40, 64])) for _ in range(rng.randint(1, 4)))
        prompt = sum(n for _, n in segments) + rng.choice([0, 7])
        request = Request(i, 0.0, prompt, 4, prefix_segments=segments)
        hashes = request_block_hashes(request, 16)[:prompt // 16]
        for rep in replicas:  # the binary search over the prompt finds the plain scan's count
            scan = next((k for k, h in enumerate(hashes) if h not in reference[rep.id]), len(hashes))
            assert router._known(rep, hashes) == scan
        choice = router.pick(request, replicas)
        choice.num_outstanding += rng.choice([0, 1, 1, 3])
        tree = reference[choice.id]
        for h in reversed(hashes):
            if h in tree:
                tree.move_to_end(h)
            else:
                tree[h] = None
        while len(tree) > capacity:
            tree.popitem(last=False)
        assert router.memory_blocks(choice.id) == list(tree)


def test_prefix_aware_router_memory_lets_go_of_prompts_a_later_one_took_over():
    """A prompt whose blocks a later one all touches leaves an empty entry in the memory's queue; with no eviction
    to pop them (a memory larger than all it is sent), they are dropped in bulk, and the memory stays the LRU."""
    replicas = router_replicas(1, 10_000)
    router = PrefixAware(ClusterConfig(router="prefix_aware"))
    for i in range(300):  # a 20-block system prompt and one of three one-block questions: each prompt is repeated
        router.pick(Request(i, 0.0, 336, 4, prefix_segments=((7, 320), (100 + i % 3, 16))), replicas)
        memory = router._memories[0]
        assert memory.size == len(memory.blocks()) == 20 + min(i + 1, 3)
    assert len(memory.queue) < 150 and memory.size == len(memory.blocks()) == 23
    last = request_block_hashes(Request(0, 0.0, 336, 1, prefix_segments=((7, 320), (100 + 299 % 3, 16))), 16)
    assert memory.blocks()[-21:] == list(reversed(last))  # the last prompt: most recent, its first block last
    assert router._known(replicas[0], last) == 21


def test_prefix_aware_router_follows_a_match_above_the_threshold_of_the_whole_prompt():
    """SGLang's match rate: the matched part over the whole prompt, not over its named content; a match of
    exactly ``cache_threshold`` is not followed."""

    def follows(prompt_tokens: int) -> bool:
        """A replica that was sent a 160-token system prompt, and has one request more than the other, is sent
        a prompt of ``prompt_tokens`` that starts with it."""
        replicas = router_replicas(2, 1000)
        router = PrefixAware(ClusterConfig(router="prefix_aware"))
        first = router.pick(Request(0, 0.0, 800, 8, prefix_segments=((7, 160),)), replicas)
        first.num_outstanding += 1
        return router.pick(Request(1, 0.0, prompt_tokens, 8, prefix_segments=((7, 160),)), replicas) is first

    assert not follows(800)  # all of its named content, a fifth of the prompt
    assert not follows(320)  # exactly 0.5
    assert follows(304)  # 0.53
