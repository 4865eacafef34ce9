"""The cluster glue of the simulator: placement, KV migration and hint bookkeeping.

Thin on purpose: every decision is the real placement policy's (``cluster.placement``), over
the real ``KVIndex`` fed by each simulated worker's KV events and ``WorkerView``s built from
each core's ``load()``. What this module adds is only what a simulator must model instead of
doing:

* a **migration** (a placement's ``migrate_from``, or a hint's placement that names one) moves
  the leading blocks the source holds of the session's history: ``network latency +
  (blocks the destination lacks) x block bytes / network bandwidth``, plus reading the blocks
  the source holds only on disk at its disk bandwidth; transfers queue first-in first-out on
  the source's and the destination's network interface. When it lands, the destination
  installs the blocks through the real ``KVImporter``. A turn placed with a migration is
  submitted when the migration lands; a hint's migration runs in the background, and the
  destination then pulls anything the import left on host towards the device (``hint``);
* a **hint** without a migration goes to the placement's worker as the engine's ``hint``
  (prefetch to device and pin until the expected arrival). A policy without hint handling
  (``on_hint`` returns None) ignores hints, as a cluster without advisory requests would.

The real router (``cluster/router.py``) owns the same decisions; both are meant to end up
calling one shared core.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from cadenza.cluster.kv_index import KVIndex
from cadenza.cluster.placement import CostParams, Placement, PlacementPolicy, Turn, make_policy
from cadenza.core.hashing import BlockHash
from cadenza.kvstore.kv_export import ExportedBlock
from cadenza.sim.clock import EventQueue
from cadenza.sim.hardware import Links
from cadenza.sim.metrics import MigrationRecord
from cadenza.sim.worker import SimWorker

Submit = Callable[[SimWorker, Placement], None]


class SimRouter:
    def __init__(
        self,
        workers: Sequence[SimWorker],
        policy: str,
        costs: CostParams,
        links: Links,
        events: EventQueue,
        *,
        on_worker_change: Callable[[SimWorker], None],
    ) -> None:
        self.workers = list(workers)
        self.by_id = {w.worker_id: w for w in self.workers}
        self.index = KVIndex()
        self.policy: PlacementPolicy = make_policy(policy, self.index, costs)
        self.links = links
        self.events = events
        self.on_worker_change = on_worker_change
        self.block_bytes = costs.block_bytes
        self._nic_free: dict[str, float] = {}
        self.placements: Counter[str] = Counter()
        self.migrations: list[MigrationRecord] = []
        self.hints: Counter[str] = Counter()

    # ------------------------------------------------------------------ what policies see
    def refresh(self) -> None:
        """Bring the index up to date with every worker's KV events."""
        for worker in self.workers:
            self.index.apply(worker.worker_id, worker.core.drain_events())

    def _turn(self, session_id: str, tokens: Sequence[int], keys: Sequence[BlockHash]) -> Turn:
        size = self.workers[0].spec.block_size
        return Turn(session_id, tuple(keys[: len(tokens) // size]), len(tokens), size)

    # ------------------------------------------------------------------ turns and hints
    def route(
        self,
        session_id: str,
        tokens: Sequence[int],
        keys: Sequence[BlockHash],
        submit: Submit,
    ) -> None:
        """Route a turn where the policy places it; ``submit`` is called with the worker once
        it can run there (now, or when the KV migration the placement asked for has landed)."""
        self.refresh()
        views = [w.view() for w in self.workers]
        placement = self.policy.place(self._turn(session_id, tokens, keys), views)
        self.placements[placement.reason] += 1
        dst = self.by_id[placement.worker_id]
        move = None
        if placement.migrate_from is not None:
            move = self._migrate(placement.migrate_from, dst, session_id, tokens, keys, "placement")
        if move is None:
            submit(dst, placement)
            return

        def landed() -> None:
            self._land(move, dst)
            submit(dst, placement)

        self.events.at(move.done_s, landed)

    def hint(
        self,
        session_id: str,
        history: Sequence[int],
        keys: Sequence[BlockHash],
        lead_s: float,
    ) -> None:
        """An advisory request: the session's next turn (over ``history``) comes in about
        ``lead_s`` seconds."""
        self.refresh()
        views = [w.view() for w in self.workers]
        placement = self.policy.on_hint(self._turn(session_id, history, keys), views)
        if placement is None:
            self.hints["ignored"] += 1
            return
        self.hints[placement.reason] += 1
        dst = self.by_id[placement.worker_id]
        move = None
        if placement.migrate_from is not None:
            move = self._migrate(placement.migrate_from, dst, session_id, history, keys, "hint")
        if move is None:
            dst.core.hint(session_id, history, expected_arrival_s=lead_s)
            self.on_worker_change(dst)
            return
        arrival = self.events.now + lead_s

        def landed() -> None:
            self._land(move, dst)
            remaining = max(arrival - self.events.now, 0.0)
            dst.core.hint(session_id, history, expected_arrival_s=remaining)
            self.on_worker_change(dst)

        self.events.at(move.done_s, landed)

    def forget(self, session_id: str) -> None:
        self.policy.forget_session(session_id)

    # ------------------------------------------------------------------ migrations
    def migration_seconds(self, num_blocks: int, disk_blocks: int) -> float:
        """Network time of ``num_blocks`` blocks, plus reading ``disk_blocks`` of them from the
        source's disk first."""
        links = self.links
        seconds = links.network_latency_s + num_blocks * self.block_bytes / links.network
        return seconds + disk_blocks * self.block_bytes / links.disk_read

    def _migrate(
        self,
        src_id: str,
        dst: SimWorker,
        session_id: str,
        history: Sequence[int],
        keys: Sequence[BlockHash],
        trigger: str,
    ) -> _Move | None:
        src = self.by_id[src_id]
        run = src.held_run(history, keys)
        have = self.index.prefix_hits(dst.worker_id, keys).blocks
        send = len(run.blocks) - have
        if send <= 0:
            return None
        now = self.events.now
        start = max(now, self._nic_free.get(src_id, 0.0), self._nic_free.get(dst.worker_id, 0.0))
        done = start + self.migration_seconds(send, min(run.on_disk, send))
        self._nic_free[src_id] = self._nic_free[dst.worker_id] = done
        record = MigrationRecord(
            session_id, src_id, dst.worker_id, trigger, send, send * self.block_bytes, now, done
        )
        self.migrations.append(record)
        return _Move(record, run.blocks)

    def _land(self, move: _Move, dst: SimWorker) -> None:
        dst.clock.sync(self.events.now)
        dst.install(move.blocks)
        self.on_worker_change(dst)


class _Move:
    """A migration in flight: its record and the blocks the destination installs."""

    def __init__(self, record: MigrationRecord, blocks: list[ExportedBlock]) -> None:
        self.record = record
        self.blocks = blocks

    @property
    def done_s(self) -> float:
        return self.record.done_s
