"""The router's view of where KV lives: per worker, the block keys it holds on each tier.

Fed only by the workers' KV events (``core/kv_events.py``; the first drain of a worker starts
with a snapshot), so it is exact up to the last drain and never guesses. A worker that dies is
forgotten (its KV is gone with it); one that rejoins announces its disk tier again.

Torch-free and Ray-free: the simulator keeps the same index for its simulated workers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cadenza.core.hashing import BlockHash, extend_block_hashes, hash_seed
from cadenza.core.kv_events import KVEvent, apply_events
from cadenza.core.transfer import Tier


@dataclass(frozen=True)
class PrefixHits:
    """How much of a sequence's leading blocks a worker holds, by the fastest tier holding
    each block (the run stops at the first block held nowhere)."""

    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def blocks(self) -> int:
        return self.device + self.host + self.disk

    def by_tier(self) -> dict[str, int]:
        return {"device": self.device, "host": self.host, "disk": self.disk}


class KVIndex:
    def __init__(self) -> None:
        self._tiers: dict[str, dict[Tier, set[BlockHash]]] = {}

    def apply(self, worker_id: str, events: Iterable[KVEvent]) -> None:
        apply_events(self._tiers.setdefault(worker_id, {}), events)

    def forget(self, worker_id: str) -> None:
        """The worker is gone (dead or removed): nothing it held can be used."""
        self._tiers.pop(worker_id, None)

    def workers(self) -> list[str]:
        return list(self._tiers)

    def keys(self, worker_id: str, tier: Tier) -> set[BlockHash]:
        return set(self._tiers.get(worker_id, {}).get(tier, ()))

    def prefix_hits(self, worker_id: str, block_keys: Sequence[BlockHash]) -> PrefixHits:
        tiers = self._tiers.get(worker_id)
        if not tiers:
            return PrefixHits()
        device = tiers.get(Tier.DEVICE, set())
        host = tiers.get(Tier.HOST, set())
        disk = tiers.get(Tier.DISK, set())
        on_device = on_host = on_disk = 0  # plain counters: a run is thousands of keys long
        for key in block_keys:
            if key in device:
                on_device += 1
            elif key in host:
                on_host += 1
            elif key in disk:
                on_disk += 1
            else:
                break
        return PrefixHits(on_device, on_host, on_disk)

    def best_holder(self, block_keys: Sequence[BlockHash]) -> tuple[str | None, PrefixHits]:
        """The worker holding the longest prefix (ties: more of it on faster tiers)."""
        best: tuple[str | None, PrefixHits] = (None, PrefixHits())
        for worker_id in self._tiers:
            hits = self.prefix_hits(worker_id, block_keys)
            if (hits.blocks, hits.device, hits.host) > (
                best[1].blocks,
                best[1].device,
                best[1].host,
            ):
                best = (worker_id, hits)
        return best


def block_keys(
    token_ids: Sequence[int], block_size: int, fingerprint: str, cache_salt: str | None
) -> list[BlockHash]:
    """The content keys of a token sequence's full blocks, as every engine computes them."""
    keys: list[BlockHash] = []
    extend_block_hashes(keys, token_ids, block_size, hash_seed(fingerprint, cache_salt))
    return keys
