"""`cadenza bench cluster` without servers: metrics diffs, hint plans, imbalance, the report."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from cadenza.bench.cluster_bench import (
    POLICIES,
    add_arguments,
    apply_quick,
    policy_names,
    run_estimate_s,
    server_spec,
)
from cadenza.bench.cluster_load import LoadSamples, imbalance, outstanding_of, series
from cadenza.bench.cluster_report import compare, render_markdown, write_cluster_report
from cadenza.bench.cluster_scrape import counters_by_label, diff_metrics, parse_metrics
from cadenza.bench.cluster_turns import e2e_stats, kv_found, landings
from cadenza.bench.cluster_workload import (
    hint_schedules,
    plan_cluster_sessions,
    trial_conversations,
)
from cadenza.bench.workloads import Conversation, Turn

BEFORE = """# HELP cadenza:cluster_migrations_total KV migrations completed, by kind.
# TYPE cadenza:cluster_migrations_total counter
cadenza:cluster_migrations_total{kind="hint"} 2.0
cadenza:cluster_migration_bytes_total 1000.0
cadenza:cluster_hint_outcomes_total{outcome="found"} 1.0
cadenza:cluster_hint_outcomes_total{outcome="late"} 0.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="recomputed"} 5.0
cadenza:prompt_tokens_by_source_created{model_name="m",source="recomputed"} 1.7e9
cadenza:worker_running{worker="w0"} 3.0
"""
AFTER = """cadenza:cluster_migrations_total{kind="hint"} 5.0
cadenza:cluster_migrations_total{kind="turn"} 1.0
cadenza:cluster_migration_bytes_total 4000.0
cadenza:cluster_hint_outcomes_total{outcome="found"} 4.0
cadenza:cluster_hint_outcomes_total{outcome="late"} 1.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="recomputed"} 12.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="new"} 30.0
cadenza:routing_odd{path="a \\"quoted\\" \\\\ value"} 1e3
cadenza:worker_running{worker="w0"} 1.0
"""


def test_metrics_text_is_parsed_and_diffed():
    before, after = parse_metrics(BEFORE), parse_metrics(AFTER)
    assert before[("cadenza:cluster_migrations_total", (("kind", "hint"),))] == 2.0
    assert after[("cadenza:routing_odd", (("path", 'a "quoted" \\ value'),))] == 1000.0
    c = counters_by_label(diff_metrics(before, after))
    assert c["cluster_migrations"] == {"hint": 3.0, "turn": 1.0}
    assert c["cluster_migration_bytes"] == 3000.0
    assert c["cluster_hint_outcomes"] == {"found": 3.0, "late": 1.0}
    assert c["prompt_tokens_by_source"] == {"new": 30.0, "recomputed": 7.0}
    assert c["cluster_routing_decisions"] == {} and c["cluster_failovers"] == 0


def _convs(n: int = 40, turns: int = 4) -> list[Conversation]:
    return [
        Conversation(str(i), tuple(Turn(f"u{i}.{j}", "a") for j in range(turns))) for i in range(n)
    ]


def test_think_time_is_reading_plus_typing_and_plans_are_seeded():
    plans = plan_cluster_sessions(
        _convs(), session_rate=0.5, read_mean_s=5.0, typing_s=11.3, seed=3
    )
    again = plan_cluster_sessions(
        _convs(), session_rate=0.5, read_mean_s=5.0, typing_s=11.3, seed=3
    )
    assert plans == again
    assert all(len(p.think_s) == 3 and min(p.think_s) >= 11.3 for p in plans)


def test_missing_and_false_hints_are_deterministic_and_near_their_fractions():
    plans = plan_cluster_sessions(
        _convs(400), session_rate=1.0, read_mean_s=5.0, typing_s=2.0, seed=0
    )
    a = hint_schedules(plans, missing=0.2, false=0.3, read_mean_s=5.0, seed=1)
    assert a == hint_schedules(plans, missing=0.2, false=0.3, read_mean_s=5.0, seed=1)
    assert a != hint_schedules(plans, missing=0.2, false=0.3, read_mean_s=5.0, seed=2)
    unhinted = sum(len(s.unhinted_turns) for s in a)
    assert 0.15 < unhinted / (400 * 3) < 0.25
    assert all(0 not in s.unhinted_turns for s in a)  # first turns are never hinted anyway
    false = [s.false_hint_after_s for s in a if s.false_hint_after_s is not None]
    assert 0.22 < len(false) / 400 < 0.38 and all(x >= 0 for x in false)
    none = hint_schedules(plans, missing=0.0, false=0.0, read_mean_s=5.0, seed=1)
    assert all(not s.unhinted_turns and s.false_hint_after_s is None for s in none)
    with pytest.raises(ValueError):
        hint_schedules(plans, missing=1.5, false=0.0, read_mean_s=5.0, seed=1)


def test_trials_take_disjoint_slices_of_conversations():
    convs = _convs(10)
    first = trial_conversations(convs, 0, 4)
    second = trial_conversations(convs, 4, 4)
    assert not {c.conversation_id for c in first} & {c.conversation_id for c in second}
    assert [c.conversation_id for c in trial_conversations(convs, 8, 4)] == ["8", "9", "0", "1"]


def test_imbalance_of_polled_loads():
    samples = LoadSamples()
    workers = [
        {"id": "w0", "state": "alive", "load": {"running": 2, "waiting": 1, "in_flight": 2}},
        {"id": "w1", "state": "alive", "load": {"running": 0, "waiting": 0, "in_flight": 1}},
        {"id": "w2", "state": "dead", "load": {"running": 0, "waiting": 0, "in_flight": 0}},
    ]
    samples.add(0.0, workers)
    samples.add(0.5, [{**w, "load": {"in_flight": 0}} for w in workers])
    assert outstanding_of(workers[0]) == 3 and outstanding_of(workers[1]) == 1
    imb = imbalance(samples.samples)
    assert imb["samples"] == 2 and imb["busy_samples"] == 1
    assert imb["max_over_mean"] == pytest.approx(3 / 2)
    assert imb["max_minus_min_mean"] == pytest.approx(1.0)
    assert imb["max_minus_min_max"] == 2
    assert imb["mean_outstanding_by_worker"] == {"w0": 1.5, "w1": 0.5}
    s = series(samples.samples)
    assert s == {"t_s": [0.0, 0.5], "max_over_mean": [1.5, 1.0], "max_minus_min": [2.0, 0.0]}
    assert imbalance([])["max_over_mean"] is None


def _turn(session, turn, worker, prompt, cached, hinted=None, status="ok", e2e=1.0):
    return {
        "session": session,
        "turn": turn,
        "status": status,
        "worker": worker,
        "prompt_tokens": prompt,
        "output_tokens": 16,
        "cached_tokens": cached,
        "hinted": hinted,
        "e2e_s": e2e,
    }


def test_landings_classify_moved_hinted_turns_by_whether_their_kv_was_there():
    assert kv_found(100, 96) and kv_found(100, 80) and not kv_found(100, 64)
    turns = [
        _turn("a", 0, "w0", 84, 0),
        _turn("a", 1, "w1", 150, 96, hinted=True),  # moved, history 100: found
        _turn("a", 2, "w1", 200, 0, hinted=True),  # stayed, lost
        _turn("b", 0, "w0", 84, 0),
        _turn("b", 1, "w1", 150, 16, hinted=True),  # moved, lost
        _turn("b", 2, "w1", 200, 160, hinted=False),  # unhinted, stayed, found
        _turn("c", 0, "w0", 84, 0),
        _turn("c", 1, "w0", 150, 0, hinted=True, status="censored"),  # not classified
    ]
    land = landings(turns)
    assert land["hinted_moved_found"] == 1 and land["hinted_moved_lost"] == 1
    assert land["hinted_stayed_lost"] == 1 and land["unhinted_stayed_found"] == 1
    assert land["followups"] == 4 and land["hinted"] == 3 and land["hinted_moved"] == 2
    assert land["hinted_moved_found_fraction"] == 0.5
    assert land["moved_fraction"] == 0.5
    e2e = e2e_stats(turns)
    assert e2e["e2e_mean_s"] == 1.0 and math.isnan(e2e_stats([])["e2e_p90_s"])


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_quick_mode_estimate_and_server_command(tmp_path):
    args = _args()
    assert policy_names(args.policies) == list(POLICIES)
    assert args.hint_lead_s == 11.3 and args.slo_ttft_s == 2.0 and args.max_trials == 6
    assert 45 * 60 < run_estimate_s(args, len(POLICIES)) < 75 * 60
    quick = _args("--quick")
    apply_quick(quick)
    assert policy_names(quick.policies) == ["round-robin", "symphony"]
    assert run_estimate_s(quick, 2) < 5 * 60
    explicit = _args("--quick", "--duration-s", "12", "--policies", "sticky")
    apply_quick(explicit)
    assert explicit.duration_s == 12 and explicit.max_trials == 1
    assert policy_names(explicit.policies) == ["sticky"]
    with pytest.raises(ValueError):
        policy_names("symphony,nope")
    cmd = server_spec("sticky", _args("--backend", "local"), 8123, tmp_path).command
    joined = " ".join(cmd)
    assert "--routing sticky" in joined and "--cluster-backend local" in joined
    assert "--workers 2" in joined and "--worker-threads 1" in joined
    assert "--num-kv-blocks" in joined and str(tmp_path / "sticky") in joined


def _policy(name, rate, imbalance_ratio, moved_found, trials_ok=(True,)):
    trials = []
    for i, ok in enumerate(trials_ok):
        trials.append(
            {
                "rate": rate * (i + 1),
                "passed": ok,
                "summary": {
                    "ttft_p50_s": 0.3,
                    "ttft_p90_s": 1.2,
                    "ttft_p99_s": 2.5,
                    "e2e_mean_s": 2.0,
                    "e2e_p90_s": 3.0,
                    "turns_completed": 40,
                    "turns_sent": 41,
                    "cached_fraction": 0.6,
                },
                "counters": {
                    "cluster_migrations": {"hint": 4.0},
                    "cluster_migration_bytes": 8 * 2**20,
                    "cluster_hint_outcomes": {"found": 9.0, "late": 1.0, "false": 2.0},
                    "cluster_routing_decisions": {"hinted": 10.0},
                    "cluster_prompt_tokens_by_source": {"device": 500.0, "migrated": 100.0},
                    "prompt_tokens_by_source": {"recomputed": 40.0, "new": 900.0},
                },
                "imbalance": {
                    "max_over_mean": imbalance_ratio,
                    "max_minus_min_mean": 0.5,
                    "max_minus_min_max": 3,
                    "mean_outstanding_by_worker": {"w0": 1.0, "w1": 1.2},
                },
                "load_series": {
                    "t_s": [0.0, 0.5, 1.0],
                    "max_over_mean": [1.0, 1.5, 1.2],
                    "max_minus_min": [0.0, 1.0, 1.0],
                },  # fmt: skip
                "hints_sent": {"true": 10, "false": 2},
                "landings": {
                    "hinted_moved_found_fraction": moved_found,
                    "hinted_moved": 8,
                    "moved_fraction": 0.4,
                    "hinted_found_fraction": 0.9,
                },
                "turns_by_worker": {"w0": 20, "w1": 21},
            }
        )
    passing = [t["rate"] for t in trials if t["passed"]]
    return {
        "name": name,
        "status": "ok",
        "sustainable_rate": max(passing, default=0.0),
        "trials": trials,
    }


def _results():
    return {
        "meta": {
            "command": "cadenza bench cluster",
            "model": "smollm2-135m",
            "machine": {"cpu": "test cpu", "cores": 2},
            "slo": "p90 TTFT <= 2 s",
            "settings": {
                "workers": 2,
                "worker_threads": 1,
                "hint_lead_s": 11.3,
                "slo_ttft_s": 2.0,
                "backend": "ray",
            },  # fmt: skip
            "wall_s": 60.0,
        },
        "policies": [
            _policy("round-robin", 0.1, 1.1, 0.1),
            _policy("sticky", 0.1, 1.4, 0.5, trials_ok=(True, True)),
            _policy("symphony", 0.2, 1.2, 0.95, trials_ok=(True, False)),
            {"name": "mell", "status": "skipped", "skip_reason": "no", "trials": []},
        ],
    }


def test_comparison_and_report_from_a_synthetic_result(tmp_path):
    results = _results()
    comp = compare(results)
    assert comp["ratios"]["symphony/round-robin"] == pytest.approx(2.0)
    assert comp["ratios"]["symphony/sticky"] == pytest.approx(1.0)
    met = {c["check"].split(" (")[0]: c["met"] for c in comp["checks"]}
    assert met["symphony rate >= 1.5x round-robin"] is True
    assert met["symphony rate >= 1x kv-aware"] is None  # not run
    assert met["symphony load imbalance"] is True
    assert [c["met"] for c in comp["checks"]][-1] is True
    md = render_markdown(results, "cluster", {"rates": "cluster-rates.png"})
    assert "| symphony | 0.2 |" in md and "2.00×" in md and "mell** skipped" in md
    assert "![rates](cluster-rates.png)" in md and "2 workers" in md
    paths = write_cluster_report(results, tmp_path, "cluster")
    assert set(paths) == {"json", "md", "rates", "ttft", "imbalance"}
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    loaded = json.loads(paths["json"].read_text())
    assert loaded["comparison"]["ratios"]["symphony/sticky"] == pytest.approx(1.0)
