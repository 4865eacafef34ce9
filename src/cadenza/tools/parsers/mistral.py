"""Mistral format (v0.3 and later instruct models): ``[TOOL_CALLS]`` then a JSON list of
``{"name": ..., "arguments": {...}}``. ``[TOOL_CALLS]`` is a special token, so replies are
detokenised with special tokens kept; a bare leading JSON list is read as calls too."""

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

_TAG = "[TOOL_CALLS]"


class MistralParser(ToolParser):
    name = "mistral"
    markers = (_TAG, '[{"name"')
    keeps_special_tokens = True

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(_TAG)
        if start >= 0:
            content, body = text[:start].rstrip(), text[start + len(_TAG) :].strip()
        elif text.lstrip().startswith("[{"):
            content, body = "", text.strip()
        else:
            return ParsedOutput(text, [])
        try:
            obj, _ = json.JSONDecoder().raw_decode(body)
        except ValueError:
            return ParsedOutput(text, [])
        items = obj if isinstance(obj, list) else [obj]
        calls = [call_from_json(item) for item in items]
        if not calls or any(c is None for c in calls):
            return ParsedOutput(text, [])
        return ParsedOutput(content, [c for c in calls if c is not None])

    def render(self, calls: list[ToolCall]) -> str:
        items = ", ".join(
            f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls
        )
        return f"{_TAG}[{items}]"

    def grammar(self, tools: list[Tool], choice: ToolChoice, parallel: bool) -> str:
        item = call_schema(tools, choice, "arguments")
        array = {"type": "array", "items": item, "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        return f"start: {lark_json(array)}\n"

    def system_prompt(self, tools: list[Tool]) -> str:
        return (
            "You can call these functions. To call them, reply with [TOOL_CALLS] followed by "
            'a JSON list of {"name": ..., "arguments": {...}} objects.\n\n'
            + tools_json_lines(tools)
        )
