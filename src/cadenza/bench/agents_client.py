"""The HTTP client of ``cadenza bench agents``: agent programs, closed loop, over asyncio.

``concurrency`` programs run at once; when one ends the next starts (in trace order), so the
KV the server must keep live is about ``concurrency`` programs' contexts whatever the mode. A
program's step waits its ``think_s``, sends one streaming request, and after the reply waits the
step's ``tool_s`` (the tool runs; the KV waits) before the next step, whose new input is the
tool's observation. Every reply has exactly its trace length (``ignore_eos`` and the token
limit), so every mode generates the same tokens.

Two APIs:

* ``responses`` (session mode): ``POST /v1/responses``, ``store: true``, chained with
  ``previous_response_id``; each step sends only its new input as a user message (and the same
  ``instructions`` every step, recorded once in the history). The server keeps the tokens and
  their KV on its tiers between steps.
* ``chat`` (resent history): ``POST /v1/chat/completions`` with the whole conversation every
  step (system prompt, every input and reply), as a stateless agent framework sends it.

Per step the client records TTFT (to the first text), the time to the last text, the time to
the end of the stream (after the server's post-processing: a stored response is written before
its final event), the usage block (prompt, cached tokens, and, for responses, the cached tokens
by tier). A program's job completion time runs from its first request to its last reply. At
``timeout_s`` whatever is outstanding is cancelled: a step without a first token is *censored*
with TTFT = how long it had waited; its program is unfinished.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from cadenza.bench.agents_workload import Program
from cadenza.client.sse import DONE, delta_text, error_message, parse_sse_line

APIS = ("responses", "chat")


@dataclass
class StepRecord:
    program: str
    step: int
    sent_s: float  # from the trial start
    status: str = "pending"  # ok | error | censored | incomplete
    ttft_s: float | None = None
    last_token_s: float | None = None  # send -> last text
    done_s: float | None = None  # send -> end of the stream
    output_tokens: int = 0
    target_output_tokens: int = 0  # the trace's reply length
    prompt_tokens: int | None = None
    expected_prompt_tokens: int = 0  # the trace's content tokens (no template)
    cached_tokens: int | None = None
    cached_by_tier: dict[str, int] | None = None
    error: str | None = None
    _sent: float = field(default=0.0, repr=False)
    _first: float | None = field(default=None, repr=False)
    _last: float | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class JobRecord:
    program: str
    steps: int
    start_s: float | None = None
    end_s: float | None = None
    steps_done: int = 0
    status: str = "not_started"  # not_started | running | finished | failed

    @property
    def jct_s(self) -> float | None:
        if self.start_s is None or self.end_s is None:
            return None
        return self.end_s - self.start_s

    def public(self) -> dict[str, Any]:
        return {**asdict(self), "jct_s": self.jct_s}


@dataclass
class AgentTrialConfig:
    base_url: str
    model: str
    api: str
    concurrency: int = 4
    timeout_s: float = 600.0
    label: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.concurrency < 1 or self.timeout_s <= 0:
            raise ValueError("concurrency must be >= 1 and timeout_s > 0")


def _request(
    cfg: AgentTrialConfig,
    program: Program,
    step_index: int,
    history: list[dict[str, str]],
    previous_id: str | None,
) -> tuple[str, dict[str, Any]]:
    """The path and body of one step's request."""
    step = program.steps[step_index]
    if cfg.api == "responses":
        body: dict[str, Any] = {
            "model": cfg.model,
            "input": [{"role": "user", "content": step.input_text}],
            "store": True,
            "stream": True,
            "max_output_tokens": step.output_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        if program.system_text:
            body["instructions"] = program.system_text
        if previous_id is not None:
            body["previous_response_id"] = previous_id
        return "/v1/responses", body
    return "/v1/chat/completions", {
        "model": cfg.model,
        "messages": list(history),
        "max_tokens": step.output_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _on_text(record: StepRecord, text: str) -> None:
    if not text:
        return
    now = time.monotonic()
    if record._first is None:
        record._first = now
        record.ttft_s = now - record._sent
    record._last = now


def _read_usage(record: StepRecord, usage: dict[str, Any]) -> None:
    if "input_tokens" in usage:  # Responses
        record.prompt_tokens = usage.get("input_tokens")
        record.output_tokens = int(usage.get("output_tokens") or 0)
        details = usage.get("input_tokens_details") or {}
        tiers = details.get("cached_tokens_by_tier")
        record.cached_by_tier = {str(k): int(v) for k, v in tiers.items()} if tiers else {}
    else:  # chat completions
        record.prompt_tokens = usage.get("prompt_tokens")
        record.output_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    record.cached_tokens = int(cached) if cached is not None else None


def _on_event(record: StepRecord, event: dict[str, Any], parts: list[str]) -> str | None:
    """Fold one SSE payload into ``record``; returns a response id when the response ends."""
    kind = event.get("type")
    if kind is None:  # a chat.completion.chunk
        if "error" in event:
            raise _StepFailed(error_message(str(event)))
        text = delta_text(event)
        _on_text(record, text)
        parts.append(text)
        if event.get("usage"):
            _read_usage(record, event["usage"])
        return None
    if kind == "response.output_text.delta":
        text = str(event.get("delta") or "")
        _on_text(record, text)
        parts.append(text)
    elif kind in ("response.completed", "response.incomplete"):
        response = event.get("response") or {}
        _read_usage(record, response.get("usage") or {})
        return str(response.get("id"))
    elif kind in ("response.failed", "error"):
        raise _StepFailed(error_message(str(event))[:300])
    return None


class _StepFailed(Exception):
    pass


async def _send_step(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], record: StepRecord
) -> tuple[str, str | None]:
    """Stream one step; fills ``record``; returns the reply text and the response id."""
    parts: list[str] = []
    response_id = None
    async with http.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise _StepFailed(f"HTTP {resp.status_code}: {error_message(resp.content)}")
        async for line in resp.aiter_lines():
            event = parse_sse_line(line)
            if event is None:
                continue
            if event == DONE:
                break
            assert isinstance(event, dict)
            response_id = _on_event(record, event, parts) or response_id
    end = time.monotonic()
    record.done_s = end - record._sent
    if record._first is None or record._last is None:
        raise _StepFailed("the reply stream ended without any text")
    record.last_token_s = record._last - record._sent
    return "".join(parts), response_id


async def _run_program(
    http: httpx.AsyncClient,
    cfg: AgentTrialConfig,
    program: Program,
    job: JobRecord,
    t0: float,
    records: list[StepRecord],
) -> None:
    history: list[dict[str, str]] = []
    if program.system_text:
        history.append({"role": "system", "content": program.system_text})
    previous_id: str | None = None
    context = program.system_tokens
    job.status = "running"
    for k, step in enumerate(program.steps):
        if step.think_s > 0:
            await asyncio.sleep(step.think_s)
        history.append({"role": "user", "content": step.input_text})
        path, body = _request(cfg, program, k, history, previous_id)
        now = time.monotonic()
        record = StepRecord(program.program_id, k, now - t0, _sent=now)
        record.expected_prompt_tokens = context + step.input_tokens
        record.target_output_tokens = step.output_tokens
        if job.start_s is None:
            job.start_s = record.sent_s
        records.append(record)
        try:
            reply, previous_id = await _send_step(http, path, body, record)
        except (_StepFailed, httpx.HTTPError, ValueError) as exc:
            record.status, record.error = "error", f"{type(exc).__name__}: {exc}"[:300]
            job.status = "failed"
            return
        record.status = "ok"
        history.append({"role": "assistant", "content": reply})
        context += step.input_tokens + step.output_tokens
        job.steps_done += 1
        if k + 1 == len(program.steps):
            job.end_s = time.monotonic() - t0
            job.status = "finished"
            return
        if cfg.api == "responses" and previous_id is None:
            record.status, record.error = "error", "no response id in the final event"
            job.status = "failed"
            return
        await asyncio.sleep(step.tool_s)


def _finalize(records: Sequence[StepRecord], deadline: float) -> None:
    """Steps still pending at the deadline: censored (no first token) or incomplete."""
    for r in records:
        if r.status != "pending":
            continue
        if r._first is None:
            r.status = "censored"
            r.ttft_s = deadline - r._sent
        else:
            r.status = "incomplete"


async def run_agents_async(cfg: AgentTrialConfig, programs: Sequence[Program]) -> dict[str, Any]:
    """Run ``programs`` closed loop against the server; the raw records of the trial."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    timeout = httpx.Timeout(None, connect=10.0)
    records: list[StepRecord] = []
    jobs = [JobRecord(p.program_id, len(p.steps)) for p in programs]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(programs)):
        queue.put_nowait(i)
    async with httpx.AsyncClient(base_url=cfg.base_url, limits=limits, timeout=timeout) as http:
        t0 = time.monotonic()

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                await _run_program(http, cfg, programs[i], jobs[i], t0, records)

        tasks = [asyncio.ensure_future(worker()) for _ in range(cfg.concurrency)]
        deadline = t0 + cfg.timeout_s
        pending = set(tasks)
        last_note = 0.0
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(1.0, left))
            if cfg.progress and time.monotonic() - last_note >= 15.0:
                last_note = time.monotonic()
                finished = sum(j.status == "finished" for j in jobs)
                done = sum(r.status == "ok" for r in records)
                print(
                    f"{cfg.label} t={last_note - t0:5.0f}s jobs finished={finished}/{len(jobs)} "
                    f"steps done={done}",
                    file=sys.stderr,
                    flush=True,
                )
        end = min(time.monotonic(), deadline)
        for task in pending:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        _finalize(records, end)
        for outcome in outcomes:  # a bug in the client, not a failed step: say so
            if isinstance(outcome, Exception):
                raise outcome
    return {
        "elapsed_s": end - t0,
        "steps": [r.public() for r in records],
        "jobs": [j.public() for j in jobs],
    }


def run_agents(cfg: AgentTrialConfig, programs: Sequence[Program]) -> dict[str, Any]:
    """:func:`run_agents_async` on its own event loop."""
    return asyncio.run(run_agents_async(cfg, programs))
