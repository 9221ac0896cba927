"""Closed-loop chat (``workload.conversation``): a turn is sent its think time after the previous answer ended."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsim.cluster.simulation import simulate
from llmsim.errors import ConfigError
from llmsim.run import run_experiment
from llmsim.workload import build_workload
from llmsim.workload.conversations import ClosedLoopChat
from tests.factories import make_config
from tests.test_simulation import frames as request_and_iteration_frames

CHAT = {"num_requests": 400, "arrival": {"kind": "poisson", "rate_per_s": 2.0},
        "prompt_tokens": {"kind": "lognormal", "median": 200, "sigma": 0.8, "min": 8, "max": 2000},
        "output_tokens": {"kind": "lognormal", "median": 120, "sigma": 0.6, "min": 1, "max": 800},
        "conversation": {"mean_turns": 3, "mean_think_time_s": 5.0}}


def chat_config(**overrides):
    data = dict(model={"name": "Llama-3.1-8B"}, hardware={"device": "h100-sxm"},
                scheduler={"name": "vllm_v1"}, cluster={"num_replicas": 1}, workload=CHAT)
    data.update(overrides)
    return make_config(**data)


def _run(cfg):
    chat = build_workload(cfg.workload, cfg.seed)
    assert isinstance(chat, ClosedLoopChat)
    # Keep the turns' content to check how each turn extends the one before it.
    sent = []
    original = chat._turn

    def turn(conv, at):
        r = original(conv, at)
        sent.append((r, conv, conv.turn))
        return r

    chat._turn = turn
    return simulate(cfg, chat), sent


def test_a_turn_follows_the_previous_answer_after_its_think_time():
    result, sent = _run(chat_config())
    df = result.recorder.request_frame().set_index("id")
    assert sorted(df.index) == list(range(400)) and (df["status"] == "finished").all()
    by_conversation = {}
    for r, conv, k in sent:
        by_conversation.setdefault(id(conv), (conv, []))[1].append((k, r))
    later_turns = 0
    for conv, turns in by_conversation.values():
        assert [k for k, _ in turns] == list(range(len(turns)))  # sent in order
        for (k, prev), (_, nxt) in zip(turns, turns[1:]):
            later_turns += 1
            # sent its think time after the previous answer's last token, never before
            assert nxt.arrival_s == prev.finish_s + conv.think_s[k]
            # the prompt resends the conversation so far (every message and answer) plus a new message
            assert nxt.num_prompt_tokens == prev.num_prompt_tokens + prev.num_output_tokens + conv.messages[k + 1]
            assert nxt.prefix_segments[:len(prev.prefix_segments)] == prev.prefix_segments
            # one replica: the resent conversation is cached, all but its last partial block
            resent = prev.num_prompt_tokens + prev.num_output_tokens
            assert df.loc[nxt.id, "num_cached_tokens"] >= 16 * (resent // 16) - 16
    assert later_turns > 150  # mean 3 turns: most requests are later turns
    assert len(by_conversation) == 400 - later_turns


def test_think_time_and_turns_follow_their_means():
    cfg = chat_config(workload={**CHAT, "num_requests": None, "duration_s": 4000.0,
                                "conversation": {"mean_turns": 4, "mean_think_time_s": 10.0}})
    chat = build_workload(cfg.workload, cfg.seed)
    plans = [chat._plan() for _ in range(4000)]
    assert np.mean([len(p.messages) for p in plans]) == pytest.approx(4, rel=0.05)
    assert np.mean([t for p in plans for t in p.think_s]) == pytest.approx(10, rel=0.05)


def test_fast_forward_equals_stepping_and_runs_are_deterministic():
    frames = []
    for ff in (True, False, True):
        cfg = chat_config(simulation={"fast_forward": ff}, cluster={"num_replicas": 2, "router": "prefix_aware"})
        result, _ = _run(cfg)
        frames.append(request_and_iteration_frames(result))
    for a, b in zip(frames, frames[1:]):
        pd.testing.assert_frame_equal(a[0], b[0], check_exact=True)
        pd.testing.assert_frame_equal(a[1], b[1], check_exact=True)


def test_a_turn_that_gets_no_answer_ends_its_conversation():
    """Rejected (too long for the context) or timed-out turns are not followed up; nothing is lost."""
    workload = {**CHAT, "prompt_tokens": {"kind": "lognormal", "median": 1500, "sigma": 1.0, "min": 8, "max": 6000},
                "conversation": {"mean_turns": 6, "mean_think_time_s": 1.0}}
    cfg = chat_config(workload=workload, scheduler={"name": "vllm_v1", "max_model_len": 8192},
                      simulation={"client_timeout_s": 3.0})
    result, sent = _run(cfg)
    df = result.recorder.request_frame()
    assert set(df["status"]) <= {"finished", "rejected", "timed_out"} and len(df) == len(sent)
    assert (df["status"] == "rejected").sum() > 0
    unanswered = set(df.loc[df["status"] != "finished", "id"])
    assert (df["status"] == "timed_out").sum() > 0
    by_conv = {}
    for r, conv, k in sent:
        by_conv.setdefault(id(conv), []).append((k, r.id))
    for turns in by_conv.values():
        assert all(rid not in unanswered for _, rid in turns[:-1])  # only a conversation's last turn goes unanswered
    for rep in result.replicas:
        rep.blocks.check_integrity()
        assert rep.blocks.num_free_blocks == rep.blocks.num_blocks


def test_run_experiment_and_caps():
    _, summary = run_experiment(chat_config(), write=False)
    assert summary["requests"]["arrived"] == 400 and summary["prefix_cache"]["hit_rate_requests"] > 0.3
    cfg = chat_config(workload={**CHAT, "num_requests": None, "duration_s": 60.0})
    result, sent = _run(cfg)
    assert max(r.arrival_s for r, _, _ in sent) < 60.0 and result.num_arrived == len(sent) > 50


@pytest.mark.parametrize("workload, message", [
    ({"trace": {"path": "x.csv", "format": "azure"}, "conversation": {"mean_turns": 2, "mean_think_time_s": 1}},
     "remove arrival/prompt_tokens/output_tokens/lengths_from/shared_prefix/conversation"),
    ({**CHAT, "conversation": {"mean_turns": 0.5, "mean_think_time_s": 1}},
     "workload.conversation.mean_turns: Input should be greater than or equal to 1"),
    ({**CHAT, "conversation": {"mean_turns": 2, "mean_think_time_s": 0}},
     "workload.conversation.mean_think_time_s: Input should be greater than 0"),
])
def test_bad_conversation_config_is_one_clear_error(workload, message):
    with pytest.raises(ConfigError) as err:
        make_config(workload=workload)
    assert message in str(err.value)


@settings(deadline=None)
@given(seed=st.integers(0, 2**31), policy=st.sampled_from(["colocated", "distserve", "llumnix"]),
       scheduler=st.sampled_from(["vllm_v1", "fcfs", "sarathi"]), mem=st.sampled_from([0.22, 0.9]),
       turns=st.sampled_from([1.0, 2.5, 6.0]), think=st.sampled_from([0.05, 2.0]),
       timeout=st.sampled_from([None, 2.0]))
def test_every_turn_is_accounted_for(seed, policy, scheduler, mem, turns, think, timeout):
    """Nothing lost with closed-loop chat under every cluster policy: every turn sent ends finished, rejected,
    timed out or in flight; turns are sent only after the previous one finished; KV blocks all come back."""
    cfg = make_config(seed=seed, model={"name": "Llama-2-7B"},
                      cluster={"num_replicas": 2, "policy": policy,
                               "distserve": {"prefill": {"replicas": 1}, "decode": {"replicas": 1}}},
                      scheduler={"name": scheduler, "gpu_memory_utilization": mem, "max_num_batched_tokens": 4096},
                      workload={**CHAT, "num_requests": 80, "arrival": {"kind": "poisson", "rate_per_s": 4.0},
                                "conversation": {"mean_turns": turns, "mean_think_time_s": think}},
                      simulation={"client_timeout_s": timeout})
    result, sent = _run(cfg)
    df = result.recorder.request_frame()
    assert sorted(df["id"]) == list(range(len(sent))) and len(sent) <= 80
    assert set(df["status"]) <= {"finished", "rejected", "timed_out"}
    finish = dict(zip(df["id"], df["finish_s"]))
    by_conv = {}
    for r, conv, k in sent:
        by_conv.setdefault(id(conv), []).append(r)
    for turns_sent in by_conv.values():
        for prev, nxt in zip(turns_sent, turns_sent[1:]):
            assert nxt.arrival_s > finish[prev.id]
    for rep in result.replicas:
        rep.blocks.check_integrity()
        assert rep.blocks.num_free_blocks == rep.blocks.num_blocks
