"""The report of ``cadenza bench serve``: JSON (everything), markdown (tables), PNG (p90 TTFT
against session rate, one line per system, the SLO as a horizontal line)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cadenza.bench.replay_report import _jsonable

_MISSING = "—"
TARGETS = {"cadenza/hf": 5.0, "cadenza/llama.cpp": 1.5}


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ms(x: Any) -> str:
    if x is not None and isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{1e3 * x:,.0f}" if _finite(x) else _MISSING


def _num(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if _finite(x) else _MISSING


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if _finite(x) else _MISSING


def _ratio(x: Any) -> str:
    if x is None:
        return _MISSING
    if isinstance(x, float) and math.isinf(x):
        return "∞ (baseline sustained no rate tried)"
    return f"{x:.2f}×"


def best_trial(system: dict[str, Any]) -> dict[str, Any] | None:
    """The trial at the sustainable rate (the highest passing one), else the lowest rate."""
    trials = system.get("trials") or []
    passing = [t for t in trials if t.get("passed")]
    if passing:
        return max(passing, key=lambda t: t["rate"])
    return min(trials, key=lambda t: t["rate"]) if trials else None


def render_markdown(results: dict[str, Any], name: str = "serve", png: str | None = None) -> str:
    meta = results.get("meta") or {}
    settings = meta.get("settings") or {}
    machine = meta.get("machine") or {}
    systems = results.get("systems") or []
    lines = [
        "# Serving benchmark: multi-turn chat over HTTP",
        "",
        f"Command: `{meta.get('command', 'cadenza bench serve')}`",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
        f"**every server gets {machine.get('threads_per_server', '?')} threads** "
        "(`--num-threads` / `torch.set_num_threads` / `--n_threads` and `--n_threads_batch`, "
        "plus `OMP_NUM_THREADS`); the load generator runs on the same machine. "
        f"Python {machine.get('python', '?')}, torch {machine.get('torch', '?')}. "
        f"Started {meta.get('started', '?')}, total wall time "
        f"{_num((meta.get('wall_s') or 0) / 60, 3)} min.",
        "",
        f"Model: {meta.get('model')} (SmolLM2-135M-Instruct, one GGUF file for all systems). "
        f"Workload: ShareGPT conversations ({settings.get('min_turns')}–"
        f"{settings.get('max_turns')} turns, user messages cut to {settings.get('max_chars')} "
        f"characters), {settings.get('max_output')} output tokens per turn (greedy, EOS "
        f"suppressed so every system generates the same count), Poisson session arrivals, "
        f"exponential think times (mean {settings.get('think_mean')} s). Each trial: sessions "
        f"start during {settings.get('duration_s')} s; turns still unanswered "
        f"{_num(settings.get('grace_s') or max(10.0, 2 * (settings.get('slo_ttft_s') or 2.0)))}"
        " s later are cancelled and count with the time they waited (censored).",
        "",
        f"**SLO: {meta.get('slo')}**. The sustainable rate is the highest session rate tried "
        "whose trial met it *and* kept up: at least "
        f"{_pct(settings.get('min_completed', 0.9))} of the turns sent finished by the deadline"
        + (
            f", and p90 TPOT ≤ {settings['slo_tpot_s']:g} s"
            if _finite(settings.get("slo_tpot_s"))
            else ""
        )
        + f". Search: ×{_num(settings.get('growth', 2.0))} per step from a start rate, then "
        f"bisection, at most {settings.get('max_trials')} trials per system.",
        "",
    ]
    if png:
        lines += [
            f"![p90 TTFT against session rate]({png})",
            "",
            "Filled markers: trials that passed; hollow: trials that failed (p90 TTFT over the "
            "SLO, or too few turns finished).",
            "",
        ]

    lines += [
        "## Summary",
        "",
        "Figures at the sustainable rate (or, where none passed, at the lowest rate tried).",
        "",
        "| system | sustainable rate (sessions/s) | TTFT p50 / p90 / p99 (ms) | "
        "TPOT p50 / p90 / p99 (ms) | output tok/s | turns/s | cached / prompt tokens | "
        "errors / 429 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in systems:
        if s.get("status") != "ok":
            lines.append(f"| {s['name']} | skipped | | | | | | |")
            continue
        t = best_trial(s)
        m = (t or {}).get("summary") or {}
        lines.append(
            f"| {s['name']} | **{_num(s.get('sustainable_rate'))}** | "
            f"{_ms(m.get('ttft_p50_s'))} / {_ms(m.get('ttft_p90_s'))} / "
            f"{_ms(m.get('ttft_p99_s'))} | "
            f"{_ms(m.get('tpot_p50_s'))} / {_ms(m.get('tpot_p90_s'))} / "
            f"{_ms(m.get('tpot_p99_s'))} | "
            f"{_num(m.get('output_tok_per_s'))} | {_num(m.get('turns_per_s'))} | "
            f"{_pct(m.get('cached_fraction'))} | "
            f"{m.get('errors', 0)} / {m.get('http_429', 0)} |"
        )
    lines.append("")

    ratio = results.get("ratios") or {}
    lines += ["## Ratios of sustainable rate", "", "| ratio | value | target | met |"]
    lines.append("|---|---:|---:|---|")
    for key, value in ratio.items():
        target = TARGETS.get(key)
        met = _MISSING
        if target is not None and value is not None:
            met = "yes" if value >= target else "**no**"
        lines.append(
            f"| {key} | {_ratio(value)} | {f'≥ {target:g}×' if target else _MISSING} | {met} |"
        )
    lines.append("")

    skipped = [s for s in systems if s.get("status") != "ok"]
    if skipped:
        lines += ["## Skipped systems", ""]
        lines += [f"- **{s['name']}**: {s.get('skip_reason', 'not run')}" for s in skipped]
        lines.append("")

    lines += ["## Trials", ""]
    for s in systems:
        if s.get("status") != "ok":
            continue
        lines += [
            f"### {s['name']}",
            "",
            f"{s.get('description', '')}. Client mode: {s.get('mode')}"
            + (", hints on" if s.get("hints") else "")
            + f". Server start-up {_num(s.get('startup_s'))} s.",
            "",
            f"Server: `{s.get('server_command', '')}`",
            "",
            "| rate (sessions/s) | SLO | sessions | turns done / sent | censored | "
            "TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | output tok/s | turns/s | "
            "cached | mean prompt tokens | errors / 429 | trial s | load avg before / after |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in sorted(s.get("trials") or [], key=lambda t: t["rate"]):
            m = t.get("summary") or {}
            lines.append(
                f"| {_num(t['rate'])} | {'pass' if t.get('passed') else 'fail'} | "
                f"{m.get('sessions', 0)} | {m.get('turns_completed', 0)} / "
                f"{m.get('turns_sent', 0)} | {m.get('turns_censored', 0)} | "
                f"{_ms(m.get('ttft_p50_s'))} / {_ms(m.get('ttft_p90_s'))} / "
                f"{_ms(m.get('ttft_p99_s'))} | "
                f"{_ms(m.get('tpot_p50_s'))} / {_ms(m.get('tpot_p90_s'))} / "
                f"{_ms(m.get('tpot_p99_s'))} | "
                f"{_num(m.get('output_tok_per_s'))} | {_num(m.get('turns_per_s'))} | "
                f"{_pct(m.get('cached_fraction'))} | {_num(m.get('mean_prompt_tokens'), 4)} | "
                f"{m.get('errors', 0)} / {m.get('http_429', 0)} | "
                f"{_num(m.get('duration_s'))} | "
                f"{_num(m.get('loadavg_1m_before'), 2)} / {_num(m.get('loadavg_1m_after'), 2)} |"
            )
        lines.append("")
    notes = [*standard_notes(results), *(results.get("notes") or [])]
    if notes:
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)


def standard_notes(results: dict[str, Any]) -> list[str]:
    """What a reader needs to weigh the numbers (the same for every run)."""
    names = {s["name"] for s in results.get("systems") or []}
    settings = (results.get("meta") or {}).get("settings") or {}
    notes = [
        "Why the completion condition: a continuously batching server (Cadenza) admits new "
        "turns at once and slows every running turn instead, so past its capacity TTFT can stay "
        "low while replies crawl and work piles up; requiring the turns to finish by the "
        "deadline (grace after the last send) catches that. Read the TPOT columns next to the "
        "rate. The one-request-at-a-time servers (transformers, llama-cpp-python) queue "
        "instead, which shows up directly as TTFT.",
        "Percentiles are nearest-rank over every turn sent in a trial; low-rate trials have few "
        "turns, so their p90 is close to their maximum. The rate search assumes pass/fail is "
        "monotone in the rate; with noise the reported rate is the highest *passing* rate tried.",
    ]
    if "llama.cpp" in names:
        notes.append(
            "llama.cpp computes with the GGUF's Q4_1 weights through its quantized kernels, the "
            "other three with the same weights dequantized to float32 (PyTorch): the same model, "
            "but llama.cpp reads ~6× fewer weight bytes per token. llama-cpp-python's server runs "
            "one request at a time and does not send `usage` in streams, so its cached ratio is "
            "not reported; its prompt cache (`--cache true`) reuses the longest cached prefix."
        )
    if "hf" in names:
        notes.append(
            "The transformers server (`cadenza.bench.hf_server`) serves one request at a time "
            "behind an asyncio lock (no batching: `generate` does not batch requests that arrive "
            "at different times), recomputes the whole history every turn, and streams token by "
            "token."
        )
    if not settings.get("hint_lead_s"):
        notes.append(
            "Hints were off (`--hint-lead-s 0`). Cadenza's default device KV pool (1 GiB, about "
            "23k tokens of SmolLM2-135M KV in float32) is larger than the live histories at these "
            "rates, so a hint would find little to move."
        )
    loads = [
        t["summary"].get("loadavg_1m_before")
        for s in results.get("systems") or []
        for t in s.get("trials") or []
        if _finite((t.get("summary") or {}).get("loadavg_1m_before"))
    ]
    if loads:
        notes.append(
            f"1-minute load average before the trials: {min(loads):.2f}–{max(loads):.2f} "
            "(the machine is shared; each server was given 2 threads)."
        )
    return notes


def plot_ttft_vs_rate(
    results: dict[str, Any], path: str | os.PathLike[str], slo_s: float | None = None
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ymax = 0.0
    for i, s in enumerate(results.get("systems") or []):
        colour = f"C{i % 10}"
        if s.get("status") != "ok":
            ax.plot([], [], color=colour, label=f"{s['name']} (skipped)")
            continue
        trials = sorted(s.get("trials") or [], key=lambda t: t["rate"])
        pts = [
            (t["rate"], t["summary"].get("ttft_p90_s"), bool(t.get("passed")))
            for t in trials
            if _finite(t["summary"].get("ttft_p90_s"))
        ]
        if not pts:
            ax.plot([], [], color=colour, label=f"{s['name']} (no finite p90)")
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ymax = max(ymax, *ys)
        rate = s.get("sustainable_rate")
        label = f"{s['name']} (sustainable {rate:.3g}/s)" if _finite(rate) else s["name"]
        ax.plot(xs, ys, "-", color=colour, linewidth=1.5, label=label)
        ax.scatter([x for x, _, ok in pts if ok], [y for _, y, ok in pts if ok], color=colour)
        ax.scatter(
            [x for x, _, ok in pts if not ok],
            [y for _, y, ok in pts if not ok],
            facecolors="none",
            edgecolors=colour,
        )
    if slo_s:
        ax.axhline(slo_s, color="k", linestyle="--", linewidth=1, label=f"SLO {slo_s:g} s")
    ax.set_xscale("log")
    if ymax > 0:
        ax.set_yscale("log")
    ax.set_xlabel("session arrival rate (sessions/s)")
    ax.set_ylabel("p90 TTFT (s)")
    model = (results.get("meta") or {}).get("model")
    ax.set_title(f"p90 time to first token against load — {model}" if model else "p90 TTFT")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


def write_serve_report(
    results: dict[str, Any], out_dir: str | os.PathLike[str], name: str = "serve"
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (with matplotlib) ``<name>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(
        json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )
    settings = (results.get("meta") or {}).get("settings") or {}
    png: Path | None = out / f"{name}.png"
    try:
        plot_ttft_vs_rate(results, png, settings.get("slo_ttft_s"))
    except ImportError as exc:
        warnings.warn(f"plot skipped ({exc})", RuntimeWarning, stacklevel=2)
        png = None
    paths["md"].write_text(
        render_markdown(results, name, png.name if png else None), encoding="utf-8"
    )
    if png is not None:
        paths["png"] = png
    return paths


def systems_by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in results.get("systems") or []}


__all__: Sequence[str] = ("render_markdown", "plot_ttft_vs_rate", "write_serve_report")
