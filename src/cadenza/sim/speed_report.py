"""The simulator speed report: ``sim-speed.json``, ``.md`` (a table of every run and the
headline, met or not) and ``.png`` (simulation time against workers and against requests).

The document ``cadenza simulate speed`` writes (and this module renders)::

    meta    {command, trace {...}, settings {...}, machine {...}, target_cpu_s}
    points  [SpeedPoint.to_json()]   sweep "workers" | "requests" | "headline"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cadenza.sim.report_files import write_report_files
from cadenza.sim.speed_run import HEADLINE_WORKERS, SpeedPoint

MET, MISSED = "met ✅", "not met ❌"


def headline(doc: Mapping[str, Any]) -> SpeedPoint | None:
    for p in doc["points"]:
        if p["sweep"] == "headline":
            return SpeedPoint.from_json(p)
    return None


def headline_text(doc: Mapping[str, Any]) -> str:
    point = headline(doc)
    target = float(doc["meta"]["target_cpu_s"])
    if point is None:
        return f"Headline (every turn on {HEADLINE_WORKERS} workers): not run."
    verdict = MET if point.cpu_s < target else MISSED
    return (
        f"**Headline: {point.requests:,} turns ({point.arrivals_s:,.0f} s of recorded arrivals)"
        f" on {point.workers} simulated workers in {point.cpu_s:,.1f} s of CPU time"
        f" ({point.wall_s:,.1f} s wall) — target under {target:,.0f} s: {verdict}.**"
        f" The run covered {point.simulated_s:,.0f} simulated seconds, {point.steps:,} engine"
        f" steps and {point.events:,} events ({point.speedup:,.1f}× real time)."
    )


def _row(p: SpeedPoint) -> str:
    cells = [
        p.sweep,
        str(p.workers),
        f"{p.requests:,}",
        f"{p.simulated_s:,.1f}",
        f"{p.wall_s:,.2f}",
        f"{p.cpu_s:,.2f}",
        f"{p.steps:,}",
        f"{p.events:,}",
        f"{p.events_per_s:,.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def table(points: Sequence[SpeedPoint]) -> list[str]:
    head = [
        "sweep",
        "workers",
        "requests",
        "simulated s",
        "wall s",
        "CPU s",
        "engine steps",
        "events",
        "events/s (wall)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return lines + [_row(p) for p in points]


def render_markdown(doc: Mapping[str, Any], plot_name: str | None = None) -> str:
    meta = doc["meta"]
    m = meta["machine"]
    s = meta["settings"]
    points = [SpeedPoint.from_json(p) for p in doc["points"]]
    lines = [
        "# Simulator speed",
        "",
        f"`{meta['command']}` — {m['cpu']}, {m['cpus']} CPUs, Python {m['python']}, niceness"
        f" {m['niceness']}, load average {m['load_average'][0]:g} at the start.",
        "",
        headline_text(doc),
        "",
        f"Trace: {meta['trace']['source']} ({meta['trace']['turns']:,} turns,"
        f" {meta['trace']['sessions']:,} sessions). Each run replays its first N turns with"
        f" `--routing {s['routing']} --cost-model {s['cost_model']} --gpu {s['gpu']}"
        f" --model {s['model']}{_block_flag(s)}` (otherwise the simulator's defaults), timed"
        " from building the"
        " simulation to its metrics, in one process. CPU seconds are that process's user +"
        " system time; wall seconds include waiting for the CPU, so on a shared machine they"
        " are longer (the load average above says how shared).",
        "",
        *table(points),
        "",
        "The worker sweep replays the same slice on more workers (more engines, each less"
        " loaded); the request sweep replays longer slices on 16 workers. The cost is about"
        " proportional to engine steps (each is one real `EngineCore.step`), which grow with the"
        " simulated time each worker is busy. Events are fewer than steps: a worker takes a"
        " stretch of plain decode steps (the same requests, one token each, none finishing) in"
        " one event, priced ahead, and any other event first brings every worker up to its"
        " time, so the run is the same as one event per step (a test compares the two).",
    ]
    if plot_name:
        lines += ["", f"![simulation time against workers and requests]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(doc: Mapping[str, Any], path: Path) -> Path:
    """Simulation time against workers (left) and against requests (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [SpeedPoint.from_json(p) for p in doc["points"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    sweeps = (
        (left, "workers", lambda p: p.workers, "simulated workers"),
        (right, "requests", lambda p: p.requests, "requests (first N turns of the trace)"),
    )
    for ax, sweep, x, label in sweeps:
        pts = sorted((p for p in points if p.sweep == sweep), key=x)
        if sweep == "requests":
            pts += [p for p in points if p.sweep == "headline"]
        xs = [x(p) for p in pts]
        ax.plot(xs, [p.cpu_s for p in pts], "o-", label="CPU s")
        ax.plot(xs, [p.wall_s for p in pts], "s--", label="wall s")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds to simulate")
        ax.grid(True, alpha=0.3)
    target = float(doc["meta"]["target_cpu_s"])
    right.axhline(target, color="tab:red", lw=1, ls=":", label=f"target {target:.0f} s (16 w)")
    right.set_xscale("log")
    right.set_yscale("log")
    sweep_requests = next((p.requests for p in points if p.sweep == "workers"), 0)
    left.set_title(f"first {sweep_requests:,} turns, against workers")
    right.set_title(f"{HEADLINE_WORKERS} workers, against requests")
    left.legend()
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(doc: Mapping[str, Any], out_dir: Path, name: str) -> list[Path]:
    """Write ``name``.json, .md and .png under ``out_dir``; returns the paths."""
    return write_report_files(doc, out_dir, name, plot, render_markdown)


def _block_flag(settings: dict[str, Any]) -> str:
    """`` --block-size N`` when a run used other than the default 16 (older files lack it)."""
    size = settings.get("block_size", 16)
    return "" if size == 16 else f" --block-size {size}"
