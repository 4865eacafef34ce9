"""Continuum (agents): job completion time with TTL pins against without, on one simulated GPU
running synthetic SWE-agent-like programs (the ``agents`` converter: tool calls between
steps, a shared system prompt).

Variants, all Cadenza's engine core (no host tier: the KV of a program in a tool call either
stays on the GPU or is evicted and recomputed):

* ``no-pin``: each tool call is think time before the next step (what a stateless server
  sees); FCFS — the vLLM baseline;
* ``pin``: each step's KV is pinned for its tool call's duration (the trace's ``tool_s`` as
  the retention TTL: an oracle TTL); FCFS;
* ``continuum``: Continuum's preview rule — pin only calls of tools that take at most 2 s
  (here: the call's own duration, the generator has no tool types), program-level FCFS
  (a returning step is ordered by its program's start);
* ``pin+program``: oracle TTLs and program-level FCFS.

Job completion time is a program's last reply minus its first arrival.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cadenza.sim.metrics import TurnRecord, distribution
from cadenza.sim.repro.common import Options, ratio, run_sim
from cadenza.sim.repro.continuum_report import markdown, plot
from cadenza.sim.repro.report import Report
from cadenza.sim.repro.workloads import agent_trace, unpinned
from cadenza.sim.setup import SimConfig
from cadenza.sim.trace import TraceTurn

VARIANTS = {  # name: (pin tool calls up to this long (None: all, -1: none), scheduling)
    "no-pin": (-1.0, "fcfs"),
    "pin": (None, "fcfs"),
    "continuum": (2.0, "program"),
    "pin+program": (None, "program"),
}


@dataclass(frozen=True)
class Plan:
    gpu: str = "A100-40GB"
    model: str = "llama-3.1-8b"
    rates: tuple[float, ...] = (0.04, 0.06, 0.08, 0.12)  # programs started per s
    arrive_s: float = 1200.0
    warmup_s: float = 200.0  # programs starting in [warmup_s, arrive_s) are measured
    host_gib: float = 0.0
    steps: tuple[int, int] = (10, 30)  # the agents generator's defaults
    reply_tokens: tuple[int, int] = (100, 400)


def plan_for(options: Options) -> Plan:
    if options.quick:
        return Plan(rates=(0.08,), arrive_s=240.0, warmup_s=40.0)
    s = options.scale
    return dataclasses.replace(Plan(), arrive_s=Plan.arrive_s * s, warmup_s=Plan.warmup_s * s)


def variant_trace(turns: list[TraceTurn], name: str) -> list[TraceTurn]:
    keep, _ = VARIANTS[name]
    if keep is None:
        return turns
    return unpinned(turns, keep_below_s=keep)


def jobs(records: list[TurnRecord], start: float, end: float) -> dict[str, Any]:
    spans: dict[str, list[float]] = {}
    for r in records:
        s = spans.setdefault(r.session_id, [float("inf"), 0.0])
        s[0] = min(s[0], r.arrival_s)
        s[1] = max(s[1], r.finish_s)
    jct = [b - a for a, b in spans.values() if start <= a < end]
    return {
        "programs": len(jct),
        "jct_s": distribution(jct),
        "recomputed_tokens": sum(r.redundant_tokens for r in records),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "cached_tokens": sum(r.cached_tokens for r in records),
    }


def sweep_filters(plan: Plan) -> dict[str, list[str]]:
    """What ``--only`` can restrict in this reproduction: nothing (one sweep of variants)."""
    return {}


def run(options: Options, plan: Plan | None = None) -> Report:
    plan = plan or plan_for(options)
    results: dict[str, dict[str, Any]] = {}
    for rate in plan.rates:
        programs = max(1, round(rate * plan.arrive_s))
        base = agent_trace(
            programs, rate, options.seed, steps=plan.steps, reply_tokens=plan.reply_tokens
        )
        row: dict[str, Any] = {}
        for name, (_, policy) in VARIANTS.items():
            cfg = SimConfig(
                cost_model="gpu",
                gpu=plan.gpu,
                model=plan.model,
                seed=options.seed,
                host_gib=plan.host_gib,
                scheduling_policy=policy,
            )
            turns = variant_trace(base, name)
            r = run_sim(cfg, turns, options, f"continuum {name}@{rate:g}")
            row[name] = {
                **jobs(r.records, plan.warmup_s, plan.arrive_s),
                "rejected_turns": r.metrics["rejected_turns"],
                "pinned_turns": sum(t.tool_s is not None for t in turns),
                "wall_s": r.wall_s,
            }
        mean = {k: v["jct_s"]["mean"] for k, v in row.items()}
        row["no_pin_over"] = {k: ratio(mean["no-pin"], v) for k, v in mean.items()}
        results[f"{rate:g}"] = row
    data = {
        "reproduction": "continuum",
        "plan": dataclasses.asdict(plan),
        "workload": "agents generator defaults (10-30 steps, 2k-token system prompt, tool"
        " calls lognormal median 2 s)",
        "results": results,
    }
    return Report("continuum", data, markdown(data, options), lambda fig: plot(fig, data))
