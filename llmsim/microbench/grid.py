"""What the suite measures: op x model x TP shard x token count, attention shapes, bare GEMMs (also in FP8, per-tensor
and block-scaled, on a GPU with FP8 tensor cores), fused-MoE layers, copies and collectives.

``small`` is sized for a CPU in CI (about a minute on two cores); ``full`` is for a GPU and covers the catalog's
dense models at every TP degree up to 8 and 1-4096 tokens, like Vidur's profiling grid, and five expert shapes of
aiconfigurator's fused-MoE table at TP 1-8 and 1-8,192 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmsim.calibration.measurements import LAYER_OPS, moe_model_name
from llmsim.models.spec import load_model


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...]
    tps: tuple[int, ...]
    tokens: tuple[int, ...]
    prefill: tuple[tuple[int, int, int], ...]  # (batch, new tokens, cached tokens)
    decode: tuple[tuple[int, int], ...]  # (batch, KV length)
    attention_tp: int  # shard the attention heads as at this TP degree
    memcpy_bytes: tuple[int, ...]
    collective_bytes: tuple[int, ...]
    world_sizes: tuple[int, ...]
    # Bare GEMMs (m, n, k), the shapes of NVIDIA aiconfigurator's vLLM GEMM table, so measurements made here
    # and the shipped ones are fitted and validated alike.
    gemms: tuple[tuple[int, int, int], ...] = ()
    # Fused-MoE layers (hidden, intermediate per expert, experts, top-k) over ``moe_tps`` x ``moe_tokens``, shapes of
    # aiconfigurator's vLLM fused-MoE table (Mixtral-8x7B and -8x22B, Qwen3-235B-A22B, Qwen3-Coder-480B-A35B,
    # DeepSeek-V3).
    moe: tuple[tuple[int, int, int, int], ...] = ()
    moe_tps: tuple[int, ...] = (1,)
    moe_tokens: tuple[int, ...] = ()


_MB = 2**20
GRIDS = {
    "small": Grid(
        models=("Llama-2-7B", "Phi-2", "Llama-3-8B"), tps=(4, 8), tokens=(1, 4, 16, 32, 64, 128),
        prefill=((1, 32, 0), (1, 128, 0), (1, 256, 0), (2, 128, 0), (1, 64, 256)),
        decode=((1, 256), (8, 256), (8, 1024), (32, 512)), attention_tp=8,
        memcpy_bytes=(_MB, 4 * _MB, 16 * _MB, 64 * _MB),
        collective_bytes=(4096, 65536, _MB, 4 * _MB, 16 * _MB), world_sizes=(2,),
        gemms=tuple((m, n, k) for m in (1, 16, 128) for n, k in ((1024, 1024), (4096, 1024)))),
    "full": Grid(
        models=("Llama-2-7B", "Llama-2-13B", "Llama-2-70B", "Llama-3-8B", "Llama-3-70B", "Mistral-7B",
                "Qwen2-72B", "CodeLlama-34B", "Phi-2"),
        tps=(1, 2, 4, 8), tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096),
        prefill=tuple((b, s, c) for b in (1, 4) for s in (128, 512, 1024, 2048, 4096, 8192) for c in (0,))
        + ((1, 512, 2048), (1, 512, 8192), (1, 2048, 4096)),
        decode=tuple((b, k) for b in (1, 8, 32, 64, 128, 256) for k in (128, 512, 1024, 2048, 4096, 8192)),
        attention_tp=1,
        memcpy_bytes=tuple(2**e for e in range(20, 31)),
        collective_bytes=tuple(2**e for e in range(11, 29, 1)), world_sizes=(2, 4, 8),
        gemms=tuple((m, n, k) for m in (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
                    for n in (1024, 4096, 8192, 16384) for k in (1024, 4096, 8192)),
        moe=((4096, 14336, 8, 2), (6144, 16384, 8, 2), (4096, 1536, 128, 8), (6144, 2560, 160, 8),
             (7168, 2048, 256, 8)),
        moe_tps=(1, 2, 4, 8), moe_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)),
}


def model_columns(name: str, tp: int) -> dict:
    m = load_model(name)
    return {"model": m.name, "tp": tp, "n_head": m.num_heads, "n_kv_head": m.num_kv_heads, "n_embd": m.hidden_size,
            "n_expanded_embd": m.ffn_size, "vocab_size": m.vocab_size, "gated": m.gated_mlp}


def compute_specs(grid: Grid, dtype: str, fp8_dtypes: tuple[str, ...] = ()) -> list[dict]:
    """Every compute row to measure, as schema columns (times filled in by the runner). ``fp8_dtypes``: the bare
    GEMMs once more in each of these, W8A8 FP8 with per-tensor scales (``fp8``) or 128-block scales
    (``fp8_block``), on a device with FP8 tensor cores."""
    specs = []
    for name in grid.models:
        for tp in grid.tps:
            if load_model(name).num_heads % tp:
                continue
            cols = model_columns(name, tp)
            for op in LAYER_OPS:
                for tokens in grid.tokens:
                    specs.append({"op": op, "dtype": dtype, **cols, "num_tokens": tokens})
        cols = model_columns(name, grid.attention_tp)
        for batch, new, cached in grid.prefill:
            specs.append({"op": "attn_prefill", "dtype": dtype, **cols, "batch_size": batch, "seq_len": new,
                          "kv_len": cached})
        for batch, kv_len in grid.decode:
            specs.append({"op": "attn_decode", "dtype": dtype, **cols, "batch_size": batch, "seq_len": 1,
                          "kv_len": kv_len})
    specs += [{"op": "memcpy", "dtype": dtype, "size_bytes": size} for size in grid.memcpy_bytes]
    specs += [{"op": "gemm", "dtype": gemm_dtype, "model": "gemm", "tp": 1, "num_tokens": m, "gemm_n": n,
               "gemm_k": k} for gemm_dtype in (dtype, *fp8_dtypes) for m, n, k in grid.gemms]
    specs += [{"op": "moe", "dtype": dtype, "model": moe_model_name(hidden, inter, experts, top_k), "tp": tp,
               "num_tokens": tokens, "n_embd": hidden, "n_expanded_embd": inter, "num_experts": experts,
               "experts_per_token": top_k}
              for hidden, inter, experts, top_k in grid.moe for tp in grid.moe_tps if inter % tp == 0
              for tokens in grid.moe_tokens]
    return specs
