"""What every replica scheduler shares: the queues, preemption and the output contract.

A policy implements ``schedule()``, which returns a ``SchedulerOutput`` (what runs this step); the replica
executes it and applies it. The KV cache is the ``BlockManager``'s: a scheduler asks it for room
(``can_admit``, ``allocate``, ``allocate_slots`` with a prefix-cache hit) and never edits its free lists.

The contract decode fast-forwarding relies on (vLLM v1 separates the same way what the scheduler decides from
what the KV cache manager holds):

- ``allows_fast_forward(out)``: the batch is pure decode over every running request, so the next steps repeat
  it until a request finishes or the KV cache runs short -- unless something arrives that could change it (or,
  with prefix caching, the head of the queue may hit a prefix the decodes are still filling).
- ``mixed_run_chunk(out)``: the batch is every running decode plus one prefill chunk that takes the rest of the
  step's token budget, so the next steps repeat it (the same decodes, the prompt's next chunk of the same size)
  until the prompt's last, partial chunk -- and no arrival can change them, since no budget is left to admit
  it; or the chunk ends the prompt. Once the prompt has ended and nothing waits, the next steps are pure decode
  over every running request, the prompt's request among them, until a request finishes, the KV cache runs
  short or an arrival could be admitted. Returns that chunk size, or 0. Opt-in: the base class returns 0.
- ``cuts_run(request)``: a request just queued could be admitted at the next step boundary, so a run must stop
  there. The shipped policies admit in queue order and stop at the first request that does not fit, and KV
  headroom only shrinks while requests decode, so only a request that became the head of the queue can cut a
  run. A policy with another admission order says so here (``tests/spf_scheduler.py`` is one).

Nothing outside a scheduler edits its queues or block tables. The replica and the cluster policies act through
these operations, each taken at an iteration boundary:

- ``add(request)``: queue an arrival (or a request handed over from a DistServe prefill instance);
- ``retire(finished)``: finished requests leave the batch and free their KV;
- ``commit_decode_run(requests)``: a fast-forwarded decode run ended; grow the block tables to its tokens;
- ``start_flight(out)`` / ``land_flight(out)``: a pipeline micro-batch enters / leaves the pipeline;
- ``release(request)``: a running request leaves with its KV (migrated out, handed to a decode instance);
- ``reserve_seq()`` / ``reserve_blocks(request, n)`` / ``drop_reservation(request)`` / ``adopt(request)``:
  the destination side of a live migration -- hold a batch slot and the blocks the copy fills, give them
  back if the migration is dropped, or take the request into the running batch when it commits.
- ``rejection_reason(request)``: a request this policy can never run (checked once, at arrival);
- ``abort(request)``: the client gave up: the request leaves its queue or the batch and its KV is freed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmsim.errors import EngineAborted
from llmsim.kv_cache import NO_HIT, BlockManager, PrefixHit
from llmsim.request import Request, RequestStatus


@dataclass(slots=True)
class PrefillChunk:
    request: Request
    num_new_tokens: int  # prompt (or recomputed) tokens processed this iteration
    num_cached_tokens: int  # tokens of this request already in the KV cache


@dataclass(slots=True)
class SchedulerOutput:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)  # one new token each
    preempted: list[Request] = field(default_factory=list)  # evicted this step to make room
    swap_bytes: float = 0.0  # KV each GPU moves between its memory and the host this step (its shard)
    decode_kv_tokens: int = 0  # KV tokens the decodes attend over, summed

    @property
    def is_empty(self) -> bool:
        return not self.prefills and not self.decodes

    def request_ids(self) -> list[int]:
        return [c.request.id for c in self.prefills] + [r.id for r in self.decodes]

    @property
    def num_prefill_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.prefills)

    def signature(self) -> tuple[tuple[tuple[int, int], ...], int, int, int]:
        """(prefill chunks, decodes, decode KV tokens, sampling tokens): all the execution model needs."""
        chunks = tuple((c.num_new_tokens, c.num_cached_tokens) for c in self.prefills)
        samples = len(self.decodes) + sum(
            1 for c in self.prefills if c.num_new_tokens == c.request.num_pending_tokens)
        return chunks, len(self.decodes), self.decode_kv_tokens, samples


class Scheduler:
    """Queues plus preemption mechanics; subclasses choose the batch."""

    # ``scheduler`` config fields this policy takes as keyword arguments beyond the shared ones.
    config_fields: tuple[str, ...] = ()
    # Whether the policy looks up cached prefixes when the KV cache keeps them (``enable_prefix_caching``), and
    # whether it does by default (vLLM V1 turns it on, vLLM v0 off).
    supports_prefix_caching: bool = False
    prefix_caching_by_default: bool = False
    # Whether the engine runs every step that fits a captured CUDA graph padded to its batch size (vLLM V1's
    # piecewise graphs), or only decode steps (vLLM v0 captures decode batches alone).
    pads_every_step_to_graphs: bool = False

    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption: str = "recompute", kv_bytes_per_token: float = 0.0,
                 swap_space_blocks: int | None = None):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption = preemption  # "recompute" drops the KV; "swap" parks it in host memory
        self.kv_bytes_per_token = kv_bytes_per_token  # per GPU: what one worker swaps per token
        # Swap: the host's blocks for swapped-out KV (None: unbounded), and those each swapped-out request holds.
        self.swap_space_blocks = swap_space_blocks
        self.swapped_blocks: dict[int, int] = {}
        self.num_swapped_blocks = self.peak_swapped_blocks = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is evicted first
        self.num_reserved_seqs = 0  # batch slots held for requests migrating in
        self.num_parked = 0  # requests out of the batch whose KV is held here until pulled
        # Requests in a pipeline micro-batch still in flight: they sit out (and are never evicted) until it lands.
        self.busy: set[int] = set()
        self.micro_batches = 1  # set by a pipelined replica
        self.ignored: list[Request] = []  # dropped from the queue as never runnable: the replica takes them

    def add(self, request: Request) -> None:
        """Queue in arrival order, except that a request goes ahead of every waiting request of lower priority."""
        waiting = self.waiting
        if request.priority and waiting and waiting[-1].priority < request.priority:
            at = next(i for i, w in enumerate(waiting) if w.priority < request.priority)
            waiting.insert(at, request)
        else:
            waiting.append(request)

    def waiting_after(self, requests: list[Request]) -> list[Request]:
        """The waiting queue as it would be once ``requests`` were ``add``-ed in order; nothing changes (a
        replica's view of its queue while a run still holds arrivals that stepping would have queued)."""
        saved = self.waiting
        self.waiting = deque(saved)
        try:
            for request in requests:
                self.add(request)
            return list(self.waiting)
        finally:
            self.waiting = saved

    def has_seq_room(self) -> bool:
        return len(self.running) + self.num_reserved_seqs < self.max_num_seqs

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def has_schedulable_work(self) -> bool:
        return bool(self.waiting) or len(self.running) > len(self.busy)

    def decode_share(self) -> int:
        """Most decodes one batch takes: with pipeline micro-batches an even share of the running requests, so
        that every stage has work (vLLM gives each stage's micro-batch its own share of the requests)."""
        if self.micro_batches == 1:
            return len(self.running)
        return -(-len(self.running) // self.micro_batches)

    def idle_running(self) -> list[Request]:
        """Running requests not in a micro-batch in flight."""
        busy = self.busy
        return [r for r in self.running if r.id not in busy] if busy else list(self.running)

    def schedule(self) -> SchedulerOutput:
        raise NotImplementedError

    def may_drop_started(self, max_model_len: int) -> bool:
        """Whether the policy may drop a request that has generated tokens (``_ignore``), with requests of up to
        ``max_model_len`` tokens."""
        return False

    def rejection_reason(self, request: Request) -> str:
        """Why this policy can never run ``request``, or "" (the cluster checks memory and length)."""
        return ""

    # --- operations for the replica and the cluster policies (see the module docstring) -----------------

    def take_ignored(self) -> list[Request]:
        """Requests the last ``schedule()`` dropped as never runnable (REJECTED, their reason set, their KV freed):
        the replica records them."""
        ignored, self.ignored = self.ignored, []
        return ignored

    def retire(self, finished: list[Request]) -> None:
        """``finished`` (already marked FINISHED) leave the batch and free their KV."""
        for r in finished:
            self.blocks.free(r)
        self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]

    def abort(self, request: Request) -> None:
        """The client gave up (at a boundary): the request leaves the batch or the queue; its KV is freed. One in a
        pipeline micro-batch still in flight leaves too (as vLLM frees an aborted request's blocks at once); the
        replica drops it from that batch when the batch lands."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.busy.discard(request.id)
        else:
            self.waiting.remove(request)
            self._swapped_back(request)  # a swapped-out request's host blocks are freed too
        self.blocks.free(request)

    def commit_decode_run(self, requests: list[Request], num_steps: int | None = None) -> None:
        """A fast-forwarded decode run advanced ``requests``: their block tables follow their KV tokens.
        ``num_steps``: a pure decode run's steps (one token of each request a step)."""
        self.blocks.grow_to_computed(requests, num_steps)

    def start_flight(self, out: SchedulerOutput) -> None:
        """A pipeline micro-batch entered stage 0: its requests sit out of later batches until it lands."""
        self.busy.update(out.request_ids())

    def land_flight(self, out: SchedulerOutput) -> None:
        self.busy.difference_update(out.request_ids())

    def release(self, request: Request) -> None:
        """A running request leaves this replica, with its KV (whose blocks are freed here)."""
        self.running.remove(request)
        self.blocks.free(request)

    def park(self, request: Request) -> None:
        """A running request leaves the batch, its KV still held here until another instance has pulled it
        (DistServe's hand-off); ``drop_parked`` frees it then."""
        self.running.remove(request)
        self.num_parked += 1

    def drop_parked(self, request: Request) -> None:
        """A parked request's KV has been pulled: its blocks are freed (into the prefix cache, where on)."""
        self.blocks.free(request)
        self.num_parked -= 1

    def reserve_seq(self) -> None:
        """Hold a batch slot for a request migrating in."""
        self.num_reserved_seqs += 1

    def reserve_blocks(self, request: Request, num_blocks: int) -> None:
        """Hold ``num_blocks`` more blocks for a request migrating in (the copy fills them)."""
        self.blocks.grow_to(request, self.blocks.num_held(request) + num_blocks)

    def drop_reservation(self, request: Request) -> bool:
        """A migration in was dropped: give back its slot and blocks. True when blocks were freed."""
        self.num_reserved_seqs -= 1
        return self.blocks.free(request)

    def adopt(self, request: Request) -> None:
        """A migrated request whose KV fills its reserved blocks joins the running batch; it decodes from the
        next step on. Its KV has arrived whole, so the blocks of named content it fills are cached here now
        (as the prefix cache of the instance it left had them)."""
        self.num_reserved_seqs -= 1
        self.blocks.grow_to(request, self.blocks.num_held(request), request.num_computed_tokens)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def cuts_run(self, request: Request) -> bool:
        """True when ``request``, just queued during a decode run, could join the batch at the next boundary."""
        return self.waiting[0] is request

    def allows_fast_forward(self, out: SchedulerOutput) -> bool:
        """True when the next steps repeat this batch until a request finishes or KV runs short. With prefix
        caching, decoding requests fill named blocks that the head of the queue may be waiting for (the next
        round of their conversation), so its admission could come earlier than KV headroom alone says: step one
        by one while that can happen."""
        if out.prefills or out.preempted or out.swap_bytes or len(out.decodes) != len(self.running):
            return False
        return not (self.waiting and self.blocks.caching and self.blocks.hit_may_grow(self.waiting[0], self.running))

    def mixed_run_chunk(self, out: SchedulerOutput) -> int:
        """The chunk size of a batch whose next steps repeat it with the same prefill's next chunks, or that ends
        the prompt with nothing waiting (see the module docstring), or 0. A policy that schedules its running
        decodes first and gives the budget left to its part-way prefills opts in with ``_run_chunk``."""
        return 0

    def _run_chunk(self, out: SchedulerOutput, budget: int) -> int:
        if out.preempted or out.swap_bytes or len(out.prefills) != 1 or self.busy:
            return 0
        chunk = out.prefills[0]
        request = chunk.request
        n, decodes = chunk.num_new_tokens, len(out.decodes)
        if decodes + 1 != len(self.running):
            return 0  # someone sits out
        ends_prompt = n == request.num_pending_tokens
        if ends_prompt:
            # This chunk ends the prompt: a run only if its request then decodes with the others, which takes
            # nothing waiting, a token more to generate and a budget of a token for every running request.
            if self.waiting or decodes + 1 > budget or request.num_generated_tokens + 1 >= request.num_output_tokens:
                return 0
        elif decodes + n != budget:
            return 0  # budget is left for a waiting request
        blocks = self.blocks
        if blocks.caching and not ends_prompt and (
                any(map(blocks.fills_named_blocks, out.decodes)) or blocks.fills_cached_content(request)):
            # Chunk after chunk, the run's block takes and named-block fills are booked at its end, all the
            # takes as one: stepping's order would matter only if a fill could copy cached content (which a take
            # may evict first), or if fills of decodes interleaved with the prompt's. (A chunk that ends the
            # prompt was booked when scheduled, and the run goes on as a decode run, booked as one.)
            return 0
        return n

    # --- mechanism shared by the policies -------------------------------------------------------------

    def _hit(self, request: Request) -> PrefixHit:
        """The cached prefix a request holding no KV starts from (none without prefix caching, and none for a
        request that still holds KV: swapped out, it comes back whole)."""
        if not self.blocks.caching or request.num_computed_tokens:
            return NO_HIT
        return self.blocks.lookup(request)

    def _can_admit(self, request: Request, num_new_tokens: int, hit: PrefixHit) -> bool:
        """Whether the head of the queue, starting from its cached prefix ``hit``, fits the KV cache."""
        if hit is NO_HIT:
            return self.blocks.can_admit(request, num_new_tokens)
        return self.blocks.can_admit_from(hit, hit.num_tokens + num_new_tokens)

    def _admit(self, request: Request, num_new_tokens: int, out: SchedulerOutput,
               reserve_tokens: int | None = None, hit: PrefixHit = NO_HIT) -> None:
        """Move the head of the waiting queue into the batch with ``num_new_tokens`` of prefill, holding blocks
        for ``reserve_tokens`` new tokens (default: the ones scheduled now), from its cached prefix ``hit``."""
        if hit is not NO_HIT:
            # Its cached prefix is taken as computed; the prefill runs the rest.
            if not self._admit_from(request, hit, num_new_tokens, out):
                raise RuntimeError(f"request {request.id}: admitted without room for its prefill")
            if reserve_tokens is not None and reserve_tokens > num_new_tokens:
                # A prefill admitted in chunks holds the blocks of all of it from now on (Sarathi's admission),
                # cached as its chunks fill them.
                self.blocks.grow_to(request, self.blocks.blocks_for(hit.num_tokens + reserve_tokens),
                                    hit.num_tokens + num_new_tokens)
            return
        cached = request.num_computed_tokens
        if request.status is RequestStatus.PREEMPTED and self.preemption == "swap" and cached:
            out.swap_bytes += cached * self.kv_bytes_per_token  # swap its KV back in
            self._swapped_back(request)
        self.blocks.allocate(request, num_new_tokens if reserve_tokens is None else reserve_tokens)
        self._start(request, num_new_tokens, out)

    def _admit_from(self, request: Request, hit: PrefixHit, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Move the head of the waiting queue into the batch from its cached prefix ``hit`` (taken as computed)
        with ``num_new_tokens`` of prefill, its blocks allocated as vLLM's ``allocate_slots`` does; False,
        changing nothing, when they do not fit."""
        if not self.blocks.allocate_slots(request, hit, num_new_tokens):
            return False
        if request.num_cached_tokens < 0:  # the first admission's hit is the one reported
            request.num_cached_tokens = hit.num_tokens
        self._start(request, num_new_tokens, out)
        return True

    def _start(self, request: Request, num_new_tokens: int, out: SchedulerOutput) -> None:
        """The head of the waiting queue, its blocks allocated, joins the batch with ``num_new_tokens``."""
        if request.num_cached_tokens < 0:
            # Its first admission, without a cached prefix (one with a hit has set it): a resumption's hit on its
            # own blocks, after a recompute preemption, had been reported as its prefix-cache hit, up to more
            # tokens than its prompt.
            request.num_cached_tokens = request.num_computed_tokens
        self.waiting.popleft()
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.prefills.append(PrefillChunk(request, num_new_tokens, request.num_computed_tokens))

    def _reserve(self, request: Request, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate KV for a running request, evicting the most recently admitted request until it fits.

        Returns False when the request itself had to be evicted."""
        while not self.blocks.can_allocate(request, num_new_tokens):
            victim = self.running[-1]
            if self.busy and victim.id in self.busy:  # in flight: the latest admitted one that is not
                victim = next(r for r in reversed(self.running) if r.id not in self.busy)
            self._preempt(victim, out)
            if victim is request:
                return False
            if victim in out.decodes:  # it already had its slot this step: take it back
                out.decodes.remove(victim)
                out.decode_kv_tokens -= victim.num_computed_tokens + 1
            out.prefills = [c for c in out.prefills if c.request is not victim]
        self.blocks.allocate(request, num_new_tokens)
        return True

    def _ignore(self, request: Request, reason: str) -> None:
        """Drop the head of the waiting queue, which this policy can never run (vLLM v0's FINISHED_IGNORED)."""
        self.waiting.popleft()
        self.blocks.free(request)  # what a recompute preemption left cached for it is cached for nobody now
        request.status = RequestStatus.REJECTED
        request.reject_reason = reason
        self.ignored.append(request)

    def _swap_out(self, request: Request) -> None:
        """Host blocks for a request preempted by swap (its computed KV), or the engine stops as vLLM v0's does
        (``Scheduler._swap_out``: "Aborted due to the lack of CPU swap space"), before anything changes."""
        need = self.blocks.blocks_for(request.num_computed_tokens)
        if self.swap_space_blocks is not None and self.num_swapped_blocks + need > self.swap_space_blocks:
            raise EngineAborted(
                f"swapping out request {request.id} needs {need} KV blocks of host memory, "
                f"{self.swap_space_blocks - self.num_swapped_blocks} of {self.swap_space_blocks} are free "
                f"({len(self.swapped_blocks)} requests swapped out): vLLM v0 aborts the engine here (\"Aborted due "
                "to the lack of CPU swap space\"); raise scheduler.swap_space_gib or use preemption: recompute")
        if need:
            self.swapped_blocks[request.id] = need
            self.num_swapped_blocks += need
            self.peak_swapped_blocks = max(self.peak_swapped_blocks, self.num_swapped_blocks)

    def _swapped_back(self, request: Request) -> None:
        """A swapped-out request's KV came back (or it left): its host blocks are free again."""
        self.num_swapped_blocks -= self.swapped_blocks.pop(request.id, 0)

    def _schedule_decodes(self, candidates: list[Request], out: SchedulerOutput) -> None:
        """One new token for each candidate still running, in order."""
        blocks = self.blocks
        if blocks.num_free_blocks >= len(candidates) and not out.preempted:
            # Fast path: a decode adds at most one block, so nobody can be evicted.
            blocks.append_slots(candidates)
            out.decode_kv_tokens += sum(r.num_computed_tokens for r in candidates) + len(candidates)
            out.decodes.extend(candidates)
            return
        for request in candidates:
            if request.status is RequestStatus.RUNNING and self._reserve(request, 1, out):
                out.decodes.append(request)
                out.decode_kv_tokens += request.num_computed_tokens + 1

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        if self.preemption == "swap":
            self._swap_out(request)
        self.running.remove(request)
        # A recomputed request's KV stays valid in the cache until evicted (vLLM v1 frees it into the prefix
        # cache); swapped-out KV is in host memory and comes back whole.
        self.blocks.free(request, keep_cached=self.preemption == "recompute")
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        if self.preemption == "swap":
            out.swap_bytes += request.num_computed_tokens * self.kv_bytes_per_token
        else:
            request.num_computed_tokens = 0  # recompute the prompt and generated tokens later
        self.waiting.appendleft(request)
        out.preempted.append(request)
