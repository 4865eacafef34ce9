"""MELL (INFOCOM'25) for Cadenza: pack running requests onto the fewest workers with bounded
migrations (``--routing mell``).

The algorithm lives in ``mell_packer.MellPacker`` (with ``mell_classes`` for size classes,
bin bookkeeping and the transfer-or-re-prefill choice, and ``mell_baselines`` for best-fit
and worst-fit); this module re-exports them and adapts the packer to the router's
``PlacementPolicy`` interface. Torch-free, Ray-free and clock-free, so the simulator runs the
same objects: time enters only as arguments (the caller decides when an epoch ends).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from cadenza.cluster.kv_index import KVIndex
from cadenza.cluster.mell_baselines import BestFitPacker, NoMigrationPacker, WorstFitPacker
from cadenza.cluster.mell_classes import (
    Migration,
    MigrationCosts,
    SizeClass,
    choose_modes,
    classify,
)
from cadenza.cluster.mell_packer import MellPacker, MellStats, OpRecord
from cadenza.cluster.placement import CostParams, Placement, PlacementPolicy, Turn, WorkerView

__all__ = [
    "BestFitPacker",
    "Mell",
    "MellPacker",
    "MellStats",
    "Migration",
    "MigrationCosts",
    "NoMigrationPacker",
    "OpRecord",
    "SizeClass",
    "WorstFitPacker",
    "choose_modes",
    "classify",
    "turn_blocks",
]


def turn_blocks(turn: Turn) -> int:
    """A turn's KV size in blocks (its tokens, rounded up to whole blocks; at least one)."""
    return max(1, math.ceil(turn.num_tokens / turn.block_size))


class Mell(PlacementPolicy):
    """The router's side of MELL. ``place`` allocates a new request (keyed by ``request_id``
    if given, else the turn's session); the router reports growth (``on_grow``) and
    completion (``on_finish``), and once per epoch takes the migrations to carry out
    (``drain_migrations``). Workers' capacities come from their views' ``total_blocks``
    (``default_capacity_blocks`` while a view reports none); the size classes are measured
    against the first worker's capacity, the paper's homogeneous C."""

    name = "mell"

    def __init__(
        self,
        index: KVIndex,
        costs: CostParams | None = None,
        *,
        default_capacity_blocks: int = 1024,
        max_moves: int = 10,
        link_budget_bytes: int | None = None,
        prefill_budget_tokens: int | None = None,
    ) -> None:
        super().__init__(index, costs)
        self.default_capacity_blocks = default_capacity_blocks
        c = self.costs
        self.packer = MellPacker(
            default_capacity_blocks,
            max_moves=max_moves,
            block_bytes=c.block_bytes,
            link_bytes_per_s=c.link_bytes_per_s,
            prefill_s_per_token=c.prefill_s_per_token,
            link_budget_bytes=link_budget_bytes,
            prefill_budget_tokens=prefill_budget_tokens,
        )
        self._block_size_known = False
        self._anonymous = itertools.count()
        self._accepting: list[str] = []
        self.last_request_id: str | None = None

    def place(
        self, turn: Turn, workers: Sequence[WorkerView], request_id: str | None = None
    ) -> Placement:
        live = self.accepting(workers)
        if not self._block_size_known:  # the re-prefill estimate uses the engine's block size
            self._block_size_known = True
            self.packer.costs = dataclasses.replace(self.packer.costs, block_size=turn.block_size)
        for view in live:
            self.packer.add_worker(view.worker_id, view.total_blocks or None)
        self._accepting = [w.worker_id for w in live]
        key = (
            request_id or turn.request_id or turn.session_id or f"mell-anon-{next(self._anonymous)}"
        )
        self.last_request_id = key
        blocks = turn_blocks(turn)
        if key in self.packer:
            if self.packer.worker_of(key) in self._accepting:
                # the session's KV is already on a worker: it grows there (a later epoch may
                # move it)
                self.packer.update(key, max(blocks, self.packer.size_of(key)))
                worker_id = self.packer.worker_of(key)
                return Placement(worker_id, "mell-resident", hits=self._hits(worker_id, turn))
            self.packer.depart(key)  # its worker is draining: place it afresh
        worker_id = self.packer.allocate(key, blocks, self._accepting)
        return Placement(worker_id, "mell-allocate", hits=self._hits(worker_id, turn))

    def on_finish(self, request_id: str) -> None:
        """The request completed: its blocks are free (refills are planned at the epoch)."""
        self.packer.depart(request_id)

    def on_grow(self, request_id: str, blocks: int) -> None:
        """The request's KV is now ``blocks`` blocks."""
        self.packer.update(request_id, blocks)

    def drain_migrations(self) -> list[Migration]:
        """End the epoch: the net migrations to carry out, each with its mode."""
        return self.packer.end_epoch(self._accepting or None)

    def on_worker_lost(self, worker_id: str) -> list[str]:
        """A worker died: forget it; the requests that were on it are returned (not yet
        placed again — their next turn is placed afresh)."""
        self._accepting = [w for w in self._accepting if w != worker_id]
        return [rid for rid, _ in self.packer.remove_worker(worker_id)]

    def releasable_workers(self) -> list[str]:
        """Workers holding no request: MELL would switch them off."""
        return self.packer.free_workers()

    def forget_session(self, session_id: str) -> None:
        self.packer.depart(session_id)
