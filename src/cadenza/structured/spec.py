"""A request's output constraint, as plain picklable data, and its llguidance grammar.

The grammar library is llguidance: it has no dependencies (it never imports torch, so the API
edge can check a schema and the engine core stays torch-free), compiles a JSON schema in a few
milliseconds (lazily, no automaton is built up front), and computes a 49k-token mask in tens of
microseconds on a CPU. See ``matchers`` for where the masks are computed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import llguidance

Kind = Literal["json_schema", "json_object", "lark", "regex"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "lark", "regex")

# Compact JSON (no free whitespace): a small model left free to emit whitespace can pad forever.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must match. ``source`` is the JSON schema text (``json_schema``),
    a Lark grammar (``lark``, llguidance's dialect, ``%json`` included) or a regex (``regex``);
    ``json_object`` takes no source."""

    kind: Kind
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> StructuredOutput:
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def lark(cls, grammar: str) -> StructuredOutput:
        return cls("lark", grammar)

    def grammar(self) -> str:
        """The llguidance grammar (serialised), built once per distinct spec."""
        return _grammar(self.kind, self.source)

    def check(self) -> None:
        """Raise ``ValueError`` saying what is wrong when the grammar cannot be compiled."""
        error = _validation_error(self.kind, self.source)
        if error:
            raise ValueError(error)


@lru_cache(maxsize=256)
def _grammar(kind: str, source: str) -> str:
    matcher = llguidance.LLMatcher
    if kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
    if kind == "json_schema":
        return matcher.grammar_from_json_schema(source, defaults=_JSON_OPTIONS)
    if kind == "regex":
        return matcher.grammar_from_regex(source)
    return matcher.grammar_from_lark(source)


@lru_cache(maxsize=256)
def _validation_error(kind: str, source: str) -> str:
    if kind == "json_schema":
        try:
            schema = json.loads(source)
        except ValueError as exc:
            return f"the schema is not valid JSON: {exc}"
        if not isinstance(schema, (dict, bool)):
            return "the schema must be a JSON object"
    try:
        grammar = _grammar(kind, source)
    except ValueError as exc:
        return str(exc)
    message = llguidance.LLMatcher.validate_grammar(grammar)
    return "" if message.startswith("WARNING") else message
