"""MELL's online KV packing (INFOCOM'25, §VI, Fig. 10 and Alg. 1): keep running requests on
the fewest workers, moving at most ``max_moves`` requests per operation.

Requests are sized by their KV blocks and classed L/M/S/T against the capacity C (tiny ones,
at most C/8, count as T: the paper's grouped multi-items). A worker's class is its largest
request's. Three operations, as in the paper:

* **Allocate** (a new request; answered at once, the router needs the worker now):
  T goes to the L-worker with room of highest priority, else the most recently activated
  T-worker; S/M to an L-worker whose L-request leaves room (evicting T-requests there, which
  are re-allocated), else the most recent worker of its class, else of S/M; L gets a fresh
  worker and pulls an S/M-request from an S/M-worker, which is refilled from the most recent
  S/M-worker. Priority is workload only: more free blocks, then fewer requests.
* **Depart** (a request finished): a T leaving is replaced by T-requests from the most recent
  T(/M)-worker; an S/M leaving an S/M-worker is replaced from the most recent S/M-worker, one
  leaving an L-worker as for a new L; when an L leaves, the rest of its worker is re-allocated
  so the worker can be switched off. Nothing moves when the worker is the most recent.
* **Update** (a request grew): T/S becoming S/M is re-allocated; one becoming L moves if its
  worker already has an L, else the others make room if the worker overflows; an L that
  overflows its worker makes the others leave. Others leave largest first, only as many as
  needed (the paper re-allocates all of them). An update is a Depart plus an Allocate: when
  the grown request leaves its worker, that worker is refilled as on a Depart.

Batching (the paper's operation buffer): Depart and Update are applied to the books at once
but their moves are planned at ``end_epoch``, departures first, then updates; allocations in
between already use the freed room. Moves are then netted per request (A->B->A is no move,
A->B->C is A->C, a request that finished moved nowhere) and each net move gets its mode,
KV transfer or re-prefill, by ``choose_modes`` (a greedy two-bin packing).

Choices where the paper is open, kept simple and deterministic:
* "Activate a new GPU" takes the first free worker in registration order; before that, any
  active worker with room is used (best fit), since an extra active worker is what MELL
  minimises. With no free worker left, a request goes where it overflows least (counted).
* Refills only move requests from workers activated *after* the one refilled, so requests
  flow towards older workers and the newest empty out; at most ``refill_moves`` per refill.
* An L leaving re-allocates the rest only if all of it fits on other active workers within
  the move budget (best fit); moving it to a fresh worker would save nothing.
* Every operation stops at ``max_moves`` moves; a step that would pass it is skipped whole.
* There is no topology: the paper's GPU-to-GPU priority (same machine first) reduces to the
  workload part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cadenza.cluster.mell_classes import (
    Bins,
    Migration,
    MigrationCosts,
    PendingMove,
    SizeClass,
    as_placement_class,
    choose_modes,
)
from cadenza.cluster.placement import CostParams

_T, _S, _M, _L = SizeClass.T, SizeClass.S, SizeClass.M, SizeClass.L
_DEFAULT_COSTS = CostParams()


@dataclass
class OpRecord:
    """One operation and the moves it planned (before netting across the epoch)."""

    kind: str  # "allocate" | "depart" | "update"
    subject: str  # the request (the worker for a depart's repair)
    moves: int = 0


@dataclass
class MellStats:
    operations: int = 0
    moves_planned: int = 0
    migrations: int = 0  # net moves returned by end_epoch
    cancelled: int = 0  # planned moves that netting removed
    over_budget: int = 0  # migrations outside the epoch's link/prefill boundaries
    overflows: int = 0  # placements that had to exceed a worker's capacity
    max_moves_in_op: int = 0
    by_mode: dict[str, int] = field(default_factory=lambda: {"transfer": 0, "reprefill": 0})


@dataclass
class _Op:
    record: OpRecord
    left: int
    alive: dict[str, None]


class MellPacker(Bins):
    name = "mell"

    def __init__(
        self,
        capacity_blocks_per_worker: Mapping[str, int] | int,
        *,
        max_moves: int = 10,
        block_bytes: int = _DEFAULT_COSTS.block_bytes,
        link_bytes_per_s: float = _DEFAULT_COSTS.link_bytes_per_s,
        prefill_s_per_token: float = _DEFAULT_COSTS.prefill_s_per_token,
        block_size: int = 16,
        class_capacity: int | None = None,
        link_budget_bytes: int | None = None,
        prefill_budget_tokens: int | None = None,
        refill_moves: int = 2,
    ) -> None:
        super().__init__(capacity_blocks_per_worker, class_capacity)
        self.max_moves = max_moves
        self.refill_moves = refill_moves
        self.costs = MigrationCosts(
            block_bytes,
            link_bytes_per_s,
            prefill_s_per_token,
            block_size,
            link_budget_bytes,
            prefill_budget_tokens,
        )
        self.stats = MellStats()
        self.op_log: list[OpRecord] = []  # this epoch's operations so far
        self.last_epoch_ops: list[OpRecord] = []
        self._origin: dict[str, str] = {}  # request -> its worker before its first move
        self._source_lost: set[str] = set()
        self._departs: list[tuple[str, SizeClass]] = []
        self._updates: dict[str, SizeClass] = {}  # request -> class before this epoch's growth

    # -- the three operations ---------------------------------------------------------------
    def allocate(self, request_id: str, kv_blocks: int, worker_ids_alive: Iterable[str]) -> str:
        """Place a new request now and return its worker (LookupError if none is alive)."""
        alive = self._ensure(worker_ids_alive)
        if not alive:
            raise LookupError("no worker is alive")
        if request_id in self._where:
            raise ValueError(f"request {request_id!r} is already placed")
        op = self._op("allocate", request_id, alive)
        worker_id, fresh = self._place(op, request_id, kv_blocks, set(), evict=True)
        if fresh and as_placement_class(self.classify(kv_blocks)) is _L:
            self._pull_small(op, worker_id)
        self._close(op)
        return worker_id

    def depart(self, request_id: str) -> None:
        """The request finished: free its blocks now, plan the refill at ``end_epoch``."""
        if request_id not in self._where:
            return
        cls = as_placement_class(self.class_of(request_id))
        worker_id, _ = self._take(request_id)
        self._departs.append((worker_id, cls))
        self._updates.pop(request_id, None)

    def update(self, request_id: str, kv_blocks: int) -> None:
        """The request's KV is now ``kv_blocks``: account it now, repair at ``end_epoch``."""
        if request_id not in self._where:
            return
        self._updates.setdefault(request_id, as_placement_class(self.class_of(request_id)))
        self._resize(request_id, kv_blocks)

    def end_epoch(self, worker_ids_alive: Iterable[str] | None = None) -> list[Migration]:
        """Plan the epoch's buffered repairs (departures, then updates) and return the net
        migrations, each with its mode. ``worker_ids_alive``: the workers that may receive
        requests (default: all registered)."""
        alive = self._ensure(worker_ids_alive) if worker_ids_alive is not None else self.workers()
        for worker_id, cls in self._departs:
            op = self._op("depart", worker_id, alive)
            self._repair_depart(op, worker_id, cls)
            self._close(op)
        for request_id, old in self._updates.items():
            if request_id in self._where:
                op = self._op("update", request_id, alive)
                self._repair_update(op, request_id, old)
                self._close(op)
        moves = [
            PendingMove(rid, src, self._where[rid], self._size[rid], rid in self._source_lost)
            for rid, src in self._origin.items()
            if rid in self._where and self._where[rid] != src
        ]
        migrations = choose_modes(moves, self.costs)
        self.stats.migrations += len(migrations)
        self.stats.cancelled += sum(r.moves for r in self.op_log) - len(migrations)
        for m in migrations:
            self.stats.by_mode[m.mode] += 1
            self.stats.over_budget += not m.within_budget
        self.last_epoch_ops, self.op_log = self.op_log, []
        self._origin.clear()
        self._source_lost.clear()
        self._departs.clear()
        self._updates.clear()
        return migrations

    def remove_worker(self, worker_id: str) -> list[tuple[str, int]]:
        """Forget a dead worker; its requests are returned to be placed again (their KV is
        lost, and so is any move planned out of it: those re-prefill)."""
        lost = super().remove_worker(worker_id)
        for rid, _ in lost:
            self._origin.pop(rid, None)
            self._updates.pop(rid, None)
        self._source_lost.update(rid for rid, src in self._origin.items() if src == worker_id)
        self._departs = [(w, c) for w, c in self._departs if w != worker_id]
        return lost

    # -- bookkeeping --------------------------------------------------------------------------
    def _op(self, kind: str, subject: str, alive: list[str]) -> _Op:
        record = OpRecord(kind, subject)
        self.op_log.append(record)
        self.stats.operations += 1
        return _Op(record, self.max_moves, dict.fromkeys(alive))

    def _close(self, op: _Op) -> None:
        self.stats.moves_planned += op.record.moves
        self.stats.max_moves_in_op = max(self.stats.max_moves_in_op, op.record.moves)

    def _move(self, op: _Op, rid: str, dst: str) -> None:
        src, blocks = self._take(rid)
        self._put(rid, dst, blocks)
        self._origin.setdefault(rid, src)
        op.left -= 1
        op.record.moves += 1

    def _active(self, op: _Op, exclude: set[str]) -> list[str]:
        return [w for w in self.active_workers() if w in op.alive and w not in exclude]

    def _newest(self, workers: list[str], classes: set[SizeClass]) -> str | None:
        """The most recently activated of ``workers`` (in activation order) of a class."""
        return next((w for w in reversed(workers) if self.worker_class(w) in classes), None)

    def _priority(self, worker_id: str) -> tuple[int, int, int]:
        """Smaller is higher: more free blocks, fewer requests, then older."""
        return (-self.free(worker_id), len(self._members[worker_id]), self.activation(worker_id))

    def _items(self, worker_id: str, classes: set[SizeClass], room: int) -> list[str]:
        """Requests of ``classes`` on the worker that fit in ``room``, largest first."""
        found = [
            r
            for r in self._members[worker_id]
            if as_placement_class(self.class_of(r)) in classes and self._size[r] <= room
        ]
        return sorted(found, key=lambda r: (-self._size[r], r))

    # -- choosing a worker ----------------------------------------------------------------
    def _evictions(self, worker_id: str, blocks: int, limit: int) -> list[str] | None:
        """The T-requests (fewest: largest first) to evict from an L-worker so a request of
        ``blocks`` fits beside its L and S/M load; None if impossible within ``limit``."""
        tees = self._items(worker_id, {_T}, self._cap[worker_id])
        core = self._load[worker_id] - sum(self._size[r] for r in tees)
        if core + blocks > self._cap[worker_id]:
            return None
        need, chosen = self._load[worker_id] + blocks - self._cap[worker_id], []
        for r in tees:
            if need <= 0:
                break
            chosen.append(r)
            need -= self._size[r]
        return chosen if len(chosen) <= limit else None

    def _target(
        self, op: _Op, blocks: int, exclude: set[str], evict_limit: int
    ) -> tuple[str | None, list[str]]:
        """Fig. 10's Allocate choice for a request of ``blocks``: the worker (None if none has
        room and none is free) and the T-requests to evict there first."""
        cls = as_placement_class(self.classify(blocks))
        active = self._active(op, exclude)
        large = [w for w in active if self.worker_class(w) is _L]
        if cls is _T:
            roomy = [w for w in large if self.fits(w, blocks)]
            if roomy:
                return min(roomy, key=self._priority), []
            newest = self._newest(active, {_T})
            if newest is not None and self.fits(newest, blocks):
                return newest, []
        elif cls in (_S, _M):
            options = []
            for w in large:
                evict = self._evictions(w, blocks, evict_limit)
                if evict is not None:
                    options.append((len(evict), self._priority(w), w, evict))
            if options:
                _, _, w, evict = min(options)
                return w, evict
            for classes in ({cls}, {_S, _M}):
                newest = self._newest(active, classes)
                if newest is not None and self.fits(newest, blocks):
                    return newest, []
        fitting = [w for w in active if self.fits(w, blocks)]
        if fitting:
            return min(fitting, key=lambda w: (self.free(w), self.activation(w))), []
        for w in op.alive:
            if not self._members[w] and w not in exclude and self._cap[w] >= blocks:
                return w, []
        return None, []

    def _place(
        self, op: _Op, rid: str, blocks: int, exclude: set[str], *, evict: bool
    ) -> tuple[str, bool]:
        """Put an unplaced request where ``_target`` says (or where it overflows least);
        returns the worker and whether it was free (newly activated)."""
        worker_id, evictions = self._target(op, blocks, exclude, op.left if evict else 0)
        if worker_id is None:
            self.stats.overflows += 1
            candidates = [w for w in op.alive if w not in exclude] or list(op.alive)
            worker_id = max(candidates, key=lambda w: (self.free(w), -self.activation(w)))
        fresh = not self._members[worker_id]
        self._put(rid, worker_id, blocks)
        for r in evictions:
            self._relocate(op, r, exclude | {worker_id})
        return worker_id, fresh

    def _relocate(self, op: _Op, rid: str, exclude: set[str], *, evict: bool = False) -> bool:
        """Depart-and-re-allocate an existing request (it may land where it was: no move).
        Returns whether it moved."""
        if op.left <= 0:
            return False
        src, blocks = self._where[rid], self._size[rid]
        activation = self._activated[src]
        self._take(rid)
        worker_id, evictions = self._target(op, blocks, exclude, op.left - 1 if evict else 0)
        self._put(rid, worker_id or src, blocks)
        if worker_id is None or worker_id == src:
            self._activated[src] = activation  # stayed: keep its place in the order
            return False
        self._origin.setdefault(rid, src)
        op.left -= 1
        op.record.moves += 1
        for r in evictions:
            self._relocate(op, r, exclude | {worker_id})
        return True

    # -- repairs ------------------------------------------------------------------------------
    def _pull_small(self, op: _Op, worker_id: str) -> None:
        """Give an L-worker an S/M-request from an S/M-worker (newest first), then refill that
        worker from the most recent S/M-worker, so that one empties first."""
        sm_workers = [w for w in self._active(op, {worker_id}) if self.worker_class(w) in (_S, _M)]
        if not sm_workers or op.left <= 0:
            return
        newest = sm_workers[-1]
        for donor in reversed(sm_workers):
            items = self._items(donor, {_S, _M}, self.free(worker_id))
            if items:
                self._move(op, items[0], worker_id)
                if donor != newest and op.left > 0 and newest in self._activated:
                    refill = self._items(newest, {_S, _M}, self.free(donor))
                    if refill:
                        self._move(op, refill[0], donor)
                return

    def _refill(
        self, op: _Op, worker_id: str, classes: set[SizeClass], donors: set[SizeClass]
    ) -> None:
        """Fill the worker's room with ``classes`` requests from newer workers of ``donors``
        classes, newest first, at most ``refill_moves``."""
        moved = 0
        newer = [
            w
            for w in self._active(op, {worker_id})
            if self.activation(w) > self.activation(worker_id) and self.worker_class(w) in donors
        ]
        for donor in reversed(newer):
            for r in self._items(donor, classes, self.free(worker_id)):
                if moved >= self.refill_moves or op.left <= 0:
                    return
                if self.fits(worker_id, self._size[r]):
                    self._move(op, r, worker_id)
                    moved += 1

    def _evacuate(self, op: _Op, worker_id: str) -> None:
        """Re-allocate everything on the worker to other active workers (best fit, largest
        first) — all of it or nothing, within the move budget."""
        rest = sorted(self._members[worker_id], key=lambda r: (-self._size[r], r))
        if len(rest) > op.left:
            return
        room = {w: self.free(w) for w in self._active(op, {worker_id})}
        plan = []
        for r in rest:
            fitting = [w for w in room if room[w] >= self._size[r]]
            if not fitting:
                return
            dst = min(fitting, key=lambda w: (room[w], self.activation(w)))
            room[dst] -= self._size[r]
            plan.append((r, dst))
        for r, dst in plan:
            self._move(op, r, dst)

    def _repair_depart(self, op: _Op, worker_id: str, cls: SizeClass) -> None:
        if worker_id not in self._activated or worker_id not in op.alive:
            return  # gone, or now empty: it is free
        if self.active_workers()[-1] == worker_id:
            return  # the most recent worker: the paper just removes the request
        kind = self.worker_class(worker_id)
        if cls is _L:
            self._evacuate(op, worker_id)
        elif cls is _T:
            self._refill(op, worker_id, {_T}, {_T, _M} if kind is _T else {_T})
        elif kind is _L:
            self._pull_small(op, worker_id)
        elif kind in (_S, _M):
            self._refill(op, worker_id, {_S, _M}, {_S, _M})
        else:  # only T-requests are left: it is a T-worker now
            self._refill(op, worker_id, {_T}, {_T, _M})

    def _shed(self, op: _Op, worker_id: str, keep: str) -> bool:
        """Move others off an overflowing worker, largest first, only as many as needed."""
        excess = self._load[worker_id] - self._cap[worker_id]
        others = sorted(
            (r for r in self._members[worker_id] if r != keep), key=lambda r: (-self._size[r], r)
        )
        leaving = []
        for r in others:
            if excess <= 0:
                break
            leaving.append(r)
            excess -= self._size[r]
        if excess > 0 or len(leaving) > op.left:
            return False
        for r in leaving:
            self._relocate(op, r, {worker_id})
        return True

    def _repair_update(self, op: _Op, rid: str, old: SizeClass) -> None:
        source = worker_id = self._where[rid]
        new = as_placement_class(self.class_of(rid))
        overflow = self._load[worker_id] > self._cap[worker_id]
        if len(self._members[worker_id]) == 1:
            if overflow:
                self._relocate(op, rid, {worker_id})
            return
        if new in (_S, _M) and new > old:
            self._relocate(op, rid, set(), evict=True)
        elif new is _L and old is not _L:
            if self._class_count[worker_id][_L] > 1:
                self._relocate(op, rid, {worker_id})
            elif overflow:
                self._shed(op, worker_id, rid)
        elif overflow and new is _L:
            self._shed(op, worker_id, rid)
        worker_id = self._where[rid]
        if self._load[worker_id] > self._cap[worker_id]:
            self._relocate(op, rid, {worker_id})  # last resort: the grown request itself
        if self._where[rid] != source:  # an update is a depart and an allocate: refill
            self._repair_depart(op, source, new)
