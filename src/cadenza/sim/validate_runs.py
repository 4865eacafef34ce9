"""The validation's calibrations and its runs: each trace on the real engine and on the
simulator under one configuration.

For a multi-worker configuration with a contention probe (``validate_contention``), the
simulator's cost model is the single engine's calibration scaled by the probe's slowdown at
the neighbours' busy fraction, found by iterating the simulation to a fixed point: simulate,
read how busy the workers were, scale, simulate again (at most :data:`MAX_ITERATIONS` times,
until the busy fraction moves less than :data:`TOLERANCE`). Only the calibration and the probe
go in; nothing is taken from the real run. The real router is then given the placement costs
of the same final cost model, so both routers weigh moving KV against recomputing it alike.

With a drift probe (``validate_drift``), the single engine's calibration is first scaled by
how much slower or faster the machine steps just before the run than right after the
calibration; the contention then applies on top.

After the real run, a diagnostic (``at_real_speed``, reported apart from the prediction):
the simulation re-run with every step cost scaled until its mean step time equals the real
run's, which separates the machine's speed drift from the model's own error.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cadenza.sim.trace import TraceTurn
from cadenza.sim.validate_contention import Contention, neighbour_busy
from cadenza.sim.validate_diagnose import diagnostics, explain, mean_step_s
from cadenza.sim.validate_drift import Drift
from cadenza.sim.validate_errors import compare
from cadenza.sim.validate_traces import TraceSpec

MODEL = "smollm2-135m"
MAX_ITERATIONS = 5
SPEED_ITERATIONS = 4
TOLERANCE = 0.02


def calibrate_base(out: Path, *, threads: int, quick: bool, log: Callable[[str], None]) -> str:
    """Run ``cadenza simulate calibrate``'s profiling and fit; the file written."""
    from cadenza.sim.calibrate import calibrate, write_calibration

    start = time.perf_counter()
    cal, machine = calibrate(MODEL, num_threads=threads, quick=quick)
    path = str(write_calibration(out, cal, machine))
    log(
        f"calibrated in {time.perf_counter() - start:.0f} s (median fit error"
        f" {cal.median_rel_error:.0%}): {path}"
    )
    return path


def probe_contention(
    engines: int, *, threads: int, rounds: int, log: Callable[[str], None]
) -> Contention:
    from cadenza.sim.validate_contention import measure

    start = time.perf_counter()
    contention = measure(MODEL, engines, threads=threads, rounds=rounds)
    log(
        f"{engines} engines stepping at once: prefill x{contention.prefill_factor:.2f},"
        f" decode x{contention.decode_factor:.2f} (probed in {time.perf_counter() - start:.0f} s)"
    )
    return contention


def simulate_run(
    turns: Sequence[TraceTurn],
    config: Any,
    calibration: str,
    contention: Contention | None,
    workdir: Path,
) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The simulated metrics, the calibration file they were priced with (scaled ones are
    written in ``workdir``), and how the contention was applied (empty without one)."""
    from cadenza.bench.trace_replay import sim_config
    from cadenza.sim.calibrate import write_calibration
    from cadenza.sim.cpu_cost import load_calibration
    from cadenza.sim.simulator import simulate

    metrics = simulate(sim_config(config, calibration), turns)
    if contention is None or config.workers < 2:
        return metrics, calibration, {}
    base = load_calibration(calibration)
    busy, iterations, path = 0.0, 0, calibration
    for iterations in range(1, MAX_ITERATIONS + 1):
        measured = neighbour_busy(metrics)
        if iterations > 1 and abs(measured - busy) < TOLERANCE:
            break
        busy = measured
        scaled = contention.apply(base, busy)
        path = str(write_calibration(workdir / f"cal-{iterations}.json", scaled, {}))
        metrics = simulate(sim_config(config, path), turns)
    prefill, decode = contention.at(busy)
    info = {
        "neighbour_busy": busy,
        "prefill_factor": prefill,
        "decode_factor": decode,
        "iterations": iterations,
    }
    return metrics, path, info


def at_drift(calibration: str, drift: Drift | None, workdir: Path) -> str:
    """The calibration file to price a run with: ``calibration`` scaled by the machine's
    ``drift`` since it was made (written in ``workdir``), or as is without a probe."""
    from cadenza.sim.calibrate import write_calibration
    from cadenza.sim.cpu_cost import load_calibration

    if drift is None:
        return calibration
    drifted = drift.apply(load_calibration(calibration))
    return str(write_calibration(workdir / "drifted.json", drifted, {}))


def scaled_by(calibration: Any, factor: float) -> Any:
    """``calibration`` with every step cost times ``factor`` (copy bandwidths unchanged)."""
    return calibration.scaled(prefill=factor, decode=factor)


def at_real_speed(
    turns: Sequence[TraceTurn],
    config: Any,
    calibration: str,
    real: dict[str, Any],
    simulated: dict[str, Any],
    workdir: Path,
) -> dict[str, Any] | None:
    """A diagnostic, not a prediction: the simulation re-run with every step cost scaled until
    its mean step time matches the real run's. What error is left is the model's structure
    (batching, routing, hand-offs), not the machine's speed. None without steps to compare."""
    from cadenza.bench.trace_replay import sim_config
    from cadenza.sim.calibrate import write_calibration
    from cadenza.sim.cpu_cost import load_calibration
    from cadenza.sim.simulator import simulate

    real_step = mean_step_s(real)
    base = load_calibration(calibration)
    metrics, factor = simulated, 1.0
    for i in range(SPEED_ITERATIONS):
        sim_step = mean_step_s(metrics)
        if not real_step or not sim_step:
            return None
        ratio = real_step / sim_step
        if abs(ratio - 1) < TOLERANCE:
            break
        factor *= ratio
        path = write_calibration(workdir / f"speed-{i}.json", scaled_by(base, factor), {})
        metrics = simulate(sim_config(config, str(path)), turns)
    return {
        "speed_factor": factor,
        "step_s": {"real": real_step, "simulated": mean_step_s(metrics)},
        "cells": [c.to_json() for c in compare(real, metrics)],
    }


def run_pair(
    turns: Sequence[TraceTurn],
    config: Any,
    calibration: str,
    contention: Contention | None,
    source: Any,
    drift: Drift | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The real and the simulated metrics of one trace under one configuration, and a dict
    of how the simulator's cost model was adjusted for the machine's speed (``drift``, None
    without a probe) and contention (``contention``, empty without) and the at-real-speed
    diagnostic (``at_real_speed``)."""
    from cadenza.bench.trace_replay import placement_costs, replay_trace

    with tempfile.TemporaryDirectory(prefix="cadenza-simval-") as tmp:
        calibration = at_drift(calibration, drift, Path(tmp))
        simulated, priced_with, contention_info = simulate_run(
            turns, config, calibration, contention, Path(tmp)
        )
        costs = placement_costs(config, priced_with) if config.workers > 1 else None
        if contention_info:
            contention_info["calibration"] = json.loads(
                Path(priced_with).read_text(encoding="utf-8")
            )
        real = replay_trace(turns, config, source=source, costs=costs)
        speed = at_real_speed(turns, config, priced_with, real, simulated, Path(tmp))
    return (
        real,
        simulated,
        {
            "drift": drift.to_json() if drift is not None else None,
            "contention": contention_info,
            "at_real_speed": speed,
        },
    )


def run_entry(
    spec: TraceSpec,
    workers: int,
    real: dict[str, Any],
    simulated: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One run of the report: both metric documents, the error cells, the diagnosis, and
    ``extra`` (``run_pair``'s contention and at-real-speed details)."""
    cells = compare(real, simulated)
    extra = extra or {}
    return {
        "name": f"{spec.name}x{workers}",
        "trace": spec.kind,
        "rate": spec.rate,
        "workers": workers,
        "drift": extra.get("drift"),
        "contention": extra.get("contention") or {},
        "at_real_speed": extra.get("at_real_speed"),
        "real": real,
        "simulated": simulated,
        "cells": [c.to_json() for c in cells],
        "diagnostics": diagnostics(real, simulated),
        "why": explain(real, simulated, cells),
    }
