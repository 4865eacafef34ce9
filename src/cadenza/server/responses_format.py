"""The Responses and Conversations APIs' wire format: input items in, response objects, output
items, usage and stream events out (the shapes the official ``openai`` SDK parses)."""

from __future__ import annotations

import json
import time
from typing import Any

from cadenza.outputs import RequestOutput
from cadenza.server.errors import APIError
from cadenza.server.response_store import new_id
from cadenza.tools.parsers import ToolCall
from cadenza.tools.spec import arguments_object

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def parse_items(value: str | list[Any] | None, param: str = "input") -> list[dict[str, Any]]:
    """Normalise ``input`` (a string or a list of message items) into stored message items,
    each with an id: ``{"type": "message", "id", "role", "status", "content": [parts]}``."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items = []
    for index, raw in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(raw, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        kind = raw.get("type", "message")
        if kind in ("function_call", "function_call_output"):
            items.append(_tool_item(kind, raw, where))
            continue
        if kind != "message":
            raise APIError(
                400,
                f"{where}: item type {kind!r} is not supported; send message, function_call"
                " or function_call_output items",
                param=where,
            )
        role = raw.get("role")
        if role not in _ROLES:
            raise APIError(400, f"{where}.role must be one of {list(_ROLES)}", param=where)
        text = _content_text(raw.get("content"), f"{where}.content")
        part_type = "output_text" if role == "assistant" else "input_text"
        part: dict[str, Any] = {"type": part_type, "text": text}
        if part_type == "output_text":
            part["annotations"] = []
        items.append(
            {
                "type": "message",
                # Fresh ids: clients replay earlier output items (with their ids) as input.
                "id": new_id("msg"),
                "status": "completed",
                "role": role,
                "content": [part],
            }
        )
    return items


def _tool_item(kind: str, raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A function call the model made (replayed by the client) or its result."""
    call_id = raw.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise APIError(400, f"{where}.call_id must be a non-empty string", param=where)
    if kind == "function_call_output":
        output = raw.get("output")
        if not isinstance(output, str):
            output = _content_text(output, f"{where}.output")
        return {
            "type": kind,
            "id": new_id("fco"),
            "call_id": call_id,
            "output": output,
            "status": "completed",
        }
    name, arguments = raw.get("name"), raw.get("arguments", "{}")
    if not isinstance(name, str) or not isinstance(arguments, str):
        raise APIError(400, f"{where} needs a string name and string arguments", param=where)
    return function_call_item(ToolCall(name, arguments, call_id))


def function_call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_" + call.id.removeprefix("call_"),
        "call_id": call.id,
        "name": call.name,
        "arguments": call.arguments,
        "status": status,
    }


def template_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored items as chat-template messages: consecutive function calls become one assistant
    message with ``tool_calls``, their outputs ``tool`` messages."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            function = {"name": item["name"], "arguments": arguments_object(item["arguments"])}
            call = {"id": item["call_id"], "type": "function", "function": function}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]}
            )
        else:
            messages.append(template_message(item))
    return messages


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text", part.get("refusal")), str):
            raise APIError(
                400,
                f"{where}: only text parts ({', '.join(_TEXT_PARTS[:3])}) are supported;"
                f" got {kind!r}",
                param=where,
            )
        texts.append(part.get("text", part.get("refusal")))
    return "".join(texts)


def template_message(item: dict[str, Any]) -> dict[str, Any]:
    """A stored message item as a chat-template message (``developer`` reads as ``system``)."""
    role = "system" if item["role"] == "developer" else item["role"]
    return {"role": role, "content": "".join(p.get("text", "") for p in item["content"])}


def output_message(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """The assistant's output item; ``text=None`` gives it with no content part yet."""
    content = [] if text is None else [output_text_part(text)]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_usage(output: RequestOutput) -> dict[str, Any]:
    """OpenAI's usage, with the whole context (history included) as input tokens, and where
    the cached ones were found as a Cadenza extension (``cached_tokens_by_tier``)."""
    prompt = len(output.prompt_token_ids)
    generated = len(output.outputs[0].token_ids)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": output.num_cached_tokens,
            "cache_write_tokens": 0,
            "cached_tokens_by_tier": dict(output.cached_tokens_by_tier),
        },
        "output_tokens": generated,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + generated,
    }


def response_object(
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list[dict[str, Any]],
    request: dict[str, Any],
    usage: dict[str, Any] | None = None,
    session_id: str | None = None,
) -> dict[str, Any]:
    """A response object. ``request`` holds the echoed request fields (instructions,
    previous_response_id, conversation, store, temperature, top_p, max_output_tokens,
    metadata). ``session_id`` is a Cadenza extension: the session holding the response's
    history, for ``POST /v1/sessions/{id}/hint`` ahead of the next turn."""
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    finished = status in ("completed", "incomplete", "failed")
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if finished else None,
        "error": None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "reasoning": None,
        "service_tier": "default",
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        **request,
    }
    if session_id is not None:
        body["session_id"] = session_id
    return body


def item_list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def sse_event(event_type: str, sequence_number: int, fields: dict[str, Any]) -> str:
    payload = {"type": event_type, "sequence_number": sequence_number, **fields}
    return f"event: {event_type}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
