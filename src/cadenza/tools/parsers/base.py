"""What every tool-call format provides: parse a reply into content and calls, write calls
back as text, force a call with a grammar, and describe tools to a model whose chat template
does not (the fallback prompt)."""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from cadenza.tools.spec import Tool, ToolChoice


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)


@dataclass
class ParsedOutput:
    content: str
    calls: list[ToolCall]


def call_from_json(obj: Any, arguments_key: str = "arguments") -> ToolCall | None:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}``; None if not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(obj["name"], text)


def call_schema(tools: list[Tool], choice: ToolChoice, arguments_key: str) -> dict[str, Any]:
    """JSON schema of one call object of ``tools`` (only the named one when given)."""
    chosen = [t for t in tools if choice.name is None or t.name == choice.name]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, arguments_key: t.parameters},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


# Calls are written the way models write them, with no other whitespace: a model free to pad
# JSON with whitespace (a small one, or random weights) can pad until max_tokens.
_CALL_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def lark_json(schema: dict[str, Any]) -> str:
    """A ``%json`` rule of llguidance's Lark dialect, compact as above."""
    return "%json " + json.dumps({**schema, "x-guidance": _CALL_JSON}, ensure_ascii=False)


def lark_string(text: str) -> str:
    return json.dumps(text)


class ToolParser(ABC):
    """One model family's tool-call format.

    ``markers`` are the strings that open a call in the text: a streaming reply is sent as
    content until one appears (text that may still become a marker is held back)."""

    name: str = ""
    markers: tuple[str, ...] = ()
    # Special tokens in the format that must survive detokenisation (mistral's [TOOL_CALLS]).
    keeps_special_tokens: bool = False

    @abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """Split a complete reply into its content and its calls (unparseable calls stay
        content)."""

    @abstractmethod
    def render(self, calls: list[ToolCall]) -> str:
        """The calls as this format writes them (an assistant message for a template that
        cannot render ``tool_calls`` itself)."""

    @abstractmethod
    def grammar(self, tools: list[Tool], choice: ToolChoice, parallel: bool) -> str:
        """A Lark grammar (llguidance) whose every match parses as one call, or several when
        ``parallel``."""

    @abstractmethod
    def system_prompt(self, tools: list[Tool]) -> str:
        """How to present ``tools`` to a model whose chat template ignores them."""

    def complete_prefix(self, text: str) -> int:
        """Length of the leading part of ``text`` whose calls are complete (streaming emits
        their calls before the reply ends); 0 when none is."""
        return 0


def tools_json_lines(tools: list[Tool]) -> str:
    return "\n".join(json.dumps(t.as_template_tool(), ensure_ascii=False) for t in tools)
