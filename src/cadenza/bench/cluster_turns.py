"""What the client saw of the cluster, turn by turn: end-to-end latency, and where each turn ran
compared with the turn before it (the ``X-Cadenza-Worker`` header).

A follow-up turn *moved* when it ran on a worker other than its previous turn's (which held its
KV). It *found its KV* when the server reported at least the history's full blocks but one as
cached (``usage.prompt_tokens_details.cached_tokens``), the router's own test for a hint found.
The history is the previous turn's prompt plus its reply. The issue's robustness target is the
share of hinted, moved turns that found their KV: the hint moved it ahead of the turn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cadenza.bench.replay_report import percentile

BLOCK_SIZE = 16  # the engine's default KV block size (cadenza serve --block-size)


def e2e_stats(turns: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean, p50 and p90 end-to-end latency of the completed turns."""
    values = [float(t["e2e_s"]) for t in turns if t["status"] == "ok" and t.get("e2e_s")]
    if not values:
        return {"e2e_mean_s": math.nan, "e2e_p50_s": math.nan, "e2e_p90_s": math.nan}
    return {
        "e2e_mean_s": sum(values) / len(values),
        "e2e_p50_s": percentile(values, 50),
        "e2e_p90_s": percentile(values, 90),
    }


def kv_found(history_tokens: int, cached_tokens: int, block_size: int = BLOCK_SIZE) -> bool:
    wanted = max(history_tokens // block_size - 1, 0) * block_size
    return cached_tokens >= wanted


def landings(turns: Sequence[dict[str, Any]], block_size: int = BLOCK_SIZE) -> dict[str, Any]:
    """Counts of follow-up turns by hinted / unhinted, moved / stayed, KV found or not.

    Only completed follow-ups whose previous turn also completed with a known worker count
    (a turn without usage or header cannot be classified)."""
    by_key = {(t["session"], t["turn"]): t for t in turns}
    counts = {
        f"{h}_{m}_{f}": 0
        for h in ("hinted", "unhinted")
        for m in ("moved", "stayed")
        for f in ("found", "lost")
    }
    for t in turns:
        prev = by_key.get((t["session"], t["turn"] - 1))
        if t["turn"] == 0 or prev is None or t["status"] != "ok" or prev["status"] != "ok":
            continue
        if t.get("worker") is None or prev.get("worker") is None:
            continue
        if t.get("cached_tokens") is None or prev.get("prompt_tokens") is None:
            continue
        history = int(prev["prompt_tokens"]) + int(prev.get("output_tokens") or 0)
        h = "hinted" if t.get("hinted") else "unhinted"
        m = "moved" if t["worker"] != prev["worker"] else "stayed"
        f = "found" if kv_found(history, int(t["cached_tokens"]), block_size) else "lost"
        counts[f"{h}_{m}_{f}"] += 1
    moved_hinted = counts["hinted_moved_found"] + counts["hinted_moved_lost"]
    hinted = moved_hinted + counts["hinted_stayed_found"] + counts["hinted_stayed_lost"]
    moved = moved_hinted + counts["unhinted_moved_found"] + counts["unhinted_moved_lost"]
    followups = moved + counts["unhinted_stayed_found"] + counts["unhinted_stayed_lost"]
    followups += counts["hinted_stayed_found"] + counts["hinted_stayed_lost"]
    return {
        **counts,
        "followups": followups,
        "moved_fraction": moved / followups if followups else math.nan,
        "hinted": hinted,
        "hinted_found_fraction": (
            (counts["hinted_moved_found"] + counts["hinted_stayed_found"]) / hinted
            if hinted
            else math.nan
        ),
        "hinted_moved": moved_hinted,
        "hinted_moved_found_fraction": (
            counts["hinted_moved_found"] / moved_hinted if moved_hinted else math.nan
        ),
    }


def turns_by_worker(turns: Sequence[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in turns:
        if t.get("worker"):
            out[t["worker"]] = out.get(t["worker"], 0) + 1
    return dict(sorted(out.items()))
