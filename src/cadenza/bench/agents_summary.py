"""The numbers of one ``cadenza bench agents`` trial, from the client's records and the server's
``/metrics`` (scraped after the warm-up and after the trial, diffed).

**TTFT** is over every step sent: a step cut off at the trial's bound before its first token
counts with how long it had waited (a lower bound), a failed step as infinity.

**Job completion time** (JCT) is a program's first request to its last reply. ``jct_mean_s`` is
over finished programs; ``jct_mean_bounded_s`` adds every started but unfinished program at the
time it had run when the trial was cut (a lower bound on its JCT), so a mode that finishes fewer
programs is not flattered by averaging only its short ones.

**Cached tokens by tier** are the server's ``prompt_tokens_by_source`` counters: every prompt
token of the trial is served from the device, host or disk tier, recomputed although an earlier
turn had computed it, or new.

**Time outside forward passes**, per step, means of the trial:

* ``outside_engine_s``: the client's time from sending a step to the end of its stream, minus
  the engine's end-to-end time for a request (``e2e_request_latency_seconds``, from the moment
  the engine thread queued it to its last token). What is left is the HTTP server's own work
  around the engine: parsing, the chat template and tokenisation (of the whole history when it
  is resent), the conversation and response stores (SQLite), the SSE framing and the wait for
  the engine thread to take the request between two steps.
* ``outside_engine_first_token_s``: the same before the first token (client TTFT minus engine
  TTFT): the part of it a user waits for.
* ``engine_step_s``: engine step wall time (``engine_step_seconds``) over the trial per step
  served; it holds the forward passes and what runs inside a step (scheduling, issuing or
  waiting for KV fetches). On a CPU, background copies between tiers run between steps on
  their own thread and are not in it; their volume is reported as bytes and blocks per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cadenza.bench.cluster_scrape import Sample
from cadenza.bench.replay_report import percentile
from cadenza.server.metrics import TOKEN_SOURCES


def _metric(diff: Mapping[Sample, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for (sample, pairs), value in diff.items():
        if sample != name:
            continue
        have = dict(pairs)
        if all(have.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _mean_hist(diff: Mapping[Sample, float], base: str) -> float:
    count = _metric(diff, f"cadenza:{base}_count")
    return _metric(diff, f"cadenza:{base}_sum") / count if count else math.nan


def server_numbers(diff: Mapping[Sample, float]) -> dict[str, Any]:
    """The trial's server-side counters and histogram means."""
    sources = {s: _metric(diff, "cadenza:prompt_tokens_by_source_total", source=s)
               for s in TOKEN_SOURCES}  # fmt: skip
    return {
        "prompt_tokens_by_source": sources,
        "engine_ttft_mean_s": _mean_hist(diff, "time_to_first_token_seconds"),
        "engine_e2e_mean_s": _mean_hist(diff, "e2e_request_latency_seconds"),
        "engine_requests_finished": _metric(diff, "cadenza:e2e_request_latency_seconds_count"),
        "engine_step_total_s": _metric(diff, "cadenza:engine_step_seconds_sum"),
        "engine_steps": _metric(diff, "cadenza:engine_step_seconds_count"),
        "swap_in_bytes": _metric(diff, "cadenza:swap_bytes_total", direction="in"),
        "swap_out_bytes": _metric(diff, "cadenza:swap_bytes_total", direction="out"),
        "disk_write_bytes": _metric(diff, "cadenza:kv_disk_write_bytes_total"),
        "fetched_blocks_host": _metric(diff, "cadenza:kv_fetched_blocks_total", tier="host"),
        "fetched_blocks_disk": _metric(diff, "cadenza:kv_fetched_blocks_total", tier="disk"),
        "dropped_blocks": _metric(diff, "cadenza:kv_dropped_blocks_total"),
        "preemptions": _metric(diff, "cadenza:num_preemptions_total"),
    }


def _pcts(values: Sequence[float], prefix: str) -> dict[str, float]:
    if not values:
        return {f"{prefix}_p50_s": math.nan, f"{prefix}_p90_s": math.nan}
    return {f"{prefix}_p{q}_s": percentile(values, q) for q in (50, 90)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize_agents_trial(
    raw: Mapping[str, Any], diff: Mapping[Sample, float] | None = None
) -> dict[str, Any]:
    """The trial's summary (see the module docstring); ``diff`` is the metrics difference."""
    steps: Sequence[dict[str, Any]] = raw["steps"]
    jobs: Sequence[dict[str, Any]] = raw["jobs"]
    elapsed = float(raw["elapsed_s"])
    ok = [s for s in steps if s["status"] == "ok"]
    ttfts = [
        math.inf if s["status"] == "error" else float(s["ttft_s"])
        for s in steps
        if s["status"] == "error" or s.get("ttft_s") is not None
    ]
    finished = [j for j in jobs if j["status"] == "finished"]
    started = [j for j in jobs if j.get("start_s") is not None]
    jcts = [float(j["jct_s"]) for j in finished]
    bounded = [
        float(j["jct_s"]) if j["status"] == "finished" else elapsed - float(j["start_s"])
        for j in started
    ]
    with_usage = [s for s in ok if s.get("prompt_tokens") and s.get("cached_tokens") is not None]
    prompt = sum(int(s["prompt_tokens"]) for s in with_usage)
    cached = sum(int(s["cached_tokens"]) for s in with_usage)
    expected = sum(int(s["expected_prompt_tokens"]) for s in with_usage)
    summary: dict[str, Any] = {
        "elapsed_s": elapsed,
        "jobs": len(jobs),
        "jobs_finished": len(finished),
        "jobs_failed": sum(j["status"] == "failed" for j in jobs),
        "steps_sent": len(steps),
        "steps_completed": len(ok),
        "steps_censored": sum(s["status"] == "censored" for s in steps),
        "errors": sum(s["status"] == "error" for s in steps),
        **_pcts(ttfts, "ttft"),
        "jct_mean_s": _mean(jcts),
        "jct_mean_bounded_s": _mean(bounded),
        **_pcts(jcts, "jct"),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_fraction": cached / prompt if prompt else math.nan,
        "prompt_over_trace_tokens": prompt / expected if expected else math.nan,
        "client_ttft_mean_s": _mean([float(s["ttft_s"]) for s in ok]),
        "client_turn_mean_s": _mean([float(s["done_s"]) for s in ok]),
        "post_last_token_mean_s": _mean(
            [float(s["done_s"]) - float(s["last_token_s"]) for s in ok]
        ),
        "short_replies": sum(
            1
            for s in ok
            if int(s.get("output_tokens") or 0) < int(s.get("target_output_tokens") or 0)
        ),
    }
    if diff is not None:
        server = server_numbers(diff)
        summary["server"] = server
        summary["outside_engine_s"] = summary["client_turn_mean_s"] - server["engine_e2e_mean_s"]
        summary["outside_engine_first_token_s"] = (
            summary["client_ttft_mean_s"] - server["engine_ttft_mean_s"]
        )
        served = max(len(ok), 1)
        summary["engine_step_s"] = server["engine_step_total_s"] / served
        summary["engine_busy_fraction"] = server["engine_step_total_s"] / max(elapsed, 1e-9)
        swapped = server["swap_in_bytes"] + server["swap_out_bytes"]
        summary["swap_bytes_per_step"] = swapped / served
    return summary
