"""Every bad input is one clear error (exit code 2, no traceback), found before the simulation runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsim.cli import main
from llmsim.config import parse_config
from llmsim.errors import ConfigError, LLMSimError
from llmsim.models import load_model
from llmsim.run import run_experiment

BASE = {"model": {"name": "Llama-2-7B"}, "cluster": {"num_replicas": 1},
        "workload": {"num_requests": 12, "arrival": {"kind": "poisson", "rate_per_s": 5},
                     "prompt_tokens": {"kind": "fixed", "value": 100}, "output_tokens": {"kind": "fixed", "value": 8}}}
ROOT = Path(__file__).resolve().parents[1]
HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def _experiment(tmp_path: Path, **changes) -> Path:
    data = json.loads(json.dumps(BASE))
    data.update(changes)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _trace(tmp_path: Path, rows: str, **trace) -> Path:
    (tmp_path / "t.csv").write_text(HEADER + rows)
    return _experiment(tmp_path, workload={"trace": {"path": str(tmp_path / "t.csv"), "format": "burstgpt", **trace}})


def _hf(tmp_path: Path, **fields) -> Path:
    (tmp_path / "hf").mkdir()
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "vocab_size": 32000,
              "intermediate_size": 11008, **fields}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    return _experiment(tmp_path, model={"name": str(tmp_path / "hf")})


def _profile(tmp_path: Path, text) -> Path:
    p = tmp_path / "p.yaml"
    p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return _experiment(tmp_path, hardware={"device": str(p)})


def _profile_changed(tmp_path: Path, where: tuple, value) -> Path:
    """The shipped T4 profile (roofline attention) with one value changed."""
    profile = yaml.safe_load((ROOT / "hardware_profiles" / "t4.yaml").read_text())
    leaf = profile
    for key in where[:-1]:
        leaf = leaf[key]
    leaf[where[-1]] = value
    return _profile(tmp_path, yaml.safe_dump(profile))


def _raw(tmp_path: Path, content) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    return p


def _binary_trace(tmp_path: Path) -> Path:
    (tmp_path / "t.csv").write_bytes(bytes(range(256)) * 4)
    return _experiment(tmp_path, workload={"trace": {"path": str(tmp_path / "t.csv"), "format": "burstgpt"}})


def _output_is_a_file(tmp_path: Path) -> Path:
    (tmp_path / "f").write_text("x")
    return _experiment(tmp_path, output_dir=str(tmp_path / "f"))


def _dist(**d):
    return lambda tmp: _experiment(tmp, workload={**BASE["workload"], "prompt_tokens": d})


CASES = {
    "top level is a list": (lambda tmp: _raw(tmp, "- 1\n- 2\n"), "expected a mapping at the top level"),
    "top level is binary": (lambda tmp: _raw(tmp, bytes(range(256))), "not a text YAML file"),
    "YAML syntax": (lambda tmp: _raw(tmp, "model: [1, 2\n"), "exp.yaml:2 is not valid YAML"),
    # YAML itself keeps the last of two equal keys: the first section was dropped without a word.
    "a key written twice": (lambda tmp: _raw(tmp, yaml.safe_dump(BASE) + "cluster: {num_replicas: 2}\n"),
                            "is not valid YAML: the key 'cluster' is written twice"),
    "a profile key written twice": (lambda tmp: _profile(tmp, "name: x\nname: y\n"),
                                    "p.yaml:2 is not valid YAML: the key 'name' is written twice"),
    "a sweep file run as an experiment": (lambda tmp: _raw(tmp, "base: b.yaml\ngrid: {seed: [1]}\n"),
                                          "a sweep file (it has a base experiment), not an experiment; run it with "
                                          "llmsim sweep"),
    "a plan file run as an experiment": (lambda tmp: _raw(tmp, "base: b.yaml\ngpus: 1\ncandidates: {seed: [1]}\n"),
                                         "run it with llmsim plan"),
    "header-only trace": (lambda tmp: _trace(tmp, ""), "no requests to simulate"),
    "filter matches nothing": (lambda tmp: _trace(tmp, "1,ChatGPT,10,5,15,Conversation log\n", model="GPT-9"),
                               "no requests to simulate"),
    "window inverted": (lambda tmp: _trace(tmp, "1,ChatGPT,10,5,15,Conversation log\n", start_s=10, end_s=5),
                        "end_s (5.0) must be after start_s (10.0)"),
    "tiny duration": (lambda tmp: _experiment(tmp, workload={**{k: v for k, v in BASE["workload"].items()
                                                                if k != "num_requests"}, "duration_s": 1e-9}),
                      "duration_s 1e-09 ends before the first arrival"),
    "NaN timestamp": (lambda tmp: _trace(tmp, "nan,ChatGPT,10,5,15,Conversation log\n"), "t.csv:2: column 'Timestamp'"),
    "infinite timestamp": (lambda tmp: _trace(tmp, "inf,ChatGPT,10,5,15,Conversation log\n"), "finite"),
    "negative timestamp": (lambda tmp: _trace(tmp, "-5,ChatGPT,10,5,15,Conversation log\n"), "non-negative"),
    "fractional tokens": (lambda tmp: _trace(tmp, "1,ChatGPT,12.5,5,15,Conversation log\n"), "expected a whole number"),
    "zero prompt tokens": (lambda tmp: _trace(tmp, "1,ChatGPT,0,5,5,Conversation log\n"), "expected at least 1"),
    "binary trace": (_binary_trace, "not a text file"),
    "HF sizes as strings": (lambda tmp: _hf(tmp, hidden_size="4096"), "hidden_size is '4096'"),
    "HF zero heads": (lambda tmp: _hf(tmp, num_attention_heads=0), "num_attention_heads is 0"),
    "HF heads not a multiple of KV heads": (lambda tmp: _hf(tmp, num_key_value_heads=5), "not a multiple"),
    # These four had run: on a guessed MLP width (4x hidden), with more experts a token than the layer has, as a
    # 16-bit model (a quantised checkpoint; an unknown torch_dtype), or a raw pydantic message (the context).
    "HF without an MLP width": (lambda tmp: _hf(tmp, intermediate_size=None),
                                "lacks the field 'intermediate_size' (or 'ffn_dim')"),
    "HF top-k above its experts": (lambda tmp: _hf(tmp, num_local_experts=8, num_experts_per_tok=16),
                                   "num_experts_per_tok 16 is more than num_local_experts 8"),
    "HF multi-head latent attention": (lambda tmp: _hf(tmp, kv_lora_rank=512),
                                       "kv_lora_rank 512: multi-head latent attention"),
    "HF MoE without a top-k": (lambda tmp: _hf(tmp, num_experts=64, moe_intermediate_size=1408),
                               "num_experts 64 but no num_experts_per_tok"),
    "HF quantised checkpoint": (lambda tmp: _hf(tmp, quantization_config={"quant_method": "awq"}),
                                "is a quantised checkpoint (quantization_config, quant_method 'awq'): set model.dtype"),
    "HF unknown torch_dtype": (lambda tmp: _hf(tmp, torch_dtype="int3"), "torch_dtype 'int3' is none of float32"),
    "HF size given as null": (lambda tmp: _hf(tmp, num_hidden_layers=None), "lacks the field 'num_hidden_layers'"),
    "HF architectures not a list": (lambda tmp: _hf(tmp, architectures="LlamaForCausalLM"),
                                    "architectures is 'LlamaForCausalLM', expected a list of class names"),
    "HF name not a string": (lambda tmp: _hf(tmp, _name_or_path=7), "_name_or_path is 7, expected a string"),
    "HF zero context": (lambda tmp: _hf(tmp, max_position_embeddings=0), "max_position_embeddings is 0, expected"),
    "profile empty": (lambda tmp: _profile(tmp, ""), "is not a YAML mapping"),
    "profile a list": (lambda tmp: _profile(tmp, "- 1\n"), "is not a YAML mapping"),
    "profile's tuned MoE list of an unknown dtype": (
        lambda tmp: _profile(tmp, yaml.safe_dump({**yaml.safe_load(
            (Path(__file__).parents[1] / "hardware_profiles" / "h100-sxm.yaml").read_text()),
            "fused_moe_tuned": {"int4": [[8, 7168]]}})),
        "fused_moe_tuned.int4: Input should be 'bf16' or 'fp8'"),
    "profile's prefill fit without SMs": (
        lambda tmp: _profile(tmp, yaml.safe_dump({k: v for k, v in yaml.safe_load(
            (Path(__file__).parents[1] / "hardware_profiles" / "h100-sxm.yaml").read_text()).items()
            if k != "num_sms"})),
        "p.yaml: prefill_attention needs num_sms (the GPU's streaming multiprocessors)"),
    "profile with the former prefill fit": (
        lambda tmp: _profile(tmp, yaml.safe_dump({**yaml.safe_load(
            (Path(__file__).parents[1] / "hardware_profiles" / "h100-sxm.yaml").read_text()),
            "prefill_attention": {"overhead_s": 1e-5, "max_eff": 0.6, "half_keys": 0.0, "half_tiles": 167.0,
                                  "memory_eff": 0.4, "softness": 1.2, "tile_tokens": 128}})),
        "prefill_attention.tile_s: Field required"),
    "profile's short-query prefill tiles without their keys": (
        lambda tmp: _profile(tmp, yaml.safe_dump({**(h100 := yaml.safe_load(
            (Path(__file__).parents[1] / "hardware_profiles" / "h100-sxm.yaml").read_text())),
            "prefill_attention": {k: v for k, v in h100["prefill_attention"].items() if k != "one_wg_block_n"}})),
        "one_wg_block_m and one_wg_block_n come together"),
    "profile on an unknown base": (lambda tmp: _profile(tmp, "base: h300\nname: x\n"),
                                   "p.yaml: base: unknown profile 'h300'; allowed: a100-40gb"),
    "profile based on itself": (lambda tmp: _profile(tmp, "base: p.yaml\nname: x\n"),
                                "p.yaml: base: 'p.yaml' leads back to this profile"),
    "profile base not a name": (lambda tmp: _profile(tmp, "base: [h100-sxm]\n"),
                                "p.yaml: base: a profile name or a path to a profile YAML"),
    "profile syntax": (lambda tmp: _profile(tmp, "a: [1, 2\n"), "p.yaml:2 is not valid YAML"),
    "profile binary": (lambda tmp: _profile(tmp, bytes(range(256))), "not a readable text file"),
    "uniform min > max": (_dist(kind="uniform", min=10, max=5), "min (10) is above max (5)"),
    "zipf min > max": (_dist(kind="zipf", a=1.0, min=10, max=5), "min (10) is above max (5)"),
    "lognormal min > max": (_dist(kind="lognormal", median=100, sigma=1, min=10, max=5), "min (10) is above max"),
    "negative seed": (lambda tmp: _experiment(tmp, seed=-1), "seed"),
    "TP not dividing heads": (lambda tmp: _experiment(tmp, parallel={"tp": 3}), "3 does not divide"),
    "PP beyond the layers": (lambda tmp: _experiment(tmp, parallel={"pp": 64}), "64 stages for"),
    "DistServe pool's TP not dividing heads": (
        lambda tmp: _experiment(tmp, cluster={"policy": "distserve", "distserve": {"prefill": {"tp": 3}}}),
        "cluster.distserve.prefill.tp: 3 does not divide"),
    # vLLM refuses to start with a token budget below its sequence limit; so does the config.
    "budget below the sequence limit": (lambda tmp: _experiment(tmp, scheduler={"name": "vllm_v1", "max_num_seqs": 64,
                                                                                "max_num_batched_tokens": 32}),
                                        "scheduler: Value error, max_num_batched_tokens (32) is below max_num_seqs "
                                        "(64)"),
    "output path is a file": (_output_is_a_file, "is a file, not a folder"),
    # A float such as 4.5e15 reads as a whole number; building that many replicas ran out of memory.
    "replicas past any cluster": (lambda tmp: _experiment(tmp, cluster={"num_replicas": 4.5e15}),
                                  "cluster.num_replicas: Input should be less than or equal to 10000"),
    "unknown kernel group": (lambda tmp: _experiment(tmp, hardware={"device": "a100-80gb",
                                                                    "time_factors": {"attn": 1.2}}),
                             "hardware.time_factors.attn: Input should be 'gemm', 'attention_prefill'"),
    "non-positive time factor": (lambda tmp: _experiment(tmp, hardware={"device": "a100-80gb",
                                                                        "time_factors": {"gemm": 0}}),
                                 "hardware.time_factors.gemm: Input should be greater than 0"),
    "workers with a state-reading router": (
        lambda tmp: _experiment(tmp, cluster={"router": "least_outstanding"}, simulation={"workers": 2}),
        "simulation.workers: 2 needs cluster.router: round_robin"),
    "workers with migration": (
        lambda tmp: _experiment(tmp, cluster={"policy": "llumnix"}, simulation={"workers": 2}),
        "simulation.workers: 2 needs cluster.policy: colocated"),
    "workers with a time limit": (lambda tmp: _experiment(tmp, simulation={"workers": 2, "max_time_s": 10}),
                                  "simulation.workers: 2 needs no simulation.max_time_s"),
    # pydantic reads true as 1: a boolean for a number ran as 1 request/s (YAML's yes/on are booleans too).
    "boolean for a number": (lambda tmp: _experiment(tmp, workload={**BASE["workload"], "arrival": {
        "kind": "poisson", "rate_per_s": True}}), "workload.arrival.rate_per_s: expected a number, got a boolean"),
    "boolean for a CPU time": (lambda tmp: _experiment(tmp, scheduler={"cpu_overhead": {"per_step_ms": False}}),
                               "scheduler.cpu_overhead.per_step_ms: expected a number, got a boolean"),
    "boolean in a profile": (lambda tmp: _profile_changed(tmp, ("efficiency", "linear", "compute", "max_eff"), True),
                             "efficiency.linear.compute.max_eff: expected a number, got a boolean"),
    # An infinite half-saturation point divided by zero in the decode cost, far from the file.
    "infinite profile number": (lambda tmp: _profile_changed(
        tmp, ("efficiency", "attention_decode", "compute", "half_tokens"), math.inf),
        "efficiency.attention_decode.compute.half_tokens: Input should be a finite number"),
    "zero peak FLOPS": (lambda tmp: _profile_changed(tmp, ("peak_flops", "fp16"), 0.0),
                        "peak_flops.fp16: Input should be greater than 0"),
    "lengths file replayed": (lambda tmp: _experiment(tmp, workload={"trace": {
        "path": str(Path(__file__).resolve().parents[1] / "workloads" / "sharegpt_8k_sarathi_serve.csv"),
        "format": "prefill_decode"}}), "prefill_decode has lengths but no arrival times"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error(tmp_path, capsys, case):
    make, expected = CASES[case]
    path = make(tmp_path)
    out = [] if case == "output path is a file" else ["--out", str(tmp_path / "out")]
    assert main(["run", str(path), "-q", *out]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_profile_sanity_is_checked(tmp_path, capsys):
    profile = yaml.safe_load((Path(__file__).parents[1] / "hardware_profiles" / "a100-80gb.yaml").read_text())
    profile["power"]["idle_w"] = 900.0
    path = _profile(tmp_path, yaml.safe_dump(profile))
    assert main(["check", str(path)]) == 2
    assert "idle_w <= decode_w <= max_w" in capsys.readouterr().err


def test_unwritable_output_folder_is_refused_before_simulating(tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")  # a folder cannot be made under a file (as under a read-only parent)
    ran = []
    monkeypatch.setattr("llmsim.run.simulate", lambda *a, **k: ran.append(1))
    assert main(["run", str(_experiment(tmp_path)), "-q", "--out", str(tmp_path / "f" / "out")]) == 2
    assert "output_dir: cannot write to" in capsys.readouterr().err and not ran


def test_a_bad_trace_row_late_in_the_file_is_an_error_before_simulating(tmp_path, capsys, monkeypatch):
    """The simulation streams its trace: a bad row among the last ones had stopped a run only once the simulation
    reached it (a million-row replay: after minutes). ``run``, ``check`` and ``sweep`` now read the rows the run
    will read first; rows past the run's ``num_requests`` are not its input."""
    rows = "".join(f"{i},ChatGPT,{100 + i % 50},{10 + i % 7},0,Conversation log\n" for i in range(3000))
    path = _trace(tmp_path, rows + "3000,ChatGPT,12x,5,17,Conversation log\n")
    ran = []
    monkeypatch.setattr("llmsim.run.simulate", lambda *a, **k: ran.append(1))
    assert main(["run", str(path), "-q", "--out", str(tmp_path / "out")]) == 2
    assert "t.csv:3002: column 'Request tokens' is '12x'" in capsys.readouterr().err and not ran
    # The results folder, made for the run and checked writable first, does not stay behind empty; one that
    # existed stays, and so does what else the user keeps there.
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    assert main(["run", str(path), "-q", "--out", str(tmp_path / "kept" / "a" / "b")]) == 2
    assert [p.name for p in tmp_path.joinpath("kept").iterdir()] == []
    assert main(["check", str(path)]) == 2
    assert "t.csv:3002" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "s", "base": "exp.yaml", "output_dir": "sw",
                                                     "grid": {"scheduler.name": ["fcfs", "sarathi"]}}))
    monkeypatch.setattr("llmsim.sweep.execute.run_points", lambda *a, **k: ran.append(1))
    assert main(["sweep", str(tmp_path / "s.yaml"), "-q"]) == 2
    assert "t.csv:3002" in capsys.readouterr().err and not ran
    data = yaml.safe_load(path.read_text())
    data["workload"]["num_requests"] = 3000  # the bad row is past what the run reads
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path)]) == 0


def test_sweep_and_plan_argument_mistakes(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": []}}))
    assert main(["sweep", str(sweep), "-q"]) == 2
    assert "grid.seed: an empty list of values gives no points" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", str(sweep), "--workers", "-2"])
    assert "-2: must be at least 1" in capsys.readouterr().err
    plan = tmp_path / "p.yaml"
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"seed": [1]},
                                    "rates": {"start": 10.0, "max": 5.0}}))
    assert main(["plan", str(plan), "-q"]) == 2
    assert "start (10.0) is above max (5.0)" in capsys.readouterr().err
    # A device or model that does not exist is a typo, named with its grid point or candidate before anything
    # runs; a candidate that is not a plan is a row (a parallel plan that is a number crashed the search).
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"hardware.device": ["a100-80gb", "h900"]}}))
    assert main(["sweep", str(sweep), "-q", "--out", str(tmp_path / "o")]) == 2
    assert "s.yaml (grid point 1: hardware.device=h900): hardware.device: unknown device 'h900'" in \
        capsys.readouterr().err
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"model.name": ["Llama-9"]}}))
    assert main(["plan", str(plan), "-q", "--out", str(tmp_path / "o")]) == 2
    assert "p.yaml (candidate model.name=Llama-9): model: unknown model 'Llama-9'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "runs").exists()
    (tmp_path / "traced.yaml").write_text(yaml.safe_dump({**BASE, "workload": {"trace": {
        "path": str(ROOT / "workloads" / "azure_conv_2023.csv"), "format": "azure"}}}))
    plan.write_text(yaml.safe_dump({"base": "traced.yaml", "gpus": 1, "candidates": {"seed": [1]}}))
    assert main(["plan", str(plan), "-q", "--out", str(tmp_path / "o")]) == 2  # every candidate had failed alike
    assert "p.yaml: base: a plan search sets its own arrival rates, so its base workload replays no trace" in \
        capsys.readouterr().err
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"seed": [1]},
                                    "price_per_gpu_hour": {"a100-80gb": 0}}))
    assert main(["plan", str(plan), "-q"]) == 2
    assert "price_per_gpu_hour.a100-80gb: Input should be greater than 0" in capsys.readouterr().err
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"parallel": [3]},
                                    "rates": {"start": 1.0, "max": 1.0}}))
    assert main(["plan", str(plan), "-q", "--out", str(tmp_path / "o")]) == 0
    assert "parallel: Input should be a valid dictionary" in capsys.readouterr().out
    # A degree that is not a whole number >= 1 is its candidate's row too (it crashed the search: 0 divided the
    # GPUs by zero, a mapping was no number); 2.5 is not rounded to 2.
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 2, "candidates": {"parallel": [
        {"tp": 0}, {"tp": 2.5}, {"pp": {"x": 1}}, {"tp": 1}]}, "rates": {"start": 1.0, "max": 1.0}}))
    assert main(["plan", str(plan), "-q", "--out", str(tmp_path / "o2")]) == 0
    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["tp=1", "2"] in [line[:2] for line in printed]  # a count, not 2.000 beside the failed rows' NaN
    rows = pd.read_csv(tmp_path / "o2" / "plans.csv").set_index("parallel")["error"].fillna("")
    assert "parallel.tp: Input should be greater than or equal to 1" in rows["tp=0"]
    assert "parallel.tp: Input should be a valid integer" in rows["tp=2.5"]
    assert "parallel.pp: Input should be a valid integer" in rows["pp={'x': 1}"]
    assert rows["tp=1"] == ""
    # Ranked by price: a device that is not a name is its row's error (a list crashed the price check), and a
    # search where no candidate runs still writes its table (it crashed on the missing GPU counts).
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 10**12, "candidates": {"hardware.device": [
        "a100-80gb", [1, 2]]}, "price_per_gpu_hour": {"a100-80gb": 2.0}, "rank_by": "goodput_per_dollar"}))
    assert main(["plan", str(plan), "-q", "--out", str(tmp_path / "o3")]) == 0
    errors = pd.read_csv(tmp_path / "o3" / "plans.csv")["error"].tolist()
    assert "cluster.num_replicas: Input should be less than or equal to 10000" in errors[0]
    assert "hardware.device: Input should be a valid string" in errors[1]
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"seed": [1], "hardware.device": []}}))
    assert main(["plan", str(plan), "-q", "--out", str(tmp_path / "o4")]) == 2
    assert "candidates.hardware.device: List should have at least 1 item" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sweep", "plan", "check"])
def test_a_sweep_or_plan_file_or_base_that_is_no_mapping_is_a_clear_error(tmp_path, capsys, command):
    """A sweep or plan file, or its base, that is a YAML list had been a TypeError or AttributeError traceback; an
    empty base had made every plan candidate fail alike in its own row, and the search exit 0."""
    spec = {"base": "base.yaml", "grid": {"seed": [1]}} if command != "plan" else {
        "base": "base.yaml", "gpus": 1, "candidates": {"seed": [1]}}
    path = tmp_path / "s.yaml"
    for file_text, base_text, needle in (
            ("- 1\n", yaml.safe_dump(BASE), "s.yaml: expected a mapping at the top level"),
            (yaml.safe_dump(spec), "- 1\n", f"s.yaml: base: {tmp_path / 'base.yaml'} is a YAML list, not a mapping"),
            (yaml.safe_dump(spec), "", f"s.yaml: base: {tmp_path / 'base.yaml'} is empty, not a mapping")):
        path.write_text(file_text)
        (tmp_path / "base.yaml").write_text(base_text)
        assert main([command, str(path), *(["-q", "--out", str(tmp_path / "o")] if command != "check" else [])]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, key, needle", [
    # The results' column "variant" had been dropped as a grid key: both points ran the same experiment.
    ("sweep", "variant", "s.yaml: grid: variant: 'variant' is no key of the top level; allowed keys: cluster,"),
    ("sweep", "seed.x", "s.yaml: grid: seed.x: seed is a value, not a section that holds 'x'"),  # had no file
    ("variant", "scheduler..name", "s.yaml: variants.v: 'scheduler..name' is not a dotted path of config keys"),
    # A plan's typo had made every candidate fail alike, each a row of plans.csv, and the search exit 0.
    ("plan", "schedular.name", "s.yaml: candidates: schedular.name: 'schedular' is no key of the top level"),
    ("plan", "", "s.yaml: candidates: '' is not a dotted path of config keys (it has an empty key)"),
])
def test_a_grid_variant_or_candidate_key_that_is_no_config_path_is_one_error(tmp_path, capsys, command, key,
                                                                             needle):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = ({"base": "base.yaml", "gpus": 1, "candidates": {key: [1]}} if command == "plan" else
            {"base": "base.yaml", "grid": {"seed": [1]}, "variants": {"v": {key: 1}}} if command == "variant" else
            {"base": "base.yaml", "grid": {key: [1, 2]}})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    argv = ["plan" if command == "plan" else "sweep", str(tmp_path / "s.yaml"), "-q", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_grid_or_candidate_value_listed_twice_is_an_error(tmp_path, capsys):
    """It had run the same experiments twice, both in the table (and twice on the goodput curve)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    for command, spec, needle in (
            ("sweep", {"grid": {"workload.arrival.rate_per_s": [1, 2, 1.0]}},
             "grid.workload.arrival.rate_per_s: 1.0 is listed twice"),
            ("plan", {"gpus": 2, "candidates": {"parallel": [{"tp": 2, "pp": 1}, {"pp": 1, "tp": 2}]}},
             "candidates.parallel: {'pp': 1, 'tp': 2} is listed twice")):
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", **spec}))
        assert main([command, str(tmp_path / "s.yaml"), "-q", "--out", str(tmp_path / "o")]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    (["run", "EXP", "--seed", "-1"], "argument --seed: -1: must be at least 0"),  # had been numpy's traceback
    (["microbench", "--out", "m.csv", "--repetitions", "0"], "--repetitions: 0: must be at least 1"),  # after the grid
    (["microbench", "--out", "m.csv", "--threads", "0"], "--threads: 0: must be at least 1"),  # had timed the grid
    (["microbench", "--out", "m.csv", "--warmup", "-1"], "--warmup: -1: must be at least 0"),
    (["plan", "EXP", "--top", "0"], "--top: 0: must be at least 1"),
    (["calibrate", "--device", "cpu", "--measurements", "m.csv", "--hold-out-workers", "0"],
     "--hold-out-workers: 0: must be at least 1"),
])
def test_a_count_on_the_command_line_is_checked_where_it_is_parsed(tmp_path, capsys, argv, needle):
    argv = [str(_experiment(tmp_path)) if a == "EXP" else a for a in argv]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_microbench_threads_past_the_cores_are_refused_and_a_sweep_starts_no_more_workers_than_points(
        tmp_path, capsys, monkeypatch):
    """100,000 threads had crashed OpenMP out of memory after the grid was built; a sweep's pool (forked) had
    started every worker asked for, a thousand for two points."""
    import os

    import llmsim.sweep.execute as execute

    cores = len(os.sched_getaffinity(0))
    assert main(["microbench", "--out", str(tmp_path / "m.csv"), "--threads", str(cores + 1)]) == 2
    assert f"--threads {cores + 1}: this machine lets llmsim use {cores} cores" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()
    started = []

    class Pool(execute.ProcessPoolExecutor):
        def __init__(self, max_workers):
            started.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(execute, "ProcessPoolExecutor", Pool)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [1, 2]}}))
    assert main(["sweep", str(tmp_path / "s.yaml"), "-q", "--workers", "1000", "--out", str(tmp_path / "o")]) == 0
    assert started == [2]


def test_executor_options_are_checked_and_an_unreachable_ray_cluster_is_an_error_before_any_folder(
        tmp_path, capsys, monkeypatch):
    """--address without --executor ray had been ignored (the sweep ran locally), --workers with it too; a Ray
    cluster that could not be reached had been Ray's ConnectionError traceback, an empty folder left behind."""
    import ray

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [1]}}))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"seed": [1]}}))

    def unreachable(address=None, **kwargs):
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "init", unreachable)
    for command, spec in (("sweep", "s.yaml"), ("plan", "p.yaml")):
        out = ["-q", "--out", str(tmp_path / "o")]
        for extra, needle in ((["--address", "x:1"], "--address x:1: names a Ray cluster; it needs --executor ray"),
                              (["--executor", "ray", "--workers", "2"], "--workers: the local executor's processes"),
                              (["--executor", "ray", "--address", "10.0.0.1:6379"],
                               "--executor ray: cannot start or reach a Ray cluster at --address 10.0.0.1:6379: "
                               "Failed to connect")):
            assert main([command, str(tmp_path / spec), *out, *extra]) == 2
            err = capsys.readouterr().err
            assert needle in err and "Traceback" not in err, err
            assert not (tmp_path / "o").exists()


def test_every_command_refuses_an_output_it_cannot_write_before_working(tmp_path, capsys):
    """An output folder that is a file, or an output file that is a folder, is one clear error naming the
    option, for every command that writes, before any work (it was a raw traceback for all but run)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [1, 2]}}))
    plan = tmp_path / "p.yaml"
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 1, "candidates": {"seed": [1]}}))
    a_file = tmp_path / "f"
    a_file.write_text("x")
    cpu = ROOT / "hardware_profiles" / "measurements" / "vidur-cpu-overheads-a100.csv"
    cases = [
        (["sweep", str(sweep), "-q", "--out", str(a_file)], "--out: ", "is a file, not a folder"),
        (["plan", str(plan), "-q", "--out", str(a_file)], "--out: ", "is a file, not a folder"),
        (["validate", "--device", "a100-80gb", "--report-dir", str(a_file)], "--report-dir: ", "is a file"),
        (["calibrate", "--device", "cpu", "--measurements", str(cpu), "--out", str(tmp_path)], "--out: ",
         "is a folder, not a file"),
        (["calibrate-cpu", "--measurements", str(cpu), "--out", str(a_file / "c.yaml")], "--out: ", "is a file"),
        (["import-vidur", "--device", "a100", str(tmp_path), "--out", str(a_file / "m.csv")], "--out: ", "is a file"),
    ]
    for argv, option, what in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert option in err and what in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "runs").exists()


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "out", "grid": {"seed": [1, 2]}}))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / ".llmsim.lock").write_text(str(holder.pid))
        assert main(["sweep", str(sweep), "-q", "--workers", "1"]) == 2
        assert f"in use by another llmsim sweep or plan (process {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over; the sweep runs and releases it.
    assert main(["sweep", str(sweep), "-q", "--workers", "1"]) == 0
    assert not (tmp_path / "out" / ".llmsim.lock").exists()


def test_a_run_killed_while_writing_leaves_no_config(tmp_path, monkeypatch):
    """Result folders are complete or absent: config.yaml (what resume checks) is the last file to appear."""
    cfg = parse_config(BASE)
    run_experiment(cfg, output_dir=tmp_path)
    assert (tmp_path / "config.yaml").exists()

    def killed(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pandas.DataFrame.to_parquet", killed)
    with pytest.raises(LLMSimError, match="writing the results to .* failed: No space left on device"):
        run_experiment(cfg, output_dir=tmp_path)
    assert not (tmp_path / "config.yaml").exists()


# --- fuzz -----------------------------------------------------------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**7), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=6), st.lists(st.integers(-2, 5), max_size=3),
                    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_PATHS = ["seed", "model.name", "model.dtype", "parallel.tp", "parallel.pp", "cluster.num_replicas",
          "scheduler.name", "scheduler.max_num_seqs", "scheduler.max_num_batched_tokens", "scheduler.block_size",
          "scheduler.watermark", "scheduler.gpu_memory_utilization", "workload.num_requests",
          "workload.arrival.rate_per_s", "workload.arrival.kind", "workload.prompt_tokens.value",
          "workload.prompt_tokens.kind", "workload.output_tokens.value", "slo.ttft_s", "simulation.max_time_s",
          "hardware.device", "workload.duration_s", "cluster.policy", "workload.high_priority_fraction",
          "cluster.router", "cluster.distserve.prefill.tp", "cluster.distserve.decode.replicas",
          "cluster.distserve.decode.max_num_seqs", "cluster.llumnix.polling_interval_s", "cluster.llumnix.migration",
          "scheduler.enable_prefix_caching", "scheduler.async_scheduling", "scheduler.long_prefill_token_threshold",
          "scheduler.preemption", "scheduler.cpu_overhead", "scheduler.chunk_size", "scheduler.max_model_len",
          "scheduler.num_gpu_blocks_override", "simulation.client_timeout_s", "simulation.fast_forward",
          "simulation.workers",
          "parallel.pp_layer_partition", "model.kv_cache_dtype", "model.activation_dtype",
          "workload.shared_prefix.num_system_prompts", "workload.shared_prefix.multi_turn",
          "workload.conversation.mean_turns", "slo.definition", "slo.tbt_s", "scheduler.triton_cache"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(_PATHS), _VALUES), min_size=1, max_size=3))
def test_fuzzed_configs_succeed_or_fail_clearly(changes):
    data = json.loads(json.dumps(BASE))
    for path, value in changes:
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node.get(key), dict) or key not in node else node[key]
            if not isinstance(node, dict):
                break
        else:
            node[last] = value
    try:
        cfg = parse_config(data)
        w = cfg.workload
        # Keep examples cheap (the shape of the config is what is fuzzed): a drawn duration_s of 10^5 s at 5 req/s
        # is half a million requests, which once ran this test out of memory.
        expected = w.num_requests or (w.duration_s or 0.0) * getattr(w.arrival, "rate_per_s", 0.0)
        if expected > 50:
            return
        _, summary = run_experiment(cfg, write=False)
    except LLMSimError:
        return
    for section in ("ttft", "tpot", "e2e"):
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in summary[section].values())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
                          st.one_of(st.integers(-3, 5000), st.floats(allow_nan=True), st.text(max_size=3)),
                          st.one_of(st.integers(-3, 500), st.floats(allow_nan=True))), min_size=1, max_size=6))
def test_fuzzed_trace_rows_succeed_or_fail_clearly(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("fuzz")
    body = "".join(f"{t},ChatGPT,{p},{o},0,Conversation log\n" for t, p, o in rows)
    (tmp / "t.csv").write_text(HEADER + body)
    cfg = parse_config({**BASE, "workload": {"trace": {"path": str(tmp / "t.csv"), "format": "burstgpt"}}})
    try:
        result, summary = run_experiment(cfg, write=False)
    except LLMSimError:
        return
    df = result.recorder.request_frame()
    assert len(df) == summary["requests"]["arrived"]
    assert np.isfinite(df["arrival_s"]).all()


def test_a_byte_order_mark_is_read_past_and_bytes_that_are_not_utf8_are_a_clear_error(tmp_path, capsys):
    """A trace saved with a byte-order mark (Excel's "CSV UTF-8") had lacked its first column ("header lacks
    ['Timestamp']") and a HuggingFace config.json with one was no JSON; a config.json, a sweep's base or a
    measured run's profile of bytes that are not UTF-8 had been a UnicodeDecodeError traceback."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "t.csv").write_bytes(bom + (HEADER + "0.5,ChatGPT,100,20,120,Conversation log\n").encode())
    path = _experiment(tmp_path, workload={"trace": {"path": str(tmp_path / "t.csv"), "format": "burstgpt"}})
    assert main(["run", str(path), "-q", "--out", str(tmp_path / "o1")]) == 0
    hf = _hf(tmp_path)  # a config.json with a byte-order mark reads as without it
    config = tmp_path / "hf" / "config.json"
    config.write_bytes(bom + config.read_bytes())
    assert main(["check", str(hf)]) == 0
    config.write_bytes(b'{"hidden_size": \xff}')
    assert main(["check", str(hf)]) == 2
    assert "cannot read HuggingFace config" in capsys.readouterr().err
    (tmp_path / "base.yaml").write_bytes(b"name: \xff\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"seed": [1]}, "output_dir": "out"}))
    assert main(["sweep", str(sweep)]) == 2
    assert "is not a text YAML file" in capsys.readouterr().err
    run = tmp_path / "e2e" / "runs" / "r"
    run.mkdir(parents=True)
    (run / "profile.yaml").write_bytes(b"load: \xff\n")
    (tmp_path / "e2e" / "replay").mkdir()
    import gzip
    with gzip.open(tmp_path / "e2e" / "replay" / "r.json.gz", "wt") as f:
        json.dump({"model_id": "meta-llama/Llama-2-7b-hf", "requests": [], "config": {
            "tensor_parallelism": 1, "max_num_seqs": 8, "max_num_batched_tokens": 512, "kv_blocks_total_gpu": 100}}, f)
    with gzip.open(tmp_path / "e2e" / "replay" / "r_ground_truth.json.gz", "wt") as f:
        json.dump([], f)
    assert main(["validate-e2e", str(tmp_path / "e2e"), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "profile.yaml: not valid YAML/JSON" in err and "Traceback" not in err


def test_trace_formats_are_parsed_as_they_are_defined(tmp_path):
    from llmsim.config import TraceConfig
    from llmsim.errors import TraceError
    from llmsim.workload.traces import read_trace

    azure = tmp_path / "a.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:00:00.0000000+00:00,10,5\n"
                     "2023-11-16 19:00:01.5000000+01:00,10,5\n")  # 18:00:01.5 UTC: 1.5 s later, not 3601.5
    rows = list(read_trace(TraceConfig(path=azure, format="azure")))
    assert [r.time_s for r in rows] == [0.0, 1.5]
    mooncake = tmp_path / "m.jsonl"
    for bad, message in (('{"timestamp": 0, "input_length": 10, "output_length": 0}', "expected at least 1"),
                         ('{"timestamp": 0, "input_length": 10, "output_length": true}', "expected a whole number"),
                         ('{"timestamp": true, "input_length": 10, "output_length": 3}', "expected milliseconds")):
        mooncake.write_text(bad + "\n")
        with pytest.raises(TraceError, match=f"m.jsonl:1: .*{message}"):
            list(read_trace(TraceConfig(path=mooncake, format="mooncake")))


def test_ctrl_c_stops_a_sweep_with_exit_130_and_says_what_finished(tmp_path, capsys, monkeypatch):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "output_dir": "out", "grid": {"seed": [1, 2, 3]}}))
    from llmsim.sweep import execute

    real, calls = execute.run_point, []

    def interrupted_second(config_json, folder):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(config_json, folder)

    monkeypatch.setattr(execute, "run_point", interrupted_second)
    assert main(["sweep", str(sweep), "-q", "--workers", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out" / ".llmsim.lock").exists()
    monkeypatch.setattr(execute, "run_point", real)
    assert main(["sweep", str(sweep), "-q", "--workers", "1"]) == 0  # resumes: the first point is read back


_HF_KEYS = ["hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "num_key_value_heads",
            "intermediate_size", "head_dim", "max_position_embeddings", "torch_dtype", "model_type", "architectures",
            "num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
            "n_shared_experts", "shared_expert_intermediate_size", "first_k_dense_replace", "decoder_sparse_step",
            "num_shared_experts", "layer_types", "full_attention_interval",
            "mlp_only_layers", "moe_layer_freq", "kv_lora_rank", "tie_word_embeddings", "quantization_config",
            "text_config", "_name_or_path", "sliding_window", "sliding_window_pattern", "use_sliding_window",
            "max_window_layers"]
_HF_BASE = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_hidden_layers": 4, "vocab_size": 1000, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_experts": 16, "num_experts_per_tok": 4, "model_type": "qwen3_moe", "torch_dtype": "bfloat16"}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_HF_KEYS), _VALUES), min_size=1, max_size=4))
def test_fuzzed_hf_config_fields_load_or_fail_clearly(tmp_path_factory, changes):
    """Any value in any field a config.json is read for (MoE and the refused features among them) loads a model or
    is a ConfigError naming the config, never another exception; a model that loads has the parameters its
    shapes add up to."""
    config = {**_HF_BASE, **dict(changes)}
    path = tmp_path_factory.mktemp("hf") / "config.json"
    path.write_text(json.dumps(config))
    try:
        spec = load_model(str(path))
    except ConfigError as exc:
        assert str(path) in str(exc)
        return
    assert 1 <= spec.experts_per_token <= spec.num_experts and spec.num_params > 0
    assert 0 <= spec.num_sliding_layers <= spec.num_layers
    assert bool(spec.sliding_window) == bool(spec.num_sliding_layers)
    embed = spec.vocab_size * spec.hidden_size
    dense = spec.num_dense_layers
    assert spec.num_params == ((spec.num_layers - dense) * spec.params_per_layer + dense * spec.dense_layer_params
                               + embed * (1 if spec.tied_embeddings else 2) + spec.hidden_size)
