"""Simulator speed: the eviction index that replaced the per-allocation scans answers exactly as
the policies' scans do, and ``cadenza simulate speed``'s grid, table and report work on a tiny
synthetic trace (no shared data)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random

import pytest
from tests.conftest import EvictableEntry

from cadenza.core import block_pool, tiering
from cadenza.core.eviction import CostAwareEviction, CostModel, LRUEviction
from cadenza.core.eviction_index import EvictionIndex
from cadenza.sim import speed
from cadenza.sim.metrics import dumps_metrics
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import Simulation
from cadenza.sim.speed_report import MET, MISSED, render_markdown, table, write_report
from cadenza.sim.speed_run import Grid, SpeedPoint, run_grid
from cadenza.sim.trace import TraceTurn

Entry = EvictableEntry


def _fuzz(seed: int, kind: str, max_batch: int = 6) -> None:
    rng = random.Random(seed)
    now = [0.0]
    cost = CostModel((32, 64, 128, 1024, 8192), (1e-4, 2e-4, 3e-4, 1e-3, 5e-3))
    policy = (
        CostAwareEviction(lambda: now[0], cost) if kind == "cost" else LRUEviction(lambda: now[0])
    )
    index: EvictionIndex[Entry] = EvictionIndex(policy)
    queue: dict[Entry, int] = {}  # candidates -> place in queue order
    seq = 0
    for _ in range(300):
        r = rng.random()
        if r < 0.4:  # a batch let go together (one last-access time)
            last = rng.choice([now[0], now[0] - rng.random(), float(int(now[0]) - 2)])
            shared_pin = now[0] + 3 * rng.random()  # a request's blocks share one pin time
            batch = [
                Entry(
                    rng.randrange(0, 9000, 16),
                    rng.choice([16, 16, 5]),
                    last,
                    rng.choice([0.0, 0.0, shared_pin, now[0] + 3 * rng.random(), now[0] - 1]),
                )
                for _ in range(rng.randint(1, max_batch))
            ]
            index.add_many(batch, range(seq, seq + len(batch)))
            queue.update((e, seq + i) for i, e in enumerate(batch))
            seq += len(batch)
        elif r < 0.55 and queue:
            gone = rng.sample(list(queue), rng.randint(1, min(3, len(queue))))
            index.remove_many(gone)
            for e in gone:
                del queue[e]
        elif r < 0.65 and queue:
            e = rng.choice(list(queue))
            e.pin_until = rng.choice([0.0, now[0] + 2 * rng.random()])
            index.update(e)
        elif r < 0.78:
            now[0] += rng.choice([0.0, 0.0005, 0.3, 1.0])
        elif r < 0.8:
            now[0] -= 0.5  # a clock that goes back
        else:
            n = rng.randint(0, len(queue) + 2)
            expected = policy.choose(sorted(queue, key=queue.__getitem__), n)
            assert index.choose(n) == expected
            until = now[0] + rng.choice([0.5, 1.0, 3.0])
            pinned = sum(1 for e in queue if now[0] < e.pin_until <= until)
            assert index.count_pinned(now[0], until) == pinned


@pytest.mark.parametrize("batch", [6, 40])  # 40: long runs from one group, bisected
@pytest.mark.parametrize("kind", ["cost", "lru"])
def test_eviction_index_chooses_exactly_as_the_policy_scan(kind, batch):
    for seed in range(25):
        _fuzz(seed, kind, batch)


def test_eviction_index_defers_to_the_scan_when_costs_could_tie():
    policy = CostAwareEviction(lambda: 10.0, CostModel((0, 64), (1.0, 1.0 + 1e-15)))
    index: EvictionIndex[Entry] = EvictionIndex(policy)
    index.add_many([Entry(0, 16, 0.0), Entry(32, 16, 0.0)], range(2))
    assert index.choose(1) is None  # the owner falls back to the policy's scan


def _tiny_trace(sessions: int = 12, turns: int = 3) -> list[TraceTurn]:
    rng = random.Random(7)
    out = []
    for s in range(sessions):
        for t in range(turns):
            out.append(
                TraceTurn(
                    f"s{s}",
                    rng.randint(40, 400),
                    rng.randint(4, 40),
                    arrival_s=s * 0.05 if t == 0 else None,
                    think_s=None if t == 0 else rng.random(),
                    shared_prefix_id="sys",
                    shared_prefix_tokens=64,
                )
            )
    return out


def _pressure_config(eviction: str) -> SimConfig:
    # A pool of 96 blocks and a host tier of ~40: every allocation evicts, copies go out ahead
    # of time, the host tier evicts too.
    return SimConfig(
        workers=2,
        cost_model="gpu",
        model="llama-3.1-8b",
        num_blocks=96,
        host_gib=0.08,
        eviction=eviction,
        retention_ttl_s=0.5,
    )


@pytest.mark.parametrize("eviction", ["cost", "lru"])
def test_simulation_with_eviction_index_matches_the_scans(monkeypatch, eviction):
    config = _pressure_config(eviction)
    fast = Simulation(config, _tiny_trace())
    with_index = dumps_metrics(fast.run())
    pool = fast.workers[0].core.scheduler.kv.pool
    assert pool.free_index is not None and pool.num_evictions > 0
    assert fast.workers[0].core.tiers.stats.offloaded_blocks > 0
    monkeypatch.setattr(block_pool, "supports", lambda policy: False)
    monkeypatch.setattr(tiering, "supports", lambda policy: False)
    slow = Simulation(config, _tiny_trace())
    assert slow.workers[0].core.scheduler.kv.pool.free_index is None
    assert dumps_metrics(slow.run()) == with_index


def test_speed_grid_table_and_report(tmp_path):
    turns = _tiny_trace(sessions=6, turns=2)
    base = SimConfig(cost_model="gpu", model="llama-3.1-8b", num_blocks=512)
    seen: list[SpeedPoint] = []
    grid = Grid(workers=(1, 2), sweep_requests=4, requests=(3, 6), headline=True)
    points = run_grid(base, turns, grid, seen.append)
    assert [(p.sweep, p.workers, p.requests) for p in points] == [
        ("workers", 1, 4),
        ("workers", 2, 4),
        ("requests", 16, 3),
        ("requests", 16, 6),
        ("headline", 16, 12),
    ]
    assert seen == points
    for p in points:
        assert p.completed <= p.requests and p.cpu_s > 0 and p.wall_s > 0
        assert p.steps > 0 and p.events > 0 and p.simulated_s > 0
    assert SpeedPoint.from_json(points[0].to_json()) == points[0]
    rows = table(points)
    assert rows[0].startswith("| sweep | workers | requests | simulated s")
    assert len(rows) == 2 + len(points)

    args = argparse.Namespace(
        speed_routing="kv-aware",
        speed_gpu="A100-80GB",
        speed_model="llama-3.1-8b",
        speed_seed=0,
        speed_sweep_requests=4,
        speed_num_blocks=512,
        speed_block_size=16,
    )
    machine = {"cpu": "test", "cpus": 2, "python": "3", "load_average": [0.5], "niceness": 0}
    doc = speed.build_doc(args, turns, "tiny", points, machine)
    assert MET in render_markdown(doc)
    slow = {**doc, "meta": {**doc["meta"], "target_cpu_s": 0.0}}
    assert MISSED in render_markdown(slow)
    paths = write_report(doc, tmp_path, "sim-speed")
    assert [p.name for p in paths] == ["sim-speed.json", "sim-speed.md", "sim-speed.png"]
    assert json.loads(paths[0].read_text())["points"][-1]["sweep"] == "headline"
    assert "![simulation time" in paths[1].read_text()
    assert paths[2].stat().st_size > 0


def test_speed_says_which_input_to_give_without_the_data(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args(["--input", str(tmp_path / "absent.jsonl")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "absent.jsonl" in err and "--input" in err


def test_speed_replays_a_session_trace(tmp_path, monkeypatch):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(json.dumps(dataclasses.asdict(t)) + "\n" for t in _tiny_trace(4, 2)),
        encoding="utf-8",
    )
    monkeypatch.setattr("sys.argv", ["cadenza", "simulate", "speed"])
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args(
        ["--trace", str(trace), "--workers", "1", "--sweep-requests", "2"]
        + ["--requests", "4", "--no-headline", "--num-blocks", "512", "--block-size", "32"]
        + ["--out-dir", str(tmp_path), "--name", "s"]
    )
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "s.json").read_text())
    assert [p["sweep"] for p in doc["points"]] == ["workers", "requests"]
    assert doc["meta"]["trace"]["turns"] == 8
    assert doc["meta"]["settings"]["block_size"] == 32
    assert "--block-size 32`" in (tmp_path / "s.md").read_text()
