"""Columnar records of requests, iterations and token gaps.

Requests are written out when they end (and the object dropped), so memory grows by a few dozen bytes per
request rather than by the request objects themselves; iterations and token gaps are packed arrays.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Callable

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


class Recorder:
    def __init__(self, powers: list[PowerModel], record_iterations: bool = True) -> None:
        self.powers = powers  # by replica id
        self.record_iterations = record_iterations
        # Without iteration records the totals are running sums; with them, the iterations' power and the totals
        # are worked out from the records when read (``totals``, ``iteration_frame``): the same sums, in the
        # same order, off the hot path.
        self._totals: dict[int, ReplicaTotals] = {}
        self._totals_of = 0  # with records: how many iterations ``_totals`` and the power column cover
        self.requests = {name: array("d") for name in REQUEST_FLOAT_FIELDS}
        self.requests.update({name: array("q") for name in REQUEST_INT_FIELDS})
        self.status: list[str] = []
        self.reason: list[str] = []
        self.iterations = {name: array("d") for name in ITERATION_FIELDS}
        self.iterations.update({name: array("q") for name in ITERATION_INT_FIELDS})
        # Gaps between consecutive output tokens, with how many tokens saw each gap.
        self.tbt_gap_s = array("d")
        self.tbt_count = array("q")
        # Called with each request as it ends (its status): a closed-loop workload sends the next turn.
        self.on_request_end: Callable[[Request, str], None] | None = None

    def request(self, r: Request, status: str) -> None:
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
        if self.record_iterations:
            it = self.iterations
            it["replica_id"].append(replica_id)
            it["start_s"].append(start_s)
            it["duration_s"].append(duration_s)
            it["flops"].append(flops)
            it["num_bytes"].append(num_bytes)
            it["num_prefill_tokens"].append(num_prefill_tokens)
            it["num_decode_tokens"].append(num_decode_tokens)
            it["kv_used_blocks"].append(kv_used_blocks)
            return
        t = self._running_totals(replica_id)
        power = self.powers[replica_id]
        power_w = power.power_w(duration_s, flops, num_bytes)
        t.busy_s += duration_s
        t.flops += flops
        t.num_bytes += num_bytes
        t.kv_block_s += kv_used_blocks * duration_s
        t.busy_energy_j += power_w * duration_s * power.num_gpus
        t.num_iterations += 1

    def iterations_bulk(self, replica_id: int, starts: list[float], durations: list[float], flops: list[float],
                        num_bytes: list[float], num_decode_tokens: int, kv_used_blocks: list[int],
                        num_prefill_tokens: int = 0) -> None:
        """Several iterations of one composition at once (a fast-forwarded run)."""
        if self.record_iterations:
            it, n = self.iterations, len(starts)
            it["replica_id"].extend([replica_id] * n)
            it["start_s"].extend(starts)
            it["duration_s"].extend(durations)
            it["flops"].extend(flops)
            it["num_bytes"].extend(num_bytes)
            it["num_prefill_tokens"].extend([num_prefill_tokens] * n)
            it["num_decode_tokens"].extend([num_decode_tokens] * n)
            it["kv_used_blocks"].extend(kv_used_blocks)
            return
        t = self._running_totals(replica_id)
        pm = self.powers[replica_id]
        gpus = pm.num_gpus
        busy_s, total_flops, total_bytes, kv_block_s = t.busy_s, t.flops, t.num_bytes, t.kv_block_s
        energy_j = t.busy_energy_j
        for duration, f, b, kv in zip(durations, flops, num_bytes, kv_used_blocks):
            busy_s += duration
            total_flops += f
            total_bytes += b
            kv_block_s += kv * duration
            energy_j += pm.power_w(duration, f, b) * duration * gpus
        t.busy_s, t.flops, t.num_bytes, t.kv_block_s = busy_s, total_flops, total_bytes, kv_block_s
        t.busy_energy_j = energy_j
        t.num_iterations += len(durations)

    @property
    def totals(self) -> dict[int, ReplicaTotals]:
        """Each replica's iteration totals (replicas that ran none are absent)."""
        if self.record_iterations and self._totals_of != len(self.iterations["start_s"]):
            self._from_records()
        return self._totals

    def _from_records(self) -> None:
        """The power column and the totals, from the iteration records: per replica, ``PowerModel.power_w`` and
        the running sums of ``_running_totals``, each operation as those do it (numpy's elementwise arithmetic and
        its ``cumsum``, which adds one element at a time from the first, round as Python's floats do), so the
        figures are bit for bit those of a run that keeps no records."""
        it = self.iterations
        n = len(it["start_s"])
        replica = np.frombuffer(it["replica_id"], dtype=np.int64)
        duration = np.frombuffer(it["duration_s"], dtype=float)
        flops = np.frombuffer(it["flops"], dtype=float)
        num_bytes = np.frombuffer(it["num_bytes"], dtype=float)
        kv = np.frombuffer(it["kv_used_blocks"], dtype=np.int64)
        power = np.empty(n)
        totals: dict[int, ReplicaTotals] = {}
        for rid in dict.fromkeys(replica.tolist()):  # in order of first iteration, as running totals appear
            rows = np.flatnonzero(replica == rid)
            pm = self.powers[rid]
            d, f, b = duration[rows], flops[rows], num_bytes[rows]
            with np.errstate(divide="ignore", invalid="ignore"):
                w = pm.idle_w + (pm.w_per_flop_s * f + pm.w_per_byte_s * b) / d
            w = np.where(d <= 0.0, pm.idle_w, np.where(w < pm.max_w, w, pm.max_w))
            power[rows] = w
            t = totals[rid] = ReplicaTotals()
            t.busy_s = float(np.cumsum(d)[-1])
            t.flops = float(np.cumsum(f)[-1])
            t.num_bytes = float(np.cumsum(b)[-1])
            t.kv_block_s = float(np.cumsum(kv[rows] * d)[-1])
            t.busy_energy_j = float(np.cumsum(w * d * pm.num_gpus)[-1])
            t.num_iterations = len(rows)
        it["power_w"] = array("d", power.tobytes())
        self._totals, self._totals_of = totals, n

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

    @property
    def num_requests(self) -> int:
        return len(self.status)

    def request_frame(self) -> pd.DataFrame:
        import pandas as pd  # here, not at import: the simulator itself runs without pandas (fast start-up)

        df = pd.DataFrame({name: pd.Series(col) for name, col in self.requests.items()})
        df["status"] = pd.Categorical(self.status)
        df["reason"] = self.reason
        return df.sort_values("id", kind="stable").reset_index(drop=True)

    def iteration_frame(self) -> pd.DataFrame:
        import pandas as pd

        self.totals  # fills the power column
        return pd.DataFrame({name: pd.Series(col) for name, col in self.iterations.items()})
