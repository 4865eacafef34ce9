"""How much slower a worker steps when its neighbours step too: the cluster's cost model.

The 2-worker cluster of the validation runs its workers as threads of one process on the same
cores (``--cluster-backend local``): their steps share the cores, the memory bandwidth (a
decode step of SmolLM2 reads all its weights) and the interpreter lock. The simulator prices a
worker's step from the calibration alone, as if it had the machine to itself. This probe
measures the difference: the same fixed workload — a batched prefill, then decode steps of the
batch — on one engine alone, then on ``engines`` engines at once in lockstep (a barrier before
every step, so every step has busy neighbours), each engine on its own thread with the same
torch threads as the cluster's workers. The ratio of step times, for prefill steps and for
decode steps separately, scales the single-engine calibration into the cluster's: prefill and
attention coefficients by the first, the fixed and per-sequence decode costs by the second.

Those factors hold when every neighbour is busy; in a run a worker's neighbours are busy only
part of the time. :meth:`Contention.at` interpolates: with a fraction ``u`` of the other workers
busy on average, a step is ``1 + (factor - 1) * u`` times the lone engine's. The validation
takes ``u`` from the simulation itself (the workers' busy time over the run) and iterates to a
fixed point (slower steps keep the workers busy longer), so the prediction uses the calibration
and the probe only, never the real run.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from cadenza.sim.cpu_cost import CPUCalibration

PROMPT_TOKENS = 64
BATCH = 4
DECODE_STEPS = 5
ROUNDS = 2


@dataclass(frozen=True)
class Contention:
    engines: int
    prefill_factor: float
    decode_factor: float
    alone: dict[str, float]  # median step seconds, by kind
    together: dict[str, float]

    def at(self, busy: float) -> tuple[float, float]:
        """(prefill, decode) slowdown with a fraction ``busy`` of the neighbours stepping."""
        u = min(max(busy, 0.0), 1.0)
        return 1 + (self.prefill_factor - 1) * u, 1 + (self.decode_factor - 1) * u

    def apply(self, calibration: CPUCalibration, busy: float = 1.0) -> CPUCalibration:
        """The calibration of a worker whose neighbours step a fraction ``busy`` of the time."""
        prefill, decode = self.at(busy)
        return calibration.scaled(prefill=prefill, decode=decode)

    def to_json(self) -> dict[str, Any]:
        return {
            "engines": self.engines,
            "prefill_factor": self.prefill_factor,
            "decode_factor": self.decode_factor,
            "alone_step_s": self.alone,
            "together_step_s": self.together,
        }


def probe_engine(model: str, threads: int) -> Any:
    from cadenza.config import EngineConfig
    from cadenza.engine import LLMEngine

    config = EngineConfig.from_options(
        model=model, num_threads=threads, enable_prefix_caching=False, kv_cost_model="linear"
    )
    return LLMEngine(config)


def probe_steps(
    engine: Any, seed: int, rounds: int, barrier: threading.Barrier | None
) -> list[Any]:
    """Step times of ``rounds`` rounds (after one warm-up round): ``("prefill"|"decode", s)``."""
    from cadenza.core.sampling_params import SamplingParams

    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=DECODE_STEPS + 1, ignore_eos=True)
    times: list[tuple[str, float]] = []
    for r in range(rounds + 1):
        for i in range(BATCH):
            prompt = [rng.randrange(16, vocab) for _ in range(PROMPT_TOKENS)]
            engine.add_request(f"p{seed}-{r}-{i}", prompt, params)
        for k in range(DECODE_STEPS + 1):
            if barrier is not None:
                barrier.wait()
            start = time.perf_counter()
            engine.step()
            if r:
                times.append(("prefill" if k == 0 else "decode", time.perf_counter() - start))
        while engine.has_unfinished_requests():  # nothing left normally; keep rounds apart
            engine.step()
    return times


def step_medians(times: list[tuple[str, float]]) -> dict[str, float]:
    return {
        kind: statistics.median(t for k, t in times if k == kind) for kind in ("prefill", "decode")
    }


def measure(model: str, engines: int, *, threads: int = 1, rounds: int = ROUNDS) -> Contention:
    """The contention of ``engines`` engines stepping at once (see the module docstring)."""
    built = [probe_engine(model, threads) for _ in range(engines)]
    alone = step_medians(probe_steps(built[0], 0, rounds, None))
    barrier = threading.Barrier(engines, timeout=600)
    results: list[list[tuple[str, float]]] = [[] for _ in built]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = probe_steps(built[i], 100 + i, rounds, barrier)
        except BaseException as e:  # let the others out of the barrier, report it below
            errors.append(e)
            barrier.abort()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(engines)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    together = step_medians([x for r in results for x in r])
    for engine in built:
        engine.close()
    return Contention(
        engines,
        prefill_factor=together["prefill"] / alone["prefill"],
        decode_factor=together["decode"] / alone["decode"],
        alone=alone,
        together=together,
    )


def neighbour_busy(metrics: dict[str, Any]) -> float:
    """The mean fraction of a run's span during which a worker's neighbours were stepping
    (each worker's busy time over the run's duration, averaged over the others)."""
    duration = metrics.get("duration_s") or 0.0
    workers = list(metrics.get("workers", {}).values())
    if duration <= 0 or len(workers) < 2:
        return 0.0
    busy = [min(w.get("busy_s", 0.0) / duration, 1.0) for w in workers]
    total = sum(busy)
    return sum((total - b) / (len(busy) - 1) for b in busy) / len(busy)
