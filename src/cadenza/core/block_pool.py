"""A fixed pool of KV blocks with reference counts, a content index and lazy LRU eviction.

A block whose last reference is dropped keeps its content key and stays findable until the
space is needed again: it sits in the free queue (least recently freed first) and is evicted
from the index only when ``allocate`` hands it out again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cadenza.core.hashing import BlockHash


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    # Set once the block is full and registered in the content index.
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._index: dict[BlockHash, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._index)

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

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cached blocks (reviving them from the free queue if needed)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Fresh blocks from the LRU end of the free queue; check ``can_allocate`` first."""
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue in the given order
        (callers pass a request's blocks tail first, so its tail is evicted before its prefix)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than referenced")
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def register(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        parent_hash: BlockHash,
        token_ids: Sequence[int],
    ) -> None:
        """Make a full block findable by content; a key already indexed keeps its first block."""
        if block.block_hash is not None or block_hash in self._index:
            return
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = tuple(token_ids)
        self._index[block_hash] = block

    def reset_index(self) -> bool:
        """Forget every cached key; refused (False) while any block is still referenced."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            self._evict(block)
        return True

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self._index.get(block.block_hash) is block:
            del self._index[block.block_hash]
            self.num_evictions += 1
        block.block_hash = block.parent_hash = block.token_ids = None
