"""The packers MELL is compared against (the paper's BF and WF): place each new request once,
never migrate. Same interface as ``MellPacker`` (``allocate`` / ``depart`` / ``update`` /
``end_epoch`` / ``active_workers`` / ...) so the simulator swaps them freely; least-loaded by
request count is ``placement.LeastLoaded``.

A request that grows past its worker's capacity stays where it is (no migration): the worker's
engine would preempt or queue, and ``overflow_blocks()`` reports the excess. With
``preempt_on_overflow`` the grown request is instead preempted and placed again by the same
rule at the end of the epoch, its KV recomputed there (vLLM's recompute preemption with a
router that re-dispatches): ``end_epoch`` returns those as ``reprefill`` migrations, which
keeps a comparison with MELL within capacity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

from cadenza.cluster.mell_classes import Bins, Migration
from cadenza.cluster.placement import CostParams


class NoMigrationPacker(Bins, ABC):
    """Place on arrival by ``_pick``, never move. A new worker is activated only when no
    active worker has room (the paper's rule for its baselines)."""

    name = "base"

    def __init__(
        self,
        capacity_blocks_per_worker: Mapping[str, int] | int,
        *,
        class_capacity: int | None = None,
        preempt_on_overflow: bool = False,
        block_size: int = 16,
        prefill_s_per_token: float = CostParams().prefill_s_per_token,
    ) -> None:
        super().__init__(capacity_blocks_per_worker, class_capacity)
        self.preempt_on_overflow = preempt_on_overflow
        self.block_size = block_size
        self.prefill_s_per_token = prefill_s_per_token
        self._grown: dict[str, None] = {}

    @abstractmethod
    def _pick(self, fitting: list[str]) -> str:
        """The active worker, among those with room, for a new request."""

    def allocate(self, request_id: str, kv_blocks: int, worker_ids_alive: Iterable[str]) -> str:
        """The worker for a new request (LookupError when no worker is alive)."""
        alive = self._ensure(worker_ids_alive)
        if not alive:
            raise LookupError("no worker is alive")
        if request_id in self._where:
            raise ValueError(f"request {request_id!r} is already placed")
        worker_id = self._choose(kv_blocks, alive)
        self._put(request_id, worker_id, kv_blocks)
        return worker_id

    def _choose(self, kv_blocks: int, alive: list[str]) -> str:
        active = [w for w in alive if self._members[w] and self.fits(w, kv_blocks)]
        idle = [w for w in alive if not self._members[w] and self.fits(w, kv_blocks)]
        if active:
            worker_id = self._pick(active)
        elif idle:
            worker_id = idle[0]
        else:  # fits nowhere: the roomiest worker, over capacity
            worker_id = max(alive, key=lambda w: (self.free(w), -alive.index(w)))
        return worker_id

    def depart(self, request_id: str) -> None:
        if request_id in self._where:
            self._take(request_id)

    def update(self, request_id: str, kv_blocks: int) -> None:
        if request_id in self._where:
            self._resize(request_id, kv_blocks)
            self._grown[request_id] = None

    def end_epoch(self, worker_ids_alive: Iterable[str] | None = None) -> list[Migration]:
        """No migrations, except preempted requests with ``preempt_on_overflow``."""
        grown, self._grown = [r for r in self._grown if r in self._where], {}
        if not self.preempt_on_overflow:
            return []
        alive = self._ensure(worker_ids_alive) if worker_ids_alive is not None else self.workers()
        moved = []
        for rid in grown:
            src = self._where[rid]
            if self._load[src] <= self._cap[src]:
                continue
            _, blocks = self._take(rid)
            dst = self._choose(blocks, [w for w in alive if w != src] or [src])
            self._put(rid, dst, blocks)
            if dst != src:
                redo_s = blocks * self.block_size * self.prefill_s_per_token
                moved.append(Migration(rid, src, dst, blocks, "reprefill", redo_s))
        return moved


class BestFitPacker(NoMigrationPacker):
    """BF: the active worker with the least room that still fits."""

    name = "best-fit"

    def _pick(self, fitting: list[str]) -> str:
        return min(fitting, key=lambda w: (self.free(w), self.activation(w)))


class WorstFitPacker(NoMigrationPacker):
    """WF: the active worker with the most room (what load-balancing routers do)."""

    name = "worst-fit"

    def _pick(self, fitting: list[str]) -> str:
        return max(fitting, key=lambda w: (self.free(w), -self.activation(w)))
