"""Moving KV between workers: ahead of a hinted turn, on a turn's critical path, and live.

* **Hints** (SYMPHONY): the policy picks the worker for the session's next turn by load; if
  another worker holds the session's KV, it is moved there in the background (export at the
  source, import at the destination, through the object store), then pinned there by a hint
  until the turn comes. A turn that arrives while its KV is still moving waits for it only as
  long as recomputing would take. A hint no turn follows expires: its pins lapse on the worker,
  and it is counted as false.
* **Critical-path moves**: the policy chose a worker without the KV and judged copying it
  cheaper than recomputing it there (``KVAware.move_is_cheaper``).
* **Live migration** (Llumnix): a running request's KV is pre-copied while it keeps decoding
  (up to two rounds, each moving what the previous left), then the request is stopped and its
  remaining KV exported in the same engine step (stop-and-copy), imported at the destination,
  and the request resumed there with the tokens it had generated; the downtime is the time
  from the stop to the destination's first new token. If the destination fails, its imported
  blocks are only cached copies there and the request is resubmitted elsewhere.

Every move reserves its estimated bytes on both workers (``MigrationBudget``) and is counted
in ``ClusterStats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cadenza.cluster.cluster_stats import MigrationRecord
from cadenza.cluster.kv_index import PrefixHits
from cadenza.cluster.migration_budget import MigrationBudget
from cadenza.cluster.placement import Placement, Turn
from cadenza.cluster.worker_handle import MoveResult, WorkerDiedError
from cadenza.core.kv_events import BlockStored
from cadenza.core.transfer import Tier
from cadenza.engine_api import AbortRequest, AddRequest, ExportKV, HintResult, HintSession

if TYPE_CHECKING:
    from cadenza.cluster.router import ClusterEngine

log = logging.getLogger("cadenza.router")

# A hinted turn whose KV is still moving waits at most this long for it.
MAX_HINT_WAIT_S = 10.0


@dataclass
class PendingHint:
    session_id: str
    target: str
    created: float
    expires: float
    history_tokens: int
    task: asyncio.Task[int] | None = None
    moved_tokens: int = 0
    moving: bool = False  # the hint moves the session's KV to another worker


class Migrations:
    def __init__(self, router: ClusterEngine, budget_bytes: int, default_ttl_s: float) -> None:
        self.router = router
        self.budget = MigrationBudget(budget_bytes)
        self.default_ttl_s = default_ttl_s
        self.hints: dict[str, PendingHint] = {}

    # ------------------------------------------------------------------ moving KV
    async def _move(
        self, src: str, dst: str, command: ExportKV | AbortRequest, est_blocks: int, kind: str
    ) -> MoveResult:
        router = self.router
        est_bytes = est_blocks * router.costs.block_bytes
        source, dest = router.slots[src], router.slots[dst]
        async with self.budget.reserve(src, dst, est_bytes):
            start = router.clock()
            try:
                result = await source.handle.move_kv(dest.handle, command)
            except WorkerDiedError:
                router.stats.record_migration(MigrationRecord(kind, src, dst, 0, 0.0, False))
                raise
            elapsed = router.clock() - start
        router.stats.record_migration(
            MigrationRecord(kind, src, dst, result.num_bytes, elapsed, result.imported is not None)
        )
        if result.imported is not None:
            self._index_import(dst, command, result)
            router.observe_link(result.num_bytes, elapsed)
        return result

    def _index_import(self, dst: str, command: Any, result: MoveResult) -> None:
        """Record what the import installed at once, so the next placement sees it without
        waiting for the destination's events (which confirm it)."""
        imported = result.imported
        if imported is None or not isinstance(command, ExportKV):
            return
        turn = self.router.turn_of(command.session_id, command.history, command.cache_salt)
        device = imported.installed_by_tier.get("device", 0)
        host = imported.installed_by_tier.get("host", 0)
        keys = turn.block_keys[: imported.num_blocks - imported.rejected_blocks]
        events = [BlockStored(tuple(keys[:device]), Tier.DEVICE)]
        if host:
            events.append(BlockStored(tuple(keys[device : device + host]), Tier.HOST))
        self.router.index.apply(dst, events)

    async def move_session(
        self,
        src: str,
        dst: str,
        session_id: str,
        tokens: tuple[int, ...] | list[int],
        cache_salt: str | None,
        kind: str,
    ) -> int:
        """Move the KV of ``tokens`` from ``src`` to ``dst``; returns the tokens installed."""
        router = self.router
        turn = router.turn_of(session_id, tokens, cache_salt)
        held = router.index.prefix_hits(src, turn.block_keys).blocks
        there = router.index.prefix_hits(dst, turn.block_keys).blocks
        if held <= there:
            return 0
        command = ExportKV(session_id, tuple(tokens), cache_salt)
        try:
            result = await self._move(src, dst, command, held - there, kind)
        except WorkerDiedError as exc:
            log.warning("moving %s's KV %s -> %s failed: %s", session_id, src, dst, exc)
            return 0
        imported = result.imported
        if imported is None:
            return 0
        installed = sum(imported.installed_by_tier.values())
        return installed * router.block_size

    # ------------------------------------------------------------------ hints
    async def hint(self, command: HintSession) -> HintResult:
        router = self.router
        now = router.clock()
        sid = command.session_id
        history = command.history
        turn = router.turn_of(sid, history, command.cache_salt)
        old = self.hints.pop(sid, None)
        views = router.views()
        placement = router.policy.on_hint(turn, views)
        ttl = command.ttl_s
        if ttl is None:
            ttl = (command.expected_arrival_s or 0.0) + self.default_ttl_s
        if placement is None:  # the policy does not place on hints: prefetch where the KV is
            holder, _ = router.index.best_holder(turn.block_keys)
            target = holder or router.policy.least_loaded(views).worker_id
            placement = Placement(target, "hint")
        pending = PendingHint(sid, placement.worker_id, now, now + ttl, len(history))
        if old is not None and old.task is not None and old.target != pending.target:
            old.task.cancel()
        self.hints[sid] = pending
        if placement.migrate_from is not None:
            pending.moving = True
            pending.task = asyncio.ensure_future(
                self._hint_move(pending, placement.migrate_from, command)
            )
            holder = router.index.prefix_hits(placement.migrate_from, turn.block_keys)
            return HintResult({**holder.by_tier(), "moving": holder.blocks})
        return await self._pin(pending.target, command)

    async def _pin(self, worker_id: str, command: HintSession) -> HintResult:
        try:
            return await self.router.slots[worker_id].handle.call(command)
        except WorkerDiedError:
            return HintResult({"device": 0, "host": 0, "disk": 0})

    async def _hint_move(self, pending: PendingHint, src: str, command: HintSession) -> int:
        moved = await self.move_session(
            src,
            pending.target,
            pending.session_id,
            command.history,
            command.cache_salt,
            kind="hint",
        )
        pending.moved_tokens = moved
        await self._pin(pending.target, command)  # brings host blocks up, pins until the turn
        return moved

    def take_hint(self, session_id: str | None) -> PendingHint | None:
        if session_id is None:
            return None
        return self.hints.pop(session_id, None)

    async def wait_for_hint(self, hint: PendingHint, turn: Turn) -> None:
        """Let a turn whose KV is still moving wait for it, no longer than recomputing."""
        task = hint.task
        if task is None or task.done():
            return
        costs = self.router.costs
        limit = min(hint.history_tokens * costs.prefill_s_per_token, MAX_HINT_WAIT_S)
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=limit)
        except (TimeoutError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("a hinted migration failed")

    def record_outcome(
        self, hint: PendingHint | None, placement: Placement, history_tokens: int
    ) -> None:
        stats = self.router.stats
        if history_tokens <= 0:
            return  # a session's first turn has nothing to find
        if hint is None:
            stats.hint_outcomes["missing"] += 1
            return
        wanted = max(history_tokens // self.router.block_size - 1, 0)
        hits: PrefixHits = placement.hits
        found = hits.blocks >= wanted  # where it ran: the hint's target, or a cheaper holder
        stats.hint_outcomes["found" if found else "late"] += 1
        if hint.moving:
            stats.hinted_moves["found" if found else "late"] += 1

    def drop_hint(self, session_id: str, unused: bool = False) -> None:
        """Forget a pending hint; ``unused``: the session ended with no turn after it, so
        the hint was false."""
        hint = self.hints.pop(session_id, None)
        if hint is None:
            return
        if hint.task is not None:
            hint.task.cancel()
        if unused:
            self.router.stats.hint_outcomes["false"] += 1

    def expire_hints(self, now: float) -> None:
        for sid, hint in list(self.hints.items()):
            if hint.expires <= now:
                del self.hints[sid]
                self.router.stats.hint_outcomes["false"] += 1
                self.router.policy.on_hint_expired(sid)

    def worker_lost(self, worker_id: str) -> None:
        for sid, hint in list(self.hints.items()):
            if hint.target == worker_id:
                self.drop_hint(sid)

    # ------------------------------------------------------------------ live migration
    async def live_migrate(
        self, request_id: str, dst: str | None, kind: str = "live", transfer: bool = True
    ) -> dict[str, Any]:
        """Move a running request to ``dst`` (default: the least loaded other worker). With
        ``transfer`` its KV goes along (pre-copy, then stop-and-copy); without, it is stopped
        and re-prefilled at the destination (MELL's choice when that is cheaper)."""
        router = self.router
        stream = router._streams.get(request_id)
        if stream is None or stream.worker_id is None:
            return {"request_id": request_id, "migrated": False, "error": "not running"}
        src = stream.worker_id
        if dst is None:
            candidates = [v for v in router.views((src,)) if v.accepting]
            if not candidates:
                return _refused(request_id, "no other worker is taking work")
            dst = router.policy.least_loaded(candidates).worker_id
        request = stream.request
        sid = request.session_id or request_id
        salt = request.cache_salt
        start = router.clock()
        if src == dst:
            return _refused(request_id, f"request {request_id!r} already runs on {dst!r}")
        if router.slots[dst].state != "alive":
            return _refused(request_id, f"worker {dst!r} is {router.slots[dst].state}")
        if not transfer:
            return await self._reprefill(stream, src, dst, kind, start)
        # Pre-copy while it keeps decoding: each round moves the blocks the previous left.
        for _ in range(2):
            tokens = stream.prompt_token_ids + stream.output_token_ids
            before = router.index.prefix_hits(dst, router.turn_of(sid, tokens, salt).block_keys)
            if len(tokens) // router.block_size - before.blocks < 1:
                break
            await self.move_session(src, dst, sid, tokens, salt, kind=kind)
        # Stop-and-copy.
        stream.stopped_at = router.clock()
        try:
            result = await self._move(
                src, dst, AbortRequest(request_id, "migrated", export=True), 1, kind
            )
        except WorkerDiedError as exc:
            stream.stopped_at = None
            return {"request_id": request_id, "migrated": False, "error": str(exc)}
        if result.output_token_ids is None or not (
            result.output_token_ids or result.imported is not None
        ):
            stream.stopped_at = None  # it had finished (or never started) there
            return {"request_id": request_id, "migrated": False, "error": "finished"}
        tokens = tuple(result.output_token_ids)
        router.slots[src].requests.discard(request_id)
        stream.num_moves += 1
        stream.worker_id = dst
        router.slots[dst].requests.add(request_id)
        try:
            await router.slots[dst].handle.call(AddRequest(stream.resubmission(tokens)))
        except WorkerDiedError as exc:
            router.slots[dst].requests.discard(request_id)
            await router._worker_failed(router.slots[dst], str(exc))
            return {"request_id": request_id, "migrated": False, "error": "destination failed"}
        return {
            "request_id": request_id,
            "migrated": True,
            "src": src,
            "dst": dst,
            "tokens_at_stop": len(tokens),
            "elapsed_s": router.clock() - start,
        }

    async def _reprefill(
        self, stream: Any, src: str, dst: str, kind: str, start: float
    ) -> dict[str, Any]:
        """Stop the request at ``src`` and resume it at ``dst`` from the tokens the router has
        seen; tokens generated after those are generated again (identically: greedy and
        seeded sampling do not depend on where a request runs)."""
        router = self.router
        request_id = stream.request_id
        tokens = stream.output_token_ids
        stream.stopped_at = router.clock()
        stream.worker_id = dst  # from now on, outputs from src are dropped
        router.slots[src].requests.discard(request_id)
        router.slots[dst].requests.add(request_id)
        stream.num_moves += 1
        with contextlib.suppress(WorkerDiedError):  # if so, it is gone there anyway
            await router.slots[src].handle.call(AbortRequest(request_id, "migrated"))
        try:
            await router.slots[dst].handle.call(AddRequest(stream.resubmission(tokens)))
        except WorkerDiedError as exc:
            router.slots[dst].requests.discard(request_id)
            await router._worker_failed(router.slots[dst], str(exc))
            return {"request_id": request_id, "migrated": False, "error": "destination failed"}
        router.stats.record_migration(MigrationRecord(kind, src, dst, 0, 0.0, True))
        return {
            "request_id": request_id,
            "migrated": True,
            "mode": "reprefill",
            "src": src,
            "dst": dst,
            "tokens_at_stop": len(tokens),
            "elapsed_s": router.clock() - start,
        }


def _refused(request_id: str, why: str) -> dict[str, Any]:
    """A migration not attempted because where it would go cannot take it (the server
    answers 409 with ``why``)."""
    return {"request_id": request_id, "migrated": False, "error": why, "refused": True}
