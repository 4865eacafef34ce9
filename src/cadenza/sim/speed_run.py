"""Timing the simulator: one run's wall and CPU seconds, events and steps, and the grids of runs
``cadenza simulate speed`` reports (time against workers, time against requests, and the
headline: the whole Mooncake hour on 16 workers).

A run is timed from building the ``Simulation`` to its metrics (what ``cadenza simulate`` does
after reading the trace), in this process: CPU seconds are the process's (user + system), wall
seconds what a clock on the wall saw — on a shared machine the two differ by the other load.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import Simulation
from cadenza.sim.trace import TraceTurn

HEADLINE_WORKERS = 16
TARGET_CPU_S = 300.0  # the "under 5 minutes on this machine"


@dataclass(frozen=True)
class SpeedPoint:
    sweep: str  # "workers", "requests" or "headline"
    workers: int
    requests: int  # turns in the trace slice
    completed: int  # turns the run finished
    arrivals_s: float  # span of the slice's recorded arrivals
    simulated_s: float  # virtual time the run covered (its metrics' duration)
    wall_s: float
    cpu_s: float
    events: int
    steps: int

    @property
    def events_per_s(self) -> float:
        return self.events / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall second."""
        return self.simulated_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "events_per_s": self.events_per_s, "speedup": self.speedup}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SpeedPoint:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def arrival_span(turns: Sequence[TraceTurn]) -> float:
    arrivals = [t.arrival_s for t in turns if t.arrival_s is not None]
    return max(arrivals) - min(arrivals) if arrivals else 0.0


def measure(config: SimConfig, turns: Sequence[TraceTurn], sweep: str) -> SpeedPoint:
    """Run ``turns`` under ``config`` once and time it."""
    gc.collect()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sim = Simulation(config, turns)
    metrics = sim.run()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return SpeedPoint(
        sweep=sweep,
        workers=config.workers,
        requests=len(turns),
        completed=int(metrics["turns"]),
        arrivals_s=arrival_span(turns),
        simulated_s=float(metrics["duration_s"]),
        wall_s=wall,
        cpu_s=cpu,
        events=sim.events.num_events,
        steps=sum(w.executor.num_steps for w in sim.workers),
    )


@dataclass(frozen=True)
class Grid:
    workers: tuple[int, ...]  # the worker sweep, over the first ``sweep_requests`` turns
    sweep_requests: int
    requests: tuple[int, ...]  # the request sweep, on ``request_workers`` workers
    request_workers: int = HEADLINE_WORKERS
    headline: bool = True  # every turn on ``HEADLINE_WORKERS`` workers


def run_grid(
    base: SimConfig,
    turns: Sequence[TraceTurn],
    grid: Grid,
    progress: Callable[[SpeedPoint], None] | None = None,
) -> list[SpeedPoint]:
    """Every run of ``grid`` over ``turns`` (slices are the first N turns), in order: the
    worker sweep, the request sweep, then the headline."""
    plan: list[tuple[str, int, int]] = [
        ("workers", w, min(grid.sweep_requests, len(turns))) for w in grid.workers
    ]
    plan += [("requests", grid.request_workers, min(n, len(turns))) for n in grid.requests]
    if grid.headline:
        plan.append(("headline", HEADLINE_WORKERS, len(turns)))
    points = []
    for sweep, workers, n in plan:
        config = dataclasses.replace(base, workers=workers)
        point = measure(config, turns[:n], sweep)
        points.append(point)
        if progress is not None:
            progress(point)
    return points


def machine() -> dict[str, Any]:
    """What the timings ran on."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpu": model or os.uname().machine,
        "cpus": os.cpu_count() or 0,
        "python": ".".join(map(str, sys.version_info[:3])),
        "load_average": [round(x, 2) for x in load],
        "niceness": os.nice(0) if hasattr(os, "nice") else 0,
    }
