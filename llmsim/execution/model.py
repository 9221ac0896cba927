"""Iteration time of one batch on one replica, from the model's ops, the parallel plan and the hardware.

A batch is described by its *signature*: the prefill chunks (new tokens, cached tokens), the number of
decoding requests and the total KV length they read, and how many tokens sample. The parts that depend only
on the token count (every GEMM, norm and collective) are cached per token count; attention is evaluated per
batch. Pure decode batches take the same arithmetic path as any other batch, so fast-forwarded decode runs
and iteration-by-iteration stepping give bit-identical times.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, NamedTuple

from llmsim.errors import ConfigError
from llmsim.execution import ops
from llmsim.execution.cpu_overhead import CpuOverhead
from llmsim.execution.moe_jit import FusedMoeCompiles
from llmsim.hardware.attention import (decode_memory_rate, decode_overhead_s, decode_rate_varies, decode_stream_s,
                                       prefill_attention_s, prefill_tiles, swap_copy_s)
from llmsim.hardware.profile import HardwareProfile, LinkModel, OpEfficiency, PrefillAttentionFit
from llmsim.hardware.roofline import (all_gather_s, all_reduce_s, custom_all_reduce_serves, op_time_s, send_recv_s,
                                      tp_link)
from llmsim.models.spec import ModelSpec


_PREFILL_CACHE_ENTRIES = 1 << 16  # distinct prefill batches remembered per model (then forgotten at once)


# (model, device's id, plan, what-if factors) -> (device, the cost tables of ``ExecutionModel``); the entry holds
# the device, so its id names no other while the entry lives. A few at a time: a sweep or a plan search varies
# them little, and each table is bounded by the token counts and batches a run sees.
_SHARED_COSTS: dict[tuple, tuple[HardwareProfile, tuple[dict, ...]]] = {}
_SHARED_COSTS_MAX = 8


def _shared_costs(model: ModelSpec, hardware: HardwareProfile, plan: "ParallelPlan",
                  time_factors: dict[str, float]) -> tuple[dict, ...]:
    """The cost tables shared by every execution model of this model, device, plan and what-if factors (pure
    functions of those, so a table filled by one run gives another the values it would compute)."""
    key = (model, id(hardware), plan, tuple(time_factors.items()))
    entry = _SHARED_COSTS.get(key)
    if entry is None or entry[0] is not hardware:
        if len(_SHARED_COSTS) >= _SHARED_COSTS_MAX:
            del _SHARED_COSTS[next(iter(_SHARED_COSTS))]  # the oldest
        entry = _SHARED_COSTS[key] = (hardware, ({}, {}, {}, {}, {}, {}))
    return entry[1]


def forget_shared_costs() -> None:
    """Drop the shared cost tables, so the next execution model starts cold, as in a process of its own (for
    timings that compare single runs, and for tests)."""
    _SHARED_COSTS.clear()


def prefill_grid(fit: PrefillAttentionFit, s: ops.ShardShapes, chunks: tuple[tuple[int, int], ...]
                 ) -> tuple[int, int, int, int]:
    """(tiles, units, longest tile's units, tile area) of a prefill batch on the fitted kernel, in the tiles it runs
    the batch with (``prefill_tiles``): what ``prefill_attention_s`` prices, counted alike by the execution model
    and by calibration."""
    block_m, block_n = prefill_tiles(fit, max(new for new, _ in chunks), s.num_heads // s.kv_heads)
    return (*ops.prefill_attention_grid(s, chunks, block_m, block_n, fit.pack_gqa), block_m * block_n)


def gemm_efficiency(hardware: HardwareProfile, kind: str) -> OpEfficiency:
    """The profile's curve for ``kind``. Without a fit of its own, an FP8 GEMM runs on the 16-bit GEMM curve
    (at the FP8 peak), a fused-MoE kernel on the fused-MoE curve, else the GEMM curve of its dtype. Block-scaled
    FP8 has no stand-in: its kernels take 1.3-2x the per-tensor FP8 ones where both are measured (H100), so a
    profile without its curves cannot price it."""
    efficiency = hardware.efficiency
    eff = efficiency.get(kind)
    if eff is None and kind.endswith("_fp8_block"):
        raise ConfigError(f"hardware: {hardware.name} has no curve for block-scaled FP8 ({kind}; model.dtype "
                          "fp8_block): calibrate it on measured block-FP8 GEMMs and fused MoE, or use a profile "
                          "that has them (h100-sxm, h200)")
    if eff is None and kind.endswith("_untuned"):  # fused MoE without a default-configuration curve
        kind = kind.removesuffix("_untuned")
        eff = efficiency.get(kind)
    if eff is None and kind == "moe_fp8":
        eff = efficiency.get("linear_fp8")
    if eff is None and kind.startswith(("linear", "moe")):
        eff = efficiency.get("linear")
    if eff is None:
        raise ConfigError(f"hardware: {hardware.name} has no efficiency for {kind!r} ops")
    return eff


def pipeline_layers(num_layers: int, pp: int, partition: tuple[int, ...] | None = None) -> list[int]:
    """Layers on each pipeline stage as vLLM splits them (``vllm/distributed/utils.py``, ``get_pp_indices``):
    ``partition`` where the user gives one (``VLLM_PP_LAYER_PARTITION``); otherwise evenly, and the remainder one
    each on the stages before the last, counting back from it (the last stage also runs the final norm and the
    LM head)."""
    if partition is not None:
        return list(partition)
    per_stage, remainder = divmod(num_layers, pp)
    layers = [per_stage] * pp
    for i in range(2, remainder + 2):
        layers[-i] += 1
    return layers


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1  # tensor-parallel degree (GPUs sharing each layer)
    pp: int = 1  # pipeline stages (layers split across GPUs)
    layer_partition: tuple[int, ...] | None = None  # layers per stage (None: vLLM's even split)

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp


class IterationCost(NamedTuple):
    time_s: float
    flops: float  # summed over all GPUs of the replica
    num_bytes: float  # memory traffic summed over all GPUs


# Kernel groups a what-if multiplier (``hardware.time_factors``) scales, as the calibration reports their errors.
KERNEL_GROUPS = ("gemm", "attention_prefill", "attention_decode", "collective", "other")


def split_k_sms(hardware: HardwareProfile, kind: str) -> int | None:
    """The SMs a GEMM of ``kind`` splits K over (``roofline.split_k_splits``): cuBLAS's dense GEMMs split K
    when few output tiles leave SMs idle; vLLM's fused-MoE kernel does not, even on the GEMM curve's fallback."""
    return hardware.num_sms if kind.startswith("linear") else None


def _bytes_moved(op: ops.OpWork) -> float:
    """An op's memory traffic: its own, and an FP8 GEMM's input quantization before it."""
    return op.num_bytes + op.quant_bytes


def kernel_group(kind: str) -> str:
    """The group of an op kind: GEMMs (dense, FP8, fused MoE), the two attention kernels, or the rest."""
    if kind.startswith(("linear", "moe")):
        return "gemm"
    return kind if kind in ("attention_prefill", "attention_decode") else "other"


class ExecutionModel:
    def __init__(self, model: ModelSpec, hardware: HardwareProfile, plan: ParallelPlan,
                 cpu_overhead: CpuOverhead | None = None, cpu_overlaps: bool = False,
                 time_factors: dict[str, float] | None = None):
        self.model, self.hardware, self.plan = model, hardware, plan
        # Multipliers on the modelled kernel times by group (``KERNEL_GROUPS``; 1 where absent): a what-if, or a
        # draw from the calibration's held-out errors. Folded into the cached per-token-count and per-batch-size
        # constants, so the hot paths do no extra work.
        self.time_factors = {g: float((time_factors or {}).get(g, 1.0)) for g in KERNEL_GROUPS}
        # The engine's CPU time per step: added to the GPU time, or (async scheduling) overlapping it.
        self.cpu_overhead, self.cpu_overlaps = cpu_overhead, cpu_overlaps
        self.shapes = ops.ShardShapes.of(model, plan.tp)
        # An MoE model's first layers may run a dense MLP instead (``ModelSpec.num_dense_layers``).
        self._dense_shapes = ops.ShardShapes.of_dense_layers(model, plan.tp) if model.num_dense_layers else None
        # vLLM's fused MoE without a tuned kernel configuration for this shape on this device runs its default
        # one, whose block size is known (ops.vllm_default_moe_block_m): its padding is then counted.
        self._moe_default_config = self.shapes.num_experts > 1 and hardware.fused_moe_kind(
            self.shapes.moe_kind, self.shapes.num_experts, self.shapes.ffn).endswith("_untuned")
        self.peak_flops = hardware.peak(model.dtype)  # GEMMs run at the weights' dtype (W8A8 for fp8)
        self.act_peak_flops = hardware.peak(model.act_dtype)  # attention and the rest at the activations'
        self.bandwidth = hardware.memory_bandwidth_bytes_per_s
        self._tp_link = tp_link(hardware, plan.tp)
        # vLLM runs its custom all-reduce inside a node for messages up to its size limit, NCCL beyond.
        self._custom_link = hardware.all_reduce_custom if plan.tp <= hardware.gpus_per_node else None
        self._custom_max_bytes = hardware.custom_all_reduce_max_bytes
        # The LM head is vocabulary-parallel: each GPU computes its share of the logits and vLLM (V1) all-gathers
        # them before sampling (``LogitsProcessor._gather_logits``), through NCCL outside the CUDA graph. Priced on
        # the fitted NCCL all-gather inside a node; where the profile has none, or the TP group spans nodes, on the
        # TP group's all-reduce link (same latency and bus bandwidth, the all-gather's bytes).
        self._gather_link = (hardware.all_gather if hardware.all_gather is not None
                             and plan.tp <= hardware.gpus_per_node else self._tp_link)
        # Pipeline stages hand activations over NVLink-class links inside a node, the network across nodes.
        self._pp_link = hardware.send_recv if plan.num_gpus <= hardware.gpus_per_node else LinkModel(
            latency_s=hardware.inter_node.latency_s, bandwidth_bytes_per_s=hardware.inter_node.bandwidth_bytes_per_s)
        # The cached costs below depend on nothing but the model, the device, the plan and the what-if factors, so
        # every execution model of those in the process shares them (``_shared_costs``): a sweep's points and a
        # plan search's runs build new engines, not new tables.
        # _fixed_cache: (tokens, samples) -> IterationCost; _token_cache: tokens -> one layer's (and the rest's)
        # costs; _sample_cache: samples -> the LM head's; _decode_attn_cache: decodes -> attention constants;
        # _op_static: op kind -> curve, peak, SMs, factor; _prefill_cache: a step's prefill attention (time,
        # FLOPs, bytes over all layers) by its chunks, as chunked prefills repeat the same (new, cached) shapes
        # step after step (bounded: a long mixed run sees many distinct batches).
        (self._fixed_cache, self._token_cache, self._sample_cache, self._decode_attn_cache, self._op_static,
         self._prefill_cache) = _shared_costs(model, hardware, plan, self.time_factors)
        self._rate_terms: tuple | None = None  # _decode_rate_terms

    def op_cost(self, op: ops.OpWork) -> float:
        static = self._op_static.get(op.kind)
        if static is None:
            static = self._op_static[op.kind] = self._op_static_for(op.kind)
        eff, peak, sms, factor = static
        return op_time_s(eff, peak, self.bandwidth, op.flops, op.num_bytes, op.num_tokens, op.gemm_k, op.gemm_n,
                         sms, op.quant_bytes) * factor

    def _op_static_for(self, op_kind: str) -> tuple:
        """What ``op_cost`` needs of an op kind besides the op's own work: its curve, peak, split-K SMs and the
        what-if factor of its kernel group (fixed for this model and profile, so looked up once per kind)."""
        kind = self.hardware.fused_moe_kind(op_kind, self.shapes.num_experts, self.shapes.ffn)
        group = kernel_group(op_kind)
        eff = gemm_efficiency(self.hardware, kind)
        factor = self.time_factors[group]
        if eff.unaligned_factor is not None and kind.startswith("moe") and ops.moe_width_unaligned(self.shapes.ffn):
            factor *= eff.unaligned_factor
        return (eff, self.peak_flops if group == "gemm" else self.act_peak_flops, split_k_sms(self.hardware, kind),
                factor)

    def _send_recv_s(self, num_bytes: float) -> float:
        """A pipeline stage's activation hand-off."""
        return send_recv_s(self._pp_link, num_bytes) * self.time_factors["collective"]

    def _fixed(self, num_tokens: int, num_samples: int) -> IterationCost:
        """Everything but attention: every layer's GEMMs/norms/all-reduces, embedding (and its all-reduce), LM head
        (and its logits' all-gather), PP hand-offs."""
        key = (num_tokens, num_samples)
        cached = self._fixed_cache.get(key)
        if cached is not None:
            return cached
        layer_s, layer_flops, layer_bytes, emb_s, emb_flops, emb_bytes, hand_off_s = self._token_part(num_tokens)
        layers, tp = self.model.num_layers, self.plan.tp
        # The sums in the order a single pass over [embedding, final norm, LM head] takes (results bit for bit).
        other_s, other_flops, other_bytes = emb_s, emb_flops, emb_bytes
        if num_samples:
            for op_s, op_flops, op_bytes in self._sample_part(num_samples):
                other_s += op_s
                other_flops += op_flops
                other_bytes += op_bytes
        time_s = layers * layer_s + other_s + hand_off_s  # hand_off_s is 0.0 without pipeline stages
        cost = IterationCost(time_s, (layers * layer_flops + other_flops) * tp,
                             (layers * layer_bytes + other_bytes) * tp)
        self._fixed_cache[key] = cost
        return cost

    def _token_part(self, num_tokens: int) -> tuple:
        """What depends on the step's tokens alone (one layer, the embedding, PP hand-offs), cached by token count:
        mixed steps come in many (tokens, samples) pairs but far fewer token counts."""
        part = self._token_cache.get(num_tokens)
        if part is None:
            s, tp = self.shapes, self.plan.tp
            groups = self._layer_groups(num_tokens)
            layer_s = self._per_layer(groups, self.op_cost)
            layer_flops = self._per_layer(groups, attrgetter("flops"))
            layer_bytes = self._per_layer(groups, _bytes_moved)
            activation_bytes = num_tokens * s.hidden * s.dtype_bytes
            custom = self._custom_link is not None and custom_all_reduce_serves(self._custom_max_bytes,
                                                                                 activation_bytes)
            link = self._custom_link if custom else self._tp_link
            all_reduce = all_reduce_s(link, activation_bytes, tp, custom) * self.time_factors["collective"]
            layer_s += 2 * all_reduce
            emb = ops.embedding(s, num_tokens)
            emb_s = self.op_cost(emb)
            if tp > 1:  # the embedding is vocabulary-parallel too: vLLM all-reduces its output (masked rows)
                emb_s += all_reduce
            hand_off_s = (self.plan.pp - 1) * self._send_recv_s(activation_bytes) if self.plan.pp > 1 else 0.0
            part = (layer_s, layer_flops, layer_bytes, emb_s, emb.flops, emb.num_bytes, hand_off_s)
            self._token_cache[num_tokens] = part
        return part

    def _layer_groups(self, num_tokens: int) -> list[tuple[int, list[ops.OpWork]]]:
        """The layers' ops (attention itself and the all-reduces aside) by kind of layer: (how many, one's ops)."""
        layer_ops = ops.dense_layer_ops(self.shapes, num_tokens, self._moe_default_config)
        if self._dense_shapes is None:
            return [(self.model.num_layers, layer_ops)]
        dense = self.model.num_dense_layers
        dense_ops = ops.dense_layer_ops(self._dense_shapes, num_tokens)
        return [(self.model.num_layers - dense, layer_ops), (dense, dense_ops)]

    def _per_layer(self, groups: list[tuple[int, list[ops.OpWork]]], value: Callable[[ops.OpWork], float]) -> float:
        """One layer's ``value`` summed over its ops; with kinds of layers (``_layer_groups``), the mean layer's,
        each kind weighed by how many layers it is."""
        if len(groups) == 1:
            return sum(value(op) for op in groups[0][1])
        return sum(k * sum(value(op) for op in group) for k, group in groups) / self.model.num_layers

    def _sample_part(self, num_samples: int) -> tuple:
        """(time, FLOPs, bytes) of the final norm and the LM head (and, under TP, the logits' all-gather), cached by
        the number of sampling tokens."""
        part = self._sample_cache.get(num_samples)
        if part is None:
            part = tuple((self.op_cost(op), op.flops, op.num_bytes) for op in ops.lm_head(self.shapes, num_samples))
            tp = self.plan.tp
            if tp > 1:  # the logits' all-gather: every GPU's share of the vocabulary, at the activations' width
                logits_bytes = num_samples * self.shapes.vocab * tp * self.shapes.dtype_bytes
                gather_s = all_gather_s(self._gather_link, logits_bytes, tp) * self.time_factors["collective"]
                part += ((gather_s, 0.0, 0.0),)
            self._sample_cache[num_samples] = part
        return part

    def iteration(self, prefill_chunks: tuple[tuple[int, int], ...], num_decode: int, decode_kv_tokens: int,
                  num_samples: int, with_cpu: bool = True) -> IterationCost:
        """Cost of one iteration. ``prefill_chunks``: (new tokens, cached tokens) per prefilling request.
        ``with_cpu``: include the engine's CPU time (a pipeline charges it once per micro-batch, not per stage)."""
        num_tokens = num_decode + sum(new for new, _ in prefill_chunks)
        time_s, flops, num_bytes = self._fixed(num_tokens, num_samples)
        if prefill_chunks:
            part = self._prefill_cache.get(prefill_chunks) or self._prefill_part(prefill_chunks)
            time_s += part[0]
            flops += part[1]
            num_bytes += part[2]
        if num_decode:
            attn_s, attn_flops, attn_bytes = self._decode_attention(num_decode, decode_kv_tokens,
                                                                    not prefill_chunks)
            time_s += attn_s
            flops += attn_flops
            num_bytes += attn_bytes
        cpu = self.cpu_overhead
        if cpu is not None and with_cpu:
            cpu_s = cpu.step_s(len(prefill_chunks) + num_decode, num_samples)
            if not self.cpu_overlaps:
                time_s = time_s + cpu_s
            elif cpu_s > time_s:
                time_s = cpu_s
        return IterationCost(time_s, flops, num_bytes)

    def chunk_run_costs(self, chunk_steps: list[tuple[int, int, int]], num_decode: int, kv_tokens: int
                        ) -> tuple[list[float], list[float], list[float]]:
        """Times, FLOPs and bytes of a mixed run's chunk steps: each (new tokens, cached tokens, sampled tokens)
        of one prompt beside ``num_decode`` decodes whose KV grows by ``num_decode`` tokens a step, each
        ``iteration(((new, cached),), num_decode, kv_tokens, sampled)``: the same arithmetic in the same order,
        with what the steps share looked up once (Sarathi's and vLLM V1's runs cost most of their steps here;
        ``tests/test_execution.py`` holds the two equal)."""
        prefill_cache, fixed = self._prefill_cache, self._fixed
        cpu, overlaps = self.cpu_overhead, self.cpu_overlaps
        decode_attention = self._decode_attention
        times, flops_out, bytes_out = [], [], []
        for new, cached, samples in chunk_steps:
            time_s, flops, num_bytes = fixed(num_decode + new, samples)
            chunks = ((new, cached),)
            part = prefill_cache.get(chunks) or self._prefill_part(chunks)
            time_s += part[0]
            flops += part[1]
            num_bytes += part[2]
            if num_decode:
                attn_s, attn_flops, attn_bytes = decode_attention(num_decode, kv_tokens, False)
                time_s += attn_s
                flops += attn_flops
                num_bytes += attn_bytes
            if cpu is not None:
                cpu_s = cpu.step_s(1 + num_decode, samples)
                if not overlaps:
                    time_s = time_s + cpu_s
                elif cpu_s > time_s:
                    time_s = cpu_s
            times.append(time_s)
            flops_out.append(flops)
            bytes_out.append(num_bytes)
            kv_tokens += num_decode
        return times, flops_out, bytes_out

    def _prefill_part(self, chunks: tuple[tuple[int, int], ...]) -> tuple[float, float, float]:
        """A step's prefill attention over all layers (time, FLOPs, bytes), priced and kept by its chunks."""
        layers, tp = self.model.num_layers, self.plan.tp
        op = ops.prefill_attention(self.shapes, chunks)
        part = (layers * self._prefill_attention_s(op, chunks), layers * op.flops * tp, layers * op.num_bytes * tp)
        if len(self._prefill_cache) >= _PREFILL_CACHE_ENTRIES:
            self._prefill_cache.clear()
        self._prefill_cache[chunks] = part
        return part

    def prefill_flops(self, new_tokens: int, cached_tokens: int) -> float:
        """FLOPs of a step of one prefill chunk that samples its token, ``iteration(((new_tokens, cached_tokens),),
        0, 0, 1).flops``, without pricing the step: the summary counts what prefix-cache hits saved over every
        prompt length, mostly lengths no step had, whose op times would be computed for nothing. The same sums,
        in the same order, as ``_fixed`` and ``iteration`` (``tests/test_execution.py`` holds the two equal)."""
        s, layers, tp = self.shapes, self.model.num_layers, self.plan.tp
        cost = self._fixed_cache.get((new_tokens, 1))
        if cost is not None:
            fixed = cost.flops
        else:
            part = self._token_cache.get(new_tokens)
            if part is not None:
                layer_flops, other = part[1], part[4]
            else:
                layer_flops = self._per_layer(self._layer_groups(new_tokens), attrgetter("flops"))
                other = ops.embedding(s, new_tokens).flops
            for op in ops.lm_head(s, 1):
                other += op.flops
            fixed = (layers * layer_flops + other) * tp
        return fixed + layers * ops.prefill_attention(s, ((new_tokens, cached_tokens),)).flops * tp

    def cpu_step_s(self, num_requests: int, num_samples: int) -> float:
        cpu = self.cpu_overhead
        return 0.0 if cpu is None else cpu.step_s(num_requests, num_samples)

    def _prefill_attention_s(self, op: ops.OpWork, chunks: tuple[tuple[int, int], ...]) -> float:
        fit = self.hardware.prefill_attention_for(self.shapes.kv_dtype_bytes)
        if fit is None:
            return self.op_cost(op)
        s = self.shapes
        tiles, units, longest, tile_area = prefill_grid(fit, s, chunks)
        copy_s = 0.0
        if not fit.pack_gqa and ops.single_token_chunks(chunks):
            # FlashAttention 2's packed single-token path (FlashAttention 3 packs inside the kernel)
            copy_s = swap_copy_s(fit, self.bandwidth, len(chunks), s.kv_heads, s.num_heads, s.head_dim, s.dtype_bytes)
        # A cached prefix's KV was written steps before: read from HBM, outside the L2 term.
        cold_bytes = sum(2 * cached for _, cached in chunks) * s.kv * s.kv_dtype_bytes
        time_s = prefill_attention_s(fit, self.hardware.num_sms, self.act_peak_flops, self.bandwidth, op.num_bytes,
                                     s.head_dim, s.num_heads, tiles, units, longest, copy_s,
                                     self.hardware.l2_cache_bytes, cold_bytes, tile_area)
        return time_s * self.time_factors["attention_prefill"]

    def _decode_attention(self, num_decode: int, kv_tokens: int, pure: bool = True) -> tuple[float, float, float]:
        """``ops.decode_attention`` through ``op_cost``, over all layers, with the per-batch-size constants
        cached: decode runs evaluate this once per step, so it is the hottest arithmetic in the simulator.
        ``pure``: a step of decodes only (the kernel's fixed cost then includes the packing copies of
        ``hardware.attention.swap_copy_s``, where the kernel makes them)."""
        c = self._decode_attn_cache.get(num_decode)
        if c is None:
            c = self._decode_attention_constants(num_decode)
        flops_per_kv, bytes_per_kv, fixed_bytes, fit, a, b, overhead_s, mixed_overhead_s = c
        if not pure:
            overhead_s = mixed_overhead_s
        if b is None:  # the KV read rate follows the KV length (splits capped by it)
            b = self._decode_rate(num_decode, kv_tokens)
        flops = flops_per_kv * kv_tokens
        num_bytes = bytes_per_kv * kv_tokens + fixed_bytes
        if fit is None:
            layer_s = max(flops / a, num_bytes / b) + overhead_s
        else:  # hardware.attention.decode_attention_s inlined: the call costs ~2% of the simulation loop;
            p = fit.softness  # test_execution pins the two equal
            layer_s = overhead_s + (a ** p + (num_bytes / b) ** p) ** (1.0 / p)
        layers, tp = self.model.num_layers, self.plan.tp
        return layers * layer_s, layers * flops * tp, layers * num_bytes * tp

    def _decode_attention_constants(self, num_decode: int) -> tuple:
        c = self._decode_attn_cache.get(num_decode)
        if c is None:
            # FLOPs and bytes are linear in the KV length: read both coefficients off ops.decode_attention.
            eff = self.hardware.efficiency["attention_decode"]
            empty = ops.decode_attention(self.shapes, num_decode, 0)
            one = ops.decode_attention(self.shapes, num_decode, 1)
            fit = self.hardware.decode_attention_for(self.shapes.kv_dtype_bytes)
            if fit is None:  # roofline: compute rate, memory rate, overhead (pure-decode and mixed steps)
                c = (one.flops - empty.flops, one.num_bytes - empty.num_bytes, empty.num_bytes, None,
                     self.act_peak_flops * eff.compute.at(num_decode), self.bandwidth * eff.memory_eff, eff.overhead_s,
                     eff.overhead_s)
            else:  # fitted kernel: per-sequence term, KV read rate, overhead (pure-decode and mixed steps)
                s = self.shapes
                kv_heads, mha = s.kv_heads, s.mha
                overhead_s = decode_overhead_s(fit, mha)
                copy_s = swap_copy_s(fit, self.bandwidth, num_decode, kv_heads, s.num_heads, s.head_dim,
                                     s.dtype_bytes)
                # None: the rate depends on the KV length, evaluated per step (``_decode_rate``).
                rate = None if decode_rate_varies(fit, num_decode, mha) else decode_memory_rate(
                    fit, self.bandwidth, num_decode, kv_heads, mha)
                c = (one.flops - empty.flops, one.num_bytes - empty.num_bytes, empty.num_bytes, fit,
                     decode_stream_s(fit, num_decode, kv_heads), rate, overhead_s + copy_s, overhead_s)
            f = self.time_factors["attention_decode"]
            if f != 1.0:  # both forms are homogeneous in (overhead, time terms): scale each by f
                flops_per_kv, bytes_per_kv, fixed_bytes, fit, a, b, overhead_s, mixed_overhead_s = c
                c = (flops_per_kv, bytes_per_kv, fixed_bytes, fit, a * f if fit is not None else a / f,
                     None if b is None else b / f, overhead_s * f, mixed_overhead_s * f)
            self._decode_attn_cache[num_decode] = c
        return c

    def _decode_rate(self, num_decode: int, kv_tokens: int) -> float:
        """The KV read rate of a decode batch whose splits its KV length caps (``DecodeAttentionFit.split_keys``),
        from its KV tokens per sequence averaged over the batch, with the what-if factor as the constants have
        it: ``hardware.attention.decode_memory_rate``'s arithmetic, in its order (decode runs evaluate it every
        step; test_execution pins the two equal)."""
        kv_heads, max_splits, split_keys, bw_eff, half, f = self._decode_rate_terms()
        splits = kv_tokens / num_decode / split_keys
        if splits > max_splits:
            splits = max_splits
        n = kv_heads * (num_decode if num_decode >= splits else splits)
        rate = bw_eff * n / (n + half)
        return rate / f if f != 1.0 else rate

    def _decode_rate_terms(self) -> tuple:
        terms = self._rate_terms
        if terms is None:
            fit = self.hardware.decode_attention_for(self.shapes.kv_dtype_bytes)
            terms = self._rate_terms = (self.shapes.kv_heads, fit.min_splits, fit.split_keys,
                                        self.bandwidth * fit.memory_eff, fit.half_streams,
                                        self.time_factors["attention_decode"])
        return terms

    def fused_moe_compiles(self, build_s: float, max_num_seqs: int, max_num_batched_tokens: int,
                           pads_every_step: bool) -> FusedMoeCompiles | None:
        """A new engine's record of the fused-MoE kernel variants it has built (``execution/moe_jit.py``), each
        kernel ``build_s`` to build; None for a dense model."""
        if self.shapes.num_experts == 1:
            return None
        return FusedMoeCompiles(self.shapes.num_experts, self.shapes.experts_per_token, not self._moe_default_config,
                                build_s, max_num_seqs, max_num_batched_tokens, pads_every_step)

    def decode_iteration(self, num_decode: int, decode_kv_tokens: int) -> IterationCost:
        return self.iteration((), num_decode, decode_kv_tokens, num_decode)

    def decode_run(self, num_decode: int, kv_tokens: int, num_steps: int
                   ) -> tuple[list[float], list[float], list[float]]:
        """Times, FLOPs and bytes of ``num_steps`` consecutive decode iterations of the same batch, whose KV
        grows by ``num_decode`` tokens a step. Same arithmetic, in the same order, as ``decode_iteration``."""
        return (self.decode_run_times(num_decode, kv_tokens, num_steps),
                *self.decode_run_work(num_decode, kv_tokens, num_steps))

    def decode_run_times(self, num_decode: int, kv_tokens: int, num_steps: int) -> list[float]:
        """``decode_run``'s times alone: a fast-forwarded run needs every step's end before it starts, and the
        FLOPs and bytes only of the steps it does (``decode_run_work``; runs are often cut short)."""
        fixed_s = self._fixed(num_decode, num_decode)[0]
        flops_per_kv, bytes_per_kv, attn_fixed_bytes, fit, a, b, overhead_s, _ = self._decode_attention_constants(
            num_decode)
        layers = self.model.num_layers
        times = []
        # The CPU time, as ``iteration`` adds it: after the GPU time (x + 0.0 == x where there is none).
        cpu_s = self.cpu_step_s(num_decode, num_decode)
        add_s = 0.0 if self.cpu_overlaps else cpu_s
        # _decode_attention's arithmetic, in its order, inlined in the loop (decode runs are the hot path).
        if fit is None:
            for _ in range(num_steps):
                layer_s = max(flops_per_kv * kv_tokens / a, (bytes_per_kv * kv_tokens + attn_fixed_bytes) / b
                              ) + overhead_s
                times.append(fixed_s + layers * layer_s + add_s)
                kv_tokens += num_decode
        elif b is None:  # the KV read rate follows the KV length: _decode_attention's arithmetic, per step
            p = fit.softness
            kv_heads, max_splits, split_keys, bw_eff, half, factor = self._decode_rate_terms()
            for _ in range(num_steps):
                nb = bytes_per_kv * kv_tokens + attn_fixed_bytes
                splits = kv_tokens / num_decode / split_keys  # _decode_rate, inlined
                if splits > max_splits:
                    splits = max_splits
                n = kv_heads * (num_decode if num_decode >= splits else splits)
                rate = bw_eff * n / (n + half)
                if factor != 1.0:
                    rate = rate / factor
                layer_s = overhead_s + (a ** p + (nb / rate) ** p) ** (1.0 / p)
                times.append(fixed_s + layers * layer_s + add_s)
                kv_tokens += num_decode
        else:
            p = fit.softness
            a_p, inv_p = a ** p, 1.0 / p
            for _ in range(num_steps):
                layer_s = overhead_s + (a_p + ((bytes_per_kv * kv_tokens + attn_fixed_bytes) / b) ** p) ** inv_p
                times.append(fixed_s + layers * layer_s + add_s)
                kv_tokens += num_decode
        if self.cpu_overlaps and cpu_s > 0.0:
            times = [t if t >= cpu_s else cpu_s for t in times]
        return times

    def decode_run_work(self, num_decode: int, kv_tokens: int, num_steps: int) -> tuple[list[float], list[float]]:
        """``decode_run``'s FLOPs and bytes of its first ``num_steps`` steps."""
        _, fixed_flops, fixed_bytes = self._fixed(num_decode, num_decode)
        flops_per_kv, bytes_per_kv, attn_fixed_bytes = self._decode_attention_constants(num_decode)[:3]
        layers, tp = self.model.num_layers, self.plan.tp
        flops, num_bytes = [], []
        for _ in range(num_steps):
            flops.append(fixed_flops + layers * (flops_per_kv * kv_tokens) * tp)
            num_bytes.append(fixed_bytes + layers * (bytes_per_kv * kv_tokens + attn_fixed_bytes) * tp)
            kv_tokens += num_decode
        return flops, num_bytes

    def pipeline_stages(self, cost: IterationCost, num_tokens: int, num_samples: int
                        ) -> tuple[tuple[float, ...], float]:
        """(each stage's time, activation hand-off between stages) of a batch of ``num_tokens`` whose
        whole-pipeline time is ``cost.time_s``: every layer takes the same time, the stages hold the layers vLLM
        gives them (``pipeline_layers``), the first one also runs the embedding and the last the final norm and
        the LM head for the ``num_samples`` tokens that sample."""
        pp = self.plan.pp
        if pp == 1:
            return (cost.time_s,), 0.0
        hand_off = self._send_recv_s(num_tokens * self.shapes.hidden * self.shapes.dtype_bytes)
        embedding_s = self._token_part(num_tokens)[3]
        head_s = sum(op_s for op_s, _, _ in self._sample_part(num_samples)) if num_samples else 0.0
        layer_s = (cost.time_s - (pp - 1) * hand_off - embedding_s - head_s) / self.model.num_layers
        stages = [n * layer_s for n in pipeline_layers(self.model.num_layers, pp, self.plan.layer_partition)]
        stages[0] += embedding_s
        stages[-1] += head_s
        return tuple(stages), hand_off

    def kv_link(self, inter_node: bool) -> tuple[float, float]:
        """(bytes/s per GPU, latency) of the link a KV copy from this instance crosses (``cluster.network``),
        with the collectives' what-if factor (``hardware.time_factors``)."""
        link = self.hardware.inter_node if inter_node else self.hardware.intra_node
        f = self.time_factors["collective"]
        return link.bandwidth_bytes_per_s / f, link.latency_s * f
