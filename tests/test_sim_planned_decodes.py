"""Planned decode steps: the simulator takes a worker's stretch of plain decodes in one event
instead of one event per step. That must change nothing but the number of events: the same
trace gives the same metrics, turn records and worker statistics with and without it, under
memory pressure with host and disk tiers, hints, migrations and tool-call pins. The scheduler's
direct plan of a plain decode step is checked against its general pass, and its count of the
plain decode steps ahead against the steps that follow."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest

from cadenza.core.engine_core import EngineCore
from cadenza.core.scheduler import Scheduler, SchedulerOutput
from cadenza.sim.cpu_cost import CPUCalibration
from cadenza.sim.setup import SimConfig
from cadenza.sim.simulator import Simulation
from cadenza.sim.trace import TraceTurn


def agent_sessions(seed: int, sessions: int = 20) -> list[TraceTurn]:
    """Sessions of four turns: some share a system prompt, later turns come back after a
    think time or a tool call, some announced ahead (hints)."""
    rng = random.Random(seed)
    turns = []
    for s in range(sessions):
        shared = s % 3 == 0
        turns.append(
            TraceTurn(
                f"s{s}",
                rng.randint(40, 500),
                rng.randint(1, 150),
                arrival_s=rng.uniform(0.0, 15.0),
                shared_prefix_id="system" if shared else None,
                shared_prefix_tokens=96 if shared else 0,
            )
        )
        for _ in range(3):
            turns.append(
                TraceTurn(
                    f"s{s}",
                    rng.randint(5, 200),
                    rng.randint(1, 200),
                    think_s=rng.choice([0.0, 0.4, 3.0]),
                    hint_lead_s=rng.choice([None, 0.2, 1.5]),
                    tool_s=rng.choice([None, None, 0.8]),
                )
            )
    return turns


def twin_sessions(seed: int, pairs: int = 8) -> list[TraceTurn]:
    """Sessions in identical pairs, arriving together: on two workers under round-robin they
    step in lockstep, so one worker's events fall at exactly the times the other's steps
    start (where the order of events at equal times decides what each event sees)."""
    turns = []
    for turn in agent_sessions(seed, pairs):
        turns.append(turn)
        turns.append(dataclasses.replace(turn, session_id=turn.session_id + "-twin"))
    return turns


def cpu_calibration(tmp_path) -> str:
    cal = CPUCalibration("smollm2-135m", 4e-3, 1.2e-3, 2e-3, 1e-8, 5e9, 1e9, 0.5e9)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal.to_json()))
    return str(path)


CONFIGS = {
    # One worker whose device holds a few sessions: offload, write-through, fetch back (turns
    # mostly wait there, so fewer stretches are plain decodes).
    "cpu-1-worker-tiers": dict(workers=1, num_blocks=160, host_gib=0.2, disk_gib=4.0),
    # A GPU cluster under SYMPHONY: hints, migrations between workers, pins.
    "gpu-symphony": dict(
        workers=3,
        routing="symphony",
        cost_model="gpu",
        model="llama-2-7b",
        num_blocks=300,
        host_gib=1.0,  # 128 host blocks: room for the offload target (a quarter of 300)
        disk_gib=4.0,
        retention_ttl_s=2.0,
    ),
    "gpu-round-robin-twins": dict(workers=2, routing="round-robin", cost_model="gpu"),
    "gpu-kv-aware-64": dict(
        workers=4, cost_model="gpu", model="llama-3.1-8b", block_size=64, num_blocks=60
    ),
}


def run(config: SimConfig, turns: list[TraceTurn], batch: bool) -> tuple[Simulation, str]:
    sim = Simulation(config, turns, batch_decodes=batch)
    metrics = sim.run()
    records = [dataclasses.asdict(r) for r in sim.client.records]
    return sim, json.dumps([metrics, records], sort_keys=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_planned_decodes_change_nothing_but_the_number_of_events(tmp_path, name):
    settings = dict(CONFIGS[name])
    if settings.get("cost_model", "cpu") == "cpu":
        settings["calibration"] = cpu_calibration(tmp_path)
    config = SimConfig(**settings)
    turns = twin_sessions(seed=3) if "twins" in name else agent_sessions(seed=len(name))
    one_by_one, expected = run(config, turns, batch=False)
    planned, got = run(config, turns, batch=True)
    assert got == expected
    assert json.loads(got)[0]["turns"] == len(turns)
    # Not vacuous: most steps were planned, so far fewer events ran for the same steps.
    steps = sum(w.executor.num_steps for w in planned.workers)
    assert steps == sum(w.executor.num_steps for w in one_by_one.workers)
    fewer = 0.9 if name.startswith("cpu-1-worker") else 0.5
    assert planned.events.num_events < fewer * one_by_one.events.num_events
    if name == "gpu-symphony":
        metrics = json.loads(got)[0]
        assert metrics["migrations"]["count"] > 0
        assert metrics["cached_tokens_by_tier"]["host"] > 0


def test_a_busy_workers_clock_moved_past_its_wake_up_gives_the_same_run(monkeypatch):
    """A hand-off landing on a busy worker can install with a synchronous copy out, which
    moves the worker's clock past its pending wake-up. One event at a time must then wake it
    when it is free (as a planned stretch does, and a real worker would), not at the stale
    time with a step that misses what landed in between."""
    stale = Counter()
    kick = Simulation.kick

    def counting_kick(self: Simulation, worker, *, retry: bool = False) -> None:
        if (
            not worker.planned
            and worker.wake_at is not None
            and worker.wake_at < worker.clock.now
            and worker.core.has_unfinished_requests()
        ):
            stale[self.batch_decodes] += 1
        kick(self, worker, retry=retry)

    monkeypatch.setattr(Simulation, "kick", counting_kick)
    config = SimConfig(**CONFIGS["gpu-symphony"])
    turns = agent_sessions(seed=3, sessions=40)
    _, expected = run(config, turns, batch=False)
    _, got = run(config, turns, batch=True)
    assert stale[False] > 0  # the case arose one event at a time
    assert got == expected


def _chunks(plan: SchedulerOutput) -> list[tuple[str, list[tuple[int, int]], bool]]:
    return [(c.request.request_id, c.segments, c.samples) for c in plan.chunks]


def test_plain_decode_plans_and_counts_hold_in_a_run(tmp_path, monkeypatch):
    seen: Counter[str] = Counter()
    general = Scheduler._schedule_general
    last_plain: dict[int, bool] = {}

    def schedule(self: Scheduler) -> SchedulerOutput:
        fast = self._plain_decode_plan() if not self.waiting else None
        out = general(self)  # a plain decode state: the general pass changes nothing
        if fast is not None:
            assert _chunks(fast) == _chunks(out) and not out.preempted
            seen["plain"] += 1
        last_plain[id(self)] = fast is not None
        return out

    promised: dict[int, tuple[int, set[str]]] = {}
    step = EngineCore.step

    def checked_step(self: EngineCore) -> object:
        sched = self.scheduler
        owed, requests = promised.get(id(self), (0, set()))
        result = step(self)
        if owed and requests == set(sched.requests) | {r.request_id for r, _ in result.updated}:
            # Promised when these requests ran and no other had come since: this step was a
            # plain decode that ended none of them.
            assert last_plain[id(sched)] and requests == set(sched.requests)
            seen["promised"] += 1
            assert sched.plain_decode_steps() == owed - 1  # one step of the promise used
        promised[id(self)] = (sched.plain_decode_steps(), set(sched.requests))
        return result

    monkeypatch.setattr(Scheduler, "schedule", schedule)
    monkeypatch.setattr(EngineCore, "step", checked_step)
    settings = dict(CONFIGS["gpu-symphony"])
    Simulation(SimConfig(**settings), agent_sessions(seed=7), batch_decodes=False).run()
    assert seen["plain"] > 100 and seen["promised"] > 100, seen
