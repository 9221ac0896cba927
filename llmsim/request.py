"""A request and its lifecycle.

Progress is tracked the vLLM-v1 way: ``num_computed_tokens`` counts tokens whose KV is in the cache and
``num_tokens`` (prompt + generated) counts the tokens known so far. Each iteration schedules
``min(num_tokens - num_computed_tokens, budget)`` tokens, which covers prefill, chunked prefill and decode
alike; when a request's computed tokens catch up with its known tokens, one new token is sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum


class RequestStatus(IntEnum):
    """FINISHED, REJECTED and TIMED_OUT are terminal. MIGRATING: out of every batch during a live migration's
    final stop-and-copy, its KV on the wire to the destination instance. TIMED_OUT: the client gave up
    (``simulation.client_timeout_s``) and the server aborted it."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3
    REJECTED = 4
    MIGRATING = 5
    TIMED_OUT = 6


DONE = frozenset({RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.TIMED_OUT})  # terminal statuses


NAN = math.nan


@dataclass(slots=True, eq=False)
class Request:
    id: int
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int  # tokens the request will generate before it stops
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_generated_tokens: int = 0
    replica_id: int = -1
    # Lifecycle timestamps (simulated seconds); NaN until they happen.
    scheduled_s: float = NAN  # first time any of its tokens ran
    first_token_s: float = NAN
    last_token_s: float = NAN
    finish_s: float = NAN
    max_tbt_s: float = 0.0  # largest gap between consecutive output tokens
    num_preemptions: int = 0
    num_migrations: int = 0
    priority: int = 0  # 0: normal; higher is served first (Llumnix priorities)
    reject_reason: str = ""
    # Prefix caching. ``prefix_segments``: the named content the request's tokens start with, as
    # (content id, tokens) pairs -- a system prompt, the turns of a conversation so far, Mooncake's hash_ids;
    # requests whose segments agree share those blocks. Tokens past them are the request's own.
    prefix_segments: tuple[tuple[int, int], ...] = ()
    block_hashes: tuple[int, ...] | None = None  # chained hashes of the blocks those segments fill (KV manager)
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache when first scheduled (-1: not yet)
    # Its token gaps so far, where a run may end it unfinished (``Recorder.logs_gaps``): each gap, or a run's
    # (durations, first, end) for ``durations[first:end]``; None otherwise.
    gap_log: list | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens known so far: the prompt plus what has been generated."""
        return self.num_prompt_tokens + self.num_generated_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Known tokens whose KV is not computed yet (1 for a decoding request)."""
        # num_tokens spelled out: schedulers read this for every running request at every step.
        return self.num_prompt_tokens + self.num_generated_tokens - self.num_computed_tokens
