"""A simulated disk tier: which block keys are on disk, bounded, least recently used out.

It holds no bytes (the simulator moves none); it implements the engine's ``DiskJournal``
protocol, so the tier manager reports its changes as KV events exactly as for the real
``DiskTier`` and the router's index sees disk hits.
"""

from __future__ import annotations

from collections import OrderedDict


class SimDisk:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks <= 0:
            raise ValueError("a disk tier needs room for at least one block")
        self.capacity = capacity_blocks
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._changes: list[tuple[bytes, bool]] | None = None
        self.evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[bytes]:
        return list(self._keys)

    def track_changes(self) -> None:
        self._changes = []

    def drain_changes(self) -> list[tuple[bytes, bool]]:
        if self._changes is None:
            return []
        changes, self._changes = self._changes, []
        return changes

    def put(self, key: bytes) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        while len(self._keys) >= self.capacity:
            old, _ = self._keys.popitem(last=False)
            self.evictions += 1
            self._note(old, False)
        self._keys[key] = None
        self._note(key, True)
        return True

    def read(self, key: bytes) -> bool:
        """Whether the block is still there (a read refreshes it)."""
        if key not in self._keys:
            return False
        self._keys.move_to_end(key)
        return True

    def _note(self, key: bytes, present: bool) -> None:
        if self._changes is not None:
            self._changes.append((key, present))
