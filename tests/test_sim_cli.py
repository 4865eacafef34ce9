"""``cadenza simulate --trace FILE --out FILE``: a tiny trace through the whole simulator in
seconds, the metrics schema, and byte-identical output for the same trace and seed (in fresh
processes with different hash seeds, so nothing depends on Python's hash randomisation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cadenza.cli import build_parser
from cadenza.sim.metrics import SCHEMA
from cadenza.sim.trace import TraceTurn, write_trace


def tiny_trace(path):
    turns = []
    for s in range(12):
        sid = f"s{s}"
        turns.append(
            TraceTurn(
                sid,
                120 + 7 * s,
                12,
                arrival_s=0.2 * s,
                shared_prefix_id="sys",
                shared_prefix_tokens=48,
            )
        )
        for k in range(3):
            turns.append(
                TraceTurn(
                    sid,
                    20 + k,
                    8 + k,
                    think_s=1.5,
                    hint_lead_s=0.7 if s % 2 else None,
                    shared_prefix_id="sys",
                    shared_prefix_tokens=48,
                    tool_s=0.5 if k else None,
                )
            )
    return write_trace(path, turns)


def run_cli(args: list[str], hash_seed: str) -> subprocess.CompletedProcess:
    code = "import sys; from cadenza.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_simulate_writes_metrics_and_is_deterministic(tmp_path):
    trace = tiny_trace(tmp_path / "t.jsonl")
    outs = []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"m{i}.json"
        args = [
            "simulate",
            "--trace",
            str(trace),
            "--out",
            str(out),
            "--workers",
            "3",
            "--routing",
            "symphony",
            "--cost-model",
            "gpu",
            "--gpu",
            "H100",
            "--model",
            "llama-2-7b",
            "--seed",
            "7",
        ]
        result = run_cli(args, hash_seed)
        assert result.returncode == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    metrics = json.loads(outs[0])
    assert metrics["schema"] == SCHEMA and metrics["source"] == "simulator"
    assert metrics["turns"] == 48 and metrics["rejected_turns"] == 0
    for key in ("ttft_s", "e2e_s", "tpot_s"):
        assert set(metrics[key]) == {"mean", "p50", "p90", "p99", "max"}
        assert 0 < metrics[key]["p50"] <= metrics[key]["p99"] <= metrics[key]["max"]
    assert metrics["throughput"]["output_tokens_per_s"] > 0
    assert metrics["cached_tokens_by_tier"]["device"] > 0
    assert set(metrics["migrations"]) >= {"count", "blocks", "bytes", "seconds_mean"}
    assert metrics["config"]["gpu"] == "H100" and metrics["config"]["routing"] == "symphony"


def test_another_seed_gives_other_token_ids_but_the_same_shape_of_run(tmp_path):
    trace = tiny_trace(tmp_path / "t.jsonl")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"m{seed}.json"
        result = run_cli(
            ["simulate", "--trace", str(trace), "--out", str(out), "--seed", seed], "0"
        )
        assert result.returncode == 0, result.stderr
        outs.append(json.loads(out.read_text()))
    assert outs[0]["tokens"] == outs[1]["tokens"]  # lengths come from the trace


def test_parser_has_simulate_and_calibrate():
    parser = build_parser()
    args = parser.parse_args(["simulate", "--trace", "t.jsonl", "--workers", "16"])
    assert args.workers == 16 and args.simulate_command is None
    args = parser.parse_args(["simulate", "calibrate", "--out", "c.json", "--quick"])
    assert args.simulate_command == "calibrate" and args.cal_out == "c.json" and args.quick


def test_missing_trace_is_an_error_that_says_what_to_do(capsys):
    from cadenza.cli import main

    assert main(["simulate"]) == 2
    assert "--trace" in capsys.readouterr().err
    # A run's flag before a subcommand would be ignored by it: refused, naming the flag.
    assert main(["simulate", "--seed", "5", "speed"]) == 2
    assert "--seed belong(s) to `cadenza simulate --trace`" in capsys.readouterr().err
    # calibrate checks where it writes and probes before a minute of profiling.
    assert main(["simulate", "calibrate", "--disk-dir", "/nonexistent/dir"]) == 2
    assert "--disk-dir /nonexistent/dir is not a directory" in capsys.readouterr().err


def test_bad_settings_are_errors_that_say_what_to_fix(tmp_path, capsys):
    """Each bad setting stops the run before it starts, with the setting and what it needs
    (not a traceback, not a silently ignored flag)."""
    from cadenza.cli import main

    trace = tmp_path / "t.jsonl"
    tiny_trace(trace)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("not json")
    wrong_shape = tmp_path / "shape.json"
    wrong_shape.write_text('{"x": 1}')
    cases = [
        (["--block-size", "0"], "block_size must be positive"),
        (["--num-blocks", "-1"], "num_blocks must be positive"),
        (["--network-gbps", "0"], "network_gbps must be positive"),
        (["--network-latency-s", "-1"], "network_latency_s must not be negative"),
        (["--retention-ttl-s", "-5"], "retention_ttl_s must not be negative"),
        (["--gpu", "H100"], "add --cost-model gpu"),
        (["--gpu-param", "matmul_efficiency=0.5"], "--cost-model gpu"),
        (["--cost-model", "gpu", "--gpu-param", "matmul_efficiency=x"], "wants a number"),
        (["--cost-model", "gpu", "--gpu-param", "matmul_efficiency=0"], "a number > 0"),
        (["--cost-model", "gpu", "--gpu-param", "memory_utilization=5"], "fraction in (0, 1]"),
        (["--cost-model", "gpu", "--gpu-param", "step_overhead_s=-1"], "finite number >= 0"),
        (["--cost-model", "gpu", "--kv-cache-gib", "3"], "--kv-cache-gib sizes the cpu"),
        (["--calibration", str(bad_json)], "not a calibration JSON file"),
        (["--calibration", str(wrong_shape)], "not a calibration (missing"),
        (["--out", str(tmp_path)], "is a directory; name a file"),
        (["--out", str(trace / "m.json")], "is a file, not a directory"),
    ]
    for flags, message in cases:
        out = tmp_path / "m.json"
        assert main(["simulate", "--trace", str(trace), "--out", str(out), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("cadenza simulate: ") and message in err, (flags, err)
        assert not out.exists(), flags


def test_unreadable_traces_are_errors_naming_the_file(tmp_path, capsys):
    """A trace that is empty, not UTF-8, a cut-off gzip, or a directory stops the run with the
    file named; a turn too large to make up tokens for names its line and field."""
    import gzip

    from cadenza.cli import main

    good = tiny_trace(tmp_path / "t.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"session_id": "caf\xe9"}\n')
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(good.read_bytes())[:40])
    huge = tmp_path / "huge.jsonl"
    huge.write_text(
        '{"session_id":"s","arrival_s":0,"input_tokens":1000000000000,"output_tokens":4}\n'
    )
    cases = [
        (empty, "the trace has no turns"),
        (latin, "line 1: not UTF-8 text"),
        (cut, "not a readable gzip file"),
        (tmp_path, "is a directory; name a trace file"),
        (huge, "line 1: input_tokens must be at most 10,000,000"),
    ]
    for path, message in cases:
        assert main(["simulate", "--trace", str(path)]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith("cadenza simulate: ") and str(path) in err and message in err, err
