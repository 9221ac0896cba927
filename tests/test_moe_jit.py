"""vLLM's fused-MoE kernel built by Triton while serving (``llmsim/execution/moe_jit.py``)."""

from pathlib import Path

import pandas as pd
import pytest

from llmsim.cluster.simulation import simulate
from llmsim.errors import ConfigError
from llmsim.execution.moe_jit import FusedMoeCompiles, capture_sizes, variant
from tests.factories import make_config, make_requests

MEASURED = Path(__file__).parent.parent / "hardware_profiles" / "measurements"


@pytest.mark.parametrize("host", ["h100", "h200"])
def test_the_steps_that_build_a_variant_are_the_ones_that_compiled_on_a_gpu(host):
    """benchmarks/bench_moe_jit.py on an H100 and on an H200 host (fresh Triton cache, Mixtral's TP 2 shard, vLLM's
    tuned configurations, max_num_seqs 128, max_num_batched_tokens 2048): after the start-up, every M from 257 to
    2048 once; 13 of them compiled. The model names the same 13."""
    df = pd.read_csv(MEASURED / f"llmsim-moe-jit-{host}.csv")
    serving = df[df["phase"] == "serving"]
    engine = FusedMoeCompiles(8, 2, True, 0.5, max_num_seqs=128, max_num_batched_tokens=2048, pads_every_step=True)
    built = [engine.stall_s(m, pure_decode=False) > 0 for m in serving["num_tokens"]]
    assert built == (serving["kernels_compiled"] > 0).tolist()
    assert sum(built) == 13 and engine.num_built_serving == 13
    assert (serving.loc[serving["kernels_compiled"] > 0, "kernels_compiled"] == 2).all()  # two kernels a variant
    # The configuration vLLM picked is the nearest tuned batch size, ties to the smaller (M = 192 took 128's).
    for m, key in zip(df["num_tokens"], df["config_key"]):
        if m:
            assert variant(m, 8, 2, tuned=True)[0] == key


def test_capture_sizes_are_vllm_s_defaults():
    assert capture_sizes(128, 2048) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(256, 8192) == [1, 2, 4, *range(8, 256, 8), *range(256, 513, 16)]
    assert capture_sizes(8, 8192) == [1, 2, 4, 8, 16]
    assert capture_sizes(128, 100) == [1, 2, 4, *range(8, 97, 8)]  # never above the token budget
    # vLLM v0 captures decode batches up to max_num_seqs rounded up to 8, at most 256
    assert capture_sizes(256, 8192, v1=False) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(20, 8192, v1=False) == [1, 2, 4, 8, 16, 24]


def test_only_vllm_v1_pads_a_step_with_prefill_to_a_captured_size():
    v1 = FusedMoeCompiles(8, 2, True, 0.5, 128, 2048, pads_every_step=True)
    v0 = FusedMoeCompiles(8, 2, True, 0.5, 128, 2048, pads_every_step=False)
    assert v1.runs_at(201, pure_decode=False) == 208 and v1.stall_s(201, pure_decode=False) == 0.0
    assert v0.runs_at(201, pure_decode=False) == 201 and v0.stall_s(201, pure_decode=False) == 1.0
    assert v0.stall_s(201, pure_decode=False) == 0.0  # built now
    assert v0.runs_at(101, pure_decode=True) == 104  # decodes run in graphs in both (v0: up to max_num_seqs)


def _mixtral(**scheduler):
    return make_config(model={"name": "Mixtral-8x7B"}, hardware={"device": "h100-sxm"}, parallel={"tp": 2},
                       cluster={"num_replicas": 1},
                       scheduler={"name": "vllm_v1", "max_num_seqs": 128, "max_num_batched_tokens": 2048,
                                  **scheduler})


# Prompts whose prefill steps run outside the captured graphs at new token counts, then decodes.
_REQUESTS = [(0.0, 300, 20), (2.0, 700, 20), (4.0, 300, 20), (6.0, 1300, 20), (8.0, 301, 5)]


@pytest.mark.parametrize("fast_forward", [True, False])
def test_a_cold_triton_cache_holds_the_first_step_of_each_new_variant(fast_forward):
    cold_cfg = _mixtral()
    cold_cfg = cold_cfg.model_copy(update={"simulation": cold_cfg.simulation.model_copy(
        update={"fast_forward": fast_forward})})
    warm_cfg = cold_cfg.model_copy(update={"scheduler": cold_cfg.scheduler.model_copy(update={"triton_cache": "warm"})})
    cold, warm = simulate(cold_cfg, make_requests(_REQUESTS)), simulate(warm_cfg, make_requests(_REQUESTS))
    c, w = cold.recorder.request_frame(), warm.recorder.request_frame()
    variant_s = 2 * cold_cfg.scheduler.fused_moe_build_s
    ttft_delay = (c["first_token_s"] - w["first_token_s"]).round(9).tolist()
    # 300 tokens (M % 8 == 4) and 700 (config 512, M % 8 == 4) build a variant each; 300 again does not; 1300
    # (config 1536, M % 8 == 4) builds; 301 (config 256, M % 8 == 5) builds. Alone on the replica, each request's
    # prefill is one step, and the wait adds exactly the build time to its first token.
    assert ttft_delay == [round(variant_s, 9), round(variant_s, 9), 0.0, round(variant_s, 9), round(variant_s, 9)]
    assert cold.replicas[0].moe_compiles.num_built_serving == 4
    assert warm.replicas[0].moe_compiles is None


_POLICIES = {
    "vllm_v1": {"scheduler": {"name": "vllm_v1", "max_num_batched_tokens": 4096}},
    "fcfs": {"scheduler": {"name": "fcfs", "max_num_batched_tokens": 4096}, "cluster": {"num_replicas": 2}},
    "sarathi": {"scheduler": {"name": "sarathi", "max_num_batched_tokens": 4096, "chunk_size": 300},
                "cluster": {"num_replicas": 2}},
    "distserve": {"scheduler": {"name": "vllm_v1", "max_num_batched_tokens": 4096},
                  "cluster": {"num_replicas": 2, "policy": "distserve",
                              "distserve": {"prefill": {"replicas": 1, "tp": 2}, "decode": {"replicas": 1, "tp": 2}}}},
    "llumnix": {"scheduler": {"name": "vllm_v1", "max_num_batched_tokens": 4096},
                "cluster": {"num_replicas": 2, "policy": "llumnix"}},
}


@pytest.mark.parametrize("policy", list(_POLICIES))
def test_fast_forward_equals_stepping_with_kernels_built_while_serving(policy):
    from llmsim.workload import build_workload

    def frames(ff):
        sections = {"cluster": {"num_replicas": 1}, **_POLICIES[policy]}
        cfg = make_config(model={"name": "Mixtral-8x7B"}, hardware={"device": "h100-sxm"}, parallel={"tp": 2},
                          simulation={"fast_forward": ff},
                          workload={"num_requests": 60, "arrival": {"kind": "poisson", "rate_per_s": 6.0},
                                    "prompt_tokens": {"kind": "uniform", "min": 16, "max": 2500},
                                    "output_tokens": {"kind": "uniform", "min": 1, "max": 200}},
                          **sections)
        result = simulate(cfg, build_workload(cfg.workload, cfg.seed))
        assert sum(rep.moe_compiles.num_built_serving for rep in result.replicas) > 0
        its = result.recorder.iteration_frame().sort_values(["replica_id", "start_s"], kind="stable")
        return result.recorder.request_frame(), its.reset_index(drop=True)

    (a_req, a_it), (b_req, b_it) = frames(True), frames(False)
    assert (a_req["status"] == "finished").all()
    pd.testing.assert_frame_equal(a_req, b_req, check_exact=True)
    pd.testing.assert_frame_equal(a_it, b_it, check_exact=True)


def test_the_summary_counts_the_builds_and_their_wait():
    from llmsim.run import run_experiment

    cfg = _mixtral()
    cfg = cfg.model_copy(update={"workload": cfg.workload.model_copy(update={"num_requests": 40})})
    result, summary = run_experiment(cfg, write=False)
    builds = summary["kernel_builds"]
    assert builds["fused_moe_variants"] == result.replicas[0].moe_compiles.num_built_serving > 0
    assert builds["wait_s"] == pytest.approx(builds["fused_moe_variants"] * 2 * 0.563)
    dense = make_config(workload={"num_requests": 5, "arrival": {"kind": "poisson", "rate_per_s": 1.0},
                                  "prompt_tokens": {"kind": "fixed", "value": 300},
                                  "output_tokens": {"kind": "fixed", "value": 3}})
    _, summary = run_experiment(dense, write=False)
    assert "kernel_builds" not in summary


def test_dense_models_build_nothing_and_a_bad_cache_setting_is_named():
    result = simulate(make_config(cluster={"num_replicas": 1}), make_requests([(0.0, 300, 5)]))
    assert result.replicas[0].moe_compiles is None
    with pytest.raises(ConfigError, match="scheduler.triton_cache"):
        make_config(scheduler={"name": "vllm_v1", "triton_cache": "hot"})


@pytest.mark.parametrize("min_prompt_tokens", [520, 16])
def test_worker_processes_report_the_builds_as_one_process_does(min_prompt_tokens):
    """``simulation.workers``: the summary's ``kernel_builds`` is the one-process summary's, also where no replica
    served a request (every prompt longer than fcfs's step budget is rejected at arrival), whose engines built
    nothing but still report."""
    from llmsim.run import run_experiment

    summaries = []
    for workers in (1, 2):
        cfg = make_config(model={"name": "Mixtral-8x7B"}, hardware={"device": "h100-sxm"}, parallel={"tp": 2},
                          cluster={"num_replicas": 3, "router": "round_robin"},
                          scheduler={"name": "fcfs", "max_num_batched_tokens": 512},
                          simulation={"workers": workers},
                          workload={"num_requests": 12, "arrival": {"kind": "poisson", "rate_per_s": 4.0},
                                    "prompt_tokens": {"kind": "uniform", "min": min_prompt_tokens, "max": 3000},
                                    "output_tokens": {"kind": "uniform", "min": 1, "max": 20}})
        summaries.append(run_experiment(cfg, write=False)[1])
    one, two = summaries
    assert one["kernel_builds"] == two["kernel_builds"]
    assert one["requests"] == two["requests"]
    assert (one["requests"]["finished"] == 0) == (min_prompt_tokens > 512)
