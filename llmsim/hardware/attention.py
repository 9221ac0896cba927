"""Fitted attention kernel times (``PrefillAttentionFit``, ``DecodeAttentionFit``), on scalars or numpy arrays.

The simulator and calibration evaluate the same expressions: the execution model on one batch, calibration on
every measured row at once.
"""

from __future__ import annotations

from llmsim.hardware.profile import DecodeAttentionFit, PrefillAttentionFit


def prefill_attention_s(fit: PrefillAttentionFit, peak: float, bandwidth: float, flops, num_bytes, mean_keys,
                        query_tiles):
    compute_eff = (fit.max_eff * mean_keys / (mean_keys + fit.half_keys)
                   * query_tiles / (query_tiles + fit.half_tiles))
    compute = flops / (peak * compute_eff)
    memory = num_bytes / (bandwidth * fit.memory_eff)
    p = fit.softness
    return fit.overhead_s + (compute ** p + memory ** p) ** (1.0 / p)


def decode_stream_s(fit: DecodeAttentionFit, num_decode, kv_heads):
    """The per-sequence term of a decode batch (independent of the KV length)."""
    return num_decode * kv_heads * fit.per_stream_s


def decode_memory_rate(fit: DecodeAttentionFit, bandwidth: float, num_decode, kv_heads):
    """Bytes per second a decode batch reads its KV at."""
    if hasattr(num_decode, "clip"):  # numpy arrays (calibration)
        n = kv_heads * num_decode.clip(min=fit.min_splits)
    else:
        n = kv_heads * max(num_decode, fit.min_splits)
    return bandwidth * fit.memory_eff * n / (n + fit.half_streams)


def decode_attention_s(fit: DecodeAttentionFit, stream_s, num_bytes, memory_rate):
    p = fit.softness
    return fit.overhead_s + (stream_s ** p + (num_bytes / memory_rate) ** p) ** (1.0 / p)
