"""Pipeline parallelism with micro-batches in flight, one per stage."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsim.cluster import pipeline
from llmsim.cluster.simulation import build_execution, simulate
from llmsim.config import ConfigError
from llmsim.errors import PlanError
from llmsim.execution import ops
from llmsim.execution.model import pipeline_layers
from llmsim.run import run_experiment
from llmsim.schedulers.base import SchedulerOutput
from tests.factories import assert_nothing_lost, make_config, make_requests


def pipeline_config(pp: int, micro_batches: int | None, scheduler: str = "sarathi", **overrides):
    data = dict(model={"name": "Llama-2-13B"}, parallel={"pp": pp, "micro_batches": micro_batches},
                cluster={"num_replicas": 1}, scheduler={"name": scheduler, "max_num_batched_tokens": 4096},
                workload={"num_requests": 600, "arrival": {"kind": "poisson", "rate_per_s": 40.0},
                          "prompt_tokens": {"kind": "uniform", "min": 16, "max": 1500},
                          "output_tokens": {"kind": "uniform", "min": 1, "max": 300}})
    data.update(overrides)
    return make_config(**data)


def test_a_lone_request_takes_the_same_time_with_or_without_micro_batches():
    times = []
    for micro_batches in (1, 2):
        result = simulate(pipeline_config(2, micro_batches, "fcfs"), make_requests([(0.0, 1000, 50)]))
        df = result.recorder.request_frame()
        times.append((df["first_token_s"].item(), df["finish_s"].item()))
    assert times[0] == pytest.approx(times[1], rel=1e-12)
    # One batch through two stages costs what the execution model charges for the whole pipeline.
    ex = result.execution
    assert times[0][0] == pytest.approx(ex.iteration(((1000, 0),), 0, 0, 1).time_s, rel=1e-12)


@pytest.mark.parametrize("scheduler", ["fcfs", "sarathi"])
def test_micro_batches_fill_the_pipeline_and_raise_throughput(scheduler):
    out = {}
    for pp, micro_batches in ((2, 1), (2, 2), (4, 1), (4, 4)):
        result, summary = run_experiment(pipeline_config(pp, micro_batches, scheduler), write=False)
        assert_nothing_lost(result, 600)
        out[pp, micro_batches] = summary["throughput"]["requests_per_s"]
    assert out[2, 2] > 1.4 * out[2, 1]
    assert out[4, 4] > 2.0 * out[4, 1]


def test_stage_zero_holds_one_micro_batch_at_a_time_and_no_request_is_in_two(monkeypatch):
    launched = []
    original = pipeline.launch

    def checked_launch(replica, out, now, stage_free):
        ids = [c.request.id for c in out.prefills] + [r.id for r in out.decodes]
        assert not set(ids) & replica.scheduler.busy, "a request joined a second micro-batch in flight"
        end, cpu_s = original(replica, out, now, stage_free)
        launched.append((now, stage_free[0], end))
        return end, cpu_s

    monkeypatch.setattr(pipeline, "launch", checked_launch)
    # Without CPU time a batch is scheduled when stage 0 frees (with it, up to its preparation time before).
    cfg = pipeline_config(4, 4)
    cfg = cfg.model_copy(update={"scheduler": cfg.scheduler.model_copy(update={"cpu_overhead": "off"})})
    result, _ = run_experiment(cfg, write=False)
    assert len(launched) > 100
    in_flight_max = 0
    for i, (start, stage0_free, end) in enumerate(launched):
        if i:
            assert start >= launched[i - 1][1]  # stage 0 was free
            assert end >= launched[i - 1][2]  # batches leave the pipeline in order
        in_flight_max = max(in_flight_max, sum(1 for s, _, e in launched if s <= start < e))
    assert in_flight_max == 4
    it = result.recorder.iteration_frame().sort_values("start_s")
    assert ((it["start_s"] + it["duration_s"]).shift().fillna(0) <= it["start_s"] + 1e-12).all()


def test_the_driver_prepares_the_next_micro_batch_while_stage_zero_runs():
    """With vLLM v0's CPU time per step, a micro-batch's preparation overlaps the others' GPU work: the driver
    prepares one at a time, stage 0 still holds one micro-batch at a time (its records never overlap), and a lone
    request pays the CPU time once per step on top of the whole pipeline's GPU time."""
    result, _ = run_experiment(pipeline_config(4, 4), write=False)
    it = result.recorder.iteration_frame().sort_values("start_s")
    assert len(it) > 100
    assert ((it["start_s"] + it["duration_s"]).shift().fillna(0) <= it["start_s"] + 1e-12).all()
    lone = simulate(pipeline_config(2, 2, "fcfs"), make_requests([(0.0, 1000, 1)]))
    ex = lone.execution
    gpu_s = ex.iteration(((1000, 0),), 0, 0, 1, with_cpu=False).time_s
    first = lone.recorder.request_frame()["first_token_s"].item()
    assert first == pytest.approx(gpu_s + ex.cpu_step_s(1, 1), rel=1e-12) and ex.cpu_step_s(1, 1) > 2e-3


def test_energy_of_a_lone_request_does_not_depend_on_micro_batching():
    energies = []
    for micro_batches in (1, 2):
        _, summary = run_experiment(pipeline_config(2, micro_batches, workload={
            "num_requests": 1, "arrival": {"kind": "poisson", "rate_per_s": 1.0},
            "prompt_tokens": {"kind": "fixed", "value": 800}, "output_tokens": {"kind": "fixed", "value": 40}}),
            write=False)
        energies.append(summary["energy"]["total_j"])
    assert energies[0] == pytest.approx(energies[1], rel=1e-9)


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 3000), st.integers(1, 400)), min_size=1, max_size=40),
       st.sampled_from(["fcfs", "sarathi"]), st.sampled_from([2, 3]), st.sampled_from(["recompute", "swap"]))
def test_nothing_lost_with_micro_batches(specs, scheduler, pp, preemption):
    specs.sort()
    cfg = make_config(parallel={"pp": pp}, cluster={"num_replicas": 2},
                      scheduler={"name": scheduler, "gpu_memory_utilization": 0.5, "max_num_batched_tokens": 4096,
                                 "preemption": preemption})
    result = simulate(cfg, make_requests(specs))
    df = assert_nothing_lost(result, len(specs))
    fin = df[df["status"] == "finished"]
    assert sum(result.recorder.tbt_count) == (fin["num_generated_tokens"] - 1).sum()
    for rep in result.replicas:
        assert not rep.scheduler.busy


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 3000), st.integers(1, 400)), min_size=1, max_size=40),
       st.sampled_from(["fcfs", "sarathi", "vllm_v1"]), st.sampled_from([2, 3]), st.floats(0.05, 3.0))
def test_client_timeouts_on_a_pipeline_lose_nothing(specs, scheduler, pp, timeout_s):
    """Clients give up on pipelined replicas too: every request finishes, is rejected or times out, a timed-out
    one never gets its last token (one aborted while its micro-batch was in flight has that batch's token
    dropped), and every KV block is free again."""
    specs.sort()
    cfg = make_config(parallel={"pp": pp}, cluster={"num_replicas": 2},
                      scheduler={"name": scheduler, "gpu_memory_utilization": 0.5, "max_num_batched_tokens": 4096},
                      simulation={"client_timeout_s": timeout_s})
    result = simulate(cfg, make_requests(specs))
    df = result.recorder.request_frame()
    assert sorted(df["id"]) == list(range(len(specs)))
    assert set(df["status"]) <= {"finished", "rejected", "timed_out"}
    fin, out = df[df["status"] == "finished"], df[df["status"] == "timed_out"]
    assert (fin["num_generated_tokens"] == fin["num_output_tokens"]).all()
    assert (out["num_generated_tokens"] < out["num_output_tokens"]).all()
    assert sum(result.recorder.tbt_count) <= (df["num_generated_tokens"].clip(lower=1) - 1).sum()
    for rep in result.replicas:
        rep.blocks.check_integrity()
        assert rep.blocks.num_free_blocks == rep.blocks.num_blocks
        assert not rep.scheduler.busy and not rep.aborted_in_flight


def test_a_request_aborted_in_flight_gets_no_token_from_its_batch(monkeypatch):
    """A client that gives up while its request's micro-batch is in the pipeline: the request leaves at once (its
    KV freed, as vLLM frees an aborted request's blocks) and the batch's token for it, landing later, is dropped."""
    landed = []

    def drop_aborted(out, aborted):
        before = {r.id: r.num_generated_tokens for r in [c.request for c in out.prefills] + out.decodes}
        kept = pipeline_drop_aborted(out, aborted)
        landed.append((before, set(kept.request_ids())))
        return kept

    pipeline_drop_aborted = pipeline.drop_aborted
    monkeypatch.setattr(pipeline, "drop_aborted", drop_aborted)
    cfg = make_config(parallel={"pp": 4}, cluster={"num_replicas": 1}, model={"name": "Llama-2-13B"},
                      scheduler={"name": "fcfs"}, simulation={"client_timeout_s": 0.5})
    result = simulate(cfg, make_requests([(0.0, 300, 400), (0.0, 3000, 400)]))  # decoding / prefilling then
    df = result.recorder.request_frame().set_index("id")
    assert list(df["status"]) == ["timed_out", "timed_out"] and 0 < df.loc[0, "num_generated_tokens"] < 400
    dropped = [(before, kept) for before, kept in landed if set(before) - kept]
    assert dropped  # the deadline fell while a micro-batch holding a request was in flight
    for before, kept in dropped:
        for rid in set(before) - kept:  # its token from that batch was not delivered
            assert df.loc[rid, "num_generated_tokens"] == before[rid]
    rep = result.replicas[0]
    rep.blocks.check_integrity()
    assert rep.blocks.num_free_blocks == rep.blocks.num_blocks and not rep.aborted_in_flight


def test_pipeline_config_errors():
    with pytest.raises(ConfigError, match="micro_batches"):
        make_config(parallel={"pp": 2, "micro_batches": 3})
    with pytest.raises(ConfigError, match="llumnix runs with parallel.pp: 1"):
        make_config(parallel={"pp": 2}, cluster={"policy": "llumnix"})


@pytest.mark.parametrize("num_layers, pp, layers", [
    (32, 4, [8, 8, 8, 8]), (22, 4, [5, 6, 6, 5]), (5, 3, [2, 2, 1]), (4, 3, [1, 2, 1]), (3, 2, [2, 1]),
    (61, 2, [31, 30]), (61, 4, [15, 15, 16, 15]), (80, 3, [27, 27, 26])])
def test_stages_hold_the_layers_vllm_gives_them(num_layers, pp, layers):
    """vLLM's ``get_pp_indices``: the remainder goes one layer each to the stages before the last, counting back
    (the examples of vLLM's own documentation and tests)."""
    assert pipeline_layers(num_layers, pp) == layers


def test_the_first_stage_runs_the_embedding_and_the_last_the_lm_head_and_the_slowest_sets_the_pace():
    """Llama-3-8B's 128k-token vocabulary makes its LM head about two layers' worth of weights: at PP 2 the last
    stage takes longer than the first, and back-to-back micro-batches leave the pipeline at the last stage's pace."""
    cfg = pipeline_config(2, 2, model={"name": "Llama-3-8B"})
    cfg = cfg.model_copy(update={"scheduler": cfg.scheduler.model_copy(update={"cpu_overhead": "off"})})
    _, ex, _, _ = build_execution(cfg)
    cost = ex.iteration((), 64, 64 * 1000, 64, with_cpu=False)
    (first, last), hand_off = ex.pipeline_stages(cost, 64, 64)
    assert first + last + hand_off == pytest.approx(cost.time_s, rel=1e-12)
    head_s = sum(ex.op_cost(op) for op in ops.lm_head(ex.shapes, 64))
    embedding_s = ex.op_cost(ops.embedding(ex.shapes, 64))
    assert last - first == pytest.approx(head_s - embedding_s, rel=1e-9)
    assert last > 1.05 * first
    # Two micro-batches of that batch, launched at once: the second waits for the last stage, not the first.
    recorded, flights = [], []
    replica = SimpleNamespace(id=0, execution=ex, blocks=SimpleNamespace(num_used_blocks=0),
                              recorder=SimpleNamespace(iteration=lambda *a: recorded.append(a)),
                              scheduler=SimpleNamespace(start_flight=flights.append))
    out = SchedulerOutput(decodes=[SimpleNamespace(num_pending_tokens=1)] * 64, decode_kv_tokens=64 * 1000)
    stage_free = [0.0, 0.0]
    leaves = [pipeline.launch(replica, out, 0.0, stage_free)[0] for _ in range(2)]
    assert leaves[1] - leaves[0] == pytest.approx(last, rel=1e-12)
    assert [r[2] for r in recorded] == pytest.approx([first, first], rel=1e-12)  # stage 0's hold


def test_a_users_layer_partition_moves_layers_between_stages_and_balances_the_pipeline():
    """``parallel.pp_layer_partition`` (vLLM's VLLM_PP_LAYER_PARTITION): Llama-3-8B at PP 2 with 17 + 15 layers
    gives the last stage, which also runs the LM head, two layers fewer than vLLM's even 16 + 16, so the stages
    are nearer each other and the pipeline's pace (its slowest stage) is faster; the memory plan holds the
    layers where they are (the stage with more layers has less room for KV)."""
    def stages(partition):
        cfg = pipeline_config(2, 2, model={"name": "Llama-3-8B"},
                              parallel={"pp": 2, "micro_batches": 2, "pp_layer_partition": partition})
        cfg = cfg.model_copy(update={"scheduler": cfg.scheduler.model_copy(update={"cpu_overhead": "off"})})
        _, ex, memory, _ = build_execution(cfg)
        cost = ex.iteration((), 64, 64 * 1000, 64, with_cpu=False)
        return ex.pipeline_stages(cost, 64, 64)[0], memory.num_blocks, cost.time_s, ex

    (even_first, even_last), even_blocks, even_s, ex = stages(None)
    assert stages([16, 16])[:3] == ((even_first, even_last), even_blocks, even_s)  # vLLM's own split, spelled out
    (first, last), blocks, time_s, _ = stages([17, 15])
    assert time_s == pytest.approx(even_s, rel=1e-12)  # the same work, split differently
    layer_s = (even_first - ex.op_cost(ops.embedding(ex.shapes, 64))) / 16  # stage 0: 16 layers and the embedding
    assert first == pytest.approx(even_first + layer_s, rel=1e-9)
    assert last == pytest.approx(even_last - layer_s, rel=1e-9)
    assert max(first, last) < max(even_first, even_last)
    assert blocks < even_blocks  # the first stage now holds 17 layers' weights and KV


def test_layer_partition_errors_name_the_setting():
    with pytest.raises(ConfigError, match="pp_layer_partition has 3 stages, pp is 2"):
        make_config(parallel={"pp": 2, "pp_layer_partition": [10, 11, 11]})
    with pytest.raises(ConfigError, match="pp_layer_partition"):
        make_config(parallel={"pp": 2, "pp_layer_partition": [32, 0]})
    cfg = pipeline_config(2, 2, parallel={"pp": 2, "pp_layer_partition": [20, 21]})  # Llama-2-13B: 40 layers
    with pytest.raises(PlanError, match=r"parallel.pp_layer_partition: \[20, 21\] adds up to 41 layers, "
                                        r"Llama-2-13B has 40"):
        build_execution(cfg)
