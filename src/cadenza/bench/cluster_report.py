"""The report of ``cadenza bench cluster``: JSON (everything), markdown (one table per question),
and three plots: sustainable rate per policy, TTFT percentiles per policy, and load imbalance
over time per policy. Every per-policy number is taken at that policy's sustainable rate (its
highest passing trial; the lowest-rate trial when none passed)."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cadenza.bench.replay_report import _jsonable
from cadenza.bench.serve_report import _ms, _num, _pct, best_trial

_MISSING = "—"
REFERENCE = "symphony"
# The targets, checked (not tuned for): symphony's rate against each policy's.
RATE_TARGETS = {"round-robin": 1.5, "sticky": 1.0, "kv-aware": 1.0}
MOVED_FOUND_TARGET = 0.9
MIN_HINT_LEAD_S = 2.0


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in results.get("policies") or [] if p.get("status") == "ok"]


def _at_best(policy: dict[str, Any], *keys: str) -> Any:
    trial = best_trial(policy)
    value: Any = trial
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _rate_ratio(ours: Any, theirs: Any) -> float | None:
    if not _finite(ours) or not _finite(theirs):
        return None
    if theirs <= 0:
        return math.inf if ours > 0 else None
    return float(ours) / float(theirs)


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Symphony's sustainable rate over every other policy's, and the issue's checks."""
    by_name = {p["name"]: p for p in _ok(results)}
    ref = by_name.get(REFERENCE)
    ratios = {
        f"{REFERENCE}/{name}": _rate_ratio(
            ref.get("sustainable_rate") if ref else None, p.get("sustainable_rate")
        )
        for name, p in by_name.items()
        if name != REFERENCE
    }
    checks: list[dict[str, Any]] = []
    for other, factor in RATE_TARGETS.items():
        ratio = ratios.get(f"{REFERENCE}/{other}")
        checks.append(
            {
                "check": f"{REFERENCE} rate >= {factor:g}x {other}",
                "value": ratio,
                "met": None if ratio is None else ratio >= factor,
            }
        )
    sticky = by_name.get("sticky")
    ours = _at_best(ref, "imbalance", "max_over_mean") if ref else None
    theirs = _at_best(sticky, "imbalance", "max_over_mean") if sticky else None
    checks.append(
        {
            "check": f"{REFERENCE} load imbalance (max/mean) < sticky",
            "value": [ours, theirs],
            "met": ours < theirs if _finite(ours) and _finite(theirs) else None,
        }
    )
    moved = _at_best(ref, "landings", "hinted_moved_found_fraction") if ref else None
    lead = ((results.get("meta") or {}).get("settings") or {}).get("hint_lead_s")
    checks.append(
        {
            "check": f"hinted turns moved off their KV's worker that found it there >= "
            f"{MOVED_FOUND_TARGET:.0%} (hint lead >= {MIN_HINT_LEAD_S:g} s)",
            "value": moved,
            "met": (
                moved >= MOVED_FOUND_TARGET
                if _finite(moved) and _finite(lead) and lead >= MIN_HINT_LEAD_S
                else None
            ),
        }
    )
    return {"ratios": ratios, "checks": checks}


# ----------------------------------------------------------------------------------- markdown


def _int(x: Any) -> str:
    return f"{x:,.0f}" if _finite(x) else _MISSING


def _mib(x: Any) -> str:
    return f"{x / 2**20:,.1f}" if _finite(x) else _MISSING


def _ratio(x: Any) -> str:
    if x is None:
        return _MISSING
    if isinstance(x, float) and math.isinf(x):
        return "∞ (the other sustained no rate tried)"
    return f"{x:.2f}×"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return [*out, ""]


def _rows(
    policies: Sequence[dict[str, Any]], cells: Callable[[dict[str, Any]], list[str]]
) -> list[list[str]]:
    return [[p["name"], *cells(p)] for p in policies]


def _search(p: dict[str, Any]) -> str:
    return ", ".join(
        f"{t['rate']:.3g} {'✓' if t.get('passed') else '✗'}" for t in p.get("trials") or []
    )


def _split(p: dict[str, Any], counter: str, keys: Sequence[str]) -> list[str]:
    values = _at_best(p, "counters", counter) or {}
    return [_int(values.get(k, 0)) for k in keys]


def render_markdown(
    results: dict[str, Any], name: str = "cluster", plots: dict[str, str] | None = None
) -> str:
    meta = results.get("meta") or {}
    settings = meta.get("settings") or {}
    machine = meta.get("machine") or {}
    policies = _ok(results)
    skipped = [p for p in results.get("policies") or [] if p.get("status") != "ok"]
    comparison = results.get("comparison") or compare(results)
    lines = [
        f"# Cluster routing policies side by side ({name})",
        "",
        f"`{meta.get('command', 'cadenza bench cluster')}` — {meta.get('started', '')}, "
        f"{_num(meta['wall_s'] / 60 if _finite(meta.get('wall_s')) else None)} min.",
        "",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
        f"{settings.get('workers')} workers × {settings.get('worker_threads')} thread(s) "
        f"({settings.get('backend')} backend), model {meta.get('model')}, server flags "
        f"`{settings.get('server_args', '')}`.",
        "",
        f"Workload: ShareGPT conversations (≤ {settings.get('turns_per_session')} turns, user "
        f"messages cut at {settings.get('max_chars')} characters, {settings.get('max_output')} "
        f"output tokens per turn). Poisson session starts; before each follow-up the user reads "
        f"(exponential, mean {_num(settings.get('read_mean_s'))} s) then types for "
        f"{_num(settings.get('hint_lead_s'))} s; the hint is posted when typing starts (ttl "
        f"{_num(meta.get('hint_ttl_s'))} s). {_pct(settings.get('missing_hints'))} of "
        f"follow-ups are sent without a hint; {_pct(settings.get('false_hints'))} of sessions "
        f"post a hint after their last turn and never send it. SLO: {meta.get('slo')}, and "
        f"≥ {_pct(settings.get('min_completed'))} of turns sent completed. Each policy: a "
        f"fresh server, up to {settings.get('max_trials')} trials of "
        f"{_num(settings.get('duration_s'))} s (doubling from "
        f"{_num(settings.get('start_rate'))} sessions/s, then bisection); each trial takes "
        "new conversations and a new system-prompt tag.",
        "",
        "## Sustainable session rate",
        "",
    ]
    lines += _table(
        [
            "policy",
            "sessions/s",
            "trials (rate, pass)",
            "TTFT p50 ms",
            "p90",
            "p99",
            "e2e mean ms",
            "e2e p90 ms",
            "turns done/sent",
        ],
        _rows(
            policies,
            lambda p: [
                _num(p.get("sustainable_rate")),
                _search(p),
                _ms(_at_best(p, "summary", "ttft_p50_s")),
                _ms(_at_best(p, "summary", "ttft_p90_s")),
                _ms(_at_best(p, "summary", "ttft_p99_s")),
                _ms(_at_best(p, "summary", "e2e_mean_s")),
                _ms(_at_best(p, "summary", "e2e_p90_s")),
                f"{_int(_at_best(p, 'summary', 'turns_completed'))}/"
                f"{_int(_at_best(p, 'summary', 'turns_sent'))}",
            ],
        ),
    )
    lines += ["## Symphony against the others", ""]
    lines += _table(
        ["ratio", "value"], [[k, _ratio(v)] for k, v in (comparison.get("ratios") or {}).items()]
    )
    lines += _table(
        ["issue target", "measured", "met"],
        [
            [
                c["check"],
                " vs ".join(_num(v) for v in c["value"])
                if isinstance(c["value"], list)
                else _num(c["value"]),
                {True: "yes", False: "**no**", None: _MISSING}[c["met"]],
            ]
            for c in comparison.get("checks") or []
        ],
    )
    lines += ["## Load balance and migrations (at the sustainable rate)", ""]
    lines += _table(
        [
            "policy",
            "max/mean outstanding",
            "max−min mean",
            "max−min peak",
            "mean outstanding by worker",
            "turns by worker",
            "migrations",
            "MiB moved",
            "routing reasons",
        ],
        _rows(
            policies,
            lambda p: [
                _num(_at_best(p, "imbalance", "max_over_mean")),
                _num(_at_best(p, "imbalance", "max_minus_min_mean")),
                _int(_at_best(p, "imbalance", "max_minus_min_max")),
                ", ".join(
                    f"{k} {v:.2f}"
                    for k, v in (
                        _at_best(p, "imbalance", "mean_outstanding_by_worker") or {}
                    ).items()
                ),
                ", ".join(f"{k} {v}" for k, v in (_at_best(p, "turns_by_worker") or {}).items()),
                ", ".join(
                    f"{k} {v:.0f}"
                    for k, v in (_at_best(p, "counters", "cluster_migrations") or {}).items()
                )
                or "0",
                _mib(_at_best(p, "counters", "cluster_migration_bytes")),
                ", ".join(
                    f"{k} {v:.0f}"
                    for k, v in (_at_best(p, "counters", "cluster_routing_decisions") or {}).items()
                    if v
                ),
            ],
        ),
    )
    lines += ["## Hints", ""]
    outcomes = ("found", "late", "false", "missing")
    lines += _table(
        [
            "policy",
            "hints sent (true/false)",
            *outcomes,
            "found of hinted (server)",
            "follow-ups moved",
            "hinted & moved: KV there",
            "hinted: KV there (client)",
        ],
        _rows(
            policies,
            lambda p: [
                "/".join(_int(v) for v in (_at_best(p, "hints_sent") or {}).values()) or _MISSING,
                *_split(p, "cluster_hint_outcomes", outcomes),
                _pct(_found_fraction(_at_best(p, "counters", "cluster_hint_outcomes") or {})),
                _pct(_at_best(p, "landings", "moved_fraction")),
                f"{_pct(_at_best(p, 'landings', 'hinted_moved_found_fraction'))} of "
                f"{_int(_at_best(p, 'landings', 'hinted_moved'))}",
                _pct(_at_best(p, "landings", "hinted_found_fraction")),
            ],
        ),
    )
    lines += ["## Where prompt tokens came from", ""]
    sources = ("device", "host", "disk", "migrated", "recomputed")
    lines += _table(
        [
            "policy",
            *[f"{s} (router)" for s in sources],
            "redundant prefill (server)",
            "new (server)",
            "cached fraction (client)",
        ],
        _rows(
            policies,
            lambda p: [
                *_split(p, "cluster_prompt_tokens_by_source", sources),
                *_split(p, "prompt_tokens_by_source", ("recomputed", "new")),
                _pct(_at_best(p, "summary", "cached_fraction")),
            ],
        ),
    )
    for p in skipped:
        lines += [f"- **{p['name']}** skipped: {p.get('skip_reason')}", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{key}]({path})" for key, path in plots.items()]
        lines.append("")
    lines += ["## Notes", "", *[f"- {n}" for n in notes(results)], ""]
    return "\n".join(lines)


def _found_fraction(outcomes: dict[str, float]) -> float:
    hinted = outcomes.get("found", 0) + outcomes.get("late", 0)
    return outcomes.get("found", 0) / hinted if hinted else math.nan


def notes(results: dict[str, Any]) -> list[str]:
    settings = (results.get("meta") or {}).get("settings") or {}
    out = [
        "Outstanding requests per worker = max(the router's in-flight count, the worker's "
        "running + waiting), polled from `GET /v1/cluster/workers` every 0.5 s; "
        "max/mean is averaged over the samples where anything was outstanding (1.00 = "
        "balanced), max−min over all samples.",
        "Migrations, bytes, hint outcomes, routing reasons and prompt tokens by source are the "
        "difference of two `/metrics` scrapes around the trial (after the server went idle "
        "and the trial's unused hints expired). *Redundant prefill* is the server's "
        '`prompt_tokens_by_source{source="recomputed"}`: history tokens computed again '
        "although an earlier turn had computed them; the router's *recomputed* also counts "
        "new tokens.",
        "A follow-up is *moved* when `X-Cadenza-Worker` names another worker than its previous "
        "turn's; it found its KV when `cached_tokens` covers the history's full blocks but one "
        "(the router's own test). Hint outcomes *found/late* are the router's: found = it ran "
        "where the hint sent it and its KV was there.",
        "TTFT counts every turn sent: failed ones as infinite, ones cut off at the trial's "
        "end as their wait.",
    ]
    if settings.get("workers", 2) <= 2:
        out.append(
            "With only 2 workers, sticky placement is balanced by the law of large numbers "
            "within a trial (sessions are assigned by load on their first turn, and a "
            "session's later load follows it); its imbalance shows with many workers and "
            "skewed session lengths, which two workers on two cores cannot show. A sticky "
            "imbalance close to the others' here is the honest result of this machine, not "
            "evidence that it balances at scale."
        )
    if (settings.get("hint_lead_s") or 0) <= 0:
        out.append("Hints were off (`--hint-lead-s 0`): no hint columns apply.")
    return out


# -------------------------------------------------------------------------------------- plots


def _figure(width: float = 8.0, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_rates(results: dict[str, Any], path: Path) -> Path:
    policies = _ok(results)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = [p["name"] for p in policies]
    rates = [p.get("sustainable_rate") or 0.0 for p in policies]
    bars = ax.bar(names, rates, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(bars, labels=[f"{r:.3g}" for r in rates])
    slo = (results.get("meta") or {}).get("slo", "")
    ax.set_ylabel("sessions/s")
    ax.set_title(f"Highest session rate within the SLO ({slo})")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_ttft(results: dict[str, Any], path: Path) -> Path:
    policies = _ok(results)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    width = 0.25
    for j, q in enumerate((50, 90, 99)):
        values = [_at_best(p, "summary", f"ttft_p{q}_s") for p in policies]
        xs = [i + (j - 1) * width for i in range(len(policies))]
        ax.bar(xs, [v if _finite(v) else 0.0 for v in values], width, label=f"p{q}")
    slo = ((results.get("meta") or {}).get("settings") or {}).get("slo_ttft_s")
    if _finite(slo):
        ax.axhline(slo, color="k", linestyle="--", linewidth=1, label=f"SLO {slo:g} s (p90)")
    ax.set_xticks(range(len(policies)), [p["name"] for p in policies])
    ax.set_ylabel("TTFT (s)")
    ax.set_title("Time to first token at each policy's sustainable rate")
    ax.legend(fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_imbalance(results: dict[str, Any], path: Path) -> Path:
    policies = _ok(results)
    fig = _figure(8.0, 5.5)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    for i, p in enumerate(policies):
        s = _at_best(p, "load_series") or {}
        t = s.get("t_s") or []
        rate = _at_best(p, "rate")
        label = f"{p['name']} @ {rate:.3g}/s" if _finite(rate) else p["name"]
        top.plot(t, s.get("max_over_mean") or [], color=f"C{i}", linewidth=1, label=label)
        bottom.plot(t, s.get("max_minus_min") or [], color=f"C{i}", linewidth=1, label=label)
    top.set_ylabel("max / mean outstanding")
    bottom.set_ylabel("max − min outstanding")
    bottom.set_xlabel("seconds into the trial")
    top.set_title("Load imbalance over time (sustainable-rate trial)")
    top.legend(fontsize="small", ncol=2)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "rates": plot_rates,
    "ttft": plot_ttft,
    "imbalance": plot_imbalance,
}


def write_cluster_report(
    results: dict[str, Any], out_dir: str | os.PathLike[str], name: str = "cluster"
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>-{rates,ttft,imbalance}.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results.setdefault("comparison", compare(results))
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(
        json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )
    plots: dict[str, str] = {}
    for key, plot in PLOTS.items():
        try:
            paths[key] = plot(results, out / f"{name}-{key}.png")
            plots[key] = paths[key].name
        except ImportError as exc:
            warnings.warn(f"plot skipped ({exc})", RuntimeWarning, stacklevel=2)
    paths["md"].write_text(render_markdown(results, name, plots), encoding="utf-8")
    return paths
