"""Turns sampled tokens into text, logprobs and stop-string decisions for each request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cadenza.core.request import Request, RequestStatus
from cadenza.model.detokenizer import IncrementalDetokenizer
from cadenza.model.tokenizer import Tokenizer
from cadenza.outputs import CompletionOutput, Logprob, RequestOutput, SampleLogprobs


@dataclass
class RequestState:
    """Per-request text state kept beside the scheduler's ``Request``."""

    request: Request
    prompt: str | None
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    emitted_text: int = 0  # characters of ``text`` already streamed
    emitted_tokens: int = 0
    first_token_time: float | None = None
    stop_string: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, clock: Callable[[], float]) -> None:
        self.tokenizer = tokenizer
        self.clock = clock
        self.states: dict[str, RequestState] = {}

    def add(self, request: Request, prompt: str | None, arrival_time: float) -> None:
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer,
                request.prompt_token_ids,
                skip_special_tokens=request.sampling_params.skip_special_tokens,
            )
        wants_logprobs = request.sampling_params.logprobs is not None
        state = RequestState(request, prompt, detok, arrival_time, [] if wants_logprobs else None)
        if request.output_token_ids:  # resumed: that output was streamed by another engine
            if detok is not None:
                state.text = detok.push(list(request.output_token_ids))
            state.emitted_text = len(state.text)
            state.emitted_tokens = request.num_output_tokens
        self.states[request.request_id] = state

    def record_token(
        self,
        request: Request,
        logprob: float,
        top: list[tuple[int, float]] | None,
    ) -> str | None:
        """Account for the request's newest token; returns a stop string if one matched."""
        state = self.states[request.request_id]
        token = request.output_token_ids[-1]
        if state.first_token_time is None:
            state.first_token_time = self.clock()
        state.cumulative_logprob += logprob
        if state.logprobs is not None:
            entry = {token: Logprob(logprob, None, self._piece(token))}
            for rank, (tok, lp) in enumerate(top or [], start=1):
                if tok == token:
                    entry[token].rank = rank
                else:
                    entry[tok] = Logprob(lp, rank, self._piece(tok))
            state.logprobs.append(entry)
        if state.detokenizer is None:
            return None
        state.text += state.detokenizer.push([token])
        return self._match_stop(state)

    def _piece(self, token: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _match_stop(self, state: RequestState) -> str | None:
        params = state.request.sampling_params
        if not params.stop or state.request.num_output_tokens < params.min_tokens:
            return None
        window = max(len(s) for s in params.stop) + 16
        search_from = max(0, len(state.text) - window)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            at = state.text.find(stop, search_from)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        state.text = (
            state.text[: at + len(stop)] if params.include_stop_str_in_output else state.text[:at]
        )
        state.stop_string = stop
        return stop

    def make_output(self, request: Request, finished: bool) -> RequestOutput:
        state = self.states[request.request_id]
        params = request.sampling_params
        text = state.text
        # While running, hold back a possible partial stop string from the stream.
        visible = len(text)
        if not finished and params.stop:
            visible = max(state.emitted_text, len(text) - max(len(s) for s in params.stop) + 1)
        delta_text = text[state.emitted_text : visible]
        state.emitted_text = visible
        tokens = list(request.output_token_ids)
        delta_tokens = tokens[state.emitted_tokens :]
        state.emitted_tokens = len(tokens)
        finish_reason = None
        stop_reason = None
        if finished:
            finish_reason = _finish_reason(request.status)
            stop_reason = (
                state.stop_string if state.stop_string is not None else request.stop_reason
            )
            state.metrics["e2e_s"] = self.clock() - state.arrival_time
        if state.first_token_time is not None:
            state.metrics["ttft_s"] = state.first_token_time - state.arrival_time
        completion = CompletionOutput(
            index=0,
            text=text[:visible],
            token_ids=tokens,
            cumulative_logprob=state.cumulative_logprob if state.logprobs is not None else None,
            logprobs=state.logprobs,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
            delta_text=delta_text,
            delta_token_ids=delta_tokens,
        )
        if finished:
            del self.states[request.request_id]
        return RequestOutput(
            request_id=request.request_id,
            prompt=state.prompt,
            prompt_token_ids=list(request.prompt_token_ids),
            outputs=[completion],
            finished=finished,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            metrics=dict(state.metrics),
            cached_tokens_by_tier=dict(request.cached_by_tier),
            num_redundant_tokens=request.num_redundant_tokens,
            session_id=request.session_id,
        )

    def drop(self, request_id: str) -> None:
        self.states.pop(request_id, None)


def _finish_reason(status: RequestStatus) -> str:
    if status == RequestStatus.FINISHED_LENGTH:
        return "length"
    if status == RequestStatus.FINISHED_ABORTED:
        return "abort"
    return "stop"
