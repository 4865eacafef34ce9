"""Installing another engine's exported KV as cached prefix blocks (torch-free bookkeeping).

An import is verified before anything becomes visible:

1. ``begin`` checks the layout (model fingerprint, block size, dtype, geometry) and the key
   chain: each block's key must be the chained hash of its parent key and its token ids,
   starting from this engine's seed for the export's cache salt. The chain is cut at the first
   block that fails. Blocks already cached on the device are reused; the rest get fresh device
   blocks (held by the import, not yet findable) while free space above the admission reserve
   lasts, then empty host slots; past that the chain is cut too, since a prefix cache cannot
   use a block whose predecessor is missing. Free space excludes blocks pinned to be needed
   sooner than the import's own grace (priority by expected use, as in SYMPHONY): an import
   evicts only unpinned cached KV and KV pinned for later, never a running request's.
2. ``accept_chunk`` verifies each layer chunk's checksum; a mismatch is counted and cuts the
   chain at the chunk's first block (its blocks are never installed). The caller writes the
   accepted chunk's bytes into the returned device blocks.
3. ``commit`` registers the surviving blocks in the content index — only once every layer of
   them has been written — and pins them for a grace period so the turn they were moved for
   finds them. ``abort`` releases everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cadenza.core.block_pool import BlockPool, KVBlock
from cadenza.core.hashing import hash_block, hash_seed
from cadenza.core.tiering import HostEntry, TierManager
from cadenza.kvstore.kv_export import GROUP_BLOCKS, ExportedBlock, KVLayout, LayerChunk


class ImportRejected(ValueError):
    """The export cannot be imported here at all (another model, block size or geometry)."""


@dataclass
class ImportPlan:
    layout: KVLayout
    blocks: list[ExportedBlock]  # the verified chain, possibly cut short later
    targets: dict[int, KVBlock]  # index in ``blocks`` -> fresh device block to write
    reused: int  # leading blocks already cached on this device
    host_targets: dict[int, int] = field(default_factory=dict)  # index -> empty host slot
    rejected_blocks: int = 0
    rejected_chunks: int = 0
    held: list[KVBlock] = field(default_factory=list)  # cached chain blocks kept meanwhile
    released_slots: list[int] = field(default_factory=list)  # host slots to give back
    layers_written: set[int] = field(default_factory=set)

    def cut(self, at: int, pool: BlockPool) -> None:
        """Keep only blocks ``[0, at)``; release the device blocks allocated past it."""
        if at >= len(self.blocks):
            return
        self.rejected_blocks += len(self.blocks) - at
        dropped = [b for i, b in self.targets.items() if i >= at]
        self.targets = {i: b for i, b in self.targets.items() if i < at}
        pool.free(dropped, accessed=False)
        self.released_slots += [s for i, s in self.host_targets.items() if i >= at]
        self.host_targets = {i: s for i, s in self.host_targets.items() if i < at}
        self.blocks = self.blocks[:at]


class KVImporter:
    def __init__(
        self,
        pool: BlockPool,
        tiers: TierManager,
        layout: KVLayout,
        *,
        reserve_blocks: int,
        clock: Callable[[], float],
        pin_s: float,
    ) -> None:
        self.pool = pool
        self.tiers = tiers
        self.layout = layout  # this engine's (the fingerprint and salt are checked per export)
        self.reserve_blocks = reserve_blocks
        self.clock = clock
        self.pin_s = pin_s
        self.rejected_chunks = 0
        self.rejected_blocks = 0

    def begin(self, layout: KVLayout, blocks: list[ExportedBlock]) -> ImportPlan:
        mine = self.layout
        for name in ("fingerprint", "block_size", "dtype", "num_layers", "num_kv_heads"):
            if getattr(layout, name) != getattr(mine, name):
                raise ImportRejected(
                    f"the export's {name} is {getattr(layout, name)!r} but this engine's is "
                    f"{getattr(mine, name)!r}"
                )
        if layout.head_dim != mine.head_dim:
            raise ImportRejected("the export's head_dim does not match this engine's")
        chain = self._verified_chain(layout, blocks)
        plan = ImportPlan(layout, chain, {}, 0, rejected_blocks=len(blocks) - len(chain))
        cached = [self.pool.lookup(b.key, b.parent, b.token_ids) for b in chain]
        # Hold the chain's cached blocks: allocating fresh ones below may evict cached blocks.
        plan.held = [b for b in cached if b is not None]
        self.pool.touch(plan.held)
        room = self.pool.num_free_blocks - self.reserve_blocks - self._outranking_pins()
        host = self.tiers.host
        for i, block in enumerate(cached):
            if block is not None:
                plan.reused += plan.reused == i
                continue
            meta = chain[i]
            if host is not None and host.lookup(meta.key, meta.parent, meta.token_ids):
                continue  # already on this engine's host tier: a fetch brings it up
            if len(plan.targets) < room:
                plan.targets[i] = None  # type: ignore[assignment]  # allocated below
                continue
            # The device is full: the host tier takes the rest, in empty slots only.
            slot = host.take_free(1) if host is not None else []
            if not slot:
                plan.cut(i, self.pool)
                break
            plan.host_targets[i] = slot[0]
        wanted = sorted(plan.targets)
        fresh = self.pool.allocate(len(wanted)) if wanted else []
        plan.targets = dict(zip(wanted, fresh, strict=True))
        self.rejected_blocks += plan.rejected_blocks
        return plan

    def _outranking_pins(self) -> int:
        """Free device blocks pinned to be needed no later than this import's KV would be
        (a hinted turn or a tool call's return due within ``pin_s``): the import leaves them
        alone and takes room only from empty blocks, unpinned cached ones and those pinned
        for later, which the eviction order gives up first (furthest pin first). Blocks of a
        running request are never free, so an import never takes them."""
        now = self.clock()
        return self.pool.num_free_pinned(now, now + self.pin_s)

    def _verified_chain(self, layout: KVLayout, blocks: list[ExportedBlock]) -> list[ExportedBlock]:
        parent = hash_seed(layout.fingerprint, layout.cache_salt)
        chain: list[ExportedBlock] = []
        for i, block in enumerate(blocks):
            ok = (
                len(block.token_ids) == layout.block_size
                and block.parent == parent
                and block.position == i * layout.block_size
                and hash_block(parent, block.token_ids) == block.key
            )
            if not ok:
                break
            chain.append(block)
            parent = block.key
        return chain

    def accept_chunk(
        self, plan: ImportPlan, chunk: LayerChunk
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Verify one chunk; returns the ``(index in chunk, device block id)`` and
        ``(index in chunk, host slot)`` pairs to write (empty when the chunk is rejected or
        covers no block that needs writing)."""
        start = chunk.group * GROUP_BLOCKS
        if start >= len(plan.blocks):
            return [], []
        expected = min(GROUP_BLOCKS, len(plan.blocks) - start) * self.layout.block_layer_bytes
        if not chunk.verify() or len(chunk.k) < expected or len(chunk.v) < expected:
            plan.rejected_chunks += 1
            self.rejected_chunks += 1
            before = plan.rejected_blocks
            plan.cut(start, self.pool)
            self.rejected_blocks += plan.rejected_blocks - before
            return [], []
        span = range(start, min(start + GROUP_BLOCKS, len(plan.blocks)))
        device = [(i - start, plan.targets[i].block_id) for i in span if i in plan.targets]
        host = [(i - start, plan.host_targets[i]) for i in span if i in plan.host_targets]
        return device, host

    def layer_done(self, plan: ImportPlan, layer: int) -> None:
        plan.layers_written.add(layer)

    def commit(self, plan: ImportPlan) -> tuple[list[KVBlock], int]:
        """Make the written blocks findable (every layer must be in; host slots already
        checksummed by the caller), pin the device ones, let go. Returns the installed device
        blocks and the number of host entries."""
        missing = set(range(self.layout.num_layers)) - plan.layers_written
        if missing and (plan.targets or plan.host_targets):
            self.abort(plan)
            raise ValueError(f"import incomplete: layers {sorted(missing)} were never written")
        installed: list[KVBlock] = []
        for i, block in sorted(plan.targets.items()):
            meta = plan.blocks[i]
            if self.pool.register(block, meta.key, meta.parent, meta.token_ids, meta.position):
                block.num_tokens = len(meta.token_ids)
                installed.append(block)
        self.pool.free(list(plan.targets.values()))
        self.pool.free(plan.held)
        self.tiers.pin(installed + plan.held, self.clock() + self.pin_s)
        on_host = 0
        host = self.tiers.host
        now = self.clock()
        for i, slot in sorted(plan.host_targets.items()):
            meta = plan.blocks[i]
            assert host is not None
            entry = HostEntry(
                meta.key, meta.parent, meta.token_ids, slot, meta.position, len(meta.token_ids), now
            )
            if host.add(entry):
                on_host += 1
            else:
                host.release(slot)
        self._release_slots(plan)
        plan.targets, plan.held, plan.host_targets = {}, [], {}
        return installed, on_host

    def abort(self, plan: ImportPlan) -> None:
        self.pool.free(list(plan.targets.values()), accessed=False)
        self.pool.free(plan.held, accessed=False)
        plan.released_slots += list(plan.host_targets.values())
        self._release_slots(plan)
        plan.targets, plan.held, plan.host_targets = {}, [], {}

    def _release_slots(self, plan: ImportPlan) -> None:
        host = self.tiers.host
        for slot in plan.released_slots:
            assert host is not None
            host.release(slot)
        plan.released_slots = []
