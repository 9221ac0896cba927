"""Compose arrivals and lengths into a lazy, seeded stream of requests."""

from __future__ import annotations

import os
from itertools import chain, islice
from typing import Iterator

import numpy as np

from llmsim.config import TraceConfig, WorkloadConfig
from llmsim.request import Request, RequestStatus
from llmsim.workload.arrivals import arrival_times
from llmsim.errors import ConfigError, TraceError
from llmsim.workload.conversations import ClosedLoop, ClosedLoopChat, ClosedLoopReplay
from llmsim.workload.shared_prefix import shared_prefix_requests
from llmsim.workload.lengths import empirical_pairs, length_pairs
from llmsim.workload.traces import Conversations, TraceRow, mooncake_segments, read_trace


def _trace_requests(cfg: WorkloadConfig) -> Iterator[Request]:
    return (r for r, _ in _trace_rows(cfg))


def _trace_rows(cfg: WorkloadConfig) -> Iterator[tuple[Request, TraceRow]]:
    trace = cfg.trace
    conversations = Conversations()
    for i, row in enumerate(read_trace(trace)):
        if row.failed and trace.failed == "skip":
            continue
        # A failed row keeps at least one output token so its shape is valid; it is rejected at arrival.
        r = Request(i, row.time_s, max(1, row.prompt_tokens), max(1, row.output_tokens))
        if row.hash_ids:
            r.prefix_segments = mooncake_segments(row.hash_ids, row.prompt_tokens)
        elif row.session and not row.failed:
            r.prefix_segments = conversations.segments(row.session, row.prompt_tokens, row.output_tokens)
        if row.failed:
            r.status = RequestStatus.REJECTED
            r.reject_reason = "failed in trace"
        yield r, row


def _closed_loop_replay(cfg: WorkloadConfig, seed: int) -> ClosedLoopReplay:
    rows = list(_trace_rows(cfg))
    if cfg.high_priority_fraction > 0:  # marked in trace order, as the open-loop replay marks them
        for _ in _with_priorities((r for r, _ in rows), cfg.high_priority_fraction, seed):
            pass
    turns = []
    for r, row in rows:
        if row.session and row.elapsed_s != row.elapsed_s:  # NaN
            raise TraceError(f"{cfg.trace.path}:{row.line}: trace.closed_loop needs the Elapsed time of every "
                             "conversation row (BurstGPT v1.2)")
        turns.append((r, row.session, row.elapsed_s))
    return ClosedLoopReplay(turns, cfg.num_requests, cfg.duration_s)


def _empirical_source(cfg: WorkloadConfig) -> tuple[np.ndarray, np.ndarray]:
    """The (prompt, output) lengths of ``lengths_from``'s rows, read once per process and version of the file:
    the points of a sweep or a plan search resample the same trace (the Azure one takes ~0.2 s to parse, as long
    as a short run's whole simulation). Read-only arrays, so no run can change another's."""
    source = cfg.lengths_from
    try:
        stat = os.stat(source.path)
    except OSError:
        return _read_lengths(source)  # the reader says what is wrong with the file
    key = (source.model_dump_json(), stat.st_mtime_ns, stat.st_size)
    lengths = _LENGTHS.get(key)
    if lengths is None:
        lengths = _read_lengths(source)
        for array in lengths:
            array.flags.writeable = False
        if len(_LENGTHS) >= _LENGTHS_MAX:
            _LENGTHS.clear()
        _LENGTHS[key] = lengths
    return lengths


def _read_lengths(source: TraceConfig) -> tuple[np.ndarray, np.ndarray]:
    prompts, outputs = [], []
    for row in read_trace(source):
        if not row.failed and row.prompt_tokens > 0:
            prompts.append(row.prompt_tokens)
            outputs.append(row.output_tokens)
    return np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64)


# (the source's settings, the file's modification time and size) -> its lengths (``_empirical_source``).
_LENGTHS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_LENGTHS_MAX = 8


def _pairs(cfg: WorkloadConfig, length_rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    if cfg.lengths_from is not None:
        prompts, outputs = _empirical_source(cfg)
        if not len(prompts):
            raise TraceError(f"workload.lengths_from: {cfg.lengths_from.path} has no row to sample lengths from (none, "
                             "or each failed or without prompt tokens)")
        return empirical_pairs(prompts, outputs, length_rng)
    return length_pairs(cfg.prompt_tokens, cfg.output_tokens, length_rng)


def _synthetic_requests(cfg: WorkloadConfig, seed: int) -> Iterator[Request]:
    arrival_rng, length_rng = (np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(2))
    if cfg.shared_prefix is not None:
        shaped = shared_prefix_requests(cfg.shared_prefix, length_rng)
        for i, (t, (prompt, output, segments)) in enumerate(zip(arrival_times(cfg.arrival, arrival_rng), shaped)):
            yield Request(i, t, prompt, output, prefix_segments=segments)
        return
    for i, (t, (prompt, output)) in enumerate(zip(arrival_times(cfg.arrival, arrival_rng), _pairs(cfg, length_rng))):
        yield Request(i, t, max(1, prompt), max(1, output))


def build_workload(cfg: WorkloadConfig, seed: int) -> Iterator[Request] | ClosedLoop:
    """Requests in arrival order, capped by ``num_requests`` and ``duration_s``; for ``conversation`` and
    ``trace.closed_loop`` a closed-loop workload, whose later turns the simulator asks for as earlier ones end."""
    if cfg.trace is not None and cfg.trace.closed_loop:
        return _closed_loop_replay(cfg, seed)
    if cfg.conversation is not None:
        length_ss = np.random.SeedSequence(seed).spawn(4)[3]  # a stream apart from the open-loop ones
        return ClosedLoopChat(cfg, seed, _pairs(cfg, np.random.Generator(np.random.PCG64(length_ss))))
    stream = _trace_requests(cfg) if cfg.trace is not None else _synthetic_requests(cfg, seed)
    if cfg.duration_s is not None:
        stream = _until(stream, cfg.duration_s)
    if cfg.num_requests is not None:
        stream = islice(stream, cfg.num_requests)
    if cfg.high_priority_fraction > 0:
        stream = _with_priorities(stream, cfg.high_priority_fraction, seed)
    return stream


def check_trace_rows(cfg: WorkloadConfig) -> None:
    """Read the trace rows a run will read (``num_requests``, ``duration_s`` and the trace's window and filters
    applied), so that a bad row is an error before the simulation starts, not when the simulation reaches it: the
    run streams its trace, and a bad row at the end of a million would otherwise end minutes of simulation (a
    million BurstGPT rows read in about 2 s). Once per process for a file version and these settings: a
    sweep's or a plan search's points replay the same rows. A closed-loop replay reads every row up front anyway."""
    trace = cfg.trace
    if trace is None or trace.closed_loop:
        return
    try:
        stat = os.stat(trace.path)
    except OSError:
        return  # the run's reader says what is wrong with the file, before it simulates anything
    key = (trace.model_dump_json(), cfg.num_requests, cfg.duration_s, stat.st_mtime_ns, stat.st_size)
    if key in _CHECKED:
        return
    for _ in build_workload(cfg, 0):  # the run's own stream (the seed only marks priorities)
        pass
    if len(_CHECKED) >= _LENGTHS_MAX:
        _CHECKED.clear()
    _CHECKED.add(key)


# (the trace's settings, the run's limits, the file's modification time and size) of traces read whole
# (``check_trace_rows``).
_CHECKED: set[tuple] = set()


def _with_priorities(stream: Iterator[Request], fraction: float, seed: int) -> Iterator[Request]:
    """Mark each request high priority (1) with probability ``fraction``, from a stream of its own so the
    arrivals and lengths stay the same as without priorities."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed).spawn(3)[2]))
    for r in stream:
        if rng.random() < fraction:
            r.priority = 1
        yield r


def _until(stream: Iterator[Request], end_s: float) -> Iterator[Request]:
    for r in stream:
        if r.arrival_s >= end_s:
            return
        yield r


def first_request(requests: Iterator[Request], w: WorkloadConfig) -> Iterator[Request]:
    """``requests`` unchanged, after checking there is at least one (lazily read traces included)."""
    first = next(requests, None)
    if first is None:
        if w.trace is not None:
            why = (f"no row of {w.trace.path} passes the filters and window (model={w.trace.model!r}, "
                   f"log_type={w.trace.log_type!r}, start_s={w.trace.start_s}, end_s={w.trace.end_s}, "
                   f"failed={w.trace.failed!r})")
        elif w.duration_s is not None:
            why = f"duration_s {w.duration_s} ends before the first arrival"
        else:
            why = "num_requests is 0"
        raise ConfigError(f"workload: no requests to simulate: {why}")
    return chain((first,), requests)


def checked_workload(w: WorkloadConfig, seed: int) -> Iterator[Request] | ClosedLoop:
    """``build_workload``, after checking it has a request to simulate (``first_request``); ``llmsim check`` draws
    it too (a generated workload's first arrival comes from its seed, so only drawing it tells)."""
    workload = build_workload(w, seed)
    if isinstance(workload, ClosedLoop):
        workload.first_turns = first_request(workload.first_turns, w)
        return workload
    return first_request(iter(workload), w)
