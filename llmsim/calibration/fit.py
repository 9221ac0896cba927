"""Fit a profile's efficiency curves and collective models to measured latencies.

Each op kind gets ``max_eff``, ``half_tokens``, ``memory_eff`` and ``overhead_s`` of the roofline (GEMMs also their
shape terms, soft maximum and reduction latency); each collective
(inside a node, across nodes) gets an alpha-beta ``latency_s`` and bus ``bandwidth``. The fit minimises the log of
predicted / measured time (relative error, symmetric in over- and under-prediction) with a soft-L1 loss, so a few
noisy microsecond-scale rows cannot drag the curve. Held-out rows are split off before fitting and never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from llmsim.calibration.measurements import COLLECTIVE_OPS
from llmsim.calibration.predict import Rows, decode_s, is_link_kind, link_s, peak_flops, prefill_s, roofline_s
from llmsim.errors import ConfigError
from llmsim.execution.model import split_k_sms
from llmsim.hardware.attention import packing_copies
from llmsim.hardware.profile import (ComputeEfficiency, DecodeAttentionFit, HardwareProfile, LinkModel, OpEfficiency,
                                     PrefillAttentionFit, peak_dtype)
from llmsim.hardware.roofline import custom_all_reduce_serves

_LOSS_SCALE = 0.05  # residuals beyond ~5% relative error count linearly, not quadratically
# Kinds whose compute curve can bind. The others (norms, rope, activation, adds, embedding, decode attention) are
# memory-bound at every size; fitting their compute curve would only turn it into a second overhead term.
COMPUTE_BOUND_KINDS = ("linear", "linear_fp8", "attention_prefill")
# vLLM's fused-MoE kernel is fast where vLLM ships a tuned kernel configuration for the shape and far slower
# where it falls back to its default one; one fitted curve over both (tried: 20% on fit rows, 71% on the
# held-out Mixtral shape) follows the untuned shapes and misprices the tuned ones. So each weight dtype gets two
# tiled curves (``moe`` / ``moe_untuned``, ``moe_fp8`` / ``moe_fp8_untuned``) where the profile lists the
# device's tuned shapes for that dtype (``fused_moe_tuned``). Without a list every shape runs on the one ``moe`` /
# ``moe_fp8`` curve, in the simulator as in the fit: right for one kernel configuration over every shape (the
# microbenchmark suite's torch grouped GEMM), and for vLLM's kernel the README asks for the list. A profile on the
# roofline model fits no MoE curve.
FUSED_MOE_KINDS = {"bf16": ("moe", "moe_untuned"), "fp8": ("moe_fp8", "moe_fp8_untuned")}


def validation_only(profile: HardwareProfile, kinds: np.ndarray) -> np.ndarray:
    """Rows of kinds the fit never sees on this profile."""
    never = [k for dtype, pair in FUSED_MOE_KINDS.items() for k in pair
             if profile.gemm_model != "tiled" or (k == pair[1] and dtype not in profile.fused_moe_tuned)]
    return np.isin(kinds, never)


# Every fit starts from the same point, not from the profile's current values, so refitting a fitted profile
# reproduces it exactly (the optimiser's end point depends on its start).
START = (0.6, 64.0, 0.7, 5.0)  # max_eff, half_tokens, memory_eff, overhead in microseconds
# max_eff, half_tokens, memory_eff, overhead (us), half_k, half_n, half_tiles, softness, K latency (ns)
GEMM_START = (0.6, 64.0, 0.7, 5.0, 100.0, 50.0, 10.0, 2.0, 0.5)
SPLIT_K_START = 512.0  # split-K's smallest K per split
LINK_START = (10.0, 100.0)  # latency in microseconds, bandwidth in GB/s


@dataclass(frozen=True)
class Split:
    """Which rows are held out: every row of the named models, every attention row of the named head layouts
    (``"32/8"``: 32 query heads, 8 KV heads per GPU), every bare GEMM of the named inner dimensions (a model's
    hidden size: all its M and N), and collectives over the named worker counts."""

    held_out_models: tuple[str, ...] = ()
    held_out_num_workers: tuple[int, ...] = ()
    held_out_head_layouts: tuple[str, ...] = ()
    held_out_gemm_k: tuple[int, ...] = ()  # bare GEMM rows (op ``gemm``) of these inner dimensions
    # Fit the GEMM curves only on rows whose ``source`` starts with this; other sources' GEMMs are validated.
    gemm_source: str | None = None

    def held_out(self, df: pd.DataFrame) -> np.ndarray:
        by_model = df["model"].isin(self.held_out_models).to_numpy()
        by_workers = (df["op"].isin(COLLECTIVE_OPS) & df["num_workers"].isin(self.held_out_num_workers)).to_numpy()
        layout = [f"{_int(h)}/{_int(k)}" for h, k in zip(df["n_head"], df["n_kv_head"])]
        by_layout = (df["op"].isin(("attn_prefill", "attn_decode")).to_numpy()
                     & np.isin(layout, list(self.held_out_head_layouts)))
        by_gemm = (df["op"] == "gemm").to_numpy() & df["gemm_k"].isin(self.held_out_gemm_k).to_numpy()
        return by_model | by_workers | by_layout | by_gemm

    def other_gemm_source(self, rows: Rows) -> np.ndarray:
        """GEMM rows (kinds ``linear*``) that ``gemm_source`` leaves out of the fit: measured on another software
        stack than the one the GEMM curves model (vLLM 0.14's GEMMs from aiconfigurator, where Vidur's older
        stack takes 1.2-1.4x as long on identical shapes at M = 80-1024 on H100, median)."""
        if self.gemm_source is None:
            return np.zeros(len(rows), dtype=bool)
        source = rows.df["source"].fillna("").astype(str)
        gemm = np.array([str(k).startswith("linear") for k in rows.kind])
        return gemm & ~source.str.startswith(self.gemm_source).to_numpy()


def _int(value) -> str:
    return "" if pd.isna(value) else str(int(value))


def l2_resident(profile: HardwareProfile, rows: Rows) -> np.ndarray:
    """Decode rows whose KV (bytes) fits the L2 cache but is not negligible next to it. A microbenchmark that
    repeats one kernel reads such KV from L2; in serving, each layer's KV is evicted by the other layers' before
    it is read again, so these rows would teach the model a bandwidth HBM does not have. They are left out of
    the fit and reported apart."""
    if profile.l2_cache_bytes is None:
        return np.zeros(len(rows), dtype=bool)
    kv = rows.kv_bytes
    return (rows.kind == "attention_decode") & (kv > profile.l2_cache_bytes / 16) & (kv < profile.l2_cache_bytes)


def _eff(max_eff, half_tokens, memory_eff, overhead_s, half_k=0.0, half_n=0.0, half_tiles=0.0, softness=None,
         k_latency_s=0.0, split_k_min_k=None, quant_memory_eff=None) -> OpEfficiency:
    """An unvalidated efficiency for the optimiser's inner loop."""
    compute = ComputeEfficiency.model_construct(max_eff=max_eff, half_tokens=half_tokens, half_k=half_k,
                                                half_n=half_n, half_tiles=half_tiles)
    return OpEfficiency.model_construct(compute=compute, memory_eff=memory_eff, overhead_s=overhead_s,
                                        k_latency_s=k_latency_s, split_k_min_k=split_k_min_k, softness=softness,
                                        quant_memory_eff=quant_memory_eff)


def _enough_rows(mask: np.ndarray, num_params: int, what: str) -> None:
    """A fit needs at least as many measured rows as it has parameters: with fewer, least squares had returned
    parameters the rows never determined, and written them into the profile."""
    num_rows = int(mask.sum())
    if num_rows < num_params:
        raise ConfigError(f"{what}: {num_rows} measured rows to fit {num_params} parameters; measure more shapes, "
                          "or leave its rows out")


def fit_gemm_efficiency(rows: Rows, mask: np.ndarray, peak: np.ndarray, bandwidth: float,
                        num_sms: int | None = None) -> OpEfficiency:
    """Least-squares fit of a GEMM kind: the roofline's four parameters, the shape terms (``half_k``,
    ``half_n``, ``half_tiles``), the soft maximum and the reduction's latency per K element; with ``num_sms``
    (cuBLAS GEMMs) also split-K's smallest K per split. A fit whose reduction latency comes out 0 has no
    split-K to speak of and keeps none."""
    f, b, t, y = rows.flops[mask], rows.num_bytes[mask], rows.num_tokens[mask], rows.measured_s[mask]
    k, n, q = rows.gemm_k[mask], rows.gemm_n[mask], rows.quant_bytes[mask]
    split = num_sms is not None
    unaligned = rows.moe_unaligned[mask]
    fits_factor = bool(unaligned.any())  # the fused MoE's unaligned-width factor, where such rows are fitted
    fits_quant = bool(q.any())  # FP8 GEMMs: the input quantization's bandwidth fraction
    at_factor = 10 if split else 9
    at_quant = at_factor + fits_factor

    def eff_of(x):  # overhead in microseconds and latency in ns per K element, for the optimiser
        return _eff(x[0], x[1], x[2], x[3] * 1e-6, x[4], x[5], x[6], x[7], x[8] * 1e-9, x[9] if split else None,
                    x[at_quant] if fits_quant else None)

    def residuals(x):
        predicted = roofline_s(eff_of(x), f, b, t, k, n, peak, bandwidth, num_sms, q)
        if fits_factor:
            predicted = predicted * np.where(unaligned, x[at_factor], 1.0)
        return np.log(predicted / y)

    x0 = list(GEMM_START) + ([SPLIT_K_START] if split else [])
    lower = [0.01, 0.0, 0.01, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0] + ([16.0] if split else [])
    upper = [1.0, 1e5, 1.0, 1e4, 1e5, 1e5, 1e5, 8.0, 100.0] + ([1e6] if split else [])
    if fits_factor:
        x0, lower, upper = x0 + [1.2], lower + [1.0], upper + [4.0]
    if fits_quant:
        x0, lower, upper = x0 + [0.8], lower + [0.05], upper + [1.0]
    _enough_rows(mask, len(x0), str(rows.kind[mask][0]) if mask.any() else "GEMMs")
    fit = least_squares(residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=_LOSS_SCALE)
    x = [float(v) for v in fit.x]
    extra = {"unaligned_factor": round(x[at_factor], 4)} if fits_factor else {}
    if fits_quant:
        extra["quant_memory_eff"] = round(x[at_quant], 4)
    compute = ComputeEfficiency(max_eff=round(x[0], 4), half_tokens=round(x[1], 2), half_k=round(x[4], 2),
                                half_n=round(x[5], 2), half_tiles=round(x[6], 3))
    k_latency_s = round(x[8] * 1e-9, 13)
    split_k_min_k = round(x[9], 1) if split and k_latency_s > 0 else None
    return OpEfficiency(compute=compute, memory_eff=round(x[2], 4), overhead_s=round(x[3] * 1e-6, 9),
                        k_latency_s=k_latency_s, split_k_min_k=split_k_min_k, softness=round(x[7], 4), **extra)


def fit_efficiency(rows: Rows, mask: np.ndarray, kind: str, peak: np.ndarray, bandwidth: float,
                   kept_compute: ComputeEfficiency) -> OpEfficiency:
    """Least-squares fit of one op kind's roofline parameters on ``rows[mask]``."""
    f, b, t, y, p = rows.flops[mask], rows.num_bytes[mask], rows.num_tokens[mask], rows.measured_s[mask], peak
    zero = np.zeros(len(f))
    fit_compute = kind in COMPUTE_BOUND_KINDS

    def unpack(x):
        if fit_compute:
            return x
        return kept_compute.max_eff, kept_compute.half_tokens, x[0], x[1]

    def residuals(x):
        max_eff, half_tokens, memory_eff, overhead_us = unpack(x)
        predicted = roofline_s(_eff(max_eff, half_tokens, memory_eff, overhead_us * 1e-6), f, b, t, zero, zero, p,
                               bandwidth)
        return np.log(predicted / y)

    # Overhead is fitted in microseconds so that every parameter is O(1)-O(100) for the optimiser.
    x0 = list(START)
    lower, upper = [0.01, 0.0, 0.01, 0.0], [1.0, 1e5, 1.0, 1e4]
    if not fit_compute:
        x0, lower, upper = x0[2:], lower[2:], upper[2:]
    _enough_rows(mask, len(x0), kind)
    fit = least_squares(residuals, np.clip(x0, lower, upper), bounds=(lower, upper), loss="soft_l1",
                        f_scale=_LOSS_SCALE)
    max_eff, half_tokens, memory_eff, overhead_us = (float(v) for v in unpack(fit.x))
    return OpEfficiency(compute=ComputeEfficiency(max_eff=round(max_eff, 4), half_tokens=round(half_tokens, 2)),
                        memory_eff=round(memory_eff, 4), overhead_s=round(overhead_us * 1e-6, 9))


def fit_link(rows: Rows, mask: np.ndarray, kind: str) -> LinkModel:
    """Alpha-beta fit of one collective: ``latency + ring_factor * bytes / bandwidth``; vLLM's custom all-reduce
    also fits the latency its barriers add per peer, per round, and NCCL's all-reduce and all-gather inside a node
    the latency of each of their ring's ``2 (n - 1)`` and ``n - 1`` steps, where the rows span more than one GPU count
    (with one, the steps' latency cannot be told from the fixed one)."""
    size, workers, y = rows.size_bytes[mask], rows.num_workers[mask], rows.measured_s[mask]
    per_peer = kind == "all_reduce_custom" or (kind in ("all_reduce", "all_gather") and len(np.unique(workers)) > 1)

    def residuals(x):
        return np.log(link_s(kind, size, workers, x[0] * 1e-6, x[1] * 1e9, x[2] * 1e-6 if per_peer else 0.0) / y)

    x0, lower, upper = list(LINK_START), [0.0, 0.01], [1e5, 1e5]
    if per_peer:
        x0, lower, upper = x0 + [0.1], lower + [0.0], upper + [100.0]
    _enough_rows(mask, len(x0), kind)
    fit = least_squares(residuals, np.clip(x0, lower, upper), bounds=(lower, upper), loss="soft_l1",
                        f_scale=_LOSS_SCALE)
    x = [float(v) for v in fit.x]
    extra = {"peer_latency_s": round(x[2] * 1e-6, 10)} if per_peer else {}
    return LinkModel(latency_s=round(x[0] * 1e-6, 9), bandwidth_bytes_per_s=round(x[1] * 1e9, 0), **extra)


def fit_prefill_attention(profile: HardwareProfile, rows: Rows, mask: np.ndarray) -> PrefillAttentionFit:
    """The kernel's geometry (``block_m``, ``block_n``, ``pack_gqa`` and the short-query tiles: set by hand with
    their source) is kept from the profile's fit for the rows' KV width; the rest is fitted, and without
    ``pack_gqa`` (FlashAttention 2) the packed single-token GQA rows with copies their ``swapped_copy_s``."""
    y = rows.measured_s[mask]
    widths = np.unique(rows.kv_dtype_bytes[mask])
    # The kernel of the rows' KV width: an 8-bit KV cache runs FlashAttention 3's FP8 kernel, whose tiles differ.
    current = profile.prefill_attention_for(int(widths[0])) if len(widths) == 1 else profile.prefill_attention
    if current is None:
        raise ConfigError(f"profile {profile.name}: prefill_attention needs its kernel geometry (block_m, block_n, "
                          "pack_gqa) before calibration can fit the rest; see the shipped h100-sxm.yaml")
    geometry = current.model_dump(include={"block_m", "block_n", "pack_gqa", "one_wg_block_m", "one_wg_block_n"})
    names = ("overhead_s", "tile_s", "max_eff", "path_softness", "memory_eff", "half_heads", "softness")
    copies = not geometry["pack_gqa"] and bool(
        (rows.single_token & packing_copies(rows.batch, rows.kv_heads, rows.num_heads))[mask].any())
    l2 = profile.l2_cache_bytes is not None  # the L2 term needs the cache's size
    at_l2 = 8 if copies else 7

    def fit_of(x):  # overhead, per-tile cost and copies' fixed cost in microseconds for the optimiser
        l2_terms = {"l2_speedup": x[at_l2], "l2_fraction": x[at_l2 + 1]} if l2 else {}
        return PrefillAttentionFit.model_construct(**dict(zip(names, (x[0] * 1e-6, x[1] * 1e-6, *x[2:7]))),
                                                   swapped_copy_s=x[7] * 1e-6 if copies else None, **l2_terms,
                                                   **geometry)

    def residuals(x):
        return np.log(prefill_s(profile, rows, mask, fit_of(x)) / y)

    x0 = [10.0, 1.0, 0.6, 2.0, 0.5, 4.0, 1.5]
    lower, upper = [0.0, 0.0, 0.05, 1.0, 0.01, 0.0, 1.0], [200.0, 100.0, 1.0, 20.0, 1.0, 1e4, 8.0]
    if copies:
        x0, lower, upper = x0 + [5.0], lower + [0.0], upper + [100.0]
    if l2:  # speed-up 1-4x, from 5% to twice the L2's size
        x0, lower, upper = x0 + [1.5, 0.5], lower + [1.0, 0.05], upper + [4.0, 2.0]
    _enough_rows(mask, len(x0), "prefill attention")
    fit = least_squares(residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=_LOSS_SCALE)
    x = [round(float(v), 4) for v in fit.x]
    extra = {"swapped_copy_s": round(x[7] * 1e-6, 9)} if copies else {}
    if l2:
        extra |= {"l2_speedup": x[at_l2], "l2_fraction": x[at_l2 + 1]}
    return PrefillAttentionFit(overhead_s=round(x[0] * 1e-6, 9), tile_s=round(x[1] * 1e-6, 9), max_eff=x[2],
                               path_softness=x[3], memory_eff=x[4], half_heads=x[5], softness=x[6], **extra,
                               **geometry)


def fit_decode_attention(profile: HardwareProfile, rows: Rows, mask: np.ndarray) -> DecodeAttentionFit:
    """The profile's ``gqa_only_split_kv`` (a property of its kernel, set by hand with its source) is kept; with
    it, MHA rows get their own fixed cost where the fit has any (else ``mha_overhead_s`` stays unset: they share
    the GQA one), and the packed GQA rows with copies their ``swapped_copy_s``."""
    y = rows.measured_s[mask]
    gqa_only = profile.decode_attention is not None and profile.decode_attention.gqa_only_split_kv
    own_mha = gqa_only and bool(rows.mha[mask].any())
    copies = gqa_only and bool(packing_copies(rows.batch, rows.kv_heads, rows.num_heads)[mask].any())
    at_copy = 7 if own_mha else 6
    at_keys = at_copy + copies  # split_keys, last

    def fit_of(x):  # overheads and per-stream time in microseconds for the optimiser
        return DecodeAttentionFit.model_construct(overhead_s=x[0] * 1e-6, per_stream_s=x[1] * 1e-6,
                                                  memory_eff=x[2], half_streams=x[3], min_splits=x[4],
                                                  softness=x[5], gqa_only_split_kv=gqa_only,
                                                  mha_overhead_s=x[6] * 1e-6 if own_mha else None,
                                                  swapped_copy_s=x[at_copy] * 1e-6 if copies else None,
                                                  split_keys=x[at_keys])

    def residuals(x):
        return np.log(decode_s(profile, rows, mask, fit_of(x)) / y)

    x0 = [10.0, 0.03, 0.9, 30.0, 16.0, 2.0]
    lower, upper = [0.0, 0.0, 0.1, 0.0, 1.0, 1.0], [100.0, 10.0, 1.0, 1e4, 1e3, 8.0]
    if own_mha:
        x0, lower, upper = x0 + [10.0], lower + [0.0], upper + [100.0]
    if copies:
        x0, lower, upper = x0 + [5.0], lower + [0.0], upper + [100.0]
    x0, lower, upper = x0 + [128.0], lower + [1.0], upper + [1e5]  # split_keys: a KV block of 128 to start
    _enough_rows(mask, len(x0), "decode attention")
    fit = least_squares(residuals, x0, bounds=(lower, upper), loss="soft_l1", f_scale=_LOSS_SCALE)
    x = [float(v) for v in fit.x]
    extra = {"gqa_only_split_kv": True} if gqa_only else {}
    extra["split_keys"] = round(x[at_keys], 2)
    if own_mha:
        extra["mha_overhead_s"] = round(x[6] * 1e-6, 9)
    if copies:
        extra["swapped_copy_s"] = round(x[at_copy] * 1e-6, 9)
    return DecodeAttentionFit(overhead_s=round(x[0] * 1e-6, 9), per_stream_s=round(x[1] * 1e-6, 12),
                              memory_eff=round(x[2], 4), half_streams=round(x[3], 3), min_splits=round(x[4], 3),
                              softness=round(x[5], 4), **extra)


def calibrate(profile: HardwareProfile, rows: Rows, split: Split) -> HardwareProfile:
    """A copy of ``profile`` with every kind present in the fitting rows refitted; the rest kept as they were."""
    train = (~split.held_out(rows.df) & ~l2_resident(profile, rows) & ~split.other_gemm_source(rows)
             & ~validation_only(profile, rows.kind))
    computed = train & (rows.kind != "unmodelled") & ~np.array([is_link_kind(k) for k in rows.kind], dtype=bool)
    no_peak = sorted({str(d) for d in rows.dtype[computed] if peak_dtype(str(d)) not in profile.peak_flops})
    if no_peak:  # their predictions are NaN, which the least-squares fit cannot start from
        raise ConfigError(f"{profile.name}: the measurements to fit have rows of dtype {', '.join(no_peak)}, for which "
                          f"the profile has no peak_flops (it has {', '.join(profile.peak_flops)}): add a peak or "
                          "leave those rows out")
    efficiency = dict(profile.efficiency)
    links: dict[str, LinkModel] = {}
    kernels: dict[str, object] = {}
    for kind in sorted(set(rows.kind[train])):
        mask = train & (rows.kind == kind)
        if kind == "unmodelled":
            continue
        flash = profile.attention_model == "flash_attention"
        if flash and kind in ("attention_prefill", "attention_decode"):
            # 16-bit and 8-bit KV caches run different kernels: each width gets its own fit where it was measured.
            name, fit_kernel = (("prefill_attention", fit_prefill_attention) if kind == "attention_prefill"
                                else ("decode_attention", fit_decode_attention))
            eight_bit = rows.kv_dtype_bytes == 1
            if (mask & ~eight_bit).any():
                kernels[name] = fit_kernel(profile, rows, mask & ~eight_bit)
            if (mask & eight_bit).any():
                kernels[f"{name}_8bit_kv"] = fit_kernel(profile, rows, mask & eight_bit)
            continue
        if is_link_kind(kind):
            if kind.endswith("_custom"):  # fitted on the sizes vLLM sends through it
                mask &= custom_all_reduce_serves(profile.custom_all_reduce_max_bytes, rows.size_bytes)
            if mask.any():
                links[kind] = fit_link(rows, mask, kind)
            continue
        peak = peak_flops(profile, rows, mask)
        if kind.startswith(("linear", "moe")) and profile.gemm_model == "tiled":
            efficiency[kind] = fit_gemm_efficiency(rows, mask, peak, profile.memory_bandwidth_bytes_per_s,
                                                   split_k_sms(profile, kind))
            continue
        # Memory-bound kinds keep the profile's (documented, non-binding) compute curve.
        current = efficiency.get(kind)
        kept = current.compute if current else ComputeEfficiency(max_eff=START[0], half_tokens=START[1])
        efficiency[kind] = fit_efficiency(rows, mask, kind, peak, profile.memory_bandwidth_bytes_per_s, kept)
    return profile.model_copy(update={"efficiency": efficiency, **links, **kernels})
