"""A bound on the KV bytes in flight per worker, so migrations never crowd out serving.

A migration reserves its estimated bytes on both its source and its destination and waits
while either is over budget — except that a worker with nothing in flight always admits one
migration, however large, so a big session can still move.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator


class MigrationBudget:
    def __init__(self, bytes_per_worker: int) -> None:
        self.bytes_per_worker = bytes_per_worker
        self.in_flight: dict[str, int] = defaultdict(int)
        self._changed: asyncio.Condition | None = None

    def _fits(self, workers: tuple[str, ...], num_bytes: int) -> bool:
        return all(
            self.in_flight[w] == 0 or self.in_flight[w] + num_bytes <= self.bytes_per_worker
            for w in workers
        )

    @contextlib.asynccontextmanager
    async def reserve(self, src: str, dst: str, num_bytes: int) -> AsyncIterator[None]:
        if self._changed is None:
            self._changed = asyncio.Condition()
        changed = self._changed
        workers = (src, dst)
        async with changed:
            await changed.wait_for(lambda: self._fits(workers, num_bytes))
            for w in workers:
                self.in_flight[w] += num_bytes
        try:
            yield
        finally:
            async with changed:
                for w in workers:
                    self.in_flight[w] -= num_bytes
                changed.notify_all()
