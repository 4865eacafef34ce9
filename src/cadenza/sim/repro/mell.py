"""MELL (INFOCOM'25): peak active GPUs, memory utilisation and migrations/s of the shipped
MELL packer against best-fit, worst-fit and least-loaded, on request timelines from the
simulator.

MELL's own evaluation is a trace-driven simulation of its packing over request lengths and
processing speeds measured on a testbed; this one does the same with the simulator as the
testbed. Per GPU configuration and workload:

1. **Timelines**: the simulator runs the workload (the real engine core under the roofline)
   on a cluster routed ``least-loaded``, sized by Little's law and grown until requests do
   not queue (a packer starts a request at its arrival, so the timelines must be those of a
   cluster with room). Each finished request gives its arrival, first token and finish.
2. **Packing**: each packer (``cluster.mell.MellPacker``, ``BestFitPacker``,
   ``WorstFitPacker``, and a no-migration packer whose choice among the GPUs with room is the
   shipped ``placement.LeastLoaded``) replays the timelines in epochs: a request is allocated
   at its arrival with its prompt's KV, grows linearly from its first token to its finish
   (one token per decode step), and departs at its finish; at each epoch's end the packer is
   told every size and returns its migrations. The peak of active GPUs (any moment, within
   epochs too), the mean KV utilisation of the active GPUs and the migrations per second
   are the paper's three metrics.

The packers do not feed back into the timelines (a packed GPU runs the same requests a bit
slower than the sized cluster did); MELL's evaluation makes the same separation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from cadenza.cluster.kv_index import KVIndex
from cadenza.cluster.mell import BestFitPacker, MellPacker, NoMigrationPacker, WorstFitPacker
from cadenza.cluster.placement import LeastLoaded, WorkerView
from cadenza.sim.metrics import TurnRecord
from cadenza.sim.repro.common import Options, ratio, run_sim
from cadenza.sim.repro.mell_report import markdown, plot
from cadenza.sim.repro.report import Report
from cadenza.sim.repro.workloads import azure_requests, conversations, single_requests
from cadenza.sim.setup import SimConfig, resolve
from cadenza.sim.step_cost import StepShape
from cadenza.sim.trace import TraceTurn

PACKERS = ("mell", "best-fit", "worst-fit", "least-loaded")


@dataclass(frozen=True)
class Plan:
    setups: tuple[tuple[str, str], ...] = (("llama-2-7b", "RTX-4090"), ("llama-2-13b", "A100-40GB"))
    rates: tuple[float, ...] = (0.5, 0.8, 1.1)
    azure: bool = True
    arrive_s: float = 600.0
    length_scale: int = 10
    epoch_s: float = 1.0
    network_gbps: float = 10.0
    # The timeline cluster: sized for GPUs this full, then grown by half until requests do
    # not queue (p90 TTFT within ``max_ttft_s``, preemptions within ``max_preempted``): a
    # packer places a request at its arrival, so the timelines must be those of a cluster
    # with room.
    fill: float = 0.5
    max_ttft_s: float = 1.0
    max_preempted: float = 0.01  # preemptions per request
    attempts: int = 4
    max_moves: int = 10
    conversations: int | None = None
    min_timeline_workers: int = 2


def plan_for(options: Options) -> Plan:
    if options.quick:
        return Plan(setups=(("llama-2-7b", "RTX-4090"),), rates=(1.1,), azure=False, arrive_s=60)
    return dataclasses.replace(Plan(), arrive_s=Plan.arrive_s * options.scale)


def timelines(plan: Plan, options: Options, base: SimConfig, turns, workers: int, label: str):
    """Run the workload on ``workers`` GPUs, more while its requests queue (see ``Plan``)."""
    tried = []
    for _ in range(plan.attempts):
        cfg = dataclasses.replace(base, workers=workers)
        run = run_sim(cfg, turns, options, f"{label} timelines on {workers} GPUs")
        m = run.metrics
        preempted = sum(w["preemptions"] for w in m["workers"].values())
        tried.append(
            {"workers": workers, "ttft_p90_s": m["ttft_s"]["p90"], "preemptions": preempted}
        )
        if m["ttft_s"]["p90"] <= plan.max_ttft_s and preempted <= plan.max_preempted * len(turns):
            break
        workers = math.ceil(workers * 1.5)
    return run, workers, tried


class LeastLoadedPacker(NoMigrationPacker):
    """Place on arrival on the active GPU with room that the shipped ``LeastLoaded`` policy
    picks (fewest requests), never migrate."""

    name = "least-loaded"

    def __init__(self, capacity: int, **kwargs: Any) -> None:
        super().__init__(capacity, **kwargs)
        self._policy = LeastLoaded(KVIndex())

    def _pick(self, fitting: list[str]) -> str:
        views = [WorkerView(w, num_running=len(self.requests_on(w))) for w in fitting]
        return self._policy.least_loaded(views).worker_id


def make_packer(name: str, capacity: int, block_bytes: int, prefill_s: float, plan: Plan):
    if name == "mell":
        return MellPacker(
            capacity,
            max_moves=plan.max_moves,
            block_bytes=block_bytes,
            link_bytes_per_s=plan.network_gbps * 1e9 / 8,
            prefill_s_per_token=prefill_s,
        )
    kinds = {"best-fit": BestFitPacker, "worst-fit": WorstFitPacker}
    cls = kinds.get(name, LeastLoadedPacker)
    return cls(capacity, preempt_on_overflow=True, prefill_s_per_token=prefill_s)


def blocks(tokens: float, block_size: int = 16) -> int:
    return max(1, math.ceil(tokens / block_size))


def kv_blocks_at(record: TurnRecord, t: float) -> int:
    """A running request's KV at time ``t``: its prompt, plus its output grown linearly from
    the first token to the finish (one token per decode step)."""
    span = max(record.finish_s - record.first_token_s, 1e-9)
    done = min(max((t - record.first_token_s) / span, 0.0), 1.0)
    return blocks(record.prompt_tokens + done * record.output_tokens)


def first_fit_decreasing(sizes: list[int], capacity: int) -> int:
    """Bins first-fit decreasing needs for ``sizes`` (at most 11/9 of the optimum + 1)."""
    bins: list[int] = []
    for size in sorted(sizes, reverse=True):
        for k, load in enumerate(bins):
            if load + size <= capacity:
                bins[k] = load + size
                break
        else:
            bins.append(size)
    return len(bins)


def packing_bounds(records: list[TurnRecord], capacity: int, epoch_s: float) -> dict:
    """What any packer could reach on these timelines, at the same epoch ends as ``replay``:
    ``lower``, the GPUs the running KV needs if it could be split anywhere (ceil of its sum
    over C; no packer needs fewer), and ``repacked``, the GPUs of an oracle that re-packs
    every request from scratch each epoch (first-fit decreasing, unlimited migrations)."""
    end = max((r.finish_s for r in records), default=0.0)
    lower, repacked = [], []
    t = epoch_s
    while t <= end + epoch_s:
        sizes = [kv_blocks_at(r, t) for r in records if r.arrival_s <= t < r.finish_s]
        lower.append(math.ceil(sum(sizes) / capacity))
        repacked.append(first_fit_decreasing(sizes, capacity))
        t += epoch_s
    return {
        "lower_peak": max(lower, default=0),
        "lower_mean": sum(lower) / len(lower) if lower else 0.0,
        "repacked_peak": max(repacked, default=0),
        "repacked_mean": sum(repacked) / len(repacked) if repacked else 0.0,
    }


def replay(packer: Any, records: list[TurnRecord], epoch_s: float, pool: list[str]) -> dict:
    """Replay request timelines through ``packer`` in epochs (see the module docstring)."""
    events = sorted(
        [(r.arrival_s, 0, i) for i, r in enumerate(records)]
        + [(r.finish_s, 1, i) for i, r in enumerate(records)]
    )
    live: dict[int, TurnRecord] = {}
    active, util, migrations, preempted = [], [], 0, 0
    end = max((r.finish_s for r in records), default=0.0)
    k, t = 0, epoch_s
    while t <= end + epoch_s:
        while k < len(events) and events[k][0] <= t:
            _, kind, i = events[k]
            k += 1
            r = records[i]
            if kind == 0:
                packer.allocate(str(i), blocks(r.prompt_tokens), pool)
                live[i] = r
            else:
                packer.depart(str(i))
                live.pop(i, None)
        for i, r in live.items():
            packer.update(str(i), kv_blocks_at(r, t))
        moved = packer.end_epoch(pool)
        if isinstance(packer, MellPacker):
            migrations += len(moved)
        else:
            preempted += len(moved)
        active.append(len(packer.active_workers()))
        util.append(packer.utilisation())
        t += epoch_s
    busy = [u for u, a in zip(util, active, strict=True) if a]
    duration = max(end, epoch_s)
    out = {
        "peak_active": packer.peak_active,
        "peak_active_at_epochs": max(active, default=0),
        "mean_active": sum(active) / len(active) if active else 0.0,
        "utilisation_mean": sum(busy) / len(busy) if busy else 0.0,
        "migrations": migrations,
        "migrations_per_s": migrations / duration,
        "preemptions": preempted,
        "active_series": active,
        "epoch_s": epoch_s,
    }
    if isinstance(packer, MellPacker):
        s = packer.stats
        out["mell_stats"] = {
            "operations": s.operations,
            "moves_planned": s.moves_planned,
            "cancelled": s.cancelled,
            "overflows": s.overflows,
            "max_moves_in_op": s.max_moves_in_op,
            "over_budget": s.over_budget,
            "by_mode": dict(s.by_mode),
        }
    return out


def timeline_workers(cost: Any, turns: list[TraceTurn], capacity_tokens: int, plan: Plan) -> int:
    """GPUs that hold the workload's KV about ``plan.fill`` full (Little's law: arrival rate
    x lifetime x mean KV), with a decode step priced at the batch such a GPU holds."""
    if not turns:
        return plan.min_timeline_workers
    span = max(max(t.arrival_s or 0.0 for t in turns), 1.0)
    rate = len(turns) / span
    out = sum(t.output_tokens for t in turns) / len(turns)
    kv = sum(t.input_tokens + t.output_tokens / 2 for t in turns) / len(turns)
    batch = max(1, int(plan.fill * capacity_tokens / kv))
    shape = StepShape(batch, batch, batch, int(batch * kv), int(batch * kv), batch, int(batch * kv))
    lifetime = out * cost.step_seconds(shape)
    need = rate * lifetime * kv / (plan.fill * capacity_tokens)
    return max(plan.min_timeline_workers, math.ceil(need))


def one(plan: Plan, options: Options, model: str, gpu: str, name: str, turns, source) -> dict:
    base = SimConfig(cost_model="gpu", gpu=gpu, model=model, seed=options.seed, host_gib=0.0)
    resolved = resolve(base)
    capacity = resolved.details["num_blocks"]
    first = timeline_workers(resolved.cost, turns, capacity * 16, plan)
    cfg = dataclasses.replace(
        base, routing="least-loaded", max_model_len=capacity * 16, network_gbps=plan.network_gbps
    )
    run, workers, tried = timelines(plan, options, cfg, turns, first, f"{model}/{gpu}/{name}")
    pool = [f"g{i:03d}" for i in range(4 * workers + 8)]
    block_bytes = resolved.details["block_bytes"]
    prefill_s = resolved.details["prefill_s_per_token"]
    packers = {}
    for packer in PACKERS:
        p = make_packer(packer, capacity, block_bytes, prefill_s, plan)
        packers[packer] = replay(p, run.records, plan.epoch_s, pool)
    bf = packers["best-fit"]["peak_active"]
    bounds = packing_bounds(run.records, capacity, plan.epoch_s)
    m = run.metrics
    return {
        "workload": name,
        "source": source,
        "requests": len(turns),
        "capacity_blocks": capacity,
        "timeline": {
            "workers": workers,
            "turns": m["turns"],
            "rejected": m["rejected_turns"],
            "e2e_s": m["e2e_s"],
            "tpot_s": m["tpot_s"],
            "ttft_s": m["ttft_s"],
            "preemptions": sum(w["preemptions"] for w in m["workers"].values()),
            "wall_s": run.wall_s,
            "attempts": tried,
        },
        "packers": packers,
        "bounds": bounds,
        "mell_fewer_gpus_than_best_fit": 1 - ratio(packers["mell"]["peak_active"], bf)
        if bf
        else None,
        "bound_fewer_gpus_than_best_fit": 1 - ratio(bounds["lower_peak"], bf) if bf else None,
    }


def sweep_filters(plan: Plan) -> dict[str, list[str]]:
    """What ``--only`` can restrict in this reproduction, and the values each key takes."""
    workloads = [f"poisson-{rate:g}" for rate in plan.rates] + (["azure"] if plan.azure else [])
    return {"gpu": [gpu for _, gpu in plan.setups], "workload": workloads}


def run(options: Options, plan: Plan | None = None) -> Report:
    plan = plan or plan_for(options)
    convs, conv_source = conversations(options, plan.conversations)
    results: dict[str, Any] = {}
    for model, gpu in plan.setups:
        if not options.selected("gpu", gpu):
            continue
        capacity_tokens = (
            resolve(SimConfig(cost_model="gpu", gpu=gpu, model=model)).details["num_blocks"] * 16
        )
        workloads = [
            (
                f"poisson-{rate:g}",
                single_requests(
                    convs, rate, plan.arrive_s, plan.length_scale, capacity_tokens, options.seed
                ),
                f"{conv_source}, lengths x{plan.length_scale}",
            )
            for rate in plan.rates
        ]
        if plan.azure:
            turns, source = azure_requests(options, plan.arrive_s, capacity_tokens)
            workloads.append(("azure", turns, source))
        for name, turns, source in workloads:
            if not options.selected("workload", name):
                continue
            options.log(f"mell: {model} on {gpu}, {name}")
            key = f"{model}/{gpu}/{name}"
            results[key] = one(plan, options, model, gpu, name, turns, source)
    data = {"reproduction": "mell", "plan": dataclasses.asdict(plan), "results": results}
    return Report("mell", data, markdown(data, options), lambda fig: plot(fig, data))
