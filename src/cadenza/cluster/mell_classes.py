"""MELL's building blocks: size classes, per-worker bin bookkeeping, and the choice of how a
migration travels (KV transfer or token transfer + re-prefill).

Shared by ``cluster/mell.py`` (the MELL packer) and ``cluster/mell_baselines.py`` (best-fit and
worst-fit, the paper's baselines) so all packers account for capacity, activation and classes
the same way. Torch-free, Ray-free, and clock-free: nothing here reads time; every cost is
computed from arguments, so the router and the discrete-event simulator get the same answers.

Sizes are KV blocks. The size classes are MELL's (INFOCOM'25, §VI-C), against a reference
capacity C: L in (C/2, C], M in (C/3, C/2], S in (C/4, C/3], T in (C/8, C/4], and requests
at most C/8 are "tiny" — the paper groups them into multi-items that behave as T-requests.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal


class SizeClass(enum.IntEnum):
    """A request's class; the order is the size order (a worker's class is its largest)."""

    TINY = 0
    T = 1
    S = 2
    M = 3
    L = 4


def classify(blocks: int, capacity: int) -> SizeClass:
    """The class of a request of ``blocks`` against capacity ``capacity`` (exact integer
    arithmetic, so a boundary size always lands in the same class). A request larger than C
    is L: it fits no worker, and the packer reports the overflow."""
    if 2 * blocks > capacity:
        return SizeClass.L
    if 3 * blocks > capacity:
        return SizeClass.M
    if 4 * blocks > capacity:
        return SizeClass.S
    if 8 * blocks > capacity:
        return SizeClass.T
    return SizeClass.TINY


def as_placement_class(cls: SizeClass) -> SizeClass:
    """Tiny requests are grouped into T multi-items: for placement and for a worker's class
    they count as T."""
    return SizeClass.T if cls is SizeClass.TINY else cls


MigrationMode = Literal["transfer", "reprefill"]


@dataclass(frozen=True)
class Migration:
    """Move a running request's state from ``src`` to ``dst``: copy its ``kv_blocks`` over the
    link (``transfer``) or send its tokens and prefill them again there (``reprefill``).
    ``est_s`` is the estimate the choice was made on; ``within_budget`` is False when the
    epoch's link and prefill boundaries could not both hold it (it is done anyway: the packing
    relies on it)."""

    request_id: str
    src: str
    dst: str
    kv_blocks: int
    mode: MigrationMode
    est_s: float = 0.0
    within_budget: bool = True


@dataclass(frozen=True)
class MigrationCosts:
    """What the transfer-or-re-prefill choice weighs (MELL §V). The boundaries are per epoch:
    ``link_budget_bytes`` is what one worker's link may carry (sent plus received) and
    ``prefill_budget_tokens`` what one destination may re-prefill without disturbing its own
    batch; ``None`` is unbounded, and then each migration simply takes the faster mode."""

    block_bytes: int
    link_bytes_per_s: float
    prefill_s_per_token: float
    block_size: int
    link_budget_bytes: int | None = None
    prefill_budget_tokens: int | None = None

    def transfer_s(self, blocks: int) -> float:
        return blocks * self.block_bytes / self.link_bytes_per_s

    def reprefill_s(self, blocks: int) -> float:
        return blocks * self.block_size * self.prefill_s_per_token


@dataclass(frozen=True)
class PendingMove:
    """A net move of the epoch before its mode is chosen. ``source_lost``: the source worker
    died, so its KV is gone and only re-prefill can rebuild it."""

    request_id: str
    src: str
    dst: str
    kv_blocks: int
    source_lost: bool = False


def choose_modes(moves: Sequence[PendingMove], costs: MigrationCosts) -> list[Migration]:
    """MELL's hybrid migration: each move is an item for one of two bins, the link boundary
    (bytes, charged to both endpoints) or the destination's prefill boundary (tokens). Solved
    greedily across all of the epoch's moves at once (the paper's global consensus), first-fit
    decreasing: biggest moves first, each into the bin of its faster mode if there is room,
    else the other bin, else its faster mode over budget. Returned in the order given."""
    link_used: dict[str, int] = {}
    prefill_used: dict[str, int] = {}
    chosen: dict[int, Migration] = {}
    order = sorted(range(len(moves)), key=lambda k: (-moves[k].kv_blocks, moves[k].request_id))
    for k in order:
        move = moves[k]
        nbytes = move.kv_blocks * costs.block_bytes
        ntokens = move.kv_blocks * costs.block_size
        t_s, r_s = costs.transfer_s(move.kv_blocks), costs.reprefill_s(move.kv_blocks)

        def link_fits(nbytes: int = nbytes, move: PendingMove = move) -> bool:
            cap = costs.link_budget_bytes
            return cap is None or all(
                link_used.get(w, 0) + nbytes <= cap for w in (move.src, move.dst)
            )

        def prefill_fits(ntokens: int = ntokens, move: PendingMove = move) -> bool:
            cap = costs.prefill_budget_tokens
            return cap is None or prefill_used.get(move.dst, 0) + ntokens <= cap

        if move.source_lost:
            modes: list[MigrationMode] = ["reprefill"]
        elif t_s <= r_s:
            modes = ["transfer", "reprefill"]
        else:
            modes = ["reprefill", "transfer"]
        fits = {"transfer": link_fits(), "reprefill": prefill_fits()}
        mode = next((m for m in modes if fits[m]), modes[0])
        if mode == "transfer":
            for w in (move.src, move.dst):
                link_used[w] = link_used.get(w, 0) + nbytes
        else:
            prefill_used[move.dst] = prefill_used.get(move.dst, 0) + ntokens
        chosen[k] = Migration(
            move.request_id,
            move.src,
            move.dst,
            move.kv_blocks,
            mode,
            t_s if mode == "transfer" else r_s,
            fits[mode],
        )
    return [chosen[k] for k in range(len(moves))]


class Bins:
    """Workers as bins of KV blocks: where each request is, each worker's load and class mix,
    and when it was activated (took its first request since it was last empty). Activation is
    a counter, not a time: "most recently activated" is all MELL needs, and it keeps runs
    deterministic. An empty worker is free: it can be released.

    ``capacity_blocks_per_worker``: one capacity for every worker (registered when first seen)
    or a mapping that registers those workers up front, in its order. ``class_capacity`` is
    the C of the size classes; by default the int capacity, else the first worker's.
    ``peak_active`` counts active workers at any moment, within epochs too."""

    def __init__(
        self, capacity_blocks_per_worker: Mapping[str, int] | int, class_capacity: int | None
    ) -> None:
        self.default_capacity: int | None = None
        self._cap: dict[str, int] = {}
        self._load: dict[str, int] = {}
        self._members: dict[str, dict[str, None]] = {}  # insertion-ordered sets
        self._class_count: dict[str, list[int]] = {}
        self._activated: dict[str, int] = {}  # active workers -> activation number
        self._where: dict[str, str] = {}
        self._size: dict[str, int] = {}
        self._activations = 0
        self.class_capacity = class_capacity
        self.peak_active = 0
        if isinstance(capacity_blocks_per_worker, int):
            self.default_capacity = capacity_blocks_per_worker
            if self.class_capacity is None:
                self.class_capacity = capacity_blocks_per_worker
        else:
            for worker_id, cap in capacity_blocks_per_worker.items():
                self.add_worker(worker_id, cap)

    # -- workers --------------------------------------------------------------------------
    def add_worker(self, worker_id: str, capacity_blocks: int | None = None) -> None:
        """Register a worker (a no-op for one already known)."""
        if worker_id in self._cap:
            return
        cap = capacity_blocks if capacity_blocks is not None else self.default_capacity
        if cap is None or cap <= 0:
            raise ValueError(f"no KV capacity known for worker {worker_id!r}")
        if self.class_capacity is None:
            self.class_capacity = cap
        self._cap[worker_id] = cap
        self._load[worker_id] = 0
        self._members[worker_id] = {}
        self._class_count[worker_id] = [0] * len(SizeClass)

    def remove_worker(self, worker_id: str) -> list[tuple[str, int]]:
        """The worker is gone (died or removed): forget it, and return its requests as
        ``(request_id, kv_blocks)`` — their KV died with it, the caller places them again."""
        if worker_id not in self._cap:
            return []
        lost = [(rid, self._size[rid]) for rid in self._members[worker_id]]
        for rid, _ in lost:
            self._take(rid)
        del self._cap[worker_id], self._load[worker_id]
        del self._members[worker_id], self._class_count[worker_id]
        return lost

    def _ensure(self, worker_ids: Iterable[str]) -> list[str]:
        ids = list(dict.fromkeys(worker_ids))
        for w in ids:
            self.add_worker(w)
        return ids

    # -- requests -------------------------------------------------------------------------
    def _put(self, rid: str, worker_id: str, blocks: int) -> None:
        if not self._members[worker_id]:
            self._activations += 1
            self._activated[worker_id] = self._activations
        self._members[worker_id][rid] = None
        self._where[rid] = worker_id
        self._size[rid] = blocks
        self._load[worker_id] += blocks
        self._class_count[worker_id][self.class_of(rid)] += 1
        self.peak_active = max(self.peak_active, len(self._activated))

    def _take(self, rid: str) -> tuple[str, int]:
        worker_id, blocks = self._where.pop(rid), self._size[rid]
        self._class_count[worker_id][self.class_of(rid)] -= 1
        del self._size[rid]
        del self._members[worker_id][rid]
        self._load[worker_id] -= blocks
        if not self._members[worker_id]:
            del self._activated[worker_id]
        return worker_id, blocks

    def _resize(self, rid: str, blocks: int) -> None:
        worker_id = self._where[rid]
        self._class_count[worker_id][self.class_of(rid)] -= 1
        self._load[worker_id] += blocks - self._size[rid]
        self._size[rid] = blocks
        self._class_count[worker_id][self.class_of(rid)] += 1

    # -- queries --------------------------------------------------------------------------
    def __contains__(self, request_id: object) -> bool:
        return request_id in self._where

    def classify(self, blocks: int) -> SizeClass:
        return classify(blocks, self.class_capacity or 1)

    def class_of(self, request_id: str) -> SizeClass:
        return self.classify(self._size[request_id])

    def worker_class(self, worker_id: str) -> SizeClass | None:
        """A worker's class is its largest request's (tiny counts as T); None when empty."""
        counts = self._class_count[worker_id]
        for cls in reversed(SizeClass):
            if counts[cls]:
                return as_placement_class(cls)
        return None

    def worker_of(self, request_id: str) -> str:
        return self._where[request_id]

    def size_of(self, request_id: str) -> int:
        return self._size[request_id]

    def requests_on(self, worker_id: str) -> list[str]:
        return list(self._members[worker_id])

    def workers(self) -> list[str]:
        return list(self._cap)

    def capacity(self, worker_id: str) -> int:
        return self._cap[worker_id]

    def load(self, worker_id: str) -> int:
        return self._load[worker_id]

    def free(self, worker_id: str) -> int:
        return self._cap[worker_id] - self._load[worker_id]

    def fits(self, worker_id: str, blocks: int) -> bool:
        return self._load[worker_id] + blocks <= self._cap[worker_id]

    def activation(self, worker_id: str) -> int:
        return self._activated.get(worker_id, 0)

    def active_workers(self) -> list[str]:
        """Workers holding at least one request, in activation order."""
        return sorted(self._activated, key=self._activated.__getitem__)

    def free_workers(self) -> list[str]:
        """Idle workers (no request): MELL switches these off; the caller may release them."""
        return [w for w in self._cap if not self._members[w]]

    def utilisation(self) -> float:
        """KV in use over the capacity of the active workers (the paper's GPU utilisation)."""
        cap = sum(self._cap[w] for w in self._activated)
        return sum(self._load[w] for w in self._activated) / cap if cap else 0.0

    def overflow_blocks(self) -> int:
        """Blocks beyond capacity, summed over workers (0 while every worker fits)."""
        return sum(max(0, self._load[w] - self._cap[w]) for w in self._cap)

    def class_counts(self) -> dict[str, int]:
        """Running requests per size class (tiny separately)."""
        totals = {cls.name: 0 for cls in SizeClass}
        for counts in self._class_count.values():
            for cls in SizeClass:
                totals[cls.name] += counts[cls]
        return totals

    def worker_classes(self) -> dict[str, str]:
        """The class of each active worker, by name."""
        return {w: cls.name for w in self.active_workers() if (cls := self.worker_class(w))}
