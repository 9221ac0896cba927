"""Columnar records of requests, iterations and token gaps.

Requests are written out when they end (and the object dropped), so memory grows by a few dozen bytes per
request rather than by the request objects themselves; iterations and token gaps are packed arrays.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from llmsim.energy import PowerModel
from llmsim.request import Request

if TYPE_CHECKING:
    import pandas as pd

REQUEST_FLOAT_FIELDS = ("arrival_s", "scheduled_s", "first_token_s", "finish_s", "max_tbt_s")
REQUEST_INT_FIELDS = ("id", "replica_id", "num_prompt_tokens", "num_output_tokens", "num_generated_tokens",
                      "num_preemptions", "num_migrations", "priority", "num_cached_tokens")
ITERATION_FIELDS = ("start_s", "duration_s", "flops", "num_bytes", "power_w")  # power_w: per GPU
ITERATION_INT_FIELDS = ("replica_id", "num_prefill_tokens", "num_decode_tokens", "kv_used_blocks")


class ReplicaTotals:
    """Running sums over one replica's iterations, added one iteration at a time in time order, so stepping and
    fast-forwarding give bit-identical totals. These feed the summary whether or not iterations are recorded."""

    __slots__ = ("busy_s", "flops", "num_bytes", "kv_block_s", "busy_energy_j", "num_iterations")

    def __init__(self) -> None:
        self.busy_s = self.flops = self.num_bytes = self.kv_block_s = self.busy_energy_j = 0.0
        self.num_iterations = 0


_FOLD_ROWS = 1 << 16  # without records: iteration rows buffered between folds into the totals (~2.6 MB)
_BACK_FLUSH = 1 << 14  # runs and gap values taken back, gathered before they are written (``flush_take_backs``)


def _sum_on(total: float, values: np.ndarray) -> float:
    """``total + values[0] + values[1] + ...``, added in order as a Python loop would."""
    return float(np.cumsum(np.concatenate(([total], values)))[-1])


class Recorder:
    def __init__(self, powers: list[PowerModel], record_iterations: bool = True) -> None:
        self.powers = powers  # by replica id
        self.record_iterations = record_iterations
        # The iterations' power and the replicas' totals are worked out from the iteration rows, in batches, off
        # the hot path (``_fold``). Without records the rows are a buffer, emptied by each fold.
        self._totals: dict[int, ReplicaTotals] = {}
        self._folded = 0  # rows of the iteration arrays already in ``_totals`` (and, with records, in power_w)
        self.requests = {name: array("d") for name in REQUEST_FLOAT_FIELDS}
        self.requests.update({name: array("q") for name in REQUEST_INT_FIELDS})
        self.status: list[str] = []
        self.reason: list[str] = []
        self.iterations = {name: array("d") for name in ITERATION_FIELDS}
        self.iterations.update({name: array("q") for name in ITERATION_INT_FIELDS})
        # Gaps between consecutive output tokens, with how many tokens saw each gap. ITL counts the gaps of
        # finished requests only, as vLLM's benchmark counts those of successful ones: where a request can end
        # otherwise after two tokens (a client timeout, a cut-off, a policy that drops a started request), its
        # replica logs its gaps on it (``Request.gap_log``), and if it ends unfinished they are taken back as
        # negative counts of the same values (``summary.itl_stats`` nets them out). Take-backs are gathered
        # first (the requests of one run share its gaps, and often time out together), then written as one
        # entry a run's gap or a value (``flush_take_backs``).
        self.tbt_gap_s = array("d")
        self.tbt_count = array("q")
        self.logs_gaps = False
        self._back_runs: dict[tuple[int, int, int], list] = {}  # (id of durations, first, end) -> [durations, .., n]
        self._back_gaps: dict[float, int] = {}  # gap -> times taken back
        # Called with each request as it ends (its status): a closed-loop workload sends the next turn.
        self.on_request_end: Callable[[Request, str], None] | None = None
        # Replica id -> when its latest iteration ends: the hardware is observed until the last of these, which
        # may come after the last finish (steps for requests that timed out, or ran on at a cut-off).
        self.last_end_s: dict[int, float] = {}

    def request(self, r: Request, status: str) -> None:
        log = r.gap_log
        if log is not None:
            r.gap_log = None
            if status != "finished" and log:
                self._take_back_gaps(log)
        cols = self.requests
        for name in REQUEST_FLOAT_FIELDS + REQUEST_INT_FIELDS:
            cols[name].append(getattr(r, name))
        if r.num_cached_tokens < 0:  # never scheduled, or not a prefix-caching scheduler: nothing was cached
            cols["num_cached_tokens"][-1] = 0
        self.status.append(status)
        self.reason.append(r.reject_reason)
        if self.on_request_end is not None:
            self.on_request_end(r, status)

    def iteration(self, replica_id: int, start_s: float, duration_s: float, flops: float, num_bytes: float,
                  num_prefill_tokens: int, num_decode_tokens: int, kv_used_blocks: int) -> None:
        it = self.iterations
        end = start_s + duration_s
        if end > self.last_end_s.get(replica_id, 0.0):
            self.last_end_s[replica_id] = end
        it["replica_id"].append(replica_id)
        it["duration_s"].append(duration_s)
        it["flops"].append(flops)
        it["num_bytes"].append(num_bytes)
        it["kv_used_blocks"].append(kv_used_blocks)
        if self.record_iterations:
            it["start_s"].append(start_s)
            it["num_prefill_tokens"].append(num_prefill_tokens)
            it["num_decode_tokens"].append(num_decode_tokens)
        elif len(it["duration_s"]) >= _FOLD_ROWS:
            self._fold()

    def iterations_bulk(self, replica_id: int, starts: list[float], durations: list[float], flops: list[float],
                        num_bytes: list[float], num_decode_tokens: int, kv_used_blocks: list[int],
                        num_prefill_tokens: int | list[int] = 0) -> None:
        """Several iterations of one composition at once (a fast-forwarded run; prefill tokens the same in each
        or one per iteration)."""
        it, n = self.iterations, len(durations)
        if n:
            end = starts[-1] + durations[-1]
            if end > self.last_end_s.get(replica_id, 0.0):
                self.last_end_s[replica_id] = end
        it["replica_id"].extend([replica_id] * n)
        it["duration_s"].extend(durations)
        it["flops"].extend(flops)
        it["num_bytes"].extend(num_bytes)
        it["kv_used_blocks"].extend(kv_used_blocks)
        if self.record_iterations:
            it["start_s"].extend(starts)
            it["num_prefill_tokens"].extend(
                num_prefill_tokens if isinstance(num_prefill_tokens, list) else [num_prefill_tokens] * n)
            it["num_decode_tokens"].extend([num_decode_tokens] * n)
        elif len(it["duration_s"]) >= _FOLD_ROWS:
            self._fold()

    @property
    def totals(self) -> dict[int, ReplicaTotals]:
        """Each replica's iteration totals (replicas that ran none are absent)."""
        if len(self.iterations["duration_s"]) > self._folded:
            self._fold()
        return self._totals

    def _fold(self) -> None:
        """Add the iteration rows not yet counted to the replicas' totals, and, with records, their power to the
        power column; without records, empty the rows. Per replica, ``PowerModel.power_w`` of its rows, then the
        running sums one iteration after another: numpy's ``cumsum`` from the total so far adds one element at a
        time, so the totals do not depend on how the rows were batched (stepping and fast-forwarding, records kept or not, agree bit for
        bit)."""
        it = self.iterations
        power = self._fold_rows(self._folded, len(it["duration_s"]))
        if self.record_iterations:
            it["power_w"].frombytes(power.tobytes())
            self._folded = len(it["duration_s"])
        else:  # the numpy views of the rows are gone (``_fold_rows`` returned), so the arrays can shrink
            for name in ("replica_id", "duration_s", "flops", "num_bytes", "kv_used_blocks"):
                del it[name][:]

    def _fold_rows(self, first: int, end: int) -> np.ndarray:
        """``_fold`` of rows ``first .. end - 1``; returns their power (per GPU)."""
        it = self.iterations
        replica = np.frombuffer(it["replica_id"], dtype=np.int64)[first:end]
        duration = np.frombuffer(it["duration_s"], dtype=float)[first:end]
        flops = np.frombuffer(it["flops"], dtype=float)[first:end]
        num_bytes = np.frombuffer(it["num_bytes"], dtype=float)[first:end]
        kv = np.frombuffer(it["kv_used_blocks"], dtype=np.int64)[first:end]
        power = np.empty(end - first)
        for rid in dict.fromkeys(replica.tolist()):  # in order of first iteration, as running totals appear
            rows = np.flatnonzero(replica == rid)
            pm = self.powers[rid]
            d, f, b = duration[rows], flops[rows], num_bytes[rows]
            w = pm.power_w(d, f, b)
            power[rows] = w
            t = self._running_totals(rid)
            t.busy_s = _sum_on(t.busy_s, d)
            t.flops = _sum_on(t.flops, f)
            t.num_bytes = _sum_on(t.num_bytes, b)
            t.kv_block_s = _sum_on(t.kv_block_s, kv[rows] * d)
            t.busy_energy_j = _sum_on(t.busy_energy_j, w * d * pm.num_gpus)
            t.num_iterations += len(rows)
        return power

    def columns(self) -> list[array]:
        """Every packed column (requests, iterations, token gaps), in a fixed order."""
        return [*self.requests.values(), *self.iterations.values(), self.tbt_gap_s, self.tbt_count]

    def detach_columns(self) -> None:
        """Replace every packed column with an empty one (after ``columns()`` was taken: a worker sends them
        apart from the rest)."""
        self.requests = {name: array(col.typecode) for name, col in self.requests.items()}
        self.iterations = {name: array(col.typecode) for name, col in self.iterations.items()}
        self.tbt_gap_s, self.tbt_count = array("d"), array("q")

    def absorb(self, other: Recorder, columns: Iterable[bytes] | None = None) -> None:
        """Append the records of another recorder whose replicas this one has none of (a worker process's,
        ``cluster/workers.py``). ``columns``: the contents of ``other.columns()``, one after another, where
        they come apart from it (a worker sends them raw, one at a time, to keep two copies of the records from
        ever being in memory at once)."""
        self.totals, other.totals  # both folded: their rows' power and totals are counted
        if set(self._totals) & set(other._totals):
            raise RuntimeError("absorb: the two recorders share a replica")
        if columns is None:  # in this process: an empty column takes the other's as it is (no second copy)
            for mine, theirs in ((self.requests, other.requests), (self.iterations, other.iterations)):
                for name, col in theirs.items():
                    mine[name] = _joined(mine[name], col)
            self.tbt_gap_s = _joined(self.tbt_gap_s, other.tbt_gap_s)
            self.tbt_count = _joined(self.tbt_count, other.tbt_count)
            other.detach_columns()
        else:
            for col, data in zip(self.columns(), columns, strict=True):
                col.frombytes(data)
        self.status += other.status
        self.reason += other.reason
        self._totals.update(other._totals)
        self.last_end_s.update(other.last_end_s)
        if self.record_iterations:
            self._folded = len(self.iterations["duration_s"])

    def _running_totals(self, replica_id: int) -> ReplicaTotals:
        t = self._totals.get(replica_id)
        if t is None:
            t = self._totals[replica_id] = ReplicaTotals()
        return t

    def total(self, field: str) -> float:
        """A total over all replicas, summed in replica order."""
        return sum(getattr(self.totals[r], field) for r in sorted(self.totals))

    def gaps_bulk(self, gaps_s: list[float], count: int) -> None:
        self.tbt_gap_s.extend(gaps_s)
        self.tbt_count.extend([count] * len(gaps_s))

    def gap(self, gap_s: float, count: int) -> None:
        self.tbt_gap_s.append(gap_s)
        self.tbt_count.append(count)

    def _take_back_gaps(self, log: list) -> None:
        """The gaps of a request that ended unfinished leave the ITL sample (counted -1 each, once flushed)."""
        runs, singles = self._back_runs, self._back_gaps
        for entry in log:
            if type(entry) is tuple:
                key = (id(entry[0]), entry[1], entry[2])  # the list is held in the value: its id stays its own
                held = runs.get(key)
                if held is None:
                    runs[key] = [*entry, 1]
                else:
                    held[3] += 1
            else:
                singles[entry] = singles.get(entry, 0) + 1
        if len(runs) + len(singles) >= _BACK_FLUSH:
            self.flush_take_backs()

    def flush_take_backs(self) -> None:
        """Write the gaps taken back so far into the pooled gaps, with negative counts (the simulation does at its
        end; ``summary.itl_stats`` gives the same figures however they were grouped)."""
        gaps, counts = self.tbt_gap_s, self.tbt_count
        for durations, first, end, times in self._back_runs.values():
            gaps.extend(durations[first:end])
            counts.extend([-times] * (end - first))
        for gap, times in self._back_gaps.items():
            gaps.append(gap)
            counts.append(-times)
        self._back_runs.clear()
        self._back_gaps.clear()

    @property
    def num_requests(self) -> int:
        return len(self.status)

    def request_frame(self) -> pd.DataFrame:
        import pandas as pd  # here, not at import: the simulator itself runs without pandas (fast start-up)

        df = pd.DataFrame({name: _column(col) for name, col in self.requests.items()})
        df["status"] = pd.Categorical(self.status)
        df["reason"] = self.reason
        return df.sort_values("id", kind="stable").reset_index(drop=True)

    def iteration_frame(self) -> pd.DataFrame:
        import pandas as pd

        self.totals  # fills the power column (and, without records, empties the rows)
        return pd.DataFrame({name: _column(col) for name, col in self.iterations.items()})


def _joined(mine: array, theirs: array) -> array:
    """``mine`` extended by ``theirs``, or ``theirs`` itself where ``mine`` is empty (no copy)."""
    if not mine:
        return theirs
    mine.extend(theirs)
    return mine


def _column(col: array) -> np.ndarray:
    """A packed column as a numpy array of its own, float64 or int64 (as pandas read a non-empty one; an empty one
    it read as objects): pandas copies an ``array.array`` element by element (~0.1 s a million rows), numpy its
    buffer at once."""
    return np.frombuffer(col, dtype=col.typecode).copy()
