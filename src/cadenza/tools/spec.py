"""Tool definitions and ``tool_choice``, normalised from the Chat Completions and Responses
shapes (``{"type": "function", "function": {...}}`` and the flat ``{"type": "function",
"name": ...}``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cadenza.structured.spec import StructuredOutput

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object"})

    def as_template_tool(self) -> dict[str, Any]:
        """The shape chat templates (and transformers) expect in ``tools``."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``mode`` is auto, none or required; ``name`` is set for a named function (required)."""

    mode: str = "auto"
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode == "required"


def parse_tools(raw: list[Any] | None, param: str = "tools") -> list[Tool]:
    """Function tools from either API's shape; raises ValueError naming what to fix."""
    tools: list[Tool] = []
    for i, item in enumerate(raw or []):
        where = f"{param}[{i}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function":
            kind = item.get("type") if isinstance(item, dict) else type(item).__name__
            raise ValueError(f"{where}: only function tools are supported, got {kind!r}")
        body = item.get("function", item)
        if not isinstance(body, dict):
            raise ValueError(f"{where}.function must be an object")
        name = body.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"{where}: the function name must be 1-64 letters, digits, '_', '-' or '.'"
            )
        parameters = body.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}.parameters must be a JSON schema object")
        try:
            # A forced call is generated under this schema: one that cannot compile would end
            # the reply at once, with no call and no error.
            StructuredOutput.json_schema(parameters).check()
        except ValueError as exc:
            raise ValueError(f"{where}.parameters is not a usable JSON schema: {exc}") from None
        description = body.get("description") or ""
        if not isinstance(description, str):
            raise ValueError(f"{where}.description must be a string")
        tools.append(Tool(name, description, parameters))
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{param}: function names must be unique; repeated: {dupes}")
    return tools


def parse_tool_choice(raw: Any, tools: list[Tool], param: str = "tool_choice") -> ToolChoice:
    """``auto`` (the default with tools), ``none`` (the default without), ``required``, or a
    named function (``{"type": "function", "function": {"name"}}`` or ``{"type": "function",
    "name"}``)."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(raw, str):
        if raw not in ("auto", "none", "required"):
            raise ValueError(f"{param} must be 'auto', 'none', 'required' or a named function")
        if raw == "required" and not tools:
            raise ValueError(f"{param} 'required' needs at least one tool in tools")
        return ToolChoice(raw)
    if isinstance(raw, dict) and raw.get("type") == "function":
        body = raw.get("function", raw)
        name = body.get("name") if isinstance(body, dict) else None
        if name not in {t.name for t in tools}:
            raise ValueError(f"{param} names function {name!r}, which is not in tools")
        return ToolChoice("required", name)
    raise ValueError(f"{param} must be 'auto', 'none', 'required' or a named function")


def arguments_object(arguments: Any) -> Any:
    """A call's arguments for a chat template: the JSON string clients send, decoded (a
    string that is not JSON is passed through as is)."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
