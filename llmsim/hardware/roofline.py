"""One operator cost function and the collective models.

``time = max(flops / (peak * eff_compute(M)), bytes / (bandwidth * eff_memory)) + overhead``:
an operator is bound by whichever of compute or memory traffic takes longer at the efficiency the
hardware actually reaches for that kind of kernel, plus a fixed launch/tail overhead. GEMMs add their shape
(``ComputeEfficiency.at_shape``), a soft maximum where the profile fits one, and the reduction's latency
(split over K when few output tiles leave SMs idle: ``split_k_splits``).
"""

from __future__ import annotations

import numpy as np

from llmsim.hardware.profile import GEMM_TILE, HardwareProfile, LinkModel, OpEfficiency


def split_k_splits(eff: OpEfficiency, num_tokens, gemm_k, gemm_n, num_sms: int | None):
    """How many ways a GEMM's K is split (``OpEfficiency.split_k_min_k``; scalars or arrays): enough to fill the
    SMs with output tiles, no finer than ``split_k_min_k`` elements of K each, at least 1."""
    if eff.split_k_min_k is None or num_sms is None:
        return 1.0
    tiles = np.maximum(num_tokens * gemm_n / (GEMM_TILE * GEMM_TILE), 1.0)
    return np.maximum(np.minimum(num_sms / tiles, gemm_k / eff.split_k_min_k), 1.0)


def op_time_s(eff: OpEfficiency, peak_flops: float, bandwidth: float, flops: float, num_bytes: float,
              num_tokens: float, gemm_k: int = 0, gemm_n: int = 0, num_sms: int | None = None,
              quant_bytes: float = 0.0) -> float:
    compute_s = flops / (peak_flops * eff.compute.at_shape(num_tokens, gemm_k, gemm_n)) if flops > 0 else 0.0
    memory_s = num_bytes / (bandwidth * eff.memory_eff)
    p = eff.softness
    bound_s = max(compute_s, memory_s) if p is None else (compute_s ** p + memory_s ** p) ** (1.0 / p)
    if quant_bytes and eff.quant_memory_eff is not None:  # an FP8 GEMM's input quantization, a kernel before it
        bound_s += quant_bytes / (bandwidth * eff.quant_memory_eff)
    if not gemm_k:
        return bound_s + eff.overhead_s
    # split_k_splits's rule on scalars, in plain Python: numpy's calls on scalars cost more than the rest of this
    # function (a step of a new token count: 27 -> 20 us). The same values (min/max of floats); the property test
    # that holds op_time_s equal to calibration's vectorised roofline_s keeps the two forms together.
    splits = 1.0
    if eff.split_k_min_k is not None and num_sms is not None:
        tiles = num_tokens * gemm_n / (GEMM_TILE * GEMM_TILE)
        if tiles < 1.0:
            tiles = 1.0
        splits = min(num_sms / tiles, gemm_k / eff.split_k_min_k)
        if splits < 1.0:
            splits = 1.0
    return bound_s + eff.overhead_s + eff.k_latency_s * gemm_k / splits


def all_reduce_factor(num_workers):
    """Ring all-reduce: each worker sends and receives ``2 (n-1)/n`` of the message (scalars or arrays)."""
    return 2.0 * (num_workers - 1) / num_workers


def all_gather_factor(num_workers):
    """Ring all-gather of a result: each worker receives ``(n-1)/n`` of it (scalars or arrays)."""
    return (num_workers - 1) / num_workers


def _custom_one_stage(num_workers, num_bytes):
    """vLLM's custom all-reduce (``csrc/custom_all_reduce.cuh``, full NVLink) runs its one-stage kernel for 2 GPUs
    and for messages under 512 KiB on up to 4 GPUs or under 256 KiB on up to 8, else its two-stage kernel."""
    return (num_workers == 2) | ((num_workers <= 4) & (num_bytes < 512 * 1024)) | (
        (num_workers <= 8) & (num_bytes < 256 * 1024))


def custom_all_reduce_factor(num_workers, num_bytes):
    """Bytes each GPU reads per message byte in vLLM's custom all-reduce: the one-stage kernel, where every GPU
    reads every peer's whole buffer (``n - 1``), or the two-stage kernel (reduce-scatter and all-gather,
    ``2 (n-1)/n``). Scalars or arrays."""
    return np.where(_custom_one_stage(num_workers, num_bytes), num_workers - 1.0, all_reduce_factor(num_workers))


def custom_all_reduce_serves(max_bytes: float | None, num_bytes):
    """Whether vLLM's custom all-reduce takes a message (scalars or arrays): under its size limit
    (``should_custom_ar``: ``inp_size < max_size``); NCCL takes the rest, and everything where there is no limit."""
    return num_bytes < (max_bytes or 0.0)


def custom_all_reduce_rounds(num_workers, num_bytes):
    """Dependent rounds of reads from the peers, each paying the link's latency: one for the one-stage kernel,
    two for the two-stage one (its all-gather reads what the reduce-scatter wrote, after a barrier across the
    GPUs). Scalars or arrays."""
    return np.where(_custom_one_stage(num_workers, num_bytes), 1.0, 2.0)


def custom_all_reduce_latency_s(latency_s, peer_latency_s, num_workers, num_bytes):
    """The custom all-reduce's latency: per round, the link's plus its barrier's per peer (scalars or arrays)."""
    return (latency_s + peer_latency_s * (num_workers - 1)) * custom_all_reduce_rounds(num_workers, num_bytes)


def ring_all_reduce_latency_s(latency_s, peer_latency_s, num_workers):
    """NCCL's ring all-reduce: a fixed latency, then ``2 (n - 1)`` steps (reduce-scatter, all-gather), each paying
    the per-step latency NCCL's own cost model charges (``nsteps x hwLat``, ``src/graph/tuning.cc``). Scalars or
    arrays."""
    return latency_s + 2.0 * (num_workers - 1) * peer_latency_s


def ring_all_gather_latency_s(latency_s, peer_latency_s, num_workers):
    """NCCL's ring all-gather: a fixed latency, then ``n - 1`` steps, each paying the per-step latency (as
    ``ring_all_reduce_latency_s``; an all-gather is the all-reduce's second half). Scalars or arrays."""
    return latency_s + (num_workers - 1) * peer_latency_s


def all_reduce_s(link: LinkModel, num_bytes: float, num_workers: int, custom: bool = False) -> float:
    """``custom``: vLLM's custom all-reduce (its one- or two-stage kernel by size), else a ring (NCCL)."""
    if num_workers <= 1:
        return 0.0
    if custom:
        return (float(custom_all_reduce_latency_s(link.latency_s, link.peer_latency_s, num_workers, num_bytes))
                + float(custom_all_reduce_factor(num_workers, num_bytes)) * num_bytes / link.bandwidth_bytes_per_s)
    return (ring_all_reduce_latency_s(link.latency_s, link.peer_latency_s, num_workers)
            + all_reduce_factor(num_workers) * num_bytes / link.bandwidth_bytes_per_s)


def all_gather_s(link: LinkModel, num_bytes: float, num_workers: int) -> float:
    """A ring all-gather (NCCL) of a ``num_bytes`` result: the ring's latency, then the ``(n - 1) / n`` of the
    result each GPU receives (``link_s`` of calibration, which fits ``all_gather`` on NCCL's measurements)."""
    if num_workers <= 1:
        return 0.0
    return (ring_all_gather_latency_s(link.latency_s, link.peer_latency_s, num_workers)
            + all_gather_factor(num_workers) * num_bytes / link.bandwidth_bytes_per_s)


def send_recv_s(link: LinkModel, num_bytes: float) -> float:
    return link.latency_s + num_bytes / link.bandwidth_bytes_per_s


def tp_link(profile: HardwareProfile, tp: int) -> LinkModel:
    """The all-reduce model for a TP group: measured intra-node, or bounded by the inter-node network."""
    if tp <= profile.gpus_per_node:
        return profile.all_reduce
    if profile.all_reduce_inter_node is not None:
        return profile.all_reduce_inter_node
    return LinkModel(latency_s=profile.inter_node.latency_s + profile.all_reduce.latency_s,
                     bandwidth_bytes_per_s=profile.inter_node.bandwidth_bytes_per_s)
