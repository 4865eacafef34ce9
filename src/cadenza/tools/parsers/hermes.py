"""Hermes / Qwen2.5 / Qwen3 format, one block per call:
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
Also the fallback for templates that know no tools (SmolLM2): its prompt is Qwen2.5's."""

from __future__ import annotations

import json
import re

from cadenza.tools.parsers.base import (
    ParsedOutput,
    ToolCall,
    ToolParser,
    call_from_json,
    call_schema,
    lark_json,
    lark_string,
    tools_json_lines,
)
from cadenza.tools.spec import Tool, ToolChoice

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesParser(ToolParser):
    name = "hermes"
    markers = (_OPEN,)

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(_OPEN)
        if start < 0:
            return ParsedOutput(text, [])
        calls: list[ToolCall] = []
        for match in _BLOCK.finditer(text, start):
            try:
                call = call_from_json(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is None:
                return ParsedOutput(text, [])  # not a well-formed call: leave it as text
            calls.append(call)
        return ParsedOutput(text[:start].rstrip(), calls)

    def complete_prefix(self, text: str) -> int:
        end = text.rfind(_CLOSE)
        return end + len(_CLOSE) if end >= 0 else 0

    def render(self, calls: list[ToolCall]) -> str:
        return "\n".join(
            f'{_OPEN}\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n{_CLOSE}'
            for c in calls
        )

    def grammar(self, tools: list[Tool], choice: ToolChoice, parallel: bool) -> str:
        body = lark_json(call_schema(tools, choice, "arguments"))
        block = f"{lark_string(_OPEN + chr(10))} obj {lark_string(chr(10) + _CLOSE)}"
        start = 'call ("\\n" call)*' if parallel else "call"
        return f"start: {start}\ncall: {block}\nobj: {body}\n"

    def system_prompt(self, tools: list[Tool]) -> str:
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{tools_json_lines(tools)}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )
