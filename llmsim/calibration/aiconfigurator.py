"""Import NVIDIA aiconfigurator's measured vLLM kernel tables (github.com/ai-dynamo/aiconfigurator, Apache-2.0)
into the measurements schema.

Layout read (the repository's ``systems/data/<gpu>/`` folder): ``attention/vllm/<version>/
{context,generation}_attention_perf.parquet`` (vLLM's flash-attention kernels by batch, length, heads and KV
dtype, latency in ms), ``comm/vllm/<version>/custom_allreduce_perf.parquet`` (vLLM's custom all-reduce, in and
out of CUDA graphs) and ``comm/nccl/<version>/nccl_perf.parquet`` (NCCL all-reduce and all-gather). Heads are
per GPU (one TP shard), so the rows carry ``tp`` 1. ``gemm/vllm/<version>/gemm_perf.parquet``: vLLM's GEMMs by
m, n, k and dtype (bf16, fp8 W8A8, block-scaled fp8). ``moe/vllm/<version>/moe_perf.parquet``: vLLM's fused MoE
layer by tokens, hidden and expert sizes, expert count, top-k and expert-TP degree; only balanced routing
without expert parallelism is imported (the simulator routes evenly and does not model EP yet).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llmsim.calibration.measurements import check, moe_model_name, normalize
from llmsim.errors import TraceError

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "fp8": "fp8", "int8": "int8",
           "fp8_block": "fp8_block"}
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp8_block": 1}
_IMPLS = {"vLLM_custom_graph": "custom_graph", "vLLM_custom_eager": "custom_eager", "NCCL": "nccl"}
SOURCE_PREFIX = "aiconfigurator"  # a row's ``source`` starts so (``<prefix> <table path>``)

# Bytes per input element that the quantization of an FP8 GEMM's activations moved in aiconfigurator's GEMM
# collector (``collector/vllm/collect_gemm.py``): it builds vLLM's linear layer outside a served engine under a
# default ``VllmConfig()``, whose compilation settings (Inductor, so ``custom_ops`` "none") make vLLM's QuantFP8
# take its torch-native form, which nothing then compiles: separate kernels with float32 intermediates.
# Per-tensor (static scale): x.to(float32) 2 + 4, times the scale's reciprocal 4 + 4, clamp 4 + 4, to FP8 4 + 1
# = 27; per 128-group (dynamic): abs 2 + 2, group maximum 2, x / scale 2 + 4, clamp 4 + 4, to FP8 4 + 1 = 25.
# Its FP8 rows take the suite's time for the same shapes plus 9 ps per input element at 2-67 M elements (median;
# 6-11 ps, per-tensor and block alike, whatever N), what 27 bytes cost at 3.0 TB/s. A served engine quantizes in
# one fused pass (``ops.ACTIVATION_QUANT_BYTES``).
COLLECTOR_QUANT_BYTES = {"linear_fp8": 27.0, "linear_fp8_block": 25.0}


def _version_key(folder: Path) -> tuple:
    """A version folder's name as numbers where it has them: 0.14.0 is newer than 0.9.0, which sorts after it
    as text."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in folder.name.replace("-", ".").split("."))


def _table(root: Path, pattern: str, needed: tuple[str, ...]) -> pd.DataFrame | None:
    """The table ``pattern`` (``<kind>/<framework>/*/<file>``, ``*`` the version) of the newest version folder
    that has it; a link to nothing there is read, and so an error, not a table skipped."""
    folders, name = pattern.rsplit("/", 1)
    found = sorted((folder / name for folder in root.glob(folders)
                    if (folder / name).exists() or (folder / name).is_symlink()),
                   key=lambda table: _version_key(table.parent))
    if not found:
        return None
    try:
        df = pd.read_parquet(found[-1])  # the newest version folder sorts last
    except (OSError, ValueError) as exc:
        raise TraceError(f"{found[-1]}: not an aiconfigurator table: {exc}") from None
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise TraceError(f"{found[-1]}: missing aiconfigurator columns {', '.join(missing)}")
    df = df.reset_index(drop=True)  # the table's own rows, 0.., which its imported rows keep and errors name
    df.attrs["path"] = found[-1]
    return df.assign(source=f"{SOURCE_PREFIX} {found[-1].relative_to(root)}")


def _checked(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``rows`` imported from ``table``, checked as measurements; an error names the table's file and row."""
    return check(normalize(rows), str(table.attrs["path"]), table_rows=[f": row {i}" for i in rows.index])


def _dtype(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as the schema's dtype names; an unknown one names the table's file and row."""
    known = df[column].isin(list(_DTYPES))
    if not known.all():
        row = known.index[~known.to_numpy()][0]
        raise TraceError(f"{df.attrs.get('path', 'aiconfigurator table')}: row {row}: {column} is "
                         f"{df[column][row]!r}; known: {', '.join(_DTYPES)}")
    return df[column].map(_DTYPES)


def _attention(df: pd.DataFrame, device: str, op: str) -> pd.DataFrame:
    decode = op == "attn_decode"
    # A decode step's query attends over the prompt (isl) and the ``step`` tokens generated before it.
    kv_len = df["isl"] + df["step"] if decode else 0
    return pd.DataFrame({
        "device": device, "op": op, "dtype": _dtype(df, "attn_dtype"), "tp": 1,
        "model": [f"heads{h}/kv{k}" for h, k in zip(df["num_heads"], df["num_key_value_heads"])],
        "n_head": df["num_heads"], "n_kv_head": df["num_key_value_heads"], "n_embd": df["num_heads"] * df["head_dim"],
        "batch_size": df["batch_size"], "seq_len": 1 if decode else df["isl"], "kv_len": kv_len,
        "kv_dtype": _dtype(df, "kv_cache_dtype"), "median_ms": df["latency"], "source": df["source"],
    })


def _collectives(df: pd.DataFrame, device: str, gpus_per_node: int, dtype_column: str) -> pd.DataFrame:
    """``message_size`` counts elements, not bytes: the collectors build a tensor of that many elements
    (``get_input_shape_and_comm_size``) and log NCCL's tested bytes divided by the element size. The kernels'
    own size switches confirm it: vLLM's custom all-reduce goes two-stage on 8 GPUs at 131,072 (256 KiB of bf16)
    and hands over to NCCL at 4,194,304 (its 8 MiB limit)."""
    df = df[df["op_name"].isin(["all_reduce", "all_gather"])]
    dtype = _dtype(df, dtype_column)
    return pd.DataFrame({
        "device": device, "op": df["op_name"], "dtype": dtype,
        "size_bytes": df["message_size"] * dtype.map(_ELEMENT_BYTES), "num_workers": df["num_gpus"],
        "devices_per_node": gpus_per_node,
        "impl": df["kernel_source"].map(_IMPLS), "median_ms": df["latency"], "source": df["source"],
    })


def _gemms(df: pd.DataFrame, device: str) -> pd.DataFrame:
    return pd.DataFrame({
        "device": device, "op": "gemm", "dtype": _dtype(df, "gemm_dtype"), "model": "gemm", "tp": 1,
        "num_tokens": df["m"], "gemm_n": df["n"], "gemm_k": df["k"], "median_ms": df["latency"],
        "source": df["source"],
    })


def _moe(df: pd.DataFrame, device: str) -> pd.DataFrame:
    df = df[(df["distribution"] == "balanced") & (df["moe_ep_size"] == 1) & (df["kernel_source"] == "vllm_fused_moe")]
    return pd.DataFrame({
        "device": device, "op": "moe", "dtype": _dtype(df, "moe_dtype"), "tp": df["moe_tp_size"],
        "model": [moe_model_name(h, i, e, k) for h, i, e, k in zip(df["hidden_size"], df["inter_size"],
                                                                     df["num_experts"], df["topk"])],
        "num_tokens": df["num_tokens"], "n_embd": df["hidden_size"], "n_expanded_embd": df["inter_size"],
        "num_experts": df["num_experts"], "experts_per_token": df["topk"], "median_ms": df["latency"],
        "source": df["source"],
    })


def import_aiconfigurator(root: str | Path, device: str, gpus_per_node: int = 8) -> pd.DataFrame:
    """Every supported table under ``root`` (one GPU's folder) as measurement rows for ``device``."""
    root = Path(root)
    if not root.is_dir():
        raise TraceError(f"{root}: not a folder (expected aiconfigurator's systems/data/<gpu>/)")
    frames = []
    attention = ("batch_size", "isl", "num_heads", "num_key_value_heads", "head_dim", "attn_dtype",
                 "kv_cache_dtype", "step", "latency")
    for pattern, op in (("attention/vllm/*/context_attention_perf.parquet", "attn_prefill"),
                        ("attention/vllm/*/generation_attention_perf.parquet", "attn_decode")):
        table = _table(root, pattern, attention)
        if table is not None:
            frames.append(_checked(_attention(table, device, op), table))
    gemm = _table(root, "gemm/vllm/*/gemm_perf.parquet", ("gemm_dtype", "m", "n", "k", "latency"))
    if gemm is not None:
        frames.append(_checked(_gemms(gemm, device), gemm))
    moe = _table(root, "moe/vllm/*/moe_perf.parquet", ("moe_dtype", "num_tokens", "hidden_size", "inter_size",
                                                       "topk", "num_experts", "moe_tp_size", "moe_ep_size",
                                                       "distribution", "kernel_source", "latency"))
    moe_rows = _moe(moe, device) if moe is not None else None
    if moe_rows is not None and len(moe_rows):
        frames.append(_checked(moe_rows, moe))
    comm = ("op_name", "kernel_source", "num_gpus", "message_size", "latency")
    custom = _table(root, "comm/vllm/*/custom_allreduce_perf.parquet", comm + ("allreduce_dtype",))
    if custom is not None:
        frames.append(_checked(_collectives(custom, device, gpus_per_node, "allreduce_dtype"), custom))
    nccl = _table(root, "comm/nccl/*/nccl_perf.parquet", comm + ("nccl_dtype",))
    if nccl is not None:
        frames.append(_checked(_collectives(nccl[nccl["nccl_dtype"] == "half"], device, gpus_per_node, "nccl_dtype"),
                               nccl))
    if not frames:
        gpus = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*/vllm/*/*_perf.parquet")))
        hint = f"; give one GPU's folder: {', '.join(str(root / g) for g in gpus)}" if gpus else ""
        raise TraceError(f"{root}: no aiconfigurator attention, GEMM or communication tables found{hint}")
    return normalize(pd.concat(frames, ignore_index=True))
