"""A reproduction's outputs: ``repro-<name>.json`` (every number, byte-stable),
``repro-<name>.md`` (paper vs ours, conditions, why they differ) and ``repro-<name>.png``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cadenza.sim.metrics import dumps_metrics

Plot = Callable[[Any], None]  # draws on a matplotlib Figure


@dataclass
class Report:
    name: str
    data: dict[str, Any]
    markdown: str
    plot: Plot | None = None
    figsize: tuple[float, float] = (12.0, 8.0)


def write_report(report: Report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"repro-{report.name}"
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    written[0].write_text(dumps_metrics(report.data), encoding="utf-8")
    written[1].write_text(report.markdown.rstrip() + "\n", encoding="utf-8")
    if report.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=report.figsize, layout="constrained")
        report.plot(fig)
        png = stem.with_suffix(".png")
        fig.savefig(png, dpi=90, metadata={"Software": None})
        written.append(png)
    return written


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: None as a dash, floats to ``digits`` significant figures."""
    if value is None:
        return "–"
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:+.{digits}f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |")
    return "\n".join(lines)


def command_line(name: str, options: Any) -> str:
    """The command that reproduces this report (as run)."""
    parts = ["cadenza simulate reproduce", name]
    if options.quick:
        parts.append("--quick")
    if options.scale != 1.0:
        parts.append(f"--scale {options.scale:g}")
    if options.data:
        parts.append(f"--data {options.data}")
    if options.azure:
        parts.append(f"--azure {options.azure}")
    if options.seed:
        parts.append(f"--seed {options.seed}")
    for only in options.only:
        parts.append(f"--only {only}")
    return " ".join(parts)
