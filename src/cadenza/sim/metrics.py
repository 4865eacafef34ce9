"""The metrics of a session-trace run: one JSON schema for the simulator and the real replay.

Both ``cadenza simulate --trace`` and the real-engine replay of a trace produce one
``TurnRecord`` per turn and hand them, with run totals, to :func:`build_metrics`; the result is
written by :func:`dumps_metrics`, which is byte-stable (keys sorted, floats rounded to the
microsecond), so equal runs give equal files. Torch-free: importable by either side.

Schema ``cadenza.trace-metrics/1``::

    schema, source ("simulator" | "engine"), config {...}   what ran
    turns, sessions, rejected_turns                          counts
    duration_s                                               first arrival to last finish
    ttft_s, e2e_s, tpot_s, queue_s                           {mean, p50, p90, p99, max}
    throughput {turns_per_s, output_tokens_per_s, prompt_tokens_per_s}
    tokens {prompt, output, history, cached, computed_prompt, redundant}
    cached_tokens_by_tier {device, host, disk}
    migrations {count, blocks, bytes, seconds_total, seconds_mean, by_trigger {...}}
    placements {reason: count}
    workers {id: {turns, busy_s, steps, preemptions, ...}}

TTFT is arrival to first token; end-to-end is arrival to the last token; TPOT is
(end-to-end - TTFT) / (output tokens - 1) over turns with more than one output token; queue is
arrival to submission to a worker (placement waits, such as a KV migration). Percentiles are
nearest-rank (an observed value), as in the replay report.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "cadenza.trace-metrics/1"
TIERS = ("device", "host", "disk")
PERCENTILES = (50, 90, 99)


@dataclass
class TurnRecord:
    session_id: str
    turn: int
    worker: str
    arrival_s: float
    submitted_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    history_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    redundant_tokens: int = 0
    placement: str = ""

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


@dataclass
class MigrationRecord:
    session_id: str
    src: str
    dst: str
    trigger: str  # "placement" (the turn waits for it) or "hint" (ahead of the turn)
    blocks: int
    bytes: int
    start_s: float
    done_s: float

    @property
    def seconds(self) -> float:
        return self.done_s - self.start_s


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def distribution(values: Sequence[float]) -> dict[str, float]:
    out = {"mean": sum(values) / len(values) if values else 0.0}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(values, q)
    out["max"] = max(values) if values else 0.0
    return out


def build_metrics(
    records: Sequence[TurnRecord],
    *,
    source: str,
    config: Mapping[str, Any],
    migrations: Sequence[MigrationRecord] = (),
    placements: Mapping[str, int] | None = None,
    workers: Mapping[str, Mapping[str, Any]] | None = None,
    rejected_turns: int = 0,
) -> dict[str, Any]:
    turns = sorted(records, key=lambda r: (r.arrival_s, r.session_id, r.turn))
    start = min((r.arrival_s for r in turns), default=0.0)
    end = max((r.finish_s for r in turns), default=0.0)
    duration = max(end - start, 0.0)
    by_tier: Counter[str] = Counter({tier: 0 for tier in TIERS})
    for r in turns:
        by_tier.update(r.cached_by_tier)
    prompt = sum(r.prompt_tokens for r in turns)
    output = sum(r.output_tokens for r in turns)
    cached = sum(r.cached_tokens for r in turns)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in turns if r.output_tokens > 1]
    moved = list(migrations)
    triggers = Counter(m.trigger for m in moved)

    def per_s(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    return {
        "schema": SCHEMA,
        "source": source,
        "config": dict(config),
        "turns": len(turns),
        "sessions": len({r.session_id for r in turns}),
        "rejected_turns": rejected_turns,
        "duration_s": duration,
        "ttft_s": distribution([r.ttft_s for r in turns]),
        "e2e_s": distribution([r.e2e_s for r in turns]),
        "tpot_s": distribution(tpot),
        "queue_s": distribution([r.submitted_s - r.arrival_s for r in turns]),
        "throughput": {
            "turns_per_s": per_s(len(turns)),
            "output_tokens_per_s": per_s(output),
            "prompt_tokens_per_s": per_s(prompt),
        },
        "tokens": {
            "prompt": prompt,
            "output": output,
            "history": sum(r.history_tokens for r in turns),
            "cached": cached,
            "computed_prompt": prompt - cached,
            "redundant": sum(r.redundant_tokens for r in turns),
        },
        "cached_tokens_by_tier": dict(by_tier),
        "migrations": {
            "count": len(moved),
            "blocks": sum(m.blocks for m in moved),
            "bytes": sum(m.bytes for m in moved),
            "seconds_total": sum(m.seconds for m in moved),
            "seconds_mean": sum(m.seconds for m in moved) / len(moved) if moved else 0.0,
            "by_trigger": dict(triggers),
        },
        "placements": dict(placements or {}),
        "workers": {k: dict(v) for k, v in (workers or {}).items()},
    }


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v) for v in obj]
    return obj


def dumps_metrics(metrics: Mapping[str, Any]) -> str:
    """The metrics as stable JSON text (sorted keys, floats to 6 decimals, newline at end)."""
    return json.dumps(_rounded(metrics), indent=2, sort_keys=True) + "\n"


def turn_rows(records: Iterable[TurnRecord]) -> list[dict[str, Any]]:
    """Per-turn rows (for a ``--turns`` dump next to the summary)."""
    rows = []
    for r in records:
        row = dict(r.__dict__)
        row["ttft_s"], row["e2e_s"] = r.ttft_s, r.e2e_s
        rows.append(row)
    return rows
