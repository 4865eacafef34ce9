"""Tools and structured output of an API request: validated (400 with what to fix) and turned
into a ``ToolContext`` and the ``SamplingParams`` that enforce them."""

from __future__ import annotations

import dataclasses
from typing import Any

from cadenza.core.sampling_params import SamplingParams
from cadenza.server.errors import APIError
from cadenza.server.state import ServerState
from cadenza.structured.spec import StructuredOutput
from cadenza.tools.parsers import select_parser
from cadenza.tools.spec import parse_tool_choice, parse_tools
from cadenza.tools.template import ToolContext, template_knows_tools


def tool_context(
    state: ServerState,
    tools: list[Any] | None,
    tool_choice: Any,
    parallel: bool | None,
    param: str = "tools",
) -> ToolContext | None:
    """The request's tools, or None when it offers none."""
    try:
        parsed = parse_tools(tools, param)
        choice = parse_tool_choice(tool_choice, parsed)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None
    if not parsed:
        return None
    tokenizer = state.engine.tokenizer
    template = tokenizer.chat_template if tokenizer is not None else None
    name = getattr(state.engine.config, "tool_call_parser", "auto")
    return ToolContext(
        parsed,
        choice,
        select_parser(name, template),
        template_knows_tools(template),
        parallel=True if parallel is None else parallel,
    )


def chat_response_format(value: Any) -> StructuredOutput | None:
    """Chat Completions' ``response_format``: text, json_object, or json_schema
    (``{"json_schema": {"name", "schema", "strict"}}``)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "response_format must be an object", param="response_format")
    kind = value.get("type", "text")
    if kind == "json_schema":
        body = value.get("json_schema")
        if not isinstance(body, dict):
            raise APIError(
                400,
                "response_format.json_schema must be an object with the schema under 'schema'",
                param="response_format.json_schema",
            )
        return _schema(body.get("schema"), "response_format.json_schema.schema")
    return _simple(kind, "response_format")


def text_format(text: dict[str, Any] | None) -> StructuredOutput | None:
    """The Responses API's ``text.format``: text, json_object, or json_schema (flat:
    ``{"type": "json_schema", "name", "schema", "strict"}``)."""
    value = (text or {}).get("format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise APIError(400, "text.format must be an object", param="text.format")
    kind = value.get("type", "text")
    if kind == "json_schema":
        return _schema(value.get("schema"), "text.format.schema")
    return _simple(kind, "text.format")


def _simple(kind: Any, param: str) -> StructuredOutput | None:
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    raise APIError(400, f"{param}.type must be 'text', 'json_object' or 'json_schema'", param=param)


def _schema(schema: Any, param: str) -> StructuredOutput:
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    spec = StructuredOutput.json_schema(schema)
    try:
        spec.check()
    except ValueError as exc:
        raise APIError(400, f"{param} is not a usable JSON schema: {exc}", param=param) from None
    return spec


def constrained(
    params: SamplingParams, tools: ToolContext | None, spec: StructuredOutput | None
) -> SamplingParams:
    """``params`` with the output's grammar: a forced tool call wins over a response format
    (the call must parse); otherwise the response format applies to the reply."""
    if spec is not None:
        params = dataclasses.replace(params, structured_output=spec)
    if tools is not None:
        params = tools.sampling_params(params)
    return params
