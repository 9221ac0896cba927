import json
import subprocess
import sys
from pathlib import Path

from llmsim.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_run_quickstart_writes_results(tmp_path, capsys):
    assert main(["run", str(ROOT / "experiments" / "quickstart.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "goodput" in out
    for name in ("requests.parquet", "iterations.parquet", "summary.json", "config.yaml"):
        assert (tmp_path / name).exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"]["arrived"] == 2000


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: Llama-2-7B}\nscheduler: {name: lifo}\nworkload: {num_requests: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "llmsim.cli", "run", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "scheduler.name" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_that_does_not_fit_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "big.yaml"
    cfg.write_text("model: {name: Llama-2-70B}\nhardware: {device: t4}\n"
                   "workload: {num_requests: 1, arrival: {kind: poisson, rate_per_s: 1},"
                   " prompt_tokens: {kind: fixed, value: 5}, output_tokens: {kind: fixed, value: 5}}\n")
    assert main(["check", str(cfg)]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_check_shows_every_sweep_point_and_plan_candidate(tmp_path, capsys):
    """``llmsim check`` on a sweep or a plan-search file (it had refused them): each point's or candidate's memory
    plan, or the error its row will carry; a mistake that stops the command stops the check too."""
    import yaml

    base = {"model": {"name": "Llama-2-70B"}, "workload": {"num_requests": 1, "arrival": {
        "kind": "poisson", "rate_per_s": 1}, "prompt_tokens": {"kind": "fixed", "value": 5},
        "output_tokens": {"kind": "fixed", "value": 5}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"hardware.device": ["h100-sxm", "t4"],
                                                                   "parallel.tp": [2]}}))
    assert main(["check", str(sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("p000_device=h100-sxm_tp=2: Llama-2-70B (69.0B) on h100-sxm, 1x TP=2 PP=1: per GPU")
    assert lines[1].startswith("p001_device=t4_tp=2: ") and "does not fit" in lines[1]
    assert lines[2] == f"{sweep}: 2 points, 1 of them will be rows with their error (above)"
    plan = tmp_path / "p.yaml"
    plan.write_text(yaml.safe_dump({"base": "base.yaml", "gpus": 8, "candidates": {"parallel": [{"tp": 4}, {"tp": 0}]}}))
    assert main(["check", str(plan)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("parallel=tp=4: Llama-2-70B (69.0B) on a100-80gb, 2x TP=4 PP=1: per GPU")
    assert lines[1].startswith("parallel=tp=0: ") and "parallel.tp: Input should be greater than or equal to 1" in lines[1]
    assert lines[2] == f"{plan}: 2 candidates, 1 of them will be rows with their error (above)"
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "grid": {"scheduler.nam": ["fcfs"]}}))
    assert main(["check", str(sweep)]) == 2
    assert "scheduler.nam" in capsys.readouterr().err


def test_help_documents_every_command():
    proc = subprocess.run([sys.executable, "-m", "llmsim.cli", "--help"], capture_output=True, text=True)
    for command in ("run", "check", "models", "devices"):
        assert command in proc.stdout


def test_listing_commands(capsys):
    assert main(["models"]) == 0 and "Mixtral-8x7B" in capsys.readouterr().out
    assert main(["devices"]) == 0 and "mi325x" in capsys.readouterr().out


def test_version_names_the_package_and_its_source_digest(capsys):
    import pytest

    from llmsim import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"llmsim {__version__}+src.") and len(out.rsplit(".", 1)[-1]) == 12


def test_set_overrides_config_values_by_dotted_path(tmp_path, capsys):
    quickstart = str(ROOT / "experiments" / "quickstart.yaml")
    assert main(["run", quickstart, "--out", str(tmp_path), "-q", "--set", "workload.num_requests=40",
                 "--set", "parallel={tp: 2}", "--set", "name=overridden"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"]["arrived"] == 40 and summary["parallel"]["tp"] == 2
    assert summary["experiment"] == "overridden"
    capsys.readouterr()
    assert main(["check", quickstart, "--set", "scheduler.max_num_seqz=4"]) == 2
    err = capsys.readouterr().err
    assert "--set scheduler.max_num_seqz=4" in err and "scheduler.max_num_seqz: unknown key" in err
    assert main(["check", quickstart, "--set", "workload.num_requests"]) == 2
    assert "expected path.to.key=value" in capsys.readouterr().err
    assert main(["check", quickstart, "--set", "model.name.size=4"]) == 2
    assert "model.name is 'Llama-3-8B', not a section" in capsys.readouterr().err


def test_a_run_whose_requests_are_rejected_says_why(tmp_path, capsys):
    """Rejections are per request in requests.parquet; the summary and the printed table give the first one's
    reason, so a run that rejects everything does not leave the user guessing."""
    quickstart = str(ROOT / "experiments" / "quickstart.yaml")
    assert main(["run", quickstart, "--out", str(tmp_path), "--set", "workload.num_requests=30",
                 "--set", "scheduler.max_model_len=1000"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"]["rejected"] > 0
    example = summary["requests"]["rejected_example"]
    assert "exceeds max_model_len 1000" in example
    assert f"rejected, e.g. {example}" in capsys.readouterr().out
    assert main(["run", quickstart, "--out", str(tmp_path), "-q", "--set", "workload.num_requests=30"]) == 0
    assert "rejected_example" not in json.loads((tmp_path / "summary.json").read_text())["requests"]


def test_check_shows_every_distserve_pool_and_names_the_one_that_does_not_fit(capsys):
    """``llmsim check`` on DistServe plans each pool (it showed the colocated plan, which DistServe does not run,
    and so passed a decode pool that cannot fit)."""
    config = str(ROOT / "experiments" / "distserve_vs_colocated.yaml")
    assert main(["check", config]) == 0
    out = capsys.readouterr().out
    assert "prefill pool (1x) TP=1 PP=1" in out and "decode pool (1x) TP=1 PP=1" in out
    assert main(["check", config, "--set", "cluster.distserve.decode.max_num_batched_tokens=2000000"]) == 2
    assert "cluster.distserve.decode: Llama-2-13B does not fit" in capsys.readouterr().err


def test_check_shows_the_host_swap_space_of_swap_preemption(capsys):
    """With preemption: swap, ``check`` shows the host's KV blocks for swapped-out KV (vLLM's num_cpu_blocks:
    scheduler.swap_space_gib over a block's bytes per GPU; Llama-2-7B at TP 1: 16 x 512 KiB = 8 MiB a block)."""
    config = str(ROOT / "experiments" / "quickstart.yaml")
    assert main(["check", config, "--set", "model.name=Llama-2-7B", "--set", "scheduler.preemption=swap"]) == 0
    assert "host swap space 512 KV blocks per replica" in capsys.readouterr().out
    assert main(["check", config, "--set", "model.name=Llama-2-7B", "--set", "scheduler.preemption=swap",
                 "--set", "scheduler.swap_space_gib=1", "--set", "parallel.tp=2"]) == 0
    assert "host swap space 256 KV blocks per replica" in capsys.readouterr().out  # half a block per GPU
    assert main(["check", config]) == 0
    assert "swap" not in capsys.readouterr().out


def test_check_finds_a_workload_with_no_request_as_run_does(tmp_path, capsys):
    """A duration that ends before the first arrival had passed ``check`` ("valid") and failed ``run``; in a
    sweep it is that point's row, as the sweep gives it."""
    import yaml

    exp = {"model": {"name": "Llama-2-7B"}, "workload": {"duration_s": 0.001, "arrival": {
        "kind": "poisson", "rate_per_s": 1}, "prompt_tokens": {"kind": "fixed", "value": 5},
        "output_tokens": {"kind": "fixed", "value": 5}}}
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    needle = "workload: no requests to simulate: duration_s 0.001 ends before the first arrival"
    assert main(["check", str(tmp_path / "e.yaml")]) == 2
    assert needle in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "e.yaml", "grid": {"workload.duration_s": [0.001, 60]}}))
    assert main(["check", str(tmp_path / "s.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"p000_duration_s=0.001: {needle}"
    assert lines[2] == f"{tmp_path / 's.yaml'}: 2 points, 1 of them will be rows with their error (above)"


def test_check_does_not_load_the_results_stack():
    """``llmsim check`` starts fast because the simulator imports neither pandas nor pyarrow."""
    code = ("import sys; from llmsim.cli import main; main(['check', %r]); "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'matplotlib', 'scipy') if m in sys.modules))"
            % str(ROOT / "experiments" / "quickstart.yaml"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_long_commands_print_progress_lines_when_not_on_a_terminal(capsys):
    from llmsim.progress import LineProgress

    with LineProgress(total=4, unit="point", desc="sweep", interval_s=0.0) as bar:
        bar.update(1)
        bar.update(3)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("sweep: 1/4 point (25%) after") and lines[1].startswith("sweep: 4/4 point (100%)")


def test_a_setting_that_has_no_effect_is_named(tmp_path, capsys):
    """A field of another scheduler, the section of a policy or router the experiment does not run, a MoE kernel
    setting on a dense model: valid (a sweep's base may hold them for some points), but ``check`` and ``run`` name
    each; a default never counts, nor does a results folder's config.yaml, which writes out every field."""
    quickstart = str(ROOT / "experiments" / "quickstart.yaml")
    assert main(["check", quickstart]) == 0
    assert "note" not in capsys.readouterr().err
    assert main(["check", quickstart, "--set", "scheduler.chunk_size=256", "--set", "cluster.llumnix.defrag=false",
                 "--set", "scheduler.triton_cache=warm", "--set", "cluster.prefix_aware.cache_threshold=0.2"]) == 0
    err = capsys.readouterr().err
    assert "scheduler.chunk_size has no effect: it is sarathi's step budget; vllm_v1 steps" in err
    assert "cluster.llumnix has no effect: cluster.policy is colocated" in err
    assert "scheduler.triton_cache has no effect: Llama-3-8B is a dense model" in err
    assert "cluster.prefix_aware has no effect: cluster.router is least_outstanding" in err
    assert main(["check", quickstart, "--set", "scheduler.name=sarathi", "--set", "scheduler.chunk_size=256",
                 "--set", "cluster.router=prefix_aware", "--set", "cluster.prefix_aware.cache_threshold=0.2"]) == 0
    assert "note" not in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["run", quickstart, "--out", str(out), "--quiet", "--set", "workload.num_requests=20",
                 "--set", "cluster.policy=distserve", "--set", "cluster.num_replicas=3"]) == 0
    assert "cluster.num_replicas has no effect: cluster.policy distserve" in capsys.readouterr().err
    assert main(["check", quickstart, "--set", "cluster.policy=llumnix",
                 "--set", "cluster.prefix_aware.cache_threshold=0.2"]) == 0
    err = capsys.readouterr().err
    assert "cluster.router has no effect: cluster.policy llumnix dispatches by its instances' load" in err
    assert "cluster.prefix_aware has no effect: cluster.policy llumnix" in err
    assert main(["run", str(out / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    assert "has no effect" not in capsys.readouterr().err


def test_a_model_feature_priced_otherwise_is_named(tmp_path, capsys):
    """A config.json with sliding-window attention loads, priced as full attention: ``check`` and ``run`` say so,
    naming the window and its layers; a model without one gets no note."""
    import json

    hf = tmp_path / "mistral-7b-v0.1" / "config.json"
    hf.parent.mkdir()
    hf.write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                              "sliding_window": 4096, "torch_dtype": "bfloat16"}))
    quickstart = str(ROOT / "experiments" / "quickstart.yaml")
    note = ("sliding-window attention (4096 tokens, on 32 of 32 layers) is priced as full attention and its KV "
            "cache as every layer's")
    assert main(["check", quickstart, "--set", f"model.name={hf}"]) == 0
    assert note in capsys.readouterr().err
    assert main(["run", quickstart, "--out", str(tmp_path / "out"), "--quiet", "--set", f"model.name={hf}",
                 "--set", "workload.num_requests=10"]) == 0
    assert note in capsys.readouterr().err
    assert main(["check", quickstart]) == 0
    assert "sliding-window" not in capsys.readouterr().err
