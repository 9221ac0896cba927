"""Summary statistics computed from the records after a run.

TTFT: arrival -> first token. TPOT: (finish - first token) / (output tokens - 1). ITL (inter-token latency, as
vLLM's benchmark defines it): every gap between consecutive tokens of a request, pooled over the finished requests
(vLLM's: the successful ones; ``itl_stats``). E2EL:
arrival -> last token. Every percentile is numpy's default (linear interpolation between the closest ranks), as in
vLLM's ``benchmark_serving``; pooled ITL gaps, kept as (gap, count) pairs, get the same definition. SLO
attainment: the share of *arrived* requests that finished within both the TTFT and TPOT SLOs (rejected and
unfinished requests count as misses). Goodput here is the throughput of requests that met every SLO; DistServe's
rate-search goodput (the highest rate with attainment >= target) comes from a sweep over rates.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from llmsim.metrics.recorder import ReplicaTotals

PERCENTILES = (50, 90, 99)


def _stats(values: np.ndarray, unit: str = "s") -> dict:
    values = np.asarray(values, dtype=float)  # an empty column may come as object dtype
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"count": 0}
    out = {"count": int(len(values)), f"mean_{unit}": float(values.mean())}
    for p in PERCENTILES:
        out[f"p{p}_{unit}"] = float(np.percentile(values, p))
    out[f"max_{unit}"] = float(values.max())
    return out


def pooled_percentiles(values: np.ndarray, counts: np.ndarray, qs) -> list[float]:
    """``np.percentile(np.repeat(values, counts), q)`` for each ``q`` without expanding the repeats: linear
    interpolation between the closest ranks, with numpy's own interpolation arithmetic. A 1M-request run pools
    tens of millions of gaps, and an argsort of them took seconds: the values are bucketed instead by the top bits
    of their order-preserving integer keys, the counts summed per bucket, and only the buckets that hold a
    wanted rank are sorted (``_values_at_ranks``). The order statistics, and so the results, are the same. Counts
    may be negative: the gaps a request that ended unfinished takes back (``Recorder._take_back_gaps``), each a
    recorded value repeated bit for bit, which nets out exactly; the sample is what is left."""
    n = int(counts.sum())
    positions = [(q / 100.0) * float(n - 1) for q in qs]
    ranks = set()
    for position in positions:
        below = int(np.floor(position))
        ranks.update((below, min(below + 1, n - 1)))
    at = _values_at_ranks(values, counts, sorted(ranks))
    out = []
    for position in positions:
        below = float(np.floor(position))
        t = position - below
        a, b = at[int(below)], at[min(int(below) + 1, n - 1)]
        diff = b - a
        # numpy's _lerp: exact at both ends and monotone in t.
        out.append(a + diff * t if t < 0.5 else b - diff * (1.0 - t))
    return out


_BUCKET_SHIFT = 44  # a float's sign, exponent and top 8 mantissa bits: buckets ~0.4% wide, at most 2^20 of them


def _bucket_sample(values: np.ndarray, counts: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One bucket's values in order, with their counts; where some are taken back (negative counts), each value
    once with its net count, those above 0."""
    bucket_values, bucket_counts = values[inside], counts[inside]
    if (bucket_counts < 0).any():
        bucket_values, where = np.unique(bucket_values, return_inverse=True)
        net = np.zeros(len(bucket_values), dtype=np.int64)
        np.add.at(net, where.reshape(-1), bucket_counts)
        kept = net > 0
        return bucket_values[kept], net[kept]
    order = np.argsort(bucket_values, kind="stable")
    return bucket_values[order], bucket_counts[order]


def _values_at_ranks(values: np.ndarray, counts: np.ndarray, ranks: list[int]) -> dict[int, float]:
    """The value at each 0-based rank of the expanded, sorted sample (``np.repeat(values, counts)``, sorted)."""
    bits = values.view(np.int64)
    key = bits >> 63  # -1 for a negative float: flip its other bits, so the keys order as the floats do
    key &= 0x7FFFFFFFFFFFFFFF
    key ^= bits
    key >>= _BUCKET_SHIFT
    key -= key.min()
    # Per-bucket counts, summed as float64: exact integers below 2^53 tokens.
    cum = np.cumsum(np.bincount(key, weights=counts))
    out: dict[int, float] = {}
    by_bucket: dict[int, list[int]] = {}
    for rank in ranks:
        by_bucket.setdefault(int(np.searchsorted(cum, rank, side="right")), []).append(rank)
    for bucket, bucket_ranks in by_bucket.items():
        bucket_values, bucket_counts = _bucket_sample(values, counts, key == bucket)
        bucket_cum = np.cumsum(bucket_counts)
        before = int(cum[bucket - 1]) if bucket else 0
        for rank in bucket_ranks:
            i = int(np.searchsorted(bucket_cum, rank - before, side="right"))
            out[rank] = float(bucket_values[min(i, len(bucket_values) - 1)])
    return out


def _exact_sum_of_products(values: np.ndarray, times: np.ndarray) -> float:
    """``sum(values * times)`` rounded once: each value split into two halves of at most 26 significant bits
    (Dekker's split) and each count into two of 26 bits, whose products are exact, summed exactly (fsum). So the
    result is the same however the same gaps are grouped into (value, count) entries."""
    scaled = values * 134217729.0  # 2**27 + 1
    high = scaled - (scaled - values)
    low = values - high
    times_high, times_low = np.divmod(times, 1 << 26)
    times_high = times_high * float(1 << 26)  # a power of two: exact
    return math.fsum(np.concatenate((high * times_low, low * times_low, high * times_high, low * times_high)))


def itl_stats(gaps: np.ndarray, counts: np.ndarray) -> dict:
    """ITL over the pooled (gap, count) pairs, the gaps that unfinished requests took back (negative counts,
    ``Recorder._take_back_gaps``) left out."""
    total = int(counts.sum())
    if total == 0:
        return {"count": 0}
    # Summed exactly (fsum), so the mean does not depend on the order the gaps were recorded in (one process
    # or several, ``simulation.workers``); the gaps taken back exactly, products included, so neither does it
    # depend on how they were grouped.
    back = counts < 0
    if back.any():
        kept = ~back
        sum_s = math.fsum(gaps[kept] * counts[kept]) - _exact_sum_of_products(gaps[back], -counts[back])
    else:
        sum_s = math.fsum(gaps * counts)
    out = {"count": total, "mean_s": sum_s / float(total)}
    # The max is the 100th percentile (the last rank): the same bucketing serves it, take-backs netted out.
    *percentiles, max_s = pooled_percentiles(gaps, counts, (*PERCENTILES, 100.0))
    for p, value in zip(PERCENTILES, percentiles):
        out[f"p{p}_s"] = value
    out["max_s"] = max_s
    return out


def vllm_metrics(summary: dict) -> dict:
    """The names vLLM's serving benchmark prints and saves (``benchmark_serving``), latencies in ms."""
    out: dict = {"completed": summary["requests"]["finished"]}
    for ours, theirs in (("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2e", "e2el")):
        section = summary[ours]
        for stat, key in (("mean", "mean_s"), ("median", "p50_s"), ("p90", "p90_s"), ("p99", "p99_s")):
            value = section.get(key)
            out[f"{stat}_{theirs}_ms"] = value * 1e3 if value is not None else None
    t = summary["throughput"]
    out.update(request_throughput=t["requests_per_s"], output_throughput=t["output_tokens_per_s"],
               total_token_throughput=t["total_tokens_per_s"],
               request_goodput=summary["slo"]["goodput_requests_per_s"])
    return out


def add_derived_columns(requests: pd.DataFrame) -> pd.DataFrame:
    df = requests
    df["ttft_s"] = df["first_token_s"] - df["arrival_s"]
    df["e2e_s"] = df["finish_s"] - df["arrival_s"]
    df["queue_s"] = df["scheduled_s"] - df["arrival_s"]
    decode_tokens = (df["num_generated_tokens"] - 1).where(df["num_generated_tokens"] > 1)
    df["tpot_s"] = (df["finish_s"] - df["first_token_s"]) / decode_tokens
    return df


@dataclass(frozen=True)
class ReplicaUsage:
    """One replica's hardware and its iteration totals over the run."""

    num_gpus: int
    num_blocks: int
    peak_flops: float  # per GPU
    bandwidth: float  # per GPU
    idle_w: float  # per GPU
    totals: ReplicaTotals


def summarize(requests: pd.DataFrame, replicas: list[ReplicaUsage], gaps: np.ndarray, gap_counts: np.ndarray, *,
              ttft_slo_s: float, tpot_slo_s: float, tbt_slo_s: float | None, attainment_target: float,
              pue: float, prefill_flops: Callable[[int, int], float] | None = None,
              last_step_end_s: float | None = None) -> dict:
    """``prefill_flops(new, cached)``: FLOPs of prefilling ``new`` tokens after ``cached`` ones, given when
    the KV cache reuses prefixes (the summary then reports what the cache saved). ``last_step_end_s``: when the
    last iteration of any replica ended."""
    df = requests
    finished = df[df["status"] == "finished"]
    n_arrived = len(df)
    start = float(df["arrival_s"].min()) if n_arrived else 0.0
    end = float(finished["finish_s"].max()) if len(finished) else start
    span = max(end - start, 1e-12)
    # Throughput counts over the span to the last finish (vLLM's benchmark duration); the hardware is observed
    # until its last step ends, which comes later where steps ran for requests that timed out or were still
    # running at a cut-off. Over the finish span alone, busy fractions, MFU and MBU had come out above 1 (and
    # ~1e12 with no request finished) and idle energy short.
    observed = max(max(end, last_step_end_s or end) - start, 1e-12)
    tpot_ok = finished["tpot_s"].fillna(0.0) <= tpot_slo_s  # one-token outputs have no TPOT to miss
    met = (finished["ttft_s"] <= ttft_slo_s) & tpot_ok
    if tbt_slo_s is not None:
        met &= finished["max_tbt_s"] <= tbt_slo_s
    out_tokens = int(finished["num_generated_tokens"].sum())
    in_tokens = int(finished["num_prompt_tokens"].sum())
    busy = sum(r.totals.busy_s for r in replicas)
    total_gpus = sum(r.num_gpus for r in replicas)
    kv_capacity_s = sum(r.num_blocks * r.totals.busy_s for r in replicas)
    kv_util = float(sum(r.totals.kv_block_s for r in replicas) / kv_capacity_s) if kv_capacity_s > 0 else 0.0
    rejected = df[df["status"] == "rejected"]
    summary = {
        "requests": {
            "arrived": n_arrived,
            "finished": int(len(finished)),
            "rejected": int(len(rejected)),
            "in_flight": int((df["status"] == "in_flight").sum()),
            "timed_out": int((df["status"] == "timed_out").sum()),
            "preemptions": int(df["num_preemptions"].sum()),
            "migrations": int(df["num_migrations"].sum()),
        },
        "ttft": _stats(finished["ttft_s"].to_numpy()),
        "tpot": _stats(finished["tpot_s"].to_numpy()),
        "itl": itl_stats(gaps, gap_counts),
        "e2e": _stats(finished["e2e_s"].to_numpy()),
        "queueing": _stats(finished["queue_s"].to_numpy()),
        "throughput": {
            "duration_s": span,
            "requests_per_s": len(finished) / span,
            "output_tokens_per_s": out_tokens / span,
            "total_tokens_per_s": (out_tokens + in_tokens) / span,
        },
        "slo": {
            "ttft_s": ttft_slo_s,
            "tpot_s": tpot_slo_s,
            "tbt_s": tbt_slo_s,
            "attainment": float(met.sum() / n_arrived) if n_arrived else 0.0,
            "target": attainment_target,
            "meets_target": bool(n_arrived and met.sum() / n_arrived >= attainment_target),
            "goodput_requests_per_s": float(met.sum() / span),
            "goodput_requests_per_s_per_gpu": float(met.sum() / span / total_gpus),
        },
        "utilization": {
            "kv_cache_busy_mean": kv_util,
            "busy_fraction": float(busy / (observed * len(replicas))),
            # MFU/MBU over the whole run, idle time included.
            "mfu": float(sum(r.totals.flops for r in replicas)
                         / (observed * sum(r.num_gpus * r.peak_flops for r in replicas))),
            "mbu": float(sum(r.totals.num_bytes for r in replicas)
                         / (observed * sum(r.num_gpus * r.bandwidth for r in replicas))),
            "iterations": int(sum(r.totals.num_iterations for r in replicas)),
            "num_gpus": int(total_gpus),
        },
        "energy": energy(replicas, observed, pue, len(finished), out_tokens, in_tokens),
    }
    if prefill_flops is not None:
        summary["prefix_cache"] = prefix_cache_stats(df, prefill_flops)
    if (df["priority"] > 0).any():
        summary["by_priority"] = {
            str(p): {"finished": int(len(group)), "ttft": _stats(group["ttft_s"].to_numpy()),
                     "tpot": _stats(group["tpot_s"].to_numpy()), "e2e": _stats(group["e2e_s"].to_numpy())}
            for p, group in finished.groupby("priority")}
    summary.update(vllm_metrics(summary))  # top level, as in a saved vLLM benchmark result
    if len(rejected):
        # Reasons are per request (requests.parquet); the first one tells the printed summary's reader why.
        first = rejected.iloc[0]
        summary["requests"]["rejected_example"] = f"request {int(first['id'])}: {first['reason']}"
    return summary


def prefix_cache_stats(df: pd.DataFrame, prefill_flops: Callable[[int, int], float]) -> dict:
    """Prompt tokens found in the prefix cache when each request was first scheduled (requests that were
    scheduled), and the prefill FLOPs those hits saved: a whole prompt's prefill minus the rest's after the
    cached prefix (attention over the cached prefix is still paid)."""
    started = df[df["scheduled_s"].notna()]
    cached = started["num_cached_tokens"].to_numpy()
    prompts = started["num_prompt_tokens"].to_numpy()
    saved = 0.0
    for (p, c), n in pd.Series(list(zip(prompts[cached > 0], cached[cached > 0]))).value_counts().items():
        saved += n * (prefill_flops(int(p), 0) - prefill_flops(int(p - c), int(c)))
    return {
        "cached_tokens": int(cached.sum()),
        "prompt_tokens": int(prompts.sum()),
        "hit_rate_tokens": float(cached.sum() / prompts.sum()) if len(prompts) else 0.0,
        "hit_rate_requests": float((cached > 0).mean()) if len(prompts) else 0.0,
        "prefill_flops_saved": float(saved),
    }


def energy(replicas: list[ReplicaUsage], observed_s: float, pue: float, finished: int, out_tokens: int,
           in_tokens: int) -> dict:
    """Busy energy from each iteration's power, idle power for every GPU-second between iterations over the
    ``observed_s`` the hardware is observed, times PUE."""
    busy_j = sum(r.totals.busy_energy_j for r in replicas)
    idle_j = sum(r.idle_w * r.num_gpus * max(observed_s - r.totals.busy_s, 0.0) for r in replicas)
    total_j = (busy_j + idle_j) * pue
    gpu_s = observed_s * sum(r.num_gpus for r in replicas)

    def per(count: float) -> float | None:
        return total_j / count if count else None

    return {
        "total_j": total_j,
        "busy_j": busy_j * pue,
        "idle_j": idle_j * pue,
        "pue": pue,
        "mean_power_w_per_gpu": (busy_j + idle_j) / gpu_s if gpu_s > 0 else 0.0,
        "j_per_output_token": per(out_tokens),
        "j_per_token": per(out_tokens + in_tokens),
        "j_per_request": per(finished),
        "output_tokens_per_j": out_tokens / total_j if total_j > 0 else 0.0,
    }


def pooled_slo(summary: dict, p99_itl_s: float, median_queueing_s: float) -> dict:
    """Sarathi-Serve's capacity criterion on a run: the P99 of all token gaps and the median scheduling delay
    within bounds. Replaces the per-request verdict in ``summary["slo"]``: attainment 1 when met, else 0."""
    slo = dict(summary["slo"])
    itl = summary["itl"].get("p99_s")
    queueing = summary["queueing"].get("p50_s")
    met = itl is not None and queueing is not None and itl <= p99_itl_s and queueing <= median_queueing_s
    span = summary["throughput"]["duration_s"]
    finished = summary["requests"]["finished"]
    slo.update(definition="pooled", p99_itl_s=p99_itl_s, median_queueing_s=median_queueing_s,
               measured={"p99_itl_s": itl, "median_queueing_s": queueing},
               attainment=1.0 if met else 0.0, meets_target=bool(met),
               goodput_requests_per_s=finished / span if met else 0.0,
               goodput_requests_per_s_per_gpu=(finished / span / summary["utilization"]["num_gpus"]) if met else 0.0)
    return slo
