"""The engine's step loop and per-request policy over injected parts (torch-free).

``EngineCore`` owns the scheduler, the block pool and the tier manager, and drives them one
step at a time: apply finished copies → schedule → execute → advance counters → finish requests
(retention: a session's KV stays cached, is written through and pinned for its TTL) → maintain
the tiers (ahead-of-time copies). Everything that touches hardware or time is injected:

* a **model executor** (``ModelExecutor``: a block count, bytes per block, and
  ``execute(plan, blocks) -> sampled tokens``) — the torch ``ModelRunner`` in the real engine, a
  cost model in the simulator, a fake in tests;
* a **transfer executor** (``core.transfer.TransferExecutor``) that moves KV between tiers —
  the torch ``SwapEngine``, or one that completes copies at virtual times;
* the **lower tiers** (host slot count, a disk index);
* a **clock**, which reaches every object that reads time: scheduler, KV cache manager, block
  pool, eviction policy and tier manager.

The core knows nothing of text, templates or the durable history: callers hand it token ids
(a session's turn is its stored history plus the new delta, with ``session_id`` and
``num_history_tokens`` set), and turn text into tokens and tokens into text above it.
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cadenza.config import EngineConfig
from cadenza.core.eviction import CostModel, make_eviction_policy
from cadenza.core.hashing import BlockHash, hash_seed
from cadenza.core.kv_cache_manager import KVCacheManager, PrefixLocation
from cadenza.core.kv_events import KVEvent
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler, SchedulerOutput
from cadenza.core.tiering import DiskIndex, TierManager
from cadenza.core.transfer import Tier, TransferExecutor, TransferJob

log = logging.getLogger("cadenza.engine")

# How long a hinted session's prefetched KV stays pinned past its expected arrival.
HINT_GRACE_S = 30.0
# Sessions whose start time program-level FCFS remembers (the oldest are forgotten first).
MAX_TRACKED_PROGRAMS = 100_000


@dataclass
class SampledToken:
    token_id: int
    logprob: float = 0.0
    top: list[tuple[int, float]] | None = None


def fit_context(config: EngineConfig, max_model_len: int, num_blocks: int) -> int:
    """The longest context the engine can serve: a request of ``max_model_len`` tokens must fit
    the KV pool, or every request without ``max_tokens`` would be refused. An explicitly set
    ``max_model_len`` that does not fit is an error at start-up; the model's own limit is
    lowered to what the pool holds, with a warning."""
    size = config.cache.block_size
    capacity = num_blocks * size
    if max_model_len <= capacity:
        return max_model_len
    blocks = -(-max_model_len // size)
    if config.max_model_len is not None:
        raise ValueError(
            f"max_model_len {max_model_len} needs {blocks} KV blocks of {size} tokens but the KV"
            f" cache has {num_blocks} ({capacity} tokens): enlarge the cache (e.g."
            f" --kv-cache-memory-gib, scaled by {blocks / num_blocks:.2f}) or lower"
            f" --max-model-len to at most {capacity}"
        )
    if (capacity, max_model_len) not in _CAPPED_CONTEXTS:
        # Once per process: a simulation or a benchmark builds many engines of one shape.
        _CAPPED_CONTEXTS.add((capacity, max_model_len))
        log.warning(
            "the KV cache holds %d tokens (%d blocks), less than the model's context of %d"
            " tokens: serving contexts of up to %d tokens (enlarge the cache to serve more)",
            capacity,
            num_blocks,
            max_model_len,
            capacity,
        )
    return capacity


_CAPPED_CONTEXTS: set[tuple[int, int]] = set()


class NoTransfers:
    """The transfer executor of an engine without host or disk tiers: nothing ever moves."""

    def submit(self, job: TransferJob) -> None:
        raise RuntimeError("this engine has no KV tier below the device")

    def run_now(self, job: TransferJob) -> None:
        self.submit(job)

    def poll(self) -> list[TransferJob]:
        return []

    def wait(self, timeout: float) -> list[TransferJob]:
        return []

    def pending(self) -> int:
        return 0


class ModelExecutor(Protocol):
    """Runs a step's forward pass (the torch runner, a cost model, a test fake)."""

    num_blocks: int

    def bytes_per_block(self) -> int: ...

    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, SampledToken]:
        """Compute the step; returns the sampled token of every chunk that samples."""
        ...


@dataclass
class StepResult:
    """What one step did: requests that got a token (with it), and the step's work."""

    updated: list[tuple[Request, SampledToken]] = field(default_factory=list)
    num_tokens: int = 0
    num_preempted: int = 0

    @property
    def is_idle(self) -> bool:
        return self.num_tokens == 0


@dataclass
class LoadSnapshot:
    """A picklable view of how busy an engine is (what a router balances on)."""

    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    device_blocks_total: int
    device_blocks_free: int
    device_blocks_used: int
    device_blocks_pinned: int
    host_blocks_total: int
    host_blocks_used: int
    disk_blocks_used: int
    queued_copy_jobs: int
    num_preemptions: int
    time: float

    @property
    def outstanding(self) -> int:
        return self.num_running + self.num_waiting


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        executor: ModelExecutor,
        *,
        clock: Callable[[], float],
        fingerprint: str,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        max_model_len: int,
        transfer: TransferExecutor | None = None,
        host_slots: int = 0,
        disk: DiskIndex | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        self.config = config
        self.executor = executor
        self.clock = clock
        self.fingerprint = fingerprint
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = fit_context(config, max_model_len, executor.num_blocks)
        self.cost_model = cost_model
        cache = config.cache
        self.policy = make_eviction_policy(cache.kv_eviction_policy, clock, cost_model)
        self.scheduler = Scheduler(
            config.scheduler, cache, executor.num_blocks, self.policy, clock=clock
        )
        self.transfer = transfer or NoTransfers()
        self.tiers = TierManager(
            self.scheduler.kv.pool,
            host_slots=host_slots,
            disk=disk,
            executor=self.transfer,
            policy=self.policy,
            clock=clock,
            aot_threshold=cache.kv_offload_threshold,
            pin_cap_fraction=cache.kv_pin_cap_fraction,
            write_through=cache.kv_disk_write_through,
        )
        self.scheduler.tiers = self.tiers
        # KV events are kept only once someone reads them (``drain_events``); until then each
        # step discards them, so an engine with no router holds no growing log.
        self.events = self.scheduler.kv.pool.events
        self.events_subscribed = False
        self._ids = itertools.count()
        self.num_aborted: dict[str, int] = {}
        self._program_starts: dict[str, float] = {}  # session -> first turn's arrival

    # ----------------------------------------------------------------------- requests
    def make_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        block_hashes: Sequence[BlockHash] = (),
    ) -> Request:
        """A request over ``token_ids``; ``block_hashes`` may give the keys of its leading full
        blocks, already computed by the caller (the rest are computed here)."""
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(max_total, len(token_ids) + params.max_tokens)
        size = self.config.cache.block_size
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            block_size=size,
            hash_seed=hash_seed(self.fingerprint, cache_salt),
            max_total_tokens=max_total,
            cache_salt=cache_salt,
            block_hashes=list(block_hashes[: len(token_ids) // size]),
        )

    def validate(self, token_ids: Sequence[int]) -> None:
        """Raise ValueError (with what to fix) for a prompt this engine cannot run."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        in_range = min(token_ids) >= 0 and max(token_ids) < self.vocab_size
        bad = [] if in_range else [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens (at least one must be left to generate)"
            )

    def add_request(
        self,
        request_id: str | None,
        token_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        session_id: str | None = None,
        num_history_tokens: int = 0,
        retention_ttl_s: float = 0.0,
        resume_token_ids: Sequence[int] = (),
        block_hashes: Sequence[BlockHash] = (),
    ) -> Request:
        """Queue a request; raises ValueError (nothing queued) if it cannot be served.
        ``resume_token_ids`` are output tokens already generated elsewhere: they are
        prefilled after the prompt and count as this request's output. ``block_hashes``: the
        keys of the prompt's leading full blocks if the caller has them (``hashing``, seeded
        with this engine's fingerprint and ``cache_salt``), which saves computing them again."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        try:
            ids = list(map(operator.index, token_ids))  # an int, not a float cut to one
        except TypeError:
            bad = [t for t in token_ids if not hasattr(t, "__index__")][:5]
            raise ValueError(f"prompt token ids must be integers; got {bad!r}") from None
        self.validate(ids)
        stops = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if stops:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}); got {stops[:5]}")
        request = self.make_request(request_id, ids, params, cache_salt, block_hashes)
        request.arrival_time = arrival_time if arrival_time is not None else self.clock()
        request.priority = priority
        request.session_id = session_id
        request.num_history_tokens = num_history_tokens
        request.retention_ttl_s = retention_ttl_s
        request.program_arrival = self._program_arrival(session_id, request.arrival_time)
        for token in resume_token_ids:
            request.append_output_token(int(token))
        if request.num_tokens >= request.max_total_tokens:
            raise ValueError(
                f"the request already has {request.num_output_tokens} output tokens; "
                "nothing is left to generate"
            )
        self.scheduler.add_request(request)
        return request

    def _program_arrival(self, session_id: str | None, arrival: float) -> float:
        """When ``session_id``'s first turn arrived here (bounded memory: the oldest sessions
        are forgotten first)."""
        if session_id is None:
            return arrival
        start = self._program_starts.setdefault(session_id, arrival)
        if len(self._program_starts) > MAX_TRACKED_PROGRAMS:
            del self._program_starts[next(iter(self._program_starts))]
        return start

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        return self.scheduler.finish_request(request_id, status)

    def abort_request(self, request_id: str, reason: str = "client") -> Request | None:
        """End a request now; its blocks (and any fetch it waits for) are released."""
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if request is not None:
            self.num_aborted[reason] = self.num_aborted.get(reason, 0) + 1
        return request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ----------------------------------------------------------------------- sessions
    def _probe(self, name: str, history: Sequence[int], cache_salt: str | None) -> Request:
        probe = self.make_request(name, list(history), SamplingParams(), cache_salt)
        probe.num_history_tokens = len(history) - 1  # the last token's KV is never computed
        return probe

    def locate_history(self, history: Sequence[int], cache_salt: str | None) -> PrefixLocation:
        """Where the KV of a token history is held, block by block."""
        if len(history) < 2:
            return PrefixLocation()
        return self.scheduler.kv.locate_prefix(
            self._probe("locate", history, cache_salt), self.tiers
        )

    def hint(
        self,
        session_id: str,
        history: Sequence[int],
        *,
        cache_salt: str | None = None,
        expected_arrival_s: float | None = None,
        ttl_s: float | None = None,
    ) -> dict[str, int]:
        """Advice that a session's next turn (over ``history``) is coming: move its KV towards
        the device now (as free space allows) and pin it until shortly after the expected
        arrival. Returns how many blocks were found per tier, over every held run of the
        history (a run after a hole included, as admission reuses it). A wrong hint costs only
        copies."""
        if expected_arrival_s is not None and expected_arrival_s < 0:
            raise ValueError("expected_arrival_s must not be negative")
        found = {tier.value: 0 for tier in Tier}
        if len(history) < 2:
            return found
        probe = self._probe(f"hint:{session_id}", history, cache_salt)
        kv = self.scheduler.kv
        # Every held run, as admission will use them: a run after a hole is worth moving too.
        loc = kv.locate_prefix(probe, self.tiers, later_runs=True)
        for run in loc.runs():
            for tier in run.tiers:
                found[tier.value] += 1
        horizon = ttl_s if ttl_s is not None else (expected_arrival_s or 0.0) + HINT_GRACE_S
        until = self.clock() + horizon
        self.tiers.pin(loc.device_blocks(), until)
        if self.tiers.is_fetching(probe.request_id):
            return found
        wanted = kv.blocks_to_fetch(probe, loc, self.tiers)
        room = kv.pool.num_free_blocks - self.scheduler.reserve_blocks
        self.tiers.fetch(probe.request_id, wanted[: max(room, 0)], pin_until=until)
        return found

    def end_session(self, history: Sequence[int], cache_salt: str | None = None) -> None:
        """The session is over: unpin its KV (it becomes ordinary evictable cache)."""
        if len(history) < 2:
            return
        probe = self._probe("end", history, cache_salt)
        pool = self.scheduler.kv.pool
        for block in self.scheduler.kv.locate_prefix(probe).device:
            if block is not None:
                pool.set_pin_until(block, 0.0)

    # ----------------------------------------------------------------------- one step
    def step(self) -> StepResult:
        """Apply finished copies, schedule, execute and advance; finished requests have
        released their blocks (with their retention applied) when this returns."""
        tiers = self.tiers
        tiers.poll()
        plan = self.scheduler.schedule()
        result = StepResult(num_preempted=len(plan.preempted))
        if plan.is_empty:
            if tiers.num_pending_jobs and self.scheduler.has_unfinished_requests():
                tiers.poll(wait_s=0.05)  # turns wait for their KV to arrive
            tiers.maintain()
            if not self.events_subscribed:
                self.events.drain()
            return result
        result.num_tokens = plan.num_tokens
        sampled = self._execute(plan)
        tokens = {rid: s.token_id for rid, s in sampled.items()}
        for request in self.scheduler.update_from_output(plan, tokens):
            result.updated.append((request, sampled[request.request_id]))
        tiers.maintain()
        if not self.events_subscribed:
            self.events.drain()
        return result

    def _execute(self, plan: SchedulerOutput) -> dict[str, SampledToken]:
        computing = getattr(self.transfer, "computing", None)
        if computing is None:
            return self.executor.execute(plan, self.scheduler.kv)
        with computing():  # background KV copies wait out the forward pass
            return self.executor.execute(plan, self.scheduler.kv)

    def flush(self) -> None:
        """Apply every queued KV copy (write-through to disk included)."""
        while self.tiers.num_pending_jobs:
            self.tiers.poll(wait_s=0.05)

    # ----------------------------------------------------------------------- KV events
    def drain_events(self) -> list[KVEvent]:
        """KV events since the last call, in order. The first call subscribes: it starts with
        a snapshot of every tier (``AllCleared`` then ``BlockStored`` of what each holds), so
        an index built from the stream alone is exact from then on."""
        if not self.events_subscribed:
            self.events.drain()
            self.events_subscribed = True
            for tier, keys in (
                (Tier.DEVICE, self.scheduler.kv.pool.cached_keys()),
                (Tier.HOST, list(self.tiers.host.entries) if self.tiers.host else []),
            ):
                self.events.emit_cleared(tier)
                self.events.emit_stored(keys, tier)
            if not self.tiers.emit_disk_snapshot():
                self.events.emit_cleared(Tier.DISK)
        return self.events.drain()

    # ----------------------------------------------------------------------- introspection
    def load(self) -> LoadSnapshot:
        sched = self.scheduler
        pool = sched.kv.pool
        tiers = self.tiers
        host, disk = tiers.host, tiers.disk
        now = self.clock()
        pinned = sum(1 for b in pool.blocks if b.pin_until > now and b.block_hash is not None)
        return LoadSnapshot(
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            num_waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting),
            device_blocks_total=pool.num_blocks,
            device_blocks_free=pool.num_free_blocks,
            device_blocks_used=pool.num_blocks - pool.num_free_blocks,
            device_blocks_pinned=pinned,
            host_blocks_total=host.num_slots if host is not None else 0,
            host_blocks_used=len(host) if host is not None else 0,
            disk_blocks_used=len(disk) if disk is not None else 0,  # type: ignore[arg-type]
            queued_copy_jobs=tiers.num_pending_jobs,
            num_preemptions=sched.num_preemptions,
            time=now,
        )
