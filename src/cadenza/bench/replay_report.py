"""The report of a multi-turn replay: raw JSON, a markdown table, and a TTFT plot.

The replay driver runs the same workload under several engine configurations (runs) and hands
back one results dict. This module turns it into three artefacts that serve different readers:

* ``<name>.json`` keeps everything, per turn, so later analysis never needs a rerun;
* ``<name>.md`` is the one-row-per-run table that goes into docs and PR descriptions, with units
  chosen per column (bytes in MB or GB, seconds in ms or s, fractions in %) so rows compare at a
  glance;
* ``<name>.png`` plots time to first token against history length, which is the picture of
  what KV reuse buys: without it TTFT grows with the history that must be prefilled again, with it
  TTFT stays flat for as long as the history's KV is found in some tier.

Percentiles are nearest-rank (a value that was observed, no interpolation), which is what the
small per-run turn counts of a replay call for.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_TIERS = ("device", "host", "disk")
_TIER_LABELS = {"device": "dev", "host": "host", "disk": "disk"}
_MISSING = "—"


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` % of the values <= it.

    ``q`` is in [0, 100]; ``q == 0`` gives the minimum. Raises ``ValueError`` on no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def summarize_turns(turns: Sequence[dict[str, Any]]) -> dict[str, float]:
    """TTFT p50/p90/p99 and mean (seconds) over the turns that have a finite ``ttft_s``.

    With no such turns every value is NaN, so callers can always index the keys.
    """
    ttfts = [float(t["ttft_s"]) for t in turns if _finite(t.get("ttft_s"))]
    if not ttfts:
        nan = float("nan")
        return {"ttft_p50_s": nan, "ttft_p90_s": nan, "ttft_p99_s": nan, "ttft_mean_s": nan}
    return {
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": statistics.fmean(ttfts),
    }


# --------------------------------------------------------------------------------------- JSON


def _jsonable(obj: Any) -> Any:
    """Strict-JSON copy: NaN and inf become null, tuples lists, Paths and the like strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return str(obj)


# ----------------------------------------------------------------------------------- markdown


def _kind(key: str) -> str:
    if key == "hit_tokens":
        return "tiers"
    if key.endswith("fraction"):
        return "fraction"
    if key.endswith("_bytes"):
        return "bytes"
    if key.endswith("_gbps"):
        return "gbps"
    if key.endswith("_s"):
        return "seconds"
    return "plain"


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _column_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Keys in order of first appearance that hold a scalar (or ``hit_tokens``) in some row."""
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k in keys:
                continue
            if (k == "hit_tokens" and isinstance(v, dict)) or _is_scalar(v):
                keys.append(k)
    return keys


def _column_unit(kind: str, values: list[Any]) -> str:
    nums = [abs(float(v)) for v in values if _finite(v)]
    peak = max(nums, default=0.0)
    if kind == "bytes":
        return "GB" if peak >= 1e9 else "MB"
    if kind == "seconds":
        return "s" if peak >= 10 else "ms"
    return {"gbps": "GB/s", "tiers": "dev/host/disk"}.get(kind, "")


def _header(key: str, kind: str, unit: str) -> str:
    base = key
    for suffix, replacement in (("_bytes", ""), ("_gbps", "_bw"), ("_s", "")):
        if kind != "plain" and base.endswith(suffix):
            base = base[: -len(suffix)] + replacement
            break
    return f"{base} ({unit})" if unit else base


def _format_number(v: int | float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    return f"{v:.4g}"


def _format_cell(v: Any, kind: str, unit: str) -> str:
    if kind == "tiers":
        if not isinstance(v, dict):
            return _MISSING
        return "/".join(_format_number(v[t]) if _finite(v.get(t)) else _MISSING for t in _TIERS)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return _MISSING
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v).replace("|", "\\|").replace("\n", " ")
    if kind == "fraction":
        return f"{100 * v:.1f}%"
    if kind == "bytes":
        return f"{v / (1e9 if unit == 'GB' else 1e6):,.2f}"
    if kind == "seconds":
        return f"{v:,.2f}" if unit == "s" else f"{1e3 * v:,.1f}"
    if kind == "gbps":
        return f"{v:.2f}"
    return _format_number(v)


def _meta_value(v: Any) -> str:
    if isinstance(v, dict | list | tuple):
        return "`" + json.dumps(_jsonable(v), separators=(", ", ": ")) + "`"
    return str(v)


def _run_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table rows: run name, then its summary, then turn-derived TTFT keys it lacks."""
    rows = []
    for i, run in enumerate(runs):
        row: dict[str, Any] = {"run": str(run.get("name", f"run{i}"))}
        row.update(run.get("summary") or {})
        turns = run.get("turns") or []
        if turns:
            for k, v in summarize_turns(turns).items():
                row.setdefault(k, v)
        rows.append(row)
    return rows


def _table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """One markdown table: a column per key (``run`` first), units chosen per column."""
    keys = ["run", *[k for k in keys if k != "run"]]
    kinds = {k: ("plain" if k == "run" else _kind(k)) for k in keys}
    units = {k: _column_unit(kinds[k], [r.get(k) for r in rows]) for k in keys}
    headers = [_header(k, kinds[k], units[k]) for k in keys]
    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" if k == "run" else "---:" for k in keys) + "|")
    for row in rows:
        cells = [_format_cell(row.get(k), kinds[k], units[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def render_markdown(
    results: dict[str, Any],
    name: str = "replay",
    png_name: str | None = None,
    *,
    plot_note: str | None = None,
) -> str:
    """The markdown report: notes, meta bullets, the plot, the run tables, each run's config.

    ``results["notes"]`` (optional) is a list of markdown paragraphs put first, under
    "Summary". ``results["tables"]`` (optional) is a list of ``{"title": ..., "keys": [...]}``
    groups of summary keys, one table each; summary scalars in no group go to a last table.
    Without it, every summary scalar goes into one table.
    """
    runs = results.get("runs") or []
    lines = [f"# Replay report: {name}", ""]
    notes = results.get("notes") or []
    if notes:
        lines += ["## Summary", ""]
        for note in notes:
            lines += [str(note), ""]
    meta = results.get("meta") or {}
    if meta:
        if notes:
            lines += ["## Setup", ""]
        lines += [f"- **{k}**: {_meta_value(v)}" for k, v in meta.items()]
        lines.append("")
    if png_name:
        lines += [f"![TTFT against history length]({png_name})", ""]
    elif plot_note:
        lines += [f"({plot_note})", ""]
    rows = _run_rows(runs)
    if rows:
        keys = _column_keys(rows)
        groups = results.get("tables") or []
        if groups:
            grouped: set[str] = set()
            for group in groups:
                wanted = [k for k in group.get("keys", []) if k in keys]
                grouped.update(wanted)
                if wanted:
                    lines += [f"## {group.get('title', 'Runs')}", ""]
                    lines += _table(rows, wanted)
            rest = [k for k in keys if k != "run" and k not in grouped]
            if rest:
                lines += ["## Other measurements", ""]
                lines += _table(rows, rest)
        else:
            lines += _table(rows, keys)
        lines.append(
            "Bytes in decimal MB/GB; hit tokens are the prompt tokens whose KV was found on the "
            "device / host / disk tier; — means not measured."
        )
        lines.append("")
        configs = [(row["run"], run.get("config")) for row, run in zip(rows, runs, strict=True)]
        if any(cfg for _, cfg in configs):
            lines += ["## Run configurations", ""]
            lines += [f"- **{n}**: {_meta_value(cfg or {})}" for n, cfg in configs]
            lines.append("")
    else:
        lines += ["No runs.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- plot


def _turn_points(turns: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for t in turns:
        h, ttft = t.get("history_tokens"), t.get("ttft_s")
        if _finite(h) and _finite(ttft):
            xs.append(float(h))
            ys.append(1e3 * float(ttft))
    return xs, ys


def _bin_edges(xs: Sequence[float], n_bins: int) -> list[float]:
    """Quantile bin edges over all runs' history lengths (shared, so the lines compare)."""
    ordered = sorted(xs)
    edges: list[float] = []
    for i in range(n_bins + 1):
        pos = i / n_bins * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        edge = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
        if not edges or edge > edges[-1]:
            edges.append(edge)
    return edges


def _binned_medians(
    xs: Sequence[float], ys: Sequence[float], edges: Sequence[float]
) -> tuple[list[float], list[float]]:
    if len(edges) < 2:  # every history length is the same
        return ([statistics.median(xs)], [statistics.median(ys)]) if xs else ([], [])
    bins: list[list[tuple[float, float]]] = [[] for _ in range(len(edges) - 1)]
    for x, y in zip(xs, ys, strict=True):
        # Bins are [lo, hi) except the last, which also takes the top edge.
        idx = len(edges) - 2
        for j in range(len(edges) - 1):
            if x < edges[j + 1]:
                idx = j
                break
        bins[idx].append((x, y))
    mx, my = [], []
    for b in bins:
        if b:
            mx.append(statistics.median(p[0] for p in b))
            my.append(statistics.median(p[1] for p in b))
    return mx, my


def plot_ttft_vs_history(
    results: dict[str, Any], path: str | os.PathLike[str], *, n_bins: int = 8, title: str = ""
) -> Path:
    """Scatter of every turn's TTFT (ms) against its history length, plus binned medians."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = results.get("runs") or []
    points = [_turn_points(run.get("turns") or []) for run in runs]
    all_x = [x for xs, _ in points for x in xs]
    all_y = [y for _, ys in points for y in ys]
    edges = _bin_edges(all_x, n_bins) if all_x else []

    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (run, (xs, ys)) in enumerate(zip(runs, points, strict=True)):
        colour = f"C{i % 10}"
        label = str(run.get("name", f"run{i}"))
        if not xs:
            # Keep the run in the legend so its absence is visible.
            ax.plot([], [], color=colour, label=f"{label} (no turns)")
            continue
        ax.scatter(xs, ys, s=8, alpha=0.2, color=colour, linewidths=0)
        mx, my = _binned_medians(xs, ys, edges)
        ax.plot(mx, my, "-o", color=colour, markersize=4, linewidth=2, label=f"{label} (median)")
    positive = [y for y in all_y if y > 0]
    if positive and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    if not all_x:
        ax.text(0.5, 0.5, "no turns", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("history length (tokens)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(title or "TTFT against history length")
    ax.grid(True, which="both", alpha=0.3)
    if runs:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out


# -------------------------------------------------------------------------------------- entry


def write_replay_report(
    results: dict[str, Any], out_dir: str | os.PathLike[str], name: str = "replay"
) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``out_dir``.

    Returns ``{"json": ..., "md": ..., "png": ...}``. The JSON is strict (NaN and inf written as
    null) and is written first, so a failure later never loses the measurements. Without
    matplotlib (the ``bench`` extra) the plot is skipped with a warning, the markdown says so, and
    the returned dict has no ``"png"`` key.
    """
    if not isinstance(results, dict) or not isinstance(results.get("runs", []), list):
        raise ValueError("results must be a dict whose 'runs' is a list")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}

    paths["json"].write_text(
        json.dumps(_jsonable(results), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    model = (results.get("meta") or {}).get("model")
    title = f"TTFT against history length — {model}" if model else ""
    png: Path | None = out / f"{name}.png"
    try:
        plot_ttft_vs_history(results, png, title=title)
    except ImportError as e:
        warnings.warn(
            f"TTFT plot skipped ({e}); install matplotlib (pip install -e '.[bench]')",
            RuntimeWarning,
            stacklevel=2,
        )
        png = None
    paths["md"].write_text(
        render_markdown(
            results,
            name,
            png_name=png.name if png else None,
            plot_note=None if png else "No TTFT plot: matplotlib is not installed.",
        ),
        encoding="utf-8",
    )
    if png is not None:
        paths["png"] = png
    return paths
