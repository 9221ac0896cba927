"""The ``llmsim`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmsim.errors import LLMSimError


def _cmd_run(args: argparse.Namespace) -> int:
    from llmsim.progress import progress

    from llmsim.config import load_config, parse_overrides
    from llmsim.config_notes import model_notes, unused_settings
    from llmsim.run import changed_inputs, format_summary, run_experiment

    cfg = load_config(args.config, parse_overrides(args.set))
    # Settings that have no effect, what the model has that is priced otherwise, and (a results folder's
    # config.yaml rerun) inputs changed since.
    model = _model(cfg)
    for line in unused_settings(cfg, model.num_experts) + model_notes(model) + changed_inputs(cfg):
        print(f"llmsim: note: {line}", file=sys.stderr)
    updates = {}
    if args.seed is not None:
        updates["seed"] = args.seed
    if args.step:
        updates["simulation"] = cfg.simulation.model_copy(update={"fast_forward": False})
    if updates:
        cfg = cfg.model_copy(update=updates)
    out = Path(args.out) if args.out else cfg.output_dir
    total = cfg.workload.num_requests
    with progress(total, "req", "arrivals", args.quiet) as bar:
        _, summary = run_experiment(cfg, on_progress=bar.update, output_dir=out)
    if not args.quiet:
        print(format_summary(summary))
    print(f"results written to {out}/ (requests.parquet, iterations.parquet, summary.json, config.yaml)")
    return 0


def _model(cfg):
    from llmsim.models.spec import load_model

    m = cfg.model
    return load_model(m.name, m.dtype, m.activation_dtype, m.kv_cache_dtype)


def _cmd_models(args: argparse.Namespace) -> int:
    from llmsim.models.spec import catalog, load_model

    print(f"{'model':<15}{'params':>9}{'layers':>8}{'hidden':>8}{'heads':>7}{'kv':>5}{'experts':>9}")
    for name in catalog():
        m = load_model(name)
        print(f"{name:<15}{m.num_params / 1e9:8.1f}B{m.num_layers:>8}{m.hidden_size:>8}{m.num_heads:>7}"
              f"{m.num_kv_heads:>5}{m.num_experts:>9}")
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from llmsim.hardware.profile import available_profiles, load_profile

    print(f"{'device':<12}{'bf16/fp16 TFLOPS':>18}{'memory GiB':>12}{'TB/s':>7}  calibrated")
    for name in available_profiles():
        p = load_profile(name)
        peak = p.peak_flops.get("bf16") or p.peak_flops.get("fp16") or max(p.peak_flops.values())
        print(f"{name:<12}{peak / 1e12:18.1f}{p.memory_bytes / 2**30:12.0f}"
              f"{p.memory_bandwidth_bytes_per_s / 1e12:7.2f}  {'yes' if p.calibrated else 'no'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from llmsim.config import load_config, parse_overrides, read_yaml

    raw = read_yaml(Path(args.config), "config")
    if isinstance(raw, dict) and "base" in raw:  # a sweep or a plan search: every point or candidate
        return _check_points(args, raw)
    from llmsim.cluster.simulation import build_pools
    from llmsim.config_notes import model_notes, unused_settings
    from llmsim.workload.build import check_trace_rows, checked_workload

    cfg = load_config(args.config, parse_overrides(args.set))
    model, pools, max_len = build_pools(cfg)  # every pool's plan: a DistServe decode pool may not fit alone
    check_trace_rows(cfg.workload)  # every row the run would read
    checked_workload(cfg.workload, cfg.seed)  # it had said "valid" where run found no request
    print(f"{args.config}: valid. {_memory_plan(cfg, model, pools, max_len)}")
    for line in unused_settings(cfg, model.num_experts) + model_notes(model):
        print(f"llmsim: note: {line}", file=sys.stderr)
    return 0


def _memory_plan(cfg, model, pools, max_len: int) -> str:
    """The model, device and each pool's per-GPU memory plan, in one line."""
    gib = 2**30
    plans = []
    for pool in pools:
        ex, memory = pool.execution, pool.memory
        role = f"{pool.num_replicas}x " if pool.role == "colocated" else f"{pool.role} pool ({pool.num_replicas}x) "
        swap_blocks = pool.host_swap_blocks(cfg)
        host = f", host swap space {swap_blocks} KV blocks" if swap_blocks is not None else ""
        plans.append(f"{role}TP={ex.plan.tp} PP={ex.plan.pp}: per GPU weights {memory.weights_bytes / gib:.1f} GiB, "
                     f"activations {memory.activation_bytes / gib:.2f} GiB, {memory.num_blocks} KV blocks "
                     f"({memory.num_blocks * cfg.scheduler_for(pool.role).block_size} tokens){host} per replica")
    return (f"{model.name} ({model.num_params / 1e9:.1f}B) on {pools[0].execution.hardware.name}, " + "; ".join(plans)
            + f", max_model_len {max_len}")


def _check_points(args: argparse.Namespace, raw: dict) -> int:
    """``llmsim check`` on a sweep or a plan-search file: loading it checks every point's (every candidate's)
    config as the command does before it runs anything; then each one's memory plan, or why it does not fit (which
    the command reports in that point's row rather than stopping)."""
    from llmsim.cluster.simulation import build_pools
    from llmsim.config import parse_overrides
    from llmsim.errors import ConfigError, PlanError

    from llmsim.workload.build import check_trace_rows, checked_workload

    overrides = parse_overrides(args.set)
    if "candidates" in raw:
        from llmsim.plan_search import candidate_label, load_plan_search

        _, _, candidates = load_plan_search(args.config, overrides)
        labelled = [(candidate_label(c.values), c.probe, c.error) for c in candidates]
        what = "candidates"
    else:
        from llmsim.sweep.spec import load_sweep

        _, points = load_sweep(args.config, overrides)
        labelled = [(point.name, point.config, "") for point in points]
        what = "points"
    failing = 0
    for label, cfg, error in labelled:
        if cfg is not None:
            check_trace_rows(cfg.workload)  # a bad row stops the sweep or plan before anything runs
            try:
                model, pools, max_len = build_pools(cfg)
                checked_workload(cfg.workload, cfg.seed)
                error = ""
            except (PlanError, ConfigError) as exc:  # what the point's (candidate's) run would fail with, in its row
                error = str(exc)
        failing += bool(error)
        print(f"{label}: " + (error.replace("\n", " ") if error else _memory_plan(cfg, model, pools, max_len)))
    print(f"{args.config}: {len(labelled)} {what}, " + (f"{failing} of them will be rows with their error (above)"
                                                        if failing else "all valid"))
    return 0


def _command_line(argv_name: str) -> str:
    return "llmsim " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("llmsim") else argv_name


def _cmd_sweep(args: argparse.Namespace) -> int:
    from llmsim.progress import progress

    from llmsim.results_folder import write_folder
    from llmsim.run import prepare_output
    from llmsim.sweep.execute import run_points, start_executor
    from llmsim.sweep.report import CURVE_FILES, curves, goodput, table
    from llmsim.sweep.spec import load_sweep

    from llmsim.config import parse_overrides

    from llmsim.workload.build import check_trace_rows

    sweep, points = load_sweep(args.sweep, parse_overrides(args.set))
    root = Path(args.out) if args.out else sweep.output_dir
    setting = "--out" if args.out else "output_dir"  # how the user chose the folder, for its errors
    start_executor(args.executor, args.workers, args.address)
    prepare_output(root, setting)
    for point in points:  # a bad trace row fails the sweep before any point runs (the same rows: read once)
        check_trace_rows(point.config.workload)
    with progress(len(points), "point", sweep.name, args.quiet) as bar:
        summaries = run_points(root, points, args.executor, args.workers, args.address,
                               on_done=lambda point, summary: bar.update(1))
    df = table(points, summaries)
    target = points[0].config.slo.attainment
    best = goodput(df, sweep, target)
    files = {"results.csv": lambda p: df.to_csv(p, index=False)}
    if not best.empty:
        files["goodput.csv"] = lambda p: best.to_csv(p, index=False)
    plots = curves(df, sweep, target)
    files.update(plots)
    # The sweep's own files together, results.csv last; none left from an earlier sweep of other points.
    write_folder(root, files, marker="results.csv", stale=[n for n in ("goodput.csv", *CURVE_FILES) if n not in files],
                 setting=setting)
    if not args.quiet:
        shown = [c for c in ("point", "attainment", "goodput_rps", "ttft_p90_s", "itl_p99_s", "j_per_output_token",
                             "error") if c in df]
        print(df[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if not best.empty:
            scale = "goodput_time_scale" in best
            heaviest = "lowest" if scale else "highest"
            print(f"\ngoodput ({heaviest} {sweep.x} with attainment >= {target:.0%}):")
            print(best.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
            found = best["goodput_time_scale"].notna() if scale else best["goodput_rate"] > 0.0
            capped, none = int(best["capped"].sum()), int((~found & ~best["non_monotone"]).sum())
            if capped:
                print(f"{capped} of {len(best)} curves met the target at the {heaviest} {sweep.x} swept ('capped'): "
                      "their goodput is at least that; extend the grid to measure it")
            if none:
                print(f"{none} of {len(best)} curves met the target at no {sweep.x} swept: their goodput is below "
                      "the lightest load swept")
            wavy = int(best["non_monotone"].sum())
            if wavy:
                print(f"{wavy} of {len(best)} curves met the target again at a heavier {sweep.x} after missing it "
                      "('non_monotone'): their goodput stops before the first miss")
    if best.empty and sweep.x is not None and not args.quiet:
        print(f"no goodput.csv: x ({sweep.x}) is not an arrival rate or a trace's time_scale")
    errors = int((df["error"].fillna("") != "").sum()) if "error" in df else 0
    print(f"{len(points)} points ({errors} failed) in {root}/: results.csv"
          + (", goodput.csv" if not best.empty else "") + "".join(f", {name}" for name in plots))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from llmsim.progress import progress

    from llmsim.plan_search import load_plan_search, run_plan_search
    from llmsim.results_folder import write_folder
    from llmsim.sweep.execute import start_executor
    from llmsim.run import prepare_output

    from llmsim.config import parse_overrides

    cfg, base, candidates = load_plan_search(args.plan, parse_overrides(args.set))
    out = Path(args.out) if args.out else cfg.output_dir
    setting = "--out" if args.out else "output_dir"  # how the user chose the folder, for its errors
    start_executor(args.executor, args.workers, args.address)
    prepare_output(out, setting)
    with progress(len(candidates), "plan", cfg.name, args.quiet) as bar:
        df = run_plan_search(cfg, base, candidates, out / "runs", args.executor, args.workers, args.address,
                             on_done=lambda: bar.update(1))
    write_folder(out, {"plans.csv": lambda p: df.to_csv(p, index=False)}, marker="plans.csv", setting=setting)
    shown = [c for c in (*cfg.candidates, "replicas", "goodput_rate", "goodput_per_gpu", "goodput_per_dollar",
                         "goodput_per_watt", "j_per_output_token", "error") if c in df]
    print(f"{cfg.name}: {cfg.gpus} GPUs per plan, ranked by {cfg.rank_by} "
          "(goodput = highest req/s with SLO attainment at target)")
    print(df[shown].head(args.top).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    capped = int(df["capped"].fillna(False).astype(bool).sum()) if "capped" in df else 0
    if capped:
        plans = "1 plan" if capped == 1 else f"{capped} plans"
        print(f"{plans} met the SLO at rates.max ({cfg.rates.max:g} req/s), the highest rate the search tries: "
              "goodput at least that ('capped' in plans.csv); raise rates.max to measure it")
    print(f"{len(df)} candidates in {out}/plans.csv")
    return 0


def _cmd_microbench(args: argparse.Namespace) -> int:
    try:
        from llmsim.microbench.run import main as microbench
    except ImportError as exc:
        raise LLMSimError(f"microbench needs torch: pip install -e '.[bench]' ({exc})") from None
    from llmsim.run import prepare_output_file

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.threads is not None and args.threads > cores:
        # More threads than cores times the kernels with threads waiting their turn (and 100,000 of them had
        # crashed OpenMP out of memory).
        raise LLMSimError(f"--threads {args.threads}: this machine lets llmsim use {cores} cores")
    from llmsim.calibration.measurements import OPS

    for op in args.op or ():
        if op not in OPS:
            raise LLMSimError(f"--op {op}: unknown op; allowed: {', '.join(OPS)}")
    prepare_output_file(Path(args.out), "--out")
    try:
        df = microbench(args.device, Path(args.out), args.grid, args.dtype, args.warmup, args.repetitions,
                        not args.no_collectives, args.quiet, args.threads, tuple(args.op) if args.op else None)
    except (RuntimeError, ValueError) as exc:
        raise LLMSimError(str(exc)) from None
    print(f"{args.out}: {len(df)} measurements ({', '.join(f'{op} {n}' for op, n in df['op'].value_counts().items())})")
    return 0


def _cmd_import_vidur(args: argparse.Namespace) -> int:
    from llmsim.calibration.measurements import write_measurements
    from llmsim.calibration.vidur import import_vidur
    from llmsim.run import prepare_output_file

    prepare_output_file(Path(args.out), "--out")
    df = import_vidur(args.root, args.device, args.node)
    write_measurements(df, args.out)
    print(f"{args.out}: {len(df)} rows ({', '.join(f'{op} {n}' for op, n in df['op'].value_counts().items())})")
    return 0


def _cmd_import_aiconfigurator(args: argparse.Namespace) -> int:
    from llmsim.calibration.aiconfigurator import import_aiconfigurator
    from llmsim.calibration.measurements import write_measurements
    from llmsim.run import prepare_output_file

    prepare_output_file(Path(args.out), "--out")
    df = import_aiconfigurator(args.root, args.device, args.gpus_per_node)
    write_measurements(df, args.out)
    print(f"{args.out}: {len(df)} rows ({', '.join(f'{op} {n}' for op, n in df['op'].value_counts().items())})")
    return 0


def _cmd_calibrate_cpu(args: argparse.Namespace) -> int:
    from llmsim.calibration.cpu_overhead import calibrate_cpu, write_profile
    from llmsim.run import prepare_output_file

    prepare_output_file(Path(args.out), "--out")
    doc, table = calibrate_cpu(args.measurements, args.hold_out_model, args.check, Path(args.out).stem, args.source)
    write_profile(doc, args.out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{args.out}: " + ", ".join(f"{k}={v}" for k, v in doc["params"].items()))
    return 0


def _cmd_validate_e2e(args: argparse.Namespace) -> int:
    from llmsim.e2e.workflow import summary, validate_e2e

    out = Path(args.out)
    table, check = validate_e2e(Path(args.dir), args.device, out, args.runs, args.max_requests,
                                on_run=lambda name: print(f"replayed {name}", flush=True), intervals=args.intervals)
    print(summary(table).to_string(float_format=lambda v: f"{v:.3f}"))
    failed = check.loc[~check["passes"], "experiment"].tolist()
    print(f"overload check: {int(check['passes'].sum())} of {len(check)} runs pass"
          + (f" (not: {', '.join(failed)})" if failed else ""))
    print(f"{out}/: e2e_errors.csv, e2e_overload.csv, e2e_step_check.csv, e2e_report.md, e2e_parity.png"
          + (", e2e_intervals.csv" if args.intervals else ""))
    return 0


def _print_errors(table, split: str) -> None:
    part = table[table["split"] == split]
    if part.empty:
        return
    print(f"{split}:  {'op':<32}{'rows':>7}{'MAPE':>8}{'P90':>8}{'max':>8}{'bias':>8}")
    for r in part.itertuples(index=False):
        print(f"       {r.op:<32}{r.rows:>7}{r.mape:8.1%}{r.p90:8.1%}{r.max:8.1%}{r.bias:+8.1%}")


def _report_dir(args: argparse.Namespace, profile: Path) -> Path:
    from llmsim.calibration.workflow import default_report_dir

    return Path(args.report_dir) if args.report_dir else default_report_dir(profile)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from llmsim.calibration.fit import Split
    from llmsim.calibration.workflow import profile_path, run_calibration
    from llmsim.run import output_folder, prepare_output_file

    path = profile_path(args.device)
    out = Path(args.out) if args.out else path
    split = Split(tuple(args.hold_out_model), tuple(args.hold_out_workers), tuple(args.hold_out_heads),
                  tuple(args.hold_out_gemm_k), args.gemm_source)
    command = _command_line(f"llmsim calibrate --device {args.device} "
                            + " ".join(f"--measurements {m}" for m in args.measurements))
    report_dir = _report_dir(args, out)
    prepare_output_file(out, "--out")
    with output_folder(report_dir, "--report-dir"):  # a folder it made goes again if the fit fails
        profile, result = run_calibration(path, [Path(m) for m in args.measurements], split, out, report_dir,
                                          command)
    for split_name in ("fit", "held-out", "l2-resident"):
        _print_errors(result.table, split_name)
    print(f"fitted profile written to {out}; report {result.report_path}, parity plot {result.plot_path}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from llmsim.calibration.workflow import profile_path, validate
    from llmsim.run import output_folder

    path = profile_path(args.device)
    measurements = [Path(m) for m in args.measurements] if args.measurements else None
    command = _command_line(f"llmsim validate --device {args.device}")
    report_dir = _report_dir(args, path)
    with output_folder(report_dir, "--report-dir"):  # a folder it made goes again if the validation fails
        result = validate(path, measurements, report_dir, command)
    for split_name in ("fit", "held-out", "l2-resident"):
        _print_errors(result.table, split_name)
    print(f"report {result.report_path}, parity plot {result.plot_path}")
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n}: must be at least {low}")
        return n
    return parse


_positive = _at_least(1)


def _version() -> str:
    from llmsim.version import code_version

    return code_version()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmsim", description="Discrete-event simulator of LLM serving clusters.")
    parser.add_argument("--version", action="version", version=f"llmsim {_version()}",
                        help="the llmsim version and its source digest (recorded in every result's config.yaml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    set_help = ("override a config value by its dotted path before validation, e.g. "
                "--set workload.arrival.rate_per_s=4 (repeatable; values are YAML)")

    run = sub.add_parser("run", help="run one experiment YAML and write its results folder",
                         description="Simulate one experiment: writes requests.parquet, iterations.parquet, "
                                     "summary.json and config.yaml, and prints a summary table.")
    run.add_argument("config", help="experiment YAML")
    run.add_argument("--out", help="results folder (default: output_dir from the config)")
    run.add_argument("--seed", type=_at_least(0), help="override the config's seed")
    run.add_argument("--step", action="store_true",
                     help="step every iteration instead of fast-forwarding decode runs (same results, slower)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    run.add_argument("--set", action="append", metavar="PATH=VALUE", help=set_help)
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate an experiment YAML and show its memory plan (of a sweep's every "
                                         "point, of a plan search's every candidate)")
    check.add_argument("config", help="experiment, sweep or plan-search YAML")
    check.add_argument("--set", action="append", metavar="PATH=VALUE", help=set_help)
    check.set_defaults(func=_cmd_check)

    models = sub.add_parser("models", help="list the model catalog")
    models.set_defaults(func=_cmd_models)

    devices = sub.add_parser("devices", help="list hardware profiles")
    devices.set_defaults(func=_cmd_devices)

    sw = sub.add_parser("sweep", help="run a grid of experiments in parallel; table, goodput and energy curves",
                        description="Expand a sweep YAML (base experiment + grid of dotted-path overrides), run the "
                                    "points in parallel (resuming finished ones), write results.csv, goodput.csv "
                                    "and goodput/energy curve PNGs.")
    sw.add_argument("sweep", help="sweep YAML")
    sw.add_argument("--out", help="results folder (default: output_dir from the sweep file)")
    sw.add_argument("--executor", choices=("local", "ray"), default="local")
    sw.add_argument("--workers", type=_positive, help="local processes (default: CPU count)")
    sw.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    sw.add_argument("-q", "--quiet", action="store_true")
    sw.add_argument("--set", action="append", metavar="PATH=VALUE", help=set_help + ' (to the base experiment)')
    sw.set_defaults(func=_cmd_sweep)

    pl = sub.add_parser("plan", help="search device x parallelism x replicas x scheduler for the best goodput",
                        description="For each candidate plan on a fixed GPU budget, find DistServe's goodput (the "
                                    "highest rate meeting the SLO attainment target) by doubling and bisection, "
                                    "then rank by goodput per GPU, per dollar or per watt. Each rate tried is a "
                                    "results folder under OUT/runs/; a rerun reads finished ones back.")
    pl.add_argument("plan", help="plan-search YAML")
    pl.add_argument("--out", help="results folder (default: output_dir from the plan file)")
    pl.add_argument("--executor", choices=("local", "ray"), default="local")
    pl.add_argument("--workers", type=_positive, help="local processes (default: CPU count)")
    pl.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    pl.add_argument("--top", type=_positive, default=20, help="rows to print")
    pl.add_argument("-q", "--quiet", action="store_true")
    pl.add_argument("--set", action="append", metavar="PATH=VALUE", help=set_help + ' (to the base experiment)')
    pl.set_defaults(func=_cmd_plan)

    mb = sub.add_parser("microbench", help="time the execution model's ops with torch on this machine's device",
                        description="Measure GEMMs (layer shapes and bare m x n x k; also in FP8, per-tensor and "
                                    "block-scaled, on an NVIDIA GPU with FP8 tensor cores), fused-MoE layers "
                                    "(--grid full), attention (SDPA), norms, activation, rotary, add, embedding, "
                                    "memory copies and collectives; write the measurements CSV that calibrate reads.")
    mb.add_argument("--device", choices=("cpu", "cuda", "rocm"), default="cpu")
    mb.add_argument("--out", required=True, help="measurements CSV to write (.csv or .csv.gz)")
    mb.add_argument("--grid", choices=("small", "full"), default="small",
                    help="small: a minute on a CPU; full: the catalog's dense models, TP 1-8, 1-4096 tokens, and "
                         "five MoE expert shapes, TP 1-8, 1-8192 tokens")
    mb.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp32 on cpu, bf16 on GPUs")
    mb.add_argument("--warmup", type=_at_least(0), default=2)
    mb.add_argument("--repetitions", type=_positive, default=7)
    mb.add_argument("--no-collectives", action="store_true", help="skip the torch.distributed collectives")
    mb.add_argument("--threads", type=_positive, help="CPU threads for torch (default: every core)")
    mb.add_argument("--op", action="append", metavar="OP",
                    help="time only the grid's rows of this op (repeatable; e.g. gemm, moe, attn_decode; "
                         "all_reduce, all_gather or send_recv times the collectives)")
    mb.add_argument("-q", "--quiet", action="store_true")
    mb.set_defaults(func=_cmd_microbench)

    imp = sub.add_parser("import-vidur", help="convert Vidur profiling CSVs to the measurements schema")
    imp.add_argument("root", help="Vidur profiling folder (with compute/ and network/)")
    imp.add_argument("--device", required=True, help="device folder under compute/, e.g. a100")
    imp.add_argument("--node", help="network folder to include, e.g. a100_dgx")
    imp.add_argument("--out", required=True, help="measurements CSV to write (.csv or .csv.gz)")
    imp.set_defaults(func=_cmd_import_vidur)

    aic = sub.add_parser("import-aiconfigurator",
                         help="convert NVIDIA aiconfigurator's measured vLLM kernel tables to the measurements schema")
    aic.add_argument("root", help="aiconfigurator's systems/data/<gpu>/ folder")
    aic.add_argument("--device", required=True, help="profile name to record on the rows, e.g. h100-sxm")
    aic.add_argument("--gpus-per-node", type=_positive, default=8)
    aic.add_argument("--out", required=True, help="measurements CSV to write (.csv or .csv.gz)")
    aic.set_defaults(func=_cmd_import_aiconfigurator)

    cal = sub.add_parser("calibrate", help="fit a hardware profile's efficiencies to measured kernel latencies",
                         description="Fit every op kind and collective present in the measurements, write the "
                                     "fitted profile, then validate it on fitted and held-out rows.")
    cal.add_argument("--device", required=True, help="profile name, unique prefix (a100) or profile YAML path")
    cal.add_argument("--measurements", required=True, action="append",
                     help="measurements CSV (llmsim microbench, import-vidur or import-aiconfigurator); repeatable")
    cal.add_argument("--hold-out-model", action="append", default=[], metavar="MODEL",
                     help="keep this model's rows out of the fit (repeatable)")
    cal.add_argument("--hold-out-workers", action="append", default=[], type=_positive, metavar="N",
                     help="keep collectives over N workers out of the fit (repeatable)")
    cal.add_argument("--hold-out-heads", action="append", default=[], metavar="Q/KV",
                     help="keep attention rows of this head layout per GPU (e.g. 32/8) out of the fit (repeatable)")
    cal.add_argument("--hold-out-gemm-k", action="append", default=[], type=_positive, metavar="K",
                     help="keep bare GEMMs with this inner dimension (e.g. 5120) out of the fit (repeatable)")
    cal.add_argument("--gemm-source", metavar="PREFIX",
                     help="fit the GEMM curves only on rows whose source starts with PREFIX (e.g. aiconfigurator: "
                          "the engine version to model); other sources' GEMMs are validated as held-out")
    cal.add_argument("--out", help="where to write the fitted profile (default: overwrite the profile)")
    cal.add_argument("--report-dir", help="folder for the markdown report and parity plot (default: validation/ "
                                          "beside the written profile)")
    cal.set_defaults(func=_cmd_calibrate)

    cpu = sub.add_parser("calibrate-cpu", help="fit an engine's CPU time per step to Vidur's measured CPU overheads",
                         description="Fit the per-step, per-request and per-sampled-token CPU terms; report the "
                                     "fit, held-out models and other hosts' files separately.")
    cpu.add_argument("--measurements", required=True, help="Vidur cpu_overheads.csv to fit on")
    cpu.add_argument("--hold-out-model", action="append", default=[], metavar="MODEL",
                     help="keep this model's rows out of the fit (repeatable)")
    cpu.add_argument("--check", action="append", default=[], metavar="CSV",
                     help="another host's cpu_overheads.csv to validate on, never fitted (repeatable)")
    cpu.add_argument("--source", default="", help="where the measurements come from (recorded in the profile)")
    cpu.add_argument("--out", required=True, help="profile YAML to write, e.g. hardware_profiles/cpu_overhead/"
                                                  "vllm_v0.yaml")
    cpu.set_defaults(func=_cmd_calibrate_cpu)

    val = sub.add_parser("validate", help="predicted vs measured per op: MAPE, max error, parity plot, report")
    val.add_argument("--device", required=True, help="profile name, unique prefix (a100) or profile YAML path")
    val.add_argument("--measurements", action="append",
                     help="measurements CSV (default: the ones the profile was fitted on); repeatable. Rows of "
                          "shapes the fit never saw are reported as held-out")
    val.add_argument("--report-dir", help="folder for the markdown report and parity plot (default: validation/ "
                                          "beside the profile)")
    val.set_defaults(func=_cmd_validate)
    e2e = sub.add_parser("validate-e2e", help="replay measured serving runs and compare TTFT, E2E, TPOT, throughput",
                         description="Replay every measured run under DIR (DIR/replay/<exp>.json.gz with its "
                                     "_ground_truth file; DIR/runs/<exp>/profile.yaml and exp-config.yaml when "
                                     "present) on the device's profile with vllm_v1 and prefix caching, and write "
                                     "OUT/e2e_errors.csv (experiment, stage, metric, predicted, measured, "
                                     "rel_error), the step check (OUT/e2e_step_check.csv: measured time per "
                                     "output token over the modelled steps at the measured batch and KV), "
                                     "OUT/e2e_report.md and OUT/e2e_parity.png.")
    e2e.add_argument("dir", help="folder with replay/ (and runs/, model_configs/)")
    e2e.add_argument("--device", default="h100-sxm", help="hardware profile the runs were measured on")
    e2e.add_argument("--out", default="results/validate_e2e", help="folder for the table, report and plot")
    e2e.add_argument("--runs", action="append", metavar="SUBSTRING",
                     help="only runs whose name contains this (repeatable)")
    e2e.add_argument("--max-requests", type=_positive, help="replay only each run's first N requests (a quick slice)")
    e2e.add_argument("--intervals", type=_positive, default=0, metavar="N",
                     help="also replay each run under N samples of the profile's held-out kernel errors and write "
                          "5th-95th percentile intervals and their coverage (OUT/e2e_intervals.csv; N x the time)")
    e2e.set_defaults(func=_cmd_validate_e2e)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LLMSimError as exc:
        print(f"llmsim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmsim: interrupted (results written so far are complete; a sweep or plan resumes where it "
              "stopped)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
