"""Run one experiment end to end and write its results folder."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml

from llmsim.cluster.migration import migration_line
from llmsim.cluster.simulation import SimulationResult, simulate
from llmsim.config import ExperimentConfig
from llmsim.errors import ConfigError
from llmsim.hardware.profile import profile_files
from llmsim.metrics.recorder import ReplicaTotals
from llmsim.metrics.summary import ReplicaUsage, add_derived_columns, pooled_slo, summarize
from llmsim.models.spec import hf_config_file
from llmsim.results_folder import first_missing, removed_if_left_empty, write_folder
from llmsim.version import code_version, file_digest
from llmsim.workload.build import check_trace_rows, checked_workload


def resolved_config(cfg: ExperimentConfig) -> dict:
    """The config as a results folder records it, with the llmsim that ran it and the content of the files it read
    (so that a sweep resumed after a trace, a model's config.json or a profile changed under the same path reruns
    the points that read it)."""
    return cfg.model_dump(mode="json") | {"llmsim_version": code_version(), "input_digests": input_digests(cfg)}


def changed_inputs(cfg: ExperimentConfig) -> list[str]:
    """What differs between the input files a config records (``input_digests``, in a results folder's config.yaml)
    and the files as they are now: rerun, it would not reproduce that folder's results."""
    if not cfg.input_digests:
        return []
    now = input_digests(cfg)
    return [f"{path} has changed since the config was recorded ({digest}, now {now[path]})" if path in now else
            f"{path}, which the config records ({digest}), is " + (
                "no longer one of its inputs" if Path(path).is_file() else "gone")
            for path, digest in cfg.input_digests.items() if now.get(path) != digest]


def input_digests(cfg: ExperimentConfig) -> dict[str, str]:
    """{path: digest} of every file the experiment reads besides llmsim's own (which ``code_version`` covers): its
    trace or lengths file, a HuggingFace config.json, a profile YAML given by path and the profiles it is based
    on. Files that do not exist are left out (reading them is the error)."""
    files = [section.path for section in (cfg.workload.trace, cfg.workload.lengths_from) if section is not None]
    model_file = hf_config_file(cfg.model.name)
    if model_file is not None:
        files.append(model_file)
    if Path(cfg.hardware.device).suffix:
        files += profile_files(cfg.hardware.device)
    return {str(path): file_digest(path) for path in map(Path, files) if path.is_file()}


RESULT_FILES = ("requests.parquet", "iterations.parquet", "summary.json", "config.yaml")


def prepare_output(out: Path, setting: str = "output_dir") -> None:
    """The results folder exists (or is created) and is writable -- checked before the simulation runs.
    ``setting``: what the user set it with, for the error."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{setting}: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot write to {out}: {exc.strerror}") from None


@contextmanager
def output_folder(out: Path, setting: str = "output_dir") -> Iterator[Path]:
    """For work that writes its results to ``out``: the folder checked first (``prepare_output``), and yielded as an
    absolute path; where this created it (with its parents), it goes again if the work fails or is interrupted
    while it is still empty, so a bad input or Ctrl-C leaves no empty results folder behind."""
    folder = Path(os.path.abspath(out))
    made = first_missing(folder)
    prepare_output(out, setting)
    with removed_if_left_empty(folder, made):
        yield folder


def prepare_output_file(path: Path, setting: str) -> None:
    """A file to write: not a folder, in a folder that exists (or is created) and is writable -- checked before
    the work that produces it."""
    if path.is_dir():
        raise ConfigError(f"{setting}: {path} is a folder, not a file")
    prepare_output(path.parent, setting)


def run_experiment(cfg: ExperimentConfig, on_progress: Callable[[int], None] | None = None,
                   output_dir: Path | None = None, write: bool = True) -> tuple[SimulationResult, dict]:
    """Simulate ``cfg`` and summarize it; with ``write``, into its results folder (``output_dir`` or the config's),
    which is checked first and, where this created it, removed again if the run fails or is interrupted."""
    if not write:
        return _run(cfg, on_progress, None)
    with output_folder(Path(output_dir or cfg.output_dir)) as out:
        return _run(cfg, on_progress, out)


def _run(cfg: ExperimentConfig, on_progress: Callable[[int], None] | None,
         out: Path | None) -> tuple[SimulationResult, dict]:
    if not cfg.in_worker_processes:  # workers route every request before they start
        check_trace_rows(cfg.workload)
    result = simulate(cfg, checked_workload(cfg.workload, cfg.seed), on_progress)
    rec = result.recorder
    requests = add_derived_columns(rec.request_frame())
    usage = []
    for rid, pool_index in enumerate(result.replica_pool):
        pool, t = result.pools[pool_index], rec.totals.get(rid) or ReplicaTotals()
        ex = pool.execution
        usage.append(ReplicaUsage(pool.num_gpus, pool.memory.num_blocks, ex.peak_flops, ex.bandwidth,
                                  pool.power.idle_w, t))
    summary = summarize(
        requests, usage, np.frombuffer(rec.tbt_gap_s, dtype=float), np.frombuffer(rec.tbt_count, dtype=np.int64),
        ttft_slo_s=cfg.slo.ttft_s, tpot_slo_s=cfg.slo.tpot_s, tbt_slo_s=cfg.slo.tbt_s,
        attainment_target=cfg.slo.attainment, pue=cfg.energy.pue,
        prefill_flops=result.pools[0].execution.prefill_flops if cfg.scheduler.prefix_caching else None,
        last_step_end_s=max(rec.last_end_s.values(), default=None))
    if result.num_not_arrived is not None:  # a cut-off (simulation.max_time_s): what came after it
        summary["requests"]["not_arrived"] = result.num_not_arrived
    if cfg.slo.definition == "pooled":
        summary["slo"] = pooled_slo(summary, cfg.slo.p99_itl_s, cfg.slo.median_queueing_s)
        summary.update(request_goodput=summary["slo"]["goodput_requests_per_s"])
    ex = result.execution
    summary = {
        "experiment": cfg.name,
        "llmsim_version": code_version(),
        "model": result.model.name,
        "device": ex.hardware.name,
        "parallel": {"tp": ex.plan.tp, "pp": ex.plan.pp, "replicas": len(result.replica_pool)},
        "policy": cfg.cluster.policy,
        "pools": [{"role": p.role, "tp": p.execution.plan.tp, "pp": p.execution.plan.pp, "replicas": p.num_replicas,
                   "kv_blocks_per_replica": p.memory.num_blocks} for p in result.pools],
        "scheduler": cfg.scheduler.name,
        "kv_blocks_per_replica": result.memory.num_blocks,
        **summary,
        **({"migration": result.migration.summary()} if result.migration is not None else {}),
        **({"kv_copies": result.kv_copies.summary()} if result.kv_copies is not None else {}),
        **_kernel_builds(result.moe_compiles),
        **_host_swap(cfg, result),
        "simulation": {"simulated_s": result.sim_time_s, "wall_s": result.wall_s,
                       "requests_per_wall_s": result.num_arrived / max(result.wall_s, 1e-9)},
    }
    if out is not None:
        write_results(out, cfg, requests, rec, summary)
    return result, summary


def write_results(out: Path, cfg: ExperimentConfig, requests, rec, summary: dict) -> None:
    """Complete or absent, never mixed (``results_folder.write_folder``): ``config.yaml`` (what a resumed sweep
    checks) goes first and comes back last, so a run killed half-way leaves no ``config.yaml`` and nothing counts
    it as done."""
    files = {"requests.parquet": lambda p: requests.to_parquet(p, index=False)}
    if rec.record_iterations:
        iterations = rec.iteration_frame().sort_values(["replica_id", "start_s"], kind="stable")
        files["iterations.parquet"] = lambda p: iterations.reset_index(drop=True).to_parquet(p, index=False)
    files["summary.json"] = lambda p: p.write_text(json.dumps(summary, indent=2))
    # The folder it is in, which ``--out`` may have set: rerun from it, it writes there again.
    config = resolved_config(cfg) | {"output_dir": str(out)}
    files["config.yaml"] = lambda p: p.write_text(yaml.safe_dump(config, sort_keys=False))
    write_folder(out, files, marker="config.yaml", stale=[n for n in RESULT_FILES if n not in files])


def _kernel_builds(moe_compiles: list) -> dict:
    """Fused-MoE kernel variants built while serving (a cold Triton cache), summed over replicas, and the time
    steps waited for them; nothing for a model or setting that builds none."""
    engines = [e for e in moe_compiles if e is not None]
    if not engines:
        return {}
    built = sum(e.num_built_serving for e in engines)
    return {"kernel_builds": {"fused_moe_variants": built,
                              "wait_s": sum(e.num_built_serving * e.variant_s for e in engines)}}


def _host_swap(cfg: ExperimentConfig, result: SimulationResult) -> dict:
    """With preemption by swap: the most KV blocks any replica had swapped out to the host at once, and that as a
    share of its host swap space (vLLM's "CPU KV cache usage"); nothing otherwise."""
    capacity = [result.pools[i].host_swap_blocks(cfg) or 0 for i in result.replica_pool]
    if not any(capacity):
        return {}
    peaks = result.peak_swapped_blocks
    return {"host_swap": {"peak_blocks": max(peaks),
                          "peak_share": max(p / c for p, c in zip(peaks, capacity) if c)}}


def _policy_lines(summary: dict) -> list[str]:
    lines = []
    pc = summary.get("prefix_cache")
    if pc is not None:
        lines.append(f"prefix cache: {pc['hit_rate_tokens']:.1%} of prompt tokens cached, "
                     f"{pc['hit_rate_requests']:.1%} of requests hit, "
                     f"{pc['prefill_flops_saved'] / 1e12:.1f} TFLOP of prefill saved")
    if "host_swap" in summary:
        h = summary["host_swap"]
        lines.append(f"host swap space: at most {h['peak_blocks']} KV blocks swapped out at once, "
                     f"{h['peak_share']:.1%} of a replica's")
    if "migration" in summary:
        lines.append(migration_line(summary["migration"]))
    if summary.get("kernel_builds", {}).get("fused_moe_variants"):
        k = summary["kernel_builds"]
        lines.append(f"fused-MoE kernel variants built while serving (cold Triton cache): {k['fused_moe_variants']}, "
                     f"steps waited {k['wait_s']:.1f} s")
    if "kv_copies" in summary:
        k = summary["kv_copies"]
        lines.append(f"KV copies between instances: {k['copies']} ({k['bytes'] / 1e9:.2f} GB), up to "
                     f"{k['max_concurrent']} at once, {k['copies_slowed']} slowed by another on a shared link")
    for priority, g in summary.get("by_priority", {}).items():
        ttft, tpot = g["ttft"]["p99_s"], g["tpot"]["mean_s"]
        lines.append(f"priority {priority}: {g['finished']} finished, TTFT P99 "
                     + (f"{ttft * 1e3:.1f} ms" if ttft is not None else "-") + ", TPOT mean "
                     + (f"{tpot * 1e3:.1f} ms" if tpot is not None else "-"))
    return lines


def _slo_line(slo: dict) -> str:
    if slo.get("definition") == "pooled":
        m = slo["measured"]
        itl = f"{m['p99_itl_s'] * 1e3:.0f} ms" if m["p99_itl_s"] is not None else "-"
        queue = f"{m['median_queueing_s']:.2f} s" if m["median_queueing_s"] is not None else "-"
        return (f"SLO, pooled (P99 ITL<={slo['p99_itl_s'] * 1e3:g} ms, median scheduling delay<="
                f"{slo['median_queueing_s']}s): P99 ITL {itl}, median delay {queue}: "
                f"{'met' if slo['meets_target'] else 'missed'}, goodput {slo['goodput_requests_per_s']:.2f} req/s")
    return (f"SLO (TTFT<={slo['ttft_s']}s, TPOT<={slo['tpot_s']}s"
            + (f", max TBT<={slo['tbt_s']}s" if slo.get("tbt_s") else "") + f"): attainment {slo['attainment']:.1%} "
            f"(target {slo['target']:.0%}: {'met' if slo['meets_target'] else 'missed'}), "
            f"goodput {slo['goodput_requests_per_s']:.2f} req/s")


def _energy_line(e: dict) -> str:
    per_token = e["j_per_output_token"]
    return (f"energy {e['total_j'] / 3.6e6:.3f} kWh (busy {e['busy_j'] / 3.6e6:.3f}, idle {e['idle_j'] / 3.6e6:.3f}, "
            f"PUE {e['pue']:g}): " + (f"{per_token:.3f} J/output token, " if per_token else "")
            + f"{e['output_tokens_per_j']:.2f} output tokens/J, mean {e['mean_power_w_per_gpu']:.0f} W/GPU")


def format_summary(summary: dict) -> str:
    """A readable table of the headline numbers."""
    def ms(section: dict, key: str) -> str:
        v = section.get(key)
        return f"{v * 1e3:9.1f}" if v is not None else f"{'-':>9}"

    r = summary["requests"]
    if summary.get("policy") == "distserve":
        plan = "DistServe: " + ", ".join(f"{p['role']} {p['replicas']}x TP={p['tp']} PP={p['pp']}"
                                         for p in summary["pools"])
    else:
        par = summary["parallel"]
        plan = f"TP={par['tp']}, PP={par['pp']}, replicas={par['replicas']}"
        if summary.get("policy") == "llumnix":
            plan = "Llumnix: " + plan
    lines = [
        f"{summary['experiment']}: {summary['model']} on {summary['device']} ({plan}, "
        f"scheduler={summary['scheduler']})",
        f"requests: {r['arrived']} arrived, {r['finished']} finished, {r['rejected']} rejected, "
        f"{r['in_flight']} in flight, "
        + (f"{r['not_arrived']} not arrived by max_time_s, " if r.get("not_arrived") else "")
        + (f"{r['timed_out']} timed out, " if r.get("timed_out") else "")
        + f"{r['preemptions']} preemptions, {r['migrations']} migrations",
        *([f"rejected, e.g. {r['rejected_example']}"] if r.get("rejected_example") else []),
        "",
        f"{'latency (ms)':<14}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}",
    ]
    for name in ("ttft", "tpot", "itl", "e2e", "queueing"):
        s = summary[name]
        lines.append(f"{name.upper():<14}{ms(s, 'mean_s')}{ms(s, 'p50_s')}{ms(s, 'p90_s')}{ms(s, 'p99_s')}")
    t, slo, u = summary["throughput"], summary["slo"], summary["utilization"]
    lines += [
        "",
        f"throughput: {t['requests_per_s']:.2f} req/s, {t['output_tokens_per_s']:.0f} output tok/s "
        f"over {t['duration_s']:.1f} s",
        _slo_line(slo),
        f"KV cache use {u['kv_cache_busy_mean']:.1%}, busy {u['busy_fraction']:.1%}, "
        f"MFU {u['mfu']:.1%}, MBU {u['mbu']:.1%}",
        _energy_line(summary["energy"]),
        *_policy_lines(summary),
        f"simulated {summary['simulation']['simulated_s']:.1f} s in {summary['simulation']['wall_s']:.2f} s wall "
        f"({summary['simulation']['requests_per_wall_s']:.0f} req/s)",
    ]
    return "\n".join(lines)
