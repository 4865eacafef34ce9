"""Per-turn placement policies: which worker runs a turn, and whether its KV moves there.

One module for every policy, shared by the router and the simulator (torch-free, Ray-free).
A policy sees the workers' load snapshots and the router's ``KVIndex`` and returns a
``Placement``: the worker, why, and optionally a worker to move the session's KV from.

* ``round-robin`` — the stateless baseline (vLLM behind a plain balancer): the full history is
  prefilled wherever the turn lands, unless that worker happens to hold it.
* ``least-loaded`` — fewest outstanding requests, then fewest waiting tokens.
* ``sticky`` — session affinity (InferCept / Pensieve on each worker): a session stays on the
  worker that ran its first turn while that worker is alive.
* ``kv-aware`` — prefix credit against load (the Dynamo / llm-d / SGLang-router scoring): the
  estimated cost of a worker is the prefill it would still have to do (cached blocks count by
  tier: device fully, host and disk partly) plus a weight times the work already queued there.
  When the cheapest worker lacks the KV another worker holds, moving it is chosen if copying the
  bytes over the link is estimated faster than recomputing them (MELL's adaptive choice).
* ``symphony`` — on a hint, pick the worker for the session's next turn by load and move the
  session's KV there in the background (unless the worker holding it is within
  ``rebalance_margin`` requests of the least loaded: then it stays); the turn goes there once
  its KV has arrived (the index shows it), and falls back to ``kv-aware`` otherwise (no hint,
  a late or lost migration).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from cadenza.cluster.kv_index import KVIndex, PrefixHits
from cadenza.core.hashing import BlockHash

POLICY_NAMES = ("round-robin", "least-loaded", "sticky", "kv-aware", "symphony", "mell")


@dataclass(frozen=True)
class WorkerView:
    """What a policy knows about a worker: its last load snapshot and whether it takes work."""

    worker_id: str
    num_running: int = 0
    num_waiting: int = 0
    waiting_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    accepting: bool = True  # alive and not draining

    @property
    def outstanding(self) -> int:
        return self.num_running + self.num_waiting


@dataclass(frozen=True)
class Turn:
    """A turn to place: its session, the content keys of its prompt's full blocks, and its
    length in tokens."""

    session_id: str | None
    block_keys: tuple[BlockHash, ...]
    num_tokens: int
    block_size: int = 16
    request_id: str | None = None  # the request being placed (a hint has none)


@dataclass(frozen=True)
class Placement:
    worker_id: str
    reason: str
    migrate_from: str | None = None  # move the session's KV from this worker first
    hits: PrefixHits = PrefixHits()


@dataclass(frozen=True)
class CostParams:
    """Rough costs a policy trades off (measured values go here; the defaults suit the CPU
    engine with SmolLM2). Credits: a host or disk hit still costs a copy up."""

    prefill_s_per_token: float = 1.5e-3
    running_request_tokens: int = 64  # a running request's decode work, in prefill tokens
    load_weight: float = 1.0
    host_credit: float = 0.8
    disk_credit: float = 0.5
    block_bytes: int = 16 * 2 * 30 * 3 * 64 * 4  # SmolLM2 float32: K and V of 16 tokens
    link_bytes_per_s: float = 1e9
    # A hint moves a session's KV only to a worker with at least this many fewer outstanding
    # requests (pending hints included) than the one holding it: a move for a difference of
    # one just trades places, and its copies cost both workers step time.
    rebalance_margin: int = 2


class PlacementPolicy(ABC):
    name = "base"

    def __init__(self, index: KVIndex, costs: CostParams | None = None) -> None:
        self.index = index
        self.costs = costs or CostParams()

    @abstractmethod
    def place(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement:
        """The worker for ``turn`` among ``workers`` (LookupError if none accepts work)."""

    def on_hint(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement | None:
        """A hint for the session's next turn; a placement means "move its KV there now"."""
        return None

    def forget_session(self, session_id: str) -> None:  # noqa: B027 - most keep no state
        """The session ended: drop what the policy remembers of it (nothing by default)."""

    def on_hint_expired(self, session_id: str) -> None:  # noqa: B027 - most keep no state
        """A hint expired with no turn: drop the placement it reserved (nothing by default)."""

    @staticmethod
    def accepting(workers: Sequence[WorkerView]) -> list[WorkerView]:
        live = [w for w in workers if w.accepting]
        if not live:
            raise LookupError("no worker is accepting requests")
        return live

    def _hits(self, worker_id: str, turn: Turn) -> PrefixHits:
        return self.index.prefix_hits(worker_id, turn.block_keys)

    def load_tokens(self, worker: WorkerView) -> float:
        return worker.waiting_tokens + worker.num_running * self.costs.running_request_tokens

    def least_loaded(self, workers: Sequence[WorkerView]) -> WorkerView:
        return min(
            self.accepting(workers), key=lambda w: (w.outstanding, w.waiting_tokens, w.worker_id)
        )


class RoundRobin(PlacementPolicy):
    name = "round-robin"

    def __init__(self, index: KVIndex, costs: CostParams | None = None) -> None:
        super().__init__(index, costs)
        self._next = itertools.count()

    def place(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement:
        live = sorted(self.accepting(workers), key=lambda w: w.worker_id)
        chosen = live[next(self._next) % len(live)]
        return Placement(chosen.worker_id, "round-robin", hits=self._hits(chosen.worker_id, turn))


class LeastLoaded(PlacementPolicy):
    name = "least-loaded"

    def place(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement:
        chosen = self.least_loaded(workers)
        return Placement(chosen.worker_id, "least-loaded", hits=self._hits(chosen.worker_id, turn))


class Sticky(PlacementPolicy):
    name = "sticky"

    def __init__(self, index: KVIndex, costs: CostParams | None = None) -> None:
        super().__init__(index, costs)
        self.home: dict[str, str] = {}

    def place(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement:
        live = {w.worker_id: w for w in self.accepting(workers)}
        home = self.home.get(turn.session_id or "")
        if home in live:
            return Placement(home, "sticky", hits=self._hits(home, turn))  # type: ignore[arg-type]
        chosen = self.least_loaded(workers).worker_id
        if turn.session_id is not None:
            self.home[turn.session_id] = chosen
        reason = "sticky-new" if home is None else "sticky-rehomed"
        return Placement(chosen, reason, hits=self._hits(chosen, turn))

    def forget_session(self, session_id: str) -> None:
        self.home.pop(session_id, None)


class KVAware(PlacementPolicy):
    name = "kv-aware"

    def cost(self, worker: WorkerView, turn: Turn, hits: PrefixHits) -> float:
        """Estimated tokens of work before the turn is done there: its remaining prefill
        plus the queued work, weighted."""
        c = self.costs
        credit = hits.device + c.host_credit * hits.host + c.disk_credit * hits.disk
        prefill = max(turn.num_tokens - credit * turn.block_size, 1.0)
        return prefill + c.load_weight * self.load_tokens(worker)

    def place(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement:
        live = self.accepting(workers)
        scored = []
        for worker in live:
            hits = self._hits(worker.worker_id, turn)
            scored.append((self.cost(worker, turn, hits), worker.outstanding, worker, hits))
        _, _, chosen, hits = min(scored, key=lambda t: (t[0], t[1], t[2].worker_id))
        holder, held = self.index.best_holder(turn.block_keys)
        reason = "kv-hit" if hits.blocks else "load"
        migrate = None
        if holder is not None and holder != chosen.worker_id and held.blocks > hits.blocks:
            if self.move_is_cheaper(held.blocks - hits.blocks, turn.block_size):
                migrate, reason = holder, "kv-moved"
            else:
                reason = "recompute"
        return Placement(chosen.worker_id, reason, migrate_from=migrate, hits=hits)

    def move_is_cheaper(self, num_blocks: int, block_size: int) -> bool:
        """Copying ``num_blocks`` over the link against recomputing their tokens."""
        c = self.costs
        move_s = num_blocks * c.block_bytes / c.link_bytes_per_s
        recompute_s = num_blocks * block_size * c.prefill_s_per_token
        return move_s < recompute_s


class Symphony(KVAware):
    name = "symphony"

    def __init__(self, index: KVIndex, costs: CostParams | None = None) -> None:
        super().__init__(index, costs)
        self.hinted: dict[str, str] = {}  # session -> the worker chosen for its next turn

    def on_hint(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement | None:
        if turn.session_id is None:
            return None
        pending = {w: list(self.hinted.values()).count(w) for w in set(self.hinted.values())}
        live = self.accepting(workers)

        def load(w: WorkerView) -> int:
            return w.outstanding + pending.get(w.worker_id, 0)

        target = min(live, key=lambda w: (load(w), self.load_tokens(w), w.worker_id))
        holder, held = self.index.best_holder(turn.block_keys)
        by_id = {w.worker_id: w for w in live}
        if holder in by_id and load(by_id[holder]) - load(target) < self.costs.rebalance_margin:
            target = by_id[holder]  # balanced enough: the KV stays where it is
        self.hinted[turn.session_id] = target.worker_id
        hits = self._hits(target.worker_id, turn)
        migrate = holder if holder not in (None, target.worker_id) and held.blocks else None
        return Placement(target.worker_id, "hint", migrate_from=migrate, hits=hits)

    def place(self, turn: Turn, workers: Sequence[WorkerView]) -> Placement:
        target = self.hinted.pop(turn.session_id or "", None)
        live = {w.worker_id: w for w in self.accepting(workers)}
        if target not in live:
            return super().place(turn, workers)
        hits = self._hits(target, turn)  # type: ignore[arg-type]
        _, held = self.index.best_holder(turn.block_keys)
        best = super().place(turn, workers)
        if hits.blocks < held.blocks:  # the move has not landed: place as kv-aware does
            return Placement(best.worker_id, "hint-late", best.migrate_from, best.hits)
        # Its KV is at the target, chosen by load when the hint came, seconds ago. A worker
        # that holds as much of it (the one it moved from keeps its copy) and costs less now
        # takes the turn instead: the hint widened the choice rather than fixing it.
        if (
            best.worker_id != target
            and best.migrate_from is None
            and best.hits.blocks >= hits.blocks
            and self.cost(live[best.worker_id], turn, best.hits)
            < self.cost(live[target], turn, hits)  # type: ignore[index]
        ):
            return Placement(best.worker_id, "hint-rerouted", hits=best.hits)
        return Placement(target, "hinted", hits=hits)  # type: ignore[arg-type]

    def forget_session(self, session_id: str) -> None:
        self.hinted.pop(session_id, None)

    def on_hint_expired(self, session_id: str) -> None:
        self.hinted.pop(session_id, None)


_POLICIES: dict[str, type[PlacementPolicy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, Sticky, KVAware, Symphony)
}


def make_policy(name: str, index: KVIndex, costs: CostParams | None = None) -> PlacementPolicy:
    if name == "mell":  # MELL's packer lives in its own modules (they import this one)
        from cadenza.cluster.mell import Mell

        return Mell(index, costs)
    try:
        return _POLICIES[name](index, costs)
    except KeyError:
        raise ValueError(
            f"routing policy must be one of {', '.join(POLICY_NAMES)}; got {name!r}"
        ) from None
