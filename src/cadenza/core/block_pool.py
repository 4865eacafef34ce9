"""A fixed pool of KV blocks with reference counts, a content index and lazy eviction.

A block whose last reference is dropped keeps its content key and stays findable until the
space is needed again: ``allocate`` hands out empty blocks first and only then evicts cached
ones, in the order the eviction policy ranks them (LRU, or Pensieve's cost-aware value).
Eviction is lazy: a cached block is forgotten only at the moment it is reallocated.

Every change to the content index is reported to ``events`` (a ``KVEventLog``) as a device
event: a key entering the index is stored, a key leaving it (reallocation, ``drop``,
``unregister``) is removed, and ``reset_index`` clears the tier. A router rebuilds exactly
``cached_keys()`` from those events.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cadenza.core.eviction import EvictionPolicy, LRUEviction
from cadenza.core.eviction_index import EvictionIndex, supports
from cadenza.core.hashing import BlockHash
from cadenza.core.kv_events import KVEventLog
from cadenza.core.transfer import Tier


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and registered in the content index.
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None
    # Retention bookkeeping: where the block sits in its sequence, when a request last let go
    # of it, and until when a retention TTL pins it.
    position: int = 0
    num_tokens: int = 0
    last_access: float = 0.0
    pin_until: float = 0.0


class FreeQueueListener(Protocol):
    """Told of every change to the pool's queue of unreferenced cached blocks (the tier
    manager keeps its copy-out candidates from it)."""

    def cached_free_added(self, blocks: list[KVBlock], seqs: Sequence[int]) -> None: ...

    def cached_free_removed(self, blocks: list[KVBlock]) -> None: ...

    def cached_free_updated(self, block: KVBlock) -> None: ...


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        policy: EvictionPolicy | None = None,
        *,
        clock: Callable[[], float],
    ) -> None:
        if num_blocks <= 0:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.clock = clock
        self.policy = policy or LRUEviction(clock)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._empty: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # Unreferenced blocks that still hold findable content, least recently freed first.
        self._cached_free: OrderedDict[int, KVBlock] = OrderedDict()
        # An index that ranks them for eviction without a scan (None for a policy it cannot
        # rank), told each block's place in the queue (increasing numbers), and listeners.
        self._next_seq = 0
        self.free_index: EvictionIndex[KVBlock] | None = (
            EvictionIndex(self.policy) if supports(self.policy) else None
        )
        self.free_listeners: list[FreeQueueListener] = []
        self._index: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0
        # Device events here; the tier manager adds host and disk events to the same log.
        self.events = KVEventLog()
        # Called with the cached blocks about to be reallocated, while their content is still
        # intact (the tier manager copies out any that have no lower copy), then with each
        # block just before its content is forgotten.
        self.before_evict: Callable[[list[KVBlock]], None] | None = None
        self.on_evict: Callable[[KVBlock], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._cached_free)

    @property
    def num_empty_blocks(self) -> int:
        return len(self._empty)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._index)

    def cached_keys(self) -> list[BlockHash]:
        """Every key in the content index (the device tier's holdings, as events report it)."""
        return list(self._index)

    def cached_free_blocks(self) -> list[KVBlock]:
        """Unreferenced cached blocks, least recently freed first."""
        return list(self._cached_free.values())

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._cached_free)

    def is_cached_free(self, block: KVBlock) -> bool:
        return block.block_id in self._cached_free

    def free_seq(self, block: KVBlock) -> int:
        """A cached free block's place in the free queue (later blocks have larger numbers);
        kept only with an eviction index."""
        assert self.free_index is not None
        return self.free_index.seq_of(block)

    def num_free_pinned(self, now: float, until: float) -> int:
        """Unreferenced cached blocks pinned at ``now`` until no later than ``until``."""
        if self.free_index is not None:
            return self.free_index.count_pinned(now, until)
        return sum(1 for b in self._cached_free.values() if now < b.pin_until <= until)

    def set_pin_until(self, block: KVBlock, until: float) -> None:
        """Set a block's retention pin (the eviction ranking of a cached free block changes)."""
        block.pin_until = until
        if block.block_id in self._cached_free:
            if self.free_index is not None:
                self.free_index.update(block)
            for listener in self.free_listeners:
                listener.cached_free_updated(block)

    def _entered_free(self, blocks: list[KVBlock]) -> None:
        """``blocks`` were just appended to the cached free queue, in this order."""
        if not blocks:
            return
        seqs = range(self._next_seq, self._next_seq + len(blocks))
        self._next_seq += len(blocks)
        if self.free_index is not None:
            self.free_index.add_many(blocks, seqs)
        for listener in self.free_listeners:
            listener.cached_free_added(blocks, seqs)

    def _left_free(self, blocks: list[KVBlock]) -> None:
        """``blocks`` were just taken out of the cached free queue."""
        if not blocks:
            return
        if self.free_index is not None:
            self.free_index.remove_many(blocks)
        for listener in self.free_listeners:
            listener.cached_free_removed(blocks)

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def lookup(
        self, block_hash: BlockHash, parent_hash: BlockHash, token_ids: Sequence[int]
    ) -> KVBlock | None:
        """The cached block for this key, only if its stored parent and tokens match exactly."""
        block = self._index.get(block_hash)
        if block is None or block.parent_hash != parent_hash or block.token_ids != tuple(token_ids):
            return None
        return block

    def get(self, block_hash: BlockHash) -> KVBlock | None:
        return self._index.get(block_hash)

    def cached_free_holding(self, keys: Iterable[BlockHash]) -> list[KVBlock]:
        """The unreferenced cached blocks (in the free queue) that hold any of ``keys``."""
        get, cached_free = self._index.get, self._cached_free
        return [b for b in map(get, keys) if b is not None and b.block_id in cached_free]

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks (reviving them from the free queues if needed)."""
        left = []
        cached_free = self._cached_free
        for block in blocks:
            if block.ref_cnt == 0:
                if cached_free.pop(block.block_id, None) is not None:
                    left.append(block)
                self._empty.pop(block.block_id, None)
            block.ref_cnt += 1
        self._left_free(left)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Fresh blocks: empty ones first, then cached ones in eviction order; check
        ``can_allocate`` first."""
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        out = []
        while self._empty and len(out) < num_blocks:
            out.append(self._empty.popitem(last=False)[1])
        if len(out) < num_blocks:
            n = num_blocks - len(out)
            victims = self.free_index.choose(n) if self.free_index is not None else None
            if victims is None:
                victims = self.policy.choose(self._cached_free.values(), n)
            if self.before_evict is not None:
                self.before_evict(victims)
            for block in victims:
                del self._cached_free[block.block_id]
                self._evict(block)
                out.append(block)
            self._left_free(victims)
        for block in out:
            block.ref_cnt = 1
            block.pin_until = 0.0
        return out

    def free(self, blocks: Iterable[KVBlock], *, accessed: bool = True) -> None:
        """Drop one reference each; blocks reaching zero join the free queues in the given order
        (callers pass a request's blocks tail first, so under LRU its tail goes before its
        prefix). ``accessed=False`` (a copy job letting go) leaves the last-access time alone."""
        now = self.clock()
        entered: list[KVBlock] = []
        cached_free = self._cached_free
        try:
            for block in blocks:
                block.ref_cnt -= 1
                if block.ref_cnt < 0:
                    raise RuntimeError(f"block {block.block_id} freed more often than referenced")
                if accessed:
                    block.last_access = now
                if block.ref_cnt == 0:
                    if block.block_hash is None:
                        self._empty[block.block_id] = block
                    else:
                        cached_free[block.block_id] = block
                        entered.append(block)
        finally:
            self._entered_free(entered)

    def register(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        parent_hash: BlockHash,
        token_ids: Sequence[int],
        position: int = 0,
    ) -> bool:
        """Make a full block findable by content; a key already indexed keeps its first block.
        Returns whether the block was registered."""
        if block.block_hash is not None or block_hash in self._index:
            return False
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = tuple(token_ids)
        block.position = position
        block.num_tokens = len(block.token_ids)
        block.last_access = self.clock()
        self._index[block_hash] = block
        self.events.emit_stored((block_hash,), Tier.DEVICE)
        if block.ref_cnt == 0:
            self._empty.pop(block.block_id, None)
            self._cached_free[block.block_id] = block
            self._entered_free([block])
        return True

    def drop(self, block: KVBlock) -> None:
        """Forget an unreferenced cached block now (for example: it failed verification)."""
        if block.ref_cnt == 0 and block.block_id in self._cached_free:
            del self._cached_free[block.block_id]
            self._left_free([block])
            self._evict(block)
            self._empty[block.block_id] = block

    def unregister(self, block: KVBlock) -> None:
        """Forget a referenced block's key (its owner is about to change its content)."""
        if block.ref_cnt > 0:
            self._evict(block)

    def reset_index(self) -> bool:
        """Forget every cached key; refused (False) while any block is still referenced."""
        if self.num_free_blocks != self.num_blocks:
            return False
        cleared = list(self._cached_free.values())
        self._cached_free.clear()
        self._left_free(cleared)
        for block in cleared:
            self._evict(block, emit=False)
            self._empty[block.block_id] = block
        self.events.emit_cleared(Tier.DEVICE)
        return True

    def _evict(self, block: KVBlock, *, emit: bool = True) -> None:
        if block.block_hash is None:
            return
        if self._index.get(block.block_hash) is block:
            if self.on_evict is not None:
                self.on_evict(block)
            del self._index[block.block_hash]
            self.num_evictions += 1
            if emit:
                self.events.emit_removed((block.block_hash,), Tier.DEVICE)
        block.block_hash = block.parent_hash = block.token_ids = None
        block.pin_until = 0.0
