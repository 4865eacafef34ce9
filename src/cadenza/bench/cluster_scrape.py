"""What the server counted during one trial: ``/metrics`` scraped before and after, diffed.

The router's counters (``cadenza:cluster_*``, see ``server/cluster_metrics.py``) and the
server's per-source prompt tokens are cumulative over the server's life, and one server serves
every trial of a policy, so a trial's numbers are the difference of two scrapes. The text
format is parsed here (a few lines; no dependency on the exposition library's parser).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

# The counters a trial reports, by sample name, with the label that splits each.
CLUSTER_COUNTERS: Mapping[str, str | None] = {
    "cadenza:cluster_migrations_total": "kind",
    "cadenza:cluster_migrations_aborted_total": "kind",
    "cadenza:cluster_migration_bytes_total": None,
    "cadenza:cluster_migration_seconds_total": None,
    "cadenza:cluster_hint_outcomes_total": "outcome",
    "cadenza:cluster_routing_decisions_total": "reason",
    "cadenza:cluster_prompt_tokens_by_source_total": "source",
    "cadenza:cluster_live_migrations_total": None,
    "cadenza:cluster_failovers_total": None,
    "cadenza:prompt_tokens_by_source_total": "source",
    "cadenza:prompt_tokens_total": None,
}


def _unescape(value: str) -> str:
    return re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], value)


def parse_metrics(text: str) -> dict[Sample, float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    out: dict[Sample, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, _, labels, value = m.group(1), m.group(2), m.group(3) or "", m.group(4)
        try:
            number = float(value)
        except ValueError:
            continue
        pairs = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(labels)))
        out[(name, pairs)] = number
    return out


def diff_metrics(
    before: Mapping[Sample, float], after: Mapping[Sample, float]
) -> dict[Sample, float]:
    """``after - before`` per sample (a sample new in ``after`` counts from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def counters_by_label(diff: Mapping[Sample, float]) -> dict[str, Any]:
    """The trial's counters: ``{short name: number or {label value: number}}``, where the short
    name drops the ``cadenza:`` prefix and ``_total`` suffix; labels other than the splitting one
    (``model_name``) are summed over."""
    out: dict[str, Any] = {}
    for name, label in CLUSTER_COUNTERS.items():
        short = name.removeprefix("cadenza:").removesuffix("_total")
        samples = [(dict(labels), v) for (n, labels), v in diff.items() if n == name]
        if label is None:
            out[short] = sum(v for _, v in samples)
            continue
        split: dict[str, float] = {}
        for labels, v in samples:
            key = labels.get(label, "")
            split[key] = split.get(key, 0.0) + v
        out[short] = dict(sorted(split.items()))
    return out


def scrape(base_url: str, timeout_s: float = 30.0) -> dict[Sample, float]:
    """``GET /metrics``, parsed."""
    resp = httpx.get(f"{base_url}/metrics", timeout=timeout_s)
    resp.raise_for_status()
    return parse_metrics(resp.text)
