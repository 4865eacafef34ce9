"""The CPU step model: its features from a scheduled batch, its fit, and old calibration files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cadenza.core.scheduler import ScheduledChunk, SchedulerOutput
from cadenza.sim.calibrate import fit
from cadenza.sim.cpu_cost import DEFAULT, CPUCalibration, CPUCost, load_calibration
from cadenza.sim.step_cost import StepShape, causal_pairs, prefill_shape, step_shape

LINKS = {"memcpy": 5e9, "disk_read": 2e9, "disk_write": 5e8}
TRUE = replace(
    DEFAULT,
    base_s=0.05,
    prefill_step_s=0.01,
    prefill_token_s=3e-3,
    decode_seq_s=5e-3,
    attention_pair_s=1.5e-6,
    decode_pair_s=1.5e-5,
)


def _decode(context: int, batch: int) -> StepShape:
    return StepShape(
        tokens=batch,
        decode_seqs=batch,
        seqs=batch,
        attention_pairs=batch * context,
        context_tokens=batch * context,
        sampled=batch,
        decode_pairs=batch * context,
    )


def test_step_shape_counts_the_decode_tokens_pairs_apart():
    """A batch of one prefill chunk and one decode: the decode row attends its whole context."""
    plan = SchedulerOutput(
        chunks=[  # step_shape reads only the chunks' ranges
            ScheduledChunk(None, [(0, 40)], samples=True),  # type: ignore[arg-type]
            ScheduledChunk(None, [(99, 100)], samples=True),  # type: ignore[arg-type]
        ]
    )
    shape = step_shape(plan)
    assert shape.decode_seqs == 1 and shape.prefill_tokens == 40
    assert shape.decode_pairs == 100 == causal_pairs(99, 100)
    assert shape.attention_pairs == causal_pairs(0, 40) + 100


def test_the_fit_recovers_every_term_of_the_step_model():
    cost = CPUCost(TRUE)
    shapes = [prefill_shape(0, n) for n in (16, 64, 256, 1024, 2048)]
    shapes += [_decode(c, b) for c in (64, 1024) for b in (1, 2, 8, 32)]
    shapes += [replace(prefill_shape(0, 512), tokens=514, decode_seqs=2, decode_pairs=600)]
    fitted = fit([(s, cost.step_seconds(s)) for s in shapes], "smollm2-135m", LINKS)
    for name in (
        "base_s",
        "prefill_step_s",
        "prefill_token_s",
        "decode_seq_s",
        "attention_pair_s",
        "decode_pair_s",
    ):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert fitted.median_rel_error == pytest.approx(0.0, abs=1e-9)
    assert "ms if it has prefill tokens" in fitted.describe()


def test_a_calibration_file_from_before_the_split_prices_as_it_did(tmp_path):
    """Without ``prefill_step_s`` and ``decode_pair_s`` a decode pair costs what a prefill pair
    does, the old single attention term."""
    old = {
        k: v
        for k, v in replace(DEFAULT, attention_pair_s=2e-6).to_json().items()
        if k not in ("prefill_step_s", "decode_pair_s")
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_calibration(path)
    assert loaded.prefill_step_s == 0.0 and loaded.decode_pair_s is None
    shape = _decode(1000, 2)
    c = loaded
    expected = c.base_s + 2 * c.decode_seq_s + 2000 * c.attention_pair_s
    assert CPUCost(loaded).step_seconds(shape) == pytest.approx(expected)


def test_scaling_splits_prefill_and_decode_terms():
    scaled = TRUE.scaled(prefill=2.0, decode=1.5)
    assert isinstance(scaled, CPUCalibration)
    assert scaled.prefill_step_s == pytest.approx(0.02)
    assert scaled.attention_pair_s == pytest.approx(3e-6)
    assert scaled.decode_pair_s == pytest.approx(2.25e-5)
    assert scaled.base_s == pytest.approx(0.075)
    assert scaled.memcpy_bytes_per_s == TRUE.memcpy_bytes_per_s
