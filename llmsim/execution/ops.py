"""FLOPs and bytes of every operator of one transformer layer on one tensor-parallel shard.

Names follow the kernel names of the shipped measurements (attn_pre_proj = fused QKV, mlp_up_proj = fused
up+gate, ...), so calibration maps measured rows onto these ops one to one. ``M`` is the token dimension
that decides GEMM efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from llmsim.models.spec import ModelSpec


# Not frozen: the execution model builds a layer's ops for every new token count, and a frozen dataclass costs
# ~0.45 us more per instance (a step of a new token count builds eleven).
@dataclass(slots=True)
class OpWork:
    name: str
    kind: str  # efficiency class in the hardware profile
    flops: float
    num_bytes: float
    num_tokens: float  # GEMM M dimension (or tokens touched)
    gemm_k: int = 0  # a GEMM's inner dimension (0: not a GEMM)
    gemm_n: int = 0  # a GEMM's output width on this shard
    # An FP8 GEMM's quantization of its 16-bit input: the bytes that kernel moves before the GEMM runs
    # (``ACTIVATION_QUANT_BYTES``), priced at the curve's ``quant_memory_eff``; 0 for every other op.
    quant_bytes: float = 0.0


@dataclass(frozen=True, slots=True)
class ShardShapes:
    """Per-GPU shapes of a model under tensor parallelism ``tp``."""

    hidden: int
    q: int  # query width on this shard
    kv: int  # key (= value) width on this shard; KV heads are replicated when there are fewer than tp
    ffn: int  # MLP intermediate width on this shard (one expert)
    vocab: int
    num_heads: int
    head_dim: int
    gated: bool
    num_experts: int
    experts_per_token: int
    dtype_bytes: int  # activations (and TP all-reduce payloads)
    kv_dtype_bytes: int  # the KV cache's element size (vLLM's --kv-cache-dtype)
    weight_bytes: int  # weights (1 for an fp8 / int8 checkpoint)
    gemm_kind: str  # efficiency class of the GEMMs: "linear", "linear_fp8" (FP8 weights), "linear_fp8_block"
    shared_ffn: int = 0  # an MoE layer's shared experts' MLP width on this shard (0: none)

    @classmethod
    def of(cls, m: ModelSpec, tp: int) -> "ShardShapes":
        return cls(hidden=m.hidden_size, q=m.q_size // tp, kv=max(1, math.ceil(m.num_kv_heads / tp)) * m.head_dim,
                   ffn=m.ffn_size // tp, vocab=math.ceil(m.vocab_size / tp), num_heads=m.num_heads // tp,
                   head_dim=m.head_dim, gated=m.gated_mlp, num_experts=m.num_experts,
                   experts_per_token=m.experts_per_token, dtype_bytes=m.act_bytes,
                   kv_dtype_bytes=m.kv_dtype_bytes, weight_bytes=m.dtype_bytes,
                   gemm_kind=_GEMM_KINDS.get(m.dtype, "linear"), shared_ffn=m.shared_expert_ffn_size // tp)

    @classmethod
    def of_dense_layers(cls, m: ModelSpec, tp: int) -> "ShardShapes":
        """The shapes of an MoE model's first layers, whose MLP is dense (``ModelSpec.num_dense_layers``)."""
        return replace(cls.of(m, tp), ffn=m.dense_ffn_size // tp, num_experts=1, experts_per_token=1, shared_ffn=0)

    @property
    def kv_heads(self) -> int:
        return self.kv // self.head_dim

    @property
    def moe_kind(self) -> str:
        """Efficiency class of the fused MoE: ``moe``, ``moe_fp8`` for FP8 weights, ``moe_fp8_block`` for
        block-scaled ones (as ``gemm_kind``)."""
        return "moe" + self.gemm_kind.removeprefix("linear")

    @property
    def mha(self) -> bool:
        """As many KV heads as query heads on this shard (no grouped-query attention)."""
        return self.kv_heads == self.num_heads


# The GEMM curve of a weight dtype: per-tensor FP8 (W8A8) and block-scaled FP8 run different kernels (vLLM quantises
# the activations per 128-element group for the latter, and its block GEMM measures 1.3-2x the per-tensor one).
_GEMM_KINDS = {"fp8": "linear_fp8", "fp8_block": "linear_fp8_block"}


# Bytes per input element that quantizing an FP8 GEMM's 16-bit activations moves, as a served vLLM runs it (its
# CUDA kernels, or the one kernel torch.compile makes of QuantFP8): per-tensor dynamic scales read the input for its
# absolute maximum, then read it again and write FP8 (2 + 2 + 1); per-128-group scales do both in one pass (2 + 1;
# the group's scale, 4 bytes per 128 elements, aside).
ACTIVATION_QUANT_BYTES = {"linear_fp8": 5.0, "linear_fp8_block": 3.0}


def activation_quant_bytes(kind: str, tokens: float, n_in: float,
                           bytes_per_element: dict[str, float] = ACTIVATION_QUANT_BYTES) -> float:
    """Bytes the quantization of a [tokens, n_in] input of an op of ``kind`` moves (0: no FP8 GEMM), at
    ``bytes_per_element`` of its kind (a served engine's; calibration passes a measuring stack's)."""
    return tokens * n_in * bytes_per_element.get(kind, 0.0)


def linear(name: str, tokens: int, n_in: int, n_out: int, s: ShardShapes, quantised: bool = True) -> OpWork:
    """GEMM [tokens, n_in] x [n_in, n_out]: reads input and weights, writes output. ``quantised``: the weights
    have the checkpoint's dtype (vLLM leaves the LM head unquantised); FP8 ones quantize the input first."""
    flops = 2.0 * tokens * n_in * n_out
    weight_bytes = s.weight_bytes if quantised else s.dtype_bytes
    num_bytes = (tokens * n_in + tokens * n_out) * s.dtype_bytes + n_in * n_out * weight_bytes
    kind = s.gemm_kind if quantised else "linear"
    return OpWork(name, kind, flops, num_bytes, tokens, n_in, n_out, activation_quant_bytes(kind, tokens, n_in))


def dense_layer_ops(s: ShardShapes, tokens: int, moe_default_config: bool = False) -> list[OpWork]:
    """Every op of a layer except attention itself and the TP all-reduces. ``moe_default_config``: the device
    runs this model's fused MoE with vLLM's default kernel configuration (no tuned one for the shape)."""
    d, h, T = s.dtype_bytes, s.hidden, tokens
    routed = T * s.experts_per_token  # token-expert pairs (= T for dense models)
    active_experts = min(s.num_experts, routed)  # distinct expert weights that must be read
    ops = [
        OpWork("input_layernorm", "norm", 4.0 * T * h, (2 * T * h + h) * d, T),
        linear("attn_pre_proj", T, h, s.q + 2 * s.kv, s),
        OpWork("attn_rope", "rope", 6.0 * T * (s.q + s.kv), 2 * T * (s.q + s.kv) * d, T),
        linear("attn_post_proj", T, s.q, h, s),
        OpWork("post_attention_layernorm", "norm", 4.0 * T * h, (2 * T * h + h) * d, T),
    ]
    if s.num_experts > 1:
        block_m = vllm_default_moe_block_m(T, s.num_experts) if moe_default_config else 0
        # The router's gate stays 16-bit in a quantised checkpoint (vLLM's Mixtral, Qwen MoE and DeepSeek build it
        # with quant_config=None).
        ops += [linear("moe_gate", T, h, s.num_experts, s, quantised=False), moe_experts(s, T, block_m)]
        if s.shared_ffn:  # every token's shared experts: a dense MLP beside the routed ones
            ops += _mlp(("shared_up_proj", "shared_act", "shared_down_proj"), s, T, s.shared_ffn, T, 1)
    else:
        ops += _mlp(("mlp_up_proj", "mlp_act", "mlp_down_proj"), s, T, s.ffn, routed, active_experts)
    residual_add = OpWork("add", "residual", 1.0 * T * h, 3 * T * h * d, T)  # reads two tensors, writes one
    ops += [residual_add, residual_add]  # after attention and after the MLP
    return ops


def _mlp(names: tuple[str, str, str], s: ShardShapes, tokens: int, ffn: int, routed: int, active: int
         ) -> list[OpWork]:
    """Up (and gate) projection, activation, down projection of an MLP of width ``ffn`` over ``routed`` rows of
    ``tokens`` tokens, reading the weights of ``active`` such MLPs."""
    d, w, h, T = s.dtype_bytes, s.weight_bytes, s.hidden, tokens
    up_out = (2 if s.gated else 1) * ffn
    return [
        OpWork(names[0], s.gemm_kind, 2.0 * routed * h * up_out,
               (T * h + routed * up_out) * d + active * h * up_out * w, routed, h, up_out,
               activation_quant_bytes(s.gemm_kind, T, h)),
        OpWork(names[1], "activation", 5.0 * routed * ffn, (up_out + ffn) * routed * d, routed),
        OpWork(names[2], s.gemm_kind, 2.0 * routed * ffn * h,
               (routed * ffn + T * h) * d + active * ffn * h * w, routed, ffn, h,
               activation_quant_bytes(s.gemm_kind, routed, ffn)),
    ]


def vllm_default_moe_block_m(tokens: int, num_experts: int) -> int:
    """BLOCK_SIZE_M of vLLM's fused-MoE kernel where it has no tuned configuration for the shape
    (``fused_moe.get_default_config``, bf16 and per-tensor FP8 alike): 16 rows while the step has no more tokens
    than experts, 64 beyond."""
    return 16 if tokens <= num_experts else 64


def moe_width_unaligned(shard_ffn: int) -> bool:
    """Whether an expert's width on the GPU is not a multiple of 16, where vLLM's fused-MoE kernel runs slower
    (``OpEfficiency.unaligned_factor``)."""
    return shard_ffn % 16 != 0


def moe_experts(s: ShardShapes, tokens: int, block_m: int = 0) -> OpWork:
    """vLLM's fused MoE kernel: both grouped GEMMs of every expert a token is routed to, and the activation
    between them. Reads the weights of each expert that receives a token (all of them once tokens x top-k
    reach the expert count: balanced routing). Its efficiency follows the tokens each expert's GEMM gets.

    ``block_m``: the kernel configuration's BLOCK_SIZE_M where it is known (vLLM's default one; 0: a tuned
    configuration, whose block sizes vary with M and are left to the fitted curve). vLLM's
    ``moe_align_block_size`` pads each expert's tokens to a multiple of it and the kernel computes whole tiles,
    so both grouped GEMMs do the padded rows' work too (counted in the FLOPs: the GPU executes it)."""
    d, w, h = s.dtype_bytes, s.weight_bytes, s.hidden
    routed = tokens * s.experts_per_token
    active = min(s.num_experts, routed)
    up_out = (2 if s.gated else 1) * s.ffn
    per_expert = routed / active
    gemm_rows = routed
    if block_m:
        per_expert = -(-per_expert // block_m) * block_m  # balanced routing: every active expert alike
        gemm_rows = per_expert * active
    flops = 2.0 * gemm_rows * h * up_out + 5.0 * routed * s.ffn + 2.0 * gemm_rows * s.ffn * h
    num_bytes = (tokens * h + routed * (up_out + s.ffn) * 2 + tokens * h) * d + active * (h * up_out + s.ffn * h) * w
    # Shape terms of the first grouped GEMM (hidden -> up_out, two thirds of the work), per expert: M is the
    # tokens an expert gets (padded to the block where the block is known) and N its own output width, the sizes
    # each expert's tiles see (the Triton kernel tiles every expert's GEMM apart).
    return OpWork("moe_experts", s.moe_kind, flops, num_bytes, per_expert, h, up_out)


def prefill_attention(s: ShardShapes, chunks: tuple[tuple[int, int], ...]) -> OpWork:
    """Causal attention of prefill chunks, one varlen kernel. A chunk is (new tokens, tokens already cached)."""
    flops = num_bytes = 0.0
    tokens = 0
    for new, cached in chunks:
        # Each new token attends to the cached prefix and, causally, to half the chunk on average.
        keys = cached + (new + 1) / 2.0
        flops += 4.0 * s.num_heads * s.head_dim * new * keys
        # Reads Q and writes O; reads the KV of the prefix and the chunk and writes the chunk's into the cache.
        num_bytes += 2 * new * s.q * s.dtype_bytes + (2 * (cached + new) * s.kv + 2 * new * s.kv) * s.kv_dtype_bytes
        tokens += new
    return OpWork("attn_prefill", "attention_prefill", flops, num_bytes, tokens)


def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum(floor((a * i + b) / m) for i in range(n)) for non-negative integers, in O(log) steps (Euclid-like)."""
    total = 0
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y_max = a * n + b
        if y_max < m:
            return total
        n, b, m, a = y_max // m, y_max % m, a, m


def chunk_tile_units(new: int, cached: int, rows_per_token: int, block_m: int, block_n: int) -> tuple[int, int]:
    """(query tiles, tile x KV-block units) of one chunk for one KV stream. The chunk's rows are its tokens, each
    ``rows_per_token`` query heads (a packed GQA group; 1 without packing), cut into tiles of ``block_m``; tile j
    sees, causally, the cached prefix and the chunk up to its last token, ``ceil((j + 1) * block_m / g)``, in
    blocks of ``block_n`` keys. The last tile sees the whole chunk."""
    g = rows_per_token
    tiles = -(-new * g // block_m)
    # Tiles before the last: ceil((cached + ceil((j + 1) * block_m / g)) / block_n) = ceil((cached * g + (j + 1)
    # * block_m) / (g * block_n)) (nested ceilings of integers), summed in closed form.
    m = g * block_n
    units = _floor_sum(tiles - 1, m, block_m, cached * g + block_m + m - 1) + -(-(cached + new) // block_n)
    return tiles, units


def single_token_chunks(chunks: tuple[tuple[int, int], ...]) -> bool:
    """Whether every prefill chunk of a batch is one new token: FlashAttention 2 then takes its packed
    single-token path (``seqlenq_ngroups_swapped``), as for a decode."""
    return all(new == 1 for new, _ in chunks)


def prefill_attention_grid(s: ShardShapes, chunks: tuple[tuple[int, int], ...], block_m: int, block_n: int,
                           pack_gqa: bool) -> tuple[int, int, int]:
    """(query tiles, tile x KV-block units, the longest tile's units) of a varlen prefill batch: the work the
    fitted prefill kernel's time depends on (``hardware.profile.PrefillAttentionFit``). ``pack_gqa``: tiles hold a
    KV head's whole query group (FlashAttention 3); otherwise only a batch of single-token queries is packed
    (FlashAttention 2's ``seqlenq_ngroups_swapped``)."""
    kv_heads = s.kv_heads
    packed = kv_heads < s.num_heads and (pack_gqa or single_token_chunks(chunks))
    streams, g = (kv_heads, s.num_heads // kv_heads) if packed else (s.num_heads, 1)
    tiles = units = 0
    for new, cached in chunks:
        t, u = chunk_tile_units(new, cached, g, block_m, block_n)
        tiles += t
        units += u
    longest = max(-(-(cached + new) // block_n) for new, cached in chunks)
    return streams * tiles, streams * units, longest


def decode_attention(s: ShardShapes, num_decode: int, kv_tokens: int) -> OpWork:
    """Paged decode attention: each query reads its whole KV history (``kv_tokens`` summed over the batch)."""
    flops = 4.0 * s.num_heads * s.head_dim * kv_tokens
    num_bytes = 2 * kv_tokens * s.kv * s.kv_dtype_bytes + (2 * num_decode * s.q + 2 * num_decode * s.kv) * s.dtype_bytes
    return OpWork("attn_decode", "attention_decode", flops, num_bytes, num_decode)


def embedding(s: ShardShapes, tokens: int) -> OpWork:
    return OpWork("emb", "embedding", 0.0, 2 * tokens * s.hidden * s.dtype_bytes, tokens)


def lm_head(s: ShardShapes, num_samples: int) -> list[OpWork]:
    """Final norm and the vocabulary projection, for the tokens that sample (not every prefill token)."""
    d, h = s.dtype_bytes, s.hidden
    return [OpWork("final_norm", "norm", 4.0 * num_samples * h, (2 * num_samples * h + h) * d, num_samples),
            linear("lm_head", num_samples, h, s.vocab, s, quantised=False)]
