"""Closed-loop chat: conversations whose next turn waits for the previous answer plus the user's think time.

Each arrival of the workload's arrival process starts a conversation. Its plan is drawn when it starts, from
streams of its own, so nothing about it depends on the order the simulator happens to process events in: a
geometric number of turns (mean ``mean_turns``), each turn's new message and answer lengths (``prompt_tokens`` /
``output_tokens`` or ``lengths_from``), and an exponential think time (mean ``mean_think_time_s``) before each
later turn. Turn ``k + 1`` is sent its think time after turn ``k``'s last token reached the client (its
``finish_s``); its prompt resends the conversation so far (every earlier message and answer) plus the new
message, named as content so the prefix cache sees what a chat server sees. A turn that is rejected or times out
ends its conversation, as a user who got no answer does not follow up.

Caps: ``num_requests`` counts turns as they are sent -- a first turn when it arrives, a later turn when its think
time starts (so no turn is drawn that the cap would then drop); ``duration_s`` sends no turn at or after it.
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


class ClosedLoopChat:
    """The workload of ``workload.conversation``: ``first_turns`` yields first turns in arrival order; the
    simulator calls ``follow_up`` when a turn finishes and sends what it returns at its ``arrival_s``, and
    ``ended`` when a turn ends otherwise."""

    def __init__(self, cfg: WorkloadConfig, seed: int, pairs: Iterator[tuple[int, int]]):
        conv = cfg.conversation
        assert conv is not None and cfg.arrival is not None
        arrival_ss, plan_ss, priority_ss = np.random.SeedSequence(seed).spawn(3)
        self._arrivals = arrival_times(cfg.arrival, np.random.Generator(np.random.PCG64(arrival_ss)))
        self._plan_rng = np.random.Generator(np.random.PCG64(plan_ss))
        self._priority_rng = np.random.Generator(np.random.PCG64(priority_ss))
        self._pairs = pairs
        self._mean_turns, self._mean_think_s = conv.mean_turns, conv.mean_think_time_s
        self._high_priority = cfg.high_priority_fraction
        self._cap = cfg.num_requests
        self._end_s = cfg.duration_s
        self.num_sent = 0  # turns counted against num_requests
        self._next_content_id = 0
        self._live: dict[Request, _Conversation] = {}  # the turn in flight -> its conversation
        self.first_turns: Iterator[Request] = self._first_turns()

    def _take_slot(self) -> bool:
        if self._cap is not None and self.num_sent >= self._cap:
            return False
        self.num_sent += 1
        return True

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
        segments.append((conv.content_ids[2 * k + 1], conv.answers[k]))  # names the answer for the next turn
        r = Request(-1, arrival_s, prompt, conv.answers[k], priority=conv.priority, prefix_segments=tuple(segments))
        self._live[r] = conv
        return r

    def _first_turns(self) -> Iterator[Request]:
        """First turns, lazily, until ``duration_s`` or the cap."""
        for t in self._arrivals:
            if (self._end_s is not None and t >= self._end_s) or not self._take_slot():
                return
            yield self._turn(self._plan(), t)

    def follow_up(self, finished: Request) -> Request | None:
        """The next turn of ``finished``'s conversation, or None when the conversation (or the workload) is over."""
        conv = self._live.pop(finished, None)
        if conv is None or conv.turn + 1 >= len(conv.messages):
            return None
        at = finished.finish_s + conv.think_s[conv.turn]
        if (self._end_s is not None and at >= self._end_s) or not self._take_slot():
            return None
        conv.turn += 1
        return self._turn(conv, at)

    def ended(self, r: Request) -> None:
        """``r`` was rejected, timed out or left in flight: its conversation sends nothing more."""
        self._live.pop(r, None)
