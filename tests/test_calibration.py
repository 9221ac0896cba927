from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsim.calibration.aiconfigurator import import_aiconfigurator
from llmsim.calibration.fit import Split, calibrate, fit_gemm_efficiency, l2_resident
from llmsim.calibration.measurements import check, normalize, read_measurements, write_measurements
from llmsim.calibration.predict import Rows, predict_s, roofline_s, row_work
from llmsim.calibration.report import collective_table, markdown, moe_table
from llmsim.calibration.vidur import import_vidur
from llmsim.calibration.workflow import profile_path, validate
from llmsim.cli import main
from llmsim.errors import TraceError
from llmsim.hardware.profile import ComputeEfficiency, LinkModel, OpEfficiency, load_profile
from llmsim.hardware.roofline import op_time_s, split_k_splits

ROOT = Path(__file__).resolve().parents[1]

DATA = Path(__file__).parent / "data"
LLAMA_7B = {"n_head": 32, "n_kv_head": 32, "n_embd": 4096, "n_expanded_embd": 11008, "vocab_size": 32000,
            "gated": True}
LLAMA_70B = {"n_head": 64, "n_kv_head": 8, "n_embd": 8192, "n_expanded_embd": 28672, "vocab_size": 32000,
             "gated": True}


def compute_rows(models: dict[str, dict], ops=("attn_pre_proj", "mlp_up_proj", "mlp_down_proj", "attn_post_proj")):
    rows = []
    for model, shape in models.items():
        for tp in (1, 2, 4, 8):
            for tokens in (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
                for op in ops:
                    rows.append({"device": "synthetic", "op": op, "dtype": "fp16", "model": model, "tp": tp,
                                 "num_tokens": tokens, **shape, "median_ms": 1.0})
    return normalize(pd.DataFrame(rows))


def test_row_work_matches_hand_counts():
    df = compute_rows({"llama7": LLAMA_7B})
    row = df[(df.op == "attn_pre_proj") & (df.tp == 2) & (df.num_tokens == 128)].iloc[0]
    work = row_work(row)
    # QKV of Llama-2-7B on one of 2 shards: [128, 4096] x [4096, 3 * 4096 / 2]
    assert work.flops == 2 * 128 * 4096 * 6144
    assert work.num_bytes == (128 * 4096 + 4096 * 6144 + 128 * 6144) * 2
    up = row_work(df[(df.op == "mlp_up_proj") & (df.tp == 1) & (df.num_tokens == 16)].iloc[0])
    assert up.flops == 2 * 16 * 4096 * 2 * 11008  # fused up + gate


@given(flops=st.floats(0, 1e15), num_bytes=st.floats(1, 1e11), tokens=st.integers(1, 10_000),
       max_eff=st.floats(0.05, 1), half=st.floats(0, 1000), mem=st.floats(0.05, 1), overhead=st.floats(0, 1e-4),
       gemm=st.one_of(st.none(), st.tuples(st.integers(1, 65536), st.integers(1, 65536), st.floats(0, 1e4),
                                          st.floats(0, 1e4), st.floats(0, 100), st.floats(0, 1e-9))),
       softness=st.one_of(st.none(), st.floats(1, 8)),
       split=st.one_of(st.none(), st.tuples(st.floats(16, 1e5), st.integers(1, 200))),
       quant=st.one_of(st.none(), st.tuples(st.floats(0, 1e10), st.floats(0.05, 1))))
def test_vectorised_roofline_is_op_time(flops, num_bytes, tokens, max_eff, half, mem, overhead, gemm, softness,
                                        split, quant):
    k, n, half_k, half_n, half_tiles, k_latency = gemm or (0, 0, 0.0, 0.0, 0.0, 0.0)
    split_k_min_k, num_sms = split or (None, None)
    quant_bytes, quant_memory_eff = quant or (0.0, None)
    eff = OpEfficiency(compute=ComputeEfficiency(max_eff=max_eff, half_tokens=half, half_k=half_k, half_n=half_n,
                                                 half_tiles=half_tiles),
                       memory_eff=mem, overhead_s=overhead, k_latency_s=k_latency, softness=softness,
                       split_k_min_k=split_k_min_k, quant_memory_eff=quant_memory_eff)
    expected = op_time_s(eff, 312e12, 2e12, flops, num_bytes, tokens, k, n, num_sms, quant_bytes)
    got = roofline_s(eff, np.array([flops]), np.array([num_bytes]), np.array([float(tokens)]), np.array([float(k)]),
                     np.array([float(n)]), 312e12, 2e12, num_sms, np.array([quant_bytes]))[0]
    assert got == pytest.approx(expected, rel=1e-12)


def test_split_k_by_hand():
    """cuBLAS splits K when a GEMM has fewer output tiles than SMs: a decode GEMV (M = 1) with N = 256 has 2
    tiles of 128 x 128 (counted as at least one), so 132 SMs allow 66 splits, but K = 65,536 at 4,096 per split
    makes 16; its serial reduction is 1/16 as long. Many tiles (M = 4,096, N = 8,192: 2,048) or a short K
    (512: under one split) never split."""
    eff = OpEfficiency(compute=ComputeEfficiency(max_eff=0.8, half_tokens=0.0), memory_eff=0.9, overhead_s=0.0,
                       k_latency_s=1e-9, split_k_min_k=4096.0)
    assert split_k_splits(eff, 1, 65536, 256, 132) == 16.0
    assert split_k_splits(eff, 1, 65536, 128 * 128 * 200, 132) == 1.0  # 200 tiles: the SMs are full
    assert split_k_splits(eff, 4096, 8192, 8192, 132) == 1.0 and split_k_splits(eff, 1, 512, 256, 132) == 1.0
    assert split_k_splits(eff, 1, 65536, 256, None) == 1.0  # a profile without SMs never splits
    bare = op_time_s(eff, 1e15, 2e12, 0.0, 0.0, 1, 65536, 256)
    assert op_time_s(eff, 1e15, 2e12, 0.0, 0.0, 1, 65536, 256, 132) == pytest.approx(bare - 65536e-9 * 15 / 16)


def test_split_k_is_recovered():
    """Bare GEMMs on a grid of M, N, K generated by a tiled GEMM with split-K (3% lognormal noise), fitted from
    the usual start: the reduction's latency and the smallest K per split come back."""
    truth = OpEfficiency(compute=ComputeEfficiency(max_eff=0.85, half_tokens=20.0, half_k=150.0, half_tiles=4.0),
                         memory_eff=0.9, overhead_s=3e-6, k_latency_s=1e-9, split_k_min_k=2048.0, softness=4.0)
    grid = [(m, n, k) for m in (1, 8, 64, 256, 1024, 4096) for n in (32, 128, 1024, 8192)
            for k in (256, 1024, 4096, 16384, 65536)]
    df = normalize(pd.DataFrame([{"device": "synthetic", "op": "gemm", "dtype": "bf16", "num_tokens": m,
                                  "gemm_n": n, "gemm_k": k, "median_ms": 1.0} for m, n, k in grid]))
    rows = Rows(df)
    peak, bw, sms = np.full(len(df), 312e12), 2e12, 108
    rng = np.random.default_rng(1)
    rows.measured_s = (roofline_s(truth, rows.flops, rows.num_bytes, rows.num_tokens, rows.gemm_k, rows.gemm_n, peak,
                                  bw, sms) * rng.lognormal(0.0, 0.03, len(df)))
    everything = np.ones(len(df), dtype=bool)
    got = fit_gemm_efficiency(rows, everything, peak, bw, sms)
    assert got.k_latency_s == pytest.approx(1e-9, rel=0.15)
    assert got.split_k_min_k == pytest.approx(2048.0, rel=0.15)

    predicted = roofline_s(got, rows.flops, rows.num_bytes, rows.num_tokens, rows.gemm_k, rows.gemm_n, peak, bw, sms)
    assert np.abs(predicted / rows.measured_s - 1).mean() < 0.03  # the noise's own mean is 2.4%


def test_fp8_input_quantization_bandwidth_is_recovered():
    """FP8 GEMMs on a grid of M, N, K whose time is a tiled GEMM plus a quantization of the input at 27 bytes per
    element (aiconfigurator's collector) streamed at 0.7 of the bandwidth, with 3% noise: the fit gives the
    fraction back and puts no per-input-row cost into the shape terms (half_n)."""
    truth = OpEfficiency(compute=ComputeEfficiency(max_eff=0.75, half_tokens=10.0, half_tiles=10.0),
                         memory_eff=0.8, overhead_s=1e-5, softness=3.0, quant_memory_eff=0.7)
    grid = [(m, n, k) for m in (1, 16, 128, 512, 2048, 8192) for n in (1024, 4096, 16384) for k in (1024, 4096, 8192)]
    df = normalize(pd.DataFrame([{"device": "synthetic", "op": "gemm", "dtype": "fp8", "num_tokens": m,
                                  "gemm_n": n, "gemm_k": k, "median_ms": 1.0,
                                  "source": "aiconfigurator gemm/vllm/0.14.0/gemm_perf.parquet"} for m, n, k in grid]))
    rows = Rows(df)
    assert np.array_equal(rows.quant_bytes, rows.num_tokens * rows.gemm_k * 27.0)
    peak, bw = np.full(len(df), 1979e12), 3.35e12
    rng = np.random.default_rng(3)
    rows.measured_s = (roofline_s(truth, rows.flops, rows.num_bytes, rows.num_tokens, rows.gemm_k, rows.gemm_n, peak,
                                  bw, None, rows.quant_bytes) * rng.lognormal(0.0, 0.03, len(df)))
    got = fit_gemm_efficiency(rows, np.ones(len(df), dtype=bool), peak, bw)
    assert got.quant_memory_eff == pytest.approx(0.7, rel=0.1)
    assert got.compute.half_n < 500  # 8,620 when the quantization had to hide in it


def test_fused_moe_unaligned_width_factor_is_recovered():
    """Fused-MoE rows of expert widths on the GPU that are multiples of 16 and of ones that are not (1,856 at TP 8-32:
    232, 116, 58), the latter 1.5x slower, with 3% noise: the fit gives the factor back; rows of aligned widths only
    give no factor."""
    truth = OpEfficiency(compute=ComputeEfficiency(max_eff=0.3, half_tokens=0.0, half_k=200.0, half_n=150.0,
                                                   half_tiles=0.01), memory_eff=0.9, overhead_s=1e-5,
                         k_latency_s=3e-9, softness=2.0)
    shape = {"n_head": 16, "n_kv_head": 4, "n_embd": 2688, "n_expanded_embd": 1856, "vocab_size": 32000,
             "gated": True, "num_experts": 128, "experts_per_token": 6}
    df = normalize(pd.DataFrame([{"device": "synthetic", "op": "moe", "dtype": "bf16", "model": "m", "tp": tp,
                                  "num_tokens": t, **shape, "median_ms": 1.0}
                                 for tp in (1, 2, 4, 8, 16, 32) for t in (1, 8, 64, 256, 1024, 4096, 16384)]))
    rows = Rows(df)
    assert list(np.unique(df["tp"][rows.moe_unaligned])) == [8, 16, 32]
    peak, bw = np.full(len(df), 989e12), 3.35e12
    rng = np.random.default_rng(2)
    rows.measured_s = (roofline_s(truth, rows.flops, rows.num_bytes, rows.num_tokens, rows.gemm_k, rows.gemm_n, peak,
                                  bw) * np.where(rows.moe_unaligned, 1.5, 1.0) * rng.lognormal(0.0, 0.03, len(df)))
    got = fit_gemm_efficiency(rows, np.ones(len(df), dtype=bool), peak, bw)
    assert got.unaligned_factor == pytest.approx(1.5, rel=0.05)
    aligned = ~rows.moe_unaligned
    assert fit_gemm_efficiency(rows, aligned, peak[aligned], bw).unaligned_factor is None


def test_gemm_shape_terms_by_hand():
    """A 512 x 4096 x 1024 GEMM: 32 output tiles of 128 x 128; the terms as the profile documents them."""
    compute = ComputeEfficiency(max_eff=0.8, half_tokens=64.0, half_k=1024.0, half_n=1024.0, half_tiles=32.0)
    assert compute.at_shape(512, 4096, 1024) == pytest.approx(0.8 * 512 / 576 * 0.8 * 0.5 * 0.5)
    assert compute.at_shape(512, 0, 0) == compute.at(512)  # not a GEMM: the M curve alone
    eff = OpEfficiency(compute=compute, memory_eff=0.5, overhead_s=2e-6, k_latency_s=1e-9, softness=2.0)
    flops, num_bytes = 2.0 * 512 * 4096 * 1024, 10e6
    c = flops / (1e15 * compute.at_shape(512, 4096, 1024))
    m = num_bytes / (2e12 * 0.5)
    assert op_time_s(eff, 1e15, 2e12, flops, num_bytes, 512, 4096, 1024) == pytest.approx(
        (c * c + m * m) ** 0.5 + 2e-6 + 4096e-9)


def test_calibration_recovers_known_parameters():
    """Synthetic measurements from a known profile, with 3% lognormal noise, fitted from a wrong start."""
    truth = load_profile("a100-80gb")
    linear = OpEfficiency(compute=ComputeEfficiency(max_eff=0.62, half_tokens=90.0), memory_eff=0.71,
                          overhead_s=9e-6)
    links = {"all_reduce": LinkModel(latency_s=25e-6, bandwidth_bytes_per_s=150e9),
             "send_recv": LinkModel(latency_s=12e-6, bandwidth_bytes_per_s=220e9)}
    truth = truth.model_copy(update={"efficiency": {**truth.efficiency, "linear": linear}, **links})
    sizes = np.geomspace(2048, 256e6, 40)
    collectives = [{"device": "synthetic", "op": op, "size_bytes": s, "num_workers": n, "devices_per_node": n,
                    "median_ms": 1.0} for op, workers in (("all_reduce", (2, 4, 8)), ("send_recv", (2,)))
                   for n in workers for s in sizes]
    df = pd.concat([compute_rows({"llama7": LLAMA_7B, "llama70": LLAMA_70B}), normalize(pd.DataFrame(collectives))],
                   ignore_index=True)
    rng = np.random.default_rng(0)
    df["median_ms"] = predict_s(truth, Rows(df)) * 1e3 * rng.lognormal(0.0, 0.03, len(df))

    wrong = OpEfficiency(compute=ComputeEfficiency(max_eff=0.3, half_tokens=10.0), memory_eff=0.4,
                         overhead_s=1e-6)
    start = truth.model_copy(update={"efficiency": {**truth.efficiency, "linear": wrong},
                                     "all_reduce": LinkModel(latency_s=1e-6, bandwidth_bytes_per_s=50e9),
                                     "send_recv": LinkModel(latency_s=1e-6, bandwidth_bytes_per_s=50e9)})
    # The truth has no split-K (nor SMs to split over): fitting one to these layer shapes would add a reduction
    # latency that trades against half_tokens (79.7 instead of 90); test_split_k_is_recovered covers that fit.
    start = start.model_copy(update={"num_sms": None})
    fitted = calibrate(start, Rows(df), Split())
    got = fitted.efficiency["linear"]
    assert got.compute.max_eff == pytest.approx(0.62, rel=0.03)
    assert got.compute.half_tokens == pytest.approx(90.0, rel=0.1)
    assert got.memory_eff == pytest.approx(0.71, rel=0.03)
    assert got.overhead_s == pytest.approx(9e-6, rel=0.2)
    assert fitted.all_reduce.bandwidth_bytes_per_s == pytest.approx(150e9, rel=0.03)
    assert fitted.all_reduce.latency_s == pytest.approx(25e-6, rel=0.1)
    assert fitted.send_recv.bandwidth_bytes_per_s == pytest.approx(220e9, rel=0.03)


def test_held_out_rows_do_not_move_the_fit():
    df = compute_rows({"llama7": LLAMA_7B, "llama70": LLAMA_70B})
    profile = load_profile("a100-80gb")
    df["median_ms"] = predict_s(profile, Rows(df)) * 1e3
    poisoned = df.copy()
    poisoned.loc[poisoned.model == "llama70", "median_ms"] *= 5  # garbage in the held-out model only
    split = Split(held_out_models=("llama70",))
    clean = calibrate(profile, Rows(df), split).efficiency["linear"]
    dirty = calibrate(profile, Rows(poisoned), split).efficiency["linear"]
    assert clean == dirty


@pytest.mark.parametrize("device, stack_gap", [("a100-80gb", (-0.16, -0.08)), ("h100-sxm", (-0.26, -0.16))])
def test_shipped_validation_reproduces_and_meets_bound(tmp_path, device, stack_gap):
    """The committed profiles' validation numbers come out of the shipped data; held-out vLLM GEMMs (K = 5120,
    8192) stay within the issue's 8% (H100 FP8: 7%; 8.1% / 8.4% before split-K); Vidur's layer GEMMs, from an
    older software stack and not fitted, run slower than vLLM 0.14's by the gap the README states (median signed
    error)."""
    profile = load_profile(device)
    assert profile.calibrated and profile.calibration["gemm_source"] == "aiconfigurator"
    result = validate(profile_path(device), None, tmp_path, "test")
    table = result.table
    held = table[table["split"] == "held-out"].set_index("op")
    assert held.loc["gemm", "mape"] <= 0.08
    if device == "h100-sxm":
        assert held.loc["gemm (fp8)", "mape"] <= 0.07
        # Block-scaled FP8 (DeepSeek-V3's and Qwen3's FP8 checkpoints), on its own curves: held-out K within 6.5%
        # (5.5% when the collector's quantization was folded into a shape term) and Mixtral's expert shape within
        # 6% (README); until an earlier round its rows were imported and left unmodelled.
        assert held.loc["gemm (fp8 block-scaled)", "mape"] <= 0.065
        assert held.loc["moe (fp8 block-scaled)", "mape"] <= 0.06
    for op in ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"):
        assert stack_gap[0] <= held.loc[op, "bias"] <= stack_gap[1], (op, held.loc[op, "bias"])
    assert "fit" not in set(table.loc[table["op"].isin(("attn_pre_proj", "layer (sum of ops)")), "split"])
    held = held["mape"]
    # Attention kernels, fitted on NVIDIA's measured vLLM kernels, on head layouts the fit never saw (32/8, 64/8,
    # 40/40); bounds as the README states them (decode <= 9%; prefill, by its tiles and KV-block units: A100 <= 4%
    # (5.1% before its single-token batches paid the packing copies), H100 <= 8.1%, fp8 KV <= 8.8%; 14-15% with
    # the former mean-keys model); vLLM's custom all-reduce on the
    # held-out 8 GPUs, with its one- or two-stage kernel by size and a barrier latency per peer: <= 10% on both
    # (A100 14.3% with the sizes read as bytes and no per-peer term).
    assert held["attn_decode"] <= 0.09 and held["attn_prefill"] <= (0.04 if device == "a100-80gb" else 0.081), held
    if device == "h100-sxm":
        assert held["attn_prefill (8-bit KV)"] <= 0.088, held
    assert held["all_reduce (vLLM custom)"] <= 0.10
    if device == "a100-80gb":
        # FlashAttention 2 (vLLM on A100) splits the KV only for GQA decodes: MHA decodes run one CTA per sequence
        # and head, with their own fixed cost. Modelled so, the fitted MHA rows (1/1 .. 8/8 heads) are within 13%
        # (37% when every decode was modelled as split). Its GQA packing copies q and the output where batch and
        # KV heads are both 2+: with that, the held-out (GQA) rows are within 6% (7.9% without), and the one-KV-head
        # rows, whose reshape is a view, within 12% (25%, predicted slow, without).
        assert profile.decode_attention.gqa_only_split_kv and held["attn_decode"] <= 0.06
        rows = Rows(read_measurements(ROOT / "hardware_profiles" / "measurements" / "aiconfigurator-a100.csv.gz"),
                    profile)
        decode = (rows.kind == "attention_decode") & ~l2_resident(profile, rows)
        err = predict_s(profile, rows) / rows.measured_s - 1
        mha, mqa = decode & rows.mha, decode & ~rows.mha & (rows.kv_heads == 1)
        assert mha.sum() > 500 and np.abs(err[mha]).mean() <= 0.13
        assert mqa.sum() > 500 and np.abs(err[mqa]).mean() <= 0.12
        # The copies show in the measurements as a step of a few microseconds at short KV: 8 query heads over 2 KV
        # heads take ~12.5 us at batch 1 and ~18 us at batch 2, over 1 KV head ~12.5 us at both.
        short = decode & (rows.df["kv_len"].to_numpy() <= 128) & (rows.num_heads == 8)
        at = {(int(b), int(k)): rows.measured_s[i] for i, b, k in zip(np.flatnonzero(short), rows.batch[short],
                                                                       rows.kv_heads[short])}
        assert at[(2, 2)] - at[(1, 2)] > 4e-6 and abs(at[(2, 1)] - at[(1, 1)]) < 1e-6
        # Prefill batches of one new token per sequence take the same packed path and show the same step (8 query
        # heads over 2 KV heads: ~12.2 us at batch 1, ~18 us from batch 2); charged the copies, those rows of 2+
        # sequences over 2+ KV heads are within 5% (35%, predicted fast, without).
        prefill = (rows.kind == "attention_prefill") & rows.single_token
        packed = prefill & (rows.batch >= 2) & (rows.kv_heads >= 2) & ~rows.mha
        assert profile.prefill_attention.swapped_copy_s > 0
        assert packed.sum() > 150 and np.abs(err[packed]).mean() <= 0.05, np.abs(err[packed]).mean()
    if device == "h100-sxm":
        # vLLM's fused MoE, fitted with a curve for its tuned and one for its default kernel configurations, on
        # Mixtral's expert shape, which the fit never saw (every TP held out): tuned shapes (TP 2-8) <= 7%, the
        # default configuration (TP 1, 16, 32), with each expert's tokens padded to its block, <= 9%; FP8 weights
        # 7% and 9% (README; 12.6% and 10.7% before the padding was counted; the FP8 default one was 8.05% while
        # its curve bent to absorb the shapes of expert widths not a multiple of 16, now a factor of their own, 8.9%
        # since). The TP2 shard, Mixtral's end-to-end runs: <= 10%.
        assert "moe h4096 i14336 e8 k2" in profile.calibration["held_out_models"]
        assert held["moe"] <= 0.07 and held["moe (vLLM default config)"] <= 0.09, held
        assert held["moe (fp8)"] <= 0.07 and held["moe (fp8, vLLM default config)"] <= 0.09, held
        rows = Rows(read_measurements(ROOT / "hardware_profiles" / "measurements" / "aiconfigurator-h100.csv.gz"),
                    profile)
        predicted = predict_s(profile, rows)
        # Those shapes (1,856 wide at TP 8-32, 2,688 at TP 16-32: 58-232 per GPU) ran 1.4-1.9x the curve; with the
        # fitted factor their rows are at 12.6% (bf16) and 19.5% (FP8), against 27% and 34% (median -28% and -35%)
        # when the curve alone priced them.
        odd = rows.moe_unaligned & np.isin(rows.kind, ["moe_untuned", "moe_fp8_untuned"])
        assert odd.sum() >= 250 and np.abs(predicted[odd] / rows.measured_s[odd] - 1).mean() <= 0.17
        # The default configuration's 64-row blocks show in the measurements as steps: Mixtral at TP 1 (held out)
        # takes 1.45 ms at 256 tokens (64 a expert: one block) and 2.15 ms at 320 (80: two), and the model, which
        # pads each expert's tokens to the block as vLLM's moe_align_block_size does, steps with it.
        tp1 = ((rows.df["model"] == "moe h4096 i14336 e8 k2") & (rows.df["tp"] == 1)
               & (rows.df["dtype"] == "bf16")).to_numpy()
        at = {int(t): i for i, t in zip(np.flatnonzero(tp1), rows.df["num_tokens"][tp1])}
        assert set(rows.kind[tp1]) == {"moe_untuned"}
        measured_step = rows.measured_s[at[320]] / rows.measured_s[at[256]]
        modelled_step = predicted[at[320]] / predicted[at[256]]
        assert measured_step > 1.4 and modelled_step > 1.3, (measured_step, modelled_step)
        mixtral = ((rows.df["model"] == "moe h4096 i14336 e8 k2") & (rows.df["tp"] == 2)
                   & (rows.df["dtype"] == "bf16")).to_numpy()
        assert set(rows.kind[mixtral]) == {"moe"}
        err = predicted[mixtral] / rows.measured_s[mixtral] - 1
        assert len(err) == 27 and np.abs(err).mean() <= 0.10
    # The report's per-TP table: vLLM's custom all-reduce at the held-out TP 8 within 10%, as above.
    report = result.report_path.read_text()
    row = next(line for line in report.splitlines() if line.startswith("| held-out | all_reduce (vLLM custom) | 8 |"))
    assert float(row.split("|")[5].strip().rstrip("%")) <= 10.0
    recorded = profile.validation["mape"]["held-out"]
    assert {op: round(float(v), 4) for op, v in held.items()} == recorded
    assert result.plot_path.stat().st_size > 10_000


def test_aiconfigurator_import_maps_columns(tmp_path):
    base = {"framework": "VLLM", "version": "0.14.0", "device": "X", "kernel_source": "vllm_flash_attn",
            "head_dim": 128, "beam_width": 1, "attn_dtype": "bfloat16"}
    folder = tmp_path / "attention" / "vllm" / "0.14.0"
    folder.mkdir(parents=True)
    pd.DataFrame([{**base, "op_name": "generation_attention", "batch_size": 4, "isl": 1, "num_heads": 32,
                   "num_key_value_heads": 8, "kv_cache_dtype": "fp8", "step": 511, "latency": 0.02}]
                 ).to_parquet(folder / "generation_attention_perf.parquet")
    pd.DataFrame([{**base, "op_name": "context_attention", "batch_size": 2, "isl": 1024, "num_heads": 16,
                   "num_key_value_heads": 16, "kv_cache_dtype": "bfloat16", "step": 0, "latency": 0.3}]
                 ).to_parquet(folder / "context_attention_perf.parquet")
    comm = tmp_path / "comm" / "vllm" / "0.14.0"
    comm.mkdir(parents=True)
    pd.DataFrame([{"op_name": "all_reduce", "kernel_source": k, "allreduce_dtype": "bfloat16", "num_gpus": 4,
                   "message_size": 8192, "latency": 0.005} for k in ("vLLM_custom_graph", "vLLM_custom_eager")]
                 ).to_parquet(comm / "custom_allreduce_perf.parquet")
    df = import_aiconfigurator(tmp_path, "h100-sxm").set_index("op")
    decode, prefill = df.loc["attn_decode"], df.loc["attn_prefill"]
    assert (decode["kv_len"], decode["seq_len"], decode["kv_dtype"], decode["dtype"]) == (512, 1, "fp8", "bf16")
    assert (prefill["seq_len"], prefill["kv_len"], prefill["n_embd"]) == (1024, 0, 16 * 128)
    assert sorted(df.loc["all_reduce"]["impl"]) == ["custom_eager", "custom_graph"]
    # aiconfigurator's message_size counts elements (the collectors build a tensor of that many): 8,192 bf16.
    assert (df.loc["all_reduce"]["size_bytes"] == 8192 * 2).all()
    rows = Rows(df.reset_index())
    assert sorted(rows.kind) == ["all_reduce_custom", "attention_decode", "attention_prefill", "unmodelled"]
    with pytest.raises(TraceError, match="no aiconfigurator attention, GEMM or communication tables"):
        import_aiconfigurator(tmp_path / "attention", "h100-sxm")


def test_aiconfigurator_import_takes_the_newest_version_by_number_and_reads_a_broken_link(tmp_path):
    """The newest version folder had been the last as text (0.9.0 after 0.14.0), so an older table was imported;
    a link to nothing was skipped as if its table were not there; the GPUs' parent folder said nothing of them."""
    gpu = tmp_path / "h100_sxm"
    for version, latency in (("0.14.0", 0.005), ("0.9.0", 0.009)):
        comm = gpu / "comm" / "vllm" / version
        comm.mkdir(parents=True)
        pd.DataFrame([{"op_name": "all_reduce", "kernel_source": "vLLM_custom_graph", "allreduce_dtype": "bfloat16",
                       "num_gpus": 4, "message_size": 8192, "latency": latency}]
                     ).to_parquet(comm / "custom_allreduce_perf.parquet")
    df = import_aiconfigurator(gpu, "h100-sxm")
    assert list(df["median_ms"]) == [0.005] and list(df["source"]) == [
        "aiconfigurator comm/vllm/0.14.0/custom_allreduce_perf.parquet"]
    with pytest.raises(TraceError, match=f"give one GPU's folder: {gpu}$"):
        import_aiconfigurator(tmp_path, "h100-sxm")
    table = gpu / "comm" / "vllm" / "0.14.0" / "custom_allreduce_perf.parquet"
    table.unlink()
    table.symlink_to(tmp_path / "nowhere.parquet")
    with pytest.raises(TraceError, match=f"{table}: not an aiconfigurator table"):
        import_aiconfigurator(gpu, "h100-sxm")


def test_an_empty_or_unreadable_vidur_csv_is_a_clear_error(tmp_path):
    """An empty file or a folder in a CSV's place had been pandas' EmptyDataError or IsADirectoryError."""
    import shutil

    shutil.copytree(DATA / "vidur_sample", tmp_path / "v")
    for rel in ("compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv", "network/a100_dgx/all_reduce.csv"):
        csv = tmp_path / "v" / rel
        saved = csv.read_bytes()
        csv.write_bytes(b"")
        with pytest.raises(TraceError, match=f"{csv}: not a Vidur profiling CSV: No columns to parse"):
            import_vidur(tmp_path / "v", "a100", "a100_dgx")
        csv.unlink()
        csv.mkdir()
        with pytest.raises(TraceError, match=f"{csv}: not a Vidur profiling CSV: .*Is a directory"):
            import_vidur(tmp_path / "v", "a100", "a100_dgx")
        csv.rmdir()
        csv.write_bytes(saved)
    (tmp_path / "m.csv").mkdir()
    with pytest.raises(TraceError, match="m.csv: not a measurements CSV: .*Is a directory"):
        read_measurements(tmp_path / "m.csv")


def test_rows_measured_on_a_part_with_another_profile_neither_calibrate_nor_validate_this_one(tmp_path, capsys):
    """A T4 profile fitted on the CPU's rows had been written (its report scoring it on the rows it was fitted
    to); A100 errors had been reported from H100 rows. A profile's base chain is its own (h200 reads h100-sxm's
    fit); a device no profile is named after (``cuda``) is the user's call. Nothing is written on the refusal."""
    cpu_rows = ROOT / "hardware_profiles" / "measurements" / "cpu-small.csv"
    assert main(["calibrate", "--device", "t4", "--measurements", str(cpu_rows), "--out", str(tmp_path / "t4.yaml"),
                 "--report-dir", str(tmp_path / "rep")]) == 2
    assert "cpu-small.csv: rows measured on cpu, not on t4; give their own profile (--device cpu)" in \
        capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    df = pd.read_csv(cpu_rows)
    for device, profile, code in (("h100-sxm", "a100-80gb", 2), ("h100-sxm", "h200", 0), ("cuda", "a100-80gb", 0)):
        df.assign(device=device).to_csv(tmp_path / "m.csv", index=False)
        assert main(["validate", "--device", profile, "--measurements", str(tmp_path / "m.csv"),
                     "--report-dir", str(tmp_path / f"rep-{profile}-{device}")]) == code
        err = capsys.readouterr().err
        assert (f"rows measured on {device}, not on {profile}" in err) == (code == 2), err
        assert (tmp_path / f"rep-{profile}-{device}").exists() == (code == 0)


def test_vidur_rows_the_fit_cannot_use_name_their_csv_line(tmp_path):
    """Each op of a Vidur row becomes a row of its own, so errors had named lines of the combined rows, past the
    CSV's end; and use_gated_mlp went through bool(), which reads any text, "False" too, as gated."""
    import shutil

    shutil.copytree(DATA / "vidur_sample", tmp_path / "v")
    mlp = tmp_path / "v" / "compute" / "a100" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv"
    df = pd.read_csv(mlp)
    last = len(df) + 1  # its line (the header is line 1)
    for column, value, needle in (("num_tokens", 0, "op emb needs a whole 'num_tokens' of at least 1, got 0"),
                                  ("use_gated_mlp", "maybe", "column 'gated' is 'maybe', expected true or false")):
        bad = df.astype({column: object})
        bad.loc[len(df) - 1, column] = value
        bad.to_csv(mlp, index=False)
        with pytest.raises(TraceError) as err:
            import_vidur(tmp_path / "v", "a100")
        assert str(err.value).startswith(f"{mlp}:{last}: {needle}"), err.value


def test_aiconfigurator_rows_the_fit_cannot_use_name_their_table_and_row(tmp_path):
    """A GEMM of K 0 had been imported (and priced as no GEMM); errors had named the folder and a line of the
    combined rows, or no file at all for an unknown dtype."""
    folder = tmp_path / "gemm" / "vllm" / "0.14.0"
    folder.mkdir(parents=True)
    table = folder / "gemm_perf.parquet"
    rows = [{"gemm_dtype": "bfloat16", "m": m, "n": 4096, "k": 4096, "latency": 0.01} for m in (1, 2, 4)]
    pd.DataFrame(rows).to_parquet(table)
    assert len(import_aiconfigurator(tmp_path, "h100-sxm")) == 3
    for column, value, needle in (("k", 0, "row 2: op gemm needs a whole 'gemm_k' of at least 1, got 0"),
                                  ("gemm_dtype", "fp4", "row 2: gemm_dtype is 'fp4'; known: bfloat16")):
        bad = [dict(r) for r in rows]
        bad[2][column] = value
        pd.DataFrame(bad).to_parquet(table)
        with pytest.raises(TraceError) as err:
            import_aiconfigurator(tmp_path, "h100-sxm")
        assert str(err.value).startswith(f"{table}: {needle}"), err.value


def test_validating_on_unseen_shapes_labels_them_held_out(tmp_path):
    """Rows of shapes the profile's own measurements do not contain are never reported under "fit"."""
    df = read_measurements(ROOT / "hardware_profiles" / "measurements" / "vidur-a100.csv.gz")
    llama = df[df["model"] == "meta-llama/Llama-2-7b-hf"]
    seen = pd.concat([llama[llama["op"] == "input_layernorm"].head(20), llama[llama["op"] == "attn_pre_proj"].head(5)])
    other = seen.assign(model="someone/else-7b")
    path = tmp_path / "mixed.csv"
    write_measurements(pd.concat([seen, other]), path)
    result = validate(profile_path("a100-80gb"), [path], tmp_path, "test")
    table = result.table.set_index(["split", "op"])
    assert table.loc[("held-out", "input_layernorm"), "rows"] == 20
    assert table.loc[("fit", "input_layernorm"), "rows"] == 20
    # Vidur's GEMMs: the GEMM curves were fitted on aiconfigurator's only, so even the seen model's are held out.
    assert table.loc[("held-out", "attn_pre_proj"), "rows"] == 10 and ("fit", "attn_pre_proj") not in table.index


def test_a_profile_written_elsewhere_records_its_measurements_from_its_own_folder(tmp_path, monkeypatch):
    """Relative paths on the command line, the profile written to another folder: it records the measurements as
    a path from its own folder, so validating it still tells the rows it was fitted on from held-out ones."""
    (tmp_path / "data").mkdir()
    measured = ROOT / "hardware_profiles" / "measurements" / "cpu-small.csv"
    (tmp_path / "data" / "m.csv").write_bytes(measured.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--device", "cpu", "--measurements", "data/m.csv", "--hold-out-model", "Llama-3-8B",
                 "--out", "profiles/p.yaml", "--report-dir", "reports"]) == 0
    calibration = load_profile(str(tmp_path / "profiles" / "p.yaml")).calibration
    assert calibration["measurements"] == ["../data/m.csv"]
    report = (tmp_path / "reports" / "p.md").read_text()
    assert "Produced by `llmsim validate --device profiles/p.yaml`" in report
    assert "| fit | attn_pre_proj |" in report and "| held-out | attn_pre_proj |" in report


def test_calibrate_refuses_a_hold_out_that_matches_nothing(tmp_path, capsys):
    assert main(["calibrate", "--device", "cpu", "--measurements",
                 str(ROOT / "hardware_profiles" / "measurements" / "cpu-small.csv"), "--hold-out-model", "Nope-1B",
                 "--out", str(tmp_path / "p.yaml"), "--report-dir", str(tmp_path)]) == 2
    assert "--hold-out-model 'Nope-1B' matches no measured row" in capsys.readouterr().err
    assert main(["calibrate", "--device", "cpu", "--measurements",
                 str(ROOT / "hardware_profiles" / "measurements" / "cpu-small.csv"), "--gemm-source", "aiconfig",
                 "--out", str(tmp_path / "p.yaml"), "--report-dir", str(tmp_path)]) == 2
    assert "--gemm-source 'aiconfig' matches no measured GEMM's source" in capsys.readouterr().err


def test_vidur_import_and_schema_round_trip(tmp_path):
    df = import_vidur(DATA / "vidur_sample", "a100", "a100_dgx")
    assert set(df["op"]) >= {"attn_pre_proj", "mlp_down_proj", "add", "all_reduce", "send_recv"}
    raw = pd.read_csv(DATA / "vidur_sample/compute/a100/meta-llama/Llama-2-7b-hf/mlp.csv")
    qkv = df[df.op == "attn_pre_proj"].reset_index(drop=True)
    assert list(qkv["median_ms"]) == list(raw["time_stats.attn_pre_proj.median"])
    assert list(qkv["num_tokens"]) == list(raw["num_tokens"])
    path = tmp_path / "m.csv"
    write_measurements(df, path)
    back = read_measurements(path)
    assert len(back) == len(df) and list(back["median_ms"]) == list(df["median_ms"])


def test_bad_measurement_row_names_file_and_line(tmp_path):
    df = compute_rows({"llama7": LLAMA_7B}).head(3)
    df.loc[1, "median_ms"] = -1.0
    path = tmp_path / "bad.csv"
    df.to_csv(path, index=False)
    with pytest.raises(TraceError, match=r"bad\.csv:3: median_ms must be a positive"):
        read_measurements(path)
    df = compute_rows({"llama7": LLAMA_7B}).head(2)
    df.loc[0, "op"] = "flash_attn"
    with pytest.raises(TraceError, match=r"x:2: unknown op 'flash_attn'; allowed: emb, "):
        check(df, "x")
    # A value that is no number (its whole column then reads as text) had been a ValueError traceback.
    for column, value in (("median_ms", "abc"), ("num_tokens", "x")):
        df = compute_rows({"llama7": LLAMA_7B}).head(3).astype({column: object})
        df.loc[2, column] = value
        df.to_csv(path, index=False)
        with pytest.raises(TraceError, match=rf"bad\.csv:4: column '{column}' is '{value}', expected a number"):
            read_measurements(path)


def test_measurement_values_the_prediction_cannot_use_name_file_line_and_column(tmp_path):
    """A dtype nobody models had been a KeyError deep in the prediction, 'abc' in gated read as not gated, an
    infinite shape an OverflowError, an infinite time a least-squares failure, and a fractional or zero count used
    as is."""
    path = tmp_path / "bad.csv"
    cases = [("dtype", "fp4", "column 'dtype' is 'fp4', expected one of fp32, fp16, bf16, fp8, int8, fp8_block"),
             ("kv_dtype", "True", "column 'kv_dtype' is 'True', expected one of"),
             ("gated", "abc", "column 'gated' is 'abc', expected true or false"),
             ("n_embd", float("inf"), "column 'n_embd' is inf, expected a finite number"),
             ("median_ms", float("inf"), "column 'median_ms' is inf, expected a finite number"),
             ("tp", 2.5, "op mlp_up_proj needs a whole 'tp' of at least 1, got 2.5"),
             # A zero count is no kernel: a GEMM of K 0 had been priced as no GEMM.
             ("num_tokens", 0, "op mlp_up_proj needs a whole 'num_tokens' of at least 1, got 0")]
    for column, value, needle in cases:
        df = compute_rows({"llama7": LLAMA_7B}).head(3).astype({column: object})
        df.loc[1, column] = value
        df.to_csv(path, index=False)
        with pytest.raises(TraceError) as err:
            read_measurements(path)
        assert str(err.value).startswith(f"{path}:3: ") and needle in str(err.value)


def test_calibrating_rows_of_a_dtype_the_profile_has_no_peak_for_is_an_error(tmp_path, capsys):
    path = tmp_path / "m.csv"
    compute_rows({"llama7": LLAMA_7B}).assign(dtype="fp16", device="cpu").to_csv(path, index=False)
    assert main(["calibrate", "--device", "cpu", "--measurements", str(path), "--out", str(tmp_path / "p.yaml"),
                 "--report-dir", str(tmp_path)]) == 2  # it had been scipy's "Residuals are not finite"
    assert ("cpu: the measurements to fit have rows of dtype fp16, for which the profile has no peak_flops (it has "
            "fp32, bf16)") in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_calibrating_an_op_on_fewer_rows_than_its_parameters_is_an_error(tmp_path, capsys):
    """Least squares had 'fitted' every parameter of an op measured at two shapes and written them into the
    profile."""
    path = tmp_path / "m.csv"
    compute_rows({"llama7": LLAMA_7B}, ops=("mlp_up_proj",)).assign(dtype="fp32", device="cpu").head(2).to_csv(
        path, index=False)
    assert main(["calibrate", "--device", "cpu", "--measurements", str(path), "--out", str(tmp_path / "p.yaml"),
                 "--report-dir", str(tmp_path)]) == 2
    assert "linear: 2 measured rows to fit" in capsys.readouterr().err
    assert not (tmp_path / "p.yaml").exists()


def test_validate_cli(tmp_path, capsys):
    assert main(["validate", "--device", "a100-80", "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "held-out" in out and "mlp_up_proj" in out
    assert (tmp_path / "a100-80gb.md").read_text().count("| held-out |") >= 10
    assert main(["validate", "--device", "tpu-v9"]) == 2
    assert "allowed: a100-40gb, a100-80gb" in capsys.readouterr().err
    assert main(["validate", "--device", "a100"]) == 2  # two profiles start so: never pick one silently
    assert "'a100' matches a100-40gb, a100-80gb; name one" in capsys.readouterr().err


def test_validating_a_copied_profile_leaves_the_shipped_report_alone(tmp_path):
    shipped = ROOT / "hardware_profiles" / "validation" / "a100-80gb.md"
    before = shipped.read_bytes()
    copy = tmp_path / "my-a100.yaml"
    copy.write_text((ROOT / "hardware_profiles" / "a100-80gb.yaml").read_text())  # keeps name: a100-80gb
    sample = tmp_path / "sample.csv"
    df = read_measurements(ROOT / "hardware_profiles" / "measurements" / "vidur-a100.csv.gz")
    write_measurements(df[df["op"] == "mlp_up_proj"].head(30), sample)
    assert main(["validate", "--device", str(copy), "--measurements", str(sample)]) == 0
    assert (tmp_path / "validation" / "my-a100.md").exists()
    assert shipped.read_bytes() == before
    # The copy cannot reach the measurements it was fitted on: every row is reported as unseen.
    assert "| held-out | mlp_up_proj | 30 |" in (tmp_path / "validation" / "my-a100.md").read_text()


def test_tiled_gemm_fit_recovers_shape_terms_and_keeps_to_its_source():
    """Bare GEMMs over M x K x N from a known tiled curve (2% noise) are fitted back; layer GEMMs of another source,
    five times slower, are left out by ``gemm_source`` (and would move the fit otherwise)."""
    profile = load_profile("h100-sxm")
    truth = OpEfficiency(compute=ComputeEfficiency(max_eff=0.85, half_tokens=20.0, half_k=150.0, half_tiles=4.0),
                         memory_eff=0.9, overhead_s=3e-6, k_latency_s=0.4e-9, softness=3.0)
    profile = profile.model_copy(update={"efficiency": {**profile.efficiency, "linear": truth}})
    sizes = (512, 1024, 2048, 4096, 8192, 16384)
    grid = [{"device": "synthetic", "op": "gemm", "dtype": "bf16", "num_tokens": m, "gemm_k": k, "gemm_n": n,
             "median_ms": 1.0, "source": "aiconfigurator gemm"}
            for m in (1, 4, 16, 64, 128, 256, 512, 1024, 4096, 8192) for k in sizes for n in sizes]
    layers = compute_rows({"llama7": LLAMA_7B}).assign(source="vidur:compute")
    df = pd.concat([normalize(pd.DataFrame(grid)), layers], ignore_index=True)
    rows = Rows(df)
    rng = np.random.default_rng(1)
    df["median_ms"] = predict_s(profile, rows) * 1e3 * rng.lognormal(0.0, 0.02, len(df))
    df.loc[df["source"] == "vidur:compute", "median_ms"] *= 5.0
    rows = Rows(df)
    start = profile.model_copy(update={"efficiency": {**profile.efficiency, "linear": load_profile("cpu").efficiency[
        "linear"]}})
    got = calibrate(start, rows, Split(gemm_source="aiconfigurator")).efficiency["linear"]
    assert got.compute.max_eff == pytest.approx(0.85, rel=0.05)
    assert got.compute.half_k == pytest.approx(150.0, rel=0.25)
    assert got.memory_eff == pytest.approx(0.9, rel=0.05)
    fitted = start.model_copy(update={"efficiency": {**start.efficiency, "linear": got}})
    bare = (df["op"] == "gemm").to_numpy()
    truth_s = predict_s(profile, rows)[bare]
    clean_error = np.median(np.abs(predict_s(fitted, rows)[bare] / truth_s - 1))
    assert clean_error < 0.01
    mixed = calibrate(start, rows, Split()).efficiency["linear"]
    mixed_profile = start.model_copy(update={"efficiency": {**start.efficiency, "linear": mixed}})
    assert np.median(np.abs(predict_s(mixed_profile, rows)[bare] / truth_s - 1)) > 3 * clean_error


def test_mi325x_follows_its_public_measurements():
    """The MI325X profile from public numbers (README): its all-reduce is the alpha-beta fit of AMD's published
    8-GPU RCCL all-reduce times (HIP graphs; MI300X, the same xGMI fabric), within 17% over 8 B - 16 GB; its GEMM
    curves give AMD's published Max-Achievable FLOPs at the benchmark's shapes (BF16 843, FP8 1519 TFLOPS)."""
    from llmsim.calibration.fit import fit_link
    from llmsim.calibration.predict import link_s
    from llmsim.hardware.roofline import op_time_s

    profile = load_profile("mi325x")
    rows = Rows(read_measurements(ROOT / "hardware_profiles" / "measurements" / "public-mi300x-rccl-allreduce.csv"))
    assert len(rows) == 32 and set(rows.kind) == {"all_reduce"}
    assert fit_link(rows, np.ones(len(rows), dtype=bool), "all_reduce") == profile.all_reduce
    link = profile.all_reduce
    err = link_s("all_reduce", rows.size_bytes, rows.num_workers, link.latency_s, link.bandwidth_bytes_per_s) \
        / rows.measured_s - 1
    assert np.abs(err).mean() <= 0.17
    for kind, dtype, n, maf in (("linear", "bf16", 4864, 843e12), ("linear_fp8", "fp8", 3648, 1519e12)):
        m, k = 4096, 32896
        flops = 2.0 * m * n * k
        t = op_time_s(profile.efficiency[kind], profile.peak(dtype), profile.memory_bandwidth_bytes_per_s, flops,
                      (m * k + k * n + m * n) * (1 if dtype == "fp8" else 2), m)
        assert abs(flops / t / maf - 1) <= 0.01, (kind, flops / t)


def test_a100_40gb_carries_the_80gb_fit():
    """Same GA100 chip: the 40 GB profile copies the 80 GB one's efficiencies, collectives and SM count (its
    sources say so), so a refit of the 80 GB part must be copied over."""
    a40, a80 = load_profile("a100-40gb"), load_profile("a100-80gb")
    assert a40.efficiency == {k: v for k, v in a80.efficiency.items() if k in a40.efficiency}
    links = ("all_reduce", "send_recv", "all_reduce_inter_node", "send_recv_inter_node", "all_gather",
             "all_reduce_custom", "custom_all_reduce_max_bytes", "num_sms", "l2_cache_bytes")
    differ = [k for k in links if getattr(a40, k) != getattr(a80, k)]
    assert not differ, differ


def test_t4_memory_bound_kernels_carry_the_a100_fit_scaled_by_the_measured_copy_bandwidth():
    """No T4 kernel data here: its memory-bound kernels take the A100-80GB fit's memory efficiencies scaled by the
    two GPUs' measured device-to-device copy fractions (bandwidthTest: T4 239.6 of 320 GB/s, A100 1,157.5 of 1,555;
    the T4 profile's sources), so a refit of the A100 must be carried over."""
    t4, a100 = load_profile("t4"), load_profile("a100-80gb")
    ratio = (239.6 / 320) / (1157.5 / 1555)
    for kind in ("linear", "norm", "embedding", "rope", "activation", "residual"):
        assert t4.efficiency[kind].memory_eff == round(min(1.0, a100.efficiency[kind].memory_eff * ratio), 3), kind
    assert "bandwidthTest" in t4.sources["efficiency"]


def test_a_profile_on_a_base_takes_its_fields_but_not_its_calibration(tmp_path):
    """``base:`` takes the named profile's fields, the file's own merged over them key by key (a ``power`` or
    ``sources`` entry replaces only itself), and leaves out what the base was fitted and validated on."""
    path = tmp_path / "my-h100.yaml"
    path.write_text("base: h100-sxm\nname: my-h100\nmemory_bytes: 1.0e11\npower: {idle_w: 100.0}\n"
                    "sources: {memory: measured here}\n")
    mine, h100 = load_profile(str(path)), load_profile("h100-sxm")
    assert (mine.name, mine.memory_bytes, mine.power.idle_w) == ("my-h100", 1.0e11, 100.0)
    assert mine.power.max_w == h100.power.max_w and mine.efficiency == h100.efficiency
    assert mine.prefill_attention == h100.prefill_attention and mine.all_reduce == h100.all_reduce
    assert mine.sources["memory"] == "measured here" and mine.sources["l2_cache"] == h100.sources["l2_cache"]
    assert h100.calibration and h100.validation and not mine.calibration and not mine.validation


def test_h200_is_the_h100_fit_with_the_h200_memory_and_the_suite_on_both_gpus_agrees():
    """Same GH100 chip: the H200 profile carries every fit of the H100 one and changes only its memory. The
    microbenchmark suite's runs on both GPUs (shipped measurements) check what that implies: compute-bound GEMMs
    take the same time on both, memory-bound ones the bandwidth ratio (with fixed costs, a little more)."""
    h200, h100 = load_profile("h200"), load_profile("h100-sxm")
    same = ("efficiency", "peak_flops", "num_sms", "all_reduce", "send_recv", "all_reduce_inter_node",
            "send_recv_inter_node", "all_gather", "all_reduce_custom", "custom_all_reduce_max_bytes",
            "prefill_attention", "decode_attention", "prefill_attention_8bit_kv", "decode_attention_8bit_kv",
            "fused_moe_tuned", "attention_model", "gemm_model", "intra_node", "inter_node")
    differ = [k for k in same if getattr(h200, k) != getattr(h100, k)]
    assert not differ, differ
    assert h200.memory_bandwidth_bytes_per_s > h100.memory_bandwidth_bytes_per_s
    assert h200.memory_bytes > h100.memory_bytes
    measured, predicted = {}, {}
    for name, profile in (("h100", h100), ("h200", h200)):
        rows = Rows(read_measurements(ROOT / "hardware_profiles" / "measurements" / f"llmsim-microbench-{name}.csv.gz"),
                    profile)
        # bf16 only: the H100 file has the suite's FP8 GEMMs too (the H200 run predates them).
        keep = (rows.df["op"].isin(["gemm", "attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj",
                                    "lm_head"]) & (rows.df["dtype"] == "bf16")).to_numpy()
        df = rows.df[keep]
        key = pd.MultiIndex.from_arrays([df[c].to_numpy() for c in ("op", "model", "tp", "num_tokens", "gemm_n",
                                                                       "gemm_k")])
        measured[name] = pd.Series(rows.measured_s[keep], index=key)
        predicted[name] = pd.Series(predict_s(profile, rows)[keep], index=key)
    assert measured["h100"].index.equals(measured["h200"].index)  # the same grid, in the same order
    tokens = measured["h100"].index.get_level_values(3).to_numpy(dtype=float)
    for band, (low, high) in {"memory-bound": (1, 128), "compute-bound": (1025, 8192)}.items():
        rows_in = (tokens >= low) & (tokens <= high)
        ratio_measured = float(np.median(measured["h200"][rows_in] / measured["h100"][rows_in]))
        ratio_predicted = float(np.median(predicted["h200"][rows_in] / predicted["h100"][rows_in]))
        assert abs(ratio_predicted - ratio_measured) < (0.1 if band == "memory-bound" else 0.03), (
            band, ratio_predicted, ratio_measured)


def test_collective_table_reports_per_gpu_count_and_nccl_at_the_sizes_it_gets():
    comparison = pd.DataFrame({
        "op": ["all_reduce", "all_reduce", "all_reduce", "all_reduce (vLLM custom)", "gemm"],
        "split": ["fit", "fit", "held-out", "fit", "fit"],
        "num_workers": [2.0, 2.0, 8.0, 2.0, np.nan], "size_bytes": [1024.0, 16 * 2**20, 32 * 2**20, 1024.0, np.nan],
        "rel_error": [0.5, -0.1, 0.2, 0.03, 0.4]})
    table = collective_table(comparison, 8 * 2**20).set_index(["split", "op", "gpus"])
    assert table.loc[("fit", "all_reduce", 2), "mape"] == pytest.approx(0.3)  # every size
    assert table.loc[("fit", "all_reduce", 2), "mape_engine_sizes"] == pytest.approx(0.1)  # only >= 8 MiB
    assert table.loc[("held-out", "all_reduce", 8), "mape_engine_sizes"] == pytest.approx(0.2)
    assert np.isnan(table.loc[("fit", "all_reduce (vLLM custom)", 2), "mape_engine_sizes"])
    assert "gemm" not in set(table.reset_index()["op"])


def test_the_report_gives_each_fused_moe_shape_and_tp_its_own_error():
    """A model's expert shape may sit badly on a curve whose MAPE over every shape looks fine (Qwen3-235B-A22B's
    on H100's tuned curve: 19% at TP 2 where the curve is at 10%): the report lists each shape and TP degree."""
    comparison = pd.DataFrame({
        "op": ["moe", "moe", "moe", "moe (fp8)", "gemm"], "split": ["fit", "fit", "fit", "held-out", "fit"],
        "model": ["moe h4096 i1536 e128 k8"] * 2 + ["moe h2048 i768 e128 k8", "moe h4096 i14336 e8 k2", "x"],
        "tp": [2.0, 2.0, 1.0, 8.0, 1.0], "rel_error": [-0.3, -0.1, 0.05, 0.02, 0.4]})
    table = moe_table(comparison).set_index(["split", "op", "model", "tp"])
    shard = table.loc[("fit", "moe", "moe h4096 i1536 e128 k8", 2)]
    assert (shard["rows"], shard["mape"], shard["bias"]) == (2, pytest.approx(0.2), pytest.approx(-0.2))
    assert len(table) == 3  # the GEMM row is no fused MoE
    errors = pd.DataFrame({"split": ["fit"], "op": ["moe"], "rows": [3], "mape": [0.15], "p90": [0.3], "max": [0.3],
                           "bias": [-0.1]})
    text = markdown(load_profile("h100-sxm"), errors, "m.csv", Split(), "p.png", "llmsim validate", None,
                    moe_table(comparison))
    assert "| fit | moe | h4096 i1536 e128 k8 | 2 | 2 | 20.0% | -20.0% |" in text


def test_a_profile_without_tuned_moe_shapes_fits_one_moe_curve_over_every_shape():
    """The microbenchmark suite's fused-MoE rows (torch's grouped GEMM: one kernel configuration for every shape)
    recalibrate a profile that lists no vLLM-tuned MoE shapes: the simulator then runs every shape on the ``moe``
    curve, and the fit fits that curve on them (before, such rows were only validated, so a GPU other than the
    H100 could not get a MoE curve from its own measurements). Held out: one whole expert shape."""
    h100 = load_profile("h100-sxm")
    bare = h100.model_copy(update={"fused_moe_tuned": {}, "efficiency": {
        k: v for k, v in h100.efficiency.items() if not k.startswith("moe")}})
    df = read_measurements(ROOT / "hardware_profiles" / "measurements" / "llmsim-microbench-h100.csv.gz")
    rows = Rows(df[df["op"] == "moe"].reset_index(drop=True), bare)
    assert set(rows.kind) == {"moe"}  # no list: every shape on the one curve
    held = "moe h6144 i2560 e160 k8"
    fitted = calibrate(bare, rows, Split(held_out_models=(held,)))
    assert "moe" in fitted.efficiency and "moe_untuned" not in fitted.efficiency
    error = predict_s(fitted, rows) / rows.measured_s - 1
    is_held = (rows.df["model"] == held).to_numpy()
    assert np.mean(np.abs(error[~is_held])) < 0.08 and np.mean(np.abs(error[is_held])) < 0.12


def test_fp8_gemms_price_the_quantization_a_served_engine_runs():
    """aiconfigurator's FP8 GEMM rows quantized their input in unfused torch ops (27 bytes per element per-tensor,
    25 per 128-group), a served engine in one fused pass (5 and 3): the fit takes the collector's passes out
    through the curve's quantization term, and the H100 profile then prices this project's own FP8 GEMMs (vLLM's
    quantization kernels, then the FP8 GEMM) within 10% (53% when the collector's passes were priced in; README).
    The per-input-element shape term that had absorbed them is gone."""
    h100 = load_profile("h100-sxm")
    measured = ROOT / "hardware_profiles" / "measurements"
    aic = read_measurements(measured / "aiconfigurator-h100.csv.gz")
    aic = aic[(aic["op"] == "gemm") & (aic["num_tokens"] == 64) & (aic["gemm_k"] == 4096)].reset_index(drop=True)
    suite = read_measurements(measured / "llmsim-microbench-h100.csv.gz")
    suite = suite[suite["op"] == "gemm"].reset_index(drop=True)
    rows = Rows(aic, h100)
    expected = {"bf16": 0.0, "fp8": 64 * 4096 * 27.0, "fp8_block": 64 * 4096 * 25.0}
    assert list(rows.quant_bytes) == [expected[d] for d in aic["dtype"]]
    rows = Rows(suite, h100)
    m, k = suite["num_tokens"].to_numpy(), suite["gemm_k"].to_numpy()
    served = suite["dtype"].map({"bf16": 0.0, "fp8": 5.0, "fp8_block": 3.0}).to_numpy()
    assert np.array_equal(rows.quant_bytes, m * k * served)
    for kind in ("linear_fp8", "linear_fp8_block"):
        curve = h100.efficiency[kind]
        assert 0.3 < curve.quant_memory_eff <= 1.0 and curve.compute.half_n == 0.0
    err = predict_s(h100, rows) / rows.measured_s - 1
    fp8 = (suite["dtype"] == "fp8").to_numpy()
    assert fp8.sum() == 132 and np.abs(err[fp8]).mean() <= 0.10
