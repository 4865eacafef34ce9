"""`cadenza bench replay`: multi-turn ShareGPT replay against the engine, tiers on and off.

Sessions start as a Poisson process and think for exponential times between turns; every turn
sends only its new user message (the session supplies the exact history). The same workload
runs under several configurations in one process, one after another:

* ``resident`` — always first: a device large enough that nothing is evicted. It is the
  step-time baseline for "copies are hidden behind compute", and the run that *measures the live
  KV* the tiers are then sized from;
* ``stateless`` — caching off: every turn recomputes its whole history (the vLLM-recompute
  baseline);
* ``tiers-cost`` / ``tiers-lru`` — device capacity for ``--device-frac`` of the measured peak
  live KV (never less than the largest single turn needs), a host tier for ``--host-frac`` of it,
  and a large disk tier, with each eviction policy.

**Live KV** at a moment is the KV of the sessions that have started and not yet finished their
last turn: for each, ``tokens // block_size + 1`` blocks, where ``tokens`` is its history so far
(between turns) or the running turn's prompt plus what it has generated (during one). It is the
KV a perfect cache would have to keep; the tiers are sized as fractions of its peak.

**Step cost.** Steps of different runs differ in composition (tokens, sequences, context), so
raw step times do not compare. Every step's wall time is recorded with its scheduled tokens,
its sequences and its attention work (sum over its token ranges of query length x context
length); a linear model ``t = c0 + c1 tokens + c2 attention + c3 seqs`` is fitted by least
squares on the resident run (then scaled so its median actual/predicted there is 1), and each
run reports ``step_slowdown``, the median of actual over predicted step time (1.0 for the
resident run by construction). The same is done on the main thread's CPU time per step
(``cpu_step_slowdown``), which other processes on a shared machine disturb far less than wall
time; ``step_cpu_share`` (CPU time / wall time of a step, median) shows how much they took.
The step's scheduler output is observed by wrapping ``engine.scheduler.schedule`` on the
instance (the engine keeps none); nothing in the engine changes.

Idle gaps are skipped (the clock jumps to the next event when the engine has nothing to do),
so think times shape the interleaving without costing wall time.
"""

from __future__ import annotations

import argparse
import heapq
import math
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cadenza.bench.replay_report import summarize_turns, write_replay_report
from cadenza.bench.workloads import Conversation, load_sharegpt, plan_sessions, truncate_text

CONFIG_NAMES = ("resident", "stateless", "tiers-cost", "tiers-lru")
STEP_FIELDS = ("wall_s", "tokens", "seqs", "attention", "cpu_s", "copying")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model to replay on")
    parser.add_argument("--data", default=None, help="ShareGPT jsonl(.gz); default: the sample")
    parser.add_argument(
        "--conversations", type=int, default=100, help="ShareGPT conversations replayed"
    )
    parser.add_argument(
        "--min-turns", type=int, default=3, help="use conversations with at least this many turns"
    )
    parser.add_argument("--max-turns", type=int, default=4, help="turns replayed per session")
    parser.add_argument("--max-chars", type=int, default=400, help="truncate each user message")
    parser.add_argument("--max-output", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--session-rate", type=float, default=0.75, help="sessions per second")
    parser.add_argument("--think-mean", type=float, default=10.0, help="seconds between turns")
    parser.add_argument(
        "--device-frac", type=float, default=0.2, help="device KV / measured peak live KV"
    )
    parser.add_argument(
        "--host-frac", type=float, default=0.5, help="host KV / measured peak live KV"
    )
    parser.add_argument("--disk-path", default=None, help="default: a temporary directory")
    parser.add_argument(
        "--configs",
        default="resident,stateless,tiers-cost,tiers-lru",
        help="runs, in order; resident always runs first (it sizes the tiers)",
    )
    parser.add_argument("--threads", type=int, default=None, help="default: torch's default")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals and think times")
    parser.add_argument(
        "--out-dir", default="docs/benchmarks", help="where the JSON, markdown and plot go"
    )
    parser.add_argument("--name", default="replay", help="base name of the result files")
    parser.add_argument("--note", default=None, help="free text recorded in the report's meta")
    from cadenza.bench.trace_replay import add_trace_arguments

    add_trace_arguments(parser)
    parser.set_defaults(func=run)


# ------------------------------------------------------------------------------ live KV


class LiveKV:
    """Blocks of the live sessions over (virtual) time: the current sum, its peak, and its
    time-weighted mean from the first session's start to the last change."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.sessions: dict[str, int] = {}
        self.blocks = 0
        self.peak = 0
        self.peak_time = 0.0
        self.max_sessions = 0
        self._start: float | None = None
        self._last = 0.0
        self._area = 0.0

    def _advance(self, now: float) -> None:
        if self._start is None:
            self._start = self._last = now
        if now > self._last:
            self._area += self.blocks * (now - self._last)
            self._last = now

    def update(self, session: str, tokens: int, now: float) -> None:
        """The session holds ``tokens`` tokens of KV from ``now`` on (it is live)."""
        self._advance(now)
        blocks = tokens // self.block_size + 1
        self.blocks += blocks - self.sessions.get(session, 0)
        self.sessions[session] = blocks
        self.max_sessions = max(self.max_sessions, len(self.sessions))
        if self.blocks > self.peak:
            self.peak, self.peak_time = self.blocks, now

    def end(self, session: str, now: float) -> None:
        """The session finished its last turn: its KV is no longer live."""
        self._advance(now)
        self.blocks -= self.sessions.pop(session, 0)

    def mean(self) -> float:
        """Time-weighted mean of the live blocks over the span seen so far."""
        if self._start is None:
            return 0.0
        span = self._last - self._start
        return self._area / span if span > 0 else float(self.blocks)


# ---------------------------------------------------------------------------- step cost


def step_features(plan: Any) -> tuple[int, int, int]:
    """``(tokens, sequences, attention work)`` of a scheduler output: attention work is the sum
    over its token ranges of query length x context length (the range's end)."""
    tokens = seqs = attention = 0
    for chunk in plan.chunks:
        seqs += 1
        for start, end in chunk.segments:
            tokens += end - start
            attention += (end - start) * end
    return tokens, seqs, attention


def _design(steps: Sequence[Sequence[float]], time_index: int = 0):
    import numpy as np

    rows = np.asarray([list(r) for r in steps], dtype=np.float64).reshape(len(steps), -1)
    if len(steps) and rows.shape[1] < 4:
        raise ValueError("step records are (wall_s, tokens, seqs, attention[, cpu_s])")
    x = np.column_stack([np.ones(len(rows)), rows[:, 1], rows[:, 3], rows[:, 2]])
    return x, rows[:, time_index] if len(steps) else np.zeros(0)


def _ratios(y, predicted) -> list[float]:
    positive = [p for p in predicted if p > 0]
    floor = max(min(positive, default=1e-6), 1e-6)  # a model that dips below 0 on a tiny step
    return [float(t) / max(float(p), floor) for t, p in zip(y, predicted, strict=True)]


def fit_step_cost(steps: Sequence[Sequence[float]], time_index: int = 0) -> dict[str, float]:
    """Least-squares ``t ~ c0 + c1 tokens + c2 attention + c3 seqs`` over step records
    ``(wall_s, tokens, seqs, attention[, cpu_s])`` (``t`` is column ``time_index``), then
    scaled by one factor so the median of actual over predicted on these steps is exactly 1
    (``calibration``; the least-squares fit is pulled by the few long prefill steps, the median
    by the many decode steps). Also returns the unscaled fit's R^2 and the step count."""
    import numpy as np

    x, y = _design(steps, time_index)
    if len(y) < x.shape[1]:
        raise ValueError(f"need at least {x.shape[1]} steps to fit the step cost, got {len(y)}")
    if (y <= 0).any():
        raise ValueError("step times must be positive")
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
    coef = coef / scale
    predicted = x @ coef
    resid = y - predicted
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    calibration = statistics.median(_ratios(y, predicted))
    coef = coef * calibration
    return {
        "c0_s": float(coef[0]),
        "c_token_s": float(coef[1]),
        "c_attention_s": float(coef[2]),
        "c_seq_s": float(coef[3]),
        "calibration": calibration,
        "r2": r2,
        "steps": len(y),
    }


def predict_step_cost(model: dict[str, float], steps: Sequence[Sequence[float]]) -> list[float]:
    """The model's step times for step records ``(wall_s, tokens, seqs, attention, ...)``."""
    x, _ = _design(steps)
    coef = [model["c0_s"], model["c_token_s"], model["c_attention_s"], model["c_seq_s"]]
    return [float(v) for v in x @ coef]


def step_slowdown(
    model: dict[str, float],
    steps: Sequence[Sequence[float]],
    time_index: int = 0,
    prefix: str = "step_slowdown",
) -> dict[str, float]:
    """Actual against predicted step time: the median ratio (the headline), its p10/p90, and
    total actual over total predicted (``<prefix>_total``)."""
    if not steps:
        nan = float("nan")
        return {prefix: nan, f"{prefix}_p10": nan, f"{prefix}_p90": nan, f"{prefix}_total": nan}
    _, y = _design(steps, time_index)
    predicted = predict_step_cost(model, steps)
    ratios = sorted(_ratios(y, predicted))
    q = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else [ratios[0]] * 9
    return {
        prefix: statistics.median(ratios),
        f"{prefix}_p10": q[0],
        f"{prefix}_p90": q[-1],
        f"{prefix}_total": float(y.sum()) / max(sum(predicted), 1e-12),
    }


def decode_step_slowdown(
    reference: Sequence[Sequence[float]], steps: Sequence[Sequence[float]], min_count: int = 10
) -> float:
    """A model-free cross-check of ``step_slowdown``: over decode-only steps (one token per
    sequence), the median of each step's wall time over the reference run's median wall time
    for decode steps of the same batch size (sizes the reference saw at least ``min_count``
    times). NaN if no step matches."""
    by_seqs: dict[int, list[float]] = {}
    for r in reference:
        if r[1] == r[2]:
            by_seqs.setdefault(int(r[2]), []).append(r[0])
    medians = {k: statistics.median(v) for k, v in by_seqs.items() if len(v) >= min_count}
    ratios = [r[0] / medians[int(r[2])] for r in steps if r[1] == r[2] and int(r[2]) in medians]
    return statistics.median(ratios) if ratios else float("nan")


def copy_overlap(model: dict[str, float], steps: Sequence[Sequence[float]]) -> dict[str, float]:
    """Within one run (same machine conditions, interleaved in time): ``step_slowdown`` over the
    steps that ran while KV copies were in flight (record field 5 set) and over the others, and
    the fraction of steps that overlapped copies. Their quotient is how much a copy running
    beside a step slows it, free of drift between runs."""
    copying = [s for s in steps if len(s) > 5 and s[5]]
    quiet = [s for s in steps if not (len(s) > 5 and s[5])]
    nan = float("nan")
    with_copies = step_slowdown(model, copying)["step_slowdown"] if copying else nan
    without = step_slowdown(model, quiet)["step_slowdown"] if quiet else nan
    return {
        "copying_step_fraction": len(copying) / len(steps) if steps else nan,
        "step_slowdown_copying": with_copies,
        "step_slowdown_quiet": without,
        "copy_step_overhead": with_copies / without if without > 0 else nan,
    }


# ------------------------------------------------------------------------------- driver


def _session_kv_blocks(
    tokenizer, conversations: list[Conversation], max_output: int, block_size: int
) -> list[int]:
    """Blocks each conversation's final history needs (reference replies cut to max_output);
    an estimate, used only to make the resident device surely large enough."""
    sizes = []
    for conv in conversations:
        messages: list[dict[str, str]] = []
        for turn in conv.turns:
            reply = tokenizer.decode(tokenizer.encode(turn.assistant)[:max_output])
            messages += [
                {"role": "user", "content": turn.user},
                {"role": "assistant", "content": reply},
            ]
        tokens = tokenizer.encode_chat(messages, add_generation_prompt=False)
        sizes.append(len(tokens) // block_size + 2)
    return sizes


class _Probe:
    """Observes the engine from outside: the scheduler output of each step (the engine keeps
    none, so ``schedule`` is wrapped on the instance) and the device blocks evicted by
    allocation (the pool's ``before_evict`` hook is chained)."""

    def __init__(self, engine) -> None:
        self.plan = None
        self.evicted_blocks = 0
        scheduler = engine.scheduler
        schedule = scheduler.schedule

        def observed_schedule():
            self.plan = schedule()
            return self.plan

        scheduler.schedule = observed_schedule
        pool = scheduler.kv.pool
        hook = pool.before_evict

        def observed_evict(victims):
            self.evicted_blocks += len(victims)
            if hook is not None:
                hook(victims)

        pool.before_evict = observed_evict


def _drive(
    llm,
    conversations: list[Conversation],
    plans,
    max_tokens: list[list[int]],
    progress_s: float = 30.0,
) -> dict[str, Any]:
    from cadenza.core.sampling_params import SamplingParams

    engine = llm.engine
    probe = _Probe(engine)
    block_size = engine.config.cache.block_size
    live_kv = LiveKV(block_size)
    events: list[tuple[float, int, int]] = [(p.start_s, i, 0) for i, p in enumerate(plans)]
    heapq.heapify(events)
    start = time.monotonic()
    skipped = 0.0
    live: dict[str, tuple[int, int, int]] = {}  # request id -> (session, turn, prompt tokens)
    turns: list[dict[str, Any]] = []
    steps: list[tuple[float, int, int, int, float, int]] = []  # STEP_FIELDS
    stall_s = 0.0
    stall_steps = 0
    history_len: dict[int, int] = {}
    next_report = start + progress_s
    while events or live:
        now = time.monotonic() - start + skipped
        if progress_s and time.monotonic() >= next_report:
            next_report += progress_s
            print(
                f"[replay]   t={now:.0f}s wall={time.monotonic() - start:.0f}s "
                f"turns={len(turns)} in_flight={len(live)} live_sessions={len(live_kv.sessions)} "
                f"live_kv={live_kv.blocks} steps={len(steps)}",
                flush=True,
            )
        while events and events[0][0] <= now:
            _, i, t = heapq.heappop(events)
            turn = conversations[i].turns[t]
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens[i][t], ignore_eos=True)
            rid = llm.add_turn(f"s{i}", [{"role": "user", "content": turn.user}], params)
            prompt = engine.scheduler.requests[rid].num_prompt_tokens
            live[rid] = (i, t, prompt)
            live_kv.update(f"s{i}", prompt, now)
        if not engine.has_unfinished_requests():
            if events:
                skipped += max(0.0, events[0][0] - now)
            continue
        probe.plan = None
        copying = int(engine.tiers.num_pending_jobs > 0)  # KV copies queued beside this step
        c0 = time.thread_time()
        t0 = time.perf_counter()
        outputs = llm.step()
        dt = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        plan = probe.plan
        if plan is not None and not plan.is_empty:
            tokens, seqs, attention = step_features(plan)
            steps.append((dt, tokens, seqs, attention, cpu, copying))
        else:
            stall_s += dt
            stall_steps += 1
        now = time.monotonic() - start + skipped
        for out in outputs:
            i, t, prompt = live[out.request_id]
            generated = len(out.outputs[0].token_ids)
            if not out.finished:
                live_kv.update(f"s{i}", prompt + generated, now)
                continue
            del live[out.request_id]
            turns.append(
                {
                    "session": f"s{i}",
                    "turn": t,
                    "history_tokens": history_len.get(i, 0),
                    "prompt_tokens": len(out.prompt_token_ids),
                    "output_tokens": generated,
                    "ttft_s": out.metrics.get("ttft_s", float("nan")),
                    "cached_tokens": out.num_cached_tokens,
                    "redundant_tokens": out.num_redundant_tokens,
                    "cached_by_tier": out.cached_tokens_by_tier,
                }
            )
            history_len[i] = len(out.prompt_token_ids) + generated
            if t + 1 < len(conversations[i].turns):
                live_kv.update(f"s{i}", history_len[i], now)
                heapq.heappush(events, (now + plans[i].think_s[t], i, t + 1))
            else:
                live_kv.end(f"s{i}", now)
    return {
        "turns": turns,
        "steps": steps,
        "stall_s": stall_s,
        "stall_steps": stall_steps,
        "wall_s": time.monotonic() - start,
        "virtual_s": time.monotonic() - start + skipped,
        "evicted_blocks": probe.evicted_blocks,
        "live_kv": {
            "peak_blocks": live_kv.peak,
            "peak_at_s": live_kv.peak_time,
            "mean_blocks": live_kv.mean(),
            "max_live_sessions": live_kv.max_sessions,
            "final_session_blocks": sum(n // block_size + 1 for n in history_len.values()),
            "largest_turn_blocks": max(
                (-(-(t["prompt_tokens"] + t["output_tokens"]) // block_size) for t in turns),
                default=0,
            ),
        },
    }


def _summary(result: dict[str, Any], llm) -> dict[str, Any]:
    turns = result["turns"]
    history = sum(max(t["history_tokens"] - 1, 0) for t in turns)
    redundant = sum(t["redundant_tokens"] for t in turns)
    hits = {
        tier: sum(t["cached_by_tier"].get(tier, 0) for t in turns)
        for tier in ("device", "host", "disk")
    }
    stats = llm.engine.tiers.stats
    disk = llm.engine.disk.stats if llm.engine.disk is not None else None
    ttft = summarize_turns(turns)
    steps = result["steps"]
    step_total = sum(s[0] for s in steps)
    tokens = sum(s[1] for s in steps)
    return {
        "turns": len(turns),
        "history_tokens": history,
        "redundant_prefill_tokens": redundant,
        "redundant_fraction": redundant / history if history else 0.0,
        "prompt_tokens": sum(t["prompt_tokens"] for t in turns),
        "hit_tokens": hits,
        "fetched_blocks_host": stats.fetched_blocks.get("host", 0),
        "fetched_blocks_disk": stats.fetched_blocks.get("disk", 0),
        "swap_in_bytes": stats.swap_in_bytes,
        "swap_out_bytes": stats.swap_out_bytes,
        "disk_write_bytes": disk.bytes_written if disk else 0,
        "disk_read_bytes": disk.bytes_read if disk else 0,
        "swap_in_gbps": stats.swap_in_bytes / 1e9 / stats.swap_in_seconds
        if stats.swap_in_seconds
        else 0.0,
        "swap_out_gbps": stats.swap_out_bytes / 1e9 / stats.swap_out_seconds
        if stats.swap_out_seconds
        else 0.0,
        "evicted_blocks": result["evicted_blocks"],
        "dropped_blocks": stats.dropped_blocks,
        "preemptions": llm.engine.scheduler.num_preemptions,
        "ttft_p50_s": ttft["ttft_p50_s"],
        "ttft_p90_s": ttft["ttft_p90_s"],
        "steps": len(steps),
        "tokens_computed": tokens,
        "step_tokens_median": statistics.median(s[1] for s in steps) if steps else 0,
        "step_seqs_median": statistics.median(s[2] for s in steps) if steps else 0,
        "step_time_median_s": statistics.median(s[0] for s in steps) if steps else 0.0,
        "step_time_total_s": step_total,
        "stall_steps": result["stall_steps"],
        "stall_time_s": result["stall_s"],
        # Time in engine.step() (stalls waiting for KV included) per token computed.
        "step_time_per_token_s": (step_total + result["stall_s"]) / tokens if tokens else 0.0,
        "wall_s": result["wall_s"],
    }


def _size_tiers(
    live_kv: dict[str, Any], device_frac: float, host_frac: float, reserve_fraction: float
) -> dict[str, Any]:
    """Device and host blocks as fractions of the measured peak live KV; the device never
    below what the largest single turn needs with the admission reserve kept free."""
    peak = live_kv["peak_blocks"]
    by_fraction = int(device_frac * peak)
    floor = math.ceil((live_kv["largest_turn_blocks"] + 2) / (1.0 - reserve_fraction)) + 2
    device = max(by_fraction, floor)
    host = int(host_frac * peak)
    return {
        "device_blocks": device,
        "device_blocks_by_fraction": by_fraction,
        "device_floor_blocks": floor,
        "device_floor_applied": floor > by_fraction,
        "host_blocks": host,
        "device_frac_of_peak_live": device / peak if peak else float("nan"),
        "host_frac_of_peak_live": host / peak if peak else float("nan"),
    }


def _ok_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r["summary"] for r in runs if "error" not in r}


def _acceptance(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_name = _ok_runs(runs)
    out: dict[str, Any] = {}
    failed = [r["name"] for r in runs if "error" in r]
    if failed:
        out["failed_runs"] = failed
    tiers = [n for n in ("tiers-cost", "tiers-lru") if n in by_name]
    if tiers and "stateless" in by_name:
        out["redundant_fraction"] = {n: by_name[n]["redundant_fraction"] for n in tiers}
        out["stateless_redundant_fraction"] = by_name["stateless"]["redundant_fraction"]
        out["point1_holds"] = (
            all(by_name[n]["redundant_fraction"] <= 0.02 for n in tiers)
            and by_name["stateless"]["redundant_fraction"] >= 0.90
        )
    if tiers:
        out["step_slowdown"] = {n: by_name[n]["step_slowdown"] for n in tiers}
        out["point2_holds"] = all(by_name[n]["step_slowdown"] <= 1.10 for n in tiers)
    return out


TABLES = [
    {
        "title": "KV reuse",
        "keys": [
            "turns",
            "history_tokens",
            "redundant_prefill_tokens",
            "redundant_fraction",
            "prompt_tokens",
            "hit_tokens",
            "fetched_blocks_host",
            "fetched_blocks_disk",
            "evicted_blocks",
            "dropped_blocks",
            "preemptions",
        ],
    },
    {
        "title": "KV copies",
        "keys": [
            "swap_in_bytes",
            "swap_out_bytes",
            "disk_write_bytes",
            "disk_read_bytes",
            "swap_in_gbps",
            "swap_out_gbps",
        ],
    },
    {
        "title": "Step time against the resident step-cost model",
        "keys": [
            "step_slowdown",
            "step_slowdown_p10",
            "step_slowdown_p90",
            "step_slowdown_total",
            "cpu_step_slowdown",
            "decode_step_slowdown",
            "copying_step_fraction",
            "step_slowdown_copying",
            "step_slowdown_quiet",
            "copy_step_overhead",
            "step_cpu_share",
            "step_time_median_s",
            "step_tokens_median",
            "step_seqs_median",
            "steps",
            "tokens_computed",
            "step_time_total_s",
            "stall_steps",
            "stall_time_s",
            "step_time_per_token_s",
        ],
    },
    {
        "title": "Latency and wall time",
        "keys": ["ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "ttft_mean_s", "wall_s"],
    },
]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if math.isfinite(x) else "—"


def _notes(meta: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """The acceptance paragraphs: each point's measured value and whether it holds."""
    by_name = _ok_runs(runs)
    ok = [r for r in runs if "error" not in r]
    tiers = [n for n in ("tiers-cost", "tiers-lru") if n in by_name]
    notes = [
        f"{meta['conversations']} conversations ({meta['turns']} turns). Live KV measured in "
        f"the resident run: peak {meta['peak_live_kv_blocks']:,} blocks "
        f"({meta['max_live_sessions']} live sessions at most), time-weighted mean "
        f"{meta['mean_live_kv_blocks']:,} blocks. Device {meta['device_blocks']:,} blocks = "
        f"{_pct(meta['device_frac_of_peak_live'])} of the peak"
        + (
            f" (the floor of {meta['device_floor_blocks']} blocks for the largest turn, "
            f"{meta['largest_turn_blocks']} blocks, overrides the requested "
            f"{_pct(meta['device_frac_requested'])})"
            if meta["device_floor_applied"]
            else ""
        )
        + f"; host {meta['host_blocks']:,} blocks = {_pct(meta['host_frac_of_peak_live'])}; "
        f"disk large. The resident run ({meta['resident_blocks']:,} device blocks) evicted "
        f"{by_name['resident']['evicted_blocks']} device blocks (its dropped_blocks count "
        "partial tail blocks re-opened by the next turn, not evictions)."
    ]
    for r in runs:
        if "error" in r:
            notes.append(f"**Run {r['name']} failed:** `{r['error']}`.")
    if tiers and "stateless" in by_name:
        stateless = by_name["stateless"]["redundant_fraction"]
        worst = max(by_name[n]["redundant_fraction"] for n in tiers)
        holds = worst <= 0.02 and stateless >= 0.90
        hits = "; ".join(
            f"{n} "
            + "/".join(f"{by_name[n]['hit_tokens'][t]:,}" for t in ("device", "host", "disk"))
            for n in tiers
        )
        notes.append(
            "**Point 1 — redundant prefill ≤ 2% with tiers, against stateless (≥ 90%).** "
            + ", ".join(f"{n} {_pct(by_name[n]['redundant_fraction'])}" for n in tiers)
            + f"; stateless {_pct(stateless)} in the same run (over 100% when preempted turns "
            "recompute their history again). "
            + f"Prompt tokens found device/host/disk: {hits}. "
            + ("**Holds.**" if holds else "**Does not hold.**")
        )
    if tiers:
        model = meta["step_cost_model"]
        worst = max(by_name[n]["step_slowdown"] for n in tiers)
        holds = worst <= 1.10

        def each(key: str, fmt: str = "{:.3f}", names: list[str] | None = None) -> str:
            names = names or [r["name"] for r in ok]
            return ", ".join(f"{n} {fmt.format(by_name[n][key])}" for n in names)

        notes.append(
            "**Point 2 — a swapping replay within 10% of the resident step time.** Step cost "
            "t = c0 + c1·tokens + c2·attention + c3·seqs fitted on the resident run's "
            f"{model['steps']:,} steps (R² {model['r2']:.2f}); median actual/predicted step "
            f"time (`step_slowdown`): {each('step_slowdown')}. Worst tiers run {worst:.3f} "
            "against the 1.10 limit: " + ("**holds.**" if holds else "**does not hold.**")
        )
        notes.append(
            "Cross-checks on the same steps. On main-thread CPU time instead of wall time: "
            f"{each('cpu_step_slowdown')} (median CPU share of a step: "
            f"{each('step_cpu_share', '{:.1%}')}). Without a model, decode-only steps against "
            f"resident decode steps of the same batch size: {each('decode_step_slowdown')}. "
            "Within each tiers run, so free of drift between runs: KV copies were queued "
            "(on a CPU they start a slice only between forward passes, so at most one slice "
            "overlaps a step) beside "
            f"{each('copying_step_fraction', '{:.0%}', tiers)} of the steps; those "
            f"steps' slowdown {each('step_slowdown_copying', names=tiers)}, the other steps' "
            f"{each('step_slowdown_quiet', names=tiers)}. Raw median step times (different "
            f"batch compositions, not comparable): {each('step_time_median_s', '{:.4f} s')}. "
            f"Time in steps per computed token: {each('step_time_per_token_s', '{:.4f} s')}. "
            f"Steps that ran nothing while turns waited for KV: "
            + ", ".join(
                f"{n} {by_name[n]['stall_steps']} ({by_name[n]['stall_time_s']:.1f} s)"
                for n in tiers
            )
            + ". The runs go one after another on a machine shared with other work, so the "
            "load they see differs; the within-run split is the least disturbed measure of "
            "what the copies themselves cost: queued copies made a step "
            + ", ".join(
                f"{n} {by_name[n]['copy_step_overhead'] - 1:+.1%}"
                for n in tiers
                if math.isfinite(by_name[n]["copy_step_overhead"])
            )
            + " slower than the same run's other steps."
        )
        disturbed = [r["name"] for r in ok if r["summary"]["step_cpu_share"] < 0.95]
        if disturbed:
            notes.append(
                "**Disturbed runs:** "
                + ", ".join(
                    f"{n} (its main thread got {by_name[n]['step_cpu_share']:.0%} of a core "
                    "during steps)"
                    for n in disturbed
                )
                + ": other processes took the machine during these runs, so their step times "
                "and TTFTs measure the machine as much as the engine."
            )
    return notes


def _git_describe() -> str | None:
    """``git describe --always --dirty`` of the checkout this module runs from, if any."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run(args: argparse.Namespace) -> int:
    if getattr(args, "trace", None):
        from cadenza.bench.trace_replay import run_trace

        return run_trace(args)
    if getattr(args, "out", None):
        raise ValueError(
            "--out is the metrics file of a --trace replay; without --trace the ShareGPT"
            " replay writes its report into --out-dir (named by --name)"
        )
    from cadenza.config import CacheConfig
    from cadenza.llm import LLM
    from cadenza.model.source import load_model_source

    source = load_model_source(args.model)
    tok = source.tokenizer
    if tok is None:
        raise ValueError("the replay needs a model with a tokenizer")
    conversations = load_sharegpt(
        args.data, limit=args.conversations, min_turns=args.min_turns, max_turns=args.max_turns
    )
    conversations = [
        Conversation(
            c.conversation_id,
            tuple(type(t)(truncate_text(t.user, args.max_chars), t.assistant) for t in c.turns),
        )
        for c in conversations
    ]
    plans = plan_sessions(
        conversations, session_rate=args.session_rate, mean_think_s=args.think_mean, seed=args.seed
    )
    max_tokens = [
        [max(1, min(len(tok.encode(t.assistant)), args.max_output)) for t in c.turns]
        for c in conversations
    ]
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONFIG_NAMES]
    if unknown:
        raise ValueError(f"unknown replay configs {unknown}; choose from {list(CONFIG_NAMES)}")
    order = ["resident"] + [c for c in dict.fromkeys(wanted) if c != "resident"]
    disk_root = Path(args.disk_path or tempfile.mkdtemp(prefix="cadenza-replay-"))

    runs: list[dict[str, Any]] = []
    sizing: dict[str, Any] = {}
    live_kv: dict[str, Any] = {}
    step_model: dict[str, float] = {}
    cpu_model: dict[str, float] = {}
    resident_steps: list[tuple[float, int, int, int, float, int]] = []
    for name in order:
        if name == "resident":
            block_size = CacheConfig().block_size  # the block size LLM(...) gets
            estimate = sum(_session_kv_blocks(tok, conversations, args.max_output, block_size))
            config: dict[str, Any] = {"num_kv_blocks": 2 * estimate + 64}
        else:
            device, host = sizing["device_blocks"], sizing["host_blocks"]
            disk = 4 * max(live_kv["final_session_blocks"], live_kv["peak_blocks"])
            config = {
                "stateless": {"num_kv_blocks": device, "enable_prefix_caching": False},
                "tiers-cost": {
                    "num_kv_blocks": device,
                    "host_num_blocks": host,
                    "disk_num_blocks": disk,
                    "kv_eviction_policy": "cost",
                },
                "tiers-lru": {
                    "num_kv_blocks": device,
                    "host_num_blocks": host,
                    "disk_num_blocks": disk,
                    "kv_eviction_policy": "lru",
                },
            }[name]
        if "disk_num_blocks" in config:
            path = disk_root / name
            shutil.rmtree(path, ignore_errors=True)
            config["kv_disk_path"] = str(path)
        print(f"[replay] {name}: {config}", flush=True)
        llm = LLM(source=source, num_threads=args.threads, **config)
        try:
            result = _drive(llm, conversations, plans, max_tokens)
            summary = _summary(result, llm)
            reserve = llm.engine.config.cache.admission_reserve_fraction
        except Exception as e:
            if name == "resident":
                raise  # everything else is sized and judged from it
            error = f"{type(e).__name__}: {str(e)[:120]}"
            print(f"[replay] {name} FAILED: {error}", flush=True)
            traceback.print_exc()
            runs.append({"name": name, "config": config, "error": error, "summary": {}})
            continue
        finally:
            try:
                llm.close()
            except Exception:  # a failed run may leave the engine unable to flush
                traceback.print_exc()
        if name == "resident":
            live_kv = result["live_kv"]
            sizing = _size_tiers(live_kv, args.device_frac, args.host_frac, reserve)
            step_model = fit_step_cost(result["steps"])
            cpu_model = fit_step_cost(result["steps"], time_index=4)
            resident_steps = result["steps"]
        summary.update(step_slowdown(step_model, result["steps"]))
        summary.update(step_slowdown(cpu_model, result["steps"], 4, "cpu_step_slowdown"))
        summary["decode_step_slowdown"] = decode_step_slowdown(resident_steps, result["steps"])
        summary.update(copy_overlap(step_model, result["steps"]))
        summary["step_cpu_share"] = (
            statistics.median(s[4] / s[0] for s in result["steps"] if s[0] > 0)
            if result["steps"]
            else float("nan")
        )
        print(f"[replay] {name}: {summary}", flush=True)
        runs.append(
            {
                "name": name,
                "config": config,
                "summary": summary,
                "turns": result["turns"],
                "step_fields": list(STEP_FIELDS),
                "steps": [[round(s[0], 6), *s[1:4], round(s[4], 6), s[5]] for s in result["steps"]],
            }
        )
    meta = {
        "model": args.model,
        "threads": args.threads,
        "conversations": len(conversations),
        "turns": sum(len(c.turns) for c in conversations),
        "session_rate_per_s": args.session_rate,
        "think_mean_s": args.think_mean,
        "max_chars": args.max_chars,
        "max_output": args.max_output,
        "peak_live_kv_blocks": live_kv["peak_blocks"],
        "mean_live_kv_blocks": round(live_kv["mean_blocks"], 1),
        "max_live_sessions": live_kv["max_live_sessions"],
        "final_session_kv_blocks": live_kv["final_session_blocks"],
        "largest_turn_blocks": live_kv["largest_turn_blocks"],
        "device_frac_requested": args.device_frac,
        "host_frac_requested": args.host_frac,
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in sizing.items()},
        "resident_blocks": runs[0]["config"]["num_kv_blocks"],
        "step_cost_model": step_model,
        "cpu_step_cost_model": cpu_model,
        "git": _git_describe(),
        "acceptance": _acceptance(runs),
        **({"note": args.note} if args.note else {}),
        "command": "cadenza bench replay "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("func", "command", "bench_command", "note") and v is not None
        ),
    }
    results = {"meta": meta, "notes": _notes(meta, runs), "tables": TABLES, "runs": runs}
    paths = write_replay_report(results, args.out_dir, args.name)
    print(f"[replay] wrote {', '.join(str(p) for p in paths.values())}")
    return 0
