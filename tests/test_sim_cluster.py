"""The simulator's cluster glue against hand-computed expectations: a SYMPHONY hint moves a
session's KV away from its busy worker, the migration lands when the network model says, and
the turn then runs where the policy put it with its history cached. Also: the simulator runs
the very classes the server uses, and defines no scheduler or policy of its own."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest

import cadenza.sim
from cadenza.cluster import placement
from cadenza.cluster.kv_index import KVIndex
from cadenza.core.block_pool import BlockPool
from cadenza.core.engine_core import EngineCore
from cadenza.core.eviction import EvictionPolicy
from cadenza.core.kv_cache_manager import KVCacheManager
from cadenza.core.scheduler import Scheduler
from cadenza.core.tiering import TierManager
from cadenza.sim.cpu_cost import CPUCalibration
from cadenza.sim.model_shapes import MODELS
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import Simulation
from cadenza.sim.trace import TraceTurn

BASE_S = 0.01
PREFILL_S = 1e-4
DECODE_S = 0.01
BLOCK_BYTES = MODELS["smollm2-135m"].block_bytes(16)  # 16 tokens x 2 x 30 layers x 192 x 4 B
NETWORK_GBPS = 10.0
LATENCY_S = 1e-3


def calibration_file(tmp_path) -> str:
    cal = CPUCalibration(
        model="smollm2-135m",
        base_s=BASE_S,
        prefill_token_s=PREFILL_S,
        decode_seq_s=DECODE_S,
        attention_pair_s=0.0,
        memcpy_bytes_per_s=10e9,
        disk_read_bytes_per_s=2e9,
        disk_write_bytes_per_s=1e9,
    )
    path = tmp_path / "cal.json"
    import json

    path.write_text(json.dumps(cal.to_json()))
    return str(path)


def config(tmp_path, routing: str, workers: int = 2) -> SimConfig:
    return SimConfig(
        workers=workers,
        routing=routing,
        calibration=calibration_file(tmp_path),
        network_gbps=NETWORK_GBPS,
        network_latency_s=LATENCY_S,
        host_gib=1.0,
    )


def test_hint_migrates_kv_off_the_busy_worker_at_the_modelled_time(tmp_path):
    trace = [
        # A: a 160-token prompt (10 full blocks), 2 tokens of reply; its second turn comes
        # 1 s after the first finished, announced 0.5 s ahead.
        TraceTurn("A", 160, 2, arrival_s=0.0),
        TraceTurn("A", 16, 2, think_s=1.0, hint_lead_s=0.5),
        # B: arrives after A's first turn finished and keeps its worker busy for 20 s.
        TraceTurn("B", 32, 1000, arrival_s=0.1),
    ]
    # Move for a difference of one request (the default waits for two).
    sim = Simulation(dataclasses.replace(config(tmp_path, "symphony"), rebalance_margin=1), trace)
    metrics = sim.run()
    turns = {(r.session_id, r.turn): r for r in sim.client.records}

    # A#0: both workers idle and empty, the cheaper-cost tie goes to w0. One prefill step of
    # 160 tokens (first token), then one decode step (second token).
    a0 = turns["A", 0]
    assert a0.worker == "w0" and a0.placement == "load"
    assert a0.ttft_s == pytest.approx(BASE_S + 160 * PREFILL_S)
    a0_end = BASE_S + 160 * PREFILL_S + BASE_S + DECODE_S
    assert a0.finish_s == pytest.approx(a0_end)
    # B#0: both idle again (A finished at 0.046): the tie goes to w0 again.
    assert turns["B", 0].worker == "w0"

    # The hint, at (a0_end + 1.0) - 0.5: w0 runs B, w1 is idle -> SYMPHONY picks w1 and moves
    # A's 10 full blocks from w0, over 10 Gb/s with 1 ms latency.
    (move,) = sim.router.migrations
    hint_at = a0_end + 1.0 - 0.5
    assert (move.src, move.dst, move.trigger, move.blocks) == ("w0", "w1", "hint", 10)
    assert move.bytes == 10 * BLOCK_BYTES
    assert move.start_s == pytest.approx(hint_at)
    assert move.done_s == pytest.approx(hint_at + LATENCY_S + 10 * BLOCK_BYTES / (10e9 / 8))

    # A#1 arrives at a0_end + 1.0, goes where its KV went, and finds all 160 tokens on w1's
    # device: it prefills only 2 + 16 tokens.
    a1 = turns["A", 1]
    assert a1.worker == "w1" and a1.placement == "hinted"
    assert a1.arrival_s == pytest.approx(a0_end + 1.0)
    assert a1.cached_tokens == 160 and a1.cached_by_tier.get("device") == 160
    assert a1.ttft_s == pytest.approx(BASE_S + 18 * PREFILL_S)
    assert metrics["migrations"]["count"] == 1
    assert metrics["placements"]["hinted"] == 1 and metrics["placements"]["hint:hint"] == 1


def test_without_hints_kv_aware_keeps_the_session_where_its_kv_is(tmp_path):
    trace = [
        TraceTurn("A", 160, 2, arrival_s=0.0),
        TraceTurn("A", 16, 2, think_s=1.0, hint_lead_s=0.5),
        TraceTurn("B", 32, 1000, arrival_s=0.1),
    ]
    sim = Simulation(config(tmp_path, "kv-aware"), trace)
    sim.run()
    turns = {(r.session_id, r.turn): r for r in sim.client.records}
    # w0: 18 tokens to prefill + B's decode (64 token-equivalents) = 82 < w1: 178 tokens.
    assert turns["A", 1].worker == "w0" and turns["A", 1].placement == "kv-hit"
    # On its own worker the turn also adopts the partial last block of the previous turn
    # (all but the newest token, whose KV was never computed): 162 - 1 tokens.
    assert turns["A", 1].cached_tokens == 161
    assert not sim.router.migrations
    assert sim.router.hints == {"ignored": 1}


def test_the_simulator_runs_the_classes_the_server_uses(tmp_path):
    trace = [TraceTurn("A", 40, 3, arrival_s=0.0)]
    for name in placement.POLICY_NAMES:
        sim = Simulation(config(tmp_path, name), trace)
        policy = type(sim.router.policy)
        assert policy is type(placement.make_policy(name, KVIndex()))  # the router's factory
        assert policy.__module__.startswith("cadenza.cluster.")
        assert type(sim.router.index).__module__ == "cadenza.cluster.kv_index"
        core = sim.workers[0].core
        assert type(core) is EngineCore
        assert type(core.scheduler) is Scheduler
        assert type(core.scheduler.kv) is KVCacheManager
        assert type(core.scheduler.kv.pool) is BlockPool
        assert type(core.tiers) is TierManager
        assert sim.run()["turns"] == 1


def test_worker_views_agree_with_load_snapshots(tmp_path):
    trace = [TraceTurn(f"s{i}", 300 + i, 40, arrival_s=0.01 * i) for i in range(30)]
    sim = Simulation(config(tmp_path, "least-loaded", workers=3), trace)
    checked = 0
    wake = sim._wake

    def checking_wake(worker, token):
        nonlocal checked
        wake(worker, token)
        for w in sim.workers:
            assert w.view() == w.view_from_load()
            checked += 1

    sim._wake = checking_wake  # type: ignore[method-assign]
    sim.run()
    assert checked > 100


def test_no_scheduler_or_policy_is_defined_under_sim():
    forbidden = (
        placement.PlacementPolicy,
        EvictionPolicy,
        Scheduler,
        BlockPool,
        TierManager,
        EngineCore,
    )
    for info in pkgutil.walk_packages(cadenza.sim.__path__, "cadenza.sim."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            assert not issubclass(cls, forbidden), f"{info.name}.{cls.__name__}"
            names = set(vars(cls))
            assert not {"schedule", "place", "on_hint", "choose"} & names, (
                f"{info.name}.{cls.__name__}"
            )
