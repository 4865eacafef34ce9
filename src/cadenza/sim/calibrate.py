"""``cadenza simulate calibrate``: fit the CPU cost model to this engine on this machine.

Runs the real ``LLMEngine`` (torch, imported here only, inside the command) over batches of
known shapes — single prefills of growing length, decode batches of growing width at short and
long contexts, and mixed steps — records each step's wall time with its ``StepShape`` (the
scheduler's output is observed by wrapping ``schedule`` on the instance, as the replay
benchmark does), and fits ``cpu_cost.CPUCost``'s coefficients by least squares. The tier copy
bandwidths are measured with the same probes the engine's tier benchmark uses. The result is a
JSON file that ``cadenza simulate --cost-model cpu --calibration FILE`` reads.
"""

from __future__ import annotations

import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from cadenza.sim.cpu_cost import CPUCalibration
from cadenza.sim.step_cost import StepShape, step_shape

PREFILL_LENGTHS = (16, 64, 128, 256, 512, 1024, 2048)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (64, 1024)
DECODE_STEPS = 6


def _features(shape: StepShape) -> list[float]:
    """The step model's features, in ``CPUCost``'s order: fixed, prefill step, prefill tokens,
    decode sequences, prefill pairs, decode pairs."""
    prefill = shape.prefill_tokens
    return [
        1.0,
        1.0 if prefill else 0.0,
        prefill,
        shape.decode_seqs,
        shape.attention_pairs - shape.decode_pairs,
        shape.decode_pairs,
    ]


def fit(
    samples: list[tuple[StepShape, float]], model: str, links: dict[str, float]
) -> CPUCalibration:
    """Non-negative least squares of the linear step model on *relative* error (each step
    weighs the same whether it took 50 ms or 5 s); a coefficient that would come out negative
    is dropped (set to 0) and the rest refitted."""
    import numpy as np

    x = np.array([_features(s) for s, _ in samples], dtype=np.float64)
    y = np.array([t for _, t in samples], dtype=np.float64)
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sub = x[:, active] * w[:, None]
        scale = np.maximum(np.abs(sub).max(axis=0), 1e-30)
        solved, *_ = np.linalg.lstsq(sub / scale, y * w, rcond=None)
        solved = solved / scale
        if (solved >= 0).all():
            coef[:] = 0.0
            coef[active] = solved
            break
        active.pop(int(np.argmin(solved)))
    predicted = x @ coef
    rel = [abs(p - t) / t for p, t in zip(predicted, y, strict=True) if t > 0]
    return CPUCalibration(
        model=model,
        base_s=float(coef[0]),
        prefill_step_s=float(coef[1]),
        prefill_token_s=float(coef[2]),
        decode_seq_s=float(coef[3]),
        attention_pair_s=float(coef[4]),
        decode_pair_s=float(coef[5]),
        memcpy_bytes_per_s=links["memcpy"],
        disk_read_bytes_per_s=links["disk_read"],
        disk_write_bytes_per_s=links["disk_write"],
        num_samples=len(samples),
        median_rel_error=float(statistics.median(rel)) if rel else 0.0,
    )


def measure_links(disk_dir: str | None) -> dict[str, float]:
    from cadenza.kvstore.bandwidth import measure_disk_gbps, measure_memcpy_gbps

    memcpy = measure_memcpy_gbps(size_mib=128, repeats=3) * 1e9
    with tempfile.TemporaryDirectory(dir=disk_dir) as tmp:
        write, read = measure_disk_gbps(tmp, size_mib=128)
    return {"memcpy": memcpy, "disk_write": write * 1e9, "disk_read": read * 1e9}


def profile_steps(
    model: str, *, num_threads: int | None, quick: bool
) -> list[tuple[StepShape, float]]:
    """Step timings of the real engine over prefills, decode batches and mixed steps."""
    from cadenza.config import EngineConfig
    from cadenza.engine import LLMEngine

    config = EngineConfig.from_options(
        model=model, num_threads=num_threads, enable_prefix_caching=False, max_num_seqs=64
    )
    return profile_engine(LLMEngine(config), quick=quick)


def profile_engine(
    engine: Any,
    *,
    quick: bool,
    decode_batches: tuple[int, ...] = DECODE_BATCHES,
    warm_up: bool = False,
) -> list[tuple[StepShape, float]]:
    """Step timings of ``engine`` (an ``LLMEngine`` with prefix caching off) over prefills of
    growing length, decode batches of growing width at short and long contexts, and mixed
    steps. ``warm_up``: run the whole workload once unrecorded first (a GPU compiles kernels
    for new shapes on first use)."""
    from cadenza.core.sampling_params import SamplingParams

    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    shapes: list[StepShape | None] = [None]
    schedule = engine.scheduler.schedule

    def observed():  # noqa: ANN202 - the scheduler's output
        plan = schedule()
        shapes[0] = step_shape(plan)
        return plan

    engine.scheduler.schedule = observed  # type: ignore[method-assign]
    samples: list[tuple[StepShape, float]] = []
    ids = iter(range(1 << 30))

    def add(n: int, max_tokens: int) -> None:
        prompt = [rng.randrange(16, vocab) for _ in range(n)]
        engine.add_request(
            f"cal-{next(ids)}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        )

    def drain(record: bool = True) -> None:
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - start
            shape = shapes[0]
            if record and shape is not None and shape.seqs:
                samples.append((shape, elapsed))

    add(64, 4)
    drain(record=False)  # warm-up
    rounds = [False] if warm_up else []
    rounds += [True] * (1 if quick else 2)
    for record in rounds:
        for n in PREFILL_LENGTHS[: 5 if quick else None]:
            add(n, 1)
            drain(record)
        for context in DECODE_CONTEXTS:
            for batch in decode_batches[: 4 if quick else None]:
                for _ in range(batch):
                    add(context, DECODE_STEPS)
                drain(record)
        for _ in range(4):  # mixed: decodes running while a prefill arrives
            add(256, 12)
            add(256, 12)
            engine.step()
            add(512, 2)
            drain(record)
    return samples


def calibrate(
    model: str, *, num_threads: int | None = None, quick: bool = False, disk_dir: str | None = None
) -> tuple[CPUCalibration, dict[str, Any]]:
    """The fitted calibration, and what it was measured on (machine, and every step as
    ``[prefill tokens, decode seqs, attention pairs, seconds, decode pairs]``, for
    inspection)."""
    samples = profile_steps(model, num_threads=num_threads, quick=quick)
    links = measure_links(disk_dir)
    calibration = fit(samples, model, links)
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "steps": [
            [s.prefill_tokens, s.decode_seqs, s.attention_pairs, round(t, 6), s.decode_pairs]
            for s, t in samples
        ],
    }
    return calibration, machine


def write_calibration(
    path: str | Path, calibration: CPUCalibration, machine: dict[str, Any]
) -> Path:
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**calibration.to_json(), "machine": machine}
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
