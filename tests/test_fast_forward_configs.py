"""Fast-forward equals stepping across the configuration space: models (dense, MoE), devices, tensor and pipeline
parallelism, FP8 weights and KV, every scheduler and cluster policy, prefix caching, async scheduling, the engine's
CPU time, client timeouts, a front end, a cut-off, and trace, shared-prefix and conversation traffic (BurstGPT
conversations replayed closed-loop among them).

``tests/test_simulation.py`` explores scheduling on one model and device; this draws whole configurations, as a
user writes them. Comparing the two modes on random configurations found two bugs the narrower tests had not: a
fast-forwarded run cut short left its planned last boundary queued, which moved the reported simulated span; and
with ``simulation.max_time_s`` the runs in progress at the cut-off lost their steps."""

from pathlib import Path

from hypothesis import assume, given
from hypothesis import strategies as st

from llmsim.cluster.simulation import build_pools
from llmsim.config import parse_config
from llmsim.errors import ConfigError, PlanError
from tests.test_simulation import assert_fast_forward_equals_stepping

WORKLOADS = Path(__file__).resolve().parents[1] / "workloads"
# BurstGPT v1.2 rows with sessions (29 rows, 8 conversations), made up: turns often come sooner than the real
# service's Elapsed time, so a closed-loop replay sends them the instant the simulated answer ends.
SESSIONS = Path(__file__).resolve().parent / "data" / "burstgpt_sessions.csv"
# (model, devices it is drawn on, TP degrees): shapes that fit those devices at those degrees.
MODELS = [("Llama-2-7B", ("a100-80gb", "h100-sxm", "a100-40gb"), (1, 2)),
          ("Llama-3-8B", ("a100-80gb", "h100-sxm", "h200", "mi325x"), (1, 2, 4)),
          ("Phi-2", ("a100-80gb", "t4", "h100-sxm"), (1, 2)),
          ("Mixtral-8x7B", ("h100-sxm", "h200", "a100-80gb"), (2, 4)),
          ("Qwen3-30B-A3B", ("h100-sxm", "a100-80gb"), (1, 2)), ("GLM-4.5-Air", ("h100-sxm", "h200"), (4,))]


@st.composite
def configurations(draw):
    model, devices, tps = draw(st.sampled_from(MODELS))
    device, tp = draw(st.sampled_from(devices)), draw(st.sampled_from(tps))
    scheduler = draw(st.sampled_from(["fcfs", "sarathi", "vllm_v1"]))
    policy = draw(st.sampled_from(["colocated", "colocated", "distserve", "llumnix"]))
    pp = 1 if policy == "llumnix" else draw(st.sampled_from([1, 1, 2]))
    s = {"name": scheduler, "max_num_batched_tokens": draw(st.sampled_from([512, 2048, 8192])),
         "max_num_seqs": draw(st.sampled_from([4, 64, 256])), "chunk_size": draw(st.sampled_from([128, 512])),
         "preemption": draw(st.sampled_from(["recompute", "swap"])),
         "gpu_memory_utilization": draw(st.sampled_from([0.35, 0.9])),
         "enable_prefix_caching": draw(st.booleans())}
    if scheduler == "vllm_v1":
        s["async_scheduling"] = draw(st.booleans())
    if draw(st.booleans()):
        s["cpu_overhead"] = "vllm_v0"
    m = {"name": model}
    if device in ("h100-sxm", "h200") and draw(st.booleans()):
        m["dtype"] = draw(st.sampled_from(["fp8", "fp8_block"]))
    if draw(st.booleans()):
        m["kv_cache_dtype"] = "fp8"
    cluster = {"num_replicas": draw(st.sampled_from([1, 2])), "policy": policy,
               "router": draw(st.sampled_from(["round_robin", "least_outstanding", "prefix_aware"])),
               "frontend_latency_s": draw(st.sampled_from([0.0, 0.002])),
               "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}}
    n = 40
    traffic = draw(st.sampled_from(["plain", "shared_prefix", "conversation", "mooncake", "azure", "sessions"]))
    workload = {"num_requests": n, "arrival": {"kind": "gamma", "rate_per_s": draw(st.floats(1.0, 30.0)), "cv": 2.0},
                "prompt_tokens": {"kind": "lognormal", "median": 500, "sigma": 1.0, "max": 3000},
                "output_tokens": {"kind": "zipf", "a": 0.8, "min": 1, "max": 600}}
    if traffic == "shared_prefix":
        workload = {**workload, "prompt_tokens": None, "output_tokens": None,
                    "shared_prefix": {"num_system_prompts": 3, "users_per_system_prompt": 4,
                                      "system_prompt_tokens": 300, "question_tokens": 200, "output_tokens": 120,
                                      "multi_turn": draw(st.booleans())}}
    elif traffic == "conversation":
        workload["conversation"] = {"mean_turns": 3, "mean_think_time_s": 0.5}
    elif traffic == "mooncake":
        workload = {"num_requests": n, "trace": {"path": str(WORKLOADS / "mooncake_conversation.jsonl"),
                                                 "format": "mooncake", "time_scale": draw(st.sampled_from([1.0, 4.0]))}}
    elif traffic == "sessions":
        workload = {"trace": {"path": str(SESSIONS), "format": "burstgpt", "closed_loop": draw(st.booleans()),
                              "failed": draw(st.sampled_from(["skip", "reject"])),
                              "time_scale": draw(st.sampled_from([0.1, 1.0]))}}
    elif traffic == "azure":
        workload = {**workload, "prompt_tokens": None, "output_tokens": None,
                    "lengths_from": {"path": str(WORKLOADS / "azure_conv_2023.csv"), "format": "azure"}}
    workload = {k: v for k, v in workload.items() if v is not None}
    simulation = {"client_timeout_s": draw(st.sampled_from([None, 2.0])),
                  "max_time_s": draw(st.sampled_from([None, None, 4.0]))}
    return {"name": "fuzz", "seed": draw(st.integers(0, 2**31)), "model": m, "hardware": {"device": device},
            "parallel": {"tp": tp, "pp": pp}, "cluster": cluster, "scheduler": s, "workload": workload,
            "simulation": simulation}


@given(data=configurations())
def test_fast_forward_equals_stepping_on_any_configuration(data):
    def cfg(ff):
        return parse_config({**data, "simulation": {**data["simulation"], "fast_forward": ff}}, "<test>")

    try:
        build_pools(cfg(True))
    except (ConfigError, PlanError):
        assume(False)  # a combination the config or the device refuses: not a simulation to compare
    assert_fast_forward_equals_stepping(cfg)
