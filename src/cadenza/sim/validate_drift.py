"""The machine's speed between the calibration and each real run: the validation's drift probe.

The real runs share this machine's two cores with whatever else runs, so an engine step can
take 10-20% longer or shorter than it did while the calibration profiled it, for minutes at a
time, and every simulated latency is off by as much. The at-real-speed diagnostic shows it
after the fact, from the real run's own step times; a prediction may not use those. This probe
measures the speed before each real run instead: the same fixed workload as the contention
probe (``validate_contention``: a batched prefill, then decode steps of the batch) on one
engine kept for the purpose, timed once right after the calibration (the reference) and again
just before each run. The simulation of that run is priced with the calibration scaled by the
ratio, prefill and decode terms apart (``CPUCalibration.scaled``), so it predicts the run from
the calibration and the probe only, never from the run itself.

The probe sees the machine for a few seconds; load that changes during the run itself is still
an error, which the diagnostic shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cadenza.sim.cpu_cost import CPUCalibration
from cadenza.sim.validate_contention import probe_engine, probe_steps, step_medians

ROUNDS = 3
SEED = 7  # the same prompts every time: the engine has prefix caching off, so each is computed


@dataclass(frozen=True)
class SpeedReading:
    """Median step seconds of the probe's workload, by kind."""

    prefill_s: float
    decode_s: float

    def to_json(self) -> dict[str, float]:
        return {"prefill_s": self.prefill_s, "decode_s": self.decode_s}


@dataclass(frozen=True)
class Drift:
    """How much slower (> 1) or faster the machine steps now than at the reference."""

    reference: SpeedReading
    now: SpeedReading

    @property
    def prefill_factor(self) -> float:
        return self.now.prefill_s / self.reference.prefill_s

    @property
    def decode_factor(self) -> float:
        return self.now.decode_s / self.reference.decode_s

    def apply(self, calibration: CPUCalibration) -> CPUCalibration:
        return calibration.scaled(prefill=self.prefill_factor, decode=self.decode_factor)

    def to_json(self) -> dict[str, Any]:
        return {
            "prefill_factor": self.prefill_factor,
            "decode_factor": self.decode_factor,
            "reference": self.reference.to_json(),
            "now": self.now.to_json(),
        }


class SpeedProbe:
    """One engine kept idle between readings (built once: loading the model takes longer than
    a reading)."""

    def __init__(self, model: str, *, threads: int, rounds: int = ROUNDS) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.rounds = rounds
        self._engine = probe_engine(model, threads)

    def read(self) -> SpeedReading:
        medians = step_medians(probe_steps(self._engine, SEED, self.rounds, None))
        return SpeedReading(medians["prefill"], medians["decode"])

    def close(self) -> None:
        self._engine.close()
