"""Summary statistics: one percentile definition everywhere, and vLLM's metric names."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsim.metrics.summary import _exact_sum_of_products, pooled_percentiles
from llmsim.run import run_experiment
from tests.factories import make_config


@given(st.lists(st.tuples(st.floats(0.0, 10.0), st.integers(1, 50)), min_size=1, max_size=40),
       st.floats(0.0, 100.0))
def test_pooled_percentile_is_numpys_percentile_of_the_expanded_sample(pairs, q):
    values = np.array([v for v, _ in pairs])
    counts = np.array([c for _, c in pairs], dtype=np.int64)
    qs = (q, 50.0, 90.0, 99.0)  # one sort serves them all
    assert pooled_percentiles(values, counts, qs) == [np.percentile(np.repeat(values, counts), x) for x in qs]


@given(st.lists(st.tuples(st.floats(-1e9, 1e9, allow_subnormal=True) | st.sampled_from([0.0, -0.0, 1e-300]),
                          st.integers(1, 5)), min_size=1, max_size=60),
       st.floats(0.0, 100.0))
def test_pooled_percentile_over_any_magnitudes_and_signs(pairs, q):
    """Values that span many of the buckets ``pooled_percentiles`` sorts separately, negative ones and -0.0 among
    them, give numpy's percentile all the same."""
    values = np.array([v for v, _ in pairs])
    counts = np.array([c for _, c in pairs], dtype=np.int64)
    qs = (q, 0.0, 50.0, 100.0)
    assert pooled_percentiles(values, counts, qs) == [np.percentile(np.repeat(values, counts), x) for x in qs]


@given(st.lists(st.tuples(st.floats(0.0, 10.0) | st.sampled_from([0.0125, 0.5]), st.integers(1, 6)), min_size=1,
                max_size=40), st.data())
def test_gaps_taken_back_leave_the_sample(pairs, data):
    """Gaps a request that ended unfinished takes back (the same values, counted -1, recorded after the others)
    leave the pooled sample: percentiles and max are numpy's over what is left."""
    values = [v for v, _ in pairs]
    counts = [c for _, c in pairs]
    kept = list(np.repeat(values, counts))
    taken = data.draw(st.lists(st.integers(0, len(kept) - 1), unique=True, max_size=len(kept) - 1))
    back = [kept[i] for i in taken]
    for i in sorted(taken, reverse=True):
        del kept[i]
    all_values = np.array(values + back)
    all_counts = np.array(counts + [-1] * len(back), dtype=np.int64)
    qs = (0.0, 50.0, 90.0, 99.0, 100.0)
    assert pooled_percentiles(all_values, all_counts, qs) == [np.percentile(kept, x) for x in qs]
    assert pooled_percentiles(all_values, all_counts, (100.0,)) == [max(kept)]  # ITL's max


@given(st.lists(st.tuples(st.floats(1e-7, 100.0), st.integers(1, 2**45)), min_size=1, max_size=20))
def test_gaps_taken_back_are_summed_exactly(pairs):
    """ITL's mean subtracts the gaps taken back as one exact sum of their products (rounded once), so that the mean
    does not depend on how the same gaps were grouped into (value, count) entries."""
    values = np.array([v for v, _ in pairs])
    times = np.array([t for _, t in pairs], dtype=np.int64)
    assert _exact_sum_of_products(values, times) == float(sum(Fraction(v) * t for v, t in pairs))


def test_pooled_percentile_of_many_gaps_is_numpys():
    """Tens of thousands of gaps as a run records them (step durations, repeated, with counts): many per bucket,
    and ties that straddle no bucket boundary but fill whole buckets."""
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.lognormal(-4.0, 0.6, 40_000), np.full(5_000, 0.0125), rng.uniform(0, 3, 5_000)])
    counts = rng.integers(1, 40, len(values))
    qs = (50.0, 90.0, 99.0, 99.9, 12.5)
    assert pooled_percentiles(values, counts, qs) == [np.percentile(np.repeat(values, counts), x) for x in qs]


def test_summary_speaks_vllm_benchmark_names_in_ms():
    cfg = make_config(workload={"num_requests": 50, "arrival": {"kind": "poisson", "rate_per_s": 5.0},
                                "prompt_tokens": {"kind": "uniform", "min": 16, "max": 600},
                                "output_tokens": {"kind": "uniform", "min": 1, "max": 80}})
    result, s = run_experiment(cfg, write=False)
    assert s["completed"] == s["requests"]["finished"] == 50
    for ours, theirs in (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2e", "e2el")):
        assert s[f"mean_{theirs}_ms"] == s[ours]["mean_s"] * 1e3
        assert s[f"median_{theirs}_ms"] == s[ours]["p50_s"] * 1e3
        assert s[f"p99_{theirs}_ms"] == s[ours]["p99_s"] * 1e3
    assert s["request_throughput"] == s["throughput"]["requests_per_s"]
    assert s["request_goodput"] == s["slo"]["goodput_requests_per_s"]
    # ITL pools every gap between consecutive tokens: one fewer than the tokens of each request.
    df = result.recorder.request_frame()
    assert s["itl"]["count"] == int((df["num_generated_tokens"] - 1).sum())


def test_pooled_slo_is_sarathi_serves_capacity_criterion():
    """P99 of all token gaps and the median scheduling delay, over the whole run; attainment 1 or 0."""
    base = dict(workload={"num_requests": 80, "arrival": {"kind": "poisson", "rate_per_s": 4.0},
                          "prompt_tokens": {"kind": "uniform", "min": 200, "max": 2000},
                          "output_tokens": {"kind": "uniform", "min": 20, "max": 120}},
                scheduler={"name": "fcfs", "max_num_batched_tokens": 4096})
    _, s = run_experiment(make_config(**base), write=False)
    itl, queueing = s["itl"]["p99_s"], s["queueing"]["p50_s"]
    for bound, met in ((itl * 1.01, True), (itl * 0.99, False)):
        _, p = run_experiment(make_config(**base, slo={"definition": "pooled", "p99_itl_s": bound}), write=False)
        slo = p["slo"]
        assert slo["meets_target"] is met and slo["attainment"] == (1.0 if met else 0.0)
        assert slo["measured"] == {"p99_itl_s": itl, "median_queueing_s": queueing}
        assert p["request_goodput"] == (p["request_throughput"] if met else 0.0)
    _, p = run_experiment(make_config(**base, slo={"definition": "pooled", "p99_itl_s": 10.0,
                                                   "median_queueing_s": queueing * 0.5}), write=False)
    assert not p["slo"]["meets_target"]


@given(seed=st.integers(0, 2**31), scheduler=st.sampled_from(["fcfs", "sarathi", "vllm_v1"]),
       policy=st.sampled_from(["colocated", "distserve", "llumnix"]), pp=st.sampled_from([1, 2]),
       timeout_s=st.sampled_from([None, 0.3, 2.0]), max_time_s=st.sampled_from([None, 2.0, 8.0]),
       rate=st.sampled_from([5.0, 40.0]))
def test_summary_invariants_hold_on_any_run(seed, scheduler, policy, pp, timeout_s, max_time_s, rate):
    """What the summary says agrees with the per-request records and the physics: SLO attainment is recomputed
    from the records; ITL pools the gaps of the finished requests alone, as vLLM's benchmark those of the
    successful ones (a request's gaps add up to its decode span; the largest is the largest request's max TBT);
    utilization and MFU/MBU stay within 1, energy is positive and the mean power within the device's range. Runs
    with client timeouts and cut-offs included: their steps after the last finish had put utilization above 1,
    and the gaps of the requests they ended had counted in ITL."""
    cfg = make_config(seed=seed, parallel={"pp": 1 if policy == "llumnix" else pp},
                      cluster={"num_replicas": 2, "policy": policy,
                               "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
                      scheduler={"name": scheduler, "chunk_size": 256, "max_num_batched_tokens": 4096},
                      workload={"num_requests": 60, "arrival": {"kind": "poisson", "rate_per_s": rate},
                                "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                                "output_tokens": {"kind": "uniform", "min": 1, "max": 300}},
                      simulation={"client_timeout_s": timeout_s, "max_time_s": max_time_s})
    result, summary = run_experiment(cfg, write=False)
    df = result.recorder.request_frame()
    fin = df[df["status"] == "finished"]
    ttft = fin["first_token_s"] - fin["arrival_s"]
    tpot = ((fin["finish_s"] - fin["first_token_s"]) / (fin["num_generated_tokens"] - 1)).where(
        fin["num_generated_tokens"] > 1)
    met = (ttft <= cfg.slo.ttft_s) & (tpot.fillna(0.0) <= cfg.slo.tpot_s)
    assert summary["slo"]["attainment"] == (met.sum() / len(df) if len(df) else 0.0)
    itl = summary["itl"]
    assert itl["count"] == (fin["num_generated_tokens"] - 1).clip(lower=0).sum()
    if itl["count"]:
        span_s = math.fsum(fin["finish_s"] - fin["first_token_s"])
        assert itl["mean_s"] * itl["count"] == pytest.approx(span_s, rel=1e-9)
        assert itl["max_s"] == fin["max_tbt_s"].max()
    u, e = summary["utilization"], summary["energy"]
    assert 0 <= u["busy_fraction"] <= 1 and 0 <= u["mfu"] <= 1 and 0 <= u["mbu"] <= 1
    assert 0 <= u["kv_cache_busy_mean"] <= 1
    assert e["busy_j"] >= 0 and e["idle_j"] >= 0
    assert 63.0 <= e["mean_power_w_per_gpu"] <= 400.0  # the A100's idle and maximum draw


def test_record_frames_keep_their_column_types_with_or_without_rows():
    """The request and iteration tables are read from the packed columns as float64 / int64, whether or not any row
    was recorded (pandas had read an empty ``array.array`` as an object column), and equal what they hold."""
    from llmsim.energy import PowerModel
    from llmsim.metrics.recorder import ITERATION_INT_FIELDS, REQUEST_INT_FIELDS, Recorder

    power = PowerModel(idle_w=100.0, max_w=400.0, w_per_flop_s=1e-12, w_per_byte_s=1e-10, num_gpus=1)
    empty = Recorder([power], True)
    for frame, ints in ((empty.request_frame(), REQUEST_INT_FIELDS), (empty.iteration_frame(), ITERATION_INT_FIELDS)):
        assert len(frame) == 0
        for name in frame.columns.drop(["status", "reason"], errors="ignore"):
            assert frame[name].dtype == (np.int64 if name in ints else np.float64), name
    cfg = make_config(workload={"num_requests": 20, "arrival": {"kind": "poisson", "rate_per_s": 10.0},
                                "prompt_tokens": {"kind": "uniform", "min": 16, "max": 200},
                                "output_tokens": {"kind": "uniform", "min": 1, "max": 30}})
    rec = run_experiment(cfg, write=False)[0].recorder
    requests, iterations = rec.request_frame(), rec.iteration_frame()
    assert requests["id"].tolist() == list(range(20)) and requests["id"].dtype == np.int64
    assert iterations["duration_s"].tolist() == list(rec.iterations["duration_s"])
    assert iterations["kv_used_blocks"].dtype == np.int64 and len(iterations) == len(rec.iterations["start_s"])
