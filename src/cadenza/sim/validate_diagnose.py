"""Why a simulated run missed its target: diagnostics read off the two metric documents.

Each diagnostic compares something the simulator models separately — how long a step takes,
how many steps ran, how long a turn waited before reaching a worker, how long a migration
took, where the prompt tokens came from — between the real and the simulated run, so a miss
in a headline number (TTFT, end-to-end, throughput) can be traced to its cause instead of
being explained after the fact. Torch-free and I/O-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cadenza.sim.validate_errors import Cell, format_error


def mean_step_s(metrics: Mapping[str, Any]) -> float | None:
    """Busy time per engine step over all workers (None without steps)."""
    workers = metrics.get("workers", {}).values()
    steps = sum(w.get("steps", 0) for w in workers)
    busy = sum(w.get("busy_s", 0.0) for w in workers)
    return busy / steps if steps else None


def steps(metrics: Mapping[str, Any]) -> int:
    return sum(w.get("steps", 0) for w in metrics.get("workers", {}).values())


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _reasons(placements: Mapping[str, int]) -> dict[str, int]:
    """Turn placements by reason (hint counters, named ``kind:...``, left out)."""
    return {k: v for k, v in placements.items() if ":" not in k}


def diagnostics(real: Mapping[str, Any], simulated: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers the explanations are made of (also written to the JSON report)."""
    real_step, sim_step = mean_step_s(real), mean_step_s(simulated)
    rm, sm = real.get("migrations", {}), simulated.get("migrations", {})
    return {
        "step_s": {"real": real_step, "simulated": sim_step},
        "step_time_ratio": _ratio(real_step, sim_step),
        "steps": {"real": steps(real), "simulated": steps(simulated)},
        "queue_mean_s": {
            "real": real.get("queue_s", {}).get("mean", 0.0),
            "simulated": simulated.get("queue_s", {}).get("mean", 0.0),
        },
        "migration_seconds_mean": {
            "real": rm.get("seconds_mean", 0.0),
            "simulated": sm.get("seconds_mean", 0.0),
        },
        "computed_prompt_tokens": {
            "real": real.get("tokens", {}).get("computed_prompt", 0),
            "simulated": simulated.get("tokens", {}).get("computed_prompt", 0),
        },
        "duration_s": {
            "real": real.get("duration_s", 0.0),
            "simulated": simulated.get("duration_s", 0.0),
        },
        "turns_by_worker": {
            "real": {w: v.get("turns", 0) for w, v in real.get("workers", {}).items()},
            "simulated": {w: v.get("turns", 0) for w, v in simulated.get("workers", {}).items()},
        },
        "placements": {
            "real": _reasons(real.get("placements", {})),
            "simulated": _reasons(simulated.get("placements", {})),
        },
        "tpot_mean_s": {
            "real": real.get("tpot_s", {}).get("mean", 0.0),
            "simulated": simulated.get("tpot_s", {}).get("mean", 0.0),
        },
    }


def explain(
    real: Mapping[str, Any], simulated: Mapping[str, Any], cells: Sequence[Cell]
) -> list[str]:
    """Sentences on the causes of this run's misses (empty when every cell is within)."""
    missed = {c.metric for c in cells if not c.within}
    if not missed:
        return []
    d = diagnostics(real, simulated)
    out: list[str] = []
    latency = missed & {"ttft_mean", "ttft_p90", "e2e_mean", "throughput"}
    ratio = d["step_time_ratio"]
    if latency and ratio is not None and abs(ratio - 1) > 0.05:
        real_step, sim_step = d["step_s"]["real"], d["step_s"]["simulated"]
        out.append(
            f"Real engine steps took {real_step * 1e3:.0f} ms on average against"
            f" {sim_step * 1e3:.0f} ms predicted ({format_error(ratio - 1)}): the machine"
            " ran the engine at another speed than the calibration (and the drift probe, if"
            " any) predicted (other load on the shared cores, or workers contending for them),"
            " and every latency scales with it."
        )
    real_steps, sim_steps = d["steps"]["real"], d["steps"]["simulated"]
    if latency and real_steps and sim_steps and abs(real_steps / sim_steps - 1) > 0.1:
        out.append(
            f"The real run took {real_steps} steps, the simulation {sim_steps}: requests were"
            " batched differently (arrivals landing before or after a step boundary shift"
            " whole turns by one step)."
        )
    rq, sq = d["queue_mean_s"]["real"], d["queue_mean_s"]["simulated"]
    real_step = d["step_s"]["real"] or 0.0
    # Waiting for the running step to end is the same on both sides (the simulator queues the
    # request at arrival, the step boundary picks it up); only a longer wait is a difference.
    if latency & {"ttft_mean", "ttft_p90"} and rq - sq > real_step + 0.05:
        out.append(
            f"Turns waited {rq * 1e3:.0f} ms on average before a worker took them, more than a"
            f" step ({real_step * 1e3:.0f} ms; simulated wait: {sq * 1e3:.0f} ms): the router"
            " held turns for hinted migrations still in flight, or a worker's command queue"
            " was behind."
        )
    rms, sms = d["migration_seconds_mean"]["real"], d["migration_seconds_mean"]["simulated"]
    if "migrations" in missed or (latency and rms > 2 * sms + 0.05):
        out.append(
            f"Migrations: {int(real['migrations']['count'])} real"
            f" ({rms * 1e3:.0f} ms each on average) against"
            f" {int(simulated['migrations']['count'])} simulated ({sms * 1e3:.0f} ms each): a"
            " real move runs on both workers' engine threads between their steps (and"
            " checksums every block), while the simulator prices only the link; which"
            " sessions move depends on load snapshots taken at slightly different moments."
        )
    real_turns, sim_turns = d["turns_by_worker"]["real"], d["turns_by_worker"]["simulated"]
    real_why, sim_why = d["placements"]["real"], d["placements"]["simulated"]
    if len(real_turns) > 1 and (real_turns != sim_turns or real_why != sim_why):

        def listed(counts: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

        out.append(
            f"The routers placed turns differently (turns per worker: {listed(real_turns)}"
            f" real, {listed(sim_turns)} simulated; by reason: {listed(real_why)} real,"
            f" {listed(sim_why)} simulated): the real router sees each worker's load as of"
            " its last pull and counts turns placed since then as waiting, the simulator sees"
            " the load at the instant; a turn placed by load on the worker without its KV"
            " (or its shared prefix) recomputes it."
        )
    tiers = missed & {"cached_device", "cached_host", "cached_disk"}
    if tiers:
        rc, sc = d["computed_prompt_tokens"]["real"], d["computed_prompt_tokens"]["simulated"]
        out.append(
            "Cached tokens by tier differ ("
            + ", ".join(
                f"{c.metric.removeprefix('cached_')}: {c.real:.0f} real, {c.simulated:.0f}"
                " simulated"
                for c in cells
                if c.metric in tiers
            )
            + f"; prompt tokens computed: {rc} real, {sc} simulated): the tier a block is on"
            " when a turn comes depends on when eviction and the ahead-of-time copies ran,"
            " which follows the step timing, and a few blocks' difference is a large relative"
            " error on a small count."
        )
    if "throughput" in missed:
        rd, sd = d["duration_s"]["real"], d["duration_s"]["simulated"]
        out.append(
            f"Throughput is output tokens over the span from the first arrival to the last"
            f" answer: {rd:.1f} s real, {sd:.1f} s simulated; the same tokens over a longer"
            " span (the last sessions' answers came later) is a lower rate."
        )
    if not out:
        out.append(
            "No single modelled quantity stands out; the miss is within the run-to-run noise"
            " of a real engine on a shared machine (a few turns landing one step earlier or"
            " later)."
        )
    return out
