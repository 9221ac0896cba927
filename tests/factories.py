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
