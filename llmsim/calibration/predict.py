"""What the simulator predicts for each measured row.

A compute row becomes the same ``OpWork`` the execution model builds (same FLOP and byte counts, through the same
``ops`` functions); a collective row goes through the same ring formulas. Prediction is vectorised over rows so
that calibration can evaluate ~10^5 rows per optimiser step; ``roofline_s`` is ``op_time_s`` on arrays (a test
holds them equal).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from llmsim.calibration.aiconfigurator import COLLECTOR_QUANT_BYTES, SOURCE_PREFIX
from llmsim.calibration.measurements import COLLECTIVE_OPS
from llmsim.errors import ConfigError
from llmsim.execution import ops
from llmsim.execution.model import gemm_efficiency, prefill_grid, split_k_sms
from llmsim.hardware.attention import (decode_attention_s, decode_memory_rate, decode_stream_s, prefill_attention_s,
                                       swap_copy_s)
from llmsim.hardware.profile import (GEMM_TILE, HardwareProfile, LinkModel, OpEfficiency, PrefillAttentionFit,
                                     peak_dtype)
from llmsim.hardware.roofline import (all_gather_factor, all_reduce_factor, custom_all_reduce_factor,
                                      custom_all_reduce_latency_s, custom_all_reduce_serves, ring_all_gather_latency_s,
                                      ring_all_reduce_latency_s, split_k_splits)
from llmsim.models.spec import ModelSpec



@lru_cache(maxsize=4096)
def _shapes(n_head: int, n_kv_head: int, n_embd: int, n_expanded: int, vocab: int, gated: bool, dtype: str,
            tp: int, kv_dtype: str, num_experts: int = 1, experts_per_token: int = 1) -> ops.ShardShapes:
    spec = ModelSpec(name="measured", num_layers=1, hidden_size=n_embd, num_heads=n_head, num_kv_heads=n_kv_head,
                     head_dim=n_embd // n_head, ffn_size=n_expanded, gated_mlp=gated, vocab_size=vocab, dtype=dtype,
                     kv_cache_dtype=kv_dtype, num_experts=num_experts, experts_per_token=experts_per_token)
    return ops.ShardShapes.of(spec, tp)


@lru_cache(maxsize=8)
def _gemm_shapes(dtype: str) -> ops.ShardShapes:
    """Shapes that carry only what ``ops.linear`` reads: element sizes and the GEMM kind of ``dtype`` weights."""
    spec = ModelSpec(name="gemm", num_layers=1, hidden_size=128, num_heads=1, num_kv_heads=1, head_dim=128,
                     ffn_size=128, vocab_size=128, dtype=dtype)
    return ops.ShardShapes.of(spec, 1)


def _int(value, default: int) -> int:
    return default if pd.isna(value) else int(value)


def row_shapes(row) -> ops.ShardShapes:
    """Shard shapes of the model a row describes (the simulator's own ``ShardShapes.of``)."""
    n_embd = int(row.n_embd)
    gated = True if pd.isna(row.gated) else str(row.gated).lower() in ("true", "1", "1.0")
    dtype = row.dtype if isinstance(row.dtype, str) else "fp16"
    kv_dtype = getattr(row, "kv_dtype", None)
    kv_dtype = kv_dtype if isinstance(kv_dtype, str) else dtype
    return _shapes(int(row.n_head), int(row.n_kv_head), n_embd, _int(row.n_expanded_embd, 4 * n_embd),
                   _int(row.vocab_size, 32000), gated, dtype, int(row.tp), kv_dtype)


def row_work(row) -> ops.OpWork:
    """The op the simulator would run for a measured compute row."""
    op = row.op
    if op == "memcpy":  # device copy: reads and writes size_bytes
        return ops.OpWork("memcpy", "copy", 0.0, 2.0 * float(row.size_bytes), 0.0)
    if op == "moe":
        return moe_row_work(row)
    if op == "gemm":  # [num_tokens, gemm_k] x [gemm_k, gemm_n], weights in dtype, activations 16-bit
        return ops.linear("gemm", int(row.num_tokens), int(row.gemm_k), int(row.gemm_n), _gemm_shapes(row.dtype))
    s = row_shapes(row)
    if op == "attn_prefill":
        chunk = (int(row.seq_len), int(row.kv_len))
        return ops.prefill_attention(s, (chunk,) * int(row.batch_size))
    if op == "attn_decode":
        batch = int(row.batch_size)
        return ops.decode_attention(s, batch, batch * int(row.kv_len))
    tokens = int(row.num_tokens)
    if op == "emb":
        return ops.embedding(s, tokens)
    if op == "lm_head":
        return ops.lm_head(s, tokens)[1]
    return next(w for w in ops.dense_layer_ops(s, tokens) if w.name == op)


def moe_row_shapes(row) -> ops.ShardShapes:
    """Shard shapes of a fused-MoE row: gated experts of n_expanded_embd / tp intermediate each (the same function
    gives the microbenchmark's kernel its shapes)."""
    return _shapes(1, 1, int(row.n_embd), int(row.n_expanded_embd), 32000, True, row.dtype, int(row.tp), "bf16",
                   int(row.num_experts), int(row.experts_per_token))


def moe_row_work(row, default_config: bool = False) -> ops.OpWork:
    """vLLM's fused MoE over num_tokens tokens, experts sharded by tp; ``default_config``: run with vLLM's
    default kernel configuration (``ops.vllm_default_moe_block_m``)."""
    s = moe_row_shapes(row)
    tokens = int(row.num_tokens)
    block_m = ops.vllm_default_moe_block_m(tokens, s.num_experts) if default_config else 0
    return ops.moe_experts(s, tokens, block_m)


class Rows:
    """Measured rows with their op kind, FLOPs, bytes, GEMM M, and collective shapes as arrays."""

    def __init__(self, df: pd.DataFrame, profile: HardwareProfile | None = None):
        """``profile``: the device the rows were measured on, where a kind depends on it (vLLM's fused MoE runs
        a tuned or its default kernel configuration by the device's tuned shapes)."""
        self.df = df.reset_index(drop=True)
        n = len(self.df)
        self.measured_s = self.df["median_ms"].to_numpy(dtype=float) / 1e3
        self.kind = np.empty(n, dtype=object)
        self.flops = np.zeros(n)
        self.num_bytes = np.zeros(n)
        self.num_tokens = np.zeros(n)
        self.gemm_k = np.zeros(n)  # a GEMM's inner dimension and output width (0: no GEMM)
        self.gemm_n = np.zeros(n)
        self.dtype = np.array([d if isinstance(d, str) else "fp16" for d in self.df["dtype"]], dtype=object)
        # Attention rows: what the fitted kernels depend on besides FLOPs and bytes.
        self.num_heads = np.zeros(n)  # query heads on the GPU
        self.head_dim = np.zeros(n)
        self._prefill: dict[int, tuple[ops.ShardShapes, tuple[tuple[int, int], ...]]] = {}  # row: (shapes, chunks)
        self._grids: dict[tuple, tuple[np.ndarray, ...]] = {}
        self.batch = self.df["batch_size"].to_numpy(dtype=float)
        self.kv_len = self.df["kv_len"].to_numpy(dtype=float)  # attention rows: KV tokens per sequence
        self.kv_heads = np.zeros(n)
        self.kv_bytes = np.zeros(n)  # KV cache bytes already cached: a decode row's whole KV, a prefill row's prefix
        self.kv_dtype_bytes = np.zeros(n)  # attention rows: the KV cache's element size
        self.mha = np.zeros(n, dtype=bool)  # attention rows: as many KV heads as query heads on the GPU
        self.moe_unaligned = np.zeros(n, dtype=bool)  # fused-MoE rows: ops.moe_width_unaligned
        # FP8 GEMM rows: bytes their input's quantization moved, as the measuring stack ran it (collector_quant)
        self.quant_bytes = np.zeros(n)
        collector = collector_quant(self.df)
        # Prefill-attention rows of one new token per sequence (FlashAttention 2 packs their GQA groups).
        self.single_token = (self.df["op"] == "attn_prefill").to_numpy() & (self.df["seq_len"] == 1).to_numpy()
        is_collective = self.df["op"].isin(COLLECTIVE_OPS).to_numpy()
        for i, row in enumerate(self.df.itertuples(index=False)):
            if is_collective[i]:
                self.kind[i] = collective_kind(row)
                continue
            work = row_work(row)
            self.kind[i] = work.kind
            if row.op == "moe":
                shard_ffn = int(row.n_expanded_embd) // int(row.tp)
                self.moe_unaligned[i] = ops.moe_width_unaligned(shard_ffn)
                if profile is not None:
                    self.kind[i] = profile.fused_moe_kind(work.kind, int(row.num_experts), shard_ffn)
                    if self.kind[i].endswith("_untuned"):  # vLLM's default configuration: its padding is known
                        work = moe_row_work(row, default_config=True)
            self.flops[i], self.num_bytes[i], self.num_tokens[i] = work.flops, work.num_bytes, work.num_tokens
            self.gemm_k[i], self.gemm_n[i] = work.gemm_k, work.gemm_n
            self.quant_bytes[i] = (ops.activation_quant_bytes(work.kind, work.num_tokens, work.gemm_k,
                                                              COLLECTOR_QUANT_BYTES) if collector[i]
                                   else work.quant_bytes)
            if row.op in ("attn_prefill", "attn_decode"):
                s = row_shapes(row)
                self.kv_heads[i] = s.kv_heads
                self.kv_dtype_bytes[i] = s.kv_dtype_bytes
                self.mha[i] = s.mha
                self.num_heads[i], self.head_dim[i] = s.num_heads, s.head_dim
                self.kv_bytes[i] = 2 * int(row.batch_size) * int(row.kv_len) * s.kv * s.kv_dtype_bytes
                if row.op == "attn_prefill":
                    self._prefill[i] = (s, ((int(row.seq_len), int(row.kv_len)),) * int(row.batch_size))
        self.size_bytes = self.df["size_bytes"].to_numpy(dtype=float)
        self.num_workers = self.df["num_workers"].to_numpy(dtype=float)

    def prefill_grid(self, fit: PrefillAttentionFit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tiles, units, longest tile's units, tile area) of every prefill-attention row under the kernel geometry
        of ``fit`` (zeros elsewhere), as the execution model counts them (``execution.model.prefill_grid``)."""
        key = (fit.block_m, fit.block_n, fit.pack_gqa, fit.one_wg_block_m, fit.one_wg_block_n)
        grid = self._grids.get(key)
        if grid is None:
            grid = tuple(np.zeros(len(self.df)) for _ in range(4))
            for i, (s, chunks) in self._prefill.items():
                for out, v in zip(grid, prefill_grid(fit, s, chunks)):
                    out[i] = v
            self._grids[key] = grid
        return grid

    def __len__(self) -> int:
        return len(self.df)


def collector_quant(df: pd.DataFrame) -> np.ndarray:
    """Rows measured by aiconfigurator's collector, whose FP8 GEMMs quantized their input in unfused torch ops
    (``aiconfigurator.COLLECTOR_QUANT_BYTES``) rather than as a served engine does."""
    if "source" not in df:
        return np.zeros(len(df), dtype=bool)
    return df["source"].astype(str).str.startswith(SOURCE_PREFIX).to_numpy()


def collective_kind(row) -> str:
    """``all_reduce``, ``all_reduce_inter_node``, ``all_reduce_custom`` (vLLM's, in CUDA graphs), ... or
    ``unmodelled`` for vLLM's custom all-reduce outside CUDA graphs (reported, not fitted)."""
    impl = row.impl if isinstance(row.impl, str) else "nccl"
    if impl == "custom_graph":
        return f"{row.op}_custom"
    if impl == "custom_eager":
        return "unmodelled"
    inter = int(row.devices_per_node) < int(row.num_workers)
    return f"{row.op}_inter_node" if inter else row.op


def is_link_kind(kind: str) -> bool:
    return kind.split("_inter_node")[0].split("_custom")[0] in COLLECTIVE_OPS


def roofline_s(eff: OpEfficiency, flops, num_bytes, num_tokens, gemm_k, gemm_n, peak, bandwidth, num_sms=None,
               quant_bytes=0.0):
    """``op_time_s`` on arrays (``gemm_k`` 0 where a row is no GEMM)."""
    c = eff.compute
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = c.max_eff * num_tokens / (num_tokens + c.half_tokens)
        tiles = num_tokens * gemm_n / (GEMM_TILE * GEMM_TILE)
        shape = gemm_k / (gemm_k + c.half_k) * gemm_n / (gemm_n + c.half_n) * tiles / (tiles + c.half_tiles)
        rate = np.where(gemm_k > 0, rate * shape, rate)
        compute = np.where(flops > 0, flops / (peak * rate), 0.0)
    memory = num_bytes / (bandwidth * eff.memory_eff)
    p = eff.softness
    bound = np.maximum(compute, memory) if p is None else (compute ** p + memory ** p) ** (1.0 / p)
    if eff.quant_memory_eff is not None:  # an FP8 GEMM's input quantization (0 bytes: none)
        bound = bound + quant_bytes / (bandwidth * eff.quant_memory_eff)
    return bound + eff.overhead_s + eff.k_latency_s * gemm_k / split_k_splits(eff, num_tokens, gemm_k, gemm_n,
                                                                              num_sms)


def ring_factor(op: str, num_workers: np.ndarray, size_bytes: np.ndarray) -> np.ndarray:
    """Bytes each worker moves per message byte, from the roofline's ring formulas (1 for send/recv)."""
    if op == "all_reduce_custom":  # vLLM's one- or two-stage kernel by message size
        return custom_all_reduce_factor(num_workers, size_bytes)
    if op.startswith("all_reduce"):
        return all_reduce_factor(num_workers)
    if op.startswith("all_gather"):
        return all_gather_factor(num_workers)
    return np.ones_like(num_workers)


def link_s(op: str, size_bytes, num_workers, latency_s, bandwidth, peer_latency_s=0.0):
    """Collective time on arrays: latency (per round of reads and its barrier over the peers, for vLLM's custom
    kernel) plus ring bytes over bandwidth (``roofline.all_reduce_s``, ``send_recv_s``)."""
    if op == "all_reduce_custom":
        latency_s = custom_all_reduce_latency_s(latency_s, peer_latency_s, num_workers, size_bytes)
    elif op.startswith("all_reduce"):
        latency_s = ring_all_reduce_latency_s(latency_s, peer_latency_s, num_workers)
    elif op.startswith("all_gather"):
        latency_s = ring_all_gather_latency_s(latency_s, peer_latency_s, num_workers)
    return latency_s + ring_factor(op, num_workers, size_bytes) * size_bytes / bandwidth


def predict_s(profile: HardwareProfile, rows: Rows) -> np.ndarray:
    """Predicted seconds per row; NaN where the profile has no model for the row's kind."""
    out = np.full(len(rows), np.nan)
    for kind in np.unique(rows.kind):
        m = rows.kind == kind
        if kind == "attention_prefill" and profile.prefill_attention is not None:
            for width in (1, 2, 4):  # KV element bytes: each width on its own fit where the profile has one
                mw = m & (rows.kv_dtype_bytes == width)
                if mw.any():
                    out[mw] = prefill_s(profile, rows, mw, profile.prefill_attention_for(width))
            continue
        if kind == "attention_decode" and profile.decode_attention is not None:
            for width in (1, 2, 4):
                mw = m & (rows.kv_dtype_bytes == width)
                if mw.any():
                    out[mw] = decode_s(profile, rows, mw, profile.decode_attention_for(width))
            continue
        if is_link_kind(kind):
            link: LinkModel | None = getattr(profile, kind, None)  # all_reduce, send_recv_inter_node, ...
            if link is not None:
                out[m] = link_s(kind, rows.size_bytes[m], rows.num_workers[m], link.latency_s,
                                link.bandwidth_bytes_per_s, link.peer_latency_s)
            if kind.endswith("_custom"):  # beyond its size limit vLLM runs NCCL, not the custom kernel
                out[m & ~custom_all_reduce_serves(profile.custom_all_reduce_max_bytes, rows.size_bytes)] = np.nan
            continue
        if kind == "unmodelled":
            continue
        try:
            eff: OpEfficiency = gemm_efficiency(profile, kind)  # as the execution model falls back
        except ConfigError:  # no curve of its own and no stand-in (block-scaled FP8, a kind the profile lacks)
            continue
        out[m] = roofline_s(eff, rows.flops[m], rows.num_bytes[m], rows.num_tokens[m], rows.gemm_k[m],
                            rows.gemm_n[m], peak_flops(profile, rows, m), profile.memory_bandwidth_bytes_per_s,
                            split_k_sms(profile, kind), rows.quant_bytes[m])
        if eff.unaligned_factor is not None:
            out[m] *= np.where(rows.moe_unaligned[m], eff.unaligned_factor, 1.0)
    return out


def peak_flops(profile: HardwareProfile, rows: Rows, m: np.ndarray) -> np.ndarray:
    """The profile's peak FLOP/s for each of rows ``m`` by its dtype; NaN where the profile has no peak."""
    return np.array([profile.peak_flops.get(peak_dtype(d), np.nan) for d in rows.dtype[m]])


def prefill_s(profile: HardwareProfile, rows: Rows, m: np.ndarray, fit: PrefillAttentionFit) -> np.ndarray:
    tiles, units, longest, area = (a[m] for a in rows.prefill_grid(fit))
    # FlashAttention 2's packing copies on batches of single-token queries, as the execution model charges them
    # (16-bit queries: an 8-bit KV cache keeps them).
    copy_s = 0.0
    if not fit.pack_gqa:
        copy_s = np.where(rows.single_token[m], swap_copy_s(fit, profile.memory_bandwidth_bytes_per_s, rows.batch[m],
                                                            rows.kv_heads[m], rows.num_heads[m], rows.head_dim[m], 2),
                          0.0)
    return prefill_attention_s(fit, profile.num_sms, peak_flops(profile, rows, m),
                               profile.memory_bandwidth_bytes_per_s, rows.num_bytes[m], rows.head_dim[m],
                               rows.num_heads[m], tiles, units, longest, copy_s, profile.l2_cache_bytes,
                               rows.kv_bytes[m], area)


def decode_s(profile: HardwareProfile, rows: Rows, m: np.ndarray, fit=None) -> np.ndarray:
    """The fitted decode kernel on rows ``m`` (``fit`` overrides the profile's, for the optimiser)."""
    fit = fit or profile.decode_attention
    stream = decode_stream_s(fit, rows.batch[m], rows.kv_heads[m])
    rate = decode_memory_rate(fit, profile.memory_bandwidth_bytes_per_s, rows.batch[m], rows.kv_heads[m],
                              rows.mha[m], rows.kv_len[m])
    # The measured decode kernels are pure-decode batches with 16-bit queries (an 8-bit KV cache keeps them).
    copy_s = swap_copy_s(fit, profile.memory_bandwidth_bytes_per_s, rows.batch[m], rows.kv_heads[m],
                         rows.num_heads[m], rows.head_dim[m], 2)
    return decode_attention_s(fit, stream, rows.num_bytes[m], rate, rows.mha[m], copy_s)
