"""The engine's CPU time per step: its fit to Vidur's measurements, how a step combines it with the GPU time, and
what it does to a synchronous engine's latency."""

import pandas as pd
import pytest
import yaml

from llmsim.calibration.cpu_overhead import calibrate_cpu, fit_cpu_overhead, predict_ms, read_vidur_cpu
from llmsim.cli import main
from llmsim.cluster.simulation import simulate
from llmsim.errors import ConfigError
from llmsim.execution.cpu_overhead import CPU_PROFILES_DIR, CpuOverhead, CpuOverheadParams, load_cpu_profile
from llmsim.execution.model import ExecutionModel, ParallelPlan
from llmsim.hardware.profile import load_profile
from llmsim.models import load_model
from tests.factories import make_config, make_requests

MEASURED = CPU_PROFILES_DIR.parent / "measurements"
A100_CSV, A40_CSV = MEASURED / "vidur-cpu-overheads-a100.csv", MEASURED / "vidur-cpu-overheads-a40.csv"
PARAMS = CpuOverheadParams(per_step_ms=2.0, per_request_ms=0.02, per_request_per_1k_context_ms=0.005,
                           per_sampled_token_ms=0.1, per_sampled_token_per_1k_context_ms=0.01,
                           multi_gpu_per_step_ms=1.5, multi_gpu_per_request_ms=0.1)


def test_terms_by_hand():
    one = CpuOverhead.of(PARAMS, max_model_len=4000, tp=1)
    assert one.step_s(10, 4) == pytest.approx((2.0 + 10 * (0.02 + 4 * 0.005) + 4 * (0.1 + 4 * 0.01)) / 1e3)
    two = CpuOverhead.of(PARAMS, max_model_len=4000, tp=2)
    assert two.step_s(10, 4) - one.step_s(10, 4) == pytest.approx((1.5 + 10 * 0.1) / 1e3)
    # outside the measured contexts the per-1k-context terms are held at the range's ends, not extrapolated
    ranged = PARAMS.model_copy(update={"context_range_tokens": (4000, 16000)})
    assert CpuOverhead.of(ranged, 128_000, 1) == CpuOverhead.of(PARAMS, 16_000, 1)
    assert CpuOverhead.of(ranged, 2_000, 1) == CpuOverhead.of(PARAMS, 4_000, 1)


def test_fit_recovers_known_parameters():
    """Rows generated from known terms (no noise) give them back."""
    rows = []
    for model, context in (("a", 4096), ("b", 16384)):
        for tp in (1, 2, 4):
            for batch in (8, 24, 40, 64):
                k = context / 1000
                rows.append({"model": model, "batch": float(batch), "tp": tp, "max_model_len": float(context),
                             "prepare_ms": 0.3 + batch * (0.02 + 0.005 * k),
                             "sample_ms": 1.7 + batch * (0.1 + 0.01 * k),
                             "rest_ms": 0.0 + (tp > 1) * (1.5 + 0.1 * batch)})
    fitted = fit_cpu_overhead(pd.DataFrame(rows))
    assert fitted.context_range_tokens == (4096, 16384)
    for key, value in PARAMS.model_dump(exclude={"context_range_tokens"}).items():
        assert getattr(fitted, key) == pytest.approx(value, abs=1e-9), key


def test_shipped_profile_is_the_fit_and_meets_its_errors():
    """hardware_profiles/cpu_overhead/vllm_v0.yaml is what `llmsim calibrate-cpu` writes from the shipped
    measurements (as recalibrate.sh runs it); its held-out model and the fit stay within 10% on average."""
    shipped = yaml.safe_load((CPU_PROFILES_DIR / "vllm_v0.yaml").read_text())
    doc, table = calibrate_cpu(A100_CSV, shipped["held_out_models"], [A40_CSV], "vllm_v0", shipped["source"])
    assert doc["params"] == shipped["params"] and doc["errors"] == shipped["errors"]
    assert doc["errors"]["fit"]["mean_abs_pct"] < 10
    assert doc["errors"]["held-out model"]["mean_abs_pct"] < 10
    assert set(table["split"]) == {"fit", "held-out model", "other host (vidur-cpu-overheads-a40.csv)"}


def test_held_out_model_does_not_move_the_fit():
    rows = read_vidur_cpu(A100_CSV)
    kept = rows[rows["model"] != "meta-llama/Llama-2-70b-hf"]
    doc, _ = calibrate_cpu(A100_CSV, ["meta-llama/Llama-2-70b-hf"], [], "x", "")
    refit = fit_cpu_overhead(kept).model_dump()
    assert doc["params"] == {k: list(v) if k == "context_range_tokens" else round(float(v), 6)
                             for k, v in refit.items()}
    # and the prediction follows the batch: bigger steps cost more CPU
    pred = predict_ms(load_cpu_profile("vllm_v0"), kept)
    assert (pred[kept["batch"].to_numpy() == 64] > pred[kept["batch"].to_numpy() == 8].max()).all()


def test_calibrate_cpu_cli_and_its_errors(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["calibrate-cpu", "--measurements", str(A100_CSV), "--hold-out-model", "meta-llama/Llama-2-70b-hf",
                 "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["errors"]["held-out model"]["mean_abs_pct"] < 10
    assert main(["calibrate-cpu", "--measurements", str(A100_CSV), "--hold-out-model", "nope",
                 "--out", str(out)]) != 0
    assert "--hold-out-model nope has no rows" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("model_name,batch_size\nx,1\n")
    assert main(["calibrate-cpu", "--measurements", str(bad), "--out", str(out)]) != 0
    assert "missing Vidur columns" in capsys.readouterr().err
    bad.write_text("")  # had been pandas' EmptyDataError traceback
    assert main(["calibrate-cpu", "--measurements", str(bad), "--out", str(out)]) == 2
    assert "bad.csv: not a Vidur cpu_overheads.csv: No columns to parse from file" in capsys.readouterr().err
    lines = A100_CSV.read_text().splitlines()
    cells = lines[-1].split(",")
    cells[lines[0].split(",").index("SAMPLER_E2E_MEAN")] = "abc"  # had been a TypeError traceback
    bad.write_text("\n".join(lines[:-1] + [",".join(cells)]) + "\n")
    assert main(["calibrate-cpu", "--measurements", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"bad.csv:{len(lines)}: column 'SAMPLER_E2E_MEAN' is 'abc', expected a number >= 0" in err
    assert "Traceback" not in err
    # Rows that cannot tell the terms apart had been "fitted" all the same (least squares' minimum norm).
    df = pd.read_csv(A100_CSV)
    for rows, needs in ((df.head(1), "of models of at least two context lengths"),
                        (df[df["tensor_parallel_degree"] == 1], "at TP 1 and at TP 2 or more"),
                        (df.head(0), "no rows to fit")):
        rows.to_csv(bad, index=False)
        assert main(["calibrate-cpu", "--measurements", str(bad), "--out", str(out)]) == 2
        assert needs in capsys.readouterr().err


def _models(overlaps: bool):
    model, hw = load_model("Llama-2-7B"), load_profile("h100-sxm")
    cpu = CpuOverhead.of(load_cpu_profile("vllm_v0"), 4096, 1)
    return (ExecutionModel(model, hw, ParallelPlan()), ExecutionModel(model, hw, ParallelPlan(), cpu, overlaps),
            cpu)


def test_a_synchronous_step_adds_the_cpu_time_and_an_async_one_overlaps_it():
    gpu, sync, cpu = _models(False)
    _, overlapped, _ = _models(True)
    mixed = (((2000, 0), (300, 100)), 40, 40 * 1500, 41)
    small, wide = ((), 2, 2 * 100, 2), ((), 128, 128 * 300, 128)
    for batch in (mixed, small, wide):
        g = gpu.iteration(*batch).time_s
        c = cpu.step_s(len(batch[0]) + batch[1], batch[3])
        assert sync.iteration(*batch).time_s == g + c
        assert overlapped.iteration(*batch).time_s == max(g, c)
        assert sync.iteration(*batch, with_cpu=False).time_s == g
    # vLLM v0's CPU work for a 7B model on an H100: shorter than a 2-request decode step, longer than a 128-request
    # one (so both sides of the overlap are exercised)
    assert cpu.step_s(2, 2) < gpu.iteration(*small).time_s
    assert cpu.step_s(128, 128) > gpu.iteration(*wide).time_s


@pytest.mark.parametrize("overlaps", [False, True])
def test_decode_runs_are_bit_identical_to_steps_with_cpu_time(overlaps):
    _, ex, _ = _models(overlaps)
    for num_decode in (1, 3, 64):
        times, flops, num_bytes = ex.decode_run(num_decode, num_decode * 50, 40)
        for j in range(40):
            cost = ex.decode_iteration(num_decode, num_decode * (50 + j))
            assert (times[j], flops[j], num_bytes[j]) == tuple(cost)


def test_vllm_v0_cpu_time_slows_a_synchronous_engine():
    """fcfs (vLLM v0) pays its CPU time between steps by default; 'off' leaves the GPU alone. A token gap grows
    by about one step's CPU time; vllm_v1 (no CPU profile by default) is unchanged by the knob's default."""
    def tpot(scheduler):
        cfg = make_config(cluster={"num_replicas": 1}, scheduler=scheduler)
        df = simulate(cfg, make_requests([(0.1 * i, 200, 100) for i in range(8)])).recorder.request_frame()
        return ((df["finish_s"] - df["first_token_s"]) / (df["num_generated_tokens"] - 1)).mean()

    with_cpu, without = tpot({"name": "fcfs"}), tpot({"name": "fcfs", "cpu_overhead": "off"})
    per_step = CpuOverhead.of(load_cpu_profile("vllm_v0"), 4096, 1)
    assert per_step.step_s(1, 1) < with_cpu - without < per_step.step_s(8, 8) + 1e-4
    assert tpot({"name": "vllm_v1"}) == tpot({"name": "vllm_v1", "cpu_overhead": "off"})


@pytest.mark.parametrize("value, message", [
    ("nope", "scheduler.cpu_overhead: Value error, unknown CPU overhead profile 'nope'; allowed: 'off', 'vllm_v0'"),
    ({"per_step_ms": -1}, "scheduler.cpu_overhead.per_step_ms: Input should be greater than or equal to 0"),
    ({"per_stp_ms": 1}, "scheduler.cpu_overhead.per_stp_ms: Extra inputs are not permitted"),
])
def test_bad_cpu_overhead_is_one_clear_error(value, message):
    with pytest.raises(ConfigError) as err:
        make_config(scheduler={"name": "fcfs", "cpu_overhead": value})
    assert message in str(err.value)
