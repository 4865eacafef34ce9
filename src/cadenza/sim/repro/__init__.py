"""Reproductions of the papers Cadenza implements, on the simulator (``cadenza simulate
reproduce NAME``): SYMPHONY, MELL, Pensieve, Continuum, and a map of where hints pay.

Each reproduction is a module with ``run(options) -> Report``: it builds its workloads, runs
the simulator (the real engine core and placement policies under a cost model) through the
public API (``SimConfig``, ``Simulation``, the metrics' ``TurnRecord``), and reports every
number from those runs next to the paper's, as ``docs/benchmarks/repro-<name>.{json,md,png}``.
"""

from __future__ import annotations

NAMES = ("symphony", "mell", "pensieve", "continuum", "hint-regimes")
