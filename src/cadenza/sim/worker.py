"""One simulated worker: the real ``EngineCore`` (scheduler, block pool, tiers, sessions, hints,
retention) over a cost-model executor, virtual copy links and a simulated disk, on its own
virtual clock.

Besides stepping, a worker answers what the cluster glue asks of a real worker: its load (the
core's ``load()``, as a ``WorkerView``), which leading blocks of a token history it holds (what
an export would carry), and installing blocks that another worker sent — through the real
``KVImporter`` (begin, every layer written, commit), with no bytes: the pool, the index and the
KV events end up exactly as after a real import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cadenza.cluster.placement import WorkerView
from cadenza.config import EngineConfig
from cadenza.core.engine_core import HINT_GRACE_S, EngineCore
from cadenza.core.eviction import CostModel
from cadenza.core.hashing import BlockHash, hash_seed
from cadenza.core.kv_import import KVImporter
from cadenza.core.transfer import Tier
from cadenza.kvstore.kv_export import ExportedBlock, KVLayout
from cadenza.sim.clock import WorkerClock
from cadenza.sim.cost_executor import CostModelExecutor
from cadenza.sim.hardware import Links
from cadenza.sim.model_shapes import ModelShape
from cadenza.sim.sim_disk import SimDisk
from cadenza.sim.step_cost import StepCost
from cadenza.sim.virtual_transfers import VirtualTransfers

EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class WorkerSpec:
    """What every simulated worker of a run is built from."""

    config: EngineConfig  # cache.num_blocks set: the device pool
    model: ModelShape
    host_slots: int
    disk_blocks: int
    links: Links
    fingerprint: str
    max_model_len: int
    seed: int

    @property
    def block_size(self) -> int:
        return self.config.cache.block_size

    @property
    def block_bytes(self) -> int:
        return self.model.block_bytes(self.block_size)

    @property
    def num_blocks(self) -> int:
        assert self.config.cache.num_blocks is not None
        return self.config.cache.num_blocks


@dataclass(frozen=True)
class HeldRun:
    """The leading blocks of a history a worker holds, as an export would list them."""

    blocks: list[ExportedBlock]
    on_disk: int


class SimWorker:
    def __init__(
        self,
        worker_id: str,
        spec: WorkerSpec,
        cost: StepCost,
        eviction_cost: CostModel | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.spec = spec
        self.clock = WorkerClock()
        self.disk = SimDisk(spec.disk_blocks) if spec.disk_blocks > 0 else None
        self.transfers = VirtualTransfers(self.clock, spec.links, spec.block_bytes, self.disk)
        self.executor = CostModelExecutor(
            cost,
            num_blocks=spec.num_blocks,
            block_bytes=spec.block_bytes,
            clock=self.clock,
            seed=spec.seed,
            vocab_size=spec.model.vocab_size,
        )
        self.core = EngineCore(
            spec.config,
            self.executor,
            clock=self.clock,
            fingerprint=spec.fingerprint,
            vocab_size=spec.model.vocab_size,
            eos_token_ids=(EOS_TOKEN_ID,),
            max_model_len=spec.max_model_len,
            transfer=self.transfers,
            host_slots=spec.host_slots,
            disk=self.disk,
            cost_model=eviction_cost,
        )
        model = spec.model
        self.layout = KVLayout(
            fingerprint=spec.fingerprint,
            cache_salt=None,
            block_size=spec.block_size,
            dtype="float32" if model.dtype_bytes == 4 else "bfloat16",
            num_layers=model.num_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
        )
        self.importer = KVImporter(
            self.core.scheduler.kv.pool,
            self.core.tiers,
            self.layout,
            reserve_blocks=self.core.scheduler.reserve_blocks,
            clock=self.clock,
            pin_s=HINT_GRACE_S,
        )
        # The event loop's bookkeeping: when this worker is due to step next, a token that
        # invalidates a superseded wake-up, and when that wake-up was scheduled.
        self.wake_at: float | None = None
        self.wake_token = 0
        self.wake_scheduled_at = 0.0  # when the pending wake-up was scheduled (ties order)
        # Start times of planned plain decode steps not taken yet, latest first, and when the
        # next one's wake-up would have been scheduled, one event at a time.
        self.planned: list[float] = []
        self.planned_scheduled_at = 0.0
        self.turns = 0

    def view(self) -> WorkerView:
        """The ``WorkerView`` the real router builds from ``core.load()``, read from the same
        fields without ``load()``'s scan of every block for pins (which a view does not carry
        and which would dominate a large simulation); a test checks both agree."""
        sched = self.core.scheduler
        pool = sched.kv.pool
        return WorkerView(
            worker_id=self.worker_id,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            waiting_tokens=sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting),
            free_blocks=pool.num_free_blocks,
            total_blocks=pool.num_blocks,
        )

    def view_from_load(self) -> WorkerView:
        """The view as the real router builds it, from a load snapshot."""
        load = self.core.load()
        return WorkerView(
            worker_id=self.worker_id,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            waiting_tokens=load.num_waiting_tokens,
            free_blocks=load.device_blocks_free,
            total_blocks=load.device_blocks_total,
        )

    def held_run(self, history: Sequence[int], keys: Sequence[BlockHash]) -> HeldRun:
        """The leading full blocks of ``history`` held here on any tier (none if the run has
        a dropped leading part, which a prefix cache cannot use)."""
        loc = self.core.locate_history(history, None)
        if loc.leading or not loc.num_blocks:
            return HeldRun([], 0)
        size = self.spec.block_size
        seed = hash_seed(self.spec.fingerprint, None)
        blocks = [
            ExportedBlock(
                keys[i],
                keys[i - 1] if i else seed,
                tuple(history[i * size : (i + 1) * size]),
                i * size,
            )
            for i in range(loc.num_blocks)
        ]
        return HeldRun(blocks, loc.count(Tier.DISK))

    def install(self, blocks: list[ExportedBlock]) -> int:
        """Install another worker's blocks as cached prefix blocks; returns how many are
        now held here (device or host)."""
        plan = self.importer.begin(self.layout, blocks)
        available = len(plan.blocks)  # the chain as begin cut it to what fits
        for layer in range(self.layout.num_layers):
            self.importer.layer_done(plan, layer)
        self.importer.commit(plan)
        return available

    def stats(self) -> dict[str, float | int]:
        tiers = self.core.tiers.stats
        return {
            "turns": self.turns,
            "steps": self.executor.num_steps,
            "busy_s": self.executor.busy_s,
            "sync_copy_s": self.transfers.sync_copy_s,
            "preemptions": self.core.scheduler.num_preemptions,
            "offloaded_blocks": tiers.offloaded_blocks,
            "persisted_blocks": tiers.persisted_blocks,
            "fetched_blocks": sum(tiers.fetched_blocks.values()),
            "dropped_blocks": tiers.dropped_blocks,
        }
