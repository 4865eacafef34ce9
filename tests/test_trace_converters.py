"""Converters to session traces, on small inline data (never ../shared: it may be absent)."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from cadenza.sim.converters.agents import SYSTEM_PREFIX_ID as AGENT_PREFIX
from cadenza.sim.converters.agents import AgentWorkload, generate_agents
from cadenza.sim.converters.azure import azure_to_trace, convert_azure, read_azure
from cadenza.sim.converters.mooncake import (
    SYSTEM_PREFIX_ID,
    convert_mooncake,
    mooncake_to_trace,
    read_mooncake,
)
from cadenza.sim.converters.sharegpt import (
    READING_TOKENS_PER_S,
    TYPING_TOKENS_PER_S,
    ChatTurn,
    ShareGPTConversation,
    conversations_to_trace,
    convert_sharegpt,
)
from cadenza.sim.trace import TraceTurn, read_trace, validate
from cadenza.sim.trace_cli import main as trace_main

# ------------------------------------------------------------------------------ ShareGPT


def _message(role: str, content: str, n_tokens: int | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": content}
    if n_tokens is not None:
        message["n_tokens"] = n_tokens
    return message


SHAREGPT = [
    {
        "id": "c1",
        "num_turns": 3,
        "messages": [
            _message("user", "hi there", 9),
            _message("assistant", "hello", 90),
            _message("user", "tell me more", 18),
            _message("assistant", "more", 45),
            _message("user", "x" * 400, 900),  # long: typing is capped
            _message("assistant", "ok", 4),
        ],
    },
    {
        "id": "c2",
        "num_turns": 2,
        "messages": [
            _message("user", "abcdefgh"),  # no n_tokens: 8 bytes / 4 = 2 tokens
            _message("assistant", "x" * 40),
            _message("user", "y" * 12),
            _message("assistant", "z" * 20),
            _message("user", "a trailing question with no reply"),
        ],
    },
]


def _write_jsonl_gz(path: Path, records: list[dict[str, Any]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def test_sharegpt_symphony_think_times_and_hints(tmp_path: Path) -> None:
    path = _write_jsonl_gz(tmp_path / "sg.jsonl.gz", SHAREGPT)
    turns = convert_sharegpt(path, session_rate=0.5, seed=1)
    assert validate(turns) == turns
    assert [(t.session_id, t.input_tokens, t.output_tokens) for t in turns] == [
        ("c1", 9, 90),
        ("c1", 18, 45),
        ("c1", 900, 4),
        ("c2", 2, 10),
        ("c2", 3, 5),
    ]
    first, second, third = turns[:3]
    assert first.arrival_s == 0.0 and first.hint_lead_s is None and first.text == "hi there"
    typing = 18 / TYPING_TOKENS_PER_S
    assert second.think_s == pytest.approx(90 / READING_TOKENS_PER_S + typing, abs=1e-6)
    assert second.hint_lead_s == pytest.approx(typing, abs=1e-6)
    assert third.think_s == pytest.approx(45 / READING_TOKENS_PER_S + 60.0, abs=1e-6)
    assert third.hint_lead_s == 60.0  # 900 tokens would take ~17 minutes to type
    assert turns[3].arrival_s is not None and turns[3].arrival_s > 0
    assert turns[4].think_s == pytest.approx(10 / READING_TOKENS_PER_S + 3 / TYPING_TOKENS_PER_S)
    uncapped = convert_sharegpt(path, session_rate=0.5, max_typing_s=float("inf"))
    assert uncapped[2].hint_lead_s == pytest.approx(900 / TYPING_TOKENS_PER_S, abs=1e-6)


def test_sharegpt_options(tmp_path: Path) -> None:
    path = _write_jsonl_gz(tmp_path / "sg.jsonl.gz", SHAREGPT)
    words = convert_sharegpt(path, session_rate=1.0, count_tokens=lambda s: len(s.split()))
    assert [t.input_tokens for t in words[:3]] == [2, 3, 1]
    assert [t.output_tokens for t in words[:3]] == [1, 1, 1]
    bare = convert_sharegpt(path, session_rate=1.0, include_text=False, sessions=1, max_turns=2)
    assert len(bare) == 2 and all(t.text is None for t in bare)
    assert [t.session_id for t in convert_sharegpt(path, session_rate=1.0, min_turns=3)] == [
        "c1"
    ] * 3
    with pytest.raises(ValueError, match="unknown think model"):
        convert_sharegpt(path, session_rate=1.0, think="random")  # type: ignore[arg-type]


def test_sharegpt_bad_record_names_its_line(tmp_path: Path) -> None:
    bad = {"id": "x", "messages": [_message("assistant", "hi")]}
    path = _write_jsonl_gz(tmp_path / "bad.jsonl.gz", [SHAREGPT[0], bad])
    with pytest.raises(ValueError, match=r"bad\.jsonl\.gz:2: messages\[0\] has role"):
        convert_sharegpt(path, session_rate=1.0)


def _conversations(n: int, turns: int = 3) -> list[ShareGPTConversation]:
    chat = tuple(ChatTurn(text="q", input_tokens=20, output_tokens=200) for _ in range(turns))
    return [ShareGPTConversation(f"c{i}", chat) for i in range(n)]


def test_sharegpt_pensieve_think_times_are_exponential_mean_60() -> None:
    turns = conversations_to_trace(_conversations(2000), session_rate=2.0, think="pensieve")
    thinks = [t.think_s for t in turns if t.think_s is not None]
    assert len(thinks) == 4000
    assert statistics.fmean(thinks) == pytest.approx(60.0, rel=0.06)
    assert statistics.median(thinks) == pytest.approx(60.0 * 0.6931, rel=0.08)
    for t in turns:  # the hint is the typing time, never before the previous reply ends
        if t.think_s is not None:
            assert t.hint_lead_s == pytest.approx(min(20 / TYPING_TOKENS_PER_S, t.think_s))
    starts = sorted(t.arrival_s for t in turns if t.arrival_s is not None)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.08)


def test_sharegpt_missing_hint_fraction() -> None:
    conversations = _conversations(1000)

    def unhinted(fraction: float) -> set[int]:
        turns = conversations_to_trace(
            conversations, session_rate=1.0, missing_hint_fraction=fraction, seed=7
        )
        return {i for i, t in enumerate(turns) if t.think_s is not None and t.hint_lead_s is None}

    assert unhinted(0.0) == set()
    assert len(unhinted(1.0)) == 2000
    some, more = unhinted(0.1), unhinted(0.3)
    assert len(some) / 2000 == pytest.approx(0.1, abs=0.025)
    assert len(more) / 2000 == pytest.approx(0.3, abs=0.035)
    assert some <= more  # common random numbers: a higher fraction drops a superset


def test_sharegpt_is_deterministic_for_a_seed() -> None:
    conversations = _conversations(50)
    a = conversations_to_trace(conversations, session_rate=1.0, think="pensieve", seed=3)
    assert a == conversations_to_trace(conversations, session_rate=1.0, think="pensieve", seed=3)
    assert a != conversations_to_trace(conversations, session_rate=1.0, think="pensieve", seed=4)


# ------------------------------------------------------------------------------ Mooncake


def _mc(ms: int, inp: int, out: int, hashes: list[int]) -> dict[str, Any]:
    return {"timestamp": ms, "input_length": inp, "output_length": out, "hash_ids": hashes}


MOONCAKE = [
    _mc(0, 1300, 100, [0, 1, 2]),  # 0: starts session A (2 complete blocks: 0, 1)
    _mc(1000, 800, 50, [0, 10]),  # 1: starts B (only block 0 is complete)
    _mc(5000, 2000, 80, [0, 1, 3, 4]),  # 2: A's 2nd turn (covers 0's complete blocks)
    _mc(6000, 1500, 10, [0, 1, 5]),  # 3: matches 0 again, which has a next turn: fork, C
    _mc(9000, 3000, 20, [0, 1, 3, 4, 6, 7]),  # 4: A's 3rd turn (covers 2's blocks 0, 1, 3)
    _mc(9500, 1000, 5, [0, 11]),  # 5: starts D
    _mc(12000, 1510, 7, [0, 1, 5]),  # 6: C's 2nd turn (3 is the latest ending at block 1)
    _mc(13000, 2900, 9, [0, 1, 3, 4, 6, 9]),  # 7: covers 4's blocks but is shorter: fork, E
    _mc(14000, 700, 3, [42, 43]),  # 8: no system block: F, whole prompt is input
]


def _write_mooncake(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in MOONCAKE))
    return path


def test_mooncake_session_recovery(tmp_path: Path) -> None:
    requests = read_mooncake(_write_mooncake(tmp_path / "mc.jsonl"))
    turns, recovery = mooncake_to_trace(requests)
    assert recovery.previous == (None, None, 0, None, 2, None, 3, None, None)
    assert recovery.forks == 2 and recovery.clamped_inputs == 1
    assert [(t.session_id, t.input_tokens, t.output_tokens) for t in turns] == [
        ("mooncake-0", 1300 - 512, 100),
        ("mooncake-1", 800 - 512, 50),
        ("mooncake-0", 2000 - 1300 - 100, 80),
        ("mooncake-3", 1500 - 512, 10),
        ("mooncake-0", 3000 - 2000 - 80, 20),
        ("mooncake-5", 1000 - 512, 5),
        ("mooncake-3", 1, 7),  # 1510 - 1500 - 10 = 0: the reply was not re-sent; raised to 1
        ("mooncake-7", 2900 - 512, 9),
        ("mooncake-8", 700, 3),
    ]
    assert [t.arrival_s for t in turns] == [0.0, 1.0, 5.0, 6.0, 9.0, 9.5, 12.0, 13.0, 14.0]
    assert all(t.think_s is None for t in turns)
    assert all(
        (t.shared_prefix_id, t.shared_prefix_tokens) == (SYSTEM_PREFIX_ID, 512) for t in turns[:8]
    )
    assert (turns[8].shared_prefix_id, turns[8].shared_prefix_tokens) == (None, 0)
    assert validate(turns) == turns


def test_mooncake_think_timing_and_session_limit(tmp_path: Path) -> None:
    path = _write_mooncake(tmp_path / "mc.jsonl")
    turns = convert_mooncake(path, timing="think", assumed_tpot_s=0.01)
    thinks = {i: t.think_s for i, t in enumerate(turns) if t.think_s is not None}
    assert thinks == pytest.approx({2: 5.0 - 1.0, 4: 4.0 - 0.8, 6: 6.0 - 0.1})
    assert all((t.arrival_s is None) == (i in thinks) for i, t in enumerate(turns))
    kept = convert_mooncake(path, sessions=2)
    assert [t.session_id for t in kept] == ["mooncake-0", "mooncake-1", "mooncake-0", "mooncake-0"]


def test_mooncake_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MOONCAKE[0]) + "\n" + '{"timestamp": 1, "input_length": 5}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: hash_ids must be a list"):
        read_mooncake(path)


# ------------------------------------------------------------------------------ Azure

AZURE_CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:46.6806900,10,0
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:16:00.0000000,5,6
2023-11-16 18:16:01,7,8
"""


def test_azure_single_turn_sessions_keep_real_arrivals(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_CSV)
    turns = convert_azure(path)
    assert [t.session_id for t in turns] == [f"azure-{i}" for i in range(5)]
    assert [t.arrival_s for t in turns] == [0.0, 0.0001, 4.314579, 13.31941, 14.31941]
    assert [(t.input_tokens, t.output_tokens) for t in turns] == [
        (374, 44),
        (10, 1),  # 0 generated tokens: raised to 1
        (396, 109),
        (5, 6),
        (7, 8),
    ]
    assert validate(turns) == turns


def test_azure_synthetic_sessions(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_CSV)
    requests = read_azure(path)
    consecutive = azure_to_trace(requests, turns_per_session=2)
    assert [t.session_id for t in consecutive] == [
        "azure-0",
        "azure-0",
        "azure-1",
        "azure-1",
        "azure-2",
    ]
    strided = azure_to_trace(requests, turns_per_session=2, grouping="strided")
    assert [t.session_id for t in strided] == [
        "azure-0",
        "azure-1",
        "azure-2",
        "azure-0",
        "azure-1",
    ]
    assert validate(strided) == strided
    assert len(azure_to_trace(requests, turns_per_session=2, sessions=1)) == 2


def test_azure_errors(tmp_path: Path) -> None:
    path = tmp_path / "azure.csv"
    path.write_text("time,a,b\n1,2,3\n")
    with pytest.raises(ValueError, match="expected the columns"):
        read_azure(path)
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15,1,2\n")
    with pytest.raises(ValueError, match=r"azure\.csv:2: bad timestamp"):
        read_azure(path)


# ------------------------------------------------------------------------------ agents


def test_agent_programs_structure() -> None:
    workload = AgentWorkload(programs=20, rate=0.5, seed=11)
    turns = generate_agents(workload)
    assert validate(turns) == turns
    by_program: dict[str, list[TraceTurn]] = {}
    for t in turns:
        by_program.setdefault(t.session_id, []).append(t)
    assert len(by_program) == 20
    starts = [steps[0].arrival_s or 0.0 for steps in by_program.values()]
    assert starts[0] == 0.0 and starts == sorted(starts)
    for steps in by_program.values():
        assert 10 <= len(steps) <= 30
        assert steps[0].arrival_s is not None and 200 <= steps[0].input_tokens <= 1500
        assert steps[-1].tool_s is None
        for prev, step in zip(steps, steps[1:], strict=False):
            assert step.think_s == 0.0 and step.hint_lead_s == prev.tool_s
            assert 200 <= step.input_tokens <= 2000
        for step in steps:
            assert 100 <= step.output_tokens <= 400
            assert (step.shared_prefix_id, step.shared_prefix_tokens) == (AGENT_PREFIX, 2000)
            assert step.tool_s is None or 0.5 <= step.tool_s <= 30.0


def test_agent_generator_is_deterministic_and_hints_can_go_missing() -> None:
    a = generate_agents(AgentWorkload(programs=5, seed=1))
    assert a == generate_agents(AgentWorkload(programs=5, seed=1))
    assert a != generate_agents(AgentWorkload(programs=5, seed=2))
    unhinted = generate_agents(AgentWorkload(programs=5, seed=1, missing_hint_fraction=1.0))
    assert all(t.hint_lead_s is None for t in unhinted)
    assert [t.tool_s for t in unhinted] == [t.tool_s for t in a]  # same draws
    with pytest.raises(ValueError, match="steps must be a range"):
        AgentWorkload(steps=(5, 2))


# ------------------------------------------------------------------------------ CLI


def test_cli_converts_each_file_source(tmp_path: Path) -> None:
    sharegpt = _write_jsonl_gz(tmp_path / "sg.jsonl.gz", SHAREGPT)
    mooncake = _write_mooncake(tmp_path / "mc.jsonl")
    azure = tmp_path / "azure.csv"
    azure.write_text(AZURE_CSV)
    out = tmp_path / "out.jsonl"
    for argv, turns in [
        (["--from", "sharegpt", "--input", str(sharegpt), "--think", "pensieve"], 5),
        (["--from", "mooncake", "--input", str(mooncake), "--timing", "think"], 9),
        (["--from", "azure", "--input", str(azure), "--turns-per-session", "2"], 5),
    ]:
        assert trace_main(["convert", "--out", str(out), *argv]) == 0
        assert len(read_trace(out)) == turns
