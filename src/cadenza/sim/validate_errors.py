"""The error table of the simulator's validation: what is compared, how the error is counted,
and which errors are within target.

Each compared quantity (:data:`METRICS`) is read from a ``cadenza.trace-metrics/1`` document by
a key path, on the real run and on the simulated run of the same trace and settings. Its error
is relative to the measurement, signed (positive: the simulator predicts more):
``(simulated - real) / real``. Two zeros agree exactly (error 0); a zero measurement with a
non-zero prediction has no relative error (``None``) and counts as a miss. Targets (the issue's):
10% on means and totals, 15% on 90th percentiles.

Torch-free and I/O-free: the report writer and the tests use it on plain dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MEAN_TARGET = 0.10
P90_TARGET = 0.15


@dataclass(frozen=True)
class Metric:
    key: str  # short name in tables and JSON
    label: str
    path: tuple[str, ...]  # where it is in a metrics document
    target: float
    unit: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("ttft_mean", "TTFT mean", ("ttft_s", "mean"), MEAN_TARGET, "s"),
    Metric("ttft_p90", "TTFT p90", ("ttft_s", "p90"), P90_TARGET, "s"),
    Metric("e2e_mean", "E2E mean", ("e2e_s", "mean"), MEAN_TARGET, "s"),
    Metric(
        "throughput",
        "throughput (output tok/s)",
        ("throughput", "output_tokens_per_s"),
        MEAN_TARGET,
        "tok/s",
    ),
    Metric("cached_device", "cached tokens, device", ("cached_tokens_by_tier", "device"), 0.10),
    Metric("cached_host", "cached tokens, host", ("cached_tokens_by_tier", "host"), 0.10),
    Metric("cached_disk", "cached tokens, disk", ("cached_tokens_by_tier", "disk"), 0.10),
    Metric("migrations", "migrations", ("migrations", "count"), 0.10),
)


@dataclass(frozen=True)
class Cell:
    """One compared quantity of one run."""

    metric: str
    real: float
    simulated: float
    error: float | None  # (simulated - real) / real; None when real is 0 and simulated is not
    target: float

    @property
    def within(self) -> bool:
        return self.error is not None and abs(self.error) <= self.target + 1e-12

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "real": self.real,
            "simulated": self.simulated,
            "error": self.error,
            "target": self.target,
            "within": self.within,
        }


def lookup(metrics: Mapping[str, Any], path: Sequence[str]) -> float:
    value: Any = metrics
    for key in path:
        value = value.get(key, 0) if isinstance(value, Mapping) else 0
    return float(value or 0)


def relative_error(real: float, simulated: float) -> float | None:
    if real == 0:
        return 0.0 if simulated == 0 else None
    return (simulated - real) / abs(real)


def compare(
    real: Mapping[str, Any], simulated: Mapping[str, Any], metrics: Iterable[Metric] = METRICS
) -> list[Cell]:
    """The cells of one run: each metric, real against simulated."""
    cells = []
    for m in metrics:
        r, s = lookup(real, m.path), lookup(simulated, m.path)
        cells.append(Cell(m.key, r, s, relative_error(r, s), m.target))
    return cells


def summarize(runs: Sequence[Sequence[Cell]]) -> dict[str, dict[str, Any]]:
    """Per metric over all runs: how many are within target, the mean and the worst absolute
    error (over the runs that have one), and how many have none (zero measured)."""
    out: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        cells = [c for run in runs for c in run if c.metric == m.key]
        errors = [abs(c.error) for c in cells if c.error is not None]
        out[m.key] = {
            "runs": len(cells),
            "within": sum(c.within for c in cells),
            "mean_abs_error": sum(errors) / len(errors) if errors else None,
            "max_abs_error": max(errors) if errors else None,
            "undefined": sum(c.error is None for c in cells),
            "target": m.target,
        }
    return out


def format_error(error: float | None) -> str:
    if error is None:
        return "n/a"
    if not math.isfinite(error):
        return "inf"
    return f"{error * 100:+.1f}%"


def metric(key: str) -> Metric:
    for m in METRICS:
        if m.key == key:
            return m
    raise KeyError(key)
