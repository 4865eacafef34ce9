"""The reproductions (``cadenza simulate reproduce``) on tiny configurations: each one's code
path end to end (runs, report structure, files), that its numbers are the simulator's (a
point re-run by hand through the public API gives the same value), determinism, and the
helpers against hand-computed cases. No shared data: tiny ShareGPT and Azure files here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cadenza.cli import build_parser
from cadenza.sim.metrics import TurnRecord
from cadenza.sim.repro import NAMES, common, continuum, hint_regimes, mell, pensieve, symphony
from cadenza.sim.repro.common import (
    Options,
    linear_crossing,
    log_crossing,
    outstanding_series,
    spread,
    window_stats,
)
from cadenza.sim.repro.false_hints import FalseHints
from cadenza.sim.repro.report import write_report
from cadenza.sim.repro.summary import write_summary
from cadenza.sim.repro.workloads import ChatLoad, chat_trace, conversations, unpinned
from cadenza.sim.simulator import Simulation
from cadenza.sim.trace import TraceTurn, earliest_arrivals, validate


def write_sharegpt(path: Path, n: int = 12) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = []
            for k in range(3):
                messages.append({"role": "user", "content": "q", "n_tokens": 8 + (i + k) % 5})
                messages.append({"role": "assistant", "content": "a", "n_tokens": 6 + i % 4})
            f.write(json.dumps({"id": f"c{i}", "messages": messages}) + "\n")
    return path


def write_azure(path: Path, n: int = 40) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        second, frac = divmod(i * 0.37 + (i % 7) * 0.05, 1.0)
        lines.append(f"2023-11-16 18:15:{int(second):02d}.{int(frac * 1e7):07d},{30 + i % 9},{8}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def options(tmp_path) -> Options:
    return Options(
        out_dir=tmp_path / "out",
        data=str(write_sharegpt(tmp_path / "sharegpt.jsonl")),
        azure=str(write_azure(tmp_path / "azure.csv")),
        log=lambda _: None,
    )


# ------------------------------------------------------------------------------ helpers


def test_log_crossing_interpolates_in_log_users():
    points = [(64.0, 1.0), (128.0, 1.02), (256.0, 1.10)]
    x, capped = log_crossing(points, 1.05)
    assert not capped and x == pytest.approx(2 ** (7 + 3 / 8))  # 3/8 of the way 128 -> 256
    assert log_crossing(points, 2.0) == (256.0, True)
    assert log_crossing(points, 0.5) == (0.0, False)
    assert linear_crossing([(1.0, 0.1), (3.0, 0.3)], 0.2) == (2.0, False)


def test_outstanding_series_counts_submitted_unfinished_turns_per_worker():
    def rec(worker, sub, fin):
        return TurnRecord("s", 0, worker, sub, sub, sub, fin, 1, 0, 1)

    records = [rec("w0", 0.5, 2.5), rec("w0", 1.0, 1.5), rec("w1", 2.0, 4.0)]
    times, series = outstanding_series(records, ["w0", "w1"], 1.0, 4.0)
    assert times == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert series == {"w0": [0, 2, 1, 0, 0], "w1": [0, 0, 1, 1, 0]}
    assert spread(series) == [0, 2, 0, 1, 0]
    stats = window_stats(records, 0.0, 1.5)
    assert stats["turns"] == 2 and stats["e2e_s"]["mean"] == pytest.approx(1.25)


def test_unpinned_keeps_arrivals_and_drops_only_the_pins():
    turns = [
        TraceTurn("p", 10, 5, arrival_s=0.0, tool_s=3.0),
        TraceTurn("p", 10, 5, think_s=0.5, tool_s=1.0),
        TraceTurn("p", 10, 5, think_s=0.0),
    ]
    none = unpinned(turns)
    short = unpinned(turns, keep_below_s=2.0)
    assert [t.tool_s for t in none] == [None, None, None]
    assert [t.tool_s for t in short] == [None, 1.0, None]
    assert earliest_arrivals(none) == earliest_arrivals(turns) == earliest_arrivals(short)


def test_chat_trace_starts_in_a_steady_state(options):
    convs, _ = conversations(options)
    load = ChatLoad(users=8, arrive_s=30.0, think_scale=0.05)
    turns, info = chat_trace(convs, load, seed=3)
    validate(turns)
    assert info["session_rate"] == pytest.approx(8 / info["session_span_s"])
    under_way = [t for t in turns if t.shared_prefix_tokens]  # entered mid-session at t >= 0
    assert under_way and all(t.shared_prefix_id.startswith("history:") for t in under_way)
    assert min(earliest_arrivals(turns)) >= 0.0
    again, _ = chat_trace(convs, load, seed=3)
    assert again == turns
    offsets = [0.0, 0.1, 0.2, 5.0, 5.1, 9.0, 20.0]  # bursts, rescaled to the session rate
    bursty, _ = chat_trace(convs, dataclasses.replace(load, arrival="azure"), offsets, seed=3)
    validate(bursty)
    assert bursty and bursty != turns


def test_false_hints_fraction():
    assert FalseHints.for_fraction(0.6, 0.8).per_reply == pytest.approx(1.2)
    with pytest.raises(ValueError):
        FalseHints.for_fraction(1.0, 0.5)


def test_reproduce_is_a_simulate_subcommand():
    args = build_parser().parse_args(
        ["simulate", "reproduce", "mell", "--quick", "--only", "gpu=RTX-4090"]
    )
    assert args.name == "mell" and args.quick and args.only == ["gpu=RTX-4090"]
    assert args.func.__module__ == "cadenza.sim.repro.cli"
    assert set(NAMES) == {"symphony", "mell", "pensieve", "continuum", "hint-regimes"}


# ------------------------------------------------------------------------------ reproductions


def test_symphony_tiny(options):
    plan = symphony.Plan(
        gpus=("RTX-4090",),
        arrivals=("poisson",),
        users=(2, 4),
        model="llama-2-7b",
        workers=2,
        target_turns=20,
        fixed_users=4,
        host_gib=1.0,
    )
    report = symphony.run(options, plan)
    data = report.data
    assert set(data["results"]) == {"RTX-4090/poisson"}
    res = data["results"]["RTX-4090/poisson"]
    assert set(res["served_users"]) == set(symphony.POLICIES)
    assert res["bound_e2e_s"] > 0 and "sticky" in res["imbalance_at_max_users"]
    rob = data["robustness"]
    assert rob["false_60%"]["false_hints"] > 0  # the hook ran inside the simulation
    # A point of the sweep, re-run by hand through the public API, gives the same number.
    convs, _ = conversations(options)
    load, window = symphony.load_for(plan, convs, 4, "poisson")
    turns, _ = chat_trace(convs, load, (), options.seed)
    sim = Simulation(symphony.config(plan, "RTX-4090", "symphony", options.seed), turns)
    sim.run()
    direct = window_stats(sim.client.records, *window)["e2e_s"]["mean"]
    assert res["runs"]["symphony"]["4"]["window"]["e2e_s"]["mean"] == direct > 0
    # The compute-free ceiling runs round-robin on the same traces with free compute: at the
    # smallest count it is no slower than round-robin itself.
    oracle = res["compute_free_oracle"]
    assert oracle["gpu_params"] == list(plan.oracle_gpu_params)
    rr_first = res["runs"]["round-robin"]["2"]["window"]["e2e_s"]["mean"]
    assert 0 < oracle["e2e_s_mean"]["2"] <= rr_first
    assert oracle["served_users"]["users"] >= res["served_users"]["round-robin"]["users"]
    paths = write_report(report, options.out_dir)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    text = paths[1].read_text()
    assert "Paper vs ours" in text and "Why ours differs" in text
    assert "The ceiling of what avoiding prefill can buy" in text
    assert json.loads(paths[0].read_text())["reproduction"] == "symphony"
    summary = write_summary(options.out_dir).read_text()
    assert "| symphony |" in summary and "mell" not in summary  # only what was written


def test_mell_tiny(options):
    plan = mell.Plan(setups=(("llama-2-7b", "RTX-4090"),), rates=(2.0,), arrive_s=15.0)
    data = mell.run(options, plan).data
    assert set(data["results"]) == {"llama-2-7b/RTX-4090/poisson-2", "llama-2-7b/RTX-4090/azure"}
    for res in data["results"].values():
        assert set(res["packers"]) == set(mell.PACKERS)
        assert res["timeline"]["turns"] == res["requests"] > 0
        for p in res["packers"].values():
            assert p["peak_active"] >= 1 and 0 < p["utilisation_mean"] <= 1
            # no packer holds the KV on fewer GPUs than it needs, split at will
            assert res["bounds"]["lower_peak"] <= p["peak_active_at_epochs"]
        assert res["bounds"]["lower_peak"] <= res["bounds"]["repacked_peak"]


def test_mell_replay_against_a_hand_computation():
    # Capacity 10 blocks of 16 tokens. a: 80 tokens (5 blocks) growing to 80 + 48 (8 blocks)
    # by t=4; b: 64 tokens (4 blocks) from t=1.5 to t=3. Best fit puts b beside a at t=1.5
    # (5 + 4 <= 10); at the t=2 epoch a has 6 blocks (80 + 16) and they still fit; b leaves
    # at 3; one GPU throughout.
    a = TurnRecord("a", 0, "w", 0.5, 0.5, 1.0, 4.0, 80, 0, 48)
    b = TurnRecord("b", 0, "w", 1.5, 1.5, 2.0, 3.0, 64, 0, 1)
    plan = mell.Plan()
    out = mell.replay(mell.make_packer("best-fit", 10, 1, 1e-4, plan), [a, b], 1.0, ["g0", "g1"])
    assert out["peak_active"] == 1 and out["active_series"][:4] == [1, 1, 1, 0]
    assert out["preemptions"] == 0 and out["migrations"] == 0


def test_mell_packing_bounds_against_a_hand_computation():
    # Capacity 9 blocks. At the t=2 epoch a holds 6 blocks (80 + 16 tokens) and b 4: 10
    # blocks need 2 GPUs; at t=1 and t=3 a alone (5, then 7 blocks) needs 1; at t=4 and t=5
    # nothing runs. Three 6-block requests on 10-block GPUs: 2 by the bound, 3 packed whole.
    a = TurnRecord("a", 0, "w", 0.5, 0.5, 1.0, 4.0, 80, 0, 48)
    b = TurnRecord("b", 0, "w", 1.5, 1.5, 2.0, 3.0, 64, 0, 1)
    bounds = mell.packing_bounds([a, b], 9, 1.0)
    assert bounds == {
        "lower_peak": 2,
        "lower_mean": pytest.approx(4 / 5),
        "repacked_peak": 2,
        "repacked_mean": pytest.approx(4 / 5),
    }
    assert [mell.kv_blocks_at(a, t) for t in (1.0, 2.0, 3.0)] == [5, 6, 7]
    assert mell.first_fit_decreasing([6, 6, 6], 10) == 3
    assert mell.first_fit_decreasing([6, 4, 3, 3, 2, 2], 10) == 2


def test_pensieve_tiny(options):
    plan = pensieve.Plan(
        turn_rates=(1.0, 4.0),
        eviction_rates=(4.0,),
        target_turns=20,
        min_window_s=10.0,
        warmup_s=5.0,
        target_latency_s=10.0,  # not reached: both rates run
    )
    data = pensieve.run(options, plan).data
    assert all(len(pts) == 2 for pts in data["curves"].values())
    assert set(data["throughput_at_target"]) == set(pensieve.SYSTEMS)
    assert len(data["eviction"]["cost"]) == len(data["eviction"]["lru"]) == 1
    first = data["curves"]["stateful"][0]
    assert first["turns"] > 0 and first["normalized_latency_s"] > 0


def test_continuum_tiny(options):
    plan = continuum.Plan(
        rates=(0.5,), arrive_s=8.0, warmup_s=0.0, steps=(2, 3), reply_tokens=(4, 8)
    )
    data = continuum.run(options, plan).data
    row = data["results"]["0.5"]
    assert set(continuum.VARIANTS) <= set(row)
    assert row["no-pin"]["pinned_turns"] == 0 < row["pin"]["pinned_turns"]
    assert row["no_pin_over"]["no-pin"] == 1.0 and row["pin"]["jct_s"]["mean"] > 0


def test_hint_regimes_tiny_and_deterministic(options):
    plan = hint_regimes.Plan(
        leads_s=(0.1, 2.0),
        accuracies=(1.0, 0.5),
        bandwidths_gbps=(10.0,),
        users=(4,),
        workers=2,
        gpu="RTX-4090",
        model="llama-2-7b",
        host_gib=1.0,
        target_turns=20,
    )
    first = hint_regimes.run(options, plan)
    cells = first.data["grid"]["users=4/gbps=10"]["symphony"]
    assert set(cells) == {f"lead={a}/acc={b}" for a in ("0.1", "2") for b in ("1", "0.5")}
    assert cells["lead=2/acc=0.5"]["false_hints"] > 0
    common._MEMO.clear()  # run it again for real
    again = hint_regimes.run(dataclasses.replace(options, out_dir=options.out_dir / "b"), plan)
    assert again.data == first.data
    assert "Where the gain is negative" in first.markdown


@pytest.mark.parametrize("module", [symphony, mell, pensieve, continuum, hint_regimes])
def test_plans_for_quick_and_scale(module):
    full = module.plan_for(Options())
    quick = module.plan_for(Options(quick=True))
    half = module.plan_for(Options(scale=0.5))
    assert quick != full and half != full
    assert type(quick) is type(full) is type(half)


def test_reproduce_refuses_inputs_it_could_only_misread(tmp_path, capsys):
    """A data file that is not there (the run would fall back to synthetic data), an ``--only``
    key or value the sweep does not have (it would run everything, or nothing, and still write
    the report): each stops before any run, writing nothing."""
    from cadenza.cli import main

    cases = [
        (["pensieve", "--data", str(tmp_path / "nope.jsonl")], "--data"),
        (["mell", "--azure", str(tmp_path / "nope.csv")], "--azure"),
        (["pensieve", "--only", "bogus=1"], "no 'bogus' to restrict; keys: eviction, system"),
        (["mell", "--only", "gpu=H200"], "gpu takes RTX-4090 in this run"),
        (["symphony", "--only", "gpu"], "--only takes KEY=VALUE"),
        (["continuum", "--only", "gpu=H100"], "keys: none"),
    ]
    out = tmp_path / "out"
    for argv, message in cases:
        code = main(["simulate", "reproduce", *argv, "--quick", "--out-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (argv, err)
    assert not out.exists()
