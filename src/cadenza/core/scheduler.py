"""Continuous batching under a per-step token budget.

Each step first serves running requests (their decode token or their next prefill chunk),
preempting the newest running request whenever blocks run out, then admits waiting requests in
FCFS (or priority) order while the budget, the sequence cap and the admission reserve allow.
Prefill chunks and decodes share one batch.

With tiers attached, a waiting request whose cached prefix sits on host or disk first gets a
fetch job and waits for it (other requests are admitted meanwhile); a request whose leading
blocks were dropped recomputes them in the same pass as its new tokens. Preemption swaps the
victim's computed blocks out to a lower tier before freeing them, so on re-admission its prefix
is found again (on the device if it survived there, else on host or disk); without tiers it is
recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.eviction import EvictionPolicy
from cadenza.core.kv_cache_manager import KVCacheManager, PrefixLocation
from cadenza.core.request import Request, RequestStatus
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import Tier


@dataclass
class ScheduledChunk:
    request: Request
    # Token ranges computed this step: one, or two when a leading hole is recomputed in the
    # same pass as the tokens after the cached run.
    segments: list[tuple[int, int]]
    # Whether this chunk reaches the end of the token list, so the step samples a token.
    samples: bool

    @property
    def num_tokens(self) -> int:
        return sum(end - start for start, end in self.segments)


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
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        policy: EvictionPolicy | None = None,
    ) -> None:
        self.config = scheduler_config
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, policy
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
        max_blocks = -(-request.max_total_tokens // self.kv.block_size)
        if max_blocks > self.kv.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} may need {max_blocks} KV blocks but the cache "
                f"has {self.kv.num_blocks}; lower max_tokens or enlarge the KV cache"
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

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        for request in self._waiting_in_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if self.tiers is not None and self.tiers.is_fetching(request.request_id):
                continue  # its KV is on the way up; others may go first
            loc = self.kv.locate_prefix(request, self.tiers)
            if not request.cached_by_tier and loc.num_blocks:
                for tier in Tier:
                    request.cached_by_tier[tier.value] = loc.count(tier) * self.kv.block_size
            if self._start_fetch(request, loc):
                continue
            cached = []
            for block in loc.device:
                if block is None:
                    break  # not fetched: recompute from here
                cached.append(block)
            leading = loc.leading if cached else 0
            held = self.tiers.held(request.request_id) if self.tiers is not None else None
            tail = None if leading else self.kv.find_tail(request, len(cached), held)
            request.num_computed_tokens = 0 if leading else len(cached) * self.kv.block_size
            if tail is not None:
                request.num_computed_tokens += tail.num_tokens
            request.skip_from = request.skip_to = 0
            if leading:
                request.skip_from = leading * self.kv.block_size
                request.skip_to = (leading + len(cached)) * self.kv.block_size
            remaining = request.num_tokens - (request.skip_to - request.skip_from)
            remaining -= request.num_computed_tokens
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_new = self._chunk_size(request, budget)
            segments = request.segments(num_new)
            end = max(segments[-1][1], request.skip_to)
            with_tail = cached + [tail] if tail is not None else cached
            if not self.kv.can_allocate(request, end, with_tail, self.reserve_blocks, leading):
                request.num_computed_tokens = 0
                request.skip_from = request.skip_to = 0
                break
            self.waiting.remove(request)
            self.kv.allocate(request, end, cached, leading, tail)
            if self.tiers is not None:
                self.tiers.release_held(request.request_id)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = (
                    request.num_computed_tokens + request.skip_to - request.skip_from
                )
                self.kv.prefix_queries += request.num_tokens
                self.kv.prefix_hits += request.num_cached_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(self._chunk(request, segments))
            budget -= num_new

    def _start_fetch(self, request: Request, loc: PrefixLocation) -> bool:
        """Fetch the lower-tier blocks of the located run, once; True if the request waits
        (for the copy, or for room to copy into while other requests run)."""
        if self.tiers is None or request.fetch_tried:
            return False
        wanted = self.kv.blocks_to_fetch(request, loc, self.tiers)
        if not wanted:
            request.fetch_tried = True
            return False
        room = self.kv.pool.num_free_blocks - self.reserve_blocks
        room -= sum(1 for b in loc.device if b is not None and b.ref_cnt == 0)
        if room < len(wanted) and self.running:
            return True  # wait for room rather than recompute what a lower tier holds
        request.fetch_tried = True
        # Hold the run's device blocks so the fetch (or anyone) cannot evict them meanwhile.
        self.tiers.hold(request.request_id, [b for b in loc.device if b is not None])
        wanted = wanted[: max(0, room)]
        if self.tiers.fetch(request.request_id, wanted) is None:
            self.tiers.release_held(request.request_id)
            return False
        return True

    def _waiting_in_order(self) -> list[Request]:
        if self.config.policy == "priority":
            return sorted(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return list(self.waiting)

    def _chunk_size(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        remaining -= request.skip_to - request.skip_from
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
        request.skip_from = request.skip_to = 0
        request.fetch_tried = False
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
