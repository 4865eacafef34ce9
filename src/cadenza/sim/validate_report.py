"""The validation report: ``sim-validation.json``, ``.md`` (real vs simulated vs error, each
cell marked within target or not, and why for the misses) and ``.png`` (predicted against
measured).

The input is the document ``validate.run_validation`` builds (and the JSON holds)::

    meta     {command, calibration {...}, settings {...}, traces {name: summary}, ...}
    runs     [{name, trace, rate, workers, real {metrics}, simulated {metrics},
               cells [Cell.to_json()], diagnostics {...}, why [sentences]}]
    summary  {metric: {runs, within, mean_abs_error, max_abs_error, undefined, target}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cadenza.sim.cpu_cost import CPUCalibration
from cadenza.sim.validate_errors import METRICS, format_error, metric

WITHIN, MISSED = "✅", "❌"
LATENCY_KEYS = ("ttft_mean", "ttft_p90", "e2e_mean", "throughput")
CACHE_KEYS = ("cached_device", "cached_host", "cached_disk", "migrations")


def _number(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def _cell_text(cell: Mapping[str, Any]) -> str:
    mark = WITHIN if cell["within"] else MISSED
    return (
        f"{_number(cell['real'])} / {_number(cell['simulated'])}"
        f" ({format_error(cell['error'])}) {mark}"
    )


def _table(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    head = [
        "run",
        "workers",
        *(f"{metric(k).label} (target ±{metric(k).target:.0%})" for k in keys),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = {c["metric"]: c for c in run["cells"]}
        row = [run["trace"] + f" @ {run['rate']:g}/s", str(run["workers"])]
        row += [_cell_text(cells[k]) if k in cells else "—" for k in keys]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _summary_table(summary: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = [
        "| metric | target | runs within | mean abs error | worst abs error |",
        "|---|---|---|---|---|",
    ]
    for m in METRICS:
        s = summary.get(m.key)
        if s is None:
            continue
        mean = s["mean_abs_error"]
        worst = s["max_abs_error"]
        lines.append(
            f"| {m.label} | ±{m.target:.0%} | {s['within']} / {s['runs']}"
            + (f" ({s['undefined']} with 0 measured)" if s["undefined"] else "")
            + f" | {'—' if mean is None else f'{mean:.1%}'}"
            + f" | {'—' if worst is None else f'{worst:.1%}'} |"
        )
    return lines


def _speed_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The at-real-speed diagnostic: errors left once the machine's speed is taken out."""
    rows = [r for r in runs if r.get("at_real_speed")]
    if not rows:
        return []
    probed = any(r.get("drift") for r in rows)
    head = [
        "run",
        "workers",
        *(["drift probe × (prefill / decode)"] if probed else []),
        "step cost ×",
        *(metric(k).label for k in LATENCY_KEYS),
    ]
    lines = [
        "## Diagnostic: the simulator at the real run's step speed",
        "",
        "Not a prediction: each simulation re-run with every step cost scaled until its mean"
        " step time equals the real run's (the factor is how far the machine's speed drifted"
        + (" beyond what the drift probe saw before the run" if probed else " from the calibration")
        + ", or how much the cluster's workers slowed each other beyond the contention model)."
        " The errors left are the model's own: batching, routing, hand-offs.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for run in rows:
        speed = run["at_real_speed"]
        cells = {c["metric"]: c for c in speed["cells"]}
        row = [run["trace"] + f" @ {run['rate']:g}/s", str(run["workers"])]
        if probed:
            drift = run.get("drift")
            row.append(
                f"{drift['prefill_factor']:.2f} / {drift['decode_factor']:.2f}" if drift else "—"
            )
        row.append(f"{speed['speed_factor']:.2f}")
        row += [
            f"{format_error(cells[k]['error'])} {WITHIN if cells[k]['within'] else MISSED}"
            for k in LATENCY_KEYS
        ]
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def render_markdown(doc: Mapping[str, Any], plot_name: str | None = None) -> str:
    meta = doc["meta"]
    runs = doc["runs"]
    lines = [
        "# Simulator validation: the CPU-calibrated simulator against the real engine",
        "",
        "Each trace runs twice on this machine in one session: on the real engine (`cadenza"
        " bench replay --trace`: SmolLM2-135M, one in-process engine or the cluster router"
        " over in-process workers) and on the discrete-event simulator (`cadenza simulate"
        " --trace --cost-model cpu`) with the cost model calibrated just before, the same"
        " settings and the same seed. Each cell is **real / simulated (error)**, the error"
        " being (simulated − real) / real; ✅ within target (±10% on means and totals, ±15% on"
        " p90), ❌ not.",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
    ]
    cal = meta.get("calibration")
    if cal:
        lines += [
            "Calibration"
            + (f" ({meta['calibration_source']})" if meta.get("calibration_source") else "")
            + f": {CPUCalibration.from_json(cal).describe()};"
            + f" {cal.get('num_samples', 0)} steps, median fit error"
            + f" {cal.get('median_rel_error', 0):.0%}.",
            "",
        ]
    for n, c in sorted(meta.get("contention", {}).items()):
        lines += [
            f"Contention probe, {n} engines stepping at once: prefill steps"
            f" ×{c['prefill_factor']:.2f}, decode steps ×{c['decode_factor']:.2f} the lone"
            " engine's. The simulator prices a cluster's steps at 1 + (factor − 1) × (the"
            " neighbours' busy fraction in the simulation, iterated to a fixed point); each"
            " cluster run's factors are in the JSON.",
            "",
        ]
    reference = meta.get("drift_reference")
    if reference:
        lines += [
            "Drift probe: a fixed workload (a prefill of 4 × 64 tokens, then decode steps of the"
            f" 4) stepped {reference['prefill_s'] * 1e3:.0f} ms per prefill and"
            f" {reference['decode_s'] * 1e3:.1f} ms per decode right after the calibration;"
            " timed again just before each real run, the ratio scales that run's simulated"
            " step costs (prefill and decode terms apart), so the prediction follows the"
            " machine's speed without reading the run itself. Each run's factors are in the"
            " diagnostic table below.",
            "",
        ]
    if meta.get("settings"):
        settings = ", ".join(f"{k} {v}" for k, v in meta["settings"].items())
        lines += [f"Settings (both sides, per worker): {settings}.", ""]
    if meta.get("traces"):
        lines += ["Traces (shrunk as `sim/validate_traces.py` says):", ""]
        lines += [f"- `{name}`: {text}" for name, text in meta["traces"].items()]
        lines.append("")
    lines += ["## Summary", "", *_summary_table(doc["summary"]), ""]
    lines += ["## Latency and throughput", "", *_table(runs, LATENCY_KEYS), ""]
    lines += ["## Cached tokens by tier and migrations", "", *_table(runs, CACHE_KEYS), ""]
    lines += _speed_section(runs)
    if plot_name:
        lines += [f"![predicted against measured]({plot_name})", ""]
    missed = [r for r in runs if r.get("why")]
    lines += ["## Why the misses", ""]
    if not missed:
        lines += ["Every cell is within target.", ""]
    for run in missed:
        names = ", ".join(metric(c["metric"]).label for c in run["cells"] if not c["within"])
        lines += [
            f"**{run['trace']} @ {run['rate']:g}/s, {run['workers']} worker(s)** — missed:"
            f" {names}. " + " ".join(run["why"]),
            "",
        ]
    for note in meta.get("notes", []):
        lines += [note, ""]
    return "\n".join(lines).rstrip() + "\n"


def plot(doc: Mapping[str, Any], path: Path) -> Path:
    """Predicted against measured, one panel per quantity, the y = x line and the target band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["ttft_mean", "ttft_p90", "e2e_mean", "throughput", "cached", "migrations"]
    kinds = sorted({r["trace"] for r in doc["runs"]})
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    fig, axes = plt.subplots(2, 3, figsize=(13, 8))
    for ax, key in zip(axes.flat, panels, strict=True):
        points = []
        for run in doc["runs"]:
            cells = {c["metric"]: c for c in run["cells"]}
            if key == "cached":
                for tier, marker in (("device", "o"), ("host", "s"), ("disk", "D")):
                    c = cells.get(f"cached_{tier}")
                    if c and (c["real"] or c["simulated"]):
                        points.append((c["real"], c["simulated"], run, marker))
            elif key in cells:
                c = cells[key]
                points.append((c["real"], c["simulated"], run, "o" if run["workers"] == 1 else "^"))
        for real, sim, run, marker in points:
            ax.scatter(real, sim, c=colors[run["trace"]], marker=marker, s=40, alpha=0.85)
        values = [v for p in points for v in p[:2]] or [1.0]
        lo, hi = 0.0, max(max(values) * 1.15, 1e-9)
        target = 0.15 if key == "ttft_p90" else 0.10
        xs = [lo, hi]
        ax.plot(xs, xs, "k-", lw=0.8)
        ax.fill_between(
            xs,
            [x * (1 - target) for x in xs],
            [x * (1 + target) for x in xs],
            color="0.85",
            zorder=0,
        )
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        title = "cached tokens (o device, s host, D disk)" if key == "cached" else metric(key).label
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("measured (real engine)")
        ax.set_ylabel("predicted (simulator)")
    handles = [plt.Line2D([], [], color=colors[k], marker="o", ls="", label=k) for k in kinds]
    handles += [
        plt.Line2D([], [], color="0.3", marker="o", ls="", label="1 worker"),
        plt.Line2D([], [], color="0.3", marker="^", ls="", label="2 workers"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle("Simulator vs real engine (grey band: target)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(
    doc: Mapping[str, Any],
    out_dir: str | Path,
    name: str = "sim-validation",
    with_plot: bool = True,
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (``with_plot``) ``<name>.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(
        json.dumps(_jsonable(doc), indent=2, sort_keys=True, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    plot_name = None
    if with_plot:
        paths["png"] = plot(doc, out / f"{name}.png")
        plot_name = paths["png"].name
    paths["md"].write_text(render_markdown(doc, plot_name), encoding="utf-8")
    return paths
