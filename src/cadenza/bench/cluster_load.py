"""Per-worker load over a trial, seen from outside: ``GET /v1/cluster/workers`` polled from the
load client's event loop, and the imbalance it shows.

A worker's *outstanding* requests are the larger of what the router has placed there and not
seen finish (``load.in_flight``) and what the worker last reported running plus waiting: the
router's count is current, the worker's snapshot can lag a pull behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

POLL_S = 0.5


def outstanding_of(worker: dict[str, Any]) -> int:
    load = worker.get("load") or {}
    snapshot = int(load.get("running") or 0) + int(load.get("waiting") or 0)
    return max(int(load.get("in_flight") or 0), snapshot)


@dataclass
class LoadSamples:
    """``(seconds since the trial start, {worker id: outstanding})`` every poll; alive workers
    only (a dead worker carries no load and is not part of the balance)."""

    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    errors: int = 0

    def add(self, t: float, workers: Sequence[dict[str, Any]]) -> None:
        alive = {
            str(w["id"]): outstanding_of(w)
            for w in workers
            if w.get("state", "alive") in ("alive", "draining", "drained")
        }
        if alive:
            self.samples.append((t, alive))

    async def poll(self, http: httpx.AsyncClient, t0: float, every_s: float = POLL_S) -> None:
        """Sample until cancelled (a failed poll is counted and skipped)."""
        while True:
            try:
                resp = await http.get("/v1/cluster/workers", timeout=5.0)
                resp.raise_for_status()
                self.add(time.monotonic() - t0, resp.json().get("data") or [])
            except (httpx.HTTPError, ValueError):
                self.errors += 1
            await asyncio.sleep(every_s)


def imbalance(samples: Sequence[tuple[float, dict[str, int]]]) -> dict[str, Any]:
    """The trial's imbalance: the mean over samples of max / mean outstanding (1.0 = balanced;
    only samples where anything was outstanding, as the router's own gauge), the mean and the
    largest max - min, and the mean outstanding per worker. Samples are evenly spaced, so
    means over samples are time means."""
    ratios: list[float] = []
    gaps: list[int] = []
    per_worker: dict[str, list[int]] = {}
    for _, loads in samples:
        values = list(loads.values())
        mean = sum(values) / len(values)
        gaps.append(max(values) - min(values))
        if mean > 0:
            ratios.append(max(values) / mean)
        for wid, v in loads.items():
            per_worker.setdefault(wid, []).append(v)
    return {
        "samples": len(samples),
        "busy_samples": len(ratios),
        "max_over_mean": sum(ratios) / len(ratios) if ratios else None,
        "max_minus_min_mean": sum(gaps) / len(gaps) if gaps else None,
        "max_minus_min_max": max(gaps) if gaps else None,
        "mean_outstanding_by_worker": {
            wid: sum(v) / len(v) for wid, v in sorted(per_worker.items())
        },
    }


def series(samples: Sequence[tuple[float, dict[str, int]]]) -> dict[str, list[float]]:
    """Columns for the JSON and the plot: time, and max / mean and max - min per sample."""
    t, ratio, gap = [], [], []
    for ts, loads in samples:
        values = list(loads.values())
        mean = sum(values) / len(values)
        t.append(round(ts, 2))
        ratio.append(max(values) / mean if mean > 0 else 1.0)
        gap.append(float(max(values) - min(values)))
    return {"t_s": t, "max_over_mean": ratio, "max_minus_min": gap}
