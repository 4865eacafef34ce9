"""Where hints stop paying: SYMPHONY's gain over ``kv-aware`` (the same cluster and workload,
placement without hints) against hint lead time x hint accuracy x link bandwidth x load.

A 2026 discrete-event study ("Where Should the KV Cache Live?", arXiv 2609.16215) found
prefetching never paid in its setting; this maps the regime on the simulator instead of
arguing it. Workload and cluster as the SYMPHONY reproduction (ShareGPT chat sessions, think
times scaled, Llama-3.1-8B on A100-80GB), on fewer workers:

* **lead**: every hint is sent this long before its turn (at most the think time);
* **accuracy**: the fraction of hints that are true: each true hint is dropped with
  probability ``1 - accuracy`` and as many false hints are injected (a hint at a random moment
  of a think gap for a turn that does not come then, see ``false_hints``);
* **bandwidth**: the network between workers, which every KV migration crosses;
* **load**: users (open sessions).

Gain = 1 - (SYMPHONY's mean end-to-end latency / kv-aware's): positive when hints help.
``kv-aware`` ignores hints, so it runs once per bandwidth and load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cadenza.sim.repro.common import Options, run_sim, window_stats
from cadenza.sim.repro.false_hints import FalseHints
from cadenza.sim.repro.hint_regimes_report import markdown, plot
from cadenza.sim.repro.report import Report
from cadenza.sim.repro.symphony import Plan as SymphonyPlan
from cadenza.sim.repro.symphony import load_for
from cadenza.sim.repro.workloads import chat_trace, conversations, drop_hints, with_hint_lead
from cadenza.sim.setup import SimConfig


@dataclass(frozen=True)
class Plan:
    leads_s: tuple[float, ...] = (0.1, 1.0, 5.0)
    accuracies: tuple[float, ...] = (1.0, 0.6, 0.2)
    bandwidths_gbps: tuple[float, ...] = (1.0, 10.0, 100.0)
    users: tuple[int, ...] = (32, 128)
    workers: int = 4
    gpu: str = "A100-80GB"
    model: str = "llama-3.1-8b"
    think_scale: float = 0.05
    host_gib: float = 64.0
    target_turns: int = 400
    conversations: int | None = None
    # Gains within this of 0 are read as no effect (run-to-run noise of a finite window).
    noise: float = 0.01


def plan_for(options: Options) -> Plan:
    if options.quick:
        return Plan(
            leads_s=(0.1, 5.0),
            accuracies=(1.0, 0.2),
            bandwidths_gbps=(1.0, 100.0),
            users=(32,),
            target_turns=100,
            conversations=100,
        )
    return dataclasses.replace(Plan(), target_turns=round(Plan.target_turns * options.scale))


def config(plan: Plan, routing: str, gbps: float, seed: int) -> SimConfig:
    return SimConfig(
        workers=plan.workers,
        routing=routing,
        cost_model="gpu",
        gpu=plan.gpu,
        model=plan.model,
        seed=seed,
        host_gib=plan.host_gib,
        network_gbps=gbps,
    )


def cell(run: Any, window: tuple[float, float]) -> dict[str, Any]:
    w = window_stats(run.records, *window)
    m = run.metrics
    return {
        "e2e_s": w["e2e_s"]["mean"],
        "ttft_s": w["ttft_s"]["mean"],
        "queue_s": w["queue_s"]["mean"],
        "turns": w["turns"],
        "migrations": m["migrations"]["count"],
        "migration_s_mean": m["migrations"]["seconds_mean"],
        "placements": m["placements"],
        "computed_over_prompt": w["computed_prompt_tokens"] / max(w["prompt_tokens"], 1),
        **run.extra,
    }


def sweep_filters(plan: Plan) -> dict[str, list[str]]:
    """What ``--only`` can restrict in this reproduction, and the values each key takes."""
    return {"users": [str(u) for u in plan.users]}


def run(options: Options, plan: Plan | None = None) -> Report:
    plan = plan or plan_for(options)
    convs, source = conversations(options, plan.conversations)
    shape = SymphonyPlan(think_scale=plan.think_scale, target_turns=plan.target_turns)
    grid: dict[str, Any] = {}
    for users in plan.users:
        if not options.selected("users", str(users)):
            continue
        load, window = load_for(shape, convs, users, "poisson")
        base, _ = chat_trace(convs, load, (), options.seed)
        hinted = sum(t.hint_lead_s is not None for t in base) / max(len(base), 1)
        for gbps in plan.bandwidths_gbps:
            key = f"users={users}/gbps={gbps:g}"
            options.log(f"hint regimes: {key}")
            ref = run_sim(
                config(plan, "kv-aware", gbps, options.seed), base, options, f"kv-aware {key}"
            )
            entry: dict[str, Any] = {"kv-aware": cell(ref, window), "symphony": {}}
            for lead in plan.leads_s:
                for acc in plan.accuracies:
                    turns = drop_hints(with_hint_lead(base, lead), 1.0 - acc, options.seed)
                    hook = FalseHints((1.0 - acc) * hinted, options.seed) if acc < 1 else None
                    r = run_sim(
                        config(plan, "symphony", gbps, options.seed),
                        turns,
                        options,
                        f"symphony {key} lead={lead:g} acc={acc:g}",
                        hook,
                    )
                    c = cell(r, window)
                    c["gain"] = 1.0 - c["e2e_s"] / entry["kv-aware"]["e2e_s"]
                    c["ttft_gain"] = 1.0 - c["ttft_s"] / max(entry["kv-aware"]["ttft_s"], 1e-9)
                    entry["symphony"][f"lead={lead:g}/acc={acc:g}"] = c
            grid[key] = entry
    data = {
        "reproduction": "hint-regimes",
        "plan": dataclasses.asdict(plan),
        "source": source,
        "grid": grid,
    }
    size = (4.0 * max(len(plan.bandwidths_gbps), 1), 3.5 * max(len(plan.users), 1))
    return Report("hint-regimes", data, markdown(data, options), lambda fig: plot(fig, data), size)
