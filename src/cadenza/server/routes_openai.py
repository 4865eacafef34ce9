"""``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``.

A chat completion runs one of two ways:

* with a session (``X-Session-Id`` header or ``session_id`` field) it is the session's next
  turn: the stored exact token history plus the template delta of the new messages. A client
  may send only the new messages, or resend the whole conversation — messages that match the
  stored transcript are recognised and skipped;
* without one, the whole conversation is the prompt, with every reply this server generated
  spliced back in as its exact token ids, so the prefix cache still matches.

Tools (``tools``, ``tool_choice``, ``parallel_tool_calls``) are rendered by the chat template
and the reply is parsed for calls in the model's format (``--tool-call-parser``); ``required``
or a named function force a call with a grammar, as ``response_format`` forces JSON.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cadenza.core.sampling_params import SamplingParams
from cadenza.engine_api import EngineRequest
from cadenza.outputs import RequestOutput
from cadenza.server import openai_format as fmt
from cadenza.server.chat_prompt import conversation_token_ids, reply_key
from cadenza.server.engine_stream import chain, collect, sse_headers, start_stream
from cadenza.server.errors import APIError
from cadenza.server.protocol import ChatCompletionRequest, CompletionRequest
from cadenza.server.state import ServerState, get_state, scoped_session, tenant_of
from cadenza.server.tool_requests import chat_response_format, constrained, tool_context
from cadenza.server.tool_retention import retain_through_tool_calls
from cadenza.session.ids import session_id_problem
from cadenza.session.manager import SessionNamespaceError
from cadenza.session.store import TenantMismatchError, TurnInProgressError
from cadenza.tools.parsers import ToolCall
from cadenza.tools.stream import ToolCallStream
from cadenza.tools.template import ToolContext

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, _: str = Depends(tenant_of)) -> dict[str, Any]:
    state = get_state(request)
    names = [state.model_name, *sorted(state.aliases - {state.model_name})]
    data = [
        {"id": name, "object": "model", "created": state.created, "owned_by": "cadenza"}
        for name in names
    ]
    return {"object": "list", "data": data}


def session_id_of(request: Request, field: str | None) -> str | None:
    """The turn's session: the ``X-Session-Id`` header or the body's ``session_id`` (both
    only if they agree). A session id must be usable in ``/v1/sessions/{id}`` afterwards, so
    it has no '/' and no control character."""
    header = request.headers.get("x-session-id")
    if header is not None:
        try:  # HTTP headers arrive as bytes, which Starlette decodes as latin-1
            header = header.encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise APIError(
                400, "the X-Session-Id header is not UTF-8 text", param="session_id"
            ) from None
    if header is not None and field is not None and header != field:
        raise APIError(
            400,
            f"the X-Session-Id header ({header!r}) and the session_id field ({field!r}) name"
            " different sessions; send one of them",
            param="session_id",
        )
    session_id = header if header is not None else field
    if session_id is None:
        return None
    problem = session_id_problem(session_id)
    if problem is not None:
        raise APIError(400, problem, param="session_id")
    return session_id


def chat_request(
    state: ServerState,
    body: ChatCompletionRequest,
    params: SamplingParams,
    session_id: str | None,
    tenant: str,
    request_id: str,
    tools: ToolContext | None = None,
) -> EngineRequest:
    """The engine request of a chat completion: a session's next turn (begun in the store
    here), or the whole conversation with this server's replies spliced in as exact ids."""
    messages = [m.as_template_message() for m in body.messages]
    if session_id is None and body.retention is not None:
        raise APIError(
            400,
            "retention keeps a session's KV after its turn: send X-Session-Id or session_id"
            " with it",
            param="retention",
        )
    if session_id is None:
        prompt = conversation_token_ids(
            state.sessions.manager, messages, state.memory, tenant, tools
        )
        return EngineRequest.of(
            request_id, prompt, sampling_params=params, cache_salt=tenant or None
        )
    retention = body.retention.model_dump() if body.retention else None
    try:
        return state.sessions.begin_turn(
            scoped_session(tenant, session_id),
            messages,
            request_id,
            params,
            tenant=tenant,
            retention=retention,
            tools=tools,
        )
    except TurnInProgressError as exc:
        raise APIError(409, str(exc), param="session_id", code="session_busy") from None
    except SessionNamespaceError as exc:
        raise APIError(409, str(exc), param="session_id", code="session_in_use") from None
    except TenantMismatchError:
        raise APIError(404, "no such session for this API key", param="session_id") from None


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    tools = tool_context(state, body.tools, body.tool_choice, body.parallel_tool_calls)
    spec = chat_response_format(body.response_format)
    params = constrained(body.to_sampling_params(), tools, spec)
    session_id = session_id_of(request, body.session_id)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    engine_request = chat_request(state, body, params, session_id, tenant, request_id, tools)
    first, stream = await start_stream(state, engine_request, request)
    top_n = body.top_logprobs or 0
    parser = tools.parser if tools is not None and tools.active else None
    if not body.stream:
        final = await collect(request, first, stream)
        parsed = parser.parse(final.outputs[0].text) if parser is not None else None
        calls = parsed.calls if parsed else []
        _remember(state, tenant, final, calls)
        await retain_through_tool_calls(state, tenant, final.session_id, calls)
        return JSONResponse(
            fmt.chat_completion(request_id, body.model, final, top_n, session_id, parsed)
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], **kw: Any) -> str:
            return fmt.sse(fmt.chat_chunk(request_id, body.model, created, delta, **kw))

        def call_chunks(calls: list[ToolCall], start: int) -> list[str]:
            return [
                chunk({"tool_calls": [fmt.tool_call(call, start + i)]})
                for i, call in enumerate(calls)
            ]

        yield chunk({"role": "assistant", "content": ""})
        calls = ToolCallStream(parser) if parser is not None else None
        sent = 0
        final = None
        outputs = chain(first, stream)
        async for output in outputs:
            completion = output.outputs[0]
            logprobs = fmt.chat_logprobs(completion, sent, top_n) if body.logprobs else None
            sent = len(completion.token_ids)
            text, made = completion.delta_text, []
            if calls is not None:
                made_before = len(calls.calls)
                step = calls.feed(text)
                text, made = step.content, call_chunks(step.calls, made_before)
            if text or logprobs:
                yield chunk({"content": text}, logprobs=logprobs)
            for piece in made:
                yield piece
            final = output
        if final is None:
            return
        made_calls: list[ToolCall] = []
        if calls is not None:
            made_before = len(calls.calls)
            rest = calls.finish()
            if rest.content:
                yield chunk({"content": rest.content})
            for piece in call_chunks(rest.calls, made_before):
                yield piece
            made_calls = calls.calls
        _remember(state, tenant, final, made_calls)
        await retain_through_tool_calls(state, tenant, final.session_id, made_calls)
        reason = fmt.finish_reason(final.outputs[0], bool(made_calls))
        yield chunk({}, finish_reason=reason)
        if include_usage:
            chunk = fmt.chat_chunk(request_id, body.model, created, {})
            chunk["choices"] = []
            chunk["usage"] = fmt.usage(final)
            yield fmt.sse(chunk)
        yield fmt.sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers())


def _remember(state: ServerState, tenant: str, final: RequestOutput, calls: list[ToolCall]) -> None:
    """Remember the reply's exact token ids under what the client will send back: its text,
    or its call ids when it made calls."""
    completion = final.outputs[0]
    if final.session_id is not None:
        return
    message: dict[str, Any] = {"content": completion.text}
    if calls:
        message["tool_calls"] = [{"id": c.id} for c in calls]
    key = reply_key(message)
    if key is not None:
        state.memory.remember(tenant, key, completion.token_ids)


@router.post("/v1/completions", response_model=None)
async def completions(
    body: CompletionRequest, request: Request, tenant: str = Depends(tenant_of)
) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompt: str | list[int]
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str | list):
        if len(body.prompt) != 1:
            raise APIError(400, "send one prompt per request (n=1)", param="prompt")
        prompt = body.prompt[0]  # type: ignore[assignment]
    else:
        prompt = body.prompt  # type: ignore[assignment]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    params = body.to_sampling_params()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    engine_request = EngineRequest.of(
        request_id, prompt, sampling_params=params, cache_salt=tenant or None
    )
    first, stream = await start_stream(state, engine_request, request)
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
        async for output in chain(first, stream):
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

    return StreamingResponse(events(), media_type="text/event-stream", headers=sse_headers())


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
