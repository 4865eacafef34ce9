"""`cadenza bench serve`: the rate search (pure), the summary rules, the HTTP load generator
against the tiny-model server, the transformers baseline server, and the report."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from tests.server_harness import MODEL, running_server

from cadenza.bench.load_client import (
    TrialConfig,
    meets_slo,
    run_trial,
    search_rate,
    summarize_trial,
)
from cadenza.bench.serve_bench import (
    add_arguments,
    conversations_for,
    ratios,
    sessions_needed,
    system_spec,
)
from cadenza.bench.serve_report import render_markdown, write_serve_report
from cadenza.bench.workloads import Conversation, Turn, plan_sessions
from cadenza.client.sse import DONE, delta_text, parse_sse_line

# ------------------------------------------------------------------------------ rate search


def test_search_doubles_then_bisects_within_the_trial_budget():
    calls = []

    def passes(rate):
        calls.append(rate)
        return rate <= 1.7

    best, history = search_rate(passes, start=0.25, max_trials=5)
    assert len(history) == len(calls) <= 5
    assert [r for r, _ in history[:4]] == [0.25, 0.5, 1.0, 2.0]
    assert history[4][0] == pytest.approx(math.sqrt(2.0))
    assert best == pytest.approx(math.sqrt(2.0))
    assert all(ok == (r <= 1.7) for r, ok in history)


def test_search_halves_when_the_start_fails_and_stops_at_the_precision():
    best, history = search_rate(lambda r: r <= 0.2, start=1.0, max_trials=10, precision=1.3)
    rates = [r for r, _ in history]
    assert rates[:4] == [1.0, 0.5, 0.25, 0.125]
    assert 0.2 / 1.3 <= best <= 0.2
    lo = max(r for r, ok in history if ok)
    hi = min(r for r, ok in history if not ok)
    assert hi / lo <= 1.3 and best == lo


def test_search_reports_zero_when_nothing_passes():
    best, history = search_rate(lambda r: False, start=1.0, max_trials=3)
    assert best == 0.0 and len(history) == 3
    with pytest.raises(ValueError):
        search_rate(lambda r: True, start=0.0)


# ---------------------------------------------------------------------------------- summary


def _turn(status, ttft=None, tpot=None, out=0, prompt=None, cached=None):
    return {
        "status": status,
        "ttft_s": ttft,
        "tpot_s": tpot,
        "output_tokens": out,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
    }


def test_summary_counts_failures_as_slo_misses():
    turns = [_turn("ok", 0.1 * i, 0.02, 8, 100, 50) for i in range(1, 10)]
    good = summarize_trial(turns, elapsed_s=10.0, sessions=3)
    assert good["turns_completed"] == 9 and good["cached_fraction"] == pytest.approx(0.5)
    assert good["ttft_p90_s"] == pytest.approx(0.9) and good["tpot_p50_s"] == pytest.approx(0.02)
    assert good["output_tok_per_s"] == pytest.approx(7.2)
    assert meets_slo(good, 1.0) and not meets_slo(good, 0.5)
    bad = summarize_trial([*turns, _turn("http_429"), _turn("error")], 10.0, 3)
    assert bad["http_429"] == 1 and bad["errors"] == 1
    assert math.isinf(bad["ttft_p99_s"])
    unfinished = summarize_trial([*turns, _turn("incomplete", 0.2, 0.5, 3)], 10.0, 3)
    assert unfinished["turns_incomplete"] == 1 and meets_slo(unfinished, 1.0)
    assert not meets_slo(unfinished, 1.0, min_completed=0.95)  # 9 of 10 finished
    assert meets_slo(unfinished, 1.0, slo_tpot_s=0.02)
    assert not meets_slo(unfinished, 1.0, slo_tpot_s=0.01)
    censored = summarize_trial([*turns, _turn("censored", 30.0)], 10.0, 3)
    assert censored["turns_censored"] == 1 and censored["ttft_p99_s"] == 30.0
    assert not meets_slo(summarize_trial([], 1.0, 0), 2.0)


def test_sse_lines():
    assert parse_sse_line("data: [DONE]") == DONE
    assert parse_sse_line(": keep-alive") is None and parse_sse_line("") is None
    event = parse_sse_line('data: {"choices": [{"delta": {"content": "hi"}}]}')
    assert isinstance(event, dict) and delta_text(event) == "hi"
    with pytest.raises(ValueError):
        parse_sse_line("data: {oops")


# ------------------------------------------------------------------------ the load generator


def _conversations(n: int = 12) -> list[Conversation]:
    words = ["apples", "rivers", "engines", "music", "clouds", "trains"]
    return [
        Conversation(
            f"c{i}",
            tuple(
                Turn(f"Tell me about {words[(i + j) % len(words)]}, part {j}.", "ok")
                for j in range(3)
            ),
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def server(tiny_chat_source):
    with running_server(tiny_chat_source) as running:
        yield running


@pytest.mark.parametrize("mode", ["session", "stateless"])
def test_trial_against_the_tiny_server(server, mode):
    plans = plan_sessions(
        conversations_for(_conversations(), sessions_needed(3.0, 3.0)),
        session_rate=3.0,
        mean_think_s=0.05,
        seed=1,
    )
    cfg = TrialConfig(
        base_url=server.base_url,
        model=MODEL,
        mode=mode,
        duration_s=3.0,
        grace_s=10.0,
        max_output=6,
        hint_lead_s=0.05 if mode == "session" else 0.0,
        extra_body={"ignore_eos": True},
        session_prefix=f"t-{mode}",
    )
    raw = run_trial(cfg, plans, progress=False)
    s = raw["summary"]
    assert s["turns_completed"] > 0 and s["errors"] == 0 and s["http_429"] == 0
    assert math.isfinite(s["ttft_p90_s"]) and s["ttft_p50_s"] <= s["ttft_p90_s"]
    assert math.isfinite(s["tpot_p90_s"])
    assert s["output_tok_per_s"] > 0 and s["turns_per_s"] > 0
    ok = [t for t in raw["turns"] if t["status"] == "ok"]
    assert all(t["output_tokens"] == 6 for t in ok)
    if mode == "session":
        # Follow-up turns found their history in the session's KV.
        assert s["cached_fraction"] > 0, raw["turns"]
        assert any(t["turn"] > 0 and t["cached_tokens"] > 0 for t in ok)
    assert meets_slo(s, 60.0)


# -------------------------------------------------------------------- transformers baseline


def test_hf_baseline_server_streams_with_usage(tiny_chat_source):
    from fastapi.testclient import TestClient

    from cadenza.bench.hf_server import build_app
    from cadenza.model.hf_reference import build_hf_model

    source = tiny_chat_source
    model = build_hf_model(source.config, source.state_dict, attn_implementation="sdpa")
    app = build_app(model, source.tokenizer, "tiny")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with TestClient(app) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        events = []
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                event = parse_sse_line(line)
                if event is not None:
                    events.append(event)
        assert events[-1] == DONE
        usage = events[-2]["usage"]
        prompt = source.tokenizer.encode_chat(body["messages"], add_generation_prompt=True)
        assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] == len(prompt)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"]]
        assert "length" in finishes
        plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
        assert plain["usage"]["completion_tokens"] == 5


# -------------------------------------------------------------------------------- the rest


def test_system_specs_give_every_server_the_same_threads(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--threads", "3", "--llamacpp-python", str(tmp_path / "nope")])
    cad = system_spec("cadenza", args, 1234, tmp_path)
    assert cad.mode == "session" and "--num-threads" in cad.command and "3" in cad.command
    stateless = system_spec("cadenza-stateless", args, 1234, tmp_path)
    assert stateless.mode == "stateless" and "--no-enable-prefix-caching" in stateless.command
    hf = system_spec("hf", args, 1234, tmp_path)
    assert hf.command[hf.command.index("--threads") + 1] == "3"
    with pytest.raises(FileNotFoundError, match="make llamacpp"):
        system_spec("llama.cpp", args, 1234, tmp_path)


def test_report_files(tmp_path):
    summary = summarize_trial([_turn("ok", 0.5, 0.03, 8, 100, 80)] * 10, 10.0, 2)
    systems = [
        {
            "name": "cadenza",
            "status": "ok",
            "sustainable_rate": 1.0,
            "trials": [
                {"rate": 1.0, "passed": True, "summary": summary, "turns": []},
                {"rate": 2.0, "passed": False, "summary": {**summary, "ttft_p90_s": 3.0}},
            ],
        },
        {"name": "hf", "status": "ok", "sustainable_rate": 0.1, "trials": []},
        {"name": "llama.cpp", "status": "skipped", "skip_reason": "no build", "trials": []},
    ]
    results = {
        "meta": {"model": "m", "settings": {"slo_ttft_s": 2.0}, "slo": "p90 TTFT <= 2 s"},
        "systems": systems,
        "ratios": ratios(systems),
    }
    assert results["ratios"]["cadenza/hf"] == pytest.approx(10.0)
    assert results["ratios"]["cadenza/llama.cpp"] is None
    paths = write_serve_report(results, tmp_path, "serve")
    assert json.loads(paths["json"].read_text())["systems"][0]["sustainable_rate"] == 1.0
    md = paths["md"].read_text()
    assert "| cadenza | **1** |" in md and "no build" in md and "cadenza/hf | 10.00×" in md
    assert "serve.png" in md and paths["png"].stat().st_size > 0
    assert render_markdown(results).count("### ") == 2


def test_unreachable_base_url_records_errors():
    plans = plan_sessions(_conversations(2), session_rate=10.0, mean_think_s=0.0, seed=0)
    cfg = TrialConfig(base_url="http://127.0.0.1:9", model="m", duration_s=0.5, grace_s=1.0)
    raw = run_trial(cfg, plans, progress=False)
    assert raw["summary"]["errors"] == raw["summary"]["turns_sent"] > 0
    assert not meets_slo(raw["summary"], 2.0)
