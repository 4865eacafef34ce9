"""One ``EngineStats`` for the whole cluster: the workers' counters summed (the server's
``/metrics`` renders it exactly as it renders one engine's)."""

from __future__ import annotations

from collections import Counter
from dataclasses import fields
from typing import Any

from cadenza.core.engine_core import LoadSnapshot
from cadenza.engine_api import EngineStats


def _sum_dicts(dicts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    present = [d for d in dicts if d is not None]
    if not present:
        return None
    out: dict[str, Any] = {}
    for d in present:
        for key, value in d.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, dict):
                out[key] = _sum_dicts([out.get(key), value])
            else:
                out.setdefault(key, value)
    return out


def sum_loads(loads: list[LoadSnapshot]) -> LoadSnapshot:
    values = {
        f.name: (
            max(getattr(x, f.name) for x in loads)
            if f.name == "time"
            else sum(getattr(x, f.name) for x in loads)
        )
        for f in fields(LoadSnapshot)
    }
    return LoadSnapshot(**values)


def merge_stats(stats: list[EngineStats]) -> EngineStats | None:
    if not stats:
        return None
    if len(stats) == 1:
        return stats[0]
    aborted: Counter[str] = Counter()
    for s in stats:
        aborted.update(s.num_aborted)
    usage = sum(s.device_usage * s.load.device_blocks_total for s in stats)
    total = sum(s.load.device_blocks_total for s in stats)
    return EngineStats(
        load=sum_loads([s.load for s in stats]),
        num_aborted=dict(aborted),
        prefix_queries=sum(s.prefix_queries for s in stats),
        prefix_hits=sum(s.prefix_hits for s in stats),
        device_cached_blocks=sum(s.device_cached_blocks for s in stats),
        device_usage=usage / total if total else 0.0,
        tier_stats=_sum_dicts([s.tier_stats for s in stats]) or {},
        disk_stats=_sum_dicts([s.disk_stats for s in stats]),
        disk_capacity_bytes=sum(s.disk_capacity_bytes for s in stats),
        disk_used_bytes=sum(s.disk_used_bytes for s in stats),
        import_rejected_chunks=sum(s.import_rejected_chunks for s in stats),
        host_checksum_failures=sum(s.host_checksum_failures for s in stats),
    )
