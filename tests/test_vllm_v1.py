"""vLLM V1's scheduler: one token budget, running requests first, chunked prefills, per-step allocation with
recompute preemption of the last running request, prefix-cache admission; and what prefix caching buys."""

import pytest

from llmsim.cluster.simulation import simulate
from llmsim.errors import ConfigError
from llmsim.kv_cache import BlockManager
from llmsim.request import Request, RequestStatus
from llmsim.run import run_experiment
from llmsim.schedulers import VLLMV1Scheduler
from tests.factories import assert_nothing_lost, make_config
from tests.test_schedulers import apply


def v1(num_blocks=1000, budget=512, caching=False, **kw):
    return VLLMV1Scheduler(BlockManager(num_blocks, 16, enable_prefix_caching=caching), max_num_seqs=kw.pop("seqs", 8),
                           max_num_batched_tokens=budget, **kw)


def test_running_first_then_waiting_in_order_within_one_budget():
    s = v1(budget=512)
    a, b, c = Request(0, 0, 400, 5), Request(1, 0, 300, 5), Request(2, 0, 50, 5)
    for r in (a, b, c):
        s.add(r)
    out = s.schedule()
    # a whole, then b chunked to what is left; c waits behind b (queue order, no skipping)
    assert [(p.request.id, p.num_new_tokens) for p in out.prefills] == [(0, 400), (1, 112)]
    apply(out)
    out = s.schedule()
    # a decodes first (running order), b continues its prefill, c gets the rest of the budget
    assert out.decodes == [a]
    assert [(p.request.id, p.num_new_tokens, p.num_cached_tokens) for p in out.prefills] == [(1, 188, 112), (2, 50, 0)]
    assert len(out.decodes) + out.num_prefill_tokens <= 512


def test_long_prefill_threshold_caps_each_chunk():
    s = v1(budget=2048, long_prefill_token_threshold=256)
    a, b = Request(0, 0, 1000, 5), Request(1, 0, 1000, 5)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [p.num_new_tokens for p in out.prefills] == [256, 256]


def test_allocation_failure_preempts_the_last_running_and_stops_admission():
    s = v1(num_blocks=6, budget=512)
    a, b = Request(0, 0, 48, 50), Request(1, 0, 48, 50)
    s.add(a)
    s.add(b)
    apply(s.schedule())  # 3 blocks each: the cache is full
    s.add(Request(2, 0, 16, 5))
    out = s.schedule()  # a needs a 4th block: b (last running) is preempted, and nobody is admitted this step
    assert out.preempted == [b] and out.decodes == [a] and not out.prefills
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and s.waiting[0] is b
    s.blocks.check_integrity()


def test_no_watermark_and_sequence_limit():
    s = v1(num_blocks=10, budget=4096, seqs=1)
    a, b = Request(0, 0, 160, 5), Request(1, 0, 16, 5)
    s.add(a)
    s.add(b)
    out = s.schedule()  # a takes all 10 blocks (V1 keeps no watermark); max_num_seqs=1 keeps b waiting
    assert [p.request for p in out.prefills] == [a] and list(s.waiting) == [b]


def test_prefix_hit_skips_the_cached_prompt_and_is_recorded():
    s = v1(caching=True, budget=4096)
    a = Request(0, 0, 500, 2, prefix_segments=((1, 480),))
    s.add(a)
    apply(s.schedule())
    b = Request(1, 0, 520, 2, prefix_segments=((1, 480),))
    s.add(b)
    out = s.schedule()
    chunk = next(p for p in out.prefills if p.request is b)
    assert (chunk.num_cached_tokens, chunk.num_new_tokens) == (480, 40) and b.num_cached_tokens == 480


def _shared_prefix_config(caching, rate=12.0, replicas=1):
    return make_config(scheduler={"name": "vllm_v1", "max_num_batched_tokens": 2048, "enable_prefix_caching": caching},
                       cluster={"num_replicas": replicas},
                       workload={"num_requests": 600, "arrival": {"kind": "poisson", "rate_per_s": rate},
                                 "shared_prefix": {"num_system_prompts": 4, "users_per_system_prompt": 5,
                                                   "system_prompt_tokens": 1500, "question_tokens": 200,
                                                   "output_tokens": 100}})


def test_prefix_caching_cuts_ttft_and_work_on_shared_prefix_traffic():
    on, s_on = run_experiment(_shared_prefix_config(True), write=False)
    off, s_off = run_experiment(_shared_prefix_config(False), write=False)
    assert_nothing_lost(on, 600)
    pc = s_on["prefix_cache"]
    # After the first 20 users' first requests, every prompt is cached up to its last block.
    assert pc["hit_rate_requests"] > 0.9 and pc["hit_rate_tokens"] > 0.8
    assert pc["prefill_flops_saved"] > 0
    assert s_on["ttft"]["mean_s"] < 0.5 * s_off["ttft"]["mean_s"]
    assert on.recorder.total("flops") < 0.6 * off.recorder.total("flops")
    assert "prefix_cache" not in s_off


def test_vllm_v1_nothing_lost_under_kv_pressure_with_prefix_caching():
    cfg = make_config(scheduler={"name": "vllm_v1", "gpu_memory_utilization": 0.22, "max_num_batched_tokens": 1024},
                      cluster={"num_replicas": 1},
                      workload={"num_requests": 300, "arrival": {"kind": "poisson", "rate_per_s": 30.0},
                                "shared_prefix": {"num_system_prompts": 3, "users_per_system_prompt": 4,
                                                  "system_prompt_tokens": 400, "question_tokens": 150,
                                                  "output_tokens": 200, "multi_turn": True}})
    from llmsim.workload import build_workload
    result = simulate(cfg, build_workload(cfg.workload, cfg.seed))
    df = assert_nothing_lost(result, 300)
    assert df["num_preemptions"].sum() > 0 and (df["num_cached_tokens"] > 0).any()


def _async_pair(async_scheduling: bool, fast_forward: bool):
    cfg = make_config(cluster={"num_replicas": 1}, simulation={"fast_forward": fast_forward},
                      scheduler={"name": "vllm_v1", "max_num_batched_tokens": 4096,
                                 "async_scheduling": async_scheduling})
    a = Request(0, 0.0, 200, 400)  # arrives at an idle engine, then decodes for a while
    b = Request(1, 0.5, 200, 3)  # arrives in the middle of one of a's decode steps
    result = simulate(cfg, [a, b])
    assert_nothing_lost(result, 2)
    it = result.recorder.iteration_frame()
    return a, b, it


def test_async_scheduling_takes_an_arrival_one_step_later():
    a_sync, b_sync, it_sync = _async_pair(False, fast_forward=False)
    a, b, it = _async_pair(True, fast_forward=False)
    # Steps run back to back: step k ends where step k + 1 starts.
    starts, starts_sync = it["start_s"].to_numpy(), it_sync["start_s"].to_numpy()
    # An idle engine schedules at once, with or without async scheduling: a's TTFT is its prefill step.
    assert a.first_token_s == a_sync.first_token_s == starts[1]
    arrived_in = int((starts < 0.5).sum()) - 1  # the step b arrives in
    # Synchronously b is prefilled in the step after the one it arrived in; with async scheduling the step
    # after that was already scheduled when b arrived, so b runs in the one after.
    assert b_sync.first_token_s == starts_sync[arrived_in + 2]
    assert b.first_token_s == starts[arrived_in + 3]
    prefill = it["num_prefill_tokens"].to_numpy()
    assert prefill[arrived_in + 1] == 0 < prefill[arrived_in + 2]
    # Fast-forward lands on the same boundaries, bit for bit.
    a_ff, b_ff, it_ff = _async_pair(True, fast_forward=True)
    assert (a_ff.first_token_s, a_ff.finish_s, b_ff.first_token_s, b_ff.finish_s) == (
        a.first_token_s, a.finish_s, b.first_token_s, b.finish_s)
    assert it_ff["start_s"].tolist() == it["start_s"].tolist()


def test_async_scheduling_is_refused_where_it_is_not_modelled():
    with pytest.raises(ConfigError, match="async_scheduling is modelled for the vllm_v1 scheduler only"):
        make_config(scheduler={"name": "fcfs", "async_scheduling": True})
    with pytest.raises(ConfigError, match="parallel.pp: 1"):
        make_config(parallel={"pp": 2}, scheduler={"name": "vllm_v1", "async_scheduling": True})
