"""Replicas simulated in worker processes (``simulation.workers``), for clusters whose replicas never interact.

With round-robin routing, colocated replicas and open-loop traffic, which replica serves a request follows from
the arrival order alone, and nothing one replica does reaches another: each replica's simulation depends only on
the requests routed to it. So the requests are routed (and the ones no replica can serve rejected) up front,
each worker simulates its share of the replicas -- the usual simulation, with only its requests, each sent to the
replica round-robin gave it -- and the workers' records are merged. Where processes are forked, this process is
the first worker: its records need no sending, and its memory then holds a simulation too (README, Speed). A
replica sees the same arrivals at the same times as in one process, and its events keep their order, so the
results are bit-identical (``tests/test_simulation.py`` compares them); the summary reads every record in an
order-free way (requests by id, iterations per replica in time order, pooled token gaps by exact summation).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable

from llmsim.clock import Clock
from llmsim.cluster.router import RoundRobin
from llmsim.config import ExperimentConfig
from llmsim.errors import EngineAborted, LLMSimError
from llmsim.metrics.recorder import Recorder
from llmsim.request import Request, RequestStatus

if TYPE_CHECKING:
    from llmsim.cluster.replica import Replica
    from llmsim.cluster.simulation import SimulationResult


class Assigned:
    """The router of a worker: each request goes to the replica chosen for it before the workers started."""

    def __init__(self, replica_of: dict[int, int]) -> None:
        self._replica_of = replica_of

    def pick(self, request: Request, replicas: list[Replica]) -> Replica:
        return replicas[self._replica_of[request.id]]


def simulate_in_workers(cfg: ExperimentConfig, requests: Iterable[Request],
                        on_progress: Callable[[int], None] | None = None) -> SimulationResult:
    from llmsim.cluster.simulation import SimulationResult, build_pools, make_replica, rejection_reason

    wall0 = time.perf_counter()
    model, pools, max_model_len = build_pools(cfg)
    pool = pools[0]
    n = pool.num_replicas
    workers = min(cfg.simulation.workers, n)
    recorder = Recorder([pool.power] * n, cfg.simulation.record_iterations)
    # What can never be served is decided by a replica's fixed limits: one that never runs answers for all.
    probe = make_replica(Clock(), 0, cfg, pool, Recorder([pool.power], False))
    router, replica_ids, frontend_s = RoundRobin(), list(range(n)), cfg.cluster.frontend_latency_s
    shares: list[list[Request]] = [[] for _ in range(workers)]
    replica_of: dict[int, int] = {}
    num_arrived, last_arrival_s = 0, 0.0
    for r in requests:
        num_arrived += 1
        at = r.arrival_s + frontend_s if frontend_s else r.arrival_s
        last_arrival_s = max(last_arrival_s, at)
        reason = rejection_reason(r, max_model_len, probe, probe)
        if reason:
            r.status, r.reject_reason = RequestStatus.REJECTED, reason
            recorder.request(r, "rejected")
            continue
        rid = replica_of[r.id] = router.pick(r, replica_ids)
        shares[rid % workers].append(r)
    if on_progress is not None:
        on_progress(num_arrived)
    one = cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update={"workers": 1})})
    jobs = [(one, share, {r.id: replica_of[r.id] for r in share}) for share in shares]
    shares = replica_of = None
    if "fork" in multiprocessing.get_all_start_methods():
        outcomes = _run_forked(jobs, recorder)
        jobs = None
    else:  # spawn: each job is pickled to its worker, each outcome back (a worker that dies raises, not hangs)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as processes:
            outcomes, errors = [], []
            for future in [processes.submit(_simulate_share, job) for job in jobs]:
                try:
                    outcome = future.result()
                except LLMSimError as exc:
                    errors.append(exc)
                    continue
                recorder.absorb(outcome[0])
                outcomes.append(outcome[1:])
        _raise_first(errors)
    # A replica no request reached built no kernel: it reports as the probe does, fresh (a replica serving nothing
    # in one process still has its record, so the summary's ``kernel_builds`` is the same where none served).
    moe_compiles, peak_swapped = [probe.moe_compiles] * n, [0] * n
    sim_time_s, num_in_flight = last_arrival_s, 0
    for engines, swapped, now, in_flight in outcomes:
        for rid, engine in engines.items():
            moe_compiles[rid] = engine
        for rid, peak in swapped.items():
            peak_swapped[rid] = peak
        sim_time_s = max(sim_time_s, now)
        num_in_flight += in_flight
    return SimulationResult(cfg, model, pool.execution, pool.memory, recorder, [], num_arrived, num_in_flight,
                            sim_time_s, time.perf_counter() - wall0, pools, [0] * n, moe_compiles=moe_compiles,
                            peak_swapped_blocks=peak_swapped)


_JOBS: list = []  # the jobs of forked workers, set while they start


def _run_forked(jobs: list, recorder: Recorder) -> list:
    """Fork a worker per job but the first, which this process runs itself meanwhile (its records need no
    sending, and one process fewer starts); absorb each job's records into ``recorder`` in job order, a worker's
    column by column as it sends them, and let the worker exit. Returns each job's other outcome."""
    global _JOBS
    ctx = multiprocessing.get_context("fork")
    readers = {}
    _JOBS = jobs
    try:
        for index in range(1, len(jobs)):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_worker, args=(index, writer), daemon=True)
            process.start()
            writer.close()
            readers[reader] = process
    finally:
        _JOBS = []
    own = jobs[0]
    jobs.clear()  # the workers have their copies: this process needs their requests no more
    outcomes, errors = [], []
    try:
        try:
            own_recorder, *rest = _simulate_share(own)
        except LLMSimError as exc:  # as a worker's: the others may stop earlier
            errors.append(exc)
        else:
            recorder.absorb(own_recorder)
            outcomes.append(rest)
        own = own_recorder = None
        for reader, process in readers.items():  # in worker order, so the merged records' order is fixed
            try:
                status, head = reader.recv()
            except EOFError:
                process.join()
                raise RuntimeError(f"a simulation worker died (exit code {process.exitcode})") from None
            if status == "error":
                raise RuntimeError(f"a simulation worker failed:\n{head}")
            if status == "llmsim_error":  # its replicas' engine stopped (say): the others may stop earlier
                errors.append(head)
                continue
            worker_recorder, num_columns = head[0], head[-1]
            recorder.absorb(worker_recorder, (reader.recv_bytes() for _ in range(num_columns)))
            outcomes.append(head[1:-1])
            reader.close()
            process.join()
    finally:  # after a failure (or Ctrl-C), no worker is left behind
        for reader, process in readers.items():
            reader.close()
            if process.is_alive():
                process.terminate()
            process.join()
    _raise_first(errors)
    return outcomes


def _raise_first(errors: list[LLMSimError]) -> None:
    """Raise what one process would have: an error of the input before any engine abort, else the abort at the
    earliest simulated time (the replicas run apart, so each worker's first abort is as one process has it)."""
    if errors:
        raise min(errors, key=lambda exc: exc.at_s if isinstance(exc, EngineAborted) else float("-inf"))


def _worker(index: int, writer) -> None:
    """A forked worker: simulate its job, then send its records' metadata and, one at a time, their columns."""
    global _JOBS
    job, _JOBS = _JOBS[index], []  # the other workers' requests are freed here
    try:
        worker_recorder, *rest = _simulate_share(job)
        columns = worker_recorder.columns()
        worker_recorder.detach_columns()  # pickled without them: they follow raw
        head = (worker_recorder, *rest, len(columns))
    except LLMSimError as exc:  # the user's to read, as in one process (pickled with its time)
        writer.send(("llmsim_error", exc))
        writer.close()
        return
    except BaseException:
        writer.send(("error", traceback.format_exc()))
        writer.close()
        return
    writer.send(("ok", head))
    for col in columns:
        writer.send_bytes(memoryview(col))
    writer.close()


def _simulate_share(job):
    """One worker: the usual simulation of its requests, each sent to its replica; returns its records, the
    fused-MoE build records and swap peaks of the replicas it served, its clock's end and its requests in flight."""
    from llmsim.cluster.simulation import simulate

    cfg, share, replica_of = job
    result = simulate(cfg, _drain(share), router=Assigned(replica_of))
    result.recorder.totals  # folds the iteration rows (power, totals) here, in the worker
    served = set(replica_of.values())
    engines = {rid: engine for rid, engine in enumerate(result.moe_compiles) if rid in served}
    swapped = {rid: peak for rid, peak in enumerate(result.peak_swapped_blocks) if rid in served}
    return result.recorder, engines, swapped, result.sim_time_s, result.num_in_flight


def _drain(requests: list[Request]):
    """The requests in order, each let go of by the list as it is handed out (a finished request is then
    freed, as a streamed workload's is)."""
    requests.reverse()
    while requests:
        yield requests.pop()
