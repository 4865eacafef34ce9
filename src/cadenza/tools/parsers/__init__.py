"""Tool-call formats by name (vLLM's ``--tool-call-parser`` names) and ``auto`` detection
from the chat template."""

from __future__ import annotations

from cadenza.tools.parsers.base import ParsedOutput, ToolCall, ToolParser, new_call_id
from cadenza.tools.parsers.hermes import HermesParser
from cadenza.tools.parsers.llama3_json import Llama3JsonParser
from cadenza.tools.parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}
PARSER_CHOICES = ("auto", *PARSERS)

__all__ = [
    "PARSERS",
    "PARSER_CHOICES",
    "ParsedOutput",
    "ToolCall",
    "ToolParser",
    "new_call_id",
    "select_parser",
]


def select_parser(name: str, chat_template: str | None) -> ToolParser:
    """The parser called ``name``, or for ``auto`` the one the chat template writes: Mistral's
    ``[TOOL_CALLS]``, Llama 3's ``<|python_tag|>`` / header tokens, else Hermes (Qwen, Hermes,
    and templates without tools, which get Hermes' prompt)."""
    if name != "auto":
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; choose from {PARSER_CHOICES}")
        return PARSERS[name]()
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<tool_call>" in template:
        return HermesParser()
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return Llama3JsonParser()
    return HermesParser()
