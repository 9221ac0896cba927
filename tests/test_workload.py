import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmsim.config import TraceConfig, WorkloadConfig
from llmsim.errors import ConfigError, TraceError
from llmsim.workload import build_workload
from llmsim.workload.traces import read_trace

ROOT = Path(__file__).resolve().parents[1]
HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def burstgpt_file(tmp_path, rows, name="burst.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(rows))
    return path


def make_burstgpt(tmp_path, n=1000, seed=0):
    """BurstGPT-shaped data: bursty timestamps, two models, two log types, ~5% failures."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.gamma(0.25, 4.0, n))
    rows = []
    for i in range(n):
        req, resp = int(rng.lognormal(6, 1)) + 1, int(rng.lognormal(5, 1))
        resp = 0 if rng.random() < 0.05 else resp
        rows.append(f"{t[i]:.0f},{'ChatGPT' if i % 3 else 'GPT-4'},{req},{resp},{req + resp},"
                    f"{'Conversation log' if i % 2 else 'API log'}\n")
    return burstgpt_file(tmp_path, rows)


def test_burstgpt_filters_window_and_failures(tmp_path):
    path = make_burstgpt(tmp_path)
    wl = WorkloadConfig(trace=TraceConfig(path=path, format="burstgpt", model="ChatGPT", log_type="Conversation log",
                                          failed="reject", start_s=100, end_s=2000, time_scale=0.5))
    reqs = list(build_workload(wl, seed=0))
    rows = [r for r in read_trace(wl.trace)]
    assert len(reqs) == len(rows) > 10
    assert all(0 <= r.arrival_s < (2000 - 100) * 0.5 for r in reqs)
    failed = [r for r in reqs if r.reject_reason == "failed in trace"]
    assert failed and len(failed) == sum(row.failed for row in rows)
    skip = WorkloadConfig(trace=wl.trace.model_copy(update={"failed": "skip"}))
    assert len(list(build_workload(skip, 0))) == len(reqs) - len(failed)


def test_shipped_burstgpt_fixture_replays():
    wl = WorkloadConfig(trace=TraceConfig(path=ROOT / "workloads" / "burstgpt_schema_fixture.csv", format="burstgpt"))
    reqs = list(build_workload(wl, 0))
    assert [(r.arrival_s, r.num_prompt_tokens, r.num_output_tokens) for r in reqs] == [
        (5.0, 472, 18), (45.0, 1087, 230), (118.0, 417, 276)]


@pytest.mark.parametrize("row,needle", [
    ("12,ChatGPT,abc,5,5,API log\n", "'Request tokens' is 'abc'"),
    ("12,ChatGPT,5,5\n", "expected 6 columns"),
    ("x,ChatGPT,5,5,10,API log\n", "'Timestamp' is 'x'"),
])
def test_bad_trace_row_names_file_and_line(tmp_path, row, needle):
    path = burstgpt_file(tmp_path, ["1,ChatGPT,5,5,10,API log\n", row])
    with pytest.raises(TraceError) as err:
        list(build_workload(WorkloadConfig(trace=TraceConfig(path=path, format="burstgpt")), 0))
    assert f"{path}:3" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("fmt,text,needle", [
    # A short or long row of a DictReader-read format (a short one read as a missing value: "is None"; a long
    # one's extra field was dropped).
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,374,44\n2023-11-16 18:15:47,374\n",
     ":3: expected 3 columns (as the header has), got 2"),
    ("azure", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,374,44,9\n",
     ":2: expected 3 columns (as the header has), got 4"),
    ("prefill_decode", "num_prefill_tokens,num_decode_tokens\n5,5\n7\n", ":3: expected 2 columns (as the header has), got 1"),
    # BurstGPT v1.2's header has 8 columns: the message had said 6.
    ("burstgpt", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time\n"
     "1,ChatGPT,5,5,10,API log\n", ":2: expected 8 columns (as the header has), got 6"),
    # A JSON line that is not an object (it was Python's "list indices must be integers"), or lacks a field.
    ("mooncake", '{"timestamp": 0, "input_length": 5, "output_length": 2}\n[1, 2]\n',
     ":2: not a Mooncake row (a JSON object with timestamp, input_length, output_length and hash_ids), but a JSON list"),
    ("mooncake", '{"timestamp": 0, "output_length": 2}\n', ":1: not a Mooncake row: no 'input_length'"),
])
def test_a_row_of_the_wrong_shape_names_file_line_and_shape(tmp_path, fmt, text, needle):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError) as err:
        list(read_trace(TraceConfig(path=path, format=fmt)))
    assert str(err.value) == f"{path}{needle}"


def test_lengths_from_a_trace_with_no_usable_row_is_an_error_naming_it(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n")  # it was a ValueError's traceback
    wl = WorkloadConfig(num_requests=3, arrival={"kind": "poisson", "rate_per_s": 1.0},
                        lengths_from=TraceConfig(path=path, format="prefill_decode"))
    with pytest.raises(TraceError, match=f"workload.lengths_from: {path} has no row to sample lengths from"):
        list(build_workload(wl, 0))


def test_unsorted_trace_is_an_error(tmp_path):
    path = burstgpt_file(tmp_path, ["10,ChatGPT,5,5,10,API log\n", "3,ChatGPT,5,5,10,API log\n"])
    with pytest.raises(TraceError, match=":3: timestamp goes backwards"):
        list(read_trace(TraceConfig(path=path, format="burstgpt")))


def test_traces_stream_lazily(tmp_path):
    path = make_burstgpt(tmp_path)
    stream = build_workload(WorkloadConfig(trace=TraceConfig(path=path, format="burstgpt")), 0)
    assert iter(stream) is stream  # an iterator, not a materialised list
    first = next(iter(stream))
    assert first.id == 0


def test_azure_and_mooncake_traces():
    az = list(read_trace(TraceConfig(path=ROOT / "workloads" / "azure_code_2023.csv", format="azure")))
    assert len(az) == 8819 and az[0].time_s == 0 and az[0].prompt_tokens == 4808 and az[0].output_tokens == 10
    assert az[1].time_s == pytest.approx(0.052, abs=1e-6)
    mc = list(read_trace(TraceConfig(path=ROOT / "workloads" / "mooncake_conversation.jsonl", format="mooncake",
                                     end_s=60)))
    assert mc and mc[0].prompt_tokens == 6758 and all(r.time_s < 60 for r in mc)


def test_gamma_arrivals_have_the_requested_rate_and_cv():
    wl = WorkloadConfig(num_requests=20000, arrival={"kind": "gamma", "rate_per_s": 5.0, "cv": 3.0},
                        prompt_tokens={"kind": "fixed", "value": 10}, output_tokens={"kind": "fixed", "value": 5})
    t = np.array([r.arrival_s for r in build_workload(wl, 1)])
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_length_distributions_respect_bounds_and_shape():
    wl = WorkloadConfig(num_requests=5000, arrival={"kind": "poisson", "rate_per_s": 1.0},
                        prompt_tokens={"kind": "zipf", "a": 1.2, "min": 10, "max": 2000},
                        output_tokens={"kind": "lognormal", "median": 200, "sigma": 0.5, "min": 1, "max": 4000})
    reqs = list(build_workload(wl, 3))
    p = np.array([r.num_prompt_tokens for r in reqs])
    o = np.array([r.num_output_tokens for r in reqs])
    assert p.min() >= 10 and p.max() <= 2000 and np.median(p) < 100  # heavy head at the minimum
    assert np.median(o) == pytest.approx(200, rel=0.05)


def test_empirical_lengths_keep_joint_pairs():
    src = TraceConfig(path=ROOT / "workloads" / "azure_conv_2023.csv", format="azure")
    pairs = {(r.prompt_tokens, r.output_tokens) for r in read_trace(src)}
    wl = WorkloadConfig(num_requests=500, arrival={"kind": "poisson", "rate_per_s": 1.0}, lengths_from=src)
    assert all((r.num_prompt_tokens, r.num_output_tokens) in pairs for r in build_workload(wl, 0))


def test_lengths_from_a_file_read_before_follow_a_change_to_it(tmp_path):
    """A process reads a lengths_from trace once (sweep points and plan candidates resample the same one); a
    changed file is read again."""
    path = tmp_path / "lengths.csv"
    wl = WorkloadConfig(num_requests=20, arrival={"kind": "poisson", "rate_per_s": 1.0},
                        lengths_from=TraceConfig(path=path, format="azure"))
    lengths = set()
    for prompt, output, mtime_ns in ((100, 10, 1_000_000_000), (200, 20, 2_000_000_000), (3000, 30, 2_000_000_000)):
        path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                        + "".join(f"2023-11-16 18:15:4{i}.0000000,{prompt},{output}\n" for i in range(3)))
        os.utime(path, ns=(mtime_ns, mtime_ns))  # the third keeps the second's time: its size tells them apart
        lengths |= {(r.num_prompt_tokens, r.num_output_tokens) for r in build_workload(wl, 0)}
    assert lengths == {(100, 10), (200, 20), (3000, 30)}


def test_rows_past_a_context_are_left_out():
    src = TraceConfig(path=ROOT / "workloads" / "azure_conv_2023.csv", format="azure")
    rows = list(read_trace(src))
    kept = list(read_trace(src.model_copy(update={"max_total_tokens": 2048})))
    assert len(rows) > len(kept) > 0 and all(r.prompt_tokens + r.output_tokens <= 2048 for r in kept)
    assert len(kept) == sum(1 for r in rows if r.prompt_tokens + r.output_tokens <= 2048)
    wl = WorkloadConfig(num_requests=300, arrival={"kind": "poisson", "rate_per_s": 1.0},
                        lengths_from=src.model_copy(update={"max_total_tokens": 2048}))
    assert all(r.num_prompt_tokens + r.num_output_tokens <= 2048 for r in build_workload(wl, 0))


def test_prefill_decode_lengths_feed_lengths_from_and_only_that():
    """Sarathi-Serve's ShareGPT lengths: the shipped file reads whole, pairs are drawn jointly, and a replay of a
    file without times is a config error; a bad row names the file and line."""
    src = TraceConfig(path=ROOT / "workloads" / "sharegpt_8k_sarathi_serve.csv", format="prefill_decode")
    rows = list(read_trace(src))
    assert len(rows) == 30731 and (rows[0].prompt_tokens, rows[0].output_tokens) == (74, 918)
    assert np.median([r.prompt_tokens for r in rows]) == 1730 and np.median([r.output_tokens for r in rows]) == 415
    pairs = {(r.prompt_tokens, r.output_tokens) for r in rows}
    wl = WorkloadConfig(num_requests=300, arrival={"kind": "poisson", "rate_per_s": 1.0}, lengths_from=src)
    assert all((r.num_prompt_tokens, r.num_output_tokens) in pairs for r in build_workload(wl, 0))
    with pytest.raises(ValueError, match="prefill_decode has lengths but no arrival times"):
        WorkloadConfig(trace=src)


@pytest.mark.parametrize("body,needle", [
    ("num_prefill_tokens,num_decode_tokens\n12,5\n0,5\n", ":3: column 'num_prefill_tokens' is 0, expected at least 1"),
    ("num_prefill_tokens,num_decode_tokens\n12,x\n", ":2: column 'num_decode_tokens' is 'x'"),
    ("prompt,output\n12,5\n", ":1: header lacks ['num_prefill_tokens', 'num_decode_tokens']"),
])
def test_bad_prefill_decode_file_names_file_and_line(tmp_path, body, needle):
    path = tmp_path / "lengths.csv"
    path.write_text(body)
    with pytest.raises(TraceError) as err:
        list(read_trace(TraceConfig(path=path, format="prefill_decode")))
    assert f"{path}{needle}" in str(err.value)


def test_duration_cap():
    wl = WorkloadConfig(duration_s=10.0, arrival={"kind": "poisson", "rate_per_s": 20.0},
                        prompt_tokens={"kind": "fixed", "value": 10}, output_tokens={"kind": "fixed", "value": 5})
    reqs = list(build_workload(wl, 0))
    assert 150 < len(reqs) < 250 and reqs[-1].arrival_s < 10.0


def test_burstgpt_sessions_replay_as_conversations(tmp_path):
    """BurstGPT v1.2's Session ID: each turn resends the conversation so far, so its prompt starts with the
    previous turn's prompt and answer, and the prefix cache can serve it."""
    from llmsim.cluster.simulation import simulate
    from tests.factories import make_config

    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time\n"
                    "0,ChatGPT,400,100,500,Conversation log,s1,3.0\n"
                    "1,ChatGPT,300,50,350,Conversation log,s2,2.0\n"
                    "30,ChatGPT,560,80,640,Conversation log,s1,2.5\n"   # 400 + 100 resent + 60 new
                    "31,ChatGPT,200,40,240,Conversation log,s2,1.0\n")  # shorter than s2's history: afresh
    cfg = make_config(scheduler={"name": "vllm_v1", "max_num_batched_tokens": 4096},
                      workload={"trace": {"path": str(path), "format": "burstgpt"}})
    from llmsim.workload import build_workload

    reqs = list(build_workload(cfg.workload, cfg.seed))
    first, _, second, fresh = reqs
    assert second.prefix_segments[:2] == first.prefix_segments  # its history: turn 1's message and answer
    assert [n for _, n in second.prefix_segments] == [400, 100, 60, 80]
    assert [n for _, n in fresh.prefix_segments] == [200, 40]
    df = simulate(cfg, iter(reqs)).recorder.request_frame().set_index("id")
    assert df.loc[2, "num_cached_tokens"] == 496  # the resent 500 tokens, in whole 16-token blocks
    assert df.loc[3, "num_cached_tokens"] == 0


def _session_trace(path):
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time\n"
                    "0,ChatGPT,400,100,500,Conversation log,s1,3.0\n"
                    "1,ChatGPT,300,50,350,Conversation log,s2,2.0\n"
                    "2,ChatGPT,100,0,100,Conversation log,s3,0.5\n"      # failed: rejected, s3 goes on
                    "2.5,ChatGPT,120,20,140,API log,,\n"                  # no conversation: its trace time
                    "30,ChatGPT,560,80,640,Conversation log,s1,2.5\n"     # think 30 - 0 - 3.0 = 27 s
                    "31,ChatGPT,410,40,450,Conversation log,s2,1.0\n"     # think 31 - 1 - 2.0 = 28 s
                    "40,ChatGPT,150,30,180,Conversation log,s3,1.0\n"     # after a failed turn: its gap, 38 s
                    "40.5,ChatGPT,700,10,710,Conversation log,s1,1.0\n")  # think 40.5 - 30 - 2.5 = 8 s
    return path


def test_closed_loop_replay_sends_a_turn_its_think_time_after_the_simulated_answer(tmp_path):
    """trace.closed_loop: a later turn of a conversation waits for the simulated answer to the turn before it,
    then the think time the trace shows (its gap less the real service's Elapsed time); the same turns and content
    as the open-loop replay; fast-forward equals stepping."""
    from llmsim.cluster.simulation import simulate
    from llmsim.workload.conversations import ClosedLoop
    from tests.factories import make_config
    from tests.test_simulation import frames

    trace = {"path": str(_session_trace(tmp_path / "b.csv")), "format": "burstgpt", "failed": "reject"}
    open_loop = list(build_workload(make_config(workload={"trace": trace}).workload, 0))

    def run(ff, slow):
        cfg = make_config(scheduler={"name": "vllm_v1", "max_num_batched_tokens": 4096},
                          model={"name": "Llama-2-70B" if slow else "Llama-2-7B"},
                          parallel={"tp": 4 if slow else 1},
                          workload={"trace": {**trace, "closed_loop": True}}, simulation={"fast_forward": ff})
        workload = build_workload(cfg.workload, cfg.seed)
        assert isinstance(workload, ClosedLoop)
        return simulate(cfg, workload)

    result = run(True, False)
    df = result.recorder.request_frame().sort_values("id")
    assert len(df) == 8 and (df["status"] == "rejected").sum() == 1
    by_prompt = df.set_index("num_prompt_tokens")
    # first turns and the request outside a conversation at their trace times
    assert list(by_prompt.loc[[400, 300, 100, 120], "arrival_s"]) == [0.0, 1.0, 2.0, 2.5]
    assert by_prompt.loc[560, "arrival_s"] == by_prompt.loc[400, "finish_s"] + 27.0
    assert by_prompt.loc[410, "arrival_s"] == by_prompt.loc[300, "finish_s"] + 28.0
    assert by_prompt.loc[150, "arrival_s"] == 2.0 + 38.0  # after the failed turn: the trace's gap
    assert by_prompt.loc[700, "arrival_s"] == by_prompt.loc[560, "finish_s"] + 8.0
    # the same named content as the open-loop replay
    segments = {r.num_prompt_tokens: r.prefix_segments for r in open_loop}
    assert by_prompt.loc[560, "num_cached_tokens"] == 496 and segments[560][:2] == segments[400]
    pd.testing.assert_frame_equal(frames(result)[0], frames(run(False, False))[0], check_exact=True)
    # a slower server moves the later turns later, never before the answer they follow
    slow = run(True, True).recorder.request_frame().set_index("num_prompt_tokens")
    assert slow.loc[560, "arrival_s"] == slow.loc[400, "finish_s"] + 27.0 > by_prompt.loc[560, "arrival_s"]


def test_closed_loop_turn_sent_as_the_answer_ends_under_async_scheduling():
    """A turn whose trace time came before the real answer ended is sent the instant the simulated answer ends:
    it reaches the engine as the next step starts. With async scheduling that step was scheduled without it, so
    the engine schedules it at the next boundary -- one step, where a request arriving during a step waits two.
    A fast-forwarded run that began at that instant used to hold it a step longer than stepping does."""
    from llmsim.cluster.simulation import simulate
    from tests.factories import make_config
    from tests.test_simulation import assert_fast_forward_equals_stepping

    sessions = Path(__file__).parent / "data" / "burstgpt_sessions.csv"

    def cfg(ff):
        return make_config(scheduler={"name": "vllm_v1", "async_scheduling": True},
                           workload={"trace": {"path": str(sessions), "format": "burstgpt", "closed_loop": True}},
                           simulation={"fast_forward": ff})

    df = simulate(cfg(True), build_workload(cfg(True).workload, 0)).recorder.request_frame()
    ended = set(df["finish_s"])
    assert (df["arrival_s"].isin(ended)).sum() == 4  # turns sent as the answer before them ended
    assert_fast_forward_equals_stepping(cfg)


def test_closed_loop_turn_after_a_timed_out_one_is_not_sent_before_the_client_gives_up(tmp_path):
    """After a turn that timed out the next is sent the trace's gap after it, or when the client gives up on it
    where that comes later; it used to be dated the trace's gap after the turn even when that was before the
    client had given up, so its TTFT counted time before it was sent."""
    from llmsim.cluster.simulation import simulate
    from tests.factories import make_config

    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time\n"
                    "0,ChatGPT,3000,900,3900,Conversation log,s1,0.3\n"
                    "0.5,ChatGPT,3000,10,3010,Conversation log,s1,0.1\n"   # gap 0.5 s < the 1 s timeout
                    "0.6,ChatGPT,500,900,1400,Conversation log,s2,0.2\n"
                    "5.0,ChatGPT,500,10,510,Conversation log,s2,0.1\n")    # gap 4.4 s > the timeout
    for ff in (True, False):
        cfg = make_config(scheduler={"name": "vllm_v1"}, simulation={"client_timeout_s": 1.0, "fast_forward": ff},
                          workload={"trace": {"path": str(path), "format": "burstgpt", "closed_loop": True}})
        df = simulate(cfg, build_workload(cfg.workload, 0)).recorder.request_frame().set_index("num_output_tokens")
        first, second = df.loc[900].sort_values("arrival_s"), df.loc[10].sort_values("arrival_s")
        assert list(first["status"]) == ["timed_out", "timed_out"]
        assert list(second["arrival_s"]) == [1.0, 0.6 + 4.4]  # as s1's client gives up; s2's trace gap
        assert (second["scheduled_s"] >= second["arrival_s"]).all()


def test_closed_loop_replay_errors(tmp_path):
    from tests.factories import make_config

    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID,Elapsed time\n"
                    "0,ChatGPT,400,100,500,Conversation log,s1,\n")
    cfg = make_config(workload={"trace": {"path": str(path), "format": "burstgpt", "closed_loop": True}})
    with pytest.raises(TraceError, match=r"b.csv:2: trace.closed_loop needs the Elapsed time"):
        build_workload(cfg.workload, 0)
    with pytest.raises(ConfigError, match="closed_loop replays BurstGPT conversations"):
        make_config(workload={"trace": {"path": str(path), "format": "azure", "closed_loop": True}})



def _burstgpt_both_ways(path, rows):
    """Rows of (timestamp, request tokens, response tokens) fields as ``read_burstgpt`` reads them, and as the
    field checks alone read them: (rows read, error message or None) each."""
    from llmsim.workload.traces import _int, _seconds, read_burstgpt

    path.write_text(HEADER + "".join(f"{t},ChatGPT,{p},{r},0,API log\n" for t, p, r in rows))
    expected, error = [], None
    try:
        for line, (t, p, r) in enumerate(rows, start=2):
            time_s = _seconds(t, path, line, "Timestamp")
            response = _int(r, path, line, "Response tokens")
            prompt = _int(p, path, line, "Request tokens", minimum=1)
            expected.append((time_s, prompt, response, response == 0, line))
    except TraceError as exc:
        error = str(exc)
    read, got_error = [], None
    try:
        for row in read_burstgpt(TraceConfig(path=path, format="burstgpt")):
            read.append((row.time_s, row.prompt_tokens, row.output_tokens, row.failed, row.line))
            assert type(row.time_s) is float and type(row.prompt_tokens) is int and type(row.output_tokens) is int
    except TraceError as exc:
        got_error = str(exc)
    return (read, got_error), (expected, error)


# Fields a BurstGPT row may hold: plain numbers (the reader's fast path) and whatever else it must accept ("12.0",
# " 7 ", "1e3") or reject with the file, line and column ("nan", "-3", "12.5", "", beyond MAX_TOKENS).
_SPECIAL_FIELDS = ["0", "1", "-1", "-0", "12.0", " 7 ", "1e3", "+5", "1_000", "nan", "inf", "-inf", "1e309", "",
                   "abc", "12.5", "-0.5", "0x10", "99999999999999999999", "2147483647", "2147483648", "3.0e1"]


def test_burstgpt_numbers_are_read_as_the_field_checks_read_them(tmp_path):
    """The BurstGPT reader parses plain numbers directly and leaves everything else to the field checks
    (``_seconds``, ``_int``): each special value in each of the three columns reads as those checks alone read it
    -- the same values, or the same error naming the file, line and column."""
    from llmsim.config import MAX_TOKENS

    assert MAX_TOKENS == 2147483647  # the boundary values above
    for column in range(3):
        for value in _SPECIAL_FIELDS:
            fields = ["5", "10", "20"]
            fields[column] = value
            got, expected = _burstgpt_both_ways(tmp_path / "t.csv", [tuple(fields)])
            assert got == expected, (column, value)


_FIELDS = st.one_of(st.integers(-3, 3), st.integers(0, 2_000_000), st.floats(-5, 1e4, allow_nan=False),
                    st.sampled_from(_SPECIAL_FIELDS)).map(str)


@given(rows=st.lists(st.tuples(_FIELDS, _FIELDS, _FIELDS), min_size=1, max_size=6))
def test_burstgpt_rows_are_read_as_the_field_checks_read_them(tmp_path_factory, rows):
    """Rows of random fields: what the reader reads, and the first error, are the field checks' alone."""
    got, expected = _burstgpt_both_ways(tmp_path_factory.mktemp("trace") / "t.csv", rows)
    assert got == expected
