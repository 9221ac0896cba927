"""The torch kernels behind each measured op, shaped exactly as the execution model's ops on one TP shard.

Shapes come from ``calibration.predict.row_shapes`` -- the same function that turns a measured row back into the
simulator's ``OpWork`` -- so a measurement and its prediction can never disagree about what was run.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from llmsim.calibration.predict import row_shapes

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as in Llama: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def gemm_kernel(m: int, n: int, k: int, dtype: str, device: torch.device,
                tensors: dict | None = None) -> Callable[[], object]:
    """[m, k] x [k, n] as ``F.linear`` runs a projection (weights stored [n, k])."""
    tensors = {} if tensors is None else tensors
    torch_dtype = TORCH_DTYPES[dtype]
    for shape in ((m, k), (n, k)):
        if (shape, torch_dtype) not in tensors:
            tensors[(shape, torch_dtype)] = torch.randn(*shape, dtype=torch_dtype, device=device)
    x, w = tensors[((m, k), torch_dtype)], tensors[((n, k), torch_dtype)]
    return lambda: F.linear(x, w)


def layer_kernel(spec: SimpleNamespace, device: torch.device,
                 tensors: dict | None = None) -> Callable[[], object]:
    """One op of a transformer layer on ``num_tokens`` tokens. Returns a no-argument callable.

    ``tensors``: random tensors by shape to reuse across kernels (filling a vocabulary-sized weight with random
    numbers takes longer than timing the GEMM that reads it); kernels only read their inputs."""
    s = row_shapes(spec)
    dtype = TORCH_DTYPES[spec.dtype]
    T, h = int(spec.num_tokens), s.hidden

    def randn(*shape):
        if tensors is None:
            return torch.randn(*shape, dtype=dtype, device=device)
        key = (shape, dtype)
        if key not in tensors:
            tensors[key] = torch.randn(*shape, dtype=dtype, device=device)
        return tensors[key]

    op = spec.op
    if op in ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj", "lm_head"):
        n_in, n_out = {
            "attn_pre_proj": (h, s.q + 2 * s.kv),
            "attn_post_proj": (s.q, h),
            "mlp_up_proj": (h, (2 if s.gated else 1) * s.ffn),
            "mlp_down_proj": (s.ffn, h),
            "lm_head": (h, s.vocab),
        }[op]
        x, w = randn(T, n_in), randn(n_out, n_in)
        return lambda: F.linear(x, w)
    if op in ("input_layernorm", "post_attention_layernorm"):
        x, w = randn(T, h), randn(h)
        return lambda: F.rms_norm(x, (h,), w, 1e-6)
    if op == "attn_rope":
        q, k = randn(T, s.num_heads, s.head_dim), randn(T, s.kv // s.head_dim, s.head_dim)
        cos, sin = randn(T, 1, s.head_dim), randn(T, 1, s.head_dim)
        return lambda: (_rotary(q, cos, sin), _rotary(k, cos, sin))
    if op == "mlp_act":
        if s.gated:
            up = randn(T, 2 * s.ffn)
            return lambda: F.silu(up[:, :s.ffn]) * up[:, s.ffn:]
        up = randn(T, s.ffn)
        return lambda: F.gelu(up, approximate="tanh")
    if op == "add":
        a, b = randn(T, h), randn(T, h)
        return lambda: a + b
    if op == "emb":
        table = randn(s.vocab, h)
        ids = torch.randint(0, s.vocab, (T,), device=device)
        return lambda: F.embedding(ids, table)
    raise ValueError(f"no layer kernel for op {op!r}")


def attention_kernel(spec: SimpleNamespace, device: torch.device) -> Callable[[], object]:
    """torch SDPA: causal prefill of ``seq_len`` new tokens over ``kv_len`` cached ones, or decode (one query over
    ``kv_len`` keys), for ``batch_size`` sequences, with grouped KV heads as the model has them."""
    s = row_shapes(spec)
    dtype = TORCH_DTYPES[spec.dtype]
    B, kv_heads = int(spec.batch_size), s.kv // s.head_dim
    if spec.op == "attn_prefill":
        S, cached = int(spec.seq_len), int(spec.kv_len)
        keys = S + cached
    else:
        S, keys = 1, int(spec.kv_len)
    q = torch.randn(B, s.num_heads, S, s.head_dim, dtype=dtype, device=device)
    k = torch.randn(B, kv_heads, keys, s.head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    gqa = kv_heads != s.num_heads
    if spec.op == "attn_prefill" and cached == 0:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if spec.op == "attn_prefill":  # chunk after a cached prefix: query i sees the prefix and chunk tokens <= i
        mask = torch.ones(S, keys, dtype=torch.bool, device=device).tril(diagonal=cached)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


def memcpy_kernel(size_bytes: int, device: torch.device) -> Callable[[], object]:
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)
