"""Which cached KV to give up first: LRU, or Pensieve's cost-aware retention value.

Pensieve values a 32-token chunk by ``V = Cost(l) / T``: ``Cost(l)`` is what recomputing the chunk
costs when it attends to ``l`` earlier tokens (its end position), ``T`` the time since its
conversation was last active. Evicting in ascending ``V`` drops idle conversations first and,
within one conversation, its *leading* chunks first (they are the cheapest to recompute). A
pinned entry (retention TTL not yet expired) always sorts after every unpinned one: pins are
soft, so under enough pressure they go too, last. Among pinned entries the one pinned longest
goes first: a pin lasts until its KV is expected back (a hint's turn, a tool call's return), so
this keeps the KV needed soonest (SYMPHONY's priority by expected arrival; Belady's rule).

Both policies rank plain ``(position, last_access, pin_until)`` triples, so the device pool, the
host tier and the simulator share them.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

EvictionPolicyName = Literal["lru", "cost"]
CHUNK_TOKENS = 32


class Evictable(Protocol):
    position: int  # index of the entry's first token in its sequence
    num_tokens: int
    last_access: float
    pin_until: float


T = TypeVar("T", bound=Evictable)


@dataclass(frozen=True)
class CostModel:
    """Recompute cost of one chunk against its end position, interpolated piecewise-linearly
    between profiled powers of two (and extrapolated linearly past the last point)."""

    positions: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.positions) < 2 or len(self.positions) != len(self.seconds):
            raise ValueError("a cost model needs at least two (position, seconds) points")
        if list(self.positions) != sorted(set(self.positions)):
            raise ValueError("cost model positions must be strictly increasing")

    @classmethod
    def linear(cls, base_s: float = 1e-3, per_token_s: float = 1e-6) -> CostModel:
        """A stand-in shape (constant + attention term) for tests and the simulator."""
        return cls((0, 1 << 16), (base_s, base_s + per_token_s * (1 << 16)))

    def __call__(self, position: int) -> float:
        xs, ys = self.positions, self.seconds
        i = bisect.bisect_right(xs, position) - 1
        i = min(max(i, 0), len(xs) - 2)
        x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
        return max(y0 + (y1 - y0) * (position - x0) / (x1 - x0), 1e-9)


def chunk_end(position: int, num_tokens: int) -> int:
    """End position of the 32-token chunk an entry starting at ``position`` belongs to."""
    end = position + num_tokens
    return -(-end // CHUNK_TOKENS) * CHUNK_TOKENS


class EvictionPolicy:
    """Ranks entries; ``choose`` returns the ``n`` to evict first."""

    name: EvictionPolicyName = "lru"

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def key(self, entry: Evictable, now: float) -> tuple[bool, float, float]:
        pinned = entry.pin_until > now
        return (pinned, -entry.pin_until if pinned else 0.0, entry.last_access)

    def choose(self, candidates: Iterable[T], n: int) -> list[T]:
        """The ``n`` lowest-ranked candidates; ties keep the candidates' order."""
        if n <= 0:
            return []
        now = self.clock()
        ranked = ((self.key(e, now), i, e) for i, e in enumerate(candidates))
        return [e for _, _, e in heapq.nsmallest(n, ranked, key=lambda t: (t[0], t[1]))]

    def value(self, entry: Evictable, now: float) -> float:
        """A retention value (higher = keep longer), for reports."""
        return entry.last_access


class LRUEviction(EvictionPolicy):
    name: EvictionPolicyName = "lru"


class CostAwareEviction(EvictionPolicy):
    name: EvictionPolicyName = "cost"

    def __init__(self, clock: Callable[[], float], cost: CostModel) -> None:
        super().__init__(clock)
        self.cost = cost

    def value(self, entry: Evictable, now: float) -> float:
        idle = max(now - entry.last_access, 1e-3)
        return self.cost(chunk_end(entry.position, entry.num_tokens)) / idle

    def key(self, entry: Evictable, now: float) -> tuple[bool, float, float]:
        pinned = entry.pin_until > now
        return (pinned, -entry.pin_until if pinned else 0.0, self.value(entry, now))


def make_eviction_policy(
    name: str, clock: Callable[[], float], cost: CostModel | None = None
) -> EvictionPolicy:
    if name == "lru":
        return LRUEviction(clock)
    if name == "cost":
        return CostAwareEviction(clock, cost or CostModel.linear())
    raise ValueError(f"kv eviction policy must be 'lru' or 'cost'; got {name!r}")


def profile_points(max_len: int) -> list[int]:
    """Positions Pensieve profiles at: 0 and powers of two up to ``max_len``."""
    points = [0]
    p = CHUNK_TOKENS
    while p <= max_len:
        points.append(p)
        p *= 2
    return points


def cost_model_from(points: Sequence[tuple[int, float]]) -> CostModel:
    pts = sorted(dict(points).items())
    # Recompute cost never falls with context length; smooth out timing noise.
    secs: list[float] = []
    for _, s in pts:
        secs.append(max(s, secs[-1]) if secs else s)
    return CostModel(tuple(p for p, _ in pts), tuple(secs))
