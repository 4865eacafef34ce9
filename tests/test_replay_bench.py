"""Tests for the replay benchmark's measurements: live KV, the step-cost model, tier sizing."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest

from cadenza.bench.replay import (
    LiveKV,
    _acceptance,
    _notes,
    _size_tiers,
    copy_overlap,
    decode_step_slowdown,
    fit_step_cost,
    predict_step_cost,
    step_features,
    step_slowdown,
)
from cadenza.bench.replay_report import render_markdown


def test_live_kv_peak_and_time_weighted_mean() -> None:
    kv = LiveKV(block_size=16)
    kv.update("a", 40, now=0.0)  # 40 // 16 + 1 = 3 blocks
    assert kv.blocks == 3
    kv.update("b", 15, now=2.0)  # 1 block -> 4 live
    kv.update("a", 64, now=4.0)  # a grows to 5 blocks -> 6 live
    assert (kv.blocks, kv.peak, kv.peak_time) == (6, 6, 4.0)
    kv.end("a", now=5.0)  # 1 live
    kv.end("b", now=10.0)  # 0 live
    assert kv.blocks == 0 and kv.peak == 6 and kv.max_sessions == 2
    # 3 blocks for 2 s, 4 for 2 s, 6 for 1 s, 1 for 5 s over 10 s
    assert kv.mean() == pytest.approx((3 * 2 + 4 * 2 + 6 * 1 + 1 * 5) / 10)
    kv.end("never-started", now=11.0)  # harmless
    assert kv.blocks == 0


def test_live_kv_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError):
        LiveKV(0)


def _plan(*chunks: list[tuple[int, int]]) -> SimpleNamespace:
    return SimpleNamespace(chunks=[SimpleNamespace(segments=segs) for segs in chunks])


def test_step_features_count_tokens_seqs_and_attention() -> None:
    # a 100-token prefill, a decode at context 51, a hole recomputed next to a later run
    plan = _plan([(0, 100)], [(50, 51)], [(0, 16), (48, 60)])
    tokens, seqs, attention = step_features(plan)
    assert (tokens, seqs) == (100 + 1 + 16 + 12, 3)
    assert attention == 100 * 100 + 1 * 51 + 16 * 16 + 12 * 60


def _synthetic_steps(n: int, coef: tuple[float, float, float, float], noise: float, seed: int):
    rng = random.Random(seed)
    steps = []
    for _ in range(n):
        seqs = rng.randint(1, 16)
        tokens = seqs + (rng.randint(0, 512) if rng.random() < 0.3 else 0)
        attention = tokens * rng.randint(16, 1024)
        t = coef[0] + coef[1] * tokens + coef[2] * attention + coef[3] * seqs
        steps.append((t * (1 + rng.uniform(-noise, noise)), tokens, seqs, attention))
    return steps


def test_step_cost_fit_recovers_known_coefficients() -> None:
    coef = (0.012, 4e-4, 2e-8, 1.5e-3)
    steps = _synthetic_steps(400, coef, noise=0.0, seed=1)
    model = fit_step_cost(steps)
    got = (model["c0_s"], model["c_token_s"], model["c_attention_s"], model["c_seq_s"])
    assert got == pytest.approx(coef, rel=1e-6)
    assert model["r2"] == pytest.approx(1.0) and model["steps"] == 400
    assert predict_step_cost(model, steps[:3]) == pytest.approx([s[0] for s in steps[:3]])

    # A fifth column (CPU seconds) is fitted with time_index=4.
    with_cpu = [(*r, 0.5 * r[0]) for r in steps]
    cpu = fit_step_cost(with_cpu, time_index=4)
    assert cpu["c_token_s"] == pytest.approx(coef[1] / 2, rel=1e-6)
    assert fit_step_cost(with_cpu)["c_token_s"] == pytest.approx(coef[1], rel=1e-6)

    noisy = fit_step_cost(_synthetic_steps(2000, coef, noise=0.05, seed=2))
    assert noisy["c_token_s"] == pytest.approx(coef[1], rel=0.05)
    assert noisy["c0_s"] == pytest.approx(coef[0], rel=0.05)


def test_step_slowdown_is_one_on_the_fitted_run_and_scales() -> None:
    coef = (0.01, 3e-4, 1e-8, 1e-3)
    base = _synthetic_steps(300, coef, noise=0.02, seed=3)
    model = fit_step_cost(base)
    assert step_slowdown(model, base)["step_slowdown"] == pytest.approx(1.0, abs=0.01)
    # Other compositions at 1.25x the cost: the slowdown sees through the composition.
    slower = [(1.25 * t, *rest) for t, *rest in _synthetic_steps(300, coef, 0.02, seed=4)]
    result = step_slowdown(model, slower)
    assert result["step_slowdown"] == pytest.approx(1.25, abs=0.02)
    assert result["step_slowdown_p10"] <= result["step_slowdown"] <= result["step_slowdown_p90"]
    empty = step_slowdown(model, [])
    assert empty["step_slowdown"] != empty["step_slowdown"]  # NaN
    assert result["step_slowdown_total"] == pytest.approx(1.25, abs=0.03)


def test_decode_step_slowdown_matches_batch_sizes() -> None:
    # reference: decode steps of 1 seq take 40 ms, of 4 seqs 60 ms; prefill steps are ignored
    reference = [(0.04, 1, 1, 50)] * 12 + [(0.06, 4, 4, 200)] * 12 + [(0.5, 300, 1, 9e4)] * 5
    steps = [(0.044, 1, 1, 60)] * 5 + [(0.066, 4, 4, 180)] * 5 + [(9.0, 300, 2, 1e5)]
    assert decode_step_slowdown(reference, steps) == pytest.approx(1.1)
    # batch sizes the reference saw too rarely do not count
    assert math.isnan(decode_step_slowdown(reference, [(0.1, 7, 7, 300)]))


def test_fit_needs_enough_positive_steps() -> None:
    with pytest.raises(ValueError):
        fit_step_cost([(0.1, 1, 1, 1)])
    with pytest.raises(ValueError):
        fit_step_cost([(0.0, 1, 1, 1)] * 5)


def test_size_tiers_fraction_and_floor() -> None:
    live = {"peak_blocks": 1000, "largest_turn_blocks": 40}
    sized = _size_tiers(live, 0.2, 0.5, reserve_fraction=0.1)
    assert sized["device_blocks"] == 200 and not sized["device_floor_applied"]
    assert sized["host_blocks"] == 500
    assert sized["device_frac_of_peak_live"] == pytest.approx(0.2)
    # A small peak: the device must still hold the largest turn with the reserve kept free.
    small = _size_tiers({"peak_blocks": 100, "largest_turn_blocks": 40}, 0.2, 0.5, 0.1)
    assert small["device_floor_applied"]
    assert small["device_blocks"] == small["device_floor_blocks"]
    assert small["device_blocks"] * 0.9 >= 40


def test_markdown_groups_tables_and_puts_notes_first() -> None:
    results = {
        "meta": {"model": "m"},
        "notes": ["**Point 1** holds."],
        "tables": [{"title": "Reuse", "keys": ["redundant_fraction"]}],
        "runs": [{"name": "r", "summary": {"redundant_fraction": 0.015, "step_slowdown": 1.04}}],
    }
    md = render_markdown(results)
    assert md.index("## Summary") < md.index("**Point 1** holds.") < md.index("- **model**")
    assert "## Reuse" in md and "1.5%" in md
    assert "## Other measurements" in md and "1.04" in md


def test_copy_overlap_splits_steps_by_copies_in_flight() -> None:
    coef = (0.01, 3e-4, 1e-8, 1e-3)
    base = _synthetic_steps(200, coef, noise=0.0, seed=5)
    model = fit_step_cost(base)
    quiet = [(*r, r[0], 0) for r in base[:100]]  # (wall, tokens, seqs, attention, cpu, copying)
    copying = [(1.3 * r[0], *r[1:], r[0], 1) for r in base[100:]]
    split = copy_overlap(model, quiet + copying)
    assert split["copying_step_fraction"] == pytest.approx(0.5)
    assert split["step_slowdown_copying"] == pytest.approx(1.3)
    assert split["step_slowdown_quiet"] == pytest.approx(1.0)
    assert split["copy_step_overhead"] == pytest.approx(1.3)
    assert math.isnan(copy_overlap(model, quiet)["step_slowdown_copying"])


def _run_summary(redundant: float, slowdown: float) -> dict:
    return {
        "redundant_fraction": redundant,
        "hit_tokens": {"device": 10, "host": 20, "disk": 30},
        "evicted_blocks": 0,
        "step_slowdown": slowdown,
        "cpu_step_slowdown": slowdown,
        "step_cpu_share": 0.99,
        "decode_step_slowdown": slowdown,
        "copying_step_fraction": 0.4,
        "step_slowdown_copying": slowdown,
        "step_slowdown_quiet": 1.0,
        "copy_step_overhead": slowdown,
        "step_time_median_s": 0.08,
        "step_time_per_token_s": 0.007,
        "stall_steps": 3,
        "stall_time_s": 0.1,
    }


def test_acceptance_notes_state_each_point() -> None:
    meta = {
        "conversations": 100,
        "turns": 378,
        "peak_live_kv_blocks": 400,
        "max_live_sessions": 30,
        "mean_live_kv_blocks": 180.0,
        "device_blocks": 80,
        "device_frac_of_peak_live": 0.2,
        "device_floor_applied": False,
        "device_floor_blocks": 50,
        "largest_turn_blocks": 43,
        "device_frac_requested": 0.2,
        "host_blocks": 200,
        "host_frac_of_peak_live": 0.5,
        "resident_blocks": 3000,
        "step_cost_model": {"steps": 1000, "r2": 0.9},
    }
    runs = [
        {"name": "resident", "summary": _run_summary(0.0, 1.0)},
        {"name": "stateless", "summary": _run_summary(1.0, 0.98)},
        {"name": "tiers-cost", "summary": _run_summary(0.01, 1.05)},
        {"name": "tiers-lru", "summary": _run_summary(0.03, 1.2)},
    ]
    verdict = _acceptance(runs)
    assert verdict["point1_holds"] is False and verdict["point2_holds"] is False
    text = "\n".join(_notes(meta, runs))
    assert "tiers-lru 3.0%" in text and "**Does not hold.**" in text
    assert "tiers-lru 1.200" in text and "**does not hold.**" in text
    assert "tiers-lru +20.0%" in text and "Disturbed" not in text
    runs[3] = {"name": "tiers-lru", "config": {}, "error": "KeyError: x", "summary": {}}
    verdict = _acceptance(runs)
    assert verdict["point1_holds"] and verdict["point2_holds"]
    assert verdict["failed_runs"] == ["tiers-lru"]
    assert "**Run tiers-lru failed:** `KeyError: x`" in "\n".join(_notes(meta, runs))
