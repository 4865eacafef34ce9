"""KV events: what a worker tells a cluster router about the blocks it holds, tier by tier.

A KV-aware router keeps, per worker, the set of block keys held on each tier (device, host,
disk), and it must be able to keep that index *exact* from the events alone. So the tiers report
every change of membership, in order, into one ``KVEventLog`` (the block pool owns it; the tier
manager writes host and disk events into the same log):

* ``BlockStored(keys, tier)`` — the keys are now held on ``tier``;
* ``BlockRemoved(keys, tier)`` — the keys are no longer held on ``tier``;
* ``AllCleared(tier)`` — nothing is held on ``tier`` any more (e.g. a prefix-cache reset), or,
  followed by a ``BlockStored``, a full resync of the tier (a restarted worker's disk).

Events are idempotent set operations (storing a key already held, or removing one not held,
changes nothing), so only the order of events *within a tier* matters, and ``apply_events`` is
all a router needs. Events are frozen and picklable, so they can travel between processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

from cadenza.core.transfer import Tier


@dataclass(frozen=True)
class BlockStored:
    keys: tuple[bytes, ...]
    tier: Tier


@dataclass(frozen=True)
class BlockRemoved:
    keys: tuple[bytes, ...]
    tier: Tier


@dataclass(frozen=True)
class AllCleared:
    tier: Tier


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllCleared

_STORED, _REMOVED, _CLEARED = "stored", "removed", "cleared"


class KVEventLog:
    """Events not yet drained, in emission order.

    Consecutive events of the same kind on the same tier are coalesced as they are emitted
    (their keys concatenated), which keeps the log small when a step stores or evicts many
    blocks; coalescing never reorders anything, so the drained stream rebuilds the same sets.
    Used from the engine thread only; changes made on other threads (the disk tier's own
    evictions on the swap thread) are pulled in by the hooks registered with
    ``add_drain_hook``, which run at the start of every ``drain``.
    """

    def __init__(self) -> None:
        # (kind, tier, keys); the key lists are extended in place while coalescing.
        self._pending: list[tuple[str, Tier, list[bytes]]] = []
        self._drain_hooks: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def emit_stored(self, keys: Iterable[bytes], tier: Tier) -> None:
        self._emit(_STORED, tier, keys)

    def emit_removed(self, keys: Iterable[bytes], tier: Tier) -> None:
        self._emit(_REMOVED, tier, keys)

    def emit_cleared(self, tier: Tier) -> None:
        last = self._pending[-1] if self._pending else None
        if last is None or last[0] != _CLEARED or last[1] != tier:
            self._pending.append((_CLEARED, tier, []))

    def add_drain_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` at the start of every ``drain`` (it may emit events)."""
        self._drain_hooks.append(hook)

    def drain(self) -> list[KVEvent]:
        """Every event emitted since the last drain, oldest first; the log is left empty."""
        for hook in self._drain_hooks:
            hook()
        pending, self._pending = self._pending, []
        out: list[KVEvent] = []
        for kind, tier, keys in pending:
            if kind == _STORED:
                out.append(BlockStored(tuple(keys), tier))
            elif kind == _REMOVED:
                out.append(BlockRemoved(tuple(keys), tier))
            else:
                out.append(AllCleared(tier))
        return out

    def _emit(self, kind: str, tier: Tier, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        if not keys:
            return
        last = self._pending[-1] if self._pending else None
        if last is not None and last[0] == kind and last[1] == tier:
            last[2].extend(keys)
        else:
            self._pending.append((kind, tier, keys))


def apply_events(index: dict[Tier, set[bytes]], events: Iterable[KVEvent]) -> None:
    """Apply events, in order, to a router's per-tier key sets (missing tiers are created)."""
    for event in events:
        keys = index.setdefault(event.tier, set())
        if isinstance(event, BlockStored):
            keys.update(event.keys)
        elif isinstance(event, BlockRemoved):
            keys.difference_update(event.keys)
        else:
            keys.clear()
