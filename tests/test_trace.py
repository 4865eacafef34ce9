"""The session-trace format: round trips, every validation rule, summaries, the CLI, no torch."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cadenza.sim.trace import (
    FIELDS,
    TraceSummary,
    TraceTurn,
    dumps_turn,
    earliest_arrivals,
    read_trace,
    summarize,
    validate,
    write_trace,
)
from cadenza.sim.trace_cli import main as trace_main

TURNS = [
    TraceTurn(
        session_id="a",
        arrival_s=0.0,
        input_tokens=10,
        output_tokens=20,
        shared_prefix_id="sys",
        shared_prefix_tokens=64,
        text='héllo, "world"\n',
    ),
    TraceTurn(session_id="b", arrival_s=1.5, input_tokens=3, output_tokens=4, tool_s=2.0),
    TraceTurn(
        session_id="a",
        think_s=30.25,
        input_tokens=5,
        output_tokens=6,
        shared_prefix_id="sys",
        shared_prefix_tokens=64,
        hint_lead_s=4.0,
    ),
    TraceTurn(session_id="b", arrival_s=10.0, input_tokens=7, output_tokens=8),
    TraceTurn(session_id="b", think_s=0.5, input_tokens=1, output_tokens=1),
]


@pytest.mark.parametrize("name", ["trace.jsonl", "trace.jsonl.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    path = write_trace(tmp_path / name, TURNS)
    assert read_trace(path) == TURNS
    if name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            assert f.readline().startswith('{"session_id":"a"')


def test_gz_output_is_reproducible(tmp_path: Path) -> None:
    a = write_trace(tmp_path / "a.jsonl.gz", TURNS).read_bytes()
    b = write_trace(tmp_path / "b.jsonl.gz", TURNS).read_bytes()
    assert a == b


def test_lines_omit_defaults_and_keep_field_order() -> None:
    line = dumps_turn(TURNS[1])
    assert line == (
        '{"session_id":"b","arrival_s":1.5,"input_tokens":3,"output_tokens":4,"tool_s":2.0}'
    )
    record = json.loads(dumps_turn(TURNS[0]))
    assert list(record) == [k for k in FIELDS if k in record]
    assert "think_s" not in record and "hint_lead_s" not in record


def test_read_accepts_null_blank_lines_and_integer_seconds(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"session_id":"a","arrival_s":0,"input_tokens":1,"output_tokens":2,"tool_s":null}\n\n'
    )
    (turn,) = read_trace(path)
    assert turn.arrival_s == 0.0 and isinstance(turn.arrival_s, float) and turn.tool_s is None


def _line(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "session_id": "s",
        "arrival_s": 0.0,
        "input_tokens": 1,
        "output_tokens": 1,
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not ...}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([_line(bogus=1)], "line 1: unknown field(s) 'bogus'"),
        ([_line(input_tokens=...)], "line 1: missing field(s) 'input_tokens'"),
        ([_line(session_id=...)], "line 1: missing field(s) 'session_id'"),
        ([_line(think_s=1.0)], "line 1: both arrival_s and think_s are set"),
        ([_line(arrival_s=...)], "line 1: neither arrival_s nor think_s is set"),
        ([_line(), _line(arrival_s=..., think_s=1.0, session_id="t")], "line 2: the first turn"),
        ([_line(input_tokens=0)], "line 1: input_tokens must be > 0"),
        ([_line(output_tokens=-3)], "line 1: output_tokens must be > 0"),
        ([_line(arrival_s=5.0), _line(arrival_s=4.0)], "line 2: turns of session 's' are out of"),
        (
            [_line(arrival_s=5.0), _line(arrival_s=..., think_s=2.0), _line(arrival_s=6.0)],
            "line 3: turns of session 's' are out of order: arrival_s 6.0 is before the "
            "previous turn's arrival 7.0 (line 2)",
        ),
        ([_line(input_tokens=1.5)], "line 1: input_tokens must be an integer"),
        ([_line(input_tokens=True)], "line 1: input_tokens must be an integer"),
        ([_line(arrival_s=-1.0)], "line 1: arrival_s must be a finite number >= 0"),
        ([_line(arrival_s=float("nan"))], "line 1: arrival_s must be a finite number >= 0"),
        ([_line(hint_lead_s="soon")], "line 1: hint_lead_s must be a number of seconds"),
        ([_line(session_id="")], "line 1: session_id must not be empty"),
        ([_line(session_id=7)], "line 1: session_id must be a string"),
        ([_line(shared_prefix_id="p")], "line 1: shared_prefix_id and shared_prefix_tokens"),
        ([_line(shared_prefix_tokens=5)], "line 1: shared_prefix_id and shared_prefix_tokens"),
        (
            [_line(shared_prefix_id="p", shared_prefix_tokens=5), _line(arrival_s=1.0)],
            "line 2: session 's' changes its shared prefix",
        ),
        (
            [
                _line(shared_prefix_id="p", shared_prefix_tokens=5),
                _line(session_id="t", shared_prefix_id="p", shared_prefix_tokens=6),
            ],
            "line 2: shared prefix 'p' has 6 tokens here and 5 elsewhere",
        ),
        (["not an object"], "line 1: expected a JSON object"),
    ],
)
def test_validation_errors(records: list[Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate(records)
    assert message in str(info.value)


def test_validate_checks_turn_objects_too() -> None:
    with pytest.raises(ValueError, match="line 2: neither arrival_s nor think_s"):
        validate([TURNS[0], TraceTurn(session_id="x", input_tokens=1, output_tokens=1)])
    assert validate(TURNS) == TURNS


def test_read_errors_name_the_file_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(dumps_turn(TURNS[0]) + "\n\n" + '{"session_id": "a", "think_s": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3: missing field\(s\) 'input_tokens'"):
        read_trace(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 1: invalid JSON"):
        read_trace(path)


def test_write_refuses_an_invalid_trace(tmp_path: Path) -> None:
    bad = [TraceTurn(session_id="a", think_s=1.0, input_tokens=1, output_tokens=1)]
    with pytest.raises(ValueError, match="first turn"):
        write_trace(tmp_path / "t.jsonl", bad)
    assert list(tmp_path.iterdir()) == []


def test_earliest_arrivals_follow_think_tool_and_sequential_rule() -> None:
    # b's second turn has arrival_s 10.0; its third comes 0.5 s after it. b's first turn has a
    # 2 s tool call, which is over long before 10.0.
    assert earliest_arrivals(TURNS) == [0.0, 1.5, 30.25, 10.0, 10.5]
    chained = [
        TraceTurn(session_id="x", arrival_s=0.0, input_tokens=1, output_tokens=1, tool_s=5.0),
        TraceTurn(session_id="x", arrival_s=1.0, input_tokens=1, output_tokens=1),
    ]
    assert earliest_arrivals(chained) == [0.0, 5.0]  # waits for the tool call


def test_summary() -> None:
    assert summarize(TURNS) == TraceSummary(
        sessions=2,
        turns=5,
        input_tokens=26,
        output_tokens=39,
        duration_s=30.25,
        hinted_turns=1,
        tool_s=2.0,
    )
    assert summarize([]).turns == 0
    assert "2 sessions, 5 turns" in summarize(TURNS).format()


def test_cli_summary_and_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_trace(tmp_path / "t.jsonl", TURNS)
    assert trace_main(["summary", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["turns"] == 5
    out = tmp_path / "agents.jsonl.gz"
    argv = ["convert", "--from", "agents", "--out", str(out), "--sessions", "2", "--seed", "3"]
    assert trace_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    assert summarize(read_trace(out)).sessions == 2
    assert trace_main([*argv, "--think", "pensieve"]) == 2
    assert "--think does not apply to --from agents" in capsys.readouterr().err
    assert trace_main(["convert", "--from", "mooncake", "--out", str(out)]) == 2
    assert "needs --input" in capsys.readouterr().err
    # Settings that would write an empty trace, or fail only after converting, are refused.
    bad = [
        (["--from", "mooncake", "--input", str(tmp_path / "nope.jsonl")], "no such file"),
        (["--from", "agents", "--sessions", "0"], "--sessions must be at least 1"),
        (["--from", "agents", "--min-steps", "5", "--max-steps", "2"], "is above --max-steps"),
        (["--from", "agents", "--out", str(tmp_path)], "is a directory; name a file"),
    ]
    for flags, message in bad:
        argv = ["convert", "--out", str(tmp_path / "x.jsonl"), *flags]
        assert trace_main(argv) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert trace_main(["summary", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_cli_flags_all_have_help() -> None:
    import argparse

    from cadenza.sim.trace_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            assert action.help, f"trace {name} {action.dest} has no help"


def test_trace_modules_do_not_import_torch_or_ray() -> None:
    modules = [
        "cadenza.sim",
        "cadenza.sim.trace",
        "cadenza.sim.trace_cli",
        "cadenza.sim.converters.sharegpt",
        "cadenza.sim.converters.mooncake",
        "cadenza.sim.converters.azure",
        "cadenza.sim.converters.agents",
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    assert 'torch' not in sys.modules, f'{name} imported torch'\n"
        "    assert 'ray' not in sys.modules, f'{name} imported ray'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
