"""Continuous batching under a per-step token budget.

Each step first serves running requests (their decode token or their next prefill chunk),
preempting the newest running request whenever blocks run out, then admits waiting requests in
FCFS (or priority) order while the budget, the sequence cap and the admission reserve allow.
Prefill chunks and decodes share one batch.

The admission reserve keeps blocks free for the decodes of running requests; with nothing
running it protects nobody and does not apply. So every request that ``add_request`` accepts
(its largest total length fits the pool) can be admitted once the requests ahead of it have
run: nothing waits forever at the head of the queue.

With tiers attached, a waiting request whose cached prefix sits on host or disk first gets a
fetch job and waits for it (or for room to fetch into); later requests are admitted meanwhile,
but at most ``max_fetch_overtakes`` of them, after which admission waits behind it. A request
whose leading blocks were dropped recomputes them in the same pass as its new tokens, and so
does one that lost blocks in the middle: every hole is recomputed and every run held after it
is reused.
Preemption swaps the victim's computed blocks out to a lower tier before freeing them, so on
re-admission its prefix is found again (on the device if it survived there, else on host or
disk); without tiers it is recomputed.

A waiting request whose first uncached blocks are ones a running request is computing right now
(a burst of requests with one new system prompt) waits for them instead of computing them a
second time in parallel, as SGLang's in-batch prefix check does: the first request computes the
shared prefix, the others then find it cached. Without this, which requests of a burst share
the work depends on how their arrivals interleave with steps, and the burst's time to first
token with it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.block_pool import KVBlock
from cadenza.core.eviction import EvictionPolicy
from cadenza.core.hashing import BlockHash
from cadenza.core.kv_cache_manager import KVCacheManager, PrefixLocation
from cadenza.core.request import Request, RequestStatus
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import Tier

# A waiting request defers to a running one computing at least this many of its next blocks.
SHARED_PREFIX_MIN_BLOCKS = 2


def _runs_after_holes(layout: list[KVBlock | None], first: int, size: int) -> list[tuple[int, int]]:
    """The token ranges of ``layout``'s cached runs from block ``first`` on (after its first
    hole): what the request's counter skips."""
    runs: list[tuple[int, int]] = []
    for i in range(first, len(layout)):
        if layout[i] is None:
            continue
        if runs and runs[-1][1] == i * size:
            runs[-1] = (runs[-1][0], (i + 1) * size)
        else:
            runs.append((i * size, (i + 1) * size))
    return runs


@dataclass
class ScheduledChunk:
    request: Request
    # Token ranges computed this step: one, or more when holes in the cached history are
    # recomputed in the same pass as the tokens after the cached runs.
    segments: list[tuple[int, int]]
    # Whether this chunk reaches the end of the token list, so the step samples a token.
    samples: bool

    @property
    def num_tokens(self) -> int:
        segments = self.segments
        if len(segments) == 1:
            start, end = segments[0]
            return end - start
        return sum(end - start for start, end in segments)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    # How many later requests may be admitted ahead of one waiting for its KV fetch before
    # admission waits for it: enough to keep the batch busy during a copy, few enough that a
    # turn whose history is being fetched is not starved by a stream of fresh requests.
    MAX_FETCH_OVERTAKES = 16

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        policy: EvictionPolicy | None = None,
        *,
        clock: Callable[[], float],
        max_fetch_overtakes: int = MAX_FETCH_OVERTAKES,
    ) -> None:
        if max_fetch_overtakes < 0:
            raise ValueError("max_fetch_overtakes must not be negative")
        self.config = scheduler_config
        self.clock = clock
        self.max_fetch_overtakes = max_fetch_overtakes
        self.kv = KVCacheManager(
            num_blocks,
            cache_config.block_size,
            cache_config.enable_prefix_caching,
            policy,
            clock=clock,
        )
        self.tiers: TierManager | None = None
        self.reserve_blocks = int(num_blocks * cache_config.admission_reserve_fraction)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ----------------------------------------------------------------- requests in and out
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        # On the largest total length, not the prompt: chunked prefill admits a request by its
        # first chunk, and its later chunks and decodes allocate as it runs.
        max_blocks = -(-request.max_total_tokens // self.kv.block_size)
        if max_blocks > self.kv.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} may need {max_blocks} KV blocks but the cache "
                f"has {self.kv.num_blocks}; lower max_tokens or enlarge the KV cache"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and request.num_prompt_tokens > budget:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_prompt_tokens} prompt tokens "
                f"but a step computes at most {budget} without chunked prefill; shorten the "
                f"prompt, raise max_num_batched_tokens or enable chunked prefill"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request now (abort, stop string); its blocks go back to the pool."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        if request.session_id is not None and status != RequestStatus.FINISHED_ABORTED:
            self.kv.register_tail(request)
        blocks = self.kv.free(request)
        if self.tiers is not None:
            self.tiers.release_held(request_id)
            if request.session_id is not None and status != RequestStatus.FINISHED_ABORTED:
                kept = [b for b in blocks if b.block_hash is not None]
                self.tiers.persist(kept)
                if request.retention_ttl_s > 0:
                    self.tiers.pin(kept, self.tiers.clock() + request.retention_ttl_s)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        plain = self._plain_decode_plan()
        return plain if plain is not None else self._schedule_general()

    def _schedule_general(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledChunk] = {}
        for request in list(self.running):
            if budget <= 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = self._chunk_size(request, budget)
            segments = request.segments(num_new)
            end = segments[-1][1]
            while not self.kv.can_allocate(request, end):
                victim = max(self.running, key=lambda r: (r.priority, r.arrival_time))
                self._preempt(victim)
                out.preempted.append(victim)
                undone = scheduled.pop(victim.request_id, None)
                if undone is not None:
                    out.chunks.remove(undone)
                    budget += undone.num_tokens
                if victim is request:
                    break
            if request.status != RequestStatus.RUNNING:
                continue
            self.kv.allocate(request, end)
            chunk = self._chunk(request, segments)
            scheduled[request.request_id] = chunk
            out.chunks.append(chunk)
            budget -= num_new
        if not out.preempted:
            self._admit(out, budget)
        return out

    # ------------------------------------------------------------------ plain decodes
    def _plain_decode_batch(self) -> list[Request] | None:
        """The running requests if the next step is a plain decode: nothing waits, they fit
        the budget one token each, and every one computes only its newest token, in a slot it
        already holds. Else None."""
        running = self.running
        if self.waiting or not running or len(running) > self.config.max_num_batched_tokens:
            return None
        held = self.kv.num_slots
        for request in running:
            n = len(request.all_token_ids)
            if request.num_computed_tokens != n - 1 or request.skips or held(request) < n:
                return None
        return running

    def _plain_decode_plan(self) -> SchedulerOutput | None:
        """The plan of a plain decode step (``_plain_decode_batch``), or None if the next step
        is not one. The general pass gives exactly this plan then (one token each, no
        allocation, no preemption, nothing to admit); built directly it costs a fraction of
        that pass, and most steps of a long simulation are such steps."""
        batch = self._plain_decode_batch()
        if batch is None:
            return None
        return SchedulerOutput(
            [
                ScheduledChunk(r, [(len(r.all_token_ids) - 1, len(r.all_token_ids))], True)
                for r in batch
            ]
        )

    def plain_decode_steps(self) -> int:
        """How many of the next steps are certain to be plain decodes (``_plain_decode_plan``)
        of the same requests in which none finishes, whatever copies land meanwhile: 0 when
        the next step is not one. A step that needs a fresh block, or may end a request, is
        not counted. Requests that could stop on a sampled token (stop ids, or EOS not
        ignored) make it 0: their ends are not known ahead. The simulator uses this to step
        a worker through such a stretch in one event."""
        batch = self._plain_decode_batch()
        if batch is None:
            return 0
        held = self.kv.num_slots
        steps = None
        for request in batch:
            n = len(request.all_token_ids)
            params = request.sampling_params
            if n < 2 or params.stop_token_ids or (not params.ignore_eos and request.eos_token_ids):
                return 0
            # Step i (from 0) computes the token at n - 1 + i, into a slot held (n - 1 + i <
            # held), and appends token n + i; the step that appends its last one ends it.
            left = min(held(request) - n + 1, request.max_total_tokens - n - 1)
            if params.max_tokens is not None:
                left = min(left, params.max_tokens - len(request.output_token_ids) - 1)
            steps = left if steps is None else min(steps, left)
        return max(steps or 0, 0)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        # Requests waiting for a fetch that later requests have gone ahead of in this pass.
        passed: list[Request] = []
        computing: set[BlockHash] | None = None  # built on first use in this pass
        for request in self._waiting_in_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            loc = None
            waits = self.tiers is not None and self.tiers.is_fetching(request.request_id)
            if not waits:
                loc = self.kv.locate_prefix(request, self.tiers, later_runs=True)
                waits = self._start_fetch(request, loc)
            if waits:
                if request.num_overtaken >= self.max_fetch_overtakes:
                    break  # passed often enough: admission now waits for it
                passed.append(request)
                continue  # its KV is on the way up (or waits for room); others may go first
            assert loc is not None
            if computing is None:
                computing = self._computing_prompt_blocks()
            if self._waits_for_shared_prefix(request, loc, computing):
                continue  # a running request is computing its next blocks: reuse them next step
            num_new = self._try_admit(out, request, loc, budget)
            if num_new is None:
                break
            computing.update(self._uncomputed_prompt_blocks(request))
            budget -= num_new
            for waiter in passed:
                waiter.num_overtaken += 1
            if any(w.num_overtaken >= self.max_fetch_overtakes for w in passed):
                break

    def _uncomputed_prompt_blocks(self, request: Request) -> list[BlockHash]:
        """Keys of the full prompt blocks ``request`` has still to compute."""
        size = self.kv.block_size
        end = min(request.num_prompt_tokens // size, len(request.block_hashes))
        return request.block_hashes[request.num_computed_tokens // size : end]

    def _computing_prompt_blocks(self) -> set[BlockHash]:
        """Keys of the full prompt blocks that running requests have still to compute."""
        keys: set[BlockHash] = set()
        for request in self.running:
            if request.num_computed_tokens < request.num_prompt_tokens:
                keys.update(self._uncomputed_prompt_blocks(request))
        return keys

    def _waits_for_shared_prefix(
        self, request: Request, loc: PrefixLocation, computing: set[BlockHash]
    ) -> bool:
        """Whether the request's first uncached blocks (at least ``SHARED_PREFIX_MIN_BLOCKS``
        of them) are being computed by a running request, so that waiting one step and finding
        them cached beats computing them twice."""
        if not computing or not self.kv.enable_caching:
            return False
        keys = request.block_hashes
        first = 0 if loc.leading else loc.num_blocks
        run = 0
        while run < SHARED_PREFIX_MIN_BLOCKS and first + run < len(keys):
            if keys[first + run] not in computing:
                return False
            run += 1
        return run == SHARED_PREFIX_MIN_BLOCKS

    def _try_admit(
        self, out: SchedulerOutput, request: Request, loc: PrefixLocation, budget: int
    ) -> int | None:
        """Admit ``request`` over its located prefix if the budget and the pool allow; returns
        the tokens scheduled for it, or None (the request unchanged) if it must wait."""
        size = self.kv.block_size
        layout = self._reuse_layout(loc)
        cached = [b for b in layout if b is not None]
        # The counter starts after the leading cached run; the runs after holes are skipped.
        first = next((i for i, b in enumerate(layout) if b is None), len(layout))
        held = self.tiers.held(request.request_id) if self.tiers is not None else []
        whole = first == len(layout)  # a cached run from the first block, no hole
        tail = self.kv.find_tail(request, len(cached), held, self.tiers) if whole else None
        request.num_computed_tokens = first * size
        if tail is not None:
            request.num_computed_tokens += tail.num_tokens
        request.skips = _runs_after_holes(layout, first, size)
        remaining = request.num_tokens - request.num_skipped_tokens - request.num_computed_tokens
        # Without chunked prefill a request waits for a step with budget for all of it, unless
        # it is longer than any step (a preempted request's recompute): that one goes in chunks.
        if (
            not self.config.enable_chunked_prefill
            and budget < remaining <= self.config.max_num_batched_tokens
        ):
            self._unplace(request)
            return None
        num_new = self._chunk_size(request, budget)
        segments = request.segments(num_new)
        end = max(segments[-1][1], request.skips[-1][1] if request.skips else 0)
        with_tail = layout + [tail] if tail is not None else layout
        if not self._fits(request, end, with_tail):
            self._unplace(request)
            return None
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = request.num_computed_tokens + request.num_skipped_tokens
            request.cached_by_tier = self._reused_by_tier(request, cached, tail, held)
            self.kv.prefix_queries += request.num_tokens
            self.kv.prefix_hits += request.num_cached_tokens
        request.fetch_sources = {}
        self.waiting.remove(request)
        self.kv.allocate(request, end, layout, tail)
        if self.tiers is not None:
            self.tiers.release_held(request.request_id)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        out.chunks.append(self._chunk(request, segments))
        return num_new

    def _fits(self, request: Request, end: int, layout: list[KVBlock | None]) -> bool:
        """Whether admission can give ``request`` slots for tokens ``[0, end)``, its leading
        blocks laid out as ``layout`` (cached blocks, None for fresh ones in holes).

        With requests running, the admission reserve stays free for their decodes. With nothing
        running the reserve protects nobody, so the whole pool is available; and if device
        blocks fetched for other waiting requests (or fetched for this one but unusable) are
        what stand in the way, they are let go. So a request that fits the pool never waits
        at the head of the queue for longer than in-flight copies take.
        """
        kv = self.kv
        if self.running:
            return kv.can_allocate(request, end, layout, self.reserve_blocks)
        if kv.can_allocate(request, end, layout, 0):
            return True
        keep = [b for b in layout if b is not None]
        return self._let_go_of_holds(request, keep) and kv.can_allocate(request, end, layout, 0)

    @staticmethod
    def _reuse_layout(loc: PrefixLocation) -> list[KVBlock | None]:
        """The request's leading blocks as admission places them: each located block on the
        device (fetched ones included) reused, None for a hole to recompute. A run is used up
        to its first block not on the device (its fetch did not bring it: recomputed, with
        everything after it); no trailing holes."""
        layout: list[KVBlock | None] = []
        for run in loc.runs():
            layout.extend([None] * (run.start - len(layout)))
            for block in run.device:
                if block is None:
                    break
                layout.append(block)
            else:
                continue
            break
        while layout and layout[-1] is None:
            layout.pop()
        return layout

    def _let_go_of_holds(self, request: Request, keep: list[KVBlock]) -> bool:
        """Release device blocks held for waiting requests, except ``request``'s blocks in
        ``keep``; the others fetch again when their turn comes. Returns whether any went."""
        if self.tiers is None:
            return False
        released = False
        for other in self.waiting:
            if self.tiers.is_fetching(other.request_id):
                continue  # its copy is still landing in the blocks it holds
            blocks = self.tiers.take_held(other.request_id)
            if not blocks:
                continue
            kept = [b for b in blocks if any(b is k for k in keep)] if other is request else []
            if kept:
                self.tiers.hold(other.request_id, kept)  # a second reference, kept below
            self.kv.pool.free(blocks, accessed=False)
            released = released or len(kept) < len(blocks)
            if other is not request:
                other.fetch_tried = False
                other.fetch_sources = {}
        return released

    def _reused_by_tier(
        self, request: Request, cached: list[KVBlock], tail: KVBlock | None, held: list[KVBlock]
    ) -> dict[str, int]:
        """Tokens of the blocks admission reuses, by the tier each came from: fetched for this
        request (from host or disk, per ``fetch_sources``), else found on the device."""
        held_ids = {b.block_id for b in held}
        by_tier = {tier.value: 0 for tier in Tier}
        reused = [(b, self.kv.block_size) for b in cached]
        if tail is not None:
            reused.append((tail, tail.num_tokens))
        for block, num_tokens in reused:
            tier = Tier.DEVICE.value
            if block.block_id in held_ids and block.block_hash is not None:
                tier = request.fetch_sources.get(block.block_hash, tier)
            by_tier[tier] += num_tokens
        return by_tier if any(by_tier.values()) else {}

    @staticmethod
    def _unplace(request: Request) -> None:
        request.num_computed_tokens = 0
        request.skips = []

    def _start_fetch(self, request: Request, loc: PrefixLocation) -> bool:
        """Fetch the lower-tier blocks of the located runs, once; True if the request waits
        (for the copy, or for room to copy into while other requests run)."""
        if self.tiers is None or request.fetch_tried:
            return False
        wanted = self.kv.blocks_to_fetch(request, loc, self.tiers)
        if not wanted:
            # Nothing below the device yet. Not marked as tried: while the request waits for
            # room, its unreferenced device blocks may be offloaded and evicted, and the next
            # pass must fetch them back rather than recompute them.
            return False
        reserve = self.reserve_blocks if self.running else 0  # as in ``_fits``
        room = self.kv.pool.num_free_blocks - reserve
        on_device = loc.device_blocks()
        room -= sum(1 for b in on_device if b.ref_cnt == 0)
        if room < len(wanted) and self.running:
            return True  # wait for room rather than recompute what a lower tier holds
        request.fetch_tried = True
        # Hold the runs' device blocks so the fetch (or anyone) cannot evict them meanwhile.
        self.tiers.hold(request.request_id, on_device)
        wanted = wanted[: max(0, room)]
        request.fetch_sources = {key: tier.value for key, _, _, _, tier in wanted}
        if self.tiers.fetch(request.request_id, wanted) is None:
            self.tiers.release_held(request.request_id)
            request.fetch_sources = {}
            return False
        return True

    def _waiting_in_order(self) -> list[Request]:
        if self.config.policy == "priority":
            return sorted(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        if self.config.policy == "program":
            return sorted(self.waiting, key=lambda r: (r.program_arrival, r.arrival_time))
        return list(self.waiting)

    def _chunk_size(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        remaining -= request.num_skipped_tokens
        num_new = min(remaining, budget)
        if self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _chunk(self, request: Request, segments: list[tuple[int, int]]) -> ScheduledChunk:
        return ScheduledChunk(request, segments, segments[-1][1] == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        if self.tiers is not None:
            self.kv.register_full_blocks(request)
            self.tiers.offload_now(self.kv.blocks_of(request.request_id))
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.skips = []
        request.fetch_tried = False
        request.fetch_sources = {}
        request.num_overtaken = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ------------------------------------------------------------------- after the model
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance counters, append sampled tokens, finish requests that stopped.

        Returns the requests that received a new token this step (finished ones included).
        """
        updated: list[Request] = []
        for chunk in out.chunks:
            request = chunk.request
            if request.is_finished or request.request_id not in self.requests:
                continue  # aborted while the step ran
            request.advance(chunk.segments)
            if chunk.samples:
                request.append_output_token(sampled[request.request_id])
            self.kv.register_full_blocks(request)
            if not chunk.samples:
                continue
            updated.append(request)
            status = request.check_stop()
            if status is not None:
                self.finish_request(request.request_id, status)
        return updated
