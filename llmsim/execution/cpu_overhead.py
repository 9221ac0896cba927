"""The engine's CPU time per step: scheduling, preparing inputs, sampling, processing outputs.

A synchronous engine (vLLM v0, Sarathi-Serve, vLLM V1 without async scheduling) does this work between GPU
steps, so a step takes GPU time + CPU time. With async scheduling (vLLM V1) the CPU prepares step N+1 while the
GPU runs step N, so a step takes the longer of the two. The CPU time has a physical reading:

    cpu = per_step                                     (the loop, the sampler's launch, a Python step)
        + per_request       x scheduled requests       (scheduling, building input tensors, block tables)
        + per_sampled_token x sampled tokens           (sampling, appending the token, stop checks)
        + multi_gpu_per_step + multi_gpu_per_request x requests   (tp > 1: the driver's round trip to workers)

where the per-request and per-sampled-token terms grow with the engine's ``max_model_len`` (per 1k tokens of it,
within the range of contexts measured): the measured engine's per-request costs at a 16k context are about twice
those at 4k, by a mechanism the measurements do not isolate. Shipped profiles live in
``hardware_profiles/cpu_overhead/<name>.yaml``; ``llmsim calibrate-cpu`` fits them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ConfigDict, Field, ValidationError

from llmsim.bool_numbers import NumbersNotBools
from llmsim.errors import ConfigError

CPU_PROFILES_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles" / "cpu_overhead"


class CpuOverheadParams(NumbersNotBools):
    """Milliseconds, as fitted or as a user states them (``scheduler.cpu_overhead``)."""

    model_config = ConfigDict(extra="forbid")
    per_step_ms: float = Field(default=0.0, ge=0)
    per_request_ms: float = Field(default=0.0, ge=0)
    per_request_per_1k_context_ms: float = Field(default=0.0, ge=0)
    per_sampled_token_ms: float = Field(default=0.0, ge=0)
    per_sampled_token_per_1k_context_ms: float = Field(default=0.0, ge=0)
    multi_gpu_per_step_ms: float = Field(default=0.0, ge=0)
    multi_gpu_per_request_ms: float = Field(default=0.0, ge=0)
    # The contexts the per-1k-context terms were measured over: a longer or shorter max_model_len is held at the
    # range's end rather than extrapolated (None: no limit).
    context_range_tokens: tuple[int, int] | None = None


@dataclass(frozen=True)
class CpuOverhead:
    """The parameters bound to one replica's ``max_model_len`` and GPU count, in seconds."""

    per_step_s: float
    per_request_s: float
    per_sampled_token_s: float

    @classmethod
    def of(cls, p: CpuOverheadParams, max_model_len: int, tp: int) -> "CpuOverhead":
        if p.context_range_tokens is not None:
            low, high = p.context_range_tokens
            max_model_len = min(max(max_model_len, low), high)
        k_context = max_model_len / 1000.0
        multi = tp > 1
        return cls(
            per_step_s=(p.per_step_ms + (p.multi_gpu_per_step_ms if multi else 0.0)) / 1e3,
            per_request_s=(p.per_request_ms + p.per_request_per_1k_context_ms * k_context
                           + (p.multi_gpu_per_request_ms if multi else 0.0)) / 1e3,
            per_sampled_token_s=(p.per_sampled_token_ms + p.per_sampled_token_per_1k_context_ms * k_context) / 1e3)

    def step_s(self, num_requests: int, num_sampled: int) -> float:
        return self.per_step_s + self.per_request_s * num_requests + self.per_sampled_token_s * num_sampled


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in CPU_PROFILES_DIR.glob("*.yaml"))


def load_cpu_profile(name: str) -> CpuOverheadParams:
    """A shipped profile's parameters (its YAML also records the source and the fit's errors)."""
    path = CPU_PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"scheduler.cpu_overhead: unknown profile {name!r}; allowed: 'off', "
                          f"{', '.join(map(repr, shipped_profiles()))} or a mapping of *_ms parameters")
    data = yaml.safe_load(path.read_text())
    try:
        return CpuOverheadParams(**data["params"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise ConfigError(f"{path}: not a CPU overhead profile: {exc}") from None
