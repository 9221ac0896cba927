import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from llmsim.cluster.simulation import simulate
from llmsim.errors import EngineAborted
from llmsim.request import Request
from llmsim.run import run_experiment
from tests.factories import assert_nothing_lost, make_config, make_requests


def outcome(cfg, requests=None):
    if requests is None:
        _, summary = run_experiment(cfg, write=False)
        return summary
    return simulate(cfg, requests)


def frames(result):
    return result.recorder.request_frame(), result.recorder.iteration_frame().sort_values(
        ["replica_id", "start_s"], kind="stable").reset_index(drop=True)


def test_every_request_is_accounted_for_and_kv_is_released():
    cfg = make_config()
    reqs = make_requests([(0.01 * i, 100 + (37 * i) % 3000, 1 + (i * 13) % 200) for i in range(150)]
                         + [(2.0, 5000, 10)])  # longer than Llama-2's 4096 context
    result = simulate(cfg, reqs)
    df = result.recorder.request_frame()
    assert sorted(df["id"]) == list(range(151))
    assert (df["status"] == "finished").sum() == 150
    rejected = df[df["status"] == "rejected"]
    assert list(rejected["id"]) == [150] and "max_model_len" in rejected["reason"].iloc[0]
    finished = df[df["status"] == "finished"]
    assert (finished["num_generated_tokens"] == finished["num_output_tokens"]).all()
    assert (finished["first_token_s"] >= finished["arrival_s"]).all()
    assert (finished["finish_s"] >= finished["first_token_s"]).all()
    for rep in result.replicas:
        assert rep.blocks.num_free_blocks == rep.blocks.num_blocks


def test_stopping_early_reports_in_flight():
    cfg = make_config(simulation={"max_time_s": 5.0})
    reqs = make_requests([(0.05 * i, 500, 400) for i in range(200)])
    result = simulate(cfg, reqs)
    df = result.recorder.request_frame()
    arrived = result.num_arrived
    assert len(df) == arrived and result.num_in_flight > 0
    assert set(df["status"]) <= {"finished", "in_flight", "rejected"}
    assert (df["status"] == "in_flight").sum() == result.num_in_flight
    # Nothing lost: the requests that reach the engine only after the cut-off are counted too.
    assert arrived == sum(1 for r in make_requests([(0.05 * i, 500, 400) for i in range(200)]) if r.arrival_s < 5.0)
    assert result.num_not_arrived == 200 - arrived > 0


def test_a_cut_off_counts_what_had_not_arrived(tmp_path):
    """``summary.json`` says how many requests came after ``simulation.max_time_s``, on a synthetic workload seen
    after a front end, and on closed-loop chat: every turn sent is arrived or not arrived."""
    from llmsim.run import run_experiment

    lengths = {"prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
               "output_tokens": {"kind": "uniform", "min": 1, "max": 300}}
    cfg = make_config(cluster={"num_replicas": 2, "router": "least_outstanding", "frontend_latency_s": 0.5},
                      simulation={"max_time_s": 3.0},
                      workload={"num_requests": 50, "arrival": {"kind": "poisson", "rate_per_s": 5.0}, **lengths})
    result, summary = run_experiment(cfg, write=False)
    arrivals = [r.arrival_s for r in _wl(cfg)]
    assert summary["requests"]["arrived"] == sum(a + 0.5 < 3.0 for a in arrivals)
    assert summary["requests"]["not_arrived"] == sum(a + 0.5 >= 3.0 for a in arrivals) > 0
    assert "not_arrived" not in run_experiment(make_config(), write=False)[1]["requests"]

    chat = make_config(simulation={"max_time_s": 20.0},
                       workload={"num_requests": 80, "arrival": {"kind": "poisson", "rate_per_s": 2.0}, **lengths,
                                 "conversation": {"mean_turns": 4, "mean_think_time_s": 5.0}})
    from llmsim.workload import build_workload
    loop = build_workload(chat.workload, chat.seed)
    result = simulate(chat, loop)
    assert loop.num_sent == result.num_arrived + result.num_not_arrived
    assert result.num_not_arrived > 0


@pytest.mark.parametrize("cluster", [
    {"num_replicas": 2, "router": "least_outstanding"},
    {"num_replicas": 2, "policy": "llumnix"},
    {"num_replicas": 2, "policy": "distserve", "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
])
def test_a_cut_off_after_the_work_ended_changes_nothing(cluster):
    """``simulation.max_time_s`` past the end of every request (clients' deadlines still queued after it) gives the
    run without one, its simulated span included (it had read the cut-off); one that stops work still going
    reports the span up to it."""
    from llmsim.run import run_experiment

    def summary(max_time_s):
        cfg = make_config(cluster=cluster, simulation={"max_time_s": max_time_s, "client_timeout_s": 1000.0},
                          workload={"num_requests": 40, "arrival": {"kind": "poisson", "rate_per_s": 8.0},
                                    "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                                    "output_tokens": {"kind": "uniform", "min": 1, "max": 300}})
        out = run_experiment(cfg, write=False)[1]
        out["simulation"] = out["simulation"]["simulated_s"]  # the rest: wall-clock readings
        return out, out["requests"].pop("not_arrived", None)

    (whole, _), (late, late_not_arrived) = summary(None), summary(900.0)
    assert late == whole and late_not_arrived == 0
    cut, not_arrived = summary(1.5)
    assert cut["requests"]["in_flight"] + not_arrived > 0
    assert cut["simulation"] == 1.5 < whole["simulation"]


def test_same_seed_is_bit_identical_and_seed_matters():
    a = frames(simulate(make_config(), _wl(make_config())))
    b = frames(simulate(make_config(), _wl(make_config())))
    assert a[0].equals(b[0]) and a[1].equals(b[1])
    c = frames(simulate(make_config(seed=8), _wl(make_config(seed=8))))
    assert not a[0].equals(c[0])


def _wl(cfg):
    from llmsim.workload import build_workload
    return build_workload(cfg.workload, cfg.seed)


def test_preemption_under_memory_pressure_still_finishes_everything():
    cfg = make_config(scheduler={"name": "fcfs", "gpu_memory_utilization": 0.24, "max_num_batched_tokens": 4096},
                      cluster={"num_replicas": 1})
    reqs = make_requests([(0.0, 1000, 1500) for _ in range(40)])
    result = simulate(cfg, reqs)
    df = result.recorder.request_frame()
    assert result.memory.num_blocks < 40 * 160  # cannot hold every request at once
    assert (df["status"] == "finished").all() and df["num_preemptions"].sum() > 0


SHARED_PREFIX = {"num_system_prompts": 3, "users_per_system_prompt": 4, "system_prompt_tokens": 300,
                 "question_tokens": 200, "output_tokens": 120, "multi_turn": True}


def scheduler_named(name: str) -> dict:
    """``vllm_v1_sync``: vLLM V1 without async scheduling (its default is on). ``vllm_v1_cpu``: with a CPU time
    per step that overlaps the GPU's (and at small batches outlasts it). fcfs, sarathi and spf add their CPU time."""
    if name == "vllm_v1_sync":
        return {"name": "vllm_v1", "async_scheduling": False}
    if name == "vllm_v1_cpu":
        return {"name": "vllm_v1", "cpu_overhead": "vllm_v0"}
    if name in ("fcfs_cached", "sarathi_cached"):  # vLLM v0 with --enable-prefix-caching
        return {"name": name.split("_")[0], "enable_prefix_caching": True}
    return {"name": name}


def traffic_lengths(traffic: str) -> dict:
    """The workload's lengths for the fast-forward property tests: unrelated prompts (``plain``), inference-perf's
    shared-prefix multi-turn chat, or closed-loop conversations whose turns wait for the previous answer."""
    if traffic == "shared_prefix":
        return {"shared_prefix": SHARED_PREFIX}
    lengths = {"prompt_tokens": {"kind": "lognormal", "median": 600, "sigma": 1.0, "max": 3000},
               "output_tokens": {"kind": "zipf", "a": 0.8, "min": 1, "max": 1000}}
    if traffic == "conversation":
        lengths["conversation"] = {"mean_turns": 3, "mean_think_time_s": 0.5}
    return lengths


@given(seed=st.integers(0, 2**31),
       scheduler=st.sampled_from(["fcfs", "fcfs_cached", "sarathi", "sarathi_cached", "vllm_v1", "vllm_v1_sync",
                                  "vllm_v1_cpu", "spf"]),
       rate=st.floats(1.0, 60.0), router=st.sampled_from(["round_robin", "least_outstanding", "prefix_aware"]),
       mem=st.sampled_from([0.22, 0.9]), preemption=st.sampled_from(["recompute", "swap", "swap_to_a_small_host"]),
       policy=st.sampled_from(["colocated", "distserve", "llumnix"]), high_priority=st.sampled_from([0.0, 0.2]),
       traffic=st.sampled_from(["plain", "shared_prefix", "conversation"]), timeout=st.sampled_from([None, 1.5]),
       budget=st.sampled_from([4096, 512]))
# Found by this test: a migrated request's cached prefix registered at its first decode step (stepping) or at the
# end of a decode run (fast-forward); a whole-prompt reservation (Sarathi) given one block too many by the
# decode fast path.
@example(seed=9376, scheduler="vllm_v1", rate=1.0, router="round_robin", mem=0.22, preemption="recompute",
         policy="llumnix", high_priority=0.2, traffic="shared_prefix", timeout=None,
         budget=4096)
@example(seed=28566, scheduler="sarathi", rate=5.75, router="round_robin", mem=0.22, preemption="recompute",
         policy="llumnix", high_priority=0.0, traffic="plain", timeout=None,
         budget=4096)
# Found by this test: a DistServe decode instance fast-forwarded while the head of its queue waited on a prefix
# the running requests were still generating (multi-turn), so stepping admitted it sooner.
@example(seed=927, scheduler="vllm_v1_sync", rate=52.0, router="round_robin", mem=0.22, preemption="recompute",
         policy="distserve", high_priority=0.2, traffic="shared_prefix", timeout=None,
         budget=4096)
# Found by this test: a check of whether the waiting head's cached prefix may grow that asked only whether a
# running request fills its first uncached block let Llumnix replicas fast-forward where stepping admitted sooner.
@example(seed=577, scheduler="fcfs_cached", rate=51.0, router="round_robin", mem=0.22, preemption="recompute",
         policy="llumnix", high_priority=0.0, traffic="shared_prefix", timeout=None,
         budget=4096)
# Found by this test: a mixed run that went on past its prompt's last chunk where that chunk was one token, which
# stepping schedules as a decode; a Llumnix replica that did not see a mixed run's prompt decoding, or its KV
# tokens.
@example(seed=4, scheduler="vllm_v1", rate=1.0, router="round_robin", mem=0.22, preemption="recompute",
         policy="llumnix", high_priority=0.2, traffic="plain", timeout=None,
         budget=4096)
@example(seed=268, scheduler="sarathi", rate=2.5, router="round_robin", mem=0.9, preemption="recompute",
         policy="colocated", high_priority=0.0, traffic="plain", timeout=None,
         budget=4096)
@example(seed=4, scheduler="sarathi", rate=1.0, router="round_robin", mem=0.22, preemption="recompute",
         policy="llumnix", high_priority=0.2, traffic="plain", timeout=None,
         budget=4096)
# Found by this test: a Llumnix replica whose mixed run held arrivals (async scheduling) that stepping had queued
# by priority showed them in arrival order, so the head of its queue, and its migration load, differed.
@example(seed=453, scheduler="vllm_v1", rate=16.0, router="round_robin", mem=0.22, preemption="recompute",
         policy="llumnix", high_priority=0.2, traffic="plain", timeout=None,
         budget=512)
def test_fast_forward_equals_stepping(seed, scheduler, rate, router, mem, preemption, policy, high_priority,
                                      traffic, timeout, budget):
    """Exactness: decode fast-forwarding gives bit-identical records to iteration-by-iteration stepping
    (vllm_v1 with prefix caching on, on shared-prefix multi-turn traffic, closed-loop conversations whose turns
    wait for the previous answer, or unrelated prompts). ``budget``: vLLM V1's token budget per step, which at
    512 chunks most prompts (mixed runs of several chunks) and at 4096 few."""
    lengths = traffic_lengths(traffic)

    def cfg(ff):
        return make_config(seed=seed, cluster={"num_replicas": 2, "router": router, "policy": policy,
                                               "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}},
                                               "llumnix": {"priority_headroom": 0.2}},
                           scheduler={**scheduler_named(scheduler), "gpu_memory_utilization": mem, "chunk_size": 256,
                                      # a host of a few blocks stops some runs (vLLM v0's swap abort): both alike
                                      "preemption": preemption[:4] if preemption.startswith("swap") else preemption,
                                      "swap_space_gib": 0.05 if preemption == "swap_to_a_small_host" else 4.0,
                                      "max_num_batched_tokens": budget if scheduler.startswith("vllm_v1") else 4096},
                           workload={"num_requests": 60, "arrival": {"kind": "gamma", "rate_per_s": rate, "cv": 2.0},
                                     **lengths, "high_priority_fraction": high_priority},
                           simulation={"fast_forward": ff,
                                       # clients that give up: aborts at boundaries
                                       "client_timeout_s": timeout})
    assert_fast_forward_equals_stepping(cfg)


def assert_fast_forward_equals_stepping(cfg, workload=_wl):
    """``cfg(fast_forward)`` run both ways, on ``workload(config)`` (default: the config's own), gives
    bit-identical request and iteration records and totals, and the same simulated span; returns the
    fast-forwarded result (or the error both stopped with)."""
    ff, step = cfg(True), cfg(False)
    a, b = _simulate_or_abort(ff, workload(ff)), _simulate_or_abort(step, workload(step))
    if isinstance(a, EngineAborted) or isinstance(b, EngineAborted):  # both stop at the same preemption
        assert str(a) == str(b) and a.at_s == b.at_s
        return a
    assert a.sim_time_s == b.sim_time_s
    assert (a.num_arrived, a.num_not_arrived) == (b.num_arrived, b.num_not_arrived)
    a_req, a_it = frames(a)
    b_req, b_it = frames(b)
    pd.testing.assert_frame_equal(a_req, b_req, check_exact=True)
    pd.testing.assert_frame_equal(a_it, b_it, check_exact=True)
    totals = ("busy_s", "flops", "num_bytes", "kv_block_s", "num_iterations")
    assert [a.recorder.total(f) for f in totals] == [b.recorder.total(f) for f in totals]
    assert token_gaps(a) == token_gaps(b)
    return a


def _simulate_or_abort(cfg, workload):
    """The simulation's result, or the error of an engine that stopped as vLLM v0's would (swap space full)."""
    try:
        return simulate(cfg, workload)
    except EngineAborted as exc:
        return exc


def token_gaps(result) -> dict[float, int]:
    """Tokens per inter-token gap (seconds): what the ITL summary is computed from, in whatever order and
    grouping the gaps were recorded."""
    counts: dict[float, int] = {}
    for gap, count in zip(result.recorder.tbt_gap_s, result.recorder.tbt_count):
        counts[gap] = counts.get(gap, 0) + count
    return counts


def test_skipping_iteration_records_changes_nothing_else():
    full = make_config(workload={"num_requests": 150, "arrival": {"kind": "poisson", "rate_per_s": 20.0},
                                 "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                                 "output_tokens": {"kind": "uniform", "min": 1, "max": 300}})
    lean = full.model_copy(update={"simulation": full.simulation.model_copy(update={"record_iterations": False})})
    _, a = run_experiment(full, write=False)
    result, b = run_experiment(lean, write=False)
    assert len(result.recorder.iterations["start_s"]) == 0
    assert b["utilization"]["iterations"] > 0
    for summary in (a, b):
        summary.pop("simulation")
    assert a == b


@pytest.mark.parametrize("scheduler, extra", [
    ("fcfs", {}),
    ("sarathi", {"frontend": True}),
    ("vllm_v1", {"shared_prefix": True, "timeout": True}),
    ("vllm_v1", {"record_iterations": False, "too_long": True}),
])
def test_replicas_in_worker_processes_give_the_results_of_one_process(scheduler, extra):
    """``simulation.workers``: the replicas of a round-robin cluster simulated in two processes, merged, are
    bit for bit the run in one (summary, request and iteration tables), with prefix caching, client timeouts,
    a front-end latency and requests rejected at arrival."""
    workload = {"num_requests": 240, "arrival": {"kind": "poisson", "rate_per_s": 30.0},
                "prompt_tokens": {"kind": "uniform", "min": 16, "max": 3000 if extra.get("too_long") else 1500},
                "output_tokens": {"kind": "uniform", "min": 1, "max": 300}}
    if extra.get("shared_prefix"):
        workload = {"num_requests": 240, "arrival": {"kind": "poisson", "rate_per_s": 30.0},
                    "shared_prefix": {"num_system_prompts": 4, "users_per_system_prompt": 3,
                                      "system_prompt_tokens": 600, "question_tokens": 100, "output_tokens": 60}}
    simulation = {"record_iterations": extra.get("record_iterations", True),
                  **({"client_timeout_s": 0.73} if extra.get("timeout") else {})}
    cluster = {"num_replicas": 3, "router": "round_robin",
               **({"frontend_latency_s": 0.004} if extra.get("frontend") else {})}
    scheduler_cfg = {**scheduler_named(scheduler), "max_num_batched_tokens": 4096,
                     **({"max_model_len": 2048} if extra.get("too_long") else {})}
    runs = []
    for workers in (1, 2):
        cfg = make_config(workload=workload, cluster=cluster, scheduler=scheduler_cfg,
                          simulation={**simulation, "workers": workers})
        result, summary = run_experiment(cfg, write=False)
        summary["simulated_s"] = summary.pop("simulation")["simulated_s"]  # the rest: wall-clock readings
        iterations = result.recorder.iteration_frame().sort_values(["replica_id", "start_s"], kind="stable")
        runs.append((summary, result.recorder.request_frame(), iterations.reset_index(drop=True)))
    (a, a_req, a_it), (b, b_req, b_it) = runs
    assert a == b
    pd.testing.assert_frame_equal(a_req, b_req, check_exact=True)
    pd.testing.assert_frame_equal(a_it, b_it, check_exact=True)
    assert len(a_req) == 240
    if extra.get("too_long"):
        assert (a_req["status"] == "rejected").any()
    if extra.get("timeout"):
        assert a["requests"]["timed_out"] > 0 and a["requests"]["finished"] > 0
    if extra.get("shared_prefix"):
        assert a["prefix_cache"]["hit_rate_tokens"] > 0.5


def test_with_fork_this_process_simulates_the_first_share_and_adopts_its_records(monkeypatch):
    """Forked workers: this process simulates the first share itself, meanwhile (one process fewer to start, and
    its records are not sent), and the merged recorder takes that share's columns as they are, without a copy;
    the second share's come from its worker, appended after them."""
    import multiprocessing
    import os

    import llmsim.cluster.workers as workers
    from llmsim.metrics.recorder import Recorder

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    here, shares, taken = os.getpid(), [], []
    simulate_share, absorb = workers._simulate_share, Recorder.absorb

    def watched_share(job):
        outcome = simulate_share(job)
        shares.append((os.getpid(), sorted(set(job[2].values()))))  # a forked worker's append stays in it
        return outcome

    def watched_absorb(self, other, columns=None):
        before = (other.tbt_gap_s, other.iterations["start_s"]) if columns is None else None
        absorb(self, other, columns)
        if before is not None:
            taken.append(self.tbt_gap_s is before[0] and self.iterations["start_s"] is before[1]
                         and len(other.tbt_gap_s) == 0)

    monkeypatch.setattr(workers, "_simulate_share", watched_share)
    monkeypatch.setattr(Recorder, "absorb", watched_absorb)
    cfg = make_config(cluster={"num_replicas": 4, "router": "round_robin"}, simulation={"workers": 2})
    result, _ = run_experiment(cfg, write=False)
    assert shares == [(here, [0, 2])] and taken == [True]
    assert sorted(set(result.recorder.iteration_frame()["replica_id"])) == [0, 1, 2, 3]


def test_worker_processes_started_by_spawn_give_the_same_results(monkeypatch):
    """Where fork is not available (macOS's default, Windows), jobs and records are pickled to and from spawned
    workers: the same results as one process."""
    import llmsim.cluster.workers as workers

    def runs(n: int):
        cfg = make_config(cluster={"num_replicas": 2, "router": "round_robin"},
                          scheduler={"name": "vllm_v1", "max_num_batched_tokens": 4096}, simulation={"workers": n})
        result, summary = run_experiment(cfg, write=False)
        summary.pop("simulation")
        return summary, result.recorder.request_frame()

    one, one_requests = runs(1)
    monkeypatch.setattr(workers.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    two, two_requests = runs(2)
    assert one == two
    pd.testing.assert_frame_equal(one_requests, two_requests, check_exact=True)


@pytest.mark.parametrize("fold_rows", [1, 7, 64])
def test_totals_do_not_depend_on_how_iteration_rows_are_folded(monkeypatch, fold_rows):
    """Without records the iteration rows are folded into the totals every ``_FOLD_ROWS`` rows, from the totals so
    far: any batching adds the same numbers in the same order as one fold at the end (and as records kept)."""
    import llmsim.metrics.recorder as recorder

    full = make_config(workload={"num_requests": 120, "arrival": {"kind": "poisson", "rate_per_s": 20.0},
                                 "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                                 "output_tokens": {"kind": "uniform", "min": 1, "max": 300}},
                       cluster={"num_replicas": 3})
    lean = full.model_copy(update={"simulation": full.simulation.model_copy(update={"record_iterations": False})})
    _, a = run_experiment(full, write=False)
    monkeypatch.setattr(recorder, "_FOLD_ROWS", fold_rows)
    result, b = run_experiment(lean, write=False)
    assert result.recorder.totals and len(result.recorder.iterations["duration_s"]) == 0
    for summary in (a, b):
        summary.pop("simulation")
    assert a == b


@given(st.lists(st.tuples(st.floats(0, 20), st.integers(1, 3000), st.integers(1, 600)), min_size=1, max_size=50),
       st.sampled_from(["fcfs", "sarathi", "vllm_v1", "vllm_v1_sync", "vllm_v1_cpu", "spf"]),
       st.sampled_from(["colocated", "llumnix"]))
def test_nothing_lost_property(specs, scheduler, policy):
    specs.sort()
    cfg = make_config(scheduler={**scheduler_named(scheduler), "gpu_memory_utilization": 0.22,
                                 "max_num_batched_tokens": 4096},
                      cluster={"num_replicas": 2, "policy": policy})
    result = simulate(cfg, make_requests(specs))
    df = assert_nothing_lost(result, len(specs))
    fin = df[df["status"] == "finished"]
    assert sum(result.recorder.tbt_count) == (fin["num_generated_tokens"] - 1).sum()  # no token lost or doubled
    too_long = np.array([p + o > 4096 for _, p, o in specs])
    assert (df.sort_values("id")["status"].to_numpy() == "rejected").tolist() == too_long.tolist()


def test_summary_fields():
    s = outcome(make_config())
    assert s["requests"]["arrived"] == 200
    assert s["requests"]["finished"] + s["requests"]["rejected"] + s["requests"]["in_flight"] == 200
    for key in ("ttft", "tpot", "itl", "e2e", "queueing"):
        assert s[key]["p50_s"] <= s[key]["p90_s"] <= s[key]["p99_s"]
    assert 0 <= s["slo"]["attainment"] <= 1 and 0 < s["utilization"]["mfu"] < 1


def test_every_token_after_the_first_has_one_gap():
    cfg = make_config(scheduler={"name": "sarathi", "gpu_memory_utilization": 0.22})
    result = simulate(cfg, _wl(cfg))
    df = result.recorder.request_frame()
    assert df["num_preemptions"].sum() > 0  # the invariant must also hold across recompute
    assert sum(result.recorder.tbt_count) == (df["num_generated_tokens"] - 1).clip(lower=0).sum()


def test_clients_that_give_up_are_aborted_and_accounted_for():
    """An overloaded replica with clients that wait at most 2 s: the server aborts each request at its next
    boundary after the deadline (its KV freed); every request ends finished or timed out, the same with
    fast-forward and stepping."""
    specs = [(0.25 * i, 1500 + (97 * i) % 1500, 20 + (31 * i) % 60) for i in range(120)]

    def run(ff):
        cfg = make_config(cluster={"num_replicas": 1}, simulation={"fast_forward": ff, "client_timeout_s": 2.0},
                          scheduler={"name": "vllm_v1", "max_num_batched_tokens": 4096})
        return simulate(cfg, make_requests(specs))

    a, b = run(True), run(False)
    pd.testing.assert_frame_equal(frames(a)[0], frames(b)[0], check_exact=True)
    pd.testing.assert_frame_equal(frames(a)[1], frames(b)[1], check_exact=True)
    df = a.recorder.request_frame()
    assert set(df["status"]) == {"finished", "timed_out"}
    out = df[df["status"] == "timed_out"]
    assert len(out) > 20 and (out["reason"] == "client timeout (2 s after arrival)").all()
    fin = df[df["status"] == "finished"]
    assert (fin["num_generated_tokens"] == fin["num_output_tokens"]).all()
    # A client gives up at arrival + 2 s; the server notices at its next step boundary, well within a step.
    assert (fin["finish_s"] - fin["arrival_s"] <= 2.0 + 0.2).all()
    for rep in a.replicas:
        rep.blocks.check_integrity()
        assert rep.blocks.num_free_blocks == rep.blocks.num_blocks
    summary = run_experiment(make_config(cluster={"num_replicas": 1}, simulation={"client_timeout_s": 2.0},
                                         scheduler={"name": "vllm_v1", "max_num_batched_tokens": 4096},
                                         workload={"num_requests": 120, "arrival": {"kind": "poisson",
                                                                                    "rate_per_s": 5.0},
                                                   "prompt_tokens": {"kind": "fixed", "value": 2500},
                                                   "output_tokens": {"kind": "fixed", "value": 40}}),
                             write=False)[1]
    r = summary["requests"]
    assert r["timed_out"] > 0 and r["finished"] + r["timed_out"] == r["arrived"] == 120
    # and pipelined replicas (tests/test_pipeline.py takes requests out of batches in flight)
    make_config(parallel={"pp": 2}, simulation={"client_timeout_s": 2.0})


@given(seed=st.integers(0, 2**31), device=st.sampled_from(["h100-sxm", "a100-80gb"]),
       scheduler=st.sampled_from(["vllm_v1", "fcfs", "sarathi"]), rate=st.floats(0.5, 20.0),
       decode_factor=st.sampled_from([1.0, 1.3]))
def test_fast_forward_equals_stepping_where_the_decode_rate_follows_the_kv_length(seed, device, scheduler, rate,
                                                                                  decode_factor):
    """A GQA model's small decode batches read KV at a rate that grows with their KV length
    (``DecodeAttentionFit.split_keys``); a decode run evaluates it step by step, as stepping does, with and
    without a what-if factor on decode attention (the property test above runs an MHA model, whose rate is
    constant)."""
    def cfg(ff):
        return make_config(seed=seed, model={"name": "Llama-3-8B"}, hardware={
            "device": device, "time_factors": {"attention_decode": decode_factor}},
            cluster={"num_replicas": 2, "router": "least_outstanding"},
            scheduler={"name": scheduler, "chunk_size": 256, "max_num_batched_tokens": 4096},
            workload={"num_requests": 40, "arrival": {"kind": "gamma", "rate_per_s": rate, "cv": 2.0},
                      "prompt_tokens": {"kind": "lognormal", "median": 300, "sigma": 1.0, "max": 3000},
                      "output_tokens": {"kind": "zipf", "a": 0.8, "min": 1, "max": 1500}},
            simulation={"fast_forward": ff})
    assert_fast_forward_equals_stepping(cfg)


@given(seed=st.integers(0, 2**31), scheduler=st.sampled_from(["fcfs", "sarathi", "vllm_v1", "vllm_v1_sync"]),
       policy=st.sampled_from(["colocated", "distserve", "llumnix"]),
       traffic=st.sampled_from(["plain", "shared_prefix", "conversation"]), stop=st.floats(0.3, 20.0),
       rate=st.floats(1.0, 40.0), budget=st.sampled_from([4096, 512]), pp=st.sampled_from([1, 2]))
def test_fast_forward_equals_stepping_up_to_an_early_stop(seed, scheduler, policy, traffic, stop, rate, budget, pp):
    """``simulation.max_time_s``: a simulation stopped part-way has the same records either way. Stepping has
    applied the steps that end before the stop and recorded the one in progress (a step is recorded as it starts);
    a run that spans the stop ends at its last boundary before it, and one whose first step spans it records that
    step as it starts. Found by comparing the two on random configurations: fast-forward had lost every step of
    the runs in progress at the stop, and the stepped run's in-progress step."""
    lengths = traffic_lengths(traffic)

    def cfg(ff):
        return make_config(seed=seed, parallel={"pp": 1 if policy == "llumnix" else pp},
                           cluster={"num_replicas": 2, "router": "least_outstanding", "policy": policy,
                                    "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
                           scheduler={**scheduler_named(scheduler), "chunk_size": 256,
                                      "max_num_batched_tokens": budget if scheduler.startswith("vllm_v1") else 4096},
                           workload={"num_requests": 60, "arrival": {"kind": "gamma", "rate_per_s": rate, "cv": 2.0},
                                     **lengths},
                           simulation={"fast_forward": ff, "max_time_s": stop})
    result = assert_fast_forward_equals_stepping(cfg)
    if traffic != "conversation" and not isinstance(result, EngineAborted):  # nothing lost: sent or still to come
        assert result.num_arrived + result.num_not_arrived == 60


@given(seed=st.integers(0, 2**31), budget=st.sampled_from([48, 96]), num_blocks=st.sampled_from([40, 64, 120]))
def test_fast_forward_equals_stepping_where_prompts_refill_cached_content(seed, budget, num_blocks):
    """Exactness of chunked-prefill runs under prefix caching, whose prompts' named blocks are booked (taken,
    cached) at the run's end: prompts made of a few shared pieces (so hits stop part-way, and prompts in flight
    fill blocks another is filling too), a KV cache small enough that the runs' takes evict cached blocks, and a
    budget that chunks most prompts."""
    import random

    rng = random.Random(seed)
    pieces = [(1, 48), (2, 32), (3, 64), (4, 16)]
    specs = []
    t = 0.0
    for _ in range(40):
        t += rng.expovariate(8.0)
        segments = tuple(rng.choice(pieces) for _ in range(rng.randint(1, 3)))
        named = sum(n for _, n in segments)
        prompt = named + rng.choice([0, 0, 5, 16])
        specs.append((t, prompt, rng.randint(1, 40), segments))

    def cfg(ff):
        return make_config(seed=seed, cluster={"num_replicas": 1},
                           scheduler={"name": "vllm_v1", "max_num_batched_tokens": budget, "max_num_seqs": 4,
                                      "num_gpu_blocks_override": num_blocks, "enable_prefix_caching": True},
                           simulation={"fast_forward": ff})

    def workload(_):
        return [Request(i, t, p, o, prefix_segments=s) for i, (t, p, o, s) in enumerate(specs)]

    assert_fast_forward_equals_stepping(cfg, workload)


def test_a_full_host_swap_space_stops_the_run_where_vllm_v0_would_in_every_mode(monkeypatch):
    """``scheduler.swap_space_gib`` (vLLM's --swap-space, per GPU): host blocks for swapped-out KV. Sized to the
    most a run ever swaps out at once, the run is the unbounded one's; one block less and the engine stops at the
    preemption that does not fit, with the same error and time fast-forwarded, stepped and in two worker
    processes (forked or spawned: the earliest abort over the workers)."""
    import llmsim.cluster.workers as workers
    from llmsim.cluster.simulation import build_pools
    from llmsim.schedulers.base import Scheduler

    def cfg(swap_space_gib, **simulation):
        return make_config(cluster={"num_replicas": 2}, simulation=simulation,
                           scheduler={"name": "fcfs", "preemption": "swap", "gpu_memory_utilization": 0.3,
                                      "swap_space_gib": swap_space_gib},
                           workload={"num_requests": 300, "arrival": {"kind": "poisson", "rate_per_s": 30.0},
                                     "prompt_tokens": {"kind": "uniform", "min": 500, "max": 3000},
                                     "output_tokens": {"kind": "uniform", "min": 100, "max": 1000}})

    peak = [0]
    swap_out = Scheduler._swap_out

    def watched(self, request):
        swap_out(self, request)
        peak[0] = max(peak[0], self.num_swapped_blocks)

    monkeypatch.setattr(Scheduler, "_swap_out", watched)
    unbounded, unbounded_summary = run_experiment(cfg(1e6), write=False)
    monkeypatch.setattr(Scheduler, "_swap_out", swap_out)
    assert unbounded_summary["requests"]["preemptions"] > 20 and peak[0] > 1
    block_bytes = build_pools(cfg(1.0))[1][0].memory.largest_kv_bytes_per_block
    fits = (peak[0] + 0.5) * block_bytes / 2**30  # room for the peak's blocks and not one more
    short = (peak[0] - 0.5) * block_bytes / 2**30
    result, summary = run_experiment(cfg(fits), write=False)
    pd.testing.assert_frame_equal(result.recorder.request_frame(), unbounded.recorder.request_frame())
    assert all(rep.scheduler.num_swapped_blocks == 0 for rep in result.replicas)
    # The summary's host swap (vLLM's CPU KV cache usage): the peak, here all of the host's blocks.
    assert unbounded_summary["host_swap"]["peak_blocks"] == summary["host_swap"]["peak_blocks"] == peak[0]
    assert summary["host_swap"]["peak_share"] == 1.0
    assert run_experiment(cfg(fits, workers=2), write=False)[1]["host_swap"] == summary["host_swap"]
    messages = set()
    for simulation in ({}, {"fast_forward": False}, {"workers": 2}):
        with pytest.raises(EngineAborted, match=r"Aborted due to the lack of CPU swap space.*swap_space_gib") as e:
            run_experiment(cfg(short, **simulation), write=False)
        messages.add(str(e.value))
    monkeypatch.setattr(workers.multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(EngineAborted) as e:
        run_experiment(cfg(short, workers=2), write=False)
    messages.add(str(e.value))
    assert len(messages) == 1 and messages.pop().startswith("at ")


def test_a_swap_moves_each_gpus_shard_over_its_own_host_link():
    """vLLM's workers each copy their own blocks to and from the host, all at once: what a step's swap waits for
    is one GPU's shard (its KV heads, its stage's layers), not the replica's whole KV over one link."""
    from llmsim.cluster.simulation import build_pools, make_replica
    from llmsim.clock import Clock
    from llmsim.metrics.recorder import Recorder

    def per_token(tp, pp):
        cfg = make_config(model={"name": "Llama-2-7B"}, parallel={"tp": tp, "pp": pp},
                          scheduler={"name": "fcfs", "preemption": "swap"})
        model, pools, _ = build_pools(cfg)
        rep = make_replica(Clock(), 0, cfg, pools[0], Recorder([pools[0].power], False))
        return rep.scheduler.kv_bytes_per_token, model.kv_bytes_per_token()

    whole = per_token(1, 1)
    assert whole[0] == whole[1] == 2 * 32 * 4096 * 2  # one GPU holds it all: K and V, 32 layers, fp16
    assert per_token(2, 1)[0] == whole[1] / 2 and per_token(4, 1)[0] == whole[1] / 4  # its KV heads
    assert per_token(1, 2)[0] == whole[1] / 2  # its stage's 16 layers


@given(seed=st.integers(0, 2**31),
       scheduler=st.sampled_from(["fcfs", "sarathi", "vllm_v1", "vllm_v1_sync", "fcfs_cached", "sarathi_cached"]),
       traffic=st.sampled_from(["plain", "shared_prefix", "conversation"]), tp=st.sampled_from([1, 2]),
       pp=st.sampled_from([1, 2]), replicas=st.sampled_from([1, 2]), budget=st.sampled_from([4096, 512]))
def test_twice_the_kernel_times_and_the_gaps_between_arrivals_give_every_time_twice(seed, scheduler, traffic, tp, pp,
                                                                                   replicas, budget):
    """A metamorphic check that every latency comes from the modelled kernels and the traffic: with every kernel
    group twice as slow (``hardware.time_factors``) and every gap in the traffic twice as long (arrivals, think
    times), each request's arrival, first token and finish come out twice, and its batches, token counts and
    preemptions the same. A time constant outside the kernels (a step floor, a delay in async scheduling or in the
    pipeline) would break it; the engine's CPU time per step is not a kernel, so it is off here. Twice is exact
    in floating point but for the fitted decode kernel's soft maximum (a power with a fractional exponent), a few
    units in the last place."""
    lengths = traffic_lengths(traffic)

    def records(k: float):
        workload = {"num_requests": 50, "arrival": {"kind": "gamma", "rate_per_s": 12.0 / k, "cv": 2.0}, **lengths}
        if "conversation" in workload:
            workload["conversation"] = {**workload["conversation"],
                                        "mean_think_time_s": workload["conversation"]["mean_think_time_s"] * k}
        cfg = make_config(seed=seed, hardware={"device": "h100-sxm", "time_factors": {
                              g: k for g in ("gemm", "attention_prefill", "attention_decode", "collective", "other")}},
                          parallel={"tp": tp, "pp": pp}, cluster={"num_replicas": replicas},
                          scheduler={**scheduler_named(scheduler), "cpu_overhead": "off", "chunk_size": 256,
                                     "max_num_batched_tokens": budget},
                          workload=workload)
        return run_experiment(cfg, write=False)[0].recorder.request_frame()

    once, twice = records(1.0), records(2.0)
    for column in ("arrival_s", "scheduled_s", "first_token_s", "finish_s", "max_tbt_s"):
        pd.testing.assert_series_equal(twice[column], once[column] * 2.0, check_exact=False, rtol=1e-12, atol=0.0,
                                       obj=column)
    for column in ("id", "replica_id", "num_generated_tokens", "num_preemptions", "num_cached_tokens", "status"):
        pd.testing.assert_series_equal(twice[column], once[column], obj=column)


@given(seed=st.integers(0, 2**31),
       scheduler=st.sampled_from(["fcfs", "sarathi", "vllm_v1", "vllm_v1_sync", "fcfs_cached"]),
       policy=st.sampled_from(["colocated", "distserve", "llumnix"]),
       router=st.sampled_from(["round_robin", "least_outstanding", "prefix_aware"]),
       traffic=st.sampled_from(["plain", "shared_prefix"]), cut=st.integers(10, 50),
       budget=st.sampled_from([4096, 512]))
def test_requests_that_finish_before_the_next_arrival_do_not_depend_on_it(seed, scheduler, policy, router, traffic,
                                                                          cut, budget):
    """Causality: a run of the first ``cut`` requests of a workload gives every request that finished before the
    next one arrives exactly the record the whole workload gives it (nothing looks ahead at arrivals to come: not
    the schedulers, routers, cluster policies, nor fast-forward)."""
    lengths = traffic_lengths(traffic)

    def records(n: int) -> pd.DataFrame:
        cfg = make_config(seed=seed, cluster={"num_replicas": 2, "router": router, "policy": policy,
                                              "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
                          scheduler={**scheduler_named(scheduler), "chunk_size": 256,
                                     "max_num_batched_tokens": budget if scheduler.startswith("vllm_v1") else 4096},
                          workload={"num_requests": n, "arrival": {"kind": "gamma", "rate_per_s": 5.0, "cv": 2.0},
                                    **lengths})
        df = run_experiment(cfg, write=False)[0].recorder.request_frame()
        return df.astype({"status": str}).set_index("id")

    whole, part = records(60), records(cut)
    assert (part["arrival_s"] == whole["arrival_s"][part.index]).all()  # the same first requests
    next_arrival = whole["arrival_s"].drop(part.index).min()
    done = whole.index[(whole["finish_s"] < next_arrival) & whole.index.isin(part.index)]
    pd.testing.assert_frame_equal(part.loc[done], whole.loc[done])


def test_deadlines_of_requests_that_finished_do_not_stretch_the_simulated_span():
    """A client's deadline (``simulation.client_timeout_s``) for a request that finished long before has nothing
    to do: the simulated span had run on to the last such deadline (300 s past the last arrival for a 10 s run)."""
    def span(timeout_s):
        cfg = make_config(workload={"num_requests": 30, "arrival": {"kind": "poisson", "rate_per_s": 5.0},
                                    "prompt_tokens": {"kind": "fixed", "value": 200},
                                    "output_tokens": {"kind": "fixed", "value": 20}},
                          simulation={"client_timeout_s": timeout_s})
        result, summary = run_experiment(cfg, write=False)
        assert summary["requests"]["finished"] == 30
        return summary["simulation"]["simulated_s"]

    assert span(300.0) == span(None)
