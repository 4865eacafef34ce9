"""The HTTP load generator of ``cadenza bench serve``: multi-turn chat sessions over asyncio.

One *trial* replays a session plan (Poisson session starts, exponential think times; see
:mod:`cadenza.bench.workloads`) against one server at one session rate:

* every turn is a streaming ``/v1/chat/completions`` request; the client records when it was
  sent, when the first content arrived (TTFT), when the last did, and the ``usage`` block;
* ``mode="session"`` sends an ``X-Session-Id`` header and only the new user message (the server
  keeps the history); ``mode="stateless"`` resends the whole conversation every turn;
* with ``hint_lead_s`` (session mode only) the client posts ``/v1/sessions/{id}/hint`` that many
  seconds before each follow-up turn, as an agent framework that knows its tool call is about to
  return would; at the end of a session it sends ``DELETE /v1/sessions/{id}``;
* optional per-session :class:`HintSchedule` s (``cadenza bench cluster``) leave some follow-ups
  unhinted (*missing* hints) and send a *false* hint after a session's last turn: that user
  started typing and walked away, so the session is not deleted and the hint expires unused;
  each turn records the worker that served it (the ``X-Cadenza-Worker`` response header);
* sessions start only in ``[0, duration_s)`` and no turn is sent after ``duration_s``. At
  ``duration_s + grace_s`` whatever is still outstanding is cancelled. A turn cancelled before its
  first token counts as *censored* with TTFT = how long it had waited; ``grace_s`` is at least
  twice the SLO, so such a turn always violates it. Failed and rejected (HTTP 429) turns count
  as TTFT = infinity: an overloaded server cannot pass the SLO by refusing work.

Time per output token (TPOT) of a turn is ``(last token time - first token time) / (n - 1)``
with ``n`` the completion tokens (from ``usage`` when the server reports it, else the number of
content chunks).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from cadenza.bench.replay_report import percentile
from cadenza.bench.workloads import SessionPlan, truncate_text
from cadenza.client.sse import DONE, delta_text, error_message, parse_sse_line

MODES = ("session", "stateless")


@dataclass
class TurnRecord:
    session: str
    turn: int
    sent_s: float  # seconds from the trial start
    status: str = "pending"  # ok | censored | incomplete | error | http_429
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = None
    worker: str | None = None  # the X-Cadenza-Worker response header
    hinted: bool | None = None  # follow-up turns with hints on: whether a hint preceded it
    # internal timing (monotonic), not reported
    _first: float | None = field(default=None, repr=False)
    _last: float | None = field(default=None, repr=False)
    _chunks: int = field(default=0, repr=False)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class TrialConfig:
    base_url: str
    model: str
    mode: str = "session"
    duration_s: float = 60.0
    grace_s: float = 10.0
    max_output: int = 64
    max_chars: int = 600
    hint_lead_s: float = 0.0
    system_prompt: str = "You are a helpful assistant."
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    session_prefix: str = "bench"
    label: str = ""
    # Per session (by index in the plans): which follow-ups go unhinted, and a false hint.
    hint_schedules: Sequence[HintSchedule] | None = None
    hint_ttl_s: float | None = None  # sent with each hint; None: the server's default
    # Started with the sessions on the trial's event loop (given the client and the trial's
    # start time) and cancelled when the trial ends, e.g. to poll the server's load.
    monitor: Callable[[httpx.AsyncClient, float], Coroutine[Any, Any, None]] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.duration_s <= 0 or self.grace_s < 0:
            raise ValueError("duration_s must be > 0 and grace_s >= 0")


@dataclass(frozen=True)
class HintSchedule:
    """One session's deviations from "a hint before every follow-up turn"."""

    unhinted_turns: frozenset[int] = frozenset()  # turn indices sent without a hint
    false_hint_after_s: float | None = None  # after the last reply: a hint no turn follows


class _Progress:
    """One status line on stderr, rewritten at most once a second (no dependency)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled, self.last = label, enabled and sys.stderr.isatty(), 0.0
        self.plain = enabled and not self.enabled
        self.next_plain = 0.0

    def update(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= 1.0):
            self.last = now
            sys.stderr.write(f"\r\x1b[2K{self.label} {text}")
            sys.stderr.flush()
        elif self.plain and (force or now >= self.next_plain):
            self.next_plain = now + 15.0  # not a terminal (a log): a line every 15 s
            print(f"{self.label} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def _stream_turn(
    http: httpx.AsyncClient,
    cfg: TrialConfig,
    record: TurnRecord,
    messages: list[dict[str, str]],
    headers: dict[str, str],
    t0: float,
) -> str:
    """Send one streaming turn, fill ``record``; returns the reply text."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": messages,
        "max_tokens": cfg.max_output,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **cfg.extra_body,
    }
    sent = t0 + record.sent_s
    parts: list[str] = []
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        record.worker = resp.headers.get("x-cadenza-worker")
        if resp.status_code != 200:
            await resp.aread()
            record.status = "http_429" if resp.status_code == 429 else "error"
            record.error = f"HTTP {resp.status_code}: {error_message(resp.content)}"
            return ""
        async for line in resp.aiter_lines():
            event = parse_sse_line(line)
            if event is None:
                continue
            if event == DONE:
                break
            assert isinstance(event, dict)
            if "error" in event:
                record.status = "error"
                record.error = error_message(str(event))[:300]
                return ""
            text = delta_text(event)
            if text:
                now = time.monotonic()
                if record._first is None:
                    record._first = now
                    record.ttft_s = now - sent
                record._last = now
                record._chunks += 1
                parts.append(text)
            usage = event.get("usage")
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens")
                record.output_tokens = int(usage.get("completion_tokens") or 0)
                details = usage.get("prompt_tokens_details") or {}
                cached = details.get("cached_tokens")
                record.cached_tokens = int(cached) if cached is not None else None
    end = time.monotonic()
    record.e2e_s = end - sent
    if not record.output_tokens:
        record.output_tokens = record._chunks
    if record._first is None:
        # A stream that ends without a single token is a failed turn, not a fast one.
        record.status, record.error = "error", "the reply stream ended without any content"
        return ""
    if record._first is not None and record._last is not None and record.output_tokens > 1:
        record.tpot_s = (record._last - record._first) / (record.output_tokens - 1)
    record.status = "ok"
    return "".join(parts)


async def _session(
    http: httpx.AsyncClient,
    cfg: TrialConfig,
    plan: SessionPlan,
    index: int,
    t0: float,
    records: list[TurnRecord],
    background: set[asyncio.Task],
    hints_sent: list[str],
) -> None:
    sid = f"{cfg.session_prefix}-{index}"
    schedule = cfg.hint_schedules[index] if cfg.hint_schedules is not None else HintSchedule()
    hints_on = cfg.mode == "session" and cfg.hint_lead_s > 0
    abandoned = False  # a false hint was sent: the session is left open, not deleted
    headers = {"X-Session-Id": sid} if cfg.mode == "session" else {}
    history: list[dict[str, str]] = []
    if cfg.system_prompt:
        history.append({"role": "system", "content": cfg.system_prompt})
    sent_upto = 0  # messages of `history` the server already holds (session mode)
    await asyncio.sleep(max(0.0, t0 + plan.start_s - time.monotonic()))
    turns = plan.conversation.turns
    try:
        for i, turn in enumerate(turns):
            now = time.monotonic() - t0
            if now >= cfg.duration_s:
                break
            history.append({"role": "user", "content": truncate_text(turn.user, cfg.max_chars)})
            messages = history[sent_upto:] if cfg.mode == "session" else history
            record = TurnRecord(session=sid, turn=i, sent_s=now)
            if hints_on and i > 0:
                record.hinted = i not in schedule.unhinted_turns
            records.append(record)
            try:
                reply = await _stream_turn(http, cfg, record, list(messages), headers, t0)
            except (httpx.HTTPError, ValueError) as exc:
                record.status, record.error = "error", f"{type(exc).__name__}: {exc}"[:300]
                break
            if record.status != "ok":
                break  # a rejected turn ends the session (its history would diverge)
            history.append({"role": "assistant", "content": reply})
            sent_upto = len(history)
            if i + 1 == len(turns):
                if hints_on and schedule.false_hint_after_s is not None:
                    await asyncio.sleep(schedule.false_hint_after_s)
                    if time.monotonic() - t0 < cfg.duration_s:
                        _spawn_hint(http, cfg, sid, background)
                        hints_sent.append("false")
                        abandoned = True
                break
            think = plan.think_s[i]
            lead = min(cfg.hint_lead_s, think)
            if hints_on and i + 1 not in schedule.unhinted_turns:
                await asyncio.sleep(think - lead)
                if time.monotonic() - t0 + lead >= cfg.duration_s:
                    break
                _spawn_hint(http, cfg, sid, background, lead)
                hints_sent.append("true")
                await asyncio.sleep(lead)
            else:
                await asyncio.sleep(think)
    finally:
        if cfg.mode == "session" and sent_upto and not abandoned:
            task = asyncio.ensure_future(_delete_quietly(http, f"/v1/sessions/{sid}"))
            background.add(task)
            task.add_done_callback(background.discard)


def _spawn_hint(
    http: httpx.AsyncClient,
    cfg: TrialConfig,
    sid: str,
    background: set[asyncio.Task],
    lead: float | None = None,
) -> None:
    """Post the session's hint in the background (``lead`` None: as for the configured lead)."""
    lead = cfg.hint_lead_s if lead is None else lead
    body: dict[str, Any] = {"expected_arrival_s": lead}
    if cfg.hint_ttl_s is not None:
        body["ttl_s"] = cfg.hint_ttl_s
    task = asyncio.ensure_future(_post_quietly(http, f"/v1/sessions/{sid}/hint", body))
    background.add(task)
    task.add_done_callback(background.discard)


async def _post_quietly(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await http.post(path, json=body)


async def _delete_quietly(http: httpx.AsyncClient, path: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await http.delete(path)


def _finalize(records: Sequence[TurnRecord], deadline: float, t0: float) -> None:
    """Records still pending at the deadline: censored (no first token) or incomplete."""
    for r in records:
        if r.status != "pending":
            continue
        if r._first is None:
            r.status = "censored"
            r.ttft_s = deadline - (t0 + r.sent_s)
        else:
            r.status = "incomplete"
            if r._last is not None and r._chunks > 1:
                r.output_tokens = max(r.output_tokens, r._chunks)
                r.tpot_s = (r._last - r._first) / (r._chunks - 1)


async def run_trial_async(
    cfg: TrialConfig,
    plans: Sequence[SessionPlan],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Replay ``plans`` (those starting before ``duration_s``) against the server."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(None, connect=10.0)
    records: list[TurnRecord] = []
    background: set[asyncio.Task] = set()
    active = [p for p in plans if p.start_s < cfg.duration_s]
    bar = _Progress(cfg.label or cfg.mode, progress)
    async with httpx.AsyncClient(
        base_url=cfg.base_url, headers=headers, limits=limits, timeout=timeout
    ) as http:
        t0 = time.monotonic()
        hints_sent: list[str] = []
        tasks = [
            asyncio.ensure_future(_session(http, cfg, p, i, t0, records, background, hints_sent))
            for i, p in enumerate(active)
        ]
        monitor = asyncio.ensure_future(cfg.monitor(http, t0)) if cfg.monitor else None
        deadline = t0 + cfg.duration_s + cfg.grace_s
        pending = set(tasks)
        while pending:
            timeout_left = deadline - time.monotonic()
            if timeout_left <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(1.0, timeout_left))
            done = sum(r.status == "ok" for r in records)
            ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
            p90 = f"{percentile(ttfts, 90):.2f}s" if ttfts else "—"
            bar.update(
                f"t={time.monotonic() - t0:5.1f}/{cfg.duration_s:.0f}s "
                f"sessions ended={len(active) - len(pending)}/{len(active)} turns done={done} "
                f"in-flight={sum(r.status == 'pending' for r in records)} p90 TTFT={p90}"
            )
        end = time.monotonic()
        for task in pending:
            task.cancel()
        if monitor is not None:
            monitor.cancel()
        await asyncio.gather(*tasks, *([monitor] if monitor else []), return_exceptions=True)
        _finalize(records, min(end, deadline), t0)
        if background:
            await asyncio.wait(background, timeout=5.0)
        bar.update("done", force=True)
        bar.close()
    elapsed = min(end, deadline) - t0
    raw: dict[str, Any] = {
        "sessions": len(active),
        "elapsed_s": elapsed,
        "turns": [r.public() for r in records],
    }
    if cfg.hint_schedules is not None:
        raw["hints_sent"] = {"true": hints_sent.count("true"), "false": hints_sent.count("false")}
    return raw


def run_trial(
    cfg: TrialConfig, plans: Sequence[SessionPlan], *, progress: bool = True
) -> dict[str, Any]:
    """:func:`run_trial_async` with its own event loop; adds the summary."""
    raw = asyncio.run(run_trial_async(cfg, plans, progress=progress))
    raw["summary"] = summarize_trial(
        raw["turns"], raw["elapsed_s"], raw["sessions"], max_output=cfg.max_output
    )
    return raw


# ---------------------------------------------------------------------------------- summary


def _pcts(values: Sequence[float], prefix: str) -> dict[str, float]:
    if not values:
        return {f"{prefix}_p{q}_s": math.nan for q in (50, 90, 99)}
    return {f"{prefix}_p{q}_s": percentile(values, q) for q in (50, 90, 99)}


def summarize_trial(
    turns: Sequence[dict[str, Any]], elapsed_s: float, sessions: int, max_output: int = 0
) -> dict[str, Any]:
    """The per-trial numbers of the report (see the module docstring for the TTFT rules)."""
    statuses = [t["status"] for t in turns]
    ok = [t for t in turns if t["status"] == "ok"]
    # TTFT over every turn sent: failures and rejections as +inf, censored as their wait.
    ttfts = [
        math.inf if t["status"] in ("error", "http_429") else float(t["ttft_s"])
        for t in turns
        if t["status"] in ("error", "http_429") or t.get("ttft_s") is not None
    ]
    tpots = [float(t["tpot_s"]) for t in turns if t.get("tpot_s") is not None]
    output = sum(int(t.get("output_tokens") or 0) for t in turns)
    with_usage = [t for t in ok if t.get("prompt_tokens") and t.get("cached_tokens") is not None]
    prompt = sum(int(t["prompt_tokens"]) for t in with_usage)
    cached = sum(int(t["cached_tokens"]) for t in with_usage)
    elapsed = max(elapsed_s, 1e-9)
    summary: dict[str, Any] = {
        "sessions": sessions,
        "turns_sent": len(turns),
        "turns_completed": len(ok),
        "turns_censored": statuses.count("censored"),
        "turns_incomplete": statuses.count("incomplete"),
        "turns_short": sum(
            1 for t in ok if max_output and int(t.get("output_tokens") or 0) < max_output
        ),
        "errors": statuses.count("error"),
        "http_429": statuses.count("http_429"),
        **_pcts(ttfts, "ttft"),
        **_pcts(tpots, "tpot"),
        "output_tok_per_s": output / elapsed,
        "turns_per_s": len(ok) / elapsed,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "cached_fraction": (cached / prompt) if prompt else math.nan,
        "mean_prompt_tokens": (prompt / len(with_usage)) if with_usage else math.nan,
        "elapsed_s": elapsed_s,
    }
    return summary


def meets_slo(
    summary: dict[str, Any],
    slo_ttft_s: float,
    *,
    min_completed: float = 0.9,
    slo_tpot_s: float | None = None,
    min_turns: int = 1,
) -> bool:
    """Whether a trial sustained its rate: p90 TTFT within ``slo_ttft_s`` (failures and
    rejections count as misses), at least ``min_completed`` of the turns sent finished before
    the trial's deadline (a server that starts every reply at once but cannot finish them is
    not keeping up), and, if given, p90 TPOT within ``slo_tpot_s``."""
    p90 = summary.get("ttft_p90_s")
    sent = summary.get("turns_sent", 0)
    if sent < min_turns or p90 is None or not math.isfinite(p90) or p90 > slo_ttft_s:
        return False
    if summary.get("turns_completed", 0) < min_completed * sent:
        return False
    if slo_tpot_s is not None:
        tpot = summary.get("tpot_p90_s")
        if tpot is None or not math.isfinite(tpot) or tpot > slo_tpot_s:
            return False
    return True


# ------------------------------------------------------------------------------ rate search


def search_rate(
    passes: Callable[[float], bool],
    *,
    start: float,
    max_trials: int = 5,
    min_rate: float = 1e-3,
    max_rate: float = 1e3,
    precision: float = 1.2,
    growth: float = 2.0,
) -> tuple[float, list[tuple[float, bool]]]:
    """The highest rate found with ``passes(rate)`` true, within ``max_trials`` calls.

    From ``start``, the rate is multiplied by ``growth`` while it passes (divided while it
    fails; ``growth=2`` is doubling) until the pass/fail boundary is bracketed, then bisected
    on the geometric mean until the bracket is within a factor ``precision`` or the trials run
    out. Returns ``(best passing rate or 0.0, history of (rate, passed))``. Assumes ``passes``
    is (noisily) monotone: true below some rate.
    """
    if not (start > 0 and max_trials >= 1 and precision > 1 and growth > 1):
        raise ValueError("need start > 0, max_trials >= 1, precision > 1 and growth > 1")
    history: list[tuple[float, bool]] = []
    lo: float | None = None  # highest passing rate
    hi: float | None = None  # lowest failing rate
    rate = min(max(start, min_rate), max_rate)
    while len(history) < max_trials:
        ok = passes(rate)
        history.append((rate, ok))
        if ok:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if lo is not None and hi is not None:
            if hi / lo <= precision:
                break
            rate = math.sqrt(lo * hi)
        elif lo is not None:
            if lo >= max_rate:
                break
            rate = min(lo * growth, max_rate)
        else:
            assert hi is not None
            if hi <= min_rate:
                break
            rate = max(hi / growth, min_rate)
    return (lo or 0.0), history
