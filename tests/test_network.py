"""KV copies between instances over shared links (``llmsim.cluster.network``)."""

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsim.clock import Clock
from llmsim.cluster.network import Network
from llmsim.cluster.simulation import simulate
from tests.factories import assert_nothing_lost, make_config, make_requests


def landings(copies, bandwidth=1.0, latency_s=0.0):
    """Run copies ``(start_s, src, dst, bytes)`` (instances of one GPU each) and return when each landed."""
    env = Clock()
    net = Network(env)
    landed = {}

    def start(i, at, src, dst, num_bytes):
        yield env.timeout(at)
        net.copy((src, 1), (dst, 1), num_bytes, bandwidth, latency_s, "inter_node",
                 lambda: landed.__setitem__(i, env.now))

    for i, (at, src, dst, num_bytes) in enumerate(copies):
        env.process(start(i, at, src, dst, num_bytes))
    env.run()
    return [landed[i] for i in range(len(copies))], net


def test_a_copy_alone_takes_latency_plus_bytes_over_its_gpu_pairs_bandwidth():
    env = Clock()
    net = Network(env)
    landed = []
    net.copy((0, 4), (1, 2), 6e9, 25e9, 5e-6, "inter_node", lambda: landed.append(env.now))
    env.run()
    assert landed == [pytest.approx(6e9 / (2 * 25e9) + 5e-6, rel=1e-12)]  # two GPU pairs in parallel
    assert net.stats.summary() == {"copies": 1, "bytes": 6e9, "max_concurrent": 1, "copies_slowed": 0}


def test_copies_into_one_instance_share_its_link():
    times, net = landings([(0.0, 0, 9, 10.0), (0.0, 1, 9, 10.0)], latency_s=0.5)
    assert times == [pytest.approx(20.5), pytest.approx(20.5)]  # each at half the link: 20 s, then the latency
    assert net.stats.max_concurrent == 2 and net.stats.copies_slowed == 2
    # Into different instances from different ones: nothing shared, each at the full rate.
    times, net = landings([(0.0, 0, 8, 10.0), (0.0, 1, 9, 10.0)])
    assert times == [pytest.approx(10.0), pytest.approx(10.0)] and net.stats.copies_slowed == 0


def test_a_copy_joining_later_takes_its_share_from_then_on():
    # 10 bytes alone for 4 s (6 left), then two copies share: the first's 6 take 12 s (lands at 16), then the
    # second, which moved 6 of its 10 meanwhile, has the link alone for its last 4 (lands at 20).
    times, _ = landings([(0.0, 0, 9, 10.0), (4.0, 1, 9, 10.0)])
    assert times == [pytest.approx(16.0), pytest.approx(20.0)]


def test_rates_are_max_min_fair_across_both_ends():
    # Three copies into instance 9 share its link (1/3 each); the copy out of instance 0 to instance 8 takes what
    # instance 0's link has left beside its copy into 9 (2/3), not an even half.
    copies = [(0.0, 0, 8, 2.0), (0.0, 0, 9, 1.0), (0.0, 1, 9, 1.0), (0.0, 2, 9, 1.0)]
    times, _ = landings(copies)
    # At 2/3 the first moves 2 bytes in 3 s, the same 3 s the three copies into 9 take at 1/3.
    assert times == [pytest.approx(3.0)] * 4


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(0, 3), st.integers(4, 6), st.floats(0.01, 10)),
                min_size=1, max_size=12))
def test_every_copy_lands_no_sooner_than_alone_and_the_links_are_never_overdrawn(copies):
    times, net = landings(copies)
    for (at, _, _, num_bytes), landed in zip(copies, times):
        assert landed >= at + num_bytes * (1 - 1e-9)  # the link's bandwidth is 1 a second
    assert not net.active
    # All bytes of the copies have left by the last landing, at no more than one byte a second per link:
    # each destination's bytes take at least their sum.
    for dst in {c[2] for c in copies}:
        mine = [(c, t) for c, t in zip(copies, times) if c[2] == dst]
        first = min(c[0] for c, _ in mine)
        assert max(t for _, t in mine) >= first + sum(c[3] for c, _ in mine) * (1 - 1e-9)


def test_distserve_hand_offs_contend_for_the_decode_instances_link():
    """Four prefill instances hand over to one decode instance across nodes: their copies share its link, so
    they land later than each would alone, and nothing is lost."""
    specs = [(0.01 * i, 3000, 50) for i in range(24)]
    cfg = make_config(cluster={"policy": "distserve", "distserve": {"prefill": {"replicas": 4},
                                                                    "decode": {"replicas": 1},
                                                                    "kv_link": "inter_node"}},
                      scheduler={"name": "vllm_v1", "max_num_batched_tokens": 8192})
    result = simulate(cfg, make_requests(specs))
    assert_nothing_lost(result, len(specs))
    stats = result.kv_copies
    assert stats.copies == len(specs) and stats.max_concurrent >= 2 and stats.copies_slowed >= 2
    # The copies land between the decode instance's steps as they would if it stepped one iteration at a time.
    stepped = simulate(cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update={"fast_forward": False})}),
                       make_requests(specs))
    pd.testing.assert_frame_equal(result.recorder.request_frame(), stepped.recorder.request_frame(),
                                  check_exact=True)
    assert vars(stepped.kv_copies) == vars(stats)
