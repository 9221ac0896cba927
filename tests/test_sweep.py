import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llmsim.cli import main
from llmsim.config import load_config
from llmsim.errors import ConfigError
from llmsim.sweep.spec import load_sweep

BASE = {
    "name": "base", "seed": 1, "model": {"name": "Llama-2-7B"}, "hardware": {"device": "a100-80gb"},
    "cluster": {"num_replicas": 1},
    "scheduler": {"name": "fcfs", "max_num_batched_tokens": 4096},
    "workload": {"num_requests": 60, "arrival": {"kind": "poisson", "rate_per_s": 1.0},
                 "prompt_tokens": {"kind": "uniform", "min": 200, "max": 1500},
                 "output_tokens": {"kind": "uniform", "min": 20, "max": 200}},
    "slo": {"ttft_s": 1.0, "tpot_s": 0.05, "tbt_s": 0.1},
}


def write_sweep(tmp_path, grid, base=BASE):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "output_dir": "out", "grid": grid}))
    return path


def test_sweep_runs_grid_writes_table_curves_and_goodput(tmp_path, capsys):
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 4.0, 30.0],
                                  "scheduler.name": ["fcfs", "sarathi"]})
    assert main(["sweep", str(path), "--workers", "2", "-q"]) == 0
    out = tmp_path / "out"
    df = pd.read_csv(out / "results.csv")
    assert len(df) == 6 and df["error"].isna().all()
    assert set(df["scheduler.name"]) == {"fcfs", "sarathi"}
    best = pd.read_csv(out / "goodput.csv").set_index("scheduler.name")
    for scheduler, group in df.groupby("scheduler.name"):
        ok = group[group["attainment"] >= 0.9]["workload.arrival.rate_per_s"]
        assert best.loc[scheduler, "goodput_rate"] == (ok.max() if len(ok) else 0.0)
    assert best.loc["sarathi", "goodput_rate"] >= best.loc["fcfs", "goodput_rate"]
    assert (out / "goodput_curve.png").stat().st_size > 5000 and (out / "energy_curve.png").exists()


def test_sweep_goodput_says_when_the_grid_ends_before_the_curve_misses_its_target(tmp_path, capsys):
    """A curve that meets the target at every rate swept has a goodput of at least the highest: goodput.csv marks
    it capped and the printed summary says so, as it says when no rate met the target."""
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 2.0], "slo.ttft_s": [60.0, 0.001]},
                       base={**BASE, "slo": {"ttft_s": 60.0, "tpot_s": 1.0}})
    assert main(["sweep", str(path), "--workers", "1"]) == 0
    best = pd.read_csv(tmp_path / "out" / "goodput.csv").set_index("slo.ttft_s")
    assert best.loc[60.0, "goodput_rate"] == 2.0 and bool(best.loc[60.0, "capped"])
    assert best.loc[0.001, "goodput_rate"] == 0.0 and not best.loc[0.001, "capped"]
    out = capsys.readouterr().out
    assert "1 of 2 curves met the target at the highest workload.arrival.rate_per_s swept ('capped')" in out
    assert "1 of 2 curves met the target at no workload.arrival.rate_per_s swept" in out


def test_a_sweep_folder_holds_one_sweep_s_files(tmp_path, monkeypatch, capsys):
    """The sweep's own files are written together, results.csv last: a sweep over no rate (no curves, no
    goodput) takes away the curves and goodput.csv an earlier sweep left in the folder, and one killed while
    writing them leaves no results.csv."""
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 4.0]})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    out = tmp_path / "out"
    assert {"results.csv", "goodput.csv", "goodput_curve.png"} <= {p.name for p in out.iterdir()}
    path = write_sweep(tmp_path, {"seed": [1, 2]})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert not {"goodput.csv", "goodput_curve.png", "energy_curve.png"} & {p.name for p in out.iterdir()}
    assert len(pd.read_csv(out / "results.csv")) == 2

    def killed(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pandas.DataFrame.to_csv", killed)
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 2
    assert "output_dir: writing the results to" in capsys.readouterr().err
    assert not (out / "results.csv").exists()


def test_a_trace_path_in_a_sweeps_grid_is_relative_to_the_sweep_file(tmp_path, monkeypatch):
    """Grid and variant values are set after the base experiment's paths are resolved: a relative trace path
    among them is relative to the sweep file too (it had been left relative to the working directory), and every
    point's folder is recorded absolute."""
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "a.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                               "2023-11-16 18:15:46.6805900,374,44\n")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "workload": {"num_requests": 1, "trace": {
        "path": "traces/a.csv", "format": "azure"}}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "base": "base.yaml", "output_dir": "out",
                                    "grid": {"workload.trace.path": ["traces/a.csv"]}}))
    monkeypatch.chdir(tmp_path.parent)
    sweep, points = load_sweep(path)
    assert points[0].config.workload.trace.path == tmp_path / "traces" / "a.csv"
    assert sweep.output_dir == tmp_path / "out"


def test_sweep_variants_apply_their_overrides_together(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "cluster": {"num_replicas": 2}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "v", "base": "base.yaml", "output_dir": "out", "grid": {"workload.arrival.rate_per_s": [2.0, 6.0]},
        "variants": {"rr": {"cluster.policy": "colocated", "cluster.router": "round_robin"},
                     "llumnix": {"cluster.policy": "llumnix", "cluster.llumnix.defrag": False}}}, sort_keys=False))
    sweep, points = load_sweep(path)
    assert sweep.curve_keys == ["variant"]
    assert [(p.values["variant"], p.values["workload.arrival.rate_per_s"]) for p in points] == [
        ("rr", 2.0), ("rr", 6.0), ("llumnix", 2.0), ("llumnix", 6.0)]
    assert points[0].config.cluster.router == "round_robin" and points[0].config.cluster.policy == "colocated"
    assert points[3].config.cluster.policy == "llumnix" and not points[3].config.cluster.llumnix.defrag
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(df["variant"]) == ["rr", "rr", "llumnix", "llumnix"] and df["error"].isna().all()
    assert set(pd.read_csv(tmp_path / "out" / "goodput.csv")["variant"]) == {"rr", "llumnix"}
    assert (tmp_path / "out" / "ttft_p99_curve.png").exists()
    # A variant's bad path is reported with the point it belongs to.
    path.write_text(yaml.safe_dump({"name": "v", "base": "base.yaml", "grid": {"seed": [1]},
                                    "variants": {"bad": {"cluster.policy": "nope"}}}))
    with pytest.raises(ConfigError, match="cluster.policy"):
        load_sweep(path)


def test_sweep_resumes_without_redoing_finished_points(tmp_path):
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 2.0, 3.0]})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    folders = sorted((tmp_path / "out").glob("p*"))
    assert len(folders) == 3
    stamps = {f.name: (f / "summary.json").stat().st_mtime_ns for f in folders}
    (folders[1] / "summary.json").unlink()  # as if the sweep crashed while running this point
    (folders[2] / "summary.json").write_bytes(b"{\xff")  # a file that no longer reads had been a traceback
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    for f in folders:
        if f in folders[1:]:
            assert json.loads((f / "summary.json").read_text())["requests"]["finished"] > 0
        else:
            assert (f / "summary.json").stat().st_mtime_ns == stamps[f.name]
    # A changed base config invalidates every point.
    stamps = {f.name: (f / "summary.json").stat().st_mtime_ns for f in folders}
    write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 2.0, 3.0]}, {**BASE, "seed": 2})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert all((f / "summary.json").stat().st_mtime_ns != stamps[f.name] for f in folders)


def test_sweep_resumed_after_an_input_file_changed_reruns_the_points_that_read_it(tmp_path):
    """A trace, a HuggingFace config.json or a profile YAML rewritten under the same path: the points that read it
    rerun on a resumed sweep (they had kept results the new file would not give), the others are read back."""
    rows = "".join(f"2023-11-16 18:15:{10 + i:02d}.0000000,{300 + 40 * i},{20 + i}\n" for i in range(12))
    trace = tmp_path / "a.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    (tmp_path / "hf").mkdir()
    hf = {"hidden_size": 2048, "intermediate_size": 5504, "num_attention_heads": 16, "num_hidden_layers": 8,
          "vocab_size": 32000, "max_position_embeddings": 4096, "torch_dtype": "float16"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    base = {**BASE, "workload": {"trace": {"path": "a.csv", "format": "azure"}}}
    path = write_sweep(tmp_path, {"model.name": ["Llama-2-7B", str(tmp_path / "hf")]}, base)
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    catalog, own = sorted((tmp_path / "out").glob("p*"))
    assert f"{trace}: sha256:" in (own / "config.yaml").read_text()
    stamp = {f: (f / "summary.json").stat().st_mtime_ns for f in (catalog, own)}
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert {f: (f / "summary.json").stat().st_mtime_ns for f in (catalog, own)} == stamp  # nothing changed
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 16}))
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert (catalog / "summary.json").stat().st_mtime_ns == stamp[catalog]
    assert (own / "summary.json").stat().st_mtime_ns != stamp[own]
    stamp = {f: (f / "summary.json").stat().st_mtime_ns for f in (catalog, own)}
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows[: len(rows) // 2])
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert all((f / "summary.json").stat().st_mtime_ns != stamp[f] for f in (catalog, own))
    assert pd.read_csv(tmp_path / "out" / "results.csv")["finished"].tolist() == [6, 6]


def test_plan_that_does_not_fit_is_a_row_not_a_crash(tmp_path):
    path = write_sweep(tmp_path, {"hardware.device": ["a100-80gb", "t4"], "model.name": ["Llama-2-70B"]})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert df["error"].fillna("").str.contains("does not fit").all()


def test_bad_grid_path_names_the_grid_key_and_allowed_keys(tmp_path):
    path = write_sweep(tmp_path, {"scheduler.nam": ["fcfs"]})
    with pytest.raises(ConfigError, match=r"sweep.yaml: grid: scheduler.nam: 'nam' is no key of scheduler; "
                                          r"allowed keys: .*max_num_seqs, name, num_gpu_blocks_override, preemption"):
        load_sweep(path)
    # A value of the base in the way of a grid path names the point.
    path = write_sweep(tmp_path, {"scheduler.name": ["fcfs"]}, base={**BASE, "scheduler": "fcfs"})
    with pytest.raises(ConfigError, match=r"grid point 0: scheduler.name=fcfs\): scheduler.name: scheduler is "
                                          r"'fcfs', not a section that can hold 'name'"):
        load_sweep(path)


def test_ray_executor_matches_local(tmp_path):
    """The distributed path, on a local Ray cluster (the test install has Ray: a broken Ray path cannot land)."""
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 3.0]})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert main(["sweep", str(path), "--executor", "ray", "--out", str(tmp_path / "ray"), "-q"]) == 0
    local = pd.read_csv(tmp_path / "out" / "results.csv").drop(columns="point")
    remote = pd.read_csv(tmp_path / "ray" / "results.csv").drop(columns="point")
    pd.testing.assert_frame_equal(local, remote)


def test_analysis_notebook_runs_on_a_small_sweep(tmp_path, monkeypatch):
    """The shipped notebook, executed with nbclient on a small version of the Sarathi/FCFS sweep."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 3.0, 6.0],
                                  "scheduler.name": ["fcfs", "sarathi"]})
    assert main(["sweep", str(path), "--workers", "2", "-q"]) == 0
    notebook = Path(__file__).resolve().parents[1] / "experiments" / "notebooks" / "goodput_energy.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    monkeypatch.setenv("LLMSIM_SWEEP_DIR", str(tmp_path / "out"))
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # goodput/energy and TTFT figures
    goodput_text = nb.cells[3].outputs[0]["data"]["text/plain"]
    assert "sarathi" in goodput_text


def test_sweep_resumed_under_other_code_reruns_its_points(tmp_path, monkeypatch):
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0, 2.0]})
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    folders = sorted((tmp_path / "out").glob("p*"))
    recorded = {yaml.safe_load((f / "config.yaml").read_text())["llmsim_version"] for f in folders}
    from llmsim.version import code_version

    assert recorded == {code_version()}
    stamps = {f: (f / "summary.json").stat().st_mtime_ns for f in folders}
    monkeypatch.setattr("llmsim.run.code_version", lambda: "0.0.0+src.other")
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    assert all((f / "summary.json").stat().st_mtime_ns != stamps[f] for f in folders)
    assert {yaml.safe_load((f / "config.yaml").read_text())["llmsim_version"] for f in folders} == {"0.0.0+src.other"}


def test_the_code_version_covers_every_profile_a_run_reads(tmp_path):
    """The engines' CPU overhead profiles (``hardware_profiles/cpu_overhead/``) were left out of the digest: a
    refitted one kept a resumed sweep's results."""
    from llmsim.version import _digest

    (tmp_path / "llmsim").mkdir()
    (tmp_path / "llmsim" / "m.py").write_text("x = 1\n")
    (tmp_path / "hardware_profiles" / "cpu_overhead").mkdir(parents=True)
    (tmp_path / "hardware_profiles" / "gpu.yaml").write_text("a: 1\n")
    cpu = tmp_path / "hardware_profiles" / "cpu_overhead" / "engine.yaml"
    cpu.write_text("params: {per_step_ms: 1.0}\n")
    before = _digest(tmp_path / "llmsim", tmp_path / "hardware_profiles")
    cpu.write_text("params: {per_step_ms: 2.0}\n")
    assert _digest(tmp_path / "llmsim", tmp_path / "hardware_profiles") != before


def test_set_overrides_the_base_experiment_of_a_sweep(tmp_path):
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [1.0]})
    _, points = load_sweep(path, {"workload.num_requests": 7, "scheduler.max_num_seqs": 3})
    assert points[0].config.workload.num_requests == 7 and points[0].config.scheduler.max_num_seqs == 3
    assert main(["sweep", str(path), "--workers", "1", "-q", "--set", "workload.num_requests=7"]) == 0
    assert pd.read_csv(tmp_path / "out" / "results.csv")["finished"].tolist() == [7]


def test_a_path_set_on_a_sweep_resolves_as_on_its_base_experiment():
    """``--set`` paths are relative to the experiment file, for ``llmsim sweep`` as for ``llmsim run`` (a sweep
    used to resolve them against the working directory, so a path that worked with ``run`` failed every point)."""
    papers = Path(__file__).resolve().parents[1] / "experiments" / "papers"
    overrides = {"workload.lengths_from.path": "../../workloads/azure_conv_2023.csv",
                 "workload.lengths_from.format": "azure"}
    _, points = load_sweep(papers / "sweep_distserve_opt13b.yaml", overrides)
    run = load_config(papers / "distserve_opt13b.yaml", overrides).workload.lengths_from.path
    assert {p.config.workload.lengths_from.path for p in points} == {run}
    assert Path(run).is_file()


def test_goodput_stops_at_the_first_load_that_misses_the_target():
    """A curve that misses the target at one rate and meets it again at a heavier one (noise, or a policy whose
    behaviour changes with load) had the heavier rate as its goodput, though a lighter load missed; the goodput
    now holds at every lighter rate swept, and the curve is marked non_monotone."""
    from llmsim.sweep.report import goodput
    from llmsim.sweep.spec import SweepConfig

    rate = "workload.arrival.rate_per_s"
    sweep = SweepConfig(base={}, grid={rate: [1, 2, 3, 4], "scheduler.name": ["a", "b", "c"]}, x=rate)
    attainment = {"a": [0.99, 0.85, 0.95, 0.5], "b": [0.99, 0.95, 0.92, 0.91], "c": [0.5, 0.95, 0.2, 0.1]}
    df = pd.DataFrame([{rate: r, "scheduler.name": name, "attainment": values[r - 1], "num_gpus": 1}
                       for name, values in attainment.items() for r in (3, 1, 4, 2)])  # rows out of load order
    best = goodput(df, sweep, 0.9).set_index("scheduler.name")
    assert best["goodput_rate"].to_dict() == {"a": 1.0, "b": 4.0, "c": 0.0}
    assert best["non_monotone"].to_dict() == {"a": True, "b": False, "c": True}
    assert best["capped"].to_dict() == {"a": False, "b": True, "c": False}
    time_scale = "workload.trace.time_scale"  # heavier load at smaller scales
    sweep = SweepConfig(base={}, grid={time_scale: [1.0, 0.5, 0.25]}, x=time_scale)
    df = pd.DataFrame({time_scale: [1.0, 0.5, 0.25], "attainment": [0.95, 0.8, 0.93]})
    best = goodput(df, sweep, 0.9).iloc[0]
    assert best["goodput_time_scale"] == 1.0 and best["non_monotone"] and not best["capped"]


def test_sweep_goodput_on_a_time_scale_axis_is_the_fastest_replay_that_meets_the_target(tmp_path, capsys):
    """On ``workload.trace.time_scale`` a smaller scale replays the trace faster: the goodput is the lowest scale
    whose attainment meets the target (reported as ``goodput_time_scale``), not the highest, which is the lightest
    load (goodput.csv had read 2.0 here, the slowest replay)."""
    trace = Path(__file__).resolve().parents[1] / "workloads" / "burstgpt_schema_fixture.csv"
    base = {**BASE, "workload": {"trace": {"path": str(trace), "format": "burstgpt"}},
            "slo": {"ttft_s": 60.0, "tpot_s": 1.0}}
    path = write_sweep(tmp_path, {"workload.trace.time_scale": [2.0, 1.0, 0.5], "slo.ttft_s": [60.0, 0.001]},
                       base=base)
    assert main(["sweep", str(path), "--workers", "1"]) == 0
    best = pd.read_csv(tmp_path / "out" / "goodput.csv").set_index("slo.ttft_s")
    assert "goodput_rate" not in best
    assert best.loc[60.0, "goodput_time_scale"] == 0.5 and bool(best.loc[60.0, "capped"])
    assert pd.isna(best.loc[0.001, "goodput_time_scale"]) and not best.loc[0.001, "capped"]
    out = capsys.readouterr().out
    assert "goodput (lowest workload.trace.time_scale with attainment >= 90%)" in out
    assert "met the target at the lowest workload.trace.time_scale swept ('capped')" in out


def test_sweep_over_another_axis_writes_its_curves_but_no_goodput(tmp_path, capsys):
    """Goodput is a load: with x a grid path that is not an arrival rate or a time_scale (here the replica count)
    the curves are drawn against it, and no goodput.csv claims the highest replica count meeting the target as
    a rate."""
    path = tmp_path / "sweep.yaml"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path.write_text(yaml.safe_dump({"name": "t", "base": "base.yaml", "output_dir": "out", "x": "cluster.num_replicas",
                                    "grid": {"cluster.num_replicas": [1, 2], "workload.arrival.rate_per_s": [2.0]}}))
    assert main(["sweep", str(path), "--workers", "1"]) == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "goodput_curve.png" in files and "goodput.csv" not in files
    assert "no goodput.csv: x (cluster.num_replicas) is not an arrival rate" in capsys.readouterr().out


def test_a_point_whose_engine_stops_counts_as_missing_the_target(tmp_path, capsys):
    """A load at which the engine stops as vLLM v0's would (preemption by swap with the host's swap space full)
    is a result: the point reports the error with attainment 0, and the curve's goodput is the rate below it,
    not capped."""
    base = {**BASE, "scheduler": {"name": "fcfs", "preemption": "swap", "gpu_memory_utilization": 0.4,
                                  "swap_space_gib": 0.5},
            "workload": {"num_requests": 150, "arrival": {"kind": "poisson", "rate_per_s": 1.0},
                         "prompt_tokens": {"kind": "uniform", "min": 500, "max": 3000},
                         "output_tokens": {"kind": "uniform", "min": 100, "max": 1000}},
            "slo": {"ttft_s": 60.0, "tpot_s": 1.0}}
    path = write_sweep(tmp_path, {"workload.arrival.rate_per_s": [0.5, 30.0]}, base=base)
    assert main(["sweep", str(path), "--workers", "1", "-q"]) == 0
    df = pd.read_csv(tmp_path / "out" / "results.csv").set_index("workload.arrival.rate_per_s")
    assert pd.isna(df.loc[0.5, "error"]) and df.loc[0.5, "attainment"] >= 0.9
    assert "Aborted due to the lack of CPU swap space" in df.loc[30.0, "error"] and df.loc[30.0, "attainment"] == 0
    best = pd.read_csv(tmp_path / "out" / "goodput.csv").iloc[0]
    assert best["goodput_rate"] == 0.5 and not best["capped"]
