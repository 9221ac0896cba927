"""The one CSV schema of measured kernel latencies, read by calibration and validation.

The microbenchmark suite writes it; Vidur's profiling CSVs are imported into it. A row names an op of the
execution model (``attn_pre_proj``, ``attn_decode``, ``all_reduce``, ...) and the shapes that op needs, so the
prediction for a row comes from the very same op functions the simulator runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from llmsim.errors import TraceError

# Layer ops of one transformer layer on one TP shard (shapes from the model columns, num_tokens, tp).
LAYER_OPS = ("emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "lm_head")
# batch_size sequences of seq_len new tokens over kv_len cached (decode: kv_len including the new token); the KV
# cache is stored in kv_dtype (default: dtype).
ATTENTION_OPS = ("attn_prefill", "attn_decode")
# size_bytes over num_workers, devices_per_node; impl: which implementation ran it (nccl when empty, or vLLM's
# custom all-reduce inside CUDA graphs, ``custom_graph``, or outside them, ``custom_eager``).
COLLECTIVE_OPS = ("all_reduce", "all_gather", "send_recv")
COLLECTIVE_IMPLS = ("nccl", "custom_graph", "custom_eager")
MEMORY_OPS = ("memcpy",)  # device-to-device copy of size_bytes
# A bare GEMM [num_tokens, gemm_k] x [gemm_k, gemm_n] with weights in dtype (fp8: W8A8, the 16-bit activations
# quantized first, as vLLM does), output 16-bit. The microbenchmark suite's impl on an fp8 row says how that
# quantization ran: as vLLM's two kernels in a CUDA graph (triton_quant+graph) or as torch's eager ops
# (quant_eager); on an fp8_block row (128 x 128 weight blocks, activations per token and 128 columns), which GEMM
# ran after vLLM's group quantization (triton_group_quant+cublaslt+graph or triton_group_quant+triton_gemm+graph);
# on a moe row, whether the experts ran as one grouped GEMM (grouped_mm) or one GEMM each
# (per_expert). Neither changes the prediction.
GEMM_OPS = ("gemm",)
# vLLM's fused MoE layer over num_tokens tokens: n_embd hidden, n_expanded_embd per-expert intermediate size,
# num_experts experts, experts_per_token (top-k), experts sharded over tp GPUs.
MOE_OPS = ("moe",)


def moe_model_name(hidden: int, intermediate: int, experts: int, top_k: int) -> str:
    """A fused-MoE row's ``model``: its expert shape (what ``--hold-out-model`` names), as imported and measured."""
    return f"moe h{hidden} i{intermediate} e{experts} k{top_k}"

OPS = LAYER_OPS + ATTENTION_OPS + COLLECTIVE_OPS + MEMORY_OPS + GEMM_OPS + MOE_OPS

SHAPE_COLUMNS = ("model", "tp", "num_tokens", "n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size",
                 "gated", "batch_size", "seq_len", "kv_len", "kv_dtype", "size_bytes", "num_workers",
                 "devices_per_node", "impl", "gemm_n", "gemm_k", "num_experts", "experts_per_token")
TIME_COLUMNS = ("median_ms", "mean_ms", "std_ms", "min_ms", "max_ms")
COLUMNS = ("device", "op", "dtype", *SHAPE_COLUMNS, *TIME_COLUMNS, "repetitions", "torch_version", "date", "source")
TEXT_COLUMNS = ("device", "op", "model", "dtype", "gated", "kv_dtype", "impl", "torch_version", "date", "source")
NUMBER_COLUMNS = tuple(c for c in COLUMNS if c not in TEXT_COLUMNS)

_MODEL_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "tp", "num_tokens")
_REQUIRED = {
    **{op: _MODEL_COLUMNS for op in LAYER_OPS},
    "attn_prefill": ("n_head", "n_kv_head", "n_embd", "tp", "batch_size", "seq_len", "kv_len"),
    "attn_decode": ("n_head", "n_kv_head", "n_embd", "tp", "batch_size", "kv_len"),
    **{op: ("size_bytes", "num_workers", "devices_per_node") for op in COLLECTIVE_OPS},
    "memcpy": ("size_bytes",),
    "gemm": ("num_tokens", "gemm_n", "gemm_k"),
    "moe": ("num_tokens", "n_embd", "n_expanded_embd", "tp", "num_experts", "experts_per_token"),
}


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing schema columns as empty and put the columns in schema order (extra columns are kept last)."""
    df = df.copy()
    for column in COLUMNS:
        if column not in df.columns:
            df[column] = np.nan
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra].reset_index(drop=True)


# Precisions a row's dtype and kv_dtype may name: the models' (``DTYPE_BYTES``, block-scaled FP8 ``fp8_block``
# among them).
DTYPES = ("fp32", "fp16", "bf16", "fp8", "int8", "fp8_block")
_GATED = ("true", "false", "1", "0", "1.0", "0.0")


def _shown(value) -> str:
    """A cell as the CSV has it (numpy's scalars print as ``np.float64(inf)``)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _row(where: str, i: int, table_rows: list[str] | None) -> str:
    """Where row ``i`` came from: its line in the CSV (whose header is line 1), or as ``table_rows`` names it."""
    return f"{where}:{i + 2}" if table_rows is None else f"{where}{table_rows[i]}"


def _first_bad(df: pd.DataFrame, bad: pd.Series, where: str, column: str, expected: str,
               table_rows: list[str] | None) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise TraceError(f"{_row(where, i, table_rows)}: column {column!r} is {_shown(df[column].iloc[i])}, "
                         f"expected {expected}")


def check(df: pd.DataFrame, where: str, table_rows: list[str] | None = None) -> pd.DataFrame:
    """Reject rows that calibration could not use, naming the file and line (header is line 1), or, for rows
    imported from another file, where in it each came from (``table_rows``: ``":12"``, ``": row 10"``)."""
    for column in ("dtype", "kv_dtype"):  # a typo had been a KeyError deep in the prediction
        _first_bad(df, df[column].notna() & ~df[column].isin(DTYPES), where, column, f"one of {', '.join(DTYPES)}",
                   table_rows)
    # Any other text had been read as not gated.
    _first_bad(df, df["gated"].notna() & ~df["gated"].astype(str).str.lower().isin(_GATED), where, "gated",
               "true or false", table_rows)
    for column in NUMBER_COLUMNS:  # an infinite shape crashed the prediction, an infinite time the fit
        _first_bad(df, np.isinf(df[column].astype(float)), where, column, "a finite number", table_rows)
    for i, row in enumerate(df.itertuples(index=False)):
        line = _row(where, i, table_rows)
        op = row.op
        if op not in _REQUIRED:
            raise TraceError(f"{line}: unknown op {op!r}; allowed: {', '.join(OPS)}")
        for column in _REQUIRED[op]:
            value = getattr(row, column)
            # Counts (sizes, tokens, heads, GPUs) of at least 1: a zero one is no kernel (a GEMM of K 0 was priced as
            # no GEMM); only a prompt with nothing cached before it has a kv_len of 0.
            least = 0 if op == "attn_prefill" and column == "kv_len" else 1
            if pd.isna(value) or float(value) < least or float(value) != int(value):
                wanted = f"a non-negative whole {column!r}" if least == 0 else f"a whole {column!r} of at least 1"
                raise TraceError(f"{line}: op {op} needs {wanted}, got {_shown(value)}")
        impl = row.impl
        if op in COLLECTIVE_OPS and isinstance(impl, str) and impl not in COLLECTIVE_IMPLS:
            raise TraceError(f"{line}: unknown impl {impl!r}; allowed: {', '.join(COLLECTIVE_IMPLS)}")
        median = row.median_ms
        if pd.isna(median) or not float(median) > 0:
            raise TraceError(f"{line}: median_ms must be a positive number, got {_shown(median)}")
    return df


def read_measurements(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: measurements file not found")
    try:
        df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS})
    except (OSError, ValueError) as exc:  # ValueError: pandas' parser and empty-file errors, bytes not UTF-8
        raise TraceError(f"{path}: not a measurements CSV: {exc}") from None
    missing = [c for c in ("device", "op", "median_ms") if c not in df.columns]
    if missing:
        raise TraceError(f"{path}: missing columns {', '.join(missing)}; the schema is: {', '.join(COLUMNS)}")
    for column in NUMBER_COLUMNS:  # one value that is no number leaves its whole column as text
        if column in df.columns and not pd.api.types.is_numeric_dtype(df[column]):
            df[column] = number_column(df, column, path)
    return check(normalize(df), str(path))


def number_column(df: pd.DataFrame, column: str, path, minimum: float | None = None) -> pd.Series:
    """``df[column]`` (read from the CSV ``path``) as numbers. A value that is no number -- or, with ``minimum``,
    one that is missing or below it -- is one error naming the file, line (header is line 1) and column."""
    numbers = pd.to_numeric(df[column], errors="coerce")
    bad = numbers.isna() & df[column].notna()
    if minimum is not None:
        bad |= numbers.isna() | (numbers < minimum)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        expected = "a number" if minimum is None else f"a number >= {minimum:g}"
        raise TraceError(f"{path}:{i + 2}: column {column!r} is {df[column].iloc[i]!r}, expected {expected}")
    return numbers


def write_measurements(df: pd.DataFrame, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    normalize(df).to_csv(path, index=False)
