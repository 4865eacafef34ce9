"""The cluster router: N workers behind the same interface as one in-process engine.

``ClusterEngine`` is what the server's routes call when ``--workers N`` (N > 1, or a Ray
address) is given; it answers the same ``generate`` / ``call`` / ``abort`` as ``AsyncEngine``,
so no route knows whether one engine or a cluster serves it. It owns:

* the workers' handles (``WorkerHandle``: in-process or Ray actors), each with a pull loop that
  brings back outputs, KV events (into the ``KVIndex``) and the worker's load;
* the placement policy (``cluster/placement.py``, the same objects the simulator runs), asked
  per turn where it runs and per hint where the session's next turn should go;
* migrations (``cluster/migrations.py``): a hinted session's KV moved ahead of its turn, a
  turn's KV moved on the critical path when that beats recomputing, a running request moved
  live (pre-copy, then stop-and-copy), all under a per-worker byte budget;
* faults: a worker whose calls fail is marked dead, its cached KV forgotten, its requests
  resubmitted elsewhere with the tokens they had streamed (the client's stream continues), and
  it rejoins when it answers again.

The durable conversation and response stores stay above, in the server process, so nothing a
user said lives only on a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cadenza.cluster.cluster_stats import ClusterStats
from cadenza.cluster.cluster_stream import ClusterStream
from cadenza.cluster.kv_index import KVIndex, block_keys
from cadenza.cluster.migrations import Migrations
from cadenza.cluster.placement import CostParams, Placement, Turn, WorkerView, make_policy
from cadenza.cluster.stats_merge import merge_stats, sum_loads
from cadenza.cluster.worker_handle import WorkerDiedError, WorkerHandle
from cadenza.cluster.worker_loop import WorkerInfo
from cadenza.core.engine_core import LoadSnapshot
from cadenza.core.transfer import Tier
from cadenza.engine_api import (
    AbortRequest,
    AddRequest,
    EndSession,
    EngineCommand,
    EngineRequest,
    GetLoad,
    GetStats,
    HintSession,
)
from cadenza.outputs import RequestOutput
from cadenza.server.async_engine import EngineStoppedError, QueueFullError, RequestAbortedError
from cadenza.server.worker_header import set_worker

log = logging.getLogger("cadenza.router")


class NoWorkerError(RuntimeError):
    """No worker is alive and accepting work (retry later)."""


@dataclass
class WorkerSlot:
    handle: WorkerHandle
    info: WorkerInfo | None = None
    state: str = "starting"  # alive | draining | drained | dead
    load: LoadSnapshot | None = None
    requests: set[str] = field(default_factory=set)
    pull_task: asyncio.Task[None] | None = None
    failures: int = 0
    started_at: float = 0.0

    @property
    def worker_id(self) -> str:
        return self.handle.worker_id

    @property
    def alive(self) -> bool:
        return self.state in ("alive", "draining", "drained")

    def view(self) -> WorkerView:
        """The policy's view: the last load snapshot, counting requests placed since then
        as waiting (so a burst between two pulls does not all land on one worker)."""
        load = self.load
        running = load.num_running if load else 0
        waiting = max(load.num_waiting if load else 0, len(self.requests) - running, 0)
        return WorkerView(
            self.worker_id,
            num_running=running,
            num_waiting=waiting,
            waiting_tokens=load.num_waiting_tokens if load else 0,
            free_blocks=load.device_blocks_free if load else 0,
            total_blocks=load.device_blocks_total if load else 0,
            accepting=self.state == "alive",
        )

    @property
    def outstanding(self) -> int:
        return self.view().outstanding


class ClusterEngine:
    def __init__(
        self,
        handles: Sequence[WorkerHandle],
        config: Any,
        tokenizer: Any,
        infos: Sequence[WorkerInfo],
        *,
        routing: str = "symphony",
        max_waiting: int = 256,
        clock: Callable[[], float] = time.monotonic,
        pull_timeout_s: float = 0.2,
        migration_budget_bytes: int = 256 << 20,
        default_hint_ttl_s: float = 60.0,
        rejoin_poll_s: float = 1.0,
        failover_wait_s: float = 120.0,
        epoch_s: float = 0.5,
        costs: CostParams | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.engine = None  # no in-process engine (the server reads ``config`` instead)
        self.clock = clock
        self.max_waiting = max_waiting
        self.pull_timeout_s = pull_timeout_s
        self.rejoin_poll_s = rejoin_poll_s
        self.epoch_s = epoch_s
        self.failover_wait_s = failover_wait_s
        self.block_size = config.cache.block_size
        first = infos[0]
        self.fingerprint = first.fingerprint
        self.costs = costs or CostParams(block_bytes=first.block_bytes)
        self.index = KVIndex()
        self.routing = routing
        self.policy = make_policy(routing, self.index, self.costs)
        self.stats = ClusterStats()
        self.slots = {
            h.worker_id: WorkerSlot(h, info) for h, info in zip(handles, infos, strict=True)
        }
        self.migrations = Migrations(self, migration_budget_bytes, default_hint_ttl_s)
        self.on_step: Callable[[list[RequestOutput], float], None] | None = None
        self._streams: dict[str, ClusterStream] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._running = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    async def connect(cls, handles: Sequence[WorkerHandle], config: Any, **kw: Any):
        """Wait for every worker's engine to load, then build the router."""
        infos = await asyncio.gather(*(h.info() for h in handles))
        tokenizer = await handles[0].tokenizer()
        return cls(handles, config, tokenizer, infos, **kw)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the pull loops on the running event loop (idempotent)."""
        if self._running:
            return
        self._running = True
        now = self.clock()
        for slot in self.slots.values():
            slot.state, slot.started_at = "alive", now
            slot.pull_task = self._spawn(self._pull_loop(slot))
        self._spawn(self._housekeeping())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def stop_accepting(self) -> None:
        self._accepting = False

    async def aclose(self) -> None:
        self._accepting = False
        deadline = self.clock() + 30.0
        while self._streams and self.clock() < deadline:
            await asyncio.sleep(0.05)
        self._running = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(s.handle.close() for s in self.slots.values()))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Synchronous shutdown (the app's lifespan calls ``aclose`` when it can)."""
        self._accepting = False

    # ------------------------------------------------------------------ pulling
    async def _pull_loop(self, slot: WorkerSlot) -> None:
        handle = slot.handle
        while self._running and slot.alive:
            try:
                batch = await handle.pull(self.pull_timeout_s)
            except WorkerDiedError as exc:
                await self._worker_failed(slot, str(exc))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pulling from %s failed", slot.worker_id)
                await asyncio.sleep(self.pull_timeout_s)
                continue
            if batch.load is not None:
                slot.load = batch.load
            if batch.events:
                self.index.apply(slot.worker_id, batch.events)
            delivered = [out for out in (self._dispatch(slot, o) for o in batch.outputs) if out]
            if delivered and self.on_step is not None:
                try:
                    self.on_step(delivered, batch.step_s)
                except Exception:
                    log.exception("step observer failed")
            self.stats.sample_load(
                self.clock(), [s.outstanding for s in self.slots.values() if s.alive]
            )

    def _dispatch(self, slot: WorkerSlot, output: RequestOutput) -> RequestOutput | None:
        stream = self._streams.get(output.request_id)
        if stream is None or stream.worker_id != slot.worker_id:
            return None  # aborted, or moved away (its tokens go with it)
        first = stream.num_cached_tokens is None
        downtimes = len(stream.downtimes)
        merged = stream.merge(output, self.clock())
        if first:
            self.stats.record_prompt(
                len(stream.prompt_token_ids),
                stream.request.num_history_tokens,
                stream.cached_by_tier,
                stream.migrated_tokens,
            )
        if len(stream.downtimes) > downtimes:
            self.stats.live_migration_downtimes.append(
                (stream.downtimes[-1], len(stream.prompt_token_ids) + stream.sent_tokens)
            )
        if output.finished:
            slot.requests.discard(stream.request_id)
            self._request_done(stream.request_id)
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, merged)
        return merged

    async def _housekeeping(self) -> None:
        """Once per epoch: expire hints; with a packing policy (MELL), report how running
        requests grew and carry out the epoch's migrations."""
        while self._running:
            await asyncio.sleep(self.epoch_s)
            self.migrations.expire_hints(self.clock())
            if hasattr(self.policy, "drain_migrations"):
                try:
                    await self._pack_epoch()
                except Exception:
                    log.exception("packing epoch failed")

    async def _pack_epoch(self) -> None:
        policy: Any = self.policy
        for stream in list(self._streams.values()):
            if stream.worker_id is not None and not stream.finished:
                total = len(stream.prompt_token_ids) + stream.sent_tokens
                policy.on_grow(stream.request_id, -(-total // self.block_size))
        for move in policy.drain_migrations():
            if move.request_id in self._streams and move.dst in self.slots:
                await self.migrations.live_migrate(
                    move.request_id, move.dst, kind="pack", transfer=move.mode == "transfer"
                )

    def _request_done(self, request_id: str) -> None:
        done = getattr(self.policy, "on_finish", None)
        if done is not None:
            done(request_id)

    def observe_link(self, num_bytes: int, seconds: float) -> None:
        """A migration moved ``num_bytes`` in ``seconds``: update the link bandwidth the
        policy weighs moving KV against recomputing it with (an exponential mean)."""
        if num_bytes < (1 << 20) or seconds <= 0:
            return  # too small to say anything about bandwidth
        measured = num_bytes / seconds
        old = self.costs.link_bytes_per_s
        self.costs = replace(self.costs, link_bytes_per_s=0.7 * old + 0.3 * measured)
        self.policy.costs = self.costs

    # ------------------------------------------------------------------ placement
    def live_slots(self, exclude: Sequence[str] = ()) -> list[WorkerSlot]:
        return [s for s in self.slots.values() if s.alive and s.worker_id not in exclude]

    def views(self, exclude: Sequence[str] = ()) -> list[WorkerView]:
        return [s.view() for s in self.live_slots(exclude)]

    def turn_of(
        self,
        session_id: str | None,
        token_ids: Sequence[int],
        cache_salt: str | None,
        request_id: str | None = None,
    ) -> Turn:
        keys = block_keys(token_ids, self.block_size, self.fingerprint, cache_salt)
        return Turn(session_id, tuple(keys), len(token_ids), self.block_size, request_id)

    def _prompt_ids(self, request: EngineRequest) -> tuple[int, ...]:
        if isinstance(request.prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids instead")
            return tuple(self.tokenizer.encode(request.prompt, add_special_tokens=True))
        return tuple(int(t) for t in request.prompt)

    async def _place_and_submit(
        self, stream: ClusterStream, request: EngineRequest, exclude: Sequence[str] = ()
    ) -> Placement:
        """Choose a worker (moving the KV first when the policy says so) and submit."""
        tokens = stream.prompt_token_ids + tuple(request.resume_token_ids)
        turn = self.turn_of(request.session_id, tokens, request.cache_salt, request.request_id)
        hint = self.migrations.take_hint(request.session_id) if not stream.num_moves else None
        if hint is not None:
            await self.migrations.wait_for_hint(hint, turn)
        failed: list[str] = list(exclude)
        while True:
            views = self.views(failed)
            if not any(v.accepting for v in views):
                raise NoWorkerError("no worker is available; retry shortly")
            placement = self.policy.place(turn, views)
            slot = self.slots[placement.worker_id]
            load = slot.load
            if load is not None and load.num_waiting >= self.max_waiting:
                raise QueueFullError(load.num_waiting)
            stream.migrated_tokens = 0
            if placement.migrate_from is not None:
                moved = await self.migrations.move_session(
                    placement.migrate_from,
                    placement.worker_id,
                    request.session_id or request.request_id,
                    tokens,
                    request.cache_salt,
                    kind="turn",
                )
                stream.migrated_tokens = moved
            elif hint is not None and hint.target == placement.worker_id:
                stream.migrated_tokens = hint.moved_tokens
            stream.worker_id, stream.reason = slot.worker_id, placement.reason
            slot.requests.add(stream.request_id)
            try:
                # Token ids, not text: the router already tokenised the prompt (the stream
                # puts the text back on the outputs).
                await slot.handle.call(AddRequest(replace(request, prompt=stream.prompt_token_ids)))
            except WorkerDiedError as exc:
                slot.requests.discard(stream.request_id)
                if stream.worker_id is None:
                    # The failure was noticed meanwhile and the request is being failed over
                    # (``_fail_over``): one resubmission, not two.
                    return placement
                stream.worker_id = None
                await self._worker_failed(slot, str(exc))
                failed.append(slot.worker_id)
                continue
            except BaseException:
                slot.requests.discard(stream.request_id)
                stream.worker_id = None
                raise
            break
        self.stats.placements[placement.reason] += 1
        self.stats.placements_by_worker[placement.worker_id] += 1
        if request.session_id is not None and not stream.num_moves:
            self.migrations.record_outcome(hint, placement, request.num_history_tokens)
        return placement

    # ------------------------------------------------------------------ the engine API
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Place and run ``request``, yielding its outputs (cumulative, like one engine's)."""
        await self.start()
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        stream = ClusterStream(
            request, self._prompt_ids(request), self.clock(), asyncio.get_running_loop()
        )
        self._streams[request.request_id] = stream
        try:
            try:
                await self._place_and_submit(stream, request)
            except NoWorkerError as exc:
                raise EngineStoppedError(str(exc)) from None
            set_worker(stream.worker_id or "")
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        except RequestAbortedError:
            raise
        finally:
            self._streams.pop(request.request_id, None)
            if not stream.finished and stream.worker_id is not None:
                self._abort_on_worker(stream, "client")

    def _abort_on_worker(self, stream: ClusterStream, reason: str) -> None:
        self._request_done(stream.request_id)
        slot = self.slots.get(stream.worker_id or "")
        if slot is None:
            return
        slot.requests.discard(stream.request_id)

        async def abort() -> None:
            with contextlib.suppress(WorkerDiedError):
                await slot.handle.call(AbortRequest(stream.request_id, reason))

        self._spawn(abort())

    def abort(self, request_id: str, reason: str = "client") -> None:
        """Abort a request (from the event loop): frees its blocks where it runs."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._abort_on_worker(stream, reason)
        stream.loop.call_soon_threadsafe(
            stream.queue.put_nowait, RequestAbortedError(f"request {request_id} aborted")
        )

    async def call(self, command: EngineCommand) -> Any:
        await self.start()
        match command:
            case HintSession():
                return await self.migrations.hint(command)
            case EndSession():
                self.migrations.drop_hint(command.session_id, unused=True)
                self.policy.forget_session(command.session_id)
                await self._broadcast(command)
                return None
            case GetStats():
                stats = await self._broadcast(command)
                return merge_stats([s for s in stats if s is not None])
            case GetLoad():
                loads = [s.load for s in self.live_slots() if s.load is not None]
                return sum_loads(loads) if loads else None
            case AbortRequest(request_id=rid, reason=reason):
                self.abort(rid, reason)
                return True
        raise TypeError(f"{type(command).__name__} is not a cluster-level command")

    async def _broadcast(self, command: EngineCommand) -> list[Any]:
        async def one(slot: WorkerSlot) -> Any:
            try:
                return await slot.handle.call(command)
            except WorkerDiedError as exc:
                await self._worker_failed(slot, str(exc))
                return None

        return list(await asyncio.gather(*(one(s) for s in self.live_slots())))

    async def worker_stats(self) -> dict[str, Any]:
        """Each live worker's ``EngineStats``."""
        out: dict[str, Any] = {}
        for slot in self.live_slots():
            try:
                out[slot.worker_id] = await slot.handle.call(GetStats())
            except WorkerDiedError as exc:
                await self._worker_failed(slot, str(exc))
        return out

    def next_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ faults
    async def _worker_failed(self, slot: WorkerSlot, why: str) -> None:
        if slot.state == "dead":
            return
        log.warning("worker %s is down (%s); resubmitting its requests", slot.worker_id, why)
        slot.state = "dead"
        slot.failures += 1
        slot.load = None
        self.stats.worker_failures += 1
        self.index.forget(slot.worker_id)
        self.migrations.worker_lost(slot.worker_id)
        lost = getattr(self.policy, "on_worker_lost", None)
        if lost is not None:
            lost(slot.worker_id)
        orphans = [self._streams[r] for r in list(slot.requests) if r in self._streams]
        slot.requests.clear()
        for stream in orphans:
            stream.worker_id = None
            self._spawn(self._fail_over(stream, slot.worker_id))
        self._spawn(self._await_rejoin(slot))

    async def _fail_over(self, stream: ClusterStream, dead: str) -> None:
        """Run ``stream`` elsewhere from its prompt plus the tokens it already streamed."""
        self.stats.failovers += 1
        deadline = self.clock() + self.failover_wait_s
        while True:
            if stream.request_id not in self._streams:
                return  # the client left meanwhile
            stream.num_moves += 1
            try:
                await self._place_and_submit(stream, stream.resubmission(), exclude=(dead,))
                return
            except NoWorkerError:
                if self.clock() > deadline:
                    break
                await asyncio.sleep(self.rejoin_poll_s)
            except Exception as exc:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
                return
        stream.loop.call_soon_threadsafe(
            stream.queue.put_nowait, RuntimeError("no worker came back to finish the request")
        )

    async def _await_rejoin(self, slot: WorkerSlot) -> None:
        while self._running:
            await asyncio.sleep(self.rejoin_poll_s)
            try:
                slot.info = await slot.handle.info()
            except WorkerDiedError:
                continue
            except Exception:
                log.exception("probing %s failed", slot.worker_id)
                continue
            log.info("worker %s is back (pid %s)", slot.worker_id, slot.info.pid)
            slot.state, slot.started_at = "alive", self.clock()
            slot.pull_task = self._spawn(self._pull_loop(slot))
            return

    # ------------------------------------------------------------------ operations
    async def migrate_request(self, request_id: str, dst: str | None = None) -> dict[str, Any]:
        """Move a running request to another worker while it decodes (Llumnix)."""
        return await self.migrations.live_migrate(request_id, dst)

    async def drain(self, worker_id: str) -> dict[str, Any]:
        """Stop placing work on ``worker_id`` and live-migrate what runs there."""
        slot = self.slots[worker_id]
        if not slot.alive:
            raise ValueError(f"worker {worker_id!r} is {slot.state}")
        others = (s for s in self.slots.values() if s is not slot)
        if slot.state == "alive" and not any(s.state == "alive" for s in others):
            raise ValueError(
                f"worker {worker_id!r} is the last one taking work: draining it would leave"
                " nothing to serve requests; activate another worker first"
            )
        slot.state = "draining"
        moved, failed = 0, 0
        for request_id in list(slot.requests):
            result = await self.migrations.live_migrate(request_id, None, kind="drain")
            if result.get("migrated"):
                moved += 1
            elif result.get("error"):
                failed += 1
        if slot.state == "draining":
            slot.state = "drained"
        return {"worker_id": worker_id, "state": slot.state, "migrated": moved, "failed": failed}

    def activate(self, worker_id: str) -> dict[str, Any]:
        slot = self.slots[worker_id]
        if slot.state in ("draining", "drained"):
            slot.state = "alive"
        return {"worker_id": worker_id, "state": slot.state}

    def describe_workers(self) -> list[dict[str, Any]]:
        releasable_of = getattr(self.policy, "releasable_workers", None)
        idle = set(releasable_of()) if releasable_of is not None else set()
        out = []
        for slot in self.slots.values():
            load = slot.load
            info = slot.info
            out.append(
                {
                    "id": slot.worker_id,
                    "object": "cluster.worker",
                    "pid": info.pid if info else None,
                    "state": slot.state,
                    "releasable": slot.state == "drained"
                    or (slot.worker_id in idle and not slot.requests),
                    "failures": slot.failures,
                    "load": {
                        "running": load.num_running if load else 0,
                        "waiting": load.num_waiting if load else 0,
                        "waiting_tokens": load.num_waiting_tokens if load else 0,
                        "in_flight": len(slot.requests),
                    },
                    "tiers": {
                        "device": {
                            "blocks_total": load.device_blocks_total if load else None,
                            "blocks_used": load.device_blocks_used if load else None,
                            "blocks_pinned": load.device_blocks_pinned if load else None,
                        },
                        "host": {
                            "blocks_total": load.host_blocks_total if load else None,
                            "blocks_used": load.host_blocks_used if load else None,
                        },
                        "disk": {
                            "blocks_used": load.disk_blocks_used if load else None,
                            "capacity_bytes": info.disk_capacity_bytes if info else None,
                        },
                    },
                    "cached_blocks_indexed": {
                        t: len(self.index.keys(slot.worker_id, tier)) for t, tier in _TIERS.items()
                    },
                }
            )
        return out


_TIERS = {"device": Tier.DEVICE, "host": Tier.HOST, "disk": Tier.DISK}
