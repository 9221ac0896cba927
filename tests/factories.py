"""Small factories for tests: configs and request streams."""

from __future__ import annotations

from llmsim.config import ExperimentConfig, parse_config
from llmsim.request import Request


def make_config(**overrides) -> ExperimentConfig:
    """A small Llama-2-7B / A100 experiment; nested sections in ``overrides`` replace whole sections."""
    data = {
        "name": "test",
        "seed": 7,
        "model": {"name": "Llama-2-7B"},
        "hardware": {"device": "a100-80gb"},
        "cluster": {"num_replicas": 2, "router": "least_outstanding"},
        "scheduler": {"name": "fcfs", "max_num_batched_tokens": 4096},
        "workload": {
            "num_requests": 200,
            "arrival": {"kind": "poisson", "rate_per_s": 10.0},
            "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
            "output_tokens": {"kind": "uniform", "min": 1, "max": 300},
        },
    }
    data.update(overrides)
    return parse_config(data, "<test>")


def make_requests(specs: list[tuple[float, int, int]]) -> list[Request]:
    """Requests from (arrival_s, prompt_tokens, output_tokens) triples."""
    return [Request(i, t, p, o) for i, (t, p, o) in enumerate(specs)]


def assert_nothing_lost(result, num_requests: int):
    """Every request ended finished (every token generated) or rejected, and every KV block is free again.
    Returns the request frame for further checks."""
    df = result.recorder.request_frame()
    assert sorted(df["id"]) == list(range(num_requests))
    assert set(df["status"]) <= {"finished", "rejected"}
    fin = df[df["status"] == "finished"]
    assert (fin["num_generated_tokens"] == fin["num_output_tokens"]).all()
    # Each request's times in order, and its prefix-cache hit within its prompt (a resumption's hit on its own
    # blocks had been reported as its hit).
    assert (fin["arrival_s"] <= fin["scheduled_s"]).all() and (fin["scheduled_s"] < fin["first_token_s"]).all()
    assert (fin["first_token_s"] <= fin["finish_s"]).all()
    assert ((0 <= df["num_cached_tokens"]) & (df["num_cached_tokens"] < df["num_prompt_tokens"])).all()
    for rep in result.replicas:
        rep.blocks.check_integrity()
        assert rep.blocks.num_free_blocks == rep.blocks.num_blocks
    return df


def lone_kv_copy_s(src_execution, num_tokens: int, inter_node: bool, dst_num_gpus: int) -> float:
    """What one KV copy alone on its links takes: the link's latency plus the bytes over the parallel links of
    the side with fewer GPUs, with the collectives' what-if factor."""
    ex = src_execution
    link = ex.hardware.inter_node if inter_node else ex.hardware.intra_node
    num_bytes = num_tokens * ex.model.kv_bytes_per_token()
    links = min(ex.plan.num_gpus, dst_num_gpus)
    return (link.latency_s + num_bytes / (link.bandwidth_bytes_per_s * links)) * ex.time_factors["collective"]
