"""What every reproduction shares: its options, one simulator run (optionally cached on disk,
so a sweep can be resumed or split over several invocations), and statistics over a run's
per-turn records (a measurement window, per-worker load over time, a bound's crossing).

A run goes through the simulator's public API only: ``Simulation(SimConfig, turns).run()``
for the metrics and ``simulation.client.records`` (the ``TurnRecord`` of every finished turn)
for what the metrics do not summarise.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cadenza.sim.metrics import TurnRecord, distribution
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import Simulation
from cadenza.sim.trace import TraceTurn, dumps_turn

# Bump when what a cached run holds changes meaning.
CACHE_VERSION = 1
# The last few runs of this process, so a reproduction that needs one run twice (a sweep
# point and a robustness baseline) runs it once even without a cache directory.
_MEMO: dict[str, RunResult] = {}
MEMO_SIZE = 8


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    """How a reproduction runs: ``quick`` (a smoke run of about a minute), ``scale`` (the
    virtual duration and sweep size relative to the full run), the inputs and the outputs."""

    quick: bool = False
    scale: float = 1.0
    out_dir: Path = Path("docs/benchmarks")
    data: str | None = None  # ShareGPT file (default: the shared sample, else synthetic)
    azure: str | None = None  # Azure 2023 conversation CSV (default: the shared copy)
    cache_dir: Path | None = None  # keep every run's result here, keyed by its inputs
    seed: int = 0
    only: tuple[str, ...] = ()  # restrict a sweep: "gpu=H100", "arrival=azure", ...
    log: Callable[[str], None] = _stderr

    def selected(self, key: str, value: str) -> bool:
        """Whether ``key=value`` passes the ``only`` filters (filters on other keys pass)."""
        wanted = [f.split("=", 1)[1] for f in self.only if f.split("=", 1)[0] == key]
        return not wanted or value in wanted


@dataclass
class RunResult:
    label: str
    metrics: dict[str, Any]
    records: list[TurnRecord]
    extra: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    cached: bool = False


class Hook(Protocol):
    """Adds events to a simulation before it runs (false hints); ``install`` returns what to
    report once it ran, and ``key`` goes into the cache key."""

    @property
    def key(self) -> str: ...

    def install(self, sim: Simulation) -> Callable[[], dict[str, Any]]: ...


def run_key(config: SimConfig, turns: Sequence[TraceTurn], hook: Hook | None) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, config.describe()], sort_keys=True).encode())
    for turn in turns:
        digest.update(dumps_turn(turn).encode())
        digest.update(b"\n")
    digest.update((hook.key if hook else "").encode())
    return digest.hexdigest()[:24]


def run_sim(
    config: SimConfig,
    turns: Sequence[TraceTurn],
    options: Options,
    label: str,
    hook: Hook | None = None,
) -> RunResult:
    """One simulator run (or its cached result, when ``options.cache_dir`` holds it)."""
    key = run_key(config, turns, hook)
    if key in _MEMO:
        options.log(f"  {label}: same as an earlier run")
        return dataclasses.replace(_MEMO[key], label=label)
    path = options.cache_dir / f"{key}.json.gz" if options.cache_dir else None
    if path is not None and path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            saved = json.load(f)
        records = [TurnRecord(**row) for row in saved["records"]]
        options.log(f"  {label}: cached ({len(records)} turns)")
        result = RunResult(label, saved["metrics"], records, saved["extra"], saved["wall_s"], True)
        return _remember(key, result)
    start = time.perf_counter()
    sim = Simulation(config, turns)
    report = hook.install(sim) if hook else None
    metrics = sim.run()
    records = list(sim.client.records)
    extra = report() if report else {}
    wall = time.perf_counter() - start
    options.log(
        f"  {label}: {metrics['turns']} turns, {metrics['duration_s']:.0f} virtual s,"
        f" mean e2e {metrics['e2e_s']['mean']:.3f} s in {wall:.1f} s"
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [dataclasses.asdict(r) for r in records]
        payload = {"metrics": metrics, "records": rows, "extra": extra, "wall_s": wall}
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(payload, f)
    return _remember(key, RunResult(label, metrics, records, extra, wall))


def _remember(key: str, result: RunResult) -> RunResult:
    _MEMO[key] = result
    while len(_MEMO) > MEMO_SIZE:
        del _MEMO[next(iter(_MEMO))]
    return result


# ------------------------------------------------------------------------------ statistics


def window_stats(records: Sequence[TurnRecord], start: float, end: float) -> dict[str, Any]:
    """Latency of the turns that arrived in ``[start, end)`` and the output rate of the turns
    that finished in it (a steady-state view that leaves out warm-up and drain)."""
    inside = [r for r in records if start <= r.arrival_s < end]
    finished = [r for r in records if start <= r.finish_s < end]
    span = max(end - start, 1e-9)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in inside if r.output_tokens > 1]
    return {
        "window_s": [start, end],
        "turns": len(inside),
        "e2e_s": distribution([r.e2e_s for r in inside]),
        "ttft_s": distribution([r.ttft_s for r in inside]),
        "tpot_s": distribution(tpot),
        "queue_s": distribution([r.submitted_s - r.arrival_s for r in inside]),
        "normalized_latency_s": distribution([r.e2e_s / r.output_tokens for r in inside]),
        "turns_per_s": len(finished) / span,
        "output_tokens_per_s": sum(r.output_tokens for r in finished) / span,
        "prompt_tokens": sum(r.prompt_tokens for r in inside),
        "computed_prompt_tokens": sum(r.prompt_tokens - r.cached_tokens for r in inside),
        "redundant_tokens": sum(r.redundant_tokens for r in inside),
    }


def outstanding_series(
    records: Sequence[TurnRecord], workers: Sequence[str], step_s: float, end_s: float
) -> tuple[list[float], dict[str, list[int]]]:
    """Requests outstanding (submitted, not finished) on each worker, sampled every
    ``step_s`` from 0 to ``end_s``: a turn counts on its worker from ``submitted_s`` to
    ``finish_s``, which is the engine's running plus waiting requests."""
    events: dict[str, list[tuple[float, int]]] = {w: [] for w in workers}
    for r in records:
        events.setdefault(r.worker, []).extend(((r.submitted_s, 1), (r.finish_s, -1)))
    times = [k * step_s for k in range(int(end_s / step_s) + 1)]
    series: dict[str, list[int]] = {}
    for worker, evs in events.items():
        evs.sort()
        out, level, i = [], 0, 0
        for t in times:
            while i < len(evs) and evs[i][0] <= t:
                level += evs[i][1]
                i += 1
            out.append(level)
        series[worker] = out
    return times, series


def spread(series: dict[str, list[int]]) -> list[int]:
    """Busiest minus idlest worker at each sample."""
    columns = list(zip(*series.values(), strict=True))
    return [max(c) - min(c) for c in columns]


def log_crossing(points: Sequence[tuple[float, float]], bound: float) -> tuple[float, bool]:
    """The largest x (points sorted by x > 0) whose y stays within ``bound``: the last point
    within it, interpolated in log x towards the first point past it. Returns (x, capped):
    capped when no point passes the bound (the sweep's largest x is a lower bound); 0 when
    the first point already does."""
    ordered = sorted(points)
    for i, (x, y) in enumerate(ordered):
        if y > bound:
            if i == 0:
                return 0.0, False
            x0, y0 = ordered[i - 1]
            frac = (bound - y0) / (y - y0) if y != y0 else 0.0
            return math.exp(math.log(x0) + frac * (math.log(x) - math.log(x0))), False
    return (ordered[-1][0] if ordered else 0.0), True


def linear_crossing(
    points: Sequence[tuple[float, float]], bound: float
) -> tuple[float | None, bool]:
    """For points ``(x, y)`` in sweep order: the x where y first rises past ``bound``,
    interpolated linearly (None if the first point is already past it; capped when none is)."""
    for i, (x, y) in enumerate(points):
        if y > bound:
            if i == 0:
                return None, False
            x0, y0 = points[i - 1]
            frac = (bound - y0) / (y - y0) if y != y0 else 0.0
            return x0 + frac * (x - x0), False
    return (points[-1][0] if points else None), True


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None
