"""One client request as the router sees it: where it runs, what it has streamed so far.

A request may run on several workers over its life: a live migration or a worker failure
resubmits it elsewhere with the tokens already generated (``resume_token_ids``), and the new
worker continues the same output. The stream keeps what the client has been sent so each
output it passes on is cumulative and its deltas are exactly what is new to the client, no
matter which worker produced it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from cadenza.engine_api import EngineRequest
from cadenza.outputs import RequestOutput


@dataclass
class ClusterStream:
    request: EngineRequest
    prompt_token_ids: tuple[int, ...]
    arrival: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    worker_id: str | None = None
    reason: str = ""
    sent_text: str = ""
    sent_tokens: int = 0
    output_token_ids: tuple[int, ...] = ()
    logprobs: list | None = None
    first_token_at: float | None = None
    num_cached_tokens: int | None = None
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    migrated_tokens: int = 0  # of the cached tokens, how many a migration brought
    num_moves: int = 0  # resubmissions (migrations and failovers)
    stopped_at: float | None = None  # stop-and-copy began (live migration downtime)
    downtimes: list[float] = field(default_factory=list)
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def resubmission(self, output_token_ids: tuple[int, ...] | None = None) -> EngineRequest:
        """The request to run elsewhere: the prompt as ids plus the output so far."""
        tokens = self.output_token_ids if output_token_ids is None else output_token_ids
        return replace(
            self.request,
            prompt=self.prompt_token_ids,
            resume_token_ids=tuple(tokens),
            arrival_time=None,
        )

    def merge(self, output: RequestOutput, now: float) -> RequestOutput:
        """The worker's output as the client must see it: cumulative, with the deltas computed
        against what was already sent, the first admission's cache facts, and latencies from
        the router's arrival."""
        completion = output.outputs[0]
        tokens = tuple(completion.token_ids)
        text = completion.text
        if text.startswith(self.sent_text):
            delta_text = text[len(self.sent_text) :]
        else:  # a resumed worker re-decoded a boundary differently; never resend text
            delta_text = completion.delta_text
            text = self.sent_text + delta_text
        delta_tokens = list(tokens[self.sent_tokens :])
        if self.num_moves and completion.logprobs is not None and self.logprobs is not None:
            # A resumed worker reports logprobs only for what it sampled.
            fresh = completion.logprobs[len(completion.logprobs) - len(delta_tokens) :]
            logprobs = list(self.logprobs) + list(fresh)
        else:
            logprobs = completion.logprobs
        if self.num_cached_tokens is None:
            self.num_cached_tokens = output.num_cached_tokens
            self.cached_by_tier = dict(output.cached_tokens_by_tier)
        if self.first_token_at is None and tokens:
            self.first_token_at = now
        if self.stopped_at is not None and delta_tokens:
            self.downtimes.append(now - self.stopped_at)
            self.stopped_at = None
        metrics = dict(output.metrics)
        if self.first_token_at is not None:
            metrics["ttft_s"] = self.first_token_at - self.arrival
        if output.finished:
            metrics["e2e_s"] = now - self.arrival
            self.finished = True
        self.sent_text = text
        self.sent_tokens = len(tokens)
        self.output_token_ids = tokens
        self.logprobs = logprobs
        merged = replace(
            completion,
            text=text,
            token_ids=list(tokens),
            logprobs=logprobs,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
        )
        return replace(
            output,
            prompt=self.request.prompt if isinstance(self.request.prompt, str) else output.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[merged],
            num_cached_tokens=self.num_cached_tokens,
            cached_tokens_by_tier=dict(self.cached_by_tier),
            metrics=metrics,
        )
