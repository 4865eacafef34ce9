"""`cadenza bench agents` without servers: workload, pool sizing, summaries, report, converter."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from cadenza.bench.agents_bench import apply_quick, describe_live, server_spec
from cadenza.bench.agents_client import AgentTrialConfig, StepRecord, _on_event, _request
from cadenza.bench.agents_report import compare, render_markdown, write_agents_report
from cadenza.bench.agents_summary import summarize_agents_trial
from cadenza.bench.agents_workload import (
    TEMPLATE_TOKENS_PER_MESSAGE,
    Program,
    Step,
    bench_workload,
    generate_programs,
    live_kv,
    programs_from_trace,
    synthetic_text,
)
from cadenza.bench.cluster_scrape import diff_metrics, parse_metrics
from cadenza.cli import build_parser
from cadenza.sim.converters.swe_agent import chars_over_4, convert_files, convert_trajectory
from cadenza.sim.trace import TraceTurn, read_trace, validate, write_trace

# ------------------------------------------------------------------------------ workload


def test_programs_are_deterministic_and_sized_by_the_trace() -> None:
    turns, programs = generate_programs(bench_workload(programs=5, seed=3))
    again_turns, again = generate_programs(bench_workload(programs=5, seed=3))
    assert turns == again_turns and programs == again
    validate(turns)
    assert len(programs) == 5
    assert sum(len(p.steps) for p in programs) == len(turns)
    for program in programs:
        assert 6 <= len(program.steps) <= 10
        assert len(program.system_text.split()) == program.system_tokens == 600
        for step in program.steps:
            assert len(step.input_text.split()) == step.input_tokens
            assert 32 <= step.output_tokens <= 64
        assert program.steps[-1].tool_s == 0.0
        assert all(1.0 <= s.tool_s <= 4.0 for s in program.steps[:-1])
    # One shared system prompt; every step's text is the program's own.
    assert len({p.system_text for p in programs}) == 1
    firsts = [p.steps[0].input_text for p in programs]
    assert len(set(firsts)) == len(firsts)
    other_seed = generate_programs(bench_workload(programs=5, seed=4))[1]
    assert other_seed != programs


def test_synthetic_text_is_keyed() -> None:
    assert synthetic_text(40, "a/1") == synthetic_text(40, "a/1")
    assert synthetic_text(40, "a/1") != synthetic_text(40, "a/2")
    assert len(synthetic_text(40, "x").split()) == 40
    assert len(synthetic_text(0, "x").split()) == 1


def test_trace_text_is_used_when_present() -> None:
    turns = [
        TraceTurn("s", 3, 4, arrival_s=0.0, text="hello there you", tool_s=1.5),
        TraceTurn("s", 2, 5, think_s=0.25),
    ]
    (program,) = programs_from_trace(turns)
    assert program.system_text == "" and program.system_tokens == 0
    assert program.steps[0].input_text == "hello there you"
    assert len(program.steps[1].input_text.split()) == 2
    assert [s.tool_s for s in program.steps] == [1.5, 0.0]
    assert [s.think_s for s in program.steps] == [0.0, 0.25]


def _program(name: str, system: int, steps: list[tuple[int, int]]) -> Program:
    return Program(
        name, "x", system, tuple(Step("y", i, o, think_s=0.0, tool_s=1.0) for i, o in steps)
    )


def test_pool_sizing_arithmetic() -> None:
    a = _program("a", 100, [(50, 10), (30, 10)])  # 200 tokens + 5 messages x 5
    b = _program("b", 100, [(200, 20), (100, 20), (100, 20)])  # 560 + 7 x 5
    assert a.final_context_tokens == 200 + 5 * TEMPLATE_TOKENS_PER_MESSAGE
    assert b.final_context_tokens == 560 + 7 * TEMPLATE_TOKENS_PER_MESSAGE
    live = live_kv([a, b], concurrency=4, block_size=16)
    assert live.concurrency == 2  # no more than there are programs
    assert live.mean_final_tokens == (225 + 595) / 2
    assert live.blocks == math.ceil(2 * 410 / 16) == 52
    assert live.floor_blocks == math.ceil(595 / 16) + 4 == 42
    full, half = live.pool(100), live.pool(50)
    assert (full.blocks, full.floored) == (52, False)
    assert (half.target_blocks, half.blocks, half.floored) == (26, 42, True)
    text = describe_live(live, [full, half])
    assert "52 blocks" in text and "floored from 26" in text
    with pytest.raises(ValueError):
        live_kv([], 2)


# ------------------------------------------------------------------------------ client


def test_request_bodies() -> None:
    program = _program("p", 10, [(3, 7), (4, 9)])
    history = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    cfg = AgentTrialConfig(base_url="http://h", model="m", api="responses")
    path, body = _request(cfg, program, 1, history, "resp_1")
    assert path == "/v1/responses"
    assert body["previous_response_id"] == "resp_1" and body["instructions"] == "x"
    assert body["input"] == [{"role": "user", "content": "y"}]
    assert body["max_output_tokens"] == 9 and body["ignore_eos"] and body["store"]
    cfg = AgentTrialConfig(base_url="http://h", model="m", api="chat")
    path, body = _request(cfg, program, 0, history, None)
    assert path == "/v1/chat/completions"
    assert body["messages"] == history and body["max_tokens"] == 7 and body["ignore_eos"]
    with pytest.raises(ValueError):
        AgentTrialConfig(base_url="http://h", model="m", api="completions")


def test_stream_events_fill_the_record() -> None:
    record = StepRecord("p", 0, 0.0, _sent=0.0)
    parts: list[str] = []
    assert _on_event(record, {"type": "response.created", "response": {}}, parts) is None
    _on_event(record, {"type": "response.output_text.delta", "delta": "Hi"}, parts)
    usage = {
        "input_tokens": 120,
        "output_tokens": 8,
        "input_tokens_details": {"cached_tokens": 96, "cached_tokens_by_tier": {"host": 96}},
    }
    done = {"type": "response.incomplete", "response": {"id": "resp_9", "usage": usage}}
    assert _on_event(record, done, parts) == "resp_9"
    assert parts == ["Hi"] and record.ttft_s is not None
    assert (record.prompt_tokens, record.cached_tokens) == (120, 96)
    assert record.cached_by_tier == {"host": 96} and record.output_tokens == 8
    chat = StepRecord("p", 1, 0.0, _sent=0.0)
    _on_event(chat, {"choices": [{"delta": {"content": "a"}}]}, parts)
    chunk = {
        "choices": [],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 4,
            "prompt_tokens_details": {"cached_tokens": 32},
        },
    }
    _on_event(chat, chunk, parts)
    assert (chat.prompt_tokens, chat.cached_tokens, chat.output_tokens) == (50, 32, 4)


# ------------------------------------------------------------------------------ summary

_BEFORE = """cadenza:engine_step_seconds_sum{model_name="m"} 1.0
cadenza:engine_step_seconds_count{model_name="m"} 10.0
cadenza:e2e_request_latency_seconds_sum{model_name="m"} 0.5
cadenza:e2e_request_latency_seconds_count{model_name="m"} 2.0
cadenza:time_to_first_token_seconds_sum{model_name="m"} 0.2
cadenza:time_to_first_token_seconds_count{model_name="m"} 2.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="device"} 10.0
"""
_AFTER = """cadenza:engine_step_seconds_sum{model_name="m"} 5.0
cadenza:engine_step_seconds_count{model_name="m"} 50.0
cadenza:e2e_request_latency_seconds_sum{model_name="m"} 3.5
cadenza:e2e_request_latency_seconds_count{model_name="m"} 5.0
cadenza:time_to_first_token_seconds_sum{model_name="m"} 0.5
cadenza:time_to_first_token_seconds_count{model_name="m"} 5.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="device"} 70.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="host"} 100.0
cadenza:prompt_tokens_by_source_total{model_name="m",source="new"} 30.0
cadenza:swap_bytes_total{model_name="m",direction="in"} 300.0
cadenza:swap_bytes_total{model_name="m",direction="out"} 0.0
"""


def _step(program: str, k: int, status: str = "ok", ttft: float = 0.2) -> dict[str, Any]:
    return {
        "program": program,
        "step": k,
        "status": status,
        "ttft_s": ttft,
        "last_token_s": 1.0,
        "done_s": 1.1,
        "output_tokens": 8,
        "target_output_tokens": 8,
        "prompt_tokens": 100,
        "expected_prompt_tokens": 90,
        "cached_tokens": 60,
    }


def test_trial_summary_from_records_and_metrics() -> None:
    raw = {
        "elapsed_s": 20.0,
        "steps": [_step("a", 0), _step("a", 1), _step("b", 0), _step("b", 1, "censored", 4.0)],
        "jobs": [
            {"program": "a", "status": "finished", "start_s": 0.0, "jct_s": 6.0},
            {"program": "b", "status": "running", "start_s": 10.0, "jct_s": None},
            {"program": "c", "status": "not_started", "start_s": None, "jct_s": None},
        ],
    }
    diff = diff_metrics(parse_metrics(_BEFORE), parse_metrics(_AFTER))
    s = summarize_agents_trial(raw, diff)
    assert (s["jobs"], s["jobs_finished"], s["steps_completed"], s["steps_censored"]) == (
        3,
        1,
        3,
        1,
    )
    assert s["ttft_p90_s"] == 4.0 and s["ttft_p50_s"] == 0.2
    assert s["jct_mean_s"] == 6.0
    assert s["jct_mean_bounded_s"] == (6.0 + 10.0) / 2  # b had run 10 s when cut
    assert s["cached_fraction"] == 0.6 and s["prompt_over_trace_tokens"] == pytest.approx(100 / 90)
    server = s["server"]
    assert server["prompt_tokens_by_source"] == {
        "device": 60.0,
        "host": 100.0,
        "disk": 0.0,
        "recomputed": 0.0,
        "new": 30.0,
    }
    assert server["engine_e2e_mean_s"] == pytest.approx(1.0)
    assert s["outside_engine_s"] == pytest.approx(0.1)  # 1.1 client - 1.0 engine
    assert s["outside_engine_first_token_s"] == pytest.approx(0.2 - 0.1)
    assert s["post_last_token_mean_s"] == pytest.approx(0.1)
    assert s["engine_step_s"] == pytest.approx(4.0 / 3)
    assert s["engine_busy_fraction"] == pytest.approx(0.2)
    assert s["swap_bytes_per_step"] == pytest.approx(100.0)
    assert summarize_agents_trial(raw)["jobs_finished"] == 1  # without metrics too


# ------------------------------------------------------------------------------ report


def _summary(ttft_p90: float, jct: float, finished: int = 4) -> dict[str, Any]:
    return {
        "ttft_p50_s": ttft_p90 / 2,
        "ttft_p90_s": ttft_p90,
        "jct_mean_s": jct,
        "jct_mean_bounded_s": jct,
        "jct_p90_s": jct * 1.2,
        "jobs": 4,
        "jobs_finished": finished,
        "steps_sent": 30,
        "steps_completed": 30,
        "errors": 0,
        "cached_fraction": 0.8,
        "outside_engine_s": 0.05,
        "engine_step_s": 0.4,
        "server": {"prompt_tokens_by_source": {"device": 80.0, "new": 20.0}},
    }


def _results(sessions_25: tuple[float, float]) -> dict[str, Any]:
    numbers = {
        100: {"sessions": (1.0, 50.0), "resend": (1.05, 52.0), "no-cache": (4.0, 90.0)},
        50: {"sessions": (1.0, 50.0), "resend": (2.0, 70.0), "no-cache": (4.0, 90.0)},
        25: {"sessions": sessions_25, "resend": (3.0, 80.0), "no-cache": (4.0, 90.0)},
    }
    trials = [
        {
            "mode": mode,
            "pool": {"percent": pct, "blocks": 10 * pct, "target_blocks": 10 * pct},
            "status": "ok",
            "summary": _summary(*values),
        }
        for pct, modes in numbers.items()
        for mode, values in modes.items()
    ]
    trials.append({"mode": "no-cache", "pool": {"percent": 10}, "status": "skipped"})
    meta = {
        "command": "cadenza bench agents",
        "noise": 0.15,
        "live_kv": {"concurrency": 4, "mean_final_tokens": 3000.0, "block_size": 16},
        "pools": [{"percent": p, "blocks": 10 * p, "target_blocks": 10 * p} for p in numbers],
    }
    return {"meta": meta, "trials": trials}


def test_comparison_and_acceptance() -> None:
    cmp = compare(_results((1.0, 50.0)))
    assert cmp["pools"]["25"]["ttft_p90_b_over_a"] == pytest.approx(3.0)
    assert cmp["pools"]["50"]["jct_b_over_a"] == pytest.approx(70 / 50)
    assert len(cmp["checks"]) == 6 and cmp["all_met"]
    # (a) only 1.2x better at 25%: that check fails, the others hold.
    cmp = compare(_results((2.5, 50.0)))
    failed = [c["check"] for c in cmp["checks"] if not c["met"]]
    assert failed == ["25% pool: p90 TTFT (b)/(a) >= 1.3"] and not cmp["all_met"]


def test_report_renders_and_writes(tmp_path: Path) -> None:
    results = _results((1.0, 50.0))
    md = render_markdown(results, png="agents.png")
    assert "## Pool 25% of the live KV, 250 device blocks" in md
    assert "In this run: **all met**" in md
    assert "| TTFT p90 | 1000 ms | 3000 ms | 4000 ms |" in md
    assert "skipped" in md and "![p90 TTFT" in md
    paths = write_agents_report(results, tmp_path, "agents")
    data = json.loads(paths["json"].read_text())
    assert data["comparison"]["all_met"] is True
    assert paths["md"].read_text().startswith("# Agent programs")


# ------------------------------------------------------------------------------ command


def test_cli_and_server_commands(tmp_path: Path) -> None:
    args = build_parser().parse_args(["bench", "agents", "--quick", "--modes", "sessions"])
    assert args.func.__module__ == "cadenza.bench.agents_bench"
    apply_quick(args)
    assert args.programs == 4 and args.trial_timeout_s <= 60 and args.pools == "100,25"
    _, programs = generate_programs(bench_workload(programs=2))
    pool = live_kv(programs, 2).pool(50)
    cmds = {
        m: server_spec(m, args, 8123, tmp_path / m, pool).command
        for m in ("sessions", "resend", "no-cache")
    }
    for cmd in cmds.values():
        assert cmd[cmd.index("--num-kv-blocks") + 1] == str(pool.blocks)
    assert "--kv-host-gib" not in cmds["sessions"]
    assert cmds["resend"][cmds["resend"].index("--kv-host-gib") + 1] == "0"
    assert "--no-enable-prefix-caching" not in cmds["resend"]
    assert "--no-enable-prefix-caching" in cmds["no-cache"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "agents", "--steps", "9,3"])
    assert isinstance(args, argparse.Namespace)


# ------------------------------------------------------------------------------ converter

_SYSTEM = "You are an autonomous programmer working in a shell. " * 4
_SWE_AGENT = {
    "environment": "swe_main",
    "history": [
        {"role": "system", "content": _SYSTEM, "agent": "primary"},
        {"role": "user", "content": "Here is a demonstration: ...", "is_demo": True},
        {"role": "user", "content": "Fix the bug in utils.py where parse() drops the sign."},
        {"role": "assistant", "content": "Let me look.\n```\nopen utils.py\n```"},
    ],
    "trajectory": [
        {
            "response": "Let me look.\n```\nopen utils.py\n```",
            "thought": "Let me look.",
            "action": "open utils.py",
            "observation": "[File: utils.py (40 lines)]\n1:def parse(s):\n2:    return int(s)",
            "execution_time": 0.8,
        },
        {
            "response": "",
            "thought": "The sign is lost.",
            "action": "edit 2:2\n    return int(s.strip())\nend_of_edit",
            "observation": "",
        },
        {"response": "submit", "action": "submit", "observation": "diff --git ..."},
    ],
    "info": {"exit_status": "submitted"},
}


def test_swe_agent_trajectory_to_trace(tmp_path: Path) -> None:
    turns = convert_trajectory(_SWE_AGENT, "s1", arrival_s=2.0, default_tool_s=3.0)
    assert len(turns) == 3
    prefix = _SYSTEM + "\n" + "Here is a demonstration: ..."
    assert {t.shared_prefix_tokens for t in turns} == {chars_over_4(prefix)}
    assert turns[0].shared_prefix_id is not None and turns[0].shared_prefix_id.startswith("swe-")
    task = "Fix the bug in utils.py where parse() drops the sign."
    assert turns[0].input_tokens == chars_over_4(task) and turns[0].arrival_s == 2.0
    obs = _SWE_AGENT["trajectory"][0]["observation"]
    assert turns[1].input_tokens == chars_over_4(obs) and turns[1].think_s == 0.0
    assert turns[2].input_tokens == 1  # an empty observation still costs a token
    # No response recorded: the thought and the action are the output.
    step2 = _SWE_AGENT["trajectory"][1]
    assert turns[1].output_tokens == chars_over_4(step2["thought"] + "\n" + step2["action"])
    assert [t.tool_s for t in turns] == [0.8, 3.0, None]  # recorded, default, last
    assert turns[0].text is None
    words = convert_trajectory(_SWE_AGENT, "s1", count=lambda t: len(t.split()), include_text=True)
    assert words[0].input_tokens == len(task.split()) and words[0].text == task
    validate(turns)

    path = tmp_path / "django__django-1.traj"
    path.write_text(json.dumps(_SWE_AGENT))
    mini = {
        "trajectory_format": "mini-swe-agent-1",
        "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": task}]},
            {"role": "assistant", "content": "THOUGHT: look\n```bash\ncat utils.py\n```"},
            {"role": "user", "content": "<output>def parse(s): ...</output>"},
            {"role": "assistant", "content": "```bash\necho done\n```"},
        ],
    }
    mini_path = tmp_path / "astropy-2.traj.json"
    mini_path.write_text(json.dumps(mini))
    both = convert_files([path, mini_path], start_interval_s=5.0)
    sessions = [t.session_id for t in both]
    assert sessions == ["swe-0-django__django-1"] * 3 + ["swe-1-astropy-2"] * 2
    assert both[3].arrival_s == 5.0 and both[3].input_tokens == chars_over_4(task)
    assert both[4].input_tokens == chars_over_4("<output>def parse(s): ...</output>")
    assert both[3].tool_s == 2.0 and both[4].tool_s is None
    # Different system prompts, different prefix ids; the trace is valid as a whole.
    assert both[0].shared_prefix_id != both[3].shared_prefix_id
    assert read_trace(write_trace(tmp_path / "t.jsonl", both)) == both
    # And it runs as programs.
    programs = programs_from_trace(both)
    assert [len(p.steps) for p in programs] == [3, 2]
    with pytest.raises(ValueError, match="no task"):
        convert_trajectory({"history": [{"role": "system", "content": "x"}]}, "s")
