"""``/v1/responses``: the stateful OpenAI Responses API, backed by sessions.

A stored response (``store``, the default) runs as a turn of a conversation-store session, so
its history is exact token ids and its KV is reused wherever it lives:

* no ``previous_response_id``: a new chain, i.e. a new session;
* ``previous_response_id`` of the chain's latest response: that session's next turn (send only
  the new input; ``usage.input_tokens_details.cached_tokens`` shows the reuse);
* an older response: a fork, a new session with a copy of the history up to that response
  (same tokens, so the same content-addressed KV blocks: the prefix is still cached);
* ``conversation``: the conversation's session; items added to it since its last response are
  prepended to the input, and the input and output are appended to it when the response ends.

``store: false`` answers without persisting anything: the prompt is the referenced history plus
the new input, run as a plain request (the prefix cache still applies); the response can be
neither retrieved nor continued.

Instructions. A session's history is fixed tokens, so ``instructions`` cannot be swapped out of
it the way OpenAI drops the previous response's instructions. Instead they are recorded as a
system message where they first appear: at the start of a new chain, or before the new input
when a continuation's instructions differ from those already in effect in its history. A
client that resends the same instructions every turn (the common pattern) therefore adds them
once; the model keeps seeing earlier instructions, and a change takes effect from that turn.

Tools. ``tools`` (function tools), ``tool_choice`` and ``parallel_tool_calls`` work as in chat
completions: the reply is parsed into ``function_call`` output items (streamed with
``response.function_call_arguments.*`` events), and the next response takes the results as
``function_call_output`` items, continuing the same session (its KV is the cached prefix).
``text.format`` (``json_object``, ``json_schema``) constrains the reply with a grammar.

Extensions: a response carries ``session_id``, the session holding its history (hint it with
``POST /v1/sessions/{id}/hint`` before the next turn), and ``usage.input_tokens_details`` adds
``cached_tokens_by_tier`` (where the cached prompt tokens were found: device, host or disk).
The request takes Cadenza's ``retention`` (as in chat completions) and vLLM's ``top_k``,
``seed`` and ``ignore_eos``.

Concurrency. A session runs one turn at a time: a second response continuing the same latest
response, or in the same conversation, while one is in progress gets 409 (once it has finished,
continuing the same response again is a fork). Errors follow OpenAI: unknown ids are 404
(``NotFoundError`` in the SDK), invalid requests 400.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from cadenza.core.sampling_params import SamplingParams
from cadenza.engine_api import EngineRequest
from cadenza.outputs import RequestOutput
from cadenza.server import responses_format as fmt
from cadenza.server.engine_stream import chain, collect, sse_headers, start_stream
from cadenza.server.errors import APIError, conversation_not_found
from cadenza.server.protocol import RetentionBody
from cadenza.server.request_body import RequestBody
from cadenza.server.response_chain import (
    continue_from,
    history_upto,
    new_chain_session,
    public_session_id,
    release_orphan_session,
    with_instructions,
)
from cadenza.server.response_store import (
    ConversationBusyError,
    ConversationCommit,
    ConversationRecord,
    ResponseStore,
    StoredResponse,
    close_response_store,
    new_id,
    response_store,
)
from cadenza.server.state import ServerState, get_state, tenant_of
from cadenza.server.tool_requests import constrained, text_format, tool_context
from cadenza.server.tool_retention import retain_through_tool_calls
from cadenza.session.manager import Retention
from cadenza.session.store import TurnInProgressError
from cadenza.tools.parsers import ParsedOutput, ToolCall
from cadenza.tools.stream import ToolCallStream
from cadenza.tools.template import ToolContext


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    state = app.state.cadenza
    close_response_store(state)
    if state.session_layer is not None:
        state.session_layer.close()


router = APIRouter(lifespan=_lifespan)


class ConversationRef(RequestBody):
    id: str = Field(min_length=1)


class ResponseCreateRequest(RequestBody):
    model: str
    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1)
    conversation: str | ConversationRef | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    background: bool | None = None
    text: dict[str, Any] | None = None
    # Extensions: vLLM's sampling knobs, Cadenza's KV retention for the session.
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = False
    retention: RetentionBody | None = None

    @property
    def conversation_id(self) -> str | None:
        if isinstance(self.conversation, ConversationRef):
            return self.conversation.id
        return self.conversation

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            max_tokens=self.max_output_tokens,
            ignore_eos=self.ignore_eos,
        )

    def echoed(self) -> dict[str, Any]:
        """The request fields a response object repeats back."""
        cid = self.conversation_id
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "previous_response_id": self.previous_response_id,
            "conversation": {"id": cid} if cid else None,
            "store": self.store,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "metadata": dict(self.metadata or {}),
            "tools": [_flat_tool(t) for t in self.tools or [] if isinstance(t, dict)],
            "tool_choice": self.tool_choice or "auto",
            "parallel_tool_calls": self.parallel_tool_calls is not False,
            "text": {"format": (self.text or {}).get("format") or {"type": "text"}},
        }

    def check_supported(self) -> None:
        if self.background:
            raise APIError(400, "background responses are not supported", param="background")
        if self.previous_response_id and self.conversation_id:
            raise APIError(
                400,
                "previous_response_id and conversation cannot be used together",
                param="conversation",
            )


def _flat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as a response object lists it (the Responses API's flat function shape)."""
    body = tool.get("function", tool)
    return {
        "type": "function",
        "name": body.get("name"),
        "description": body.get("description"),
        "parameters": body.get("parameters"),
        "strict": body.get("strict"),
    }


@dataclass
class ResponseTurn:
    """One response being generated: what it continues, and (filled on the engine thread)
    which session it runs in."""

    state: ServerState
    store: ResponseStore
    tenant: str
    body: ResponseCreateRequest
    new_items: list[dict[str, Any]]
    previous: StoredResponse | None = None
    conversation: ConversationRecord | None = None
    response_id: str = field(default_factory=lambda: new_id("resp"))
    message_id: str = field(default_factory=lambda: new_id("msg"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    input_items: list[dict[str, Any]] = field(default_factory=list)
    session_id: str | None = None  # scoped store session, once the turn is queued
    depth: int = 0
    instructions: str | None = None  # in effect in the history after this response
    tools: ToolContext | None = None
    params: SamplingParams | None = None  # with the grammar of forced calls / text.format
    lease: _Lease = field(init=False)

    def __post_init__(self) -> None:
        self.lease = _Lease(self.state, self.store, self.response_id)
        # A stream that the server never started (client gone before the first byte) runs
        # no ``finally``: letting go of the turn object releases what it held.
        finalizer = weakref.finalize(self, self.lease.release)
        finalizer.atexit = False

    # ------------------------------------------------------------------ submission
    def prepare(self) -> EngineRequest:
        """The engine request of this response; a stored one begins its session turn."""
        sessions = self.state.sessions
        if not self.body.store:
            return self._unstored_request()
        if self.conversation is not None:
            return self._in_conversation(self.conversation)
        if self.previous is not None:
            session_id, forked = continue_from(sessions.store, self.previous, self.tenant)
            try:
                return self._run_turn(session_id, self.previous.instructions)
            except BaseException:
                if forked:
                    sessions.store.delete_session(session_id)
                raise
        _, session_id = new_chain_session(self.tenant)
        try:
            return self._run_turn(session_id, None)
        except BaseException:
            sessions.store.delete_session(session_id)
            raise

    def _in_conversation(self, conversation: ConversationRecord) -> EngineRequest:
        cid = conversation.conversation_id
        try:
            claimed = self.store.claim_pending(cid, self.tenant, self.response_id)
        except ConversationBusyError as exc:
            raise APIError(
                409, str(exc), param="conversation", code="conversation_locked"
            ) from None
        if claimed is None:
            raise conversation_not_found(cid, "conversation")
        self.lease.conversation_id = cid
        try:
            self.input_items = [record.item for record in claimed] + self.new_items
            return self._run_turn(conversation.session_id, conversation.instructions)
        except BaseException:
            self.store.release_claim(cid, self.response_id)
            self.lease.conversation_id = None
            raise

    def _run_turn(self, session_id: str, in_effect: str | None) -> EngineRequest:
        if not self.input_items:
            self.input_items = list(self.new_items)
        if not self.input_items:
            raise APIError(400, "input is required (no pending conversation items)", param="input")
        messages = fmt.template_messages(self.input_items)
        messages, self.instructions = with_instructions(messages, self.body.instructions, in_effect)
        retention = self.body.retention.model_dump() if self.body.retention else None
        sessions = self.state.sessions
        self.lease.hold(session_id)
        try:
            request = sessions.begin_turn(
                session_id,
                messages,
                self.response_id,
                self.sampling_params(),
                tenant=self.tenant,
                retention=retention,
                api="responses",
                recognise_history=False,
                tools=self.tools,
            )
        except TurnInProgressError:
            self.lease.unhold()
            raise APIError(
                409,
                "another response continuing the same history is in progress; retry when it"
                " has finished (continuing the same response again then forks)",
                param="previous_response_id",
                code="conversation_locked",
            ) from None
        except BaseException:
            self.lease.unhold()
            raise
        self.session_id = session_id
        record = sessions.store.get_session(session_id, tenant=self.tenant)
        self.depth = (record.num_turns if record else 0) + 1
        return request

    def _unstored_request(self) -> EngineRequest:
        sessions = self.state.sessions
        session_id, depth, in_effect = None, 0, None
        response_id = self.body.previous_response_id or ""
        if self.previous is not None:
            session_id, depth = self.previous.session_id, self.previous.depth
            in_effect = self.previous.instructions
        elif self.conversation is not None:
            session_id = self.conversation.session_id
            in_effect = self.conversation.instructions
            record = sessions.store.get_session(session_id, tenant=self.tenant)
            depth = record.num_turns if record else 0
            pending = self.store.pending_items(self.conversation.conversation_id)
            self.input_items = [item.item for item in pending]
        self.input_items = self.input_items + self.new_items
        if not self.input_items:
            raise APIError(400, "input is required", param="input")
        tokens: list[int] = []
        prior: list[dict[str, Any]] = []
        if session_id is not None and depth:
            tokens, prior = history_upto(sessions.store, session_id, depth, response_id)
        messages = fmt.template_messages(self.input_items)
        messages, self.instructions = with_instructions(messages, self.body.instructions, in_effect)
        template_tools = None
        if self.tools is not None:
            messages = self.tools.prepare(messages, first_turn=not prior)
            template_tools = self.tools.template_tools()
        prompt = tokens + sessions.template_delta(prior, messages, tokens, template_tools)
        keep = Retention.parse(self.body.retention.model_dump() if self.body.retention else None)
        return EngineRequest.of(
            self.response_id,
            prompt,
            sampling_params=self.sampling_params(),
            cache_salt=self.tenant or None,
            retention_ttl_s=keep.ttl_s if keep else 0.0,
        )

    def sampling_params(self) -> SamplingParams:
        return self.params or self.body.sampling_params()

    def parse(self, text: str) -> ParsedOutput:
        if self.tools is None or not self.tools.active:
            return ParsedOutput(text, [])
        return self.tools.parser.parse(text)

    # ------------------------------------------------------------------ asyncio side
    def response(
        self, status: str, output: list[dict[str, Any]], final: RequestOutput | None = None
    ) -> dict[str, Any]:
        session = (
            public_session_id(self.tenant, self.session_id) if self.session_id is not None else None
        )
        return fmt.response_object(
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.body.model,
            status=status,
            output=output,
            request=self.body.echoed(),
            usage=fmt.response_usage(final) if final is not None else None,
            session_id=session,
        )

    def finish(self, final: RequestOutput, parsed: ParsedOutput | None = None) -> dict[str, Any]:
        """The finished response object, stored (with its conversation items) if asked.
        ``parsed``: the reply split into text and calls (parsed here when not given)."""
        completion = final.outputs[0]
        status = "incomplete" if completion.finish_reason == "length" else "completed"
        if parsed is None:
            parsed = self.parse(completion.text)
        output = [fmt.function_call_item(call) for call in parsed.calls]
        if parsed.content or not parsed.calls:
            output.insert(0, fmt.output_message(self.message_id, parsed.content, status))
        body = self.response(status, output, final)
        if self.body.store and self.session_id is not None:
            record = StoredResponse(
                response_id=self.response_id,
                tenant=self.tenant,
                created_at=self.created_at,
                session_id=self.session_id,
                depth=self.depth,
                conversation_id=self.body.conversation_id,
                instructions=self.instructions,
                body=body,
                input_items=self.input_items,
            )
            commit = None
            if self.conversation is not None:
                commit = ConversationCommit(
                    self.conversation.conversation_id,
                    self.response_id,
                    self.new_items + output,
                    self.instructions,
                )
            self.store.put_response(record, commit)
        self.lease.stored()
        return body

    def discard(self) -> None:
        """The response failed or its client left: abort it, give its conversation items
        back, and delete its session if nothing references it (idempotent)."""
        self.lease.release()


@dataclass
class _Lease:
    """What a response holds until it is stored or given up: the engine request, its
    conversation's claim, and a hold on its session against garbage collection. Settled
    once; synchronous, so that it also works in cancelled tasks and in a finalizer."""

    state: ServerState
    store: ResponseStore
    request_id: str
    conversation_id: str | None = None  # claimed conversation
    session_id: str | None = None  # held session
    settled: bool = False

    def hold(self, session_id: str) -> None:
        self.store.hold(session_id)
        self.session_id = session_id

    def unhold(self) -> str | None:
        session_id, self.session_id = self.session_id, None
        if session_id is not None:
            self.store.release_hold(session_id)
        return session_id

    def stored(self) -> None:
        self.settled = True
        self.conversation_id = None  # the commit consumed the claim
        self.unhold()

    def release(self) -> None:
        if self.settled:
            return
        self.settled = True
        self.state.engine.abort(self.request_id)
        with contextlib.suppress(RuntimeError):  # the store closed (server stopped)
            self.state.sessions.abort(self.request_id)  # the turn, if still pending
            if self.conversation_id is not None:
                self.store.release_claim(self.conversation_id, self.request_id)
                self.conversation_id = None
            session_id = self.unhold()
            if session_id is not None:
                self._collect_garbage(session_id)

    def _collect_garbage(self, session_id: str) -> None:
        """Delete the session if nothing refers to it any more."""
        store, sessions = self.store, self.state.sessions
        if store.session_in_use(session_id) or sessions.store.pending_turn(session_id):
            return
        sessions.store.delete_session(session_id)


def _not_found(response_id: str, state: ServerState | None = None) -> APIError:
    turn = state.sessions.store.turn_of_request(response_id) if state is not None else None
    if turn is not None and turn.status in ("interrupted", "aborted"):
        why = (
            "was interrupted by a server restart before it finished"
            if turn.status == "interrupted"
            else "was aborted before it finished (its client left, or generation failed)"
        )
        return APIError(
            404,
            f"response {response_id!r} {why}, so it was not stored; its input is not part of"
            " the conversation: send the request again",
            param="response_id",
            code="response_not_found",
        )
    return APIError(
        404,
        f"response {response_id!r} not found (it never existed, was deleted, or was created"
        " with store=false, which is not kept)",
        param="response_id",
        code="response_not_found",
    )


@router.post("/v1/responses", response_model=None)
async def create_response(
    body: ResponseCreateRequest, request: Request, tenant: str = Depends(tenant_of)
) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    body.check_supported()
    tools = tool_context(state, body.tools, body.tool_choice, body.parallel_tool_calls)
    params = constrained(body.sampling_params(), tools, text_format(body.text))
    store = response_store(state)
    turn = ResponseTurn(state, store, tenant, body, fmt.parse_items(body.input))
    turn.tools, turn.params = tools, params
    if body.previous_response_id:
        turn.previous = store.get_response(body.previous_response_id, tenant)
        if turn.previous is None:
            raise APIError(
                404,
                f"previous response {body.previous_response_id!r} not found",
                param="previous_response_id",
                code="previous_response_not_found",
            )
    conversation_id = body.conversation_id
    if conversation_id:
        turn.conversation = store.get_conversation(conversation_id, tenant)
        if turn.conversation is None:
            raise conversation_not_found(conversation_id, "conversation")
    elif not turn.new_items:
        raise APIError(400, "input is required", param="input")
    try:
        first, stream = await start_stream(state, turn.prepare(), request)
    except BaseException:
        turn.discard()
        raise
    if not body.stream:
        try:
            final = await collect(request, first, stream)
            parsed = turn.parse(final.outputs[0].text)
            result = turn.finish(final, parsed)
            await retain_through_tool_calls(state, tenant, turn.session_id, parsed.calls)
            return JSONResponse(result)
        finally:
            turn.discard()  # a no-op once the response is stored
    return StreamingResponse(
        _events(turn, first, stream), media_type="text/event-stream", headers=sse_headers()
    )


async def _events(
    turn: ResponseTurn, first: RequestOutput | None, stream: AsyncIterator[RequestOutput]
) -> AsyncIterator[str]:
    """The Responses streaming events, in OpenAI's order, each with a sequence number. With
    tools the message item is announced only once text comes, and each function call is sent
    as its own item when complete."""
    counter = itertools.count()
    mid = turn.message_id
    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    calls = ToolCallStream(turn.tools.parser) if turn.tools and turn.tools.active else None
    indexes = itertools.count()
    opened = False

    def event(kind: str, **fields: Any) -> str:
        return fmt.sse_event(kind, next(counter), fields)

    def open_message() -> list[str]:
        nonlocal opened
        if opened:
            return []
        opened = True
        where["output_index"] = next(indexes)
        item = fmt.output_message(mid, None, "in_progress")
        return [
            event("response.output_item.added", output_index=where["output_index"], item=item),
            event("response.content_part.added", **where, part=fmt.output_text_part("")),
        ]

    def text_events(delta: str) -> list[str]:
        if not delta:
            return []
        return [
            *open_message(),
            event("response.output_text.delta", **where, delta=delta, logprobs=[]),
        ]

    def call_events(made: list[ToolCall]) -> list[str]:
        out = []
        for call in made:
            index, done = next(indexes), fmt.function_call_item(call)
            added = {**fmt.function_call_item(call, "in_progress"), "arguments": ""}
            at = {"item_id": done["id"], "output_index": index}
            out += [
                event("response.output_item.added", output_index=index, item=added),
                event("response.function_call_arguments.delta", **at, delta=call.arguments),
                event(
                    "response.function_call_arguments.done",
                    **at,
                    arguments=call.arguments,
                    name=call.name,
                ),
                event("response.output_item.done", output_index=index, item=done),
            ]
        return out

    try:
        yield event("response.created", response=turn.response("in_progress", []))
        yield event("response.in_progress", response=turn.response("in_progress", []))
        if calls is None:
            for piece in open_message():
                yield piece
        sent = ""
        final = None
        try:
            async for output in chain(first, stream):
                delta, made = output.outputs[0].delta_text, []
                if calls is not None:
                    step = calls.feed(delta)
                    delta, made = step.content, step.calls
                sent += delta
                for piece in text_events(delta) + call_events(made):
                    yield piece
                final = output
        except Exception as exc:  # the engine failed this request
            turn.discard()
            failed = turn.response("failed", [])
            failed["error"] = {"code": "server_error", "message": f"generation failed: {exc}"}
            yield event("response.failed", response=failed)
            return
        if final is None:
            return
        parsed = None
        if calls is not None:
            rest = calls.finish()
            sent += rest.content
            for piece in text_events(rest.content) + call_events(rest.calls):
                yield piece
            parsed = ParsedOutput(sent, calls.calls)
        body = turn.finish(final, parsed)
        if parsed is not None:
            await retain_through_tool_calls(turn.state, turn.tenant, turn.session_id, parsed.calls)
        if opened:
            item = next(i for i in body["output"] if i["type"] == "message")
            text = item["content"][0]["text"] if item["content"] else ""
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=item["content"][0])
            yield event("response.output_item.done", output_index=where["output_index"], item=item)
        kind = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
        yield event(kind, response=body)
    finally:
        turn.discard()  # a no-op once the response is stored


@router.get("/v1/responses/{response_id}")
async def retrieve_response(
    response_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    record = response_store(get_state(request)).get_response(response_id, tenant)
    if record is None:
        raise _not_found(response_id, get_state(request))
    return record.body


@router.delete("/v1/responses/{response_id}")
async def delete_response(
    response_id: str, request: Request, tenant: str = Depends(tenant_of)
) -> dict[str, Any]:
    """Delete a stored response. Its session (token history) goes too once no other stored
    response or conversation needs it."""
    state = get_state(request)
    store = response_store(state)
    session_id = store.delete_response(response_id, tenant)
    if session_id is None:
        raise _not_found(response_id, get_state(request))
    if session_id:
        await release_orphan_session(state, store, session_id, tenant)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    tenant: str = Depends(tenant_of),
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: str = Query("desc", pattern="^(asc|desc)$"),
) -> dict[str, Any]:
    record = response_store(get_state(request)).get_response(response_id, tenant)
    if record is None:
        raise _not_found(response_id, get_state(request))
    items = list(record.input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(
                400, f"item {after!r} is not an input item of this response", param="after"
            )
        items = items[ids.index(after) + 1 :]
    return fmt.item_list(items[:limit], len(items) > limit)
