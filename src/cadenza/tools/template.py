"""How a request's tools reach the chat template, and what the reply is parsed with.

A template that knows tools (it mentions ``tools``: Qwen2.5, Hermes, Llama 3.1+, Mistral) is
rendered with them and with assistant ``tool_calls`` / ``tool`` messages as they are. A template
that does not (SmolLM2, plain ChatML) would silently drop them, so the parser's own prompt is
added as (or to) the system message of the conversation's first turn, and earlier calls are
written back into the assistant's text the way the model writes them. Either way the rendering
is deterministic, so a session's later turns extend the same token history.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from cadenza.core.sampling_params import SamplingParams
from cadenza.structured.spec import StructuredOutput
from cadenza.tools.parsers import ToolCall, ToolParser
from cadenza.tools.spec import Tool, ToolChoice


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in (chat_template or "")


@dataclass(frozen=True)
class ToolContext:
    """One request's tools, choice, format and template support."""

    tools: list[Tool]
    choice: ToolChoice
    parser: ToolParser
    native: bool  # the chat template renders tools itself
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Tools are offered (and replies parsed for calls)."""
        return bool(self.tools) and self.choice.mode != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        if not (self.active and self.native):
            return None
        return [t.as_template_tool() for t in self.tools]

    def prepare(self, messages: list[dict[str, Any]], first_turn: bool) -> list[dict[str, Any]]:
        """The messages as the template should see them (see the module docstring)."""
        if first_turn:
            messages = self.with_prompt(messages)
        return [self.convert(m) for m in messages]

    def with_prompt(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A conversation's opening messages with the tools prompt (templates without tools)."""
        if self.native or not self.active:
            return messages
        prompt = self.parser.system_prompt(self.tools)
        if messages and messages[0].get("role") == "system":
            first = {**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{prompt}"}
            return [first, *messages[1:]]
        return [{"role": "system", "content": prompt}, *messages]

    def convert(self, message: dict[str, Any]) -> dict[str, Any]:
        """One message as the template should see it."""
        return message if self.native else _as_text(message, self.parser)

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the grammar that forces a call (``required`` or a named function),
        and special tokens kept when the format has some."""
        changes: dict[str, Any] = {}
        if self.active and self.choice.forced:
            grammar = self.parser.grammar(self.tools, self.choice, self.parallel)
            changes["structured_output"] = StructuredOutput.lark(grammar)
        if self.active and self.parser.keeps_special_tokens:
            changes["skip_special_tokens"] = False
        return dataclasses.replace(params, **changes) if changes else params


def _as_text(message: dict[str, Any], parser: ToolParser) -> dict[str, Any]:
    """A message a tool-less template can render: calls written into the assistant's text."""
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not calls:
        return {k: v for k, v in message.items() if k in ("role", "content")}
    written = parser.render([_call(c) for c in calls])
    content = message.get("content") or ""
    return {"role": "assistant", "content": f"{content}\n{written}" if content else written}


def _call(raw: dict[str, Any]) -> ToolCall:
    function = raw.get("function", raw)
    args = function.get("arguments", {})
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(function.get("name", ""), text, raw.get("id") or "")
