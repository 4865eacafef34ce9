"""Continuous batching under a per-step token budget.

Each step first serves running requests (their decode token or their next prefill chunk),
preempting the newest running request whenever blocks run out, then admits waiting requests in
FCFS (or priority) order while the budget, the sequence cap and the admission reserve allow.
Prefill chunks and decodes share one batch. Preemption recomputes: the victim's blocks are
freed, its counter resets, and on re-admission its prefix is found again in the cache if it
survived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cadenza.config import CacheConfig, SchedulerConfig
from cadenza.core.kv_cache_manager import KVCacheManager
from cadenza.core.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int
    # Whether this chunk reaches the end of the token list, so the step samples a token.
    samples: bool


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
    ) -> None:
        self.config = scheduler_config
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
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
        self.kv.free(request)
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
            num_new = self._chunk_size(request, request.num_computed_tokens, budget)
            while not self.kv.can_allocate(request, num_new):
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
            self.kv.allocate(request, num_new)
            chunk = self._chunk(request, num_new)
            scheduled[request.request_id] = chunk
            out.chunks.append(chunk)
            budget -= num_new
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._next_waiting()
            cached = self.kv.find_cached_prefix(request)
            num_cached = len(cached) * self.kv.block_size
            remaining = request.num_tokens - num_cached
            if not self.config.enable_chunked_prefill and remaining > budget:
                break
            num_new = self._chunk_size(request, num_cached, budget)
            if not self.kv.can_allocate(request, num_new, cached, self.reserve_blocks):
                break
            self.waiting.remove(request)
            self.kv.allocate(request, num_new, cached)
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _next_waiting(self) -> Request:
        if self.config.policy == "priority":
            return min(self.waiting, key=lambda r: (r.priority, r.arrival_time))
        return self.waiting[0]

    def _chunk_size(self, request: Request, num_computed: int, budget: int) -> int:
        num_new = min(request.num_tokens - num_computed, budget)
        if self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        samples = request.num_computed_tokens + num_new == request.num_tokens
        return ScheduledChunk(request, num_new, samples)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
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
            request.num_computed_tokens += chunk.num_tokens
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
