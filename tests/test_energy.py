import pytest

from llmsim.energy import _operating_points, power_model
from llmsim.hardware.profile import load_profile
from llmsim.run import run_experiment
from tests.factories import make_config


@pytest.mark.parametrize("device", ["a100-80gb", "h100-sxm"])
def test_power_model_reproduces_splitwise_operating_points(device):
    profile = load_profile(device)
    pm = power_model(profile, 1.0, 1.0, 1)
    (mfu_p, mbu_p), (mfu_d, mbu_d) = _operating_points(profile)
    # power_w takes FLOPs and bytes; with unit peak, bandwidth and duration those are MFU and MBU.
    assert pm.power_w(1.0, mfu_p, mbu_p) == pytest.approx(profile.power.max_w, rel=1e-9)
    assert pm.power_w(1.0, mfu_d, mbu_d) == pytest.approx(profile.power.decode_w, rel=1e-9)
    assert pm.power_w(1.0, 0.0, 0.0) == profile.power.idle_w
    assert pm.power_w(1.0, 10.0, 10.0) == profile.power.max_w  # capped


def _run(rate: float, pue: float = 1.0):
    cfg = make_config(energy={"pue": pue},
                      workload={"num_requests": 150, "arrival": {"kind": "poisson", "rate_per_s": rate},
                                "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                                "output_tokens": {"kind": "uniform", "min": 1, "max": 300}})
    return run_experiment(cfg, write=False)


def test_energy_adds_up():
    result, summary = _run(10.0)
    e, rec = summary["energy"], result.recorder
    it = rec.iteration_frame()
    gpus = result.execution.plan.num_gpus
    assert (it["power_w"] >= 63.0).all() and (it["power_w"] <= 400.0).all()
    assert e["busy_j"] == pytest.approx((it["power_w"] * it["duration_s"] * gpus).sum(), rel=1e-9)
    span = summary["throughput"]["duration_s"]
    idle_s = span * 2 * gpus - it["duration_s"].sum() * gpus
    assert e["idle_j"] == pytest.approx(63.0 * idle_s, rel=1e-9)
    assert e["total_j"] == pytest.approx(e["busy_j"] + e["idle_j"])
    out_tokens = summary["throughput"]["output_tokens_per_s"] * span
    assert e["j_per_output_token"] == pytest.approx(e["total_j"] / out_tokens, rel=1e-6)


def test_idle_cluster_draws_idle_power_and_pue_scales():
    _, quiet = _run(0.2)
    _, busy = _run(20.0)
    assert 63.0 < quiet["energy"]["mean_power_w_per_gpu"] < busy["energy"]["mean_power_w_per_gpu"]
    # Mostly idle: the mean lies between idle power and idle plus the busy share of the full range.
    busy_share = quiet["utilization"]["busy_fraction"]
    assert busy_share < 0.3
    assert quiet["energy"]["mean_power_w_per_gpu"] <= 63.0 + busy_share * (400.0 - 63.0)
    _, with_pue = _run(0.2, pue=1.5)
    assert with_pue["energy"]["total_j"] == pytest.approx(1.5 * quiet["energy"]["total_j"], rel=1e-12)


@pytest.mark.parametrize("timeout_s, max_time_s", [(1.5, None), (0.05, None), (None, 3.0)])
def test_the_hardware_is_observed_until_its_last_step_not_the_last_finish(timeout_s, max_time_s):
    """Steps that ran for requests that timed out, or were still running at a cut-off, end after the last finish.
    Over the span to the last finish the busy fraction, MFU and MBU had come out above 1 (about 1e12 with no
    request finished) and the idle energy short; they are over the time to the last step's end, while
    throughput keeps the span to the last finish (vLLM's benchmark duration)."""
    cfg = make_config(cluster={"num_replicas": 1},
                      workload={"num_requests": 150, "arrival": {"kind": "poisson", "rate_per_s": 40.0},
                                "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                                "output_tokens": {"kind": "uniform", "min": 1, "max": 300}},
                      simulation={"client_timeout_s": timeout_s, "max_time_s": max_time_s})
    result, summary = run_experiment(cfg, write=False)
    it = result.recorder.iteration_frame()
    last_step_end = (it["start_s"] + it["duration_s"]).max()
    df = result.recorder.request_frame()
    finished = df[df["status"] == "finished"]
    start = df["arrival_s"].min()
    assert last_step_end > (finished["finish_s"].max() if len(finished) else start)  # the case in question
    u, e = summary["utilization"], summary["energy"]
    assert u["busy_fraction"] == pytest.approx(it["duration_s"].sum() / (last_step_end - start), rel=1e-9)
    assert 0 < u["busy_fraction"] <= 1 and 0 < u["mfu"] <= 1 and 0 < u["mbu"] <= 1
    gpus = result.execution.plan.num_gpus
    idle_s = (last_step_end - start - it["duration_s"].sum()) * gpus
    assert e["idle_j"] == pytest.approx(63.0 * idle_s, rel=1e-9)
    assert 63.0 <= e["mean_power_w_per_gpu"] <= 400.0
    if len(finished):
        assert summary["throughput"]["duration_s"] == finished["finish_s"].max() - start
