"""Fitted attention kernel times (``PrefillAttentionFit``, ``DecodeAttentionFit``), on scalars or numpy arrays.

The simulator and calibration evaluate the same expressions: the execution model on one batch, calibration on
every measured row at once.
"""

from __future__ import annotations

import math

import numpy as np

from llmsim.hardware.profile import DecodeAttentionFit, PrefillAttentionFit


# Width of the L2 term's step, in ln(bytes): it goes from 12% to 88% of the way over a factor of 2.2 in bytes.
L2_STEP_WIDTH = 0.2


def prefill_tiles(fit: PrefillAttentionFit, longest_query: int, group: int) -> tuple[int, int]:
    """(block_m, block_n) the prefill kernel runs a batch with: FlashAttention 3 takes its one-warpgroup tiles where
    the batch's longest query times the query heads per KV head is at most 64 rows (``use_one_mma_wg``,
    ``hopper/heuristics.h``), whether or not it packs the group; its usual tiles otherwise."""
    if fit.one_wg_block_m is not None and longest_query * group <= 64:
        return fit.one_wg_block_m, fit.one_wg_block_n
    return fit.block_m, fit.block_n


def prefill_attention_s(fit: PrefillAttentionFit, num_sms: int, peak: float, bandwidth: float, num_bytes, head_dim,
                        num_heads, tiles, units, max_units, copy_s=0.0, l2_bytes: float | None = None,
                        cold_bytes=0.0, tile_area=None):
    """``num_heads``: query heads on the GPU; ``tiles``, ``units``, ``max_units``: the batch's grid
    (``execution.ops.prefill_attention_grid``); ``copy_s``: ``swap_copy_s`` where the batch takes FlashAttention
    2's packed single-token path (0 elsewhere); ``l2_bytes``: the GPU's L2 cache (None: no L2 term);
    ``cold_bytes``: of ``num_bytes``, a cached prefix's KV (read from HBM, never sped up by the L2 term);
    ``tile_area``: block_m x block_n of the tiles the grid was counted in (``prefill_tiles``; None: the fit's)."""
    if tile_area is None:
        tile_area = fit.block_m * fit.block_n
    unit_s = 4.0 * tile_area * head_dim * num_sms / (peak * fit.max_eff)
    bulk = (tiles * fit.tile_s + units * unit_s) / num_sms
    path = fit.tile_s + max_units * unit_s
    q = fit.path_softness
    compute = (bulk ** q + path ** q) ** (1.0 / q)
    if fit.l2_fraction is not None and l2_bytes is not None:
        # The batch's bytes against the share of L2 they may keep: a logistic step in ln(bytes), so the fit sees
        # a slope; exp's argument is clipped (a huge batch: no speed-up, without overflow).
        if hasattr(num_bytes, "shape"):  # numpy arrays (calibration)
            z = np.minimum((np.log(num_bytes) - math.log(fit.l2_fraction * l2_bytes)) / L2_STEP_WIDTH, 50.0)
            speed = 1.0 + (fit.l2_speedup - 1.0) / (1.0 + np.exp(z))
        else:
            z = min((math.log(num_bytes) - math.log(fit.l2_fraction * l2_bytes)) / L2_STEP_WIDTH, 50.0)
            speed = 1.0 + (fit.l2_speedup - 1.0) / (1.0 + math.exp(z))
        num_bytes = cold_bytes + (num_bytes - cold_bytes) / speed
    memory = num_bytes * (num_heads + fit.half_heads) / (bandwidth * fit.memory_eff * num_heads)
    p = fit.softness
    return (fit.overhead_s + copy_s) + (compute ** p + memory ** p) ** (1.0 / p)


def decode_stream_s(fit: DecodeAttentionFit, num_decode, kv_heads):
    """The per-sequence term of a decode batch (independent of the KV length)."""
    return num_decode * kv_heads * fit.per_stream_s


def decode_memory_rate(fit: DecodeAttentionFit, bandwidth: float, num_decode, kv_heads, mha=False,
                       kv_per_seq=None):
    """Bytes per second a decode batch reads its KV at. ``mha``: as many KV heads as query heads on the GPU;
    ``kv_per_seq``: KV tokens per sequence, which cap the splits where the fit has ``split_keys`` (scalars, or
    arrays in calibration)."""
    splits = fit.min_splits
    if fit.split_keys is not None and kv_per_seq is not None:
        splits = np.minimum(splits, kv_per_seq / fit.split_keys) if hasattr(kv_per_seq, "shape") else \
            min(splits, kv_per_seq / fit.split_keys)
    if hasattr(num_decode, "clip"):  # numpy arrays (calibration)
        split = np.maximum(num_decode, splits)
        n = kv_heads * (np.where(mha, num_decode, split) if fit.gqa_only_split_kv else split)
    elif mha and fit.gqa_only_split_kv:  # no split-KV: one stream per sequence and head
        n = kv_heads * num_decode
    else:
        n = kv_heads * max(num_decode, splits)
    return bandwidth * fit.memory_eff * n / (n + fit.half_streams)


def decode_rate_varies(fit: DecodeAttentionFit, num_decode: int, mha: bool) -> bool:
    """Whether a decode batch's KV read rate depends on its KV length (``split_keys`` may cap its splits): a
    batch of fewer sequences than ``min_splits`` that the kernel splits."""
    return fit.split_keys is not None and num_decode < fit.min_splits and not (mha and fit.gqa_only_split_kv)


def decode_overhead_s(fit: DecodeAttentionFit, mha=False):
    """The decode kernel's fixed cost: an MHA decode's own where the kernel splits only GQA ones."""
    if not fit.gqa_only_split_kv or fit.mha_overhead_s is None:
        return fit.overhead_s
    if hasattr(mha, "shape"):  # numpy arrays (calibration)
        return np.where(mha, fit.mha_overhead_s, fit.overhead_s)
    return fit.mha_overhead_s if mha else fit.overhead_s


def packing_copies(num_seqs, kv_heads, num_heads):
    """Whether FlashAttention 2's packing of a batch of single-token queries copies q and the output: the
    reshape is a view unless there are 2+ sequences and 2+ KV heads per GPU, and there is no packing without
    fewer KV than query heads (scalars, or arrays in calibration)."""
    return (num_seqs >= 2) & (kv_heads >= 2) & (kv_heads < num_heads)


def swap_copy_s(fit: DecodeAttentionFit | PrefillAttentionFit, bandwidth: float, num_seqs, kv_heads, num_heads,
                head_dim, dtype_bytes):
    """The two copies FlashAttention 2 makes around a batch of single-token queries it packs (a decode, or a
    prefill batch of one new token each; the fit's ``swapped_copy_s``): where ``packing_copies``, a fixed cost
    plus q and the output read and written once each at ``bandwidth`` (scalars, or arrays in calibration)."""
    if fit.swapped_copy_s is None:
        return 0.0 * num_seqs
    copied = packing_copies(num_seqs, kv_heads, num_heads)
    copy_s = fit.swapped_copy_s + 4.0 * num_seqs * num_heads * head_dim * dtype_bytes / bandwidth
    if hasattr(copied, "shape"):  # numpy arrays (calibration)
        return np.where(copied, copy_s, 0.0)
    return copy_s if copied else 0.0


def decode_attention_s(fit: DecodeAttentionFit, stream_s, num_bytes, memory_rate, mha=False, copy_s=0.0):
    """``copy_s``: ``swap_copy_s`` of a pure-decode step (0 for decodes in a mixed step)."""
    p = fit.softness
    return (decode_overhead_s(fit, mha) + copy_s) + (stream_s ** p + (num_bytes / memory_rate) ** p) ** (1.0 / p)
