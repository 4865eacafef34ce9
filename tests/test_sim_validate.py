"""``cadenza bench sim-validation``'s parts that need no real engine: the validation traces, the
error arithmetic and targets, the diagnosis of misses, and the report (JSON, markdown, plot)
written from two simulator runs of one tiny trace that disagree (a second calibration whose
steps are a quarter slower stands in for the measurement)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import pytest

from cadenza.sim.cpu_cost import DEFAULT
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import simulate
from cadenza.sim.trace import TraceTurn, validate
from cadenza.sim.validate import add_arguments, apply_quick, specs
from cadenza.sim.validate_contention import Contention, neighbour_busy
from cadenza.sim.validate_diagnose import diagnostics, explain
from cadenza.sim.validate_drift import Drift, SpeedProbe, SpeedReading
from cadenza.sim.validate_errors import METRICS, compare, relative_error, summarize
from cadenza.sim.validate_report import render_markdown, write_report
from cadenza.sim.validate_runs import at_drift, at_real_speed, run_entry, simulate_run
from cadenza.sim.validate_traces import KINDS, Shrink, TraceSpec, make_trace


def doc(ttft_mean, ttft_p90, e2e, tput, device=0, host=0, disk=0, migrations=0, **extra):
    return {
        "ttft_s": {"mean": ttft_mean, "p90": ttft_p90},
        "e2e_s": {"mean": e2e},
        "throughput": {"output_tokens_per_s": tput},
        "cached_tokens_by_tier": {"device": device, "host": host, "disk": disk},
        "migrations": {"count": migrations},
        **extra,
    }


def test_errors_are_relative_to_the_measurement_with_the_issues_targets():
    real = doc(1.0, 2.0, 5.0, 10.0, device=1000, host=0, disk=50, migrations=4)
    sim = doc(1.08, 2.32, 4.4, 10.0, device=1000, host=16, disk=50, migrations=5)
    cells = {c.metric: c for c in compare(real, sim)}
    assert [c for c in cells] == [m.key for m in METRICS]
    assert cells["ttft_mean"].error == pytest.approx(0.08) and cells["ttft_mean"].within
    # p90 has the looser target: 16% misses it, 15% would not.
    assert cells["ttft_p90"].error == pytest.approx(0.16) and not cells["ttft_p90"].within
    assert cells["ttft_p90"].target == 0.15
    assert cells["e2e_mean"].error == pytest.approx(-0.12) and not cells["e2e_mean"].within
    assert cells["throughput"].error == 0 and cells["throughput"].within
    # A zero measured and a non-zero predicted has no relative error: a miss.
    assert cells["cached_host"].error is None and not cells["cached_host"].within
    assert cells["cached_disk"].within
    assert cells["migrations"].error == pytest.approx(0.25) and not cells["migrations"].within
    assert relative_error(0, 0) == 0.0
    assert relative_error(2.0, 2.2) == pytest.approx(0.1)
    assert compare(real, sim)[0].to_json()["within"] is True


def test_summary_counts_runs_within_target_and_undefined_errors():
    runs = [
        compare(doc(1.0, 1.0, 1.0, 1.0), doc(1.05, 1.2, 1.0, 0.8)),
        compare(doc(1.0, 1.0, 1.0, 1.0, host=0), doc(0.5, 1.1, 1.0, 1.0, host=3)),
    ]
    s = summarize(runs)
    assert s["ttft_mean"]["within"] == 1 and s["ttft_mean"]["runs"] == 2
    assert s["ttft_mean"]["mean_abs_error"] == pytest.approx((0.05 + 0.5) / 2)
    assert s["ttft_mean"]["max_abs_error"] == pytest.approx(0.5)
    assert s["ttft_p90"]["within"] == 1
    assert s["throughput"]["within"] == 1
    assert s["cached_host"]["undefined"] == 1 and s["cached_host"]["within"] == 1
    assert s["cached_host"]["mean_abs_error"] == 0.0


def test_validation_traces_are_valid_shrunk_and_of_each_kind():
    shrink = Shrink(max_input=40, max_output=10, time_scale=0.1)
    for kind in KINDS:
        turns = make_trace(TraceSpec(kind, 4, 1.0, max_turns=3, shrink=shrink))
        validate(turns)
        assert len({t.session_id for t in turns}) == 4
        assert all(t.input_tokens <= 40 and t.output_tokens <= 10 for t in turns)
        assert all(t.text is None for t in turns)
        hinted = sum(t.hint_lead_s is not None for t in turns)
        assert (hinted == 0) == (kind == "chat-exp")
    agents = make_trace(TraceSpec("agents", 3, 1.0, shrink=shrink))
    assert all(t.shared_prefix_id is not None for t in agents)
    assert any(t.tool_s for t in agents)
    # Tool calls (and think times, hint leads) are scaled; the rate is the shrunk trace's own,
    # so the sessions start at the same moments whatever the scale.
    slow = make_trace(TraceSpec("agents", 3, 1.0, shrink=replace(shrink, time_scale=1.0)))
    assert sum(t.tool_s or 0 for t in slow) == pytest.approx(
        10 * sum(t.tool_s or 0 for t in agents), rel=1e-3
    )
    assert [t.arrival_s for t in slow] == [t.arrival_s for t in agents]
    with pytest.raises(ValueError, match="trace kind"):
        TraceSpec("mooncake", 1, 1.0)


def test_quick_mode_shrinks_the_defaults_but_keeps_explicit_flags():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parse = parser.parse_args
    args = apply_quick(parse(["--quick", "--sessions", "7"]))
    assert args.quick and args.sessions == 7 and args.rates == "0.8"
    names = [s.name for s in specs(args)]
    assert names == ["agents@0.8"]
    full = parse([])
    assert [s.name for s in specs(full)] == [f"{k}@{r}" for k in KINDS for r in (0.4, 0.8)]
    assert full.cluster_calibration == "contention" and full.workers == "1,2"


def tiny_trace() -> list[TraceTurn]:
    turns = []
    for s in range(4):
        shared = {"shared_prefix_id": "sys", "shared_prefix_tokens": 32}
        turns.append(TraceTurn(f"s{s}", 40, 6, arrival_s=0.3 * s, **shared))
        turns.append(TraceTurn(f"s{s}", 12, 6, think_s=1.0, hint_lead_s=0.5, **shared))
    return turns


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same trace simulated with the default calibration and one 25% slower."""
    root = tmp_path_factory.mktemp("cal")
    slow = replace(
        DEFAULT,
        base_s=DEFAULT.base_s * 1.25,
        prefill_token_s=DEFAULT.prefill_token_s * 1.25,
        decode_seq_s=DEFAULT.decode_seq_s * 1.25,
    )
    path = root / "slow.json"
    path.write_text(json.dumps(slow.to_json()))
    turns = tiny_trace()
    config = SimConfig(num_blocks=64, routing="symphony")
    measured = simulate(replace(config, calibration=str(path)), turns)
    predicted = simulate(config, turns)
    return measured, predicted


def test_a_slower_machine_shows_as_a_step_time_miss(two_runs):
    measured, predicted = two_runs
    cells = compare(measured, predicted)
    by = {c.metric: c for c in cells}
    assert not by["ttft_mean"].within and by["ttft_mean"].error < 0
    assert by["cached_device"].within  # the same trace caches the same tokens
    d = diagnostics(measured, predicted)
    # Every step is a quarter slower; slower steps also batch more, so a step does more.
    assert d["step_time_ratio"] > 1.2
    why = " ".join(explain(measured, predicted, cells))
    assert "steps took" in why
    assert explain(measured, measured, compare(measured, measured)) == []


def test_report_writes_json_markdown_and_plot(two_runs, tmp_path):
    measured, predicted = two_runs
    spec = TraceSpec("chat", 4, 0.5)
    runs = [
        run_entry(
            spec,
            1,
            measured,
            predicted,
            {
                "at_real_speed": {
                    "speed_factor": 1.3,
                    "cells": [c.to_json() for c in compare(measured, measured)],
                }
            },
        ),
        run_entry(spec, 2, measured, measured, {"contention": {"neighbour_busy": 0.5}}),
    ]
    summary = summarize([compare(r["real"], r["simulated"]) for r in runs])
    doc_ = {
        "meta": {
            "command": "cadenza bench sim-validation --quick",
            "calibration": DEFAULT.to_json(),
            "contention": {"2": {"prefill_factor": 1.5, "decode_factor": 1.25}},
            "settings": {"device blocks": 64},
            "traces": {"chat@0.5": "4 sessions"},
            "notes": ["A note."],
        },
        "runs": runs,
        "summary": summary,
    }
    paths = write_report(doc_, tmp_path, "sim-validation")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["ttft_mean"]["within"] == 1
    assert len(data["runs"]) == 2 and data["runs"][1]["why"] == []
    md = paths["md"].read_text()
    assert "| chat @ 0.5/s | 1 |" in md and "| chat @ 0.5/s | 2 |" in md
    assert "✅" in md and "❌" in md
    assert "## Why the misses" in md and "steps took" in md
    assert "![predicted against measured](sim-validation.png)" in md
    assert "Calibration: step = 85.0 ms" in md and "A note." in md
    assert "Contention probe, 2 engines stepping at once: prefill steps ×1.50" in md
    assert "## Diagnostic: the simulator at the real run's step speed" in md
    assert "| chat @ 0.5/s | 1 | 1.30 | +0.0% ✅ |" in md
    assert render_markdown(doc_) == md.replace(
        "![predicted against measured](sim-validation.png)\n\n", ""
    )


def test_contention_scales_the_calibration_by_how_busy_the_neighbours_are(tmp_path):
    c = Contention(2, prefill_factor=2.0, decode_factor=1.5, alone={}, together={})
    assert c.at(0.0) == (1.0, 1.0) and c.at(1.0) == (2.0, 1.5)
    assert c.at(0.5) == pytest.approx((1.5, 1.25))
    scaled = c.apply(DEFAULT, 0.5)
    assert scaled.prefill_token_s == pytest.approx(1.5 * DEFAULT.prefill_token_s)
    assert scaled.base_s == pytest.approx(1.25 * DEFAULT.base_s)
    assert scaled.memcpy_bytes_per_s == DEFAULT.memcpy_bytes_per_s
    # Two workers busy half and all of a 10 s run: each one's neighbour is busy 1.0 and 0.5.
    run = {"duration_s": 10.0, "workers": {"w0": {"busy_s": 5.0}, "w1": {"busy_s": 10.0}}}
    assert neighbour_busy(run) == pytest.approx(0.75)
    assert neighbour_busy({"duration_s": 10.0, "workers": {"w0": {"busy_s": 5.0}}}) == 0.0


def test_the_cluster_simulation_iterates_the_contention_to_a_fixed_point(tmp_path):
    from cadenza.bench.trace_replay import TraceReplayConfig

    turns = tiny_trace()
    config = TraceReplayConfig(workers=2, num_blocks=64)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(DEFAULT.to_json()))
    c = Contention(2, prefill_factor=2.0, decode_factor=2.0, alone={}, together={})
    plain, _, none = simulate_run(turns, config, str(path), None, tmp_path)
    assert none == {}
    slowed, priced, info = simulate_run(turns, config, str(path), c, tmp_path)
    assert 0 < info["neighbour_busy"] <= 1 and 1 <= info["iterations"] <= 5
    assert info["decode_factor"] == pytest.approx(1 + info["neighbour_busy"])
    assert slowed["ttft_s"]["mean"] > plain["ttft_s"]["mean"]
    assert json.loads(Path(priced).read_text())["base_s"] == pytest.approx(
        DEFAULT.base_s * info["decode_factor"]
    )


def test_at_real_speed_takes_the_machines_speed_out_of_the_error(two_runs, tmp_path):
    from cadenza.bench.trace_replay import TraceReplayConfig

    measured, predicted = two_runs
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(DEFAULT.to_json()))
    config = TraceReplayConfig(num_blocks=64)
    speed = at_real_speed(tiny_trace(), config, str(path), measured, predicted, tmp_path)
    # The "measurement" is the same simulator 25% slower: scaling the steps recovers it.
    assert speed["speed_factor"] == pytest.approx(1.25, rel=0.1)
    before = {c.metric: c for c in compare(measured, predicted)}
    after = {c["metric"]: c for c in speed["cells"]}
    assert abs(after["ttft_mean"]["error"]) < abs(before["ttft_mean"].error)
    assert after["ttft_mean"]["within"] and after["e2e_mean"]["within"]


def test_the_drift_probe_scales_a_runs_prefill_and_decode_costs_apart(tmp_path):
    drift = Drift(SpeedReading(0.2, 0.04), SpeedReading(0.3, 0.05))
    assert drift.prefill_factor == pytest.approx(1.5)
    assert drift.decode_factor == pytest.approx(1.25)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(DEFAULT.to_json()))
    assert at_drift(str(path), None, tmp_path) == str(path)
    priced = json.loads(Path(at_drift(str(path), drift, tmp_path)).read_text())
    assert priced["prefill_token_s"] == pytest.approx(1.5 * DEFAULT.prefill_token_s)
    assert priced["base_s"] == pytest.approx(1.25 * DEFAULT.base_s)
    assert priced["decode_seq_s"] == pytest.approx(1.25 * DEFAULT.decode_seq_s)
    assert priced["memcpy_bytes_per_s"] == DEFAULT.memcpy_bytes_per_s
    # A slower machine before the run: the run is predicted slower.
    from cadenza.bench.trace_replay import TraceReplayConfig

    config = TraceReplayConfig(num_blocks=64)
    plain, _, _ = simulate_run(tiny_trace(), config, str(path), None, tmp_path)
    slowed, _, _ = simulate_run(
        tiny_trace(), config, at_drift(str(path), drift, tmp_path), None, tmp_path
    )
    assert slowed["e2e_s"]["mean"] > plain["e2e_s"]["mean"]


def test_the_report_shows_the_drift_probe(two_runs):
    measured, predicted = two_runs
    drift = Drift(SpeedReading(0.2, 0.04), SpeedReading(0.3, 0.05))
    run = run_entry(
        TraceSpec("chat", 4, 0.5),
        1,
        measured,
        predicted,
        {
            "drift": drift.to_json(),
            "at_real_speed": {
                "speed_factor": 1.1,
                "cells": [c.to_json() for c in compare(measured, measured)],
            },
        },
    )
    md = render_markdown(
        {
            "meta": {"drift_reference": drift.reference.to_json()},
            "runs": [run],
            "summary": summarize([compare(measured, predicted)]),
        }
    )
    assert "Drift probe: a fixed workload" in md and "200 ms per prefill" in md
    assert "| drift probe × (prefill / decode) | step cost × |" in md
    assert "| chat @ 0.5/s | 1 | 1.50 / 1.25 | 1.10 | +0.0% ✅ |" in md


def test_the_drift_probe_times_the_real_engine(smollm2_source):
    probe = SpeedProbe("smollm2-135m", threads=1, rounds=1)  # skipped without the model
    try:
        first, second = probe.read(), probe.read()  # the same prompts again: no cache hits
    finally:
        probe.close()
    for reading in (first, second):
        # A prefill of 4 x 64 tokens computes far more than one decode token each.
        assert reading.prefill_s > reading.decode_s > 0
