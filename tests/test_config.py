from pathlib import Path

import pytest

from llmsim.config import load_config, parse_config
from llmsim.errors import ConfigError
from tests.factories import make_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_experiments_parse():
    import yaml

    from llmsim.plan_search import candidate_config, load_plan_search
    from llmsim.sweep.spec import load_sweep

    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "grid" in raw:  # a sweep: every grid point must be a valid experiment
            _, points = load_sweep(path)
            assert points and all(p.config.name for p in points)
        elif "candidates" in raw:  # a plan search: every candidate must be a valid experiment
            cfg, base, candidates = load_plan_search(path)
            for candidate in candidates:
                assert candidate.probe is not None, candidate.error
                parse_config(candidate_config(base, candidate.values, cfg.gpus, 1.0), str(path))
        else:
            assert load_config(path).name


def test_error_names_yaml_path_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        make_config(scheduler={"name": "lifo"})
    expected = "scheduler.name: Value error, unknown scheduler 'lifo'; allowed: 'vllm_v1', 'fcfs', 'sarathi'"
    assert expected in str(err.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as err:
        make_config(parallel={"tp": 2, "tensor_parallel": 2})
    msg = str(err.value)
    assert "parallel.tensor_parallel: unknown key" in msg and "pp, pp_layer_partition, tp" in msg


def test_bad_nested_value_names_full_path():
    with pytest.raises(ConfigError) as err:
        make_config(workload={"num_requests": 5, "arrival": {"kind": "gamma", "rate_per_s": 1, "cv": -1},
                              "prompt_tokens": {"kind": "fixed", "value": 8},
                              "output_tokens": {"kind": "fixed", "value": 8}})
    assert "workload.arrival.cv" in str(err.value)


def test_workload_needs_one_source():
    with pytest.raises(ConfigError, match="prompt_tokens and output_tokens, or lengths_from"):
        make_config(workload={"num_requests": 5, "arrival": {"kind": "poisson", "rate_per_s": 1}})


def test_yaml_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_trace_paths_resolve_relative_to_the_config(tmp_path):
    cfg = load_config(ROOT / "experiments" / "quickstart.yaml")
    assert cfg.workload.lengths_from.path.exists()


def test_unknown_key_in_a_union_member_lists_that_members_keys():
    with pytest.raises(ConfigError) as err:
        parse_config({"model": {"name": "Llama-2-7B"},
                      "workload": {"num_requests": 1, "arrival": {"kind": "poisson", "rate_per_s": 1},
                                   "prompt_tokens": {"kind": "zipf", "min": 1, "max": 9, "foo": 1},
                                   "output_tokens": {"kind": "fixed", "value": 1}}})
    assert "workload.prompt_tokens.foo: unknown key; allowed keys: a, kind, max, min" in str(err.value)


def test_model_precisions_reach_the_execution_model():
    from llmsim.cluster.simulation import build_execution

    quantised = build_execution(make_config(model={"name": "Llama-2-7B", "dtype": "fp8", "kv_cache_dtype": "fp8"},
                                            hardware={"device": "h100-sxm"}))
    plain = build_execution(make_config(model={"name": "Llama-2-7B"}, hardware={"device": "h100-sxm"}))
    assert quantised[0].act_dtype == "bf16" and quantised[0].kv_dtype == "fp8"
    assert quantised[2].num_blocks > 2 * plain[2].num_blocks  # half the KV bytes, and room the weights freed
    with pytest.raises(ConfigError, match="model.activation_dtype"):
        make_config(model={"name": "Llama-2-7B", "activation_dtype": "fp8"})


def test_a_results_folders_config_runs_again_from_anywhere(tmp_path, monkeypatch):
    """The config.yaml a results folder records reproduces the run, from another working directory: the paths
    the experiment named relative to its YAML are recorded absolute (they had been recorded relative to the
    working directory of the first run, so a rerun from the results folder could not find its trace)."""
    import json
    import shutil

    from llmsim.cli import main

    exp = tmp_path / "exp"
    (exp / "traces").mkdir(parents=True)
    shutil.copy(ROOT / "workloads" / "mooncake_conversation.jsonl", exp / "traces" / "mc.jsonl")
    (exp / "run.yaml").write_text("name: t\nmodel: {name: Llama-3-8B}\nhardware: {device: h100-sxm}\n"
                                  "output_dir: out\nworkload:\n  num_requests: 30\n"
                                  "  trace: {path: traces/mc.jsonl, format: mooncake}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "exp/run.yaml", "-q"]) == 0  # the YAML named relative to the working directory
    first = exp / "out"
    monkeypatch.chdir(first)
    assert main(["run", "config.yaml", "--out", str(tmp_path / "again"), "-q"]) == 0

    def summary(folder):
        data = json.loads((folder / "summary.json").read_text())
        data.pop("simulation")  # wall-clock readings
        return data

    assert summary(first) == summary(tmp_path / "again") and summary(first)["requests"]["arrived"] == 30


def test_a_model_or_profile_path_is_recorded_absolute_and_the_folder_where_it_was_written(tmp_path, monkeypatch):
    """A HuggingFace config.json and a profile YAML named relative to the working directory (as documented) are
    recorded absolute, so the results folder's config.yaml reruns from anywhere (they had been recorded as
    written, so the rerun looked for them in the wrong place); the folder ``--out`` chose is the one recorded (the
    YAML's output_dir had been, so a rerun wrote elsewhere); and a model without ``_name_or_path`` is named after
    its folder (a config.json named relative to its own folder had an empty name)."""
    import json
    import shutil

    import yaml

    from llmsim.cli import main

    (tmp_path / "my-7b").mkdir()
    (tmp_path / "my-7b" / "config.json").write_text(json.dumps({
        "hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_hidden_layers": 8,
        "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "float16"}))
    shutil.copy(ROOT / "hardware_profiles" / "h100-sxm.yaml", tmp_path / "my-h100.yaml")
    (tmp_path / "run.yaml").write_text(
        "name: t\nmodel: {name: config.json}\nhardware: {device: ../my-h100.yaml}\noutput_dir: out\n"
        "workload: {num_requests: 5, arrival: {kind: poisson, rate_per_s: 2.0}, prompt_tokens: {kind: fixed, "
        "value: 100}, output_tokens: {kind: fixed, value: 10}}\n")
    monkeypatch.chdir(tmp_path / "my-7b")
    assert main(["run", "../run.yaml", "--out", "../first", "-q"]) == 0
    recorded = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert recorded["model"]["name"] == str(tmp_path / "my-7b" / "config.json")
    assert recorded["hardware"]["device"] == str(tmp_path / "my-h100.yaml")
    assert recorded["output_dir"] == str(tmp_path / "first")
    first = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert first["model"] == "my-7b"
    monkeypatch.chdir(ROOT)
    assert main(["run", str(tmp_path / "first" / "config.yaml"), "-q"]) == 0  # writes into the folder again
    again = json.loads((tmp_path / "first" / "summary.json").read_text())
    assert [{k: v for k, v in s.items() if k != "simulation"} for s in (first, again)] == [
        {k: v for k, v in first.items() if k != "simulation"}] * 2
    assert not (tmp_path / "out").exists()


def test_rerunning_a_results_folder_on_changed_input_files_says_so(tmp_path, capsys):
    from llmsim.cli import main

    trace = tmp_path / "t.csv"
    trace.write_text((ROOT / "workloads" / "azure_code_2023.csv").read_text())
    (tmp_path / "e.yaml").write_text("name: t\nmodel: {name: Llama-2-7B}\noutput_dir: out\n"
                                     "workload: {num_requests: 10, trace: {path: t.csv, format: azure}}\n")
    assert main(["run", str(tmp_path / "e.yaml"), "-q"]) == 0
    assert main(["run", str(tmp_path / "out" / "config.yaml"), "-q", "--out", str(tmp_path / "same")]) == 0
    assert "note:" not in capsys.readouterr().err
    trace.write_text("\n".join(trace.read_text().splitlines()[:5]) + "\n")
    assert main(["run", str(tmp_path / "out" / "config.yaml"), "-q", "--out", str(tmp_path / "other")]) == 0
    assert f"llmsim: note: {trace} has changed since the config was recorded (sha256:" in capsys.readouterr().err


def test_every_relative_path_in_a_yaml_is_relative_to_that_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory does not matter
    cfg = load_config(ROOT / "experiments" / "quickstart.yaml")
    assert cfg.output_dir == ROOT / "results" / "quickstart"
    assert Path(cfg.workload.trace.path if cfg.workload.trace else cfg.workload.lengths_from.path).is_absolute()
