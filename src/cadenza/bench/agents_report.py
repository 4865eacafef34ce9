"""The report of ``cadenza bench agents``: JSON (everything), markdown (a table per pool, the
acceptance checks) and a plot (p90 TTFT and mean JCT per mode per pool).

The checks (the issue's, computed, not tuned for): at the 25% and 50% pools, (a) sessions has at
least 1.3x lower p90 TTFT than (b) resent history, and a lower mean JCT (the bounded mean, with
at least as many programs finished, so unfinished programs cannot make (a) look faster); at the
100% pool, (a) is no more than ``noise`` worse than (b) on either.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cadenza.bench.replay_report import _jsonable

MODE_ORDER = ("sessions", "resend", "no-cache")
TTFT_TARGET = 1.3
_MISSING = "—"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ms(x: Any) -> str:
    return f"{1000 * x:.0f} ms" if _finite(x) else _MISSING


def _s(x: Any) -> str:
    return f"{x:.1f} s" if _finite(x) else _MISSING


def _pct(x: Any) -> str:
    return f"{100 * x:.0f}%" if _finite(x) else _MISSING


def _num(x: Any) -> str:
    if not _finite(x):
        return _MISSING
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _ratio(x: Any) -> str:
    return f"{x:.2f}x" if _finite(x) else _MISSING


def by_pool(results: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    """``{pool percent: {mode: summary}}`` of the trials that ran."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for trial in results.get("trials") or []:
        if trial.get("status") == "ok":
            out.setdefault(int(trial["pool"]["percent"]), {})[trial["mode"]] = trial["summary"]
    return out


def _over(theirs: Any, ours: Any) -> float | None:
    if not _finite(theirs) or not _finite(ours) or ours <= 0:
        return None
    return float(theirs) / float(ours)


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Per pool: (b) over (a) for p90 TTFT and bounded mean JCT, and the acceptance checks."""
    noise = float(results.get("meta", {}).get("noise", 0.15))
    pools: dict[str, Any] = {}
    checks: list[dict[str, Any]] = []
    for pct, modes in sorted(by_pool(results).items(), reverse=True):
        a, b = modes.get("sessions"), modes.get("resend")
        if a is None or b is None:
            continue
        ttft = _over(b.get("ttft_p90_s"), a.get("ttft_p90_s"))
        jct = _over(b.get("jct_mean_bounded_s"), a.get("jct_mean_bounded_s"))
        pools[str(pct)] = {"ttft_p90_b_over_a": ttft, "jct_b_over_a": jct}
        finished_ok = a.get("jobs_finished", 0) >= b.get("jobs_finished", 0)
        if pct < 100:
            checks.append(
                _check(f"{pct}% pool: p90 TTFT (b)/(a) >= {TTFT_TARGET}", ttft, TTFT_TARGET)
            )
            met = jct is not None and jct > 1.0 and finished_ok
            checks.append(
                {
                    "check": f"{pct}% pool: mean JCT (a) < (b), (a) finishing as many jobs",
                    "value": jct,
                    "met": met,
                }
            )
        else:
            floor = 1.0 / (1.0 + noise)
            checks.append(_check(f"100% pool: p90 TTFT (a) within {noise:.0%} of (b)", ttft, floor))
            checks.append(_check(f"100% pool: mean JCT (a) within {noise:.0%} of (b)", jct, floor))
    return {
        "pools": pools,
        "checks": checks,
        "all_met": bool(checks) and all(c["met"] for c in checks),
    }


def _check(text: str, value: float | None, at_least: float) -> dict[str, Any]:
    return {"check": text, "value": value, "met": value is not None and value >= at_least}


def _source_share(summary: dict[str, Any], source: str) -> float | None:
    sources = (summary.get("server") or {}).get("prompt_tokens_by_source") or {}
    total = sum(v for v in sources.values() if _finite(v))
    return sources.get(source, 0.0) / total if total else None


def _mib(x: Any) -> float | None:
    return x / 2**20 if _finite(x) else None


def _fetched(summary: dict[str, Any]) -> str:
    server = summary.get("server") or {}
    return f"{_num(server.get('fetched_blocks_host'))} / {_num(server.get('fetched_blocks_disk'))}"


_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], Any], Callable[[Any], str]], ...] = (
    ("TTFT p50", lambda s: s.get("ttft_p50_s"), _ms),
    ("TTFT p90", lambda s: s.get("ttft_p90_s"), _ms),
    ("mean JCT, finished jobs", lambda s: s.get("jct_mean_s"), _s),
    ("mean JCT, bounded", lambda s: s.get("jct_mean_bounded_s"), _s),
    ("JCT p90", lambda s: s.get("jct_p90_s"), _s),
    ("jobs finished", lambda s: f"{s.get('jobs_finished')}/{s.get('jobs')}", str),
    ("steps done / sent", lambda s: f"{s.get('steps_completed')}/{s.get('steps_sent')}", str),
    ("errors", lambda s: s.get("errors"), str),
    ("prompt tokens cached (usage)", lambda s: s.get("cached_fraction"), _pct),
    *(
        (f"prompt tokens: {src}", (lambda s, src=src: _source_share(s, src)), _pct)
        for src in ("device", "host", "disk", "recomputed", "new")
    ),
    ("outside engine, per step", lambda s: s.get("outside_engine_s"), _ms),
    ("outside engine, before first token", lambda s: s.get("outside_engine_first_token_s"), _ms),
    ("outside engine, after last token", lambda s: s.get("post_last_token_mean_s"), _ms),
    ("engine step time, per step", lambda s: s.get("engine_step_s"), _ms),
    ("engine busy", lambda s: s.get("engine_busy_fraction"), _pct),
    ("KV swapped, per step (MiB)", lambda s: _mib(s.get("swap_bytes_per_step")), _num),
    ("blocks fetched from host / disk", _fetched, str),
    ("prompt tokens / trace tokens", lambda s: s.get("prompt_over_trace_tokens"), _num),
)


def render_markdown(results: dict[str, Any], name: str = "agents", png: str | None = None) -> str:
    meta = results.get("meta", {})
    live = meta.get("live_kv", {})
    cmp = compare(results)
    lines = [
        "# Agent programs: sessions vs resending the history",
        "",
        f"`{meta.get('command', 'cadenza bench agents')}` — {meta.get('started', '')}, "
        f"{meta.get('model')}, {_machine(meta.get('machine') or {})}; "
        f"wall time {_s(meta.get('wall_s'))}.",
        "",
        f"{meta.get('programs')} agent programs ({meta.get('steps')} LLM steps; trace "
        f"`{Path(str(meta.get('trace', ''))).name}`), {live.get('concurrency')} at a time, closed "
        "loop. Every step's reply has its exact trace length; the next step's input is the "
        "tool's observation, sent after the tool's time. Modes:",
        "",
        "- **(a) sessions**: `cadenza serve` as shipped (host and disk tiers on), the program "
        "chained through `/v1/responses` with `previous_response_id`, only the new input sent;",
        "- **(b) resend**: `--kv-host-gib 0 --kv-disk-gib 0`, the whole history resent to "
        "`/v1/chat/completions` (a device-only prefix cache, vLLM's default);",
        "- **(c) no-cache**: as (b) with `--no-enable-prefix-caching`.",
        "",
        f"Live KV: {live.get('concurrency')} programs x {_num(live.get('mean_final_tokens'))} "
        f"tokens of mean final context / {live.get('block_size')} = **{live.get('blocks')} "
        f"blocks**; the longest program needs {live.get('floor_blocks')} blocks, the floor of "
        "every pool (a request that can never fit is rejected, not slowed).",
        "",
    ]
    lines += _checks_section(cmp)
    pools = by_pool(results)
    plans = {int(p["percent"]): p for p in meta.get("pools") or []}
    for pct in sorted(pools, reverse=True):
        lines += _pool_table(pct, pools[pct], plans.get(pct), cmp["pools"].get(str(pct)))
    skipped = [t for t in results.get("trials") or [] if t.get("status") != "ok"]
    for t in skipped:
        lines.append(f"- {t['mode']} at {t['pool']['percent']}%: skipped ({t.get('skip_reason')})")
    if skipped:
        lines.append("")
    if png:
        lines += [f"![p90 TTFT and mean JCT per mode and pool]({png})", ""]
    lines += _method_notes()
    return "\n".join(lines) + "\n"


def _machine(m: dict[str, Any]) -> str:
    threads = m.get("threads_per_server")
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {threads} threads per server"


def _checks_section(cmp: dict[str, Any]) -> list[str]:
    lines = ["## Acceptance", "", "| check | value | met |", "|---|---|---|"]
    for c in cmp["checks"]:
        lines.append(
            f"| {c['check']} | {_ratio(c['value'])} (b)/(a) | {'yes' if c['met'] else 'no'} |"
        )
    verdict = "all met" if cmp["all_met"] else "not all met"
    return [*lines, "", f"In this run: **{verdict}**.", ""]


def _pool_table(
    pct: int,
    modes: dict[str, dict[str, Any]],
    plan: dict[str, Any] | None,
    ratios: dict[str, Any] | None,
) -> list[str]:
    names = [m for m in MODE_ORDER if m in modes]
    blocks = f", {plan['blocks']} device blocks" if plan else ""
    floored = f" (floored from {plan['target_blocks']})" if plan and plan.get("floored") else ""
    lines = [
        f"## Pool {pct}% of the live KV{blocks}{floored}",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, get, fmt in _ROWS:
        cells = []
        for m in names:
            value = get(modes[m])
            cells.append(fmt(value) if value is not None else _MISSING)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if ratios:
        lines += [
            "",
            f"(b) over (a): p90 TTFT {_ratio(ratios['ttft_p90_b_over_a'])}, "
            f"bounded mean JCT {_ratio(ratios['jct_b_over_a'])}.",
        ]
    return [*lines, ""]


def _method_notes() -> list[str]:
    return [
        "## How the numbers are measured",
        "",
        "- TTFT is the client's, over every step sent (a step cut off at the trial bound counts "
        "with its wait so far, a failed step as infinite). JCT runs from a program's first "
        "request to its last reply; the bounded mean adds each unfinished program at the time it "
        "had run when the trial was cut (a lower bound).",
        "- Prompt tokens by source are the server's `prompt_tokens_by_source` counters over the "
        "trial: cached on the device, host or disk tier, recomputed although an earlier turn had "
        "computed them, or new.",
        "- *Outside engine, per step* is the client's send-to-end-of-stream time minus the "
        "engine's own end-to-end time per request (`e2e_request_latency_seconds`, from the "
        "moment the engine thread queued the request to its last token), as means: HTTP "
        "parsing, the chat template and tokenisation (of the whole history when it is resent), "
        "the conversation and response stores, SSE framing, and the wait for the engine thread "
        "to take a new request between two steps. *Before the first token* is the same for "
        "TTFT; *after the last token* is the client's last text to the end of the stream (a "
        "stored response is written before its final event).",
        "- *Engine step time, per step* is the engine's step wall time over the trial "
        "(`engine_step_seconds`) per step served: forward passes plus what runs inside a step "
        "(scheduling, KV fetches a step waits for). Background copies between tiers run between "
        "steps on their own thread; their volume is the swapped MiB and fetched blocks.",
        "- The server reports no per-request split of engine time into forward passes and "
        "copies, so copy time is not separated from step time here.",
        "",
    ]


def plot(results: dict[str, Any], path: Path) -> None:
    """p90 TTFT and bounded mean JCT, grouped by pool, one bar per mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pools = by_pool(results)
    pcts = sorted(pools, reverse=True)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    width = 0.8 / len(MODE_ORDER)
    for col, (key, title) in enumerate(
        (("ttft_p90_s", "p90 TTFT (s)"), ("jct_mean_bounded_s", "mean JCT, bounded (s)"))
    ):
        ax = fig.add_subplot(1, 2, col + 1)
        for i, mode in enumerate(MODE_ORDER):
            xs, ys = [], []
            for j, pct in enumerate(pcts):
                value = pools[pct].get(mode, {}).get(key)
                if _finite(value):
                    xs.append(j + (i - 1) * width)
                    ys.append(value)
            ax.bar(xs, ys, width=width, label=mode)
        ax.set_xticks(range(len(pcts)), [f"{p}%" for p in pcts])
        ax.set_xlabel("device pool, % of live KV")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(MODE_ORDER))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)


def write_agents_report(
    results: dict[str, Any], out_dir: str | os.PathLike[str], name: str = "agents"
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and (with matplotlib) ``<name>.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results["comparison"] = compare(results)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(_jsonable(results), indent=1) + "\n", encoding="utf-8")
    png: str | None = None
    try:
        plot(results, out / f"{name}.png")
        paths["png"] = out / f"{name}.png"
        png = paths["png"].name
    except ImportError as exc:
        warnings.warn(f"plot skipped ({exc}); install matplotlib", stacklevel=2)
    paths["md"].write_text(render_markdown(results, name, png), encoding="utf-8")
    return paths
