"""``cadenza bench replay --trace``: a tiny session trace through the real engine (a tiny random
Llama, one engine and the two-worker cluster of in-process workers), with the simulator's
metrics schema, the trace's token counts, and the second turn served from the cached KV."""

from __future__ import annotations

import json

import pytest
from tests.conftest import TINY_LLAMA

from cadenza.bench.trace_replay import TraceReplayConfig, config_from_args, replay_trace
from cadenza.cli import build_parser
from cadenza.model.source import random_model_source
from cadenza.sim.metrics import SCHEMA, dumps_metrics
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import simulate
from cadenza.sim.trace import TraceTurn, write_trace

PREFIX = 20


def tiny_trace() -> list[TraceTurn]:
    """Two sessions of two turns: a shared system prompt, a think time, a hint and a tool call."""
    turns = []
    for s in range(2):
        sid = f"s{s}"
        shared = {"shared_prefix_id": "sys", "shared_prefix_tokens": PREFIX}
        turns.append(TraceTurn(sid, 30 + s, 5, arrival_s=0.05 * s, tool_s=0.05, **shared))
        turns.append(TraceTurn(sid, 9, 4, think_s=0.1, hint_lead_s=0.05, **shared))
    return turns


def config(**kw) -> TraceReplayConfig:
    return TraceReplayConfig(
        model="tiny", num_blocks=64, host_gib=0.001, kv_cost_model="linear", threads=1, **kw
    )


@pytest.fixture(scope="module")
def source():
    return random_model_source(TINY_LLAMA, seed=3)


def sim_keys(metrics) -> dict:
    """The schema's shape: every key, nested, with the values left out (and the maps whose
    keys are values: placement reasons, worker ids, settings)."""
    if isinstance(metrics, dict):
        return {
            k: sim_keys(v)
            for k, v in metrics.items()
            if k not in ("config", "workers", "placements", "by_trigger")
        }
    return None


def check_turns(metrics, turns):
    assert metrics["schema"] == SCHEMA and metrics["source"] == "engine"
    assert metrics["turns"] == len(turns) and metrics["rejected_turns"] == 0
    assert metrics["sessions"] == 2
    tokens = metrics["tokens"]
    assert tokens["output"] == sum(t.output_tokens for t in turns)
    # First turns: prefix + input; second turns: the whole history + input.
    first = sum(PREFIX + t.input_tokens for t in turns[0::2])
    second = sum(
        PREFIX + a.input_tokens + a.output_tokens + b.input_tokens
        for a, b in zip(turns[0::2], turns[1::2], strict=True)
    )
    assert tokens["prompt"] == first + second
    assert tokens["history"] == sum(
        PREFIX + a.input_tokens + a.output_tokens for a in turns[0::2]
    ) + (2 * PREFIX)
    assert metrics["ttft_s"]["mean"] > 0
    assert metrics["e2e_s"]["mean"] >= metrics["ttft_s"]["mean"]
    assert metrics["throughput"]["output_tokens_per_s"] > 0


def test_one_engine_replays_the_trace_with_the_simulators_schema(source):
    turns = tiny_trace()
    metrics = replay_trace(turns, config(), source=source)
    check_turns(metrics, turns)
    # Second turns find their history cached (the session's KV stayed on the device).
    history = sum(PREFIX + a.input_tokens + a.output_tokens for a in turns[0::2])
    assert metrics["tokens"]["cached"] >= history - 2 * 16
    assert metrics["cached_tokens_by_tier"]["device"] == metrics["tokens"]["cached"]
    assert set(metrics["workers"]) == {"w0"}
    assert metrics["workers"]["w0"]["turns"] == len(turns)
    # The same keys as the simulator's metrics of the same trace, and per worker the same
    # counters but the simulator's own clock (the time its copies held a step up).
    predicted = simulate(SimConfig(num_blocks=64, routing="symphony"), turns)
    assert sim_keys(metrics) == sim_keys(predicted)
    assert set(predicted["workers"]["w0"]) - set(metrics["workers"]["w0"]) == {"sync_copy_s"}
    json.loads(dumps_metrics(metrics))


def test_two_worker_cluster_replays_the_trace(source):
    turns = tiny_trace()
    metrics = replay_trace(turns, config(workers=2, routing="symphony"), source=source)
    check_turns(metrics, turns)
    assert metrics["tokens"]["cached"] > 0
    assert set(metrics["workers"]) == {"w0", "w1"}
    assert sum(w["turns"] for w in metrics["workers"].values()) == len(turns)
    assert sum(v for k, v in metrics["placements"].items() if ":" not in k) == len(turns)


def test_the_replay_command_has_the_trace_flags(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", tiny_trace())
    args = build_parser().parse_args(
        ["bench", "replay", "--trace", str(trace), "--workers", "2", "--out", "m.json"]
    )
    assert args.trace == str(trace) and args.out == "m.json"
    config = config_from_args(args)
    assert config.workers == 2 and config.routing == "symphony"
    assert config.cluster_backend == "local" and config.model == "smollm2-135m"
    assert config == TraceReplayConfig(workers=2)
    # Without --trace the ShareGPT replay is unchanged: the trace flags stay unset (None), so
    # the command line it records lists only its own flags.
    plain = build_parser().parse_args(["bench", "replay"])
    assert plain.trace is None and plain.conversations == 100
    assert plain.workers is None and plain.routing is None and plain.host_gib is None
    # Settings the simulator refuses are refused here too, before any model loads; --out
    # belongs to the --trace mode, and a bad one fails before the replay, not after it.
    for flags, message in (
        (["--block-size", "0"], "block_size must be positive"),
        (["--kv-cache-gib", "0"], "kv_cache_gib must be positive"),
        (["--out", str(tmp_path)], "is a directory; name a file"),
    ):
        args = build_parser().parse_args(["bench", "replay", "--trace", str(trace), *flags])
        with pytest.raises(ValueError, match=message):
            args.func(args)
    plain_out = build_parser().parse_args(["bench", "replay", "--out", "m.json"])
    with pytest.raises(ValueError, match="--out is the metrics file of a --trace replay"):
        plain_out.func(plain_out)
    # The validation that runs this replay against the simulator is a bench command too.
    validation = build_parser().parse_args(["bench", "sim-validation", "--quick"])
    assert validation.quick and validation.func.__module__ == "cadenza.sim.validate"
