"""The torch kernels behind each measured op, shaped exactly as the execution model's ops on one TP shard.

Shapes come from ``calibration.predict.row_shapes`` -- the same function that turns a measured row back into the
simulator's ``OpWork`` -- so a measurement and its prediction can never disagree about what was run.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from llmsim.calibration.predict import moe_row_shapes, row_shapes

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


FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8_per_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16-bit tensor to FP8 (e4m3) with one dynamic scale, its absolute maximum over the format's largest value,
    as vLLM's ``scaled_fp8_quant`` does for the activations of an FP8 checkpoint (``activation_scheme: dynamic``):
    a reduction over the tensor, then a pass that multiplies by the scale's inverse and converts (as vLLM's kernel
    does). The clamp keeps a value that rounds past the largest finite one (the cast would make it NaN)."""
    scale = (x.abs().amax().float() / FP8_E4M3_MAX).clamp(min=1e-12)
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn), scale


FP8_BLOCK = 128  # a block-FP8 checkpoint's weight-scale block and activation group, as every one has them
FP8_GROUP_EPS = 1e-10  # vLLM's floor under a group's absolute maximum (an all-zero group gets a tiny scale, no NaN)


def quantize_fp8_per_group(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16-bit [m, k] tensor to FP8 (e4m3) with one dynamic scale per row and 128 columns, as vLLM's
    ``per_token_group_quant_fp8`` quantizes a block-FP8 layer's activations: the group's absolute maximum (at
    least ``FP8_GROUP_EPS``) over the format's largest value. Returns the FP8 tensor and its [m, k / 128]
    scales; the reference ``fp8_block.quantize_fp8_per_group_triton`` is checked against."""
    m, k = x.shape
    groups = x.float().view(m, k // FP8_BLOCK, FP8_BLOCK)
    scale = groups.abs().amax(dim=-1).clamp(min=FP8_GROUP_EPS) / FP8_E4M3_MAX
    q = (groups / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(m, k), scale


def capture_cuda_graph(fn: Callable[[], object], warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn`` captured into a CUDA graph, after ``warmups`` calls on a side stream (as torch's CUDA-graph notes ask;
    they also compile any Triton kernel in it): the graph and the output each replay rewrites."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` as one replay of its CUDA graph (``capture_cuda_graph``), or None where it cannot be captured. A kernel
    of several launches is timed as one replay: vLLM runs its decode steps (and, in V1, the pieces between
    attention of every step) as CUDA graphs, and launched one by one from Python the launches of a small shape
    outlast its GPU work, so the host would be timed."""
    try:
        graph, out = capture_cuda_graph(fn)
    except Exception:  # noqa: BLE001 -- an op that syncs or allocates oddly: torch raises several kinds
        torch.cuda.synchronize()
        return None

    def replay():
        graph.replay()
        return out  # the captured output, rewritten by every replay
    return replay


def _fp8_operands(m: int, n: int, k: int, device: torch.device, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """An FP8 layer's bf16 input [m, k] and FP8 weight [n, k], random, kept in ``tensors`` by shape and dtype."""
    if ((m, k), torch.bfloat16) not in tensors:
        tensors[((m, k), torch.bfloat16)] = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    if ((n, k), torch.float8_e4m3fn) not in tensors:
        tensors[((n, k), torch.float8_e4m3fn)] = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    return tensors[((m, k), torch.bfloat16)], tensors[((n, k), torch.float8_e4m3fn)]


def fp8_gemm_kernel(m: int, n: int, k: int, device: torch.device,
                    tensors: dict | None = None) -> tuple[Callable[[], object], str]:
    """W8A8 FP8 linear layer as vLLM runs one of an FP8 checkpoint (per-tensor scales): the bf16 activations
    quantized to FP8 with a dynamic scale, then the FP8 GEMM with both scales and a bf16 output (vLLM:
    ``scaled_fp8_quant`` and ``cutlass_scaled_mm``; here ``torch._scaled_mm``, cuBLASLt on NVIDIA GPUs). This is
    what NVIDIA's measured vLLM FP8 GEMMs time and what the ``linear_fp8`` curve prices: time per input element for
    the quantization besides the GEMM's. The weight is stored [n, k] and passed transposed (column-major), as the
    kernel wants its second operand.

    On an NVIDIA GPU the quantization is vLLM's two kernels (``fp8_quant``) and the layer one CUDA graph
    (``cuda_graphed``): impl ``triton_quant+graph``. Elsewhere torch's eager ops (``quant_eager``; more passes
    over the activations than vLLM's). Returns the kernel and its impl, for the row's ``impl`` column."""
    tensors = {} if tensors is None else tensors
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    x, w = _fp8_operands(m, n, k, device, tensors)
    w_scale = torch.ones((), dtype=torch.float32, device=device)
    if device.type == "cuda" and torch.version.hip is None:
        try:
            from llmsim.microbench.fp8_quant import quantize_fp8_per_tensor_triton
        except ImportError:  # no Triton
            pass
        else:
            q = torch.empty(m, k, dtype=fp8, device=device)
            x_scale = torch.zeros((), dtype=torch.float32, device=device)

            def run_triton():
                quantize_fp8_per_tensor_triton(x, q, x_scale)
                return torch._scaled_mm(q, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=bf16)
            replay = cuda_graphed(run_triton)
            if replay is not None:
                return replay, "triton_quant+graph"

    def run_eager():
        q, x_scale = quantize_fp8_per_tensor(x)
        return torch._scaled_mm(q, w.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=bf16)
    return run_eager, "quant_eager"


def fp8_block_gemm_kernel(m: int, n: int, k: int, device: torch.device, tensors: dict | None = None,
                          gemms: tuple[str, ...] = ("cublaslt", "triton")) -> tuple[Callable[[], object], str]:
    """A block-scaled FP8 linear layer as vLLM runs one of a block-FP8 checkpoint (``fp8_block``: weights scaled
    per 128 x 128 block, the bf16 activations quantized per token and 128 columns, ``fp8_block``'s kernels): the
    group quantization, then the blockwise-scaled GEMM with a bf16 output, the two as one CUDA graph. This is what
    NVIDIA's measured vLLM block-FP8 GEMMs time and what the ``linear_fp8_block`` curve prices.

    The GEMM is cuBLASLt's blockwise-scaled one (``torch._scaled_mm``; impl ``triton_group_quant+cublaslt+graph``)
    on activations padded to a multiple of 4 rows, as vLLM pads them for CUTLASS's on Hopper, or where torch or the
    GPU lacks it, a Triton kernel of the form of vLLM's own (impl ``triton_group_quant+triton_gemm+graph``).
    ``gemms``: which GEMMs to try, in order. Needs an NVIDIA GPU and Triton (``has_fp8``); k and n multiples of
    128."""
    from llmsim.microbench.fp8_block import GROUP, block_scaled_matmul, quantize_fp8_per_group_triton

    tensors = {} if tensors is None else tensors
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    x, w = _fp8_operands(m, n, k, device, tensors)
    # Weight scales near one, as a checkpoint's are for unit-variance weights over the format's range.
    if ((n, k), "block_scales") not in tensors:
        tensors[((n, k), "block_scales")] = torch.rand(n // GROUP, k // GROUP, device=device) + 0.5
    w_scale = tensors[((n, k), "block_scales")]
    padded = -(-m // 4) * 4
    q = torch.zeros(padded, k, dtype=fp8, device=device)  # padding rows stay zero, their scales one
    q_scale = torch.ones(k // GROUP, padded, device=device).t()  # [padded, k / 128], column-major

    def run_cublaslt():
        quantize_fp8_per_group_triton(x, q, q_scale)
        return torch._scaled_mm(q, w.t(), scale_a=q_scale, scale_b=w_scale.t(), out_dtype=bf16)[:m]

    out = torch.empty(m, n, dtype=bf16, device=device)

    def run_triton():
        quantize_fp8_per_group_triton(x, q, q_scale)
        return block_scaled_matmul(q[:m], q_scale[:m], w, w_scale, out)

    runs = {"cublaslt": (run_cublaslt, "triton_group_quant+cublaslt+graph"),
            "triton": (run_triton, "triton_group_quant+triton_gemm+graph")}
    for run, impl in (runs[gemm] for gemm in gemms):
        try:
            run()
        except (RuntimeError, NotImplementedError):  # torch or cuBLAS without blockwise scaling, or not Hopper
            torch.cuda.synchronize()
            continue
        replay = cuda_graphed(run)
        if replay is not None:
            return replay, impl
    raise RuntimeError(f"no block-scaled FP8 GEMM ({', '.join(gemms)}) ran on {device} for m={m} n={n} k={k}")


def balanced_routing(tokens: int, num_experts: int, top_k: int, device: torch.device) -> torch.Tensor:
    """[tokens, top_k] expert ids that give every expert the same number of routed tokens (within one): token t
    goes to experts t*k .. t*k+k-1 (mod E), distinct for k <= E. The fused-MoE model prices balanced routing, and
    NVIDIA's measured fused-MoE table routes so too."""
    return (torch.arange(tokens * top_k, device=device) % num_experts).view(tokens, top_k)


def moe_kernel(spec: SimpleNamespace, device: torch.device,
               tensors: dict | None = None) -> tuple[Callable[[], object], str]:
    """One fused-MoE layer's experts over ``num_tokens`` tokens on one shard (gated experts of n_expanded_embd / tp
    intermediate), what vLLM's ``fused_experts`` does but the grouping of the routed tokens by expert (done once,
    untimed): gather each expert's tokens, the up (gate and up) grouped GEMM, SiLU-and-mul, the down grouped GEMM,
    and the routing-weighted sum over each token's top-k.
    Routing is balanced (``balanced_routing``) and given, as in the measured table (the router's GEMM and top-k are
    ops of their own). The grouped GEMMs are torch's ``_grouped_mm`` (one kernel over every expert) where the
    device runs it; elsewhere one GEMM per expert. Launched eagerly: captured in a CUDA graph (as vLLM's decode
    steps are) with torch 2.11 on an H100, the layer failed on replay at 37 tokens over 8 experts (device-side
    asserts on a scatter's index and on the grouped GEMM's group bounds), where 1 and 1,024 tokens replayed right; so
    at a few tokens the layer's ten or so launches from Python, not the GPU, set the time (Mixtral-8x7B's TP 8 shard,
    1 token: 140 us eagerly, 77 us as a graph).
    Returns the kernel and which GEMMs ran (``grouped_mm`` or ``per_expert``), for the row's ``impl`` column."""
    s = moe_row_shapes(spec)
    dtype = TORCH_DTYPES[spec.dtype]
    T, h, ffn, E, k = int(spec.num_tokens), s.hidden, s.ffn, s.num_experts, s.experts_per_token
    tensors = {} if tensors is None else tensors

    def randn(*shape):
        key = (shape, dtype)
        if key not in tensors:
            tensors[key] = torch.randn(*shape, dtype=dtype, device=device).div_(shape[-1] ** 0.5)  # in place: no copy
        return tensors[key]

    x = randn(T, h)
    w_up, w_down = randn(E, 2 * ffn, h), randn(E, h, ffn)  # stored [out, in] per expert, as vLLM's w13 and w2
    ids = balanced_routing(T, E, k, device)
    weights = torch.softmax(torch.randn(T, k, device=device), dim=-1).to(dtype)

    # The routed tokens grouped by expert (vLLM's moe_align_block_size, a sort of a few microseconds) are worked
    # out once here, untimed, as the routing itself is given: torch.bincount would sync with the host every call.
    order = ids.flatten().argsort(stable=True)
    offs = torch.searchsorted(ids.flatten()[order], torch.arange(E, device=device), right=True).to(torch.int32)
    source_rows = order // k

    def grouped(a, w, offs):
        return torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)

    # The routing is fixed, so the per-expert path knows its group bounds on the host (no device sync inside it).
    host_offs = offs.tolist()

    def per_expert(a, w, offs):
        starts = [0] + host_offs[:-1]
        return torch.cat([F.linear(a[start:end], w[e]) for e, (start, end) in enumerate(zip(starts, host_offs))])

    def run(gemm):
        up = gemm(x[source_rows], w_up, offs)
        down = gemm(F.silu(up[:, :ffn]) * up[:, ffn:], w_down, offs)
        out = torch.empty_like(down)
        out[order] = down * weights.flatten()[order, None]
        return out.view(T, k, h).sum(dim=1)

    try:
        run(grouped)
    # A GPU or dtype torch's grouped GEMM does not support, or a torch before 2.8 (no _grouped_mm at all).
    except (RuntimeError, NotImplementedError, AttributeError):
        return (lambda: run(per_expert)), "per_expert"
    return (lambda: run(grouped)), "grouped_mm"


def moe_bytes(spec: dict) -> int:
    """Device memory ``moe_kernel`` holds for a row: every expert's weights and the layer's activations."""
    s = moe_row_shapes(SimpleNamespace(**spec))
    tokens, routed = int(spec["num_tokens"]), int(spec["num_tokens"]) * s.experts_per_token
    elements = s.num_experts * 3 * s.hidden * s.ffn + 2 * tokens * s.hidden + routed * (2 * s.hidden + 4 * s.ffn)
    return elements * TORCH_DTYPES[spec["dtype"]].itemsize


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
