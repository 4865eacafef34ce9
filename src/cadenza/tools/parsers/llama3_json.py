"""Llama 3.1 / 3.2 / 3.3 JSON format: the reply is ``{"name": ..., "parameters": {...}}``
(optionally after ``<|python_tag|>``), several calls separated by ``; ``."""

from __future__ import annotations

import json

from cadenza.tools.parsers.base import (
    ParsedOutput,
    ToolCall,
    ToolParser,
    call_from_json,
    call_schema,
    lark_json,
    tools_json_lines,
)
from cadenza.tools.spec import Tool, ToolChoice

_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    markers = (_TAG, '{"name"', '{ "name"')

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip()
        if body.startswith(_TAG):
            body = body[len(_TAG) :].lstrip()
        if not body.startswith("{"):
            return ParsedOutput(text, [])
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        pos = 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except ValueError:
                return ParsedOutput(text, [])
            call = call_from_json(obj, "parameters")
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return ParsedOutput(text, [])
            pos = len(body) - len(rest)
        return ParsedOutput("", calls)

    def render(self, calls: list[ToolCall]) -> str:
        return "; ".join(
            f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls
        )

    def grammar(self, tools: list[Tool], choice: ToolChoice, parallel: bool) -> str:
        body = lark_json(call_schema(tools, choice, "parameters"))
        start = 'obj ("; " obj)*' if parallel else "obj"
        return f"start: {start}\nobj: {body}\n"

    def system_prompt(self, tools: list[Tool]) -> str:
        return (
            "You have access to the following functions. To call a function, respond with "
            'JSON of the form {"name": function name, "parameters": dictionary of argument '
            "name and its value}, and nothing else.\n\n" + tools_json_lines(tools)
        )
