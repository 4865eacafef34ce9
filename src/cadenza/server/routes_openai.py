"""``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``.

A chat completion runs one of two ways:

* with a session (``X-Session-Id`` header or ``session_id`` field) it is the session's next
  turn: the stored exact token history plus the template delta of the new messages. A client
  may send only the new messages, or resend the whole conversation — messages that match the
  stored transcript are recognised and skipped;
* without one, the whole conversation is the prompt, with every reply this server generated
  spliced back in as its exact token ids, so the prefix cache still matches.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cadenza.core.sampling_params import SamplingParams
from cadenza.engine import LLMEngine
from cadenza.outputs import RequestOutput
from cadenza.server import openai_format as fmt
from cadenza.server.chat_prompt import conversation_token_ids
from cadenza.server.errors import APIError
from cadenza.server.protocol import ChatCompletionRequest, CompletionRequest
from cadenza.server.state import ServerState, get_state, scoped_session, tenant_of
from cadenza.session.store import TenantMismatchError, TurnInProgressError

router = APIRouter()

Submit = Callable[[LLMEngine, str], Any]


@router.get("/v1/models")
async def list_models(request: Request, _: str = Depends(tenant_of)) -> dict[str, Any]:
    state = get_state(request)
    names = [state.model_name, *sorted(state.aliases - {state.model_name})]
    data = [
        {"id": name, "object": "model", "created": state.created, "owned_by": "cadenza"}
        for name in names
    ]
    return {"object": "list", "data": data}


async def start_stream(
    state: ServerState, submit: Submit, request_id: str
) -> tuple[RequestOutput | None, AsyncIterator[RequestOutput]]:
    """Queue the request and wait for its first output, so that a rejection (bad input, full
    queue, busy session) becomes an HTTP error before any streaming response has begun."""
    stream = state.engine.generate(submit, request_id)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except TurnInProgressError as exc:
        raise APIError(409, str(exc), param="session_id", code="session_busy") from None
    except TenantMismatchError:
        raise APIError(404, "no such session for this API key", param="session_id") from None
    return first, stream


async def collect(
    request: Request, first: RequestOutput | None, stream: AsyncIterator[RequestOutput]
) -> RequestOutput:
    """The final output; aborts the request if the client disconnects while waiting."""
    final = first
    if final is not None and final.finished:
        return final

    async def drain() -> RequestOutput | None:
        last = final
        async for output in stream:
            last = output
        return last

    task = asyncio.ensure_future(drain())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()  # type: ignore[attr-defined]
            raise APIError(499, "client disconnected")
    result = task.result()
    if result is None:
        raise RuntimeError("the request ended without output")
    return result


def _session_new_messages(
    engine: LLMEngine, session_id: str, messages: list[dict[str, Any]], tenant: str
) -> list[dict[str, Any]]:
    """Drop the leading messages that repeat the session's stored transcript."""
    if engine.store.get_session(session_id, tenant=tenant) is None:
        return messages
    stored = engine.store.messages(session_id)
    same = len(stored) <= len(messages) and all(
        a.get("role") == b.get("role") and a.get("content") == b.get("content")
        for a, b in zip(stored, messages, strict=False)
    )
    new = messages[len(stored) :] if stored and same else messages
    if not new:
        raise ValueError("the session already holds every message sent; send a new message")
    return new


def chat_submit(
    state: ServerState,
    body: ChatCompletionRequest,
    params: SamplingParams,
    session_id: str | None,
    tenant: str,
) -> Submit:
    messages = [m.as_template_message() for m in body.messages]
    retention = body.retention.model_dump() if body.retention else None
    if session_id is not None:
        sid = scoped_session(tenant, session_id)

        def submit_turn(engine: LLMEngine, request_id: str) -> None:
            new = _session_new_messages(engine, sid, messages, tenant)
            engine.add_turn(
                sid, new, params, request_id=request_id, tenant=tenant, retention=retention
            )

        return submit_turn

    def submit_plain(engine: LLMEngine, request_id: str) -> None:
        prompt = conversation_token_ids(engine.sessions, messages, state.memory, tenant)
        engine.add_request(request_id, prompt, params, cache_salt=tenant or None)

    return submit_plain


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    params = body.to_sampling_params()
    session_id = request.headers.get("x-session-id") or body.session_id
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    submit = chat_submit(state, body, params, session_id, tenant)
    first, stream = await start_stream(state, submit, request_id)
    top_n = body.top_logprobs or 0
    if not body.stream:
        final = await collect(request, first, stream)
        _remember(state, tenant, final)
        return JSONResponse(fmt.chat_completion(request_id, body.model, final, top_n, session_id))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        created = int(time.time())
        yield fmt.sse(
            fmt.chat_chunk(request_id, body.model, created, {"role": "assistant", "content": ""})
        )
        sent = 0
        final = None
        outputs = _chain(first, stream)
        async for output in outputs:
            completion = output.outputs[0]
            logprobs = fmt.chat_logprobs(completion, sent, top_n) if body.logprobs else None
            sent = len(completion.token_ids)
            if completion.delta_text or logprobs:
                delta = {"content": completion.delta_text}
                yield fmt.sse(
                    fmt.chat_chunk(request_id, body.model, created, delta, logprobs=logprobs)
                )
            final = output
        if final is None:
            return
        _remember(state, tenant, final)
        reason = final.outputs[0].finish_reason
        yield fmt.sse(fmt.chat_chunk(request_id, body.model, created, {}, reason))
        if include_usage:
            chunk = fmt.chat_chunk(request_id, body.model, created, {})
            chunk["choices"] = []
            chunk["usage"] = fmt.usage(final)
            yield fmt.sse(chunk)
        yield fmt.sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=_sse_headers())


def _sse_headers() -> dict[str, str]:
    return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _chain(
    first: RequestOutput | None, stream: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    try:
        if first is not None:
            yield first
            if first.finished:
                return
        async for output in stream:
            yield output
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


def _remember(state: ServerState, tenant: str, final: RequestOutput) -> None:
    completion = final.outputs[0]
    if final.session_id is None:
        state.memory.remember(tenant, completion.text, completion.token_ids)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompt: str | list[int]
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
        if len(body.prompt) != 1:
            raise APIError(400, "send one prompt per request (n=1)", param="prompt")
        prompt = str(body.prompt[0])
    else:
        prompt = body.prompt  # type: ignore[assignment]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    params = body.to_sampling_params()
    request_id = f"cmpl-{uuid.uuid4().hex}"

    def submit(engine: LLMEngine, rid: str) -> None:
        engine.add_request(rid, prompt, params, cache_salt=tenant or None)

    first, stream = await start_stream(state, submit, request_id)
    echo = prompt if body.echo and isinstance(prompt, str) else ""
    if not body.stream:
        final = await collect(request, first, stream)
        text = echo + final.outputs[0].text
        return JSONResponse(fmt.text_completion(request_id, body.model, final, text))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        created = int(time.time())
        sent = 0
        final = None
        if echo:
            yield fmt.sse(_completion_chunk(request_id, body.model, created, echo, None, None))
        async for output in _chain(first, stream):
            completion = output.outputs[0]
            logprobs = (
                fmt.completion_logprobs(completion, sent) if body.logprobs is not None else None
            )
            sent = len(completion.token_ids)
            if completion.delta_text or completion.finish_reason:
                yield fmt.sse(
                    _completion_chunk(
                        request_id,
                        body.model,
                        created,
                        completion.delta_text,
                        completion.finish_reason,
                        logprobs,
                    )
                )
            final = output
        if final is not None and include_usage:
            yield fmt.sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [],
                    "usage": fmt.usage(final),
                }
            )
        yield fmt.sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=_sse_headers())


def _completion_chunk(
    request_id: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str | None,
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
