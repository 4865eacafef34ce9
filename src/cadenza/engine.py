"""LLMEngine: add_request / step / abort over the scheduler, the model runner and detokenizer,
plus sessions (turns over a durable token history) and the KV tiers below the device."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from cadenza.config import EngineConfig
from cadenza.core.eviction import (
    CostModel,
    EvictionPolicy,
    cost_model_from,
    make_eviction_policy,
    profile_points,
)
from cadenza.core.hashing import hash_seed
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler
from cadenza.core.tiering import TierManager
from cadenza.core.transfer import Tier
from cadenza.kvstore.disk_tier import DiskTier
from cadenza.kvstore.swap_engine import SwapEngine
from cadenza.model.source import ModelSource, load_model_source
from cadenza.output_processor import OutputProcessor
from cadenza.outputs import RequestOutput
from cadenza.runner.model_runner import ModelRunner, profile_chunk_costs
from cadenza.session.manager import Retention, SessionManager, TurnPlan
from cadenza.session.store import ConversationStore

# Bytes a disk block file adds to its payload (header with the block's token ids).
_DISK_HEADER_BYTES = 4096
# How long a hinted session's prefetched KV stays pinned past its expected arrival.
HINT_GRACE_S = 30.0


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        self.config = config
        source = source or load_model_source(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.fingerprint = source.fingerprint
        limit = source.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = ModelRunner(source, config, self.max_model_len)
        self.clock = time.monotonic
        self.cost_model: CostModel | None = None
        policy = self._eviction_policy()
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks, policy)
        self.tiers, self.swap, self.disk = self._build_tiers(policy)
        self.scheduler.tiers = self.tiers
        self.store = ConversationStore(config.session_store_path or ":memory:")
        self.num_interrupted_turns = self.store.recover_interrupted()
        self.sessions = SessionManager(self.store, self.tokenizer)
        self._turns: dict[str, TurnPlan] = {}
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = (
            self.tokenizer.eos_token_ids
            if self.tokenizer is not None
            else source.config.eos_token_ids
        )
        self._ids = itertools.count()
        del source  # weights now live in the runner's model only

    # ----------------------------------------------------------------------- set-up
    def _eviction_policy(self) -> EvictionPolicy:
        cache = self.config.cache
        if cache.kv_eviction_policy == "cost":
            if self.config.kv_cost_model == "profile":
                points = profile_chunk_costs(
                    self.runner, profile_points(self.max_model_len), self.max_model_len
                )
                if len(points) >= 2:
                    self.cost_model = cost_model_from(points)
            self.cost_model = self.cost_model or CostModel.linear()
        return make_eviction_policy(cache.kv_eviction_policy, self.clock, self.cost_model)

    def _build_tiers(
        self, policy: EvictionPolicy
    ) -> tuple[TierManager, SwapEngine, DiskTier | None]:
        cache = self.config.cache
        block_bytes = self.runner.bytes_per_block()
        host_slots = cache.host_num_blocks or int(cache.kv_host_gib * 2**30 // block_bytes)
        disk = None
        if cache.disk_enabled:
            assert cache.kv_disk_path is not None
            capacity = (
                cache.disk_num_blocks * (block_bytes + _DISK_HEADER_BYTES)
                if cache.disk_num_blocks
                else int(cache.kv_disk_gib * 2**30)
            )
            disk = DiskTier(cache.kv_disk_path, capacity)
        swap = SwapEngine(self.runner.kv_caches, host_slots, disk)
        tiers = TierManager(
            self.scheduler.kv.pool,
            host_slots=host_slots,
            disk=disk,
            executor=swap,
            policy=policy,
            clock=self.clock,
            aot_threshold=cache.kv_offload_threshold,
            pin_cap_fraction=cache.kv_pin_cap_fraction,
            write_through=cache.kv_disk_write_through,
        )
        return tiers, swap, disk

    def flush(self) -> None:
        """Wait for every queued KV copy (write-through to disk included) to land."""
        while self.tiers.num_pending_jobs:
            self.tiers.poll(wait_s=0.05)

    def close(self) -> None:
        """Finish background copies and close the store (the engine is unusable after)."""
        self.flush()
        self.swap.close()
        self.store.close()

    # ----------------------------------------------------------------------- sessions
    def add_turn(
        self,
        session_id: str,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        tenant: str = "",
        retention: Retention | dict[str, Any] | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> str:
        """Queue the next turn of a session: its stored exact history plus the template delta
        for ``messages`` (the new messages only). Raises ValueError (nothing queued) if the
        turn cannot be served, or if the session already has a turn in flight."""
        keep = Retention.parse(retention)
        request_id = request_id if request_id is not None else f"turn-{next(self._ids)}"
        plan = self.sessions.begin_turn(session_id, messages, request_id, tenant=tenant)
        try:
            self.add_request(
                request_id,
                plan.token_ids,
                params,
                priority=priority,
                cache_salt=tenant or None,
                arrival_time=arrival_time,
                session_id=session_id,
                num_history_tokens=max(plan.num_history_tokens - 1, 0),
                retention_ttl_s=keep.ttl_s if keep else 0.0,
            )
        except Exception:
            self.sessions.abort_turn(plan, "rejected")
            raise
        self._turns[request_id] = plan
        return request_id

    def hint(
        self,
        session_id: str,
        expected_arrival_s: float | None = None,
        *,
        tenant: str = "",
        ttl_s: float | None = None,
    ) -> dict[str, int]:
        """Advice that the session's next turn is coming: move its KV towards the device now
        (as free space allows) and pin it until shortly after the expected arrival. Returns
        how many blocks were found per tier. A wrong hint costs only the copy."""
        if expected_arrival_s is not None and expected_arrival_s < 0:
            raise ValueError("expected_arrival_s must not be negative")
        if self.store.get_session(session_id, tenant=tenant) is None:
            raise KeyError(f"unknown session {session_id!r}")
        history = self.store.history_token_ids(session_id)
        found = {tier.value: 0 for tier in Tier}
        if len(history) < 2:
            return found
        probe = self._make_request(f"hint:{session_id}", history, SamplingParams(), tenant or None)
        probe.num_history_tokens = len(history) - 1  # the last token's KV is never computed
        loc = self.scheduler.kv.locate_prefix(probe, self.tiers)
        for tier in Tier:
            found[tier.value] = loc.count(tier)
        horizon = ttl_s if ttl_s is not None else (expected_arrival_s or 0.0) + HINT_GRACE_S
        until = self.clock() + horizon
        on_device = [b for b in loc.device if b is not None]
        self.tiers.pin(on_device, until)
        if self.tiers.is_fetching(probe.request_id):
            return found
        wanted = self.scheduler.kv.blocks_to_fetch(probe, loc, self.tiers)
        room = self.scheduler.kv.pool.num_free_blocks - self.scheduler.reserve_blocks
        self.tiers.fetch(probe.request_id, wanted[: max(room, 0)], pin_until=until)
        return found

    def end_session(self, session_id: str, *, tenant: str = "", delete: bool = False) -> bool:
        """The session is over: unpin its KV (it becomes ordinary cache), optionally delete it."""
        if self.store.get_session(session_id, tenant=tenant) is None:
            return False
        history = self.store.history_token_ids(session_id)
        if len(history) >= 2:
            probe = self._make_request("end", history, SamplingParams(), tenant or None)
            for block in self.scheduler.kv.locate_prefix(probe).device:
                if block is not None:
                    block.pin_until = 0.0
        if delete:
            self.store.delete_session(session_id, tenant=tenant)
        return True

    # ----------------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str | None,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        session_id: str | None = None,
        num_history_tokens: int = 0,
        retention_ttl_s: float = 0.0,
    ) -> str:
        """Queue a request; raises ValueError (nothing queued) if it cannot be served."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        request = self._make_request(request_id, token_ids, params, cache_salt)
        request.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        request.priority = priority
        request.session_id = session_id
        request.num_history_tokens = num_history_tokens
        request.retention_ttl_s = retention_ttl_s
        self.scheduler.add_request(request)
        self.outputs.add(request, text, request.arrival_time)
        return request_id

    def _make_request(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
    ) -> Request:
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(max_total, len(token_ids) + params.max_tokens)
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=tuple(self.eos_token_ids),
            block_size=self.config.cache.block_size,
            hash_seed=hash_seed(self.fingerprint, cache_salt),
            max_total_tokens=max_total,
            cache_salt=cache_salt,
        )

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids instead")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens (at least one must be left to generate)"
            )

    def abort_request(self, request_id: str) -> bool:
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self.outputs.drop(request_id)
        plan = self._turns.pop(request_id, None)
        if plan is not None:
            self.sessions.abort_turn(plan)
        return request is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    # ----------------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return an output for every request that got a
        new token (finished requests are marked ``finished``)."""
        self.tiers.poll()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            if self.tiers.num_pending_jobs and self.scheduler.has_unfinished_requests():
                self.tiers.poll(wait_s=0.05)  # turns wait for their KV to arrive
            self.tiers.maintain()
            return []
        with self.swap.computing():  # background KV copies wait out the forward pass
            sampled = self.runner.execute(plan, self.scheduler.kv)
        tokens = {rid: s.token_id for rid, s in sampled.items()}
        updated = self.scheduler.update_from_output(plan, tokens)
        results = []
        for request in updated:
            token = sampled[request.request_id]
            stop = self.outputs.record_token(request, token.logprob, token.top)
            if stop is not None and not request.is_finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            output = self.outputs.make_output(request, request.is_finished)
            if request.is_finished:
                self._finish_turn(request, output)
            results.append(output)
        self.tiers.maintain()
        return results

    def _finish_turn(self, request: Request, output: RequestOutput) -> None:
        turn = self._turns.pop(request.request_id, None)
        if turn is None:
            return
        completion = output.outputs[0]
        self.sessions.complete_turn(
            turn, request.output_token_ids, completion.text, completion.finish_reason
        )

    # ----------------------------------------------------------------------- introspection
    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.kv.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.kv.num_blocks
