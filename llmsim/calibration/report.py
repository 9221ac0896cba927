"""Validation: predicted vs measured for every op and collective, as a table, a parity plot and a markdown report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from llmsim.calibration.fit import Split
from llmsim.calibration.measurements import LAYER_OPS
from llmsim.calibration.predict import Rows, predict_s
from llmsim.hardware.profile import HardwareProfile
from llmsim.hardware.roofline import custom_all_reduce_serves


def compare(profile: HardwareProfile, rows: Rows, held_out: np.ndarray,
            l2_resident: np.ndarray | None = None) -> pd.DataFrame:
    """One row per measurement: op, split (fit / held-out / l2-resident), measured and predicted seconds,
    relative error."""
    predicted = predict_s(profile, rows)
    split = np.where(held_out, "held-out", "fit")
    if l2_resident is not None:
        split = np.where(l2_resident, "l2-resident", split)
    out = pd.DataFrame({
        "op": _op_labels(rows),
        "model": rows.df["model"],
        "split": split,
        "measured_s": rows.measured_s,
        "predicted_s": predicted,
        "num_workers": rows.num_workers,  # collectives: the GPU count (a TP degree); NaN elsewhere
        "size_bytes": rows.size_bytes,
        "tp": rows.df["tp"],  # layer ops and fused-MoE rows: the TP degree of the shard
    })
    out = pd.concat([out, _layer_sums(out, rows.df)], ignore_index=True)
    out["rel_error"] = out["predicted_s"] / out["measured_s"] - 1.0
    return out[out["predicted_s"].notna()].reset_index(drop=True)


def _op_labels(rows: Rows) -> pd.Series:
    """The op, with the variant where the kind has one: ``all_reduce (inter-node)``, ``all_reduce (vLLM custom)``,
    ``all_reduce (vLLM custom, eager)``, ``moe (vLLM default config)``."""
    kind = pd.Series(rows.kind)
    op = rows.df["op"].copy()
    op = op.where(~kind.str.endswith("_inter_node"), op + " (inter-node)")
    op = op.where(~kind.str.endswith("_custom"), op + " (vLLM custom)")
    op = op.where(~((rows.df["op"] == "gemm") & (kind == "linear_fp8")), op + " (fp8)")
    op = op.where(~((rows.df["op"] == "gemm") & (kind == "linear_fp8_block")), op + " (fp8 block-scaled)")
    op = op.where(~(kind.str.startswith("attention_") & (rows.kv_dtype_bytes == 1)), op + " (8-bit KV)")
    op = op.where(kind != "moe_untuned", op + " (vLLM default config)")
    op = op.where(kind != "moe_fp8", op + " (fp8)")
    op = op.where(kind != "moe_fp8_untuned", op + " (fp8, vLLM default config)")
    op = op.where(kind != "moe_fp8_block", op + " (fp8 block-scaled)")
    return op.where(kind != "unmodelled", op + " (vLLM custom, eager)")


# The ops of one layer, as measured: the schema's layer ops without the embedding and LM head.
_LAYER = tuple(op for op in LAYER_OPS if op not in ("emb", "lm_head"))


def _layer_sums(per_row: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """What an iteration is made of: the ops of one layer (attention kernel aside; ``add`` twice, as the model
    runs it) summed per (model, TP, tokens), measured vs predicted. Per-op errors partly cancel here."""
    keyed = per_row.assign(tp=df["tp"], num_tokens=df["num_tokens"])
    keyed = keyed[keyed["op"].isin(_LAYER)]
    keyed = keyed.assign(weight=np.where(keyed["op"] == "add", 2.0, 1.0))
    keyed = keyed.assign(measured_s=keyed["measured_s"] * keyed["weight"],
                         predicted_s=keyed["predicted_s"] * keyed["weight"])
    # A sum with any op the fit did not see is not a fit result: it counts as held-out.
    keyed = keyed.assign(unseen=keyed["split"] != "fit")
    groups = keyed.groupby(["model", "tp", "num_tokens"], sort=True)
    sums = groups.agg(measured_s=("measured_s", "sum"), predicted_s=("predicted_s", "sum"), ops=("op", "nunique"),
                      unseen=("unseen", "any"))
    sums["split"] = np.where(sums["unseen"], "held-out", "fit")
    # Models without a separate post-attention norm (parallel attention + MLP, as Phi-2) have 8 of the 9 ops.
    sums = sums[sums["ops"] >= len(_LAYER) - 1].reset_index()
    return pd.DataFrame({"op": "layer (sum of ops)", "model": sums["model"], "split": sums["split"],
                         "measured_s": sums["measured_s"], "predicted_s": sums["predicted_s"]})


def error_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """MAPE, P90 and max absolute relative error, and median signed error (bias), per split and op."""
    abs_err = comparison["rel_error"].abs()
    grouped = comparison.assign(abs_err=abs_err).groupby(["split", "op"], sort=True)
    table = grouped.agg(rows=("abs_err", "size"), mape=("abs_err", "mean"),
                        p90=("abs_err", lambda e: float(np.quantile(e, 0.9))), max=("abs_err", "max"),
                        bias=("rel_error", "median"))
    return table.reset_index()


def collective_table(comparison: pd.DataFrame, custom_max_bytes: float | None) -> pd.DataFrame:
    """MAPE of each collective per split and GPU count (a TP group's all-reduce is reported per TP degree), and,
    for NCCL inside a node where vLLM's custom all-reduce takes the smaller messages, over the sizes vLLM still
    sends through NCCL (from ``custom_max_bytes``)."""
    c = comparison[comparison["op"].str.startswith(("all_reduce", "all_gather", "send_recv"))]
    c = c.assign(abs_err=c["rel_error"].abs(), gpus=c["num_workers"].astype(int))
    table = c.groupby(["split", "op", "gpus"], sort=True).agg(rows=("abs_err", "size"), mape=("abs_err", "mean"))
    table["mape_engine_sizes"] = np.nan
    if custom_max_bytes:
        big = c[(c["op"] == "all_reduce") & ~custom_all_reduce_serves(custom_max_bytes, c["size_bytes"])]
        per = big.groupby(["split", "op", "gpus"]).abs_err.mean()
        table.loc[per.index, "mape_engine_sizes"] = per
    return table.reset_index()


def moe_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """MAPE and median signed error of the fused-MoE rows per split, kind, expert shape (the measurements' model
    name, ``moe h<hidden> i<expert width> e<experts> k<top-k>``) and TP degree: a model's shape may sit well or badly
    on a curve whose MAPE over every shape looks fine."""
    c = comparison[comparison["op"].str.startswith("moe")]
    c = c.assign(abs_err=c["rel_error"].abs(), tp=c["tp"].astype(int))
    table = c.groupby(["split", "op", "model", "tp"], sort=True).agg(
        rows=("abs_err", "size"), mape=("abs_err", "mean"), bias=("rel_error", "median"))
    return table.reset_index()


def parity_plot(comparison: pd.DataFrame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharex=True, sharey=True)
    for ax, split in zip(axes, ("fit", "held-out")):
        part = comparison[comparison["split"] == split]
        for op, group in part.groupby("op", sort=True):
            ax.scatter(group["measured_s"] * 1e3, group["predicted_s"] * 1e3, s=3, alpha=0.4, label=op)
        lo = max(comparison["measured_s"].min() * 1e3 / 2, 1e-4)
        hi = comparison["measured_s"].max() * 1e3 * 2
        for factor, style in ((1.0, "k-"), (1.1, "k:"), (1 / 1.1, "k:")):
            ax.plot([lo, hi], [lo * factor, hi * factor], style, linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="measured (ms)", title=f"{split} rows ({len(part)})")
    axes[0].set_ylabel("predicted (ms)")
    axes[1].legend(fontsize=7, markerscale=3, loc="upper left")
    fig.suptitle(f"{title}: predicted vs measured (dotted: ±10%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(profile: HardwareProfile, table: pd.DataFrame, measurements: str, split: Split, png_name: str,
             command: str, collectives: pd.DataFrame | None = None, moe: pd.DataFrame | None = None) -> str:
    lines = [
        f"# Validation: {profile.name} ({profile.description})",
        "",
        f"Produced by `{command}`.",
        f"Measurements: `{measurements}`. Held-out models: {', '.join(split.held_out_models) or 'none'}; "
        f"held-out collective worker counts: {', '.join(map(str, split.held_out_num_workers)) or 'none'}; "
        f"held-out attention head layouts (query/KV heads per GPU): "
        f"{', '.join(split.held_out_head_layouts) or 'none'}; held-out bare-GEMM inner dimensions (K): "
        f"{', '.join(map(str, split.held_out_gemm_k)) or 'none'}. Held-out rows were never seen by the fit.",
        "",
        f"The GEMM curves are fitted only on GEMMs measured by `{split.gemm_source}*` (the engine version they "
        "model); other sources' GEMM rows validate them from another software stack and count as held-out, and so "
        "does every layer sum that includes them." if split.gemm_source else "",
        "",
        "`l2-resident`: decode-attention rows whose KV is between 1/16 of the L2 cache and its size. The benchmark "
        "re-reads the same KV, so it comes from L2; in serving every layer's KV is evicted before it is read "
        "again. These rows are not fitted and are reported apart." if (table["split"] == "l2-resident").any()
        else "",
        "",
        "Relative error = predicted / measured - 1. MAPE = mean absolute relative error; bias = median signed error.",
        "",
        "| split | op | rows | MAPE | P90 | max | bias |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.split} | {r.op} | {r.rows} | {r.mape:.1%} | {r.p90:.1%} | {r.max:.1%} | {r.bias:+.1%} |")
    if collectives is not None and len(collectives):
        limit = profile.custom_all_reduce_max_bytes
        lines += ["", "Collectives by GPU count (a TP group's all-reduce, per TP degree)."
                  + (f" Inside a node vLLM sends messages under {limit / 2**20:g} MiB through its custom all-reduce "
                     "(`vLLM custom`); the last column is NCCL's error over the sizes it still gets there."
                     if limit else ""), ""]
        if limit:
            lines += ["| split | op | GPUs | rows | MAPE | MAPE, sizes NCCL gets inside a node |",
                      "|---|---|---:|---:|---:|---:|"]
        else:
            lines += ["| split | op | GPUs | rows | MAPE |", "|---|---|---:|---:|---:|"]
        for r in collectives.itertuples(index=False):
            engine = "" if not limit else " - |" if pd.isna(r.mape_engine_sizes) else f" {r.mape_engine_sizes:.1%} |"
            lines.append(f"| {r.split} | {r.op} | {r.gpus} | {r.rows} | {r.mape:.1%} |{engine}")
    if moe is not None and len(moe):
        lines += ["", "Fused MoE by expert shape (hidden size, expert width, experts, top-k) and TP degree.", "",
                  "| split | op | expert shape | TP | rows | MAPE | bias |", "|---|---|---|---:|---:|---:|---:|"]
        for r in moe.itertuples(index=False):
            lines.append(f"| {r.split} | {r.op} | {r.model.removeprefix('moe ')} | {r.tp} | {r.rows} | {r.mape:.1%} | "
                         f"{r.bias:+.1%} |")
    lines += ["", f"![parity plot]({png_name})", ""]
    return "\n".join(lines)


def summary(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per split, per op MAPE, rounded, for the profile's ``validation`` block."""
    return {split: {r.op: round(float(r.mape), 4) for r in part.itertuples(index=False)}
            for split, part in table.groupby("split", sort=True)}
