"""Closed-loop traffic: conversations whose next turn waits for the previous answer plus the user's think time,
drawn (``ClosedLoopChat``) or replayed from a trace (``ClosedLoopReplay``).

Each arrival of the workload's arrival process starts a conversation. Its plan is drawn when it starts, from
streams of its own, so nothing about it depends on the order the simulator happens to process events in: a
geometric number of turns (mean ``mean_turns``), each turn's new message and answer lengths (``prompt_tokens`` /
``output_tokens`` or ``lengths_from``), and an exponential think time (mean ``mean_think_time_s``) before each
later turn. Turn ``k + 1`` is sent its think time after turn ``k``'s last token reached the client (its
``finish_s``); its prompt resends the conversation so far (every earlier message and answer) plus the new
message, named as content so the prefix cache sees what a chat server sees. A turn that is rejected or times out
ends its conversation, as a user who got no answer does not follow up.

Request ids are given as turns arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llmsim.config import WorkloadConfig
from llmsim.request import Request
from llmsim.workload.arrivals import arrival_times


@dataclass(slots=True)
class _Conversation:
    messages: list[int]  # new tokens of each turn's prompt
    answers: list[int]  # output tokens of each turn
    think_s: list[float]  # before turns 2, 3, ...
    content_ids: list[int]  # message k is content_ids[2k], its answer content_ids[2k + 1]
    priority: int
    turn: int = 0  # the turn in flight (0-based)


class ClosedLoop:
    """A workload whose later requests wait on earlier ones. ``first_turns`` yields the requests that wait on
    nothing, in arrival order; when a request ends (its status: ``finished``, ``rejected``, ``timed_out``,
    ``in_flight``) for its client -- a timed-out turn when the client gives up, not when the engine aborts it --
    the simulator calls ``next_turn`` and sends what it returns at its ``arrival_s``.

    Caps: ``num_requests`` counts requests as they are sent -- a first turn when it arrives, a later turn when
    the wait before it starts (so no turn is drawn that the cap would then drop); ``duration_s`` sends nothing at
    or after it."""

    def __init__(self, num_requests: int | None, duration_s: float | None):
        self._cap, self._end_s = num_requests, duration_s
        self.num_sent = 0  # requests counted against num_requests
        self.first_turns: Iterator[Request] = iter(())

    def _take_slot(self, at: float) -> bool:
        if (self._end_s is not None and at >= self._end_s) or (self._cap is not None and self.num_sent >= self._cap):
            return False
        self.num_sent += 1
        return True

    def next_turn(self, ended: Request, status: str, ended_s: float) -> Request | None:  # pragma: no cover
        """The turn to send after ``ended``, which ended for its client at ``ended_s`` (now) with ``status``."""
        raise NotImplementedError


class ClosedLoopChat(ClosedLoop):
    """The workload of ``workload.conversation``: a finished turn's conversation goes on; a turn that ended
    otherwise ends it."""

    def __init__(self, cfg: WorkloadConfig, seed: int, pairs: Iterator[tuple[int, int]]):
        conv = cfg.conversation
        assert conv is not None and cfg.arrival is not None
        super().__init__(cfg.num_requests, cfg.duration_s)
        arrival_ss, plan_ss, priority_ss = np.random.SeedSequence(seed).spawn(3)
        self._arrivals = arrival_times(cfg.arrival, np.random.Generator(np.random.PCG64(arrival_ss)))
        self._plan_rng = np.random.Generator(np.random.PCG64(plan_ss))
        self._priority_rng = np.random.Generator(np.random.PCG64(priority_ss))
        self._pairs = pairs
        self._mean_turns, self._mean_think_s = conv.mean_turns, conv.mean_think_time_s
        self._high_priority = cfg.high_priority_fraction
        self._next_content_id = 0
        self._live: dict[Request, _Conversation] = {}  # the turn in flight -> its conversation
        self.first_turns = self._first_turns()

    def _plan(self) -> _Conversation:
        turns = int(self._plan_rng.geometric(1.0 / self._mean_turns))
        pairs = [next(self._pairs) for _ in range(turns)]
        think = self._plan_rng.exponential(self._mean_think_s, turns - 1).tolist()
        ids = list(range(self._next_content_id, self._next_content_id + 2 * turns))
        self._next_content_id += 2 * turns
        priority = 0
        if self._high_priority > 0 and self._priority_rng.random() < self._high_priority:
            priority = 1
        return _Conversation([max(1, p) for p, _ in pairs], [max(1, o) for _, o in pairs], think, ids, priority)

    def _turn(self, conv: _Conversation, arrival_s: float) -> Request:
        k = conv.turn
        segments: list[tuple[int, int]] = []
        for j in range(k):
            segments += [(conv.content_ids[2 * j], conv.messages[j]), (conv.content_ids[2 * j + 1], conv.answers[j])]
        segments.append((conv.content_ids[2 * k], conv.messages[k]))
        prompt = sum(n for _, n in segments)
        if k + 1 < len(conv.messages):  # the next turn's prompt resends the answer: name it
            segments.append((conv.content_ids[2 * k + 1], conv.answers[k]))
        r = Request(-1, arrival_s, prompt, conv.answers[k], priority=conv.priority, prefix_segments=tuple(segments))
        self._live[r] = conv
        return r

    def _first_turns(self) -> Iterator[Request]:
        """First turns, lazily, until ``duration_s`` or the cap."""
        for t in self._arrivals:
            if not self._take_slot(t):
                return
            yield self._turn(self._plan(), t)

    def next_turn(self, ended: Request, status: str, ended_s: float) -> Request | None:
        """The next turn of a finished turn's conversation; None when the conversation (or the workload) is over,
        or the turn got no answer (rejected, timed out, in flight at the end)."""
        conv = self._live.pop(ended, None)
        if status != "finished" or conv is None or conv.turn + 1 >= len(conv.messages):
            return None
        at = ended.finish_s + conv.think_s[conv.turn]
        if not self._take_slot(at):
            return None
        conv.turn += 1
        return self._turn(conv, at)


@dataclass(slots=True)
class _Followed:
    request: Request  # the next turn, its content named, its arrival still to be set
    gap_s: float  # the trace's time from the turn before it to this one
    think_s: float  # the trace's gap less the real service's response time to the turn before it


class ClosedLoopReplay(ClosedLoop):
    """BurstGPT conversations replayed closed-loop (``trace.closed_loop``). A conversation's first turn, and every
    request outside a conversation, arrives at its trace time. A later turn is sent its think time after the
    simulated answer to the turn before it: the trace's gap between the two turns less the real service's
    response time to the first (its ``Elapsed time``). A trace whose next turn came before that response ended
    (a negative think time) has the turn sent as the simulated answer finishes. After a turn that got no answer
    (rejected, timed out) the next is sent the trace's gap after it, or as the client gives up on it where that
    comes later (a turn is never sent before the one it follows has ended). The trace is read whole."""

    def __init__(self, turns: list[tuple[Request, str, float]], num_requests: int | None, duration_s: float | None):
        """``turns``: (request with its trace arrival and named content, session, elapsed s), in trace order."""
        super().__init__(num_requests, duration_s)
        self._next: dict[Request, _Followed] = {}
        last: dict[str, tuple[Request, float]] = {}
        first = []
        for r, session, elapsed_s in turns:
            before = last.get(session) if session else None
            if before is None:
                first.append(r)
            else:
                prev, prev_elapsed = before
                gap = r.arrival_s - prev.arrival_s
                self._next[prev] = _Followed(r, gap, gap - prev_elapsed)
            if session:
                last[session] = (r, elapsed_s)
        self.first_turns = (r for r in first if self._take_slot(r.arrival_s))

    def next_turn(self, ended: Request, status: str, ended_s: float) -> Request | None:
        follow = self._next.pop(ended, None)
        if follow is None or status == "in_flight":
            return None
        if status == "finished":
            at = ended.finish_s + (follow.think_s if follow.think_s > 0.0 else 0.0)
        else:
            at = max(ended.arrival_s + follow.gap_s, ended_s)
        if not self._take_slot(at):
            return None
        follow.request.arrival_s = at
        return follow.request
