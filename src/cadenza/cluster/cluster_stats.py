"""Counters of what the router did: placements by reason, migrations, hint outcomes, load
imbalance, where prompt tokens came from. Plain numbers (torch-free, Ray-free), exported by the
server's ``/metrics`` and by ``cadenza bench cluster``.

Hint outcomes, per hinted turn (SYMPHONY's robustness questions):

* ``found`` — the turn ran on a worker that already held its KV (moved there ahead of time, or
  it was already there);
* ``late`` — it was hinted, but its KV was still on the way (or elsewhere) when it arrived;
* ``false`` — a hint that no turn followed before it expired;
* ``missing`` — a session turn that came with no hint.

``hinted_moves`` counts, among hinted turns whose KV the hint moved to another worker, those
that found it there (``found``) and those that did not (``late``): SYMPHONY's headline check.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

HINT_OUTCOMES = ("found", "late", "false", "missing")
MIGRATION_KINDS = ("hint", "turn", "live", "drain", "pack")
TOKEN_SOURCES = ("device", "host", "disk", "migrated", "recomputed", "new")


@dataclass
class MigrationRecord:
    kind: str  # one of MIGRATION_KINDS
    src: str
    dst: str
    num_bytes: int
    duration_s: float
    ok: bool


@dataclass
class ClusterStats:
    placements: Counter[str] = field(default_factory=Counter)  # by reason
    placements_by_worker: Counter[str] = field(default_factory=Counter)
    hint_outcomes: Counter[str] = field(default_factory=Counter)
    hinted_moves: Counter[str] = field(default_factory=Counter)  # found | late
    migrations: Counter[str] = field(default_factory=Counter)  # by kind
    migrations_aborted: Counter[str] = field(default_factory=Counter)
    migration_bytes: int = 0
    migration_seconds: float = 0.0
    recent_migrations: deque[MigrationRecord] = field(default_factory=lambda: deque(maxlen=256))
    tokens_by_source: Counter[str] = field(default_factory=Counter)
    failovers: int = 0  # requests resubmitted after their worker died
    worker_failures: int = 0
    live_migration_downtimes: list[tuple[float, int]] = field(default_factory=list)
    imbalance: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=4096)
    )  # (time, max outstanding, mean outstanding)

    def record_migration(self, record: MigrationRecord) -> None:
        self.recent_migrations.append(record)
        if record.ok:
            self.migrations[record.kind] += 1
            self.migration_bytes += record.num_bytes
            self.migration_seconds += record.duration_s
        else:
            self.migrations_aborted[record.kind] += 1

    def record_prompt(
        self,
        prompt_tokens: int,
        history_tokens: int,
        cached_by_tier: dict[str, int],
        migrated: int,
    ) -> None:
        """Where a turn's prompt tokens came from: cached by tier (migrated tokens are taken
        out of the tier they were found on at the destination), history computed again
        (``recomputed``: redundant prefill), and new tokens."""
        cached = sum(cached_by_tier.values())
        migrated = min(migrated, cached)
        left = migrated
        for tier in ("device", "host", "disk"):
            count = cached_by_tier.get(tier, 0)
            take = min(count, left)
            left -= take
            self.tokens_by_source[tier] += count - take
        self.tokens_by_source["migrated"] += migrated
        computed = max(prompt_tokens - cached, 0)
        recomputed = min(max(history_tokens - cached, 0), computed)
        self.tokens_by_source["recomputed"] += recomputed
        self.tokens_by_source["new"] += computed - recomputed

    def sample_load(self, now: float, outstanding: list[int]) -> None:
        if not outstanding:
            return
        mean = sum(outstanding) / len(outstanding)
        self.imbalance.append((now, float(max(outstanding)), mean))

    def imbalance_ratio(self) -> float:
        """Time-averaged max / mean outstanding requests over workers (1.0 = balanced),
        over samples where anything was outstanding."""
        ratios = [mx / mean for _, mx, mean in self.imbalance if mean > 0]
        return sum(ratios) / len(ratios) if ratios else 1.0

    def imbalance_gap(self) -> float:
        """Mean busiest-minus-average outstanding requests over samples."""
        gaps = [mx - mean for _, mx, mean in self.imbalance]
        return sum(gaps) / len(gaps) if gaps else 0.0
